"""Markdown tables for the README from the QAT / families result files (rows missing: "not run").

    python benchmarks/qat_tables.py
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


@lru_cache(maxsize=None)
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


# (column title, budget) and, per method, the result row that fills it: (file, row name).
MATRIX_COLUMNS = [("W4A4", "5 epochs"), ("W3A3", "30 epochs"), ("W2A2", "30 epochs"), ("W2A32", "30 epochs"),
                  ("W2A32", "1 epoch"), ("W1A32", "1 epoch"), ("W1A32", "30 epochs")]
MATRIX = {
    "LSQ / LSQ+": {
        0: ("qat_resnet20.json", "w4a4-lsq-kd-e5"), 1: ("qat_resnet20.json", "w3a3-lsq-kd-e30"),
        2: ("qat_resnet20.json", "w2a2-lsq-e30")},
    "LSQ / LSQ+, no distillation": {
        0: ("qat_resnet20.json", "w4a4-lsq-e5"), 2: ("qat_resnet20_kd.json", "w2a2-lsq-nokd-e30")},
    "LSQ / LSQ+, lr 0.003": {0: ("qat_resnet20_w4a4_lr.json", "w4a4-lsq-lr0.003-e5")},
    "LSQ / LSQ+, from the GPTQ + bias correction start": {0: ("qat_resnet20_w4a4_lr.json", "w4a4-lsq-gptq-init-e5")},
    "LSQ / LSQ+, from the GPTQ + bias correction start, distillation only (weight 1)": {
        0: ("qat_resnet20_w4a4_lr.json", "w4a4-lsq-gptq-init-kd1-e5")},
    "the same (w4a4-gptq-lsq), second seed": {0: ("qat_resnet20_w4a4_seeds.json", "w4a4-gptq-lsq-seed1-e5")},
    "the same (w4a4-gptq-lsq), third seed": {0: ("qat_resnet20_w4a4_seeds.json", "w4a4-gptq-lsq-seed2-e5")},
    "the same, second seed, at the epoch `select: within_error` keeps (5; the rule before it kept 4)": {
        0: ("qat_resnet20_w4a4_last_epoch.json", "w4a4-gptq-lsq-seed1-e5")},
    "the same, third seed, at the epoch within_error keeps (5; before: 4)": {
        0: ("qat_resnet20_w4a4_last_epoch.json", "w4a4-gptq-lsq-seed2-e5")},
    "the same, fourth seed (bf16), at the epoch within_error keeps (5; before: 4, 91.18)": {
        0: ("qat_resnet20_w4a4_last_epoch.json", "w4a4-gptq-lsq-seed3-bf16-e5")},
    "the same, fifth seed (bf16), trained under within_error (kept 5)": {
        0: ("qat_resnet20_w4a4_seeds_bf16.json", "w4a4-gptq-lsq-seed4-bf16-e5")},
    "the same, fourth seed, float32 (within_error; the bf16 fourth seed: 91.37)": {
        0: ("qat_resnet20_w4a4_seeds.json", "w4a4-gptq-lsq-seed3-e5")},
    "the same, fifth seed, float32 (within_error; the bf16 fifth seed: 91.15)": {
        0: ("qat_resnet20_w4a4_seeds.json", "w4a4-gptq-lsq-seed4-e5")},
    "the same at lr 0.002 (twice the built-in's), first seed": {
        0: ("qat_resnet20_w4a4_lr0.002.json", "w4a4-gptq-lsq-lr0.002-seed0-e5")},
    "the same at lr 0.002, second seed": {0: ("qat_resnet20_w4a4_lr0.002.json", "w4a4-gptq-lsq-lr0.002-seed1-e5")},
    "the same, 1,000 held-out images instead of 5,000 (first seed; kept epoch 3, last epoch 91.32)": {
        0: ("qat_resnet20_w4a4_val1000.json", "w4a4-gptq-lsq-val1000-seed0-e5")},
    "the same, 1,000 held out, second seed (kept epoch 4, last epoch 91.11)": {
        0: ("qat_resnet20_w4a4_val1000.json", "w4a4-gptq-lsq-val1000-seed1-e5")},
    "the same with CutMix (α 1; the teacher distils on the mixed images), first seed": {
        0: ("qat_resnet20_w4a4_mix.json", "w4a4-gptq-lsq-cutmix1.0-seed0-e5")},
    "the same with mixup (α 0.2; the teacher distils on the mixed images), first seed": {
        0: ("qat_resnet20_w4a4_mix.json", "w4a4-gptq-lsq-mixup0.2-seed0-e5")},
    "the same, first seed in bf16 (the control for the bf16 rows: 91.63 in float32)": {
        0: ("qat_resnet20_w4a4_seeds_bf16.json", "w4a4-gptq-lsq-seed0-bf16-e5")},
    "the same, BN frozen after epoch 3 (two folded epochs, not one; bf16)": {
        0: ("qat_resnet20_w4a4_bnfreeze.json", "w4a4-gptq-lsq-fbn3-bf16-e5")},
    "the same, batch 64 (twice the steps; bf16)": {0: ("qat_resnet20_w4a4_bs64.json", "w4a4-gptq-lsq-bs64-bf16-e5")},
    "the same, keeping a moving average of the weights (ema 0.998)": {
        0: ("qat_resnet20_w4a4_ema.json", "w4a4-gptq-lsq-ema0.998-e5")},
    "the same, full-range 4-bit weight grid ([−8, 7])": {
        0: ("qat_resnet20_w4a4_fullrange.json", "w4a4-gptq-lsq-fullrange-e5")},
    "the same, residual adds reading the 8-bit stream (shortcut: stream)": {
        0: ("qat_resnet20_w4a4_stream.json", "w4a4-gptq-lsq-stream-e5")},
    "the same with the 8-bit stream, second seed": {0: ("qat_resnet20_w4a4_stream.json", "w4a4-gptq-lsq-stream-seed1-e5")},
    "the same with the 8-bit stream, third seed": {0: ("qat_resnet20_w4a4_stream.json", "w4a4-gptq-lsq-stream-seed2-e5")},
    "the same, distillation temperature 1 (not 4)": {0: ("qat_resnet20_w4a4_kdT1.json", "w4a4-gptq-lsq-kdT1-e5")},
    "the same, distillation temperature 8 (not 4)": {0: ("qat_resnet20_w4a4_kdT8.json", "w4a4-gptq-lsq-kdT8-e5")},
    "the same, temperature 8, at the epoch within_error keeps (5; before: 4)": {
        0: ("qat_resnet20_w4a4_last_epoch.json", "w4a4-gptq-lsq-kdT8-e5")},
    "the same, step sizes learning at 0.01 (10× the weights' lr)": {
        0: ("qat_resnet20_w4a4_qlr.json", "w4a4-gptq-lsq-qlr0.01-e5")},
    "the same, distilled from ResNet-32 (92.63) instead of the float ResNet-20": {
        0: ("qat_resnet20_w4a4_teacher.json", "w4a4-gptq-lsq-r32teacher-e5")},
    "LSQ / LSQ+, from the float-target GPTQ + bias correction start, distillation only (weight 1)": {
        1: ("qat_resnet20_w3a3_gptq.json", "w3a3-lsq-gptq-float-kd1-e30"),
        2: ("qat_resnet20_w2a2_gptq.json", "w2a2-lsq-gptq-float-kd1-e30")},
    "the same from the float-observed float-target GPTQ + bias correction start (w3a3-gptq-affine's steps, symmetric)": {
        1: ("qat_resnet20_w3a3_gptq.json", "w3a3-lsq-gptq-float-fobs-kd1-e30")},
    "the same on the 8-bit residual stream (shortcut: stream)": {
        1: ("qat_resnet20_w3a3_gptq.json", "w3a3-lsq-gptq-float-fobs-kd1-stream-e30")},
    "W2A2 from the W3A3 row above's latent weights (progressive; the pretrained model stays the teacher), bf16": {
        2: ("qat_resnet20_w2a2_progressive.json", "w2a2-lsq-gptq-float-kd1-from-w3a3-latent-bf16-e30")},
    "WRPN: every conv 2× wider, then w4a4-gptq-lsq (bf16)": {0: ("qat_resnet20_wrpn.json", "w4a4-gptq-lsq-wrpn2-bf16-e5")},
    "LSQ / PACT": {0: ("qat_resnet20_w4a4_methods.json", "w4a4+pact+kd-e5")},
    "μL2Q (seed 000) / LSQ+": {
        0: ("qat_resnet20_w4a4_methods.json", "w4a4+ul2q+kd-e5"), 3: ("qat_resnet20.json", "w2a32-ul2q-e30"),
        4: ("qat_resnet20_weights_bnfix.json", "w2a32-ul2q-ul2q-w2-e1"),
        5: ("qat_resnet20_weights_bnfix.json", "w2a32-ul2q-ul2q-w1-e1")},
    "DoReFa / DoReFa": {
        0: ("qat_resnet20_w4a4_methods.json", "w4a4+dorefa+kd-e5"),
        4: ("qat_resnet20_weights_bnfix.json", "w2a32-ul2q-dorefa-w2-e1"),
        5: ("qat_resnet20_weights_bnfix.json", "w2a32-ul2q-dorefa-w1-e1")},
    "TWN / — from float-target GPTQ with regrid, distilled (lr 0.0005)": {
        3: ("qat_families_resnet20_e30.json", "w2a32-twn-builtin-e30"),
        4: ("qat_families_resnet20_gptq.json", "w2a32-twn-gptq-regrid-kd1-e1")},
    "TTQ / — from the same start, gradient norm clipped at 1": {
        3: ("qat_families_resnet20_e30.json", "w2a32-ttq-builtin-e30"),
        4: ("qat_families_resnet20_gptq.json", "w2a32-ttq-gptq-regrid-kd1-clip1-e1")},
    "XNOR-Net weights / — from the same start": {5: ("qat_families_resnet20_gptq.json", "w1a32-xnor-gptq-regrid-kd1-e1"),
        6: ("qat_families_resnet20_e30.json", "w1a32-xnor-builtin-e30")},
    "the same at lr 0.005, latent weights snapped at the BN freeze (w1a32-xnor now; the 30 epochs in bf16)": {
        5: ("qat_families_resnet20_gptq.json", "w1a32-xnor-gptq-regrid-kd1-lr0.005-e1"),
        6: ("qat_families_resnet20_e30.json", "w1a32-xnor-lr0.005-snap-bf16-e30")},
    "BinaryConnect / — from the same start": {
        5: ("qat_families_resnet20_gptq.json", "w1a32-binaryconnect-gptq-regrid-kd1-e1"),
        6: ("qat_families_resnet20_e30.json", "w1a32-binaryconnect-builtin-e30")},
    "the same at lr 0.005, latent weights snapped at the BN freeze (XNOR's settings; 30 epochs in bf16)": {
        6: ("qat_families_resnet20_e30.json", "w1a32-binaryconnect-lr0.005-snap-bf16-e30")},
    "IR-Net weights (Libra-PB + EDE) at BinaryConnect's settings (w1a32-irnet; 30 epochs in bf16)": {
        6: ("qat_families_resnet20_e30.json", "w1a32-irnet-builtin-bf16-e30")},
    "min-max uniform grid, STE / —": {
        4: ("qat_resnet20_weights_bnfix.json", "w2a32-ul2q-uniform-w2-e1"),
        5: ("qat_resnet20_weights_bnfix.json", "w2a32-ul2q-uniform-w1-e1")},
}
# The best post-training result of the same layout per column (README's PTQ tables; ResNet-20, full test split).
BEST_PTQ = ["90.84 (GPTQ + bias correction)", "88.00 ± 0.18 (GPTQ, float target, regrid; 3 seeds)",
            "76.04 (GPTQ, float target, regrid)",
            "88.67 (ternary: GPTQ, float target, regrid)", "88.67 (the same)",
            "74.64 (1-bit: GPTQ, float target, regrid)", "74.64 (the same)"]


E30 = "qat_families_resnet20_e30.json"
GPTQ_E1 = "qat_families_resnet20_gptq.json"
PLAIN_E1 = "qat_families_resnet20.json"
KMEANS_PTQ = "kmeans_resnet20.json"
IRNET_W1A32 = "IR-Net 90.8 (W1A32; Qin et al., CVPR 2020)"
IRNET_W1A1 = "IR-Net 86.5 (W1A1, 400 epochs from scratch; Qin et al., CVPR 2020)"
TTQ = "TTQ 91.13, float 91.77 (Zhu et al., ICLR 2017)"
# Issue 12's table: (family row, layout, post-training row, 1-epoch row, 30-epoch row, published anchor); each
# row reference is (file, row) or None. benchmarks/qat_families_e30.sh runs the 30-epoch rows.
FAMILY_TABLE = [
    ("BinaryConnect", "W1A32", None, (GPTQ_E1, "w1a32-binaryconnect-gptq-regrid-kd1-e1"),
     (E30, "w1a32-binaryconnect-builtin-e30"), IRNET_W1A32),
    ("BinaryConnect, lr 0.005, snapped at the BN freeze (30 epochs bf16)", "W1A32", None, None,
     (E30, "w1a32-binaryconnect-lr0.005-snap-bf16-e30"), IRNET_W1A32),
    ("IR-Net weights (Libra-PB + EDE), BinaryConnect's settings (w1a32-irnet; 30 epochs bf16)", "W1A32", None, None,
     (E30, "w1a32-irnet-builtin-bf16-e30"), IRNET_W1A32),
    ("XNOR-Net weights, lr 0.0005", "W1A32", None, (GPTQ_E1, "w1a32-xnor-gptq-regrid-kd1-e1"),
     (E30, "w1a32-xnor-builtin-e30"), IRNET_W1A32),
    ("XNOR-Net weights, lr 0.005, snapped at the BN freeze (w1a32-xnor; 30 epochs bf16)", "W1A32", None,
     (GPTQ_E1, "w1a32-xnor-gptq-regrid-kd1-lr0.005-e1"), (E30, "w1a32-xnor-lr0.005-snap-bf16-e30"), IRNET_W1A32),
    ("BNN, lr 0.05", "W1A1", None, None, (E30, "w1a1-bnn-builtin-lr0.05-fz29-e30"), IRNET_W1A1),
    ("XNOR-Net, lr 0.05 (bf16)", "W1A1", None, None, (E30, "w1a1-xnor-lr0.05-fz29-bf16-e30"), IRNET_W1A1),
    ("IR-Net (Libra-PB weights, EDE on weights and activations, a real shortcut around every binary conv; "
     "w1a1-irnet at lr 0.005, bf16)", "W1A1", None, None, (E30, "w1a1-irnet-lr0.005-bf16-e30"), IRNET_W1A1),
    ("IR-Net, the same with Adam at lr 5e-4, no weight decay (bf16)", "W1A1", None, None,
     (E30, "w1a1-irnet-adam-lr5e-4-bf16-e30"), IRNET_W1A1),
    ("IR-Net at lr 3e-4, distilled from the float model (KD weight 1, T 4; bf16)", "W1A1", None, None,
     (E30, "w1a1-irnet-lr3e-4-kd1-bf16-e30"), IRNET_W1A1),
    ("TWN", "W2A32", None, (GPTQ_E1, "w2a32-twn-gptq-regrid-kd1-e1"), (E30, "w2a32-twn-builtin-e30"), TTQ),
    ("TWN, BN frozen after epoch 27", "W2A32", None, None, (E30, "w2a32-twn-builtin-fz27-e30"), TTQ),
    ("TWN, snapped at the BN freeze (w2a32-twn)", "W2A32", None, None, (E30, "w2a32-twn-builtin-snap-e30"), TTQ),
    ("TWN, snapped at the BN freeze, + oscillation dampening λ 1 (bf16)", "W2A32", None,
     ("qat_dampen_probe.json", "w2a32-twn-dampen1-gridclip-bf16-e1"),
     (E30, "w2a32-twn-builtin-dampen1-bf16-e30"), TTQ),
    ("ternary grid with a learned step (LSQ weights on {−1, 0, 1}; w2a32-twn's schedule, bf16)", "W2A32", None,
     ("qat_ternary_lsq_probe.json", "w2a32-twn-lsq-ternary-bf16-e1"),
     ("qat_ternary_lsq_e30.json", "w2a32-twn-lsq-ternary-bf16-e30"), TTQ),
    ("TTQ, gradient norm clipped at 1", "W2A32", None, (GPTQ_E1, "w2a32-ttq-gptq-regrid-kd1-clip1-e1"),
     (E30, "w2a32-ttq-builtin-e30"), TTQ),
    ("k-means, 2 bits (fine-tuned: centroid lr 1e-6)", "W2A32", (KMEANS_PTQ, "w3a32-kmeans-w2-e0"),
     (PLAIN_E1, "w3a32-kmeans-ft-w2-clr1e-6-e1"), (E30, "w3a32-kmeans-ft-w2-clr1e-6-bf16-e30"), "—"),
    ("k-means, 3 bits", "W3A32", (KMEANS_PTQ, "w3a32-kmeans-w3-e0"), (PLAIN_E1, "w3a32-kmeans-ft-e1"),
     (E30, "w3a32-kmeans-ft-bf16-e30"), "—"),
    ("k-means, 4 bits", "W4A32", (KMEANS_PTQ, "w3a32-kmeans-w4-e0"), (PLAIN_E1, "w3a32-kmeans-ft-w4-e1"),
     (E30, "w3a32-kmeans-ft-w4-bf16-e30"), "—"),
    ("Hessian-weighted k-means, 2 bits (fine-tuned: centroid lr 1e-6)", "W2A32", (KMEANS_PTQ, "w3a32-kmeans-hessian-w2-e0"),
     (PLAIN_E1, "w3a32-kmeans-ft-hessian-w2-clr1e-6-e1"), (E30, "w3a32-kmeans-ft-hessian-w2-clr1e-6-e30"), "—"),
    ("Hessian-weighted k-means, 3 bits", "W3A32", (KMEANS_PTQ, "w3a32-kmeans-hessian-w3-e0"),
     (PLAIN_E1, "w3a32-kmeans-ft-hessian-e1"), (E30, "w3a32-kmeans-ft-hessian-e30"), "—"),
    ("Hessian-weighted k-means, 4 bits", "W4A32", (KMEANS_PTQ, "w3a32-kmeans-hessian-w4-e0"),
     (PLAIN_E1, "w3a32-kmeans-ft-hessian-w4-e1"), (E30, "w3a32-kmeans-ft-hessian-w4-e30"), "—"),
    ("INQ, 5 bits (BN kept apart; frozen levels not yet held: stop 44's fix)", "W5A32", None,
     (PLAIN_E1, "w5a32-inq-nofold-e1"), (E30, "w5a32-inq-w5-nofold-e30"), "—"),
    ("INQ, 5 bits (BN kept apart), frozen weights holding their levels (w5a32-inq)", "W5A32", None, None,
     (E30, "w5a32-inq-w5-nofold-held-e30"), "—"),
    ("INQ, 3 bits (BN kept apart; frozen levels not yet held)", "W3A32", None, (PLAIN_E1, "w5a32-inq-w3-nofold-e1"),
     (E30, "w5a32-inq-w3-nofold-e30"), "—"),
    ("INQ, 3 bits (BN kept apart), frozen weights holding their levels", "W3A32", None, None,
     (E30, "w5a32-inq-w3-nofold-held-e30"), "—"),
    ("INQ, 3 bits (BN kept apart), frozen weights holding their levels, least-squares top level (top_level: mse; w3a32-inq)",
     "W3A32", None, None, (E30, "w5a32-inq-w3-nofold-held-mse-e30"), "—"),
    ("HWGQ activations, XNOR weights", "W1A2", None, (GPTQ_E1, "w1a2-hwgq-gptq-regrid-kd1-e1"),
     (E30, "w1a2-hwgq-gptq-regrid-kd1-bf16-e30"), "—"),
    ("HWGQ activations, XNOR weights, retrained after the 1-bit bias fix (bf16)", "W1A2", None, None,
     (E30, "w1a2-hwgq-gptq-regrid-kd1-bf16-biasfix-e30"), "—"),
    ("HWGQ activations, TWN weights", "W2A2", None, (GPTQ_E1, "w1a2-hwgq-gptq-regrid-kd1-twn-w2a2-e1"), (E30, "w1a2-hwgq-gptq-regrid-kd1-twn-w2a2-bf16-e30"), "—"),
    ("LQ-Nets weights and activations", "W3A3", None, (PLAIN_E1, "w3a3-lqnet-lsq-firstlast-e1"),
     (E30, "w3a3-lqnet-kd1-bf16-e30"), "LQ-Nets 91.6 (Zhang et al., ECCV 2018)"),
    ("LQ-Nets weights and activations, mid-rise weight grid, from float-target GPTQ (bf16)", "W3A3", None, None,
     (E30, "w3a3-lqnet-midrise-gptq-regrid-kd1-bf16-e30"), "LQ-Nets 91.6 (Zhang et al., ECCV 2018)"),
    ("LQ-Nets weights and activations, from the calibrated start", "W2A2", None, (PLAIN_E1, "w2a2-lqnet-e1"),
     (E30, "w2a2-lqnet-kd1-bf16-e30"), "LQ-Nets 90.2 (Zhang et al., ECCV 2018)"),
    ("LQ-Nets weights and activations, from float-target GPTQ (w2a2-lqnet; bf16)", "W2A2", None, None,
     (E30, "w2a2-lqnet-gptq-regrid-kd1-bf16-e30"), "LQ-Nets 90.2 (Zhang et al., ECCV 2018)"),
]


def family_table() -> str:
    """Issue 12's table on ResNet-20: each family row post-training, after 1 and after 30 QAT epochs, its anchor."""
    def get(ref: tuple[str, str] | None) -> dict | None:
        return None if ref is None else _rows(ref[0]).get(ref[1])

    def score(ref: tuple[str, str] | None) -> str:
        return "—" if ref is None else _result(*ref)

    out = ["| family | layout | post-training | 1 epoch | 30 epochs | published anchor |", "|---|---|---|---|---|---|"]
    for label, layout, ptq, e1, e30, anchor in FAMILY_TABLE:
        if ptq is not None:  # a post-training method of its own (k-means without fine-tuning)
            r = get(ptq)
            start = f"{r['top1']:.2f}" if r is not None else "not run"
        else:  # the trained rows' own post-training start (calibration, or GPTQ where the row starts from it)
            r = get(e30) or get(e1)
            start = f"{r['ptq_start_top1']:.2f}" if r is not None else "—"
        out.append(f"| {label} | {layout} | {start} | {score(e1)} | {score(e30)} | {anchor} |")
    return "\n".join(out) + ("\n\nPost-training: the row's own start (its calibration, or float-target GPTQ with regrid "
                             "where the row starts from it); for k-means, clustering alone. The 1-epoch cells ran with the "
                             "flags of benchmarks/qat_families.sh (k-means, INQ, LQ-Nets) or qat_families_gptq.sh (the rest), "
                             "the 30-epoch cells with those of qat_families_e30.sh; they differ in places (LQ-Nets: lr 0.002 "
                             "for 1 epoch, W3A3 not distilled and W2A2 at weight 0.5, the built-ins' lr (0.001 / 0.0005) "
                             "distilled at weight 1 for 30; the Hessian k-means rows: weight decay 5e-4 for 1 epoch, 5e-5 "
                             "for 30; the HWGQ and GPTQ-start LQ-Nets rows replace the built-in's qat step, so where "
                             "qat_families_e30.sh sets no weight decay (HWGQ) it is the qat default 5e-4).")


def _unfinished(row: str, model: str = "resnet20") -> str:
    """A row without a result: where its resumable run stopped, if it has a committed checkpoint."""
    state = RESULTS / "checkpoints" / f"{model}-{row}" / "state.json"
    if not state.is_file():
        return "not run"
    side = json.loads(state.read_text())
    epochs = side["fingerprint"]["qat"]["epochs"]
    return f"running: epoch {side['epoch']}/{epochs}, held-out {side['best_val']:.2f} (training-split images)"


def _result(file: str, row: str) -> str:
    """A trained row's test top-1 (bold), "diverged", or where its unfinished run stopped."""
    r = _rows(file).get(row)
    if r is None:
        return _unfinished(row)
    return "diverged" if r.get("top1") is None else f"**{r['top1']:.2f}**"


def method_matrix() -> str:
    """Issue 11's table: method × bit width on ResNet-20, one budget per column, best PTQ beside."""
    head = "| weights / activations | " + " | ".join(f"{c} ({b})" for c, b in MATRIX_COLUMNS) + " |"
    out = [head, "|---" * (len(MATRIX_COLUMNS) + 1) + "|"]
    for method, cells in MATRIX.items():
        texts = []
        for i in range(len(MATRIX_COLUMNS)):
            if i not in cells:
                texts.append("—")
                continue
            texts.append(_result(*cells[i]))
        out.append(f"| {method} | " + " | ".join(texts) + " |")
    out.append("| best PTQ, same layout | " + " | ".join(BEST_PTQ) + " |")
    return "\n".join(out) + ("\n\nQuantized-activation cells distil from the float model (T 4, weight 0.5) unless the "
                             "row says not; the A32 cells do not distil unless the row says so. lr 0.001 (W4A4, W3A3), 0.0005 (W2A2), 0.002 "
                             "(A32) unless the row says otherwise.")


def main() -> None:
    print(f"### ResNet-20 QAT, method × bit width (float 91.73)\n\n{method_matrix()}\n")
    print(f"### ResNet-20 quantizer families, post-training / 1 / 30 QAT epochs (float 91.73)\n\n{family_table()}\n")
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
