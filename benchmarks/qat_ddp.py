"""QAT on 1 vs N processes (torchrun, gloo on CPU): wall time per epoch and final top-1.

Each run is `torchrun --nproc-per-node N -m lowbit train ...` with one thread per process,
the same recipe, global batch and data; seconds per epoch come from the run's own
metrics.jsonl, top-1 from the full test split. Rows are appended to --out (resumable).

    python benchmarks/qat_ddp.py --data-dir ../shared/data --models-dir ../shared/models \
        --model resnet20 --recipe w4a4-lsq --epochs 1 --train-limit 10000 --out benchmarks/results/qat_ddp.json
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lowbit.state_io import atomic_write_text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data-dir", required=True)
    ap.add_argument("--models-dir", required=True)
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--recipe", default="w4a4-lsq")
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--train-limit", type=int, default=10000)
    ap.add_argument("--val-samples", type=int, default=1000)
    ap.add_argument("--processes", default="1,2")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {"rows": []}
    done = {(r["model"], r["recipe"], r["epochs"], r["train_limit"], r["processes"]) for r in results["rows"]}
    for n in (int(p) for p in args.processes.split(",")):
        key = (args.model, args.recipe, args.epochs, args.train_limit, n)
        if key in done:
            continue
        with tempfile.TemporaryDirectory() as tmp:
            report = Path(tmp) / "report.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={n}", "-m", "lowbit", "train",
                   "--model", args.model, "--recipe", args.recipe, "--epochs", str(args.epochs),
                   "--train-limit", str(args.train_limit), "--val-samples", str(args.val_samples),
                   "--data-dir", args.data_dir, "--models-dir", args.models_dir, "--threads", "1", "--no-progress",
                   "--checkpoint", str(Path(tmp) / "run"), "--json", str(report)]
            start = time.perf_counter()
            subprocess.run(cmd, check=True)
            wall = time.perf_counter() - start
            metrics = [json.loads(line) for line in (Path(tmp) / "run" / "metrics.jsonl").read_text().splitlines()]
            row = json.loads(report.read_text())["rows"][0]
        results["rows"].append({"model": args.model, "recipe": args.recipe, "epochs": args.epochs,
                                "train_limit": args.train_limit, "processes": n, "top1": row["top1"],
                                "float_top1": row["float_top1"],
                                "seconds_per_epoch": [m["seconds"] for m in metrics], "wall_seconds": wall})
        print(json.dumps(results["rows"][-1]), flush=True)
        atomic_write_text(out, json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
