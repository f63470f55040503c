"""Peers side by side (issue 13 part 6): lowbit and the quantizers users compare it with, on the
same model, the same 1,024 calibration images and the full test split, at W8A8 and W4A4.

Every tool gets its documented post-training flow; the peers that are not ONNX Runtime run in
virtual environments of their own (never lowbit dependencies), given as --peer NAME=PYTHON:

    python benchmarks/peers.py --data-dir ../shared/data --models-dir ../shared/models --model resnet20 \
        --peer brevitas=/work/venvs/brevitas/bin/python --peer nncf=/work/venvs/nncf/bin/python \
        --peer torchao=/work/venvs/torchao/bin/python --out benchmarks/results/peers_resnet20.json

Resumable: each (model, bits, tool, flow) row is kept in the JSON file and skipped when rerun. A
peer that cannot run a setting (no 4-bit mode, not installed) gets a row that says why, not a gap.
``--table`` prints the README table from the file.
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from qat import append_row, model_and_data  # noqa: E402  (the same resumable row file as the QAT tables)

LOWBIT_RECIPES = {"w8a8": ["w8a8"], "w4a4": ["w4a4", "w4a4-gptq"]}
BREVITAS_FLOWS = {"w8a8": ["mse"], "w4a4": ["mse", "gptq+bc"]}
ORT_FLOWS = {"w8a8": ["minmax"], "w4a4": ["minmax", "percentile"]}  # minmax: quantize_static's default
NOT_RUN = {  # why a peer has no row of numbers, when it cannot run a setting at all
    ("nncf", "w4a4"): "NNCF's post-training quantization of CNNs is 8-bit only (nncf.quantize has no bit-width "
                      "option; its 4-bit mode, nncf.compress_weights, compresses LLM MatMul weights only)",
    ("torchao", "w4a4"): "PT2E's X86InductorQuantizer has only its int8 configuration; a 4-bit CNN flow needs a "
                         "quantizer of one's own",
    ("aimet", None): "not in this table: AIMET (aimet-torch 2.42, its own venv with torch 2.14.1 and torchvision) "
                     "runs in the PTQ budget table, benchmarks/ptq_budgets.py --peer aimet=PYTHON "
                     "(benchmarks/peers/aimet_ptq.py)",
    ("mct", None): "not in this table: MCT (model-compression-toolkit 2.6.1, its own venv with torch 2.14.1 and "
                   "torchvision) runs in the PTQ budget table, benchmarks/ptq_budgets.py --peer mct=PYTHON "
                   "(benchmarks/peers/mct_ptq.py)",
}


def eight_bit_edges(path: Path) -> dict[str, str]:
    """The tensors that stay 8-bit in every tool's W4A4 layout, each "activation" or "weight": the
    first conv's input and weight, the classifier's input and weight, and (ORT gives a Flatten's
    output its input's grid) the pooled tensor the classifier's Flatten reads."""
    import onnx

    g = onnx.load(str(path)).graph
    first = next(n for n in g.node if n.op_type == "Conv")
    edges = {first.input[0]: "activation", first.input[1]: "weight"}
    heads = [n for n in g.node if n.op_type in ("Gemm", "MatMul")]
    if heads:
        edges.update({heads[-1].input[0]: "activation", heads[-1].input[1]: "weight"})
        producer = {o: n for n in g.node for o in n.output}.get(heads[-1].input[0])
        if producer is not None and producer.op_type in ("Flatten", "Reshape"):
            edges[producer.input[0]] = "activation"
    return edges


def ort_static(float_path: Path, out: Path, calib: list[torch.Tensor], bits: str, flow: str) -> Path:
    """ONNX Runtime's quantize_static, QDQ, per-channel weights; at W4A4 4-bit types with the first conv
    and the classifier (and their inputs) overridden to 8 bits, the layout lowbit uses."""
    from onnxruntime.quantization import CalibrationMethod, QuantType

    from lowbit.deploy.bench import ort_quantize_static

    options: dict = {"calibrate_method": {"minmax": CalibrationMethod.MinMax,
                                          "percentile": CalibrationMethod.Percentile}[flow]}
    if bits == "w4a4":
        eight = {"activation": QuantType.QUInt8, "weight": QuantType.QInt8}
        overrides = {t: [{"quant_type": eight[role]}] for t, role in eight_bit_edges(float_path).items()}
        options.update(activation_type=QuantType.QUInt4, weight_type=QuantType.QInt4,
                       extra_options={"TensorQuantOverrides": overrides})
    return ort_quantize_static(float_path, out, calib, **options)


def run_peer(python: str, args: list[str]) -> dict:
    """A peer script in its own venv; its last stdout line is one JSON object."""
    proc = subprocess.run([python, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError((proc.stderr or proc.stdout).strip().splitlines()[-1] if (proc.stderr or proc.stdout)
                           else f"exit status {proc.returncode}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--models-dir", required=True)
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--bits", default="w8a8,w4a4")
    ap.add_argument("--tools", default="lowbit,ort,nncf,torchao,brevitas,aimet,mct")
    ap.add_argument("--peer", action="append", default=[], help="NAME=PYTHON of a peer's own venv")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default="benchmarks/results/peers.json")
    ap.add_argument("--table", action="store_true", help="print the README table from --out and stop")
    args = ap.parse_args()
    out = Path(args.out)
    if args.table:
        print(table(json.loads(out.read_text())["rows"]))
        return
    torch.set_num_threads(args.threads)
    import lowbit
    from lowbit.deploy.onnx_export import export_onnx
    from lowbit.deploy.runtime import OnnxModel
    from lowbit.evaluation import TensorBatches, calibration_batches

    peers = dict(p.split("=", 1) for p in args.peer)
    done = {r["row"] for r in json.loads(out.read_text())["rows"]} if out.exists() else set()
    model, train, test = model_and_data(args.model, args.data_dir, args.models_dir)
    test_batches = TensorBatches(test, 500)
    calib = calibration_batches(train, lowbit.load_recipe("w8a8"))  # the 1,024 images every tool sees
    work = Path(tempfile.mkdtemp(prefix="lowbit-peers-"))
    float_top1 = None

    def record(row: dict) -> None:
        row.update(model=args.model, float_top1=float_top1, threads=args.threads,
                   hardware=platform.processor() or platform.machine())
        append_row(out, row)
        print(json.dumps({k: row.get(k) for k in ("row", "top1", "seconds", "why")}), flush=True)

    float_onnx = None
    for bits in args.bits.split(","):
        for tool in args.tools.split(","):
            flows = {"lowbit": LOWBIT_RECIPES[bits], "brevitas": BREVITAS_FLOWS[bits], "ort": ORT_FLOWS[bits]}.get(
                tool, ["default"])
            for flow in flows:
                key = f"{args.model}|{bits}|{tool}|{flow}"
                if key in done:
                    continue
                if float_top1 is None:
                    float_top1 = 100 * lowbit.evaluate(model, test_batches)
                why = NOT_RUN.get((tool, bits)) or (NOT_RUN.get((tool, None)) if tool not in peers else None)
                if tool in ("nncf", "torchao", "brevitas") and tool not in peers and why is None:
                    why = f"not run here: give --peer {tool}=PYTHON (a venv with {tool} installed)"
                if why:
                    record({"row": key, "bits": bits, "tool": tool, "flow": flow, "top1": None, "why": why})
                    continue
                if float_onnx is None:
                    qm = lowbit.quantize(model, "w8a8", calib=calib, progress=False)
                    with qm.quantization(weights=False, activations=False):
                        float_onnx = export_onnx(qm, work / "float.onnx", calib[0][:1])
                    np.save(work / "calib.npy", torch.cat(calib).numpy())
                row = {"row": key, "bits": bits, "tool": tool, "flow": flow}
                try:
                    start = time.perf_counter()
                    if tool == "lowbit":
                        qm = lowbit.quantize(model, flow, calib=calib, progress=False)
                        row["seconds"] = time.perf_counter() - start
                        row["top1"] = 100 * lowbit.evaluate(qm, test_batches)
                        row["version"] = lowbit.__version__
                    elif tool == "ort":
                        import onnxruntime
                        path = ort_static(float_onnx, work / f"ort_{bits}_{flow}.onnx", calib, bits, flow)
                        row["seconds"] = time.perf_counter() - start
                        row["top1"] = 100 * lowbit.evaluate(OnnxModel(path, threads=args.threads), test_batches)
                        row["version"] = onnxruntime.__version__
                    elif tool == "nncf":
                        res = run_peer(peers["nncf"], [str(HERE / "peers" / "nncf_openvino.py"), str(float_onnx),
                                                       str(work / "calib.npy"), str(work / "nncf.xml")])
                        row["seconds"], row["version"] = res["seconds"], f"nncf {res['nncf']}"
                        row["top1"] = 100 * lowbit.evaluate(OnnxModel(work / "nncf.xml", threads=args.threads,
                                                                       runtime="openvino"), test_batches)
                    elif tool == "torchao":
                        res = run_peer(peers["torchao"], [str(HERE / "peers" / "torchao_pt2e.py"), "--data-dir",
                                                          args.data_dir, "--models-dir", args.models_dir, "--model",
                                                          args.model, "--threads", str(args.threads)])
                        row.update(top1=res["top1"], seconds=res["seconds"], version=res["version"])
                    elif tool == "brevitas":
                        res = run_peer(peers["brevitas"], [str(HERE / "peers" / "brevitas_ptq.py"), "--config", bits,
                                                           "--flow", flow, "--seed", "0", "--threads",
                                                           str(args.threads), "--data-dir", args.data_dir,
                                                           "--models-dir", args.models_dir, "--model", args.model])
                        row.update(top1=res["top1"], seconds=res["quant_seconds"], version=res["tool"])
                    else:
                        raise RuntimeError(f"no runner for {tool!r}")
                except Exception as err:  # noqa: BLE001 - a peer that fails is a row saying how
                    row.update(top1=None, why=f"failed: {type(err).__name__}: {str(err)[:300]}")
                record(row)


def table(rows: list[dict]) -> str:
    lines = ["| model | bits | tool, flow | top-1 | drop (pt) | quantize time (s) | version / why not |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.get("top1") is None:
            lines.append(f"| {r['model']} | {r['bits']} | {r['tool']}, {r['flow']} | — | — | — | {r['why']} |")
        else:
            lines.append(f"| {r['model']} | {r['bits']} | {r['tool']}, {r['flow']} | {r['top1']:.2f} | "
                         f"{r['float_top1'] - r['top1']:.2f} | {r['seconds']:.1f} | {r.get('version') or ''} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
