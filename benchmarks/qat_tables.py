"""Markdown tables for the README from the QAT / families result files (rows missing: "not run").

    python benchmarks/qat_tables.py
"""
from __future__ import annotations

import json
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def _rows(name: str) -> dict[str, dict]:
    path = RESULTS / name
    return {r["row"]: r for r in json.loads(path.read_text())["rows"]} if path.exists() else {}


def _cell(row: dict | None) -> str:
    if row is None:
        return "not run"
    if row.get("top1") is None:
        return f"{row['ptq_start_top1']:.2f} → diverged"
    return f"{row['ptq_start_top1']:.2f} → **{row['top1']:.2f}**"


def weight_quantizers(name: str) -> str:
    rows = _rows(name)
    out = ["| weight bits | μL2Q (calibration → QAT) | DoReFa | uniform min-max grid, STE |", "|---|---|---|---|"]
    for b in (1, 2, 4):
        cells = [_cell(rows.get(f"w2a32-ul2q-{q}-w{b}-e1")) for q in ("ul2q", "dorefa", "uniform")]
        out.append(f"| {b} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def families(name: str) -> str:
    rows = _rows(name)
    out = ["| row | budget | calibration only | result | wall time (s) |", "|---|---|---|---|---|"]
    for key, r in rows.items():
        budget = "PTQ" if r["epochs"] == 0 else f"{r['epochs']} epoch(s)"
        result = "diverged" if r.get("top1") is None else f"**{r['top1']:.2f}**"
        out.append(f"| {key} | {budget} | {r['ptq_start_top1']:.2f} | {result} | {r['wall_seconds']:.0f} |")
    return "\n".join(out)


def main() -> None:
    for title, text in (
        ("ResNet-20 weight quantizers (qat_resnet20_weights_bnfix.json)", weight_quantizers("qat_resnet20_weights_bnfix.json")),
        ("ResNet-20 weight quantizers, before the BN fixes (qat_resnet20_weights.json)",
         weight_quantizers("qat_resnet20_weights.json")),
        ("ResNet-20 W4A4 QAT methods, 5 epochs (qat_resnet20_w4a4_methods.json)", families("qat_resnet20_w4a4_methods.json")),
        ("LeNet-5 weight quantizers (qat_lenet5.json)", weight_quantizers("qat_lenet5.json")),
        ("LeNet-5 families (qat_families_lenet5.json)", families("qat_families_lenet5.json")),
        ("Fashion-MNIST small CNN families (qat_families_fashion.json)", families("qat_families_fashion.json")),
        ("ResNet-20 k-means (kmeans_resnet20.json)", families("kmeans_resnet20.json")),
        ("LeNet-5 WRPN (qat_lenet5_wrpn.json)", families("qat_lenet5_wrpn.json")),
        ("ResNet-20 QAT (qat_resnet20.json)", families("qat_resnet20.json")),
        ("ResNet-20 QAT, distillation off (qat_resnet20_kd.json)", families("qat_resnet20_kd.json")),
    ):
        print(f"### {title}\n\n{text}\n")


if __name__ == "__main__":
    main()
