"""Runtime benchmark (issue 3) for a CIFAR ResNet; see lowbit/deploy/bench.py for the method.

    python benchmarks/runtime_resnet20.py --data-dir ../shared/data --models-dir ../shared/models
"""
from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import onnxruntime
import torch

from lowbit.data import load_dataset
from lowbit.deploy.bench import run_runtime_benchmark
from lowbit.report.tables import format_table
from lowbit.zoo import pretrained


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--recipes", default="w8a8,w8a8-int8",
                    help="comma-separated recipes for lowbit's rows (w8a8-int8 also quantizes residual adds)")
    ap.add_argument("--data-dir")
    ap.add_argument("--models-dir")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=50)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "runtime_resnet20.json")
    args = ap.parse_args()
    model = pretrained(args.model, models_dir=args.models_dir)
    train = load_dataset("cifar10", "train", data_dir=args.data_dir)
    test = load_dataset("cifar10", "test", data_dir=args.data_dir)
    out = run_runtime_benchmark(model, train, test, args.recipes.split(","), args.threads, args.repeats)
    print(f"{args.model}: {out['threads']} threads, {out['test_images']} test images")
    print(format_table(out["rows"], markdown=True))
    out.update({"model": args.model, "torch": torch.__version__, "onnxruntime": onnxruntime.__version__,
                "machine": platform.processor() or platform.machine()})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
