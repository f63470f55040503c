"""What the BN freeze did to each of several QAT runs: a markdown table from their checkpoint
folders (metrics.jsonl) and, where finished, their rows in a results file.

For each run: the epoch BN froze, the training loss of the last epoch before it and of the
first after it (a collapse shows as a jump), the held-out top-1 around it, the best held-out
epoch and the test top-1 of the kept model (the results row; "running" until it finishes).

    python benchmarks/freeze_study.py --results benchmarks/results/qat_families_resnet20_e30.json \
        benchmarks/results/checkpoints/resnet20-w2a32-twn-builtin-e30 \
        benchmarks/results/checkpoints/resnet20-w2a32-twn-builtin-fz27-e30 ...
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path


def freeze_row(folder: Path, results: dict[str, dict]) -> str:
    history = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]
    side = json.loads((folder / "state.json").read_text())
    frozen = next((i for i, r in enumerate(history) if r["bn_frozen"]), None)
    name = folder.name.split("-", 1)[1]  # the results row: the folder less its "<model>-" prefix
    row = results.get(name)
    test = f"**{row['top1']:.2f}**" if row and row.get("top1") is not None else f"running ({len(history)} epochs)"
    best = max(history, key=lambda r: r["val_top1"])
    branched = side.get("branched_from")
    origin = f"epoch {branched['epoch']} of {Path(branched['folder']).name}" if branched else "—"
    if frozen is None:
        around = "not frozen yet"
    elif frozen == 0:
        around = "frozen from epoch 1"
    else:
        before, after = history[frozen - 1], history[frozen]
        around = (f"epoch {frozen + 1}: loss {before['train_loss']:.3f} → {after['train_loss']:.3f}, held-out "
                  f"{before['val_top1']:.2f} → {after['val_top1']:.2f}")
    return (f"| {name} | {origin} | {around} | {best['val_top1']:.2f} (epoch {best['epoch']}) | "
            f"{history[-1]['val_top1']:.2f} | {test} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folders", nargs="+", type=Path, help="QAT checkpoint folders")
    ap.add_argument("--results", type=Path, help="the benchmarks/qat.py results file of the runs")
    args = ap.parse_args()
    results = {r["row"]: r for r in json.loads(args.results.read_text())["rows"]} if args.results else {}
    print("| run | branched from | BN freeze (training loss, held-out top-1: last epoch before → first after) | "
          "best held-out | last held-out | test top-1 |")
    print("|---|---|---|---|---|---|")
    for folder in args.folders:
        print(freeze_row(folder, results))


if __name__ == "__main__":
    main()
