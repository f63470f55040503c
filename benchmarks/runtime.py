"""Runtime benchmark (issue 10): engines x runtimes on a CIFAR ResNet, in one process.

Engines: PyTorch float, the float ONNX model (BN folded), lowbit's QDQ ONNX per recipe,
ONNX Runtime's ``quantize_static`` and, with ``--nncf-python``, NNCF's OpenVINO int8 model
(NNCF runs in its own virtual environment: it is never a lowbit dependency). Every
quantizer calibrates on the same 1024 training images; top-1 on the full test split;
batch-1 latency and batch-64 throughput are medians of timed runs after warm-up, with the
same intra-op thread count for every engine. See lowbit/deploy/bench.py for the method.

    python benchmarks/runtime.py --data-dir ../shared/data --models-dir ../shared/models \\
        --runtimes ort,openvino --nncf-python ../peer-venv/bin/python
    python benchmarks/runtime.py --model resnet56 --untrained ...   # no ResNet-56 weights here: speed only
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime
import torch

from lowbit.data import load_dataset
from lowbit.deploy.bench import run_runtime_benchmark
from lowbit.evaluation import calibration_batches
from lowbit.recipes.recipe import load_recipe
from lowbit.report.tables import format_table
from lowbit.zoo import build, pretrained

HERE = Path(__file__).parent
COLUMNS = ["engine", "runtime", "top1", "throughput_b64_img_s", "b64_vs_float_ort", "b64_vs_float_openvino",
           "latency_b1_ms", "b1_vs_float_ort", "b1_vs_float_openvino", "file_kb", "quantize_s"]


def nncf_peer(python: str, model, train, recipe: str, work: Path) -> tuple[str, Path, list[str], float]:
    """Quantize the float ONNX model with NNCF in its own interpreter, on the same images."""
    from lowbit.api import quantize
    from lowbit.deploy.onnx_export import export_onnx

    r = load_recipe(recipe)
    calib = calibration_batches(train, r)
    qm = quantize(model, r, calib=calib, progress=False)
    with qm.quantization(weights=False, activations=False):
        float_onnx = export_onnx(qm, work / "float_for_nncf.onnx", calib[0][:1])
    np.save(work / "calib.npy", torch.cat(calib).numpy())
    out = work / "nncf_int8.xml"
    done = subprocess.run([python, str(HERE / "peers" / "nncf_openvino.py"), str(float_onnx), str(work / "calib.npy"),
                           str(out)], check=True, capture_output=True, text=True)
    info = json.loads(done.stdout.strip().splitlines()[-1])
    return "nncf (openvino int8)", out, ["openvino"], info["seconds"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--untrained", action="store_true",
                    help="seeded random weights (speed only; top-1 is not reported)")
    ap.add_argument("--recipes", default="w8a8")
    ap.add_argument("--runtimes", default="ort,openvino")
    ap.add_argument("--nncf-python", help="python of a venv with nncf + openvino, for the NNCF peer row")
    ap.add_argument("--data-dir")
    ap.add_argument("--models-dir")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/lowbit-runtime-bench"))
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    torch.manual_seed(0)
    model = build(args.model).eval() if args.untrained else pretrained(args.model, models_dir=args.models_dir)
    train = load_dataset("cifar10", "train", data_dir=args.data_dir)
    test = load_dataset("cifar10", "test", data_dir=args.data_dir)
    args.workdir.mkdir(parents=True, exist_ok=True)
    peers = [nncf_peer(args.nncf_python, model, train, args.recipes.split(",")[0], args.workdir)] if args.nncf_python else []
    out = run_runtime_benchmark(model, train, test, args.recipes.split(","), args.threads, args.repeats,
                                workdir=args.workdir, runtimes=args.runtimes.split(","), peers=peers)
    if args.untrained:
        for row in out["rows"]:
            row["top1"] = None
    print(f"{args.model}{' (untrained)' if args.untrained else ''}: {out['threads']} threads, "
          f"{out['test_images']} test images")
    print(format_table([{k: row.get(k) for k in COLUMNS} for row in out["rows"]], markdown=True))
    import openvino
    out.update({"model": args.model, "untrained": args.untrained, "torch": torch.__version__,
                "onnxruntime": onnxruntime.__version__, "openvino": openvino.__version__,
                "machine": platform.processor() or platform.machine(), "command": " ".join(sys.argv)})
    path = args.out or HERE / "results" / f"runtime_{args.model}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=2))
    tmp.replace(path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
