"""Where a ternary (TWN) run's latent weights ended: per conv layer, the share of weights within
5% of their channel's level α of the threshold Δ = 0.7·mean|W| (where the weight flips between
0 and ±α at the smallest step), and the mean distance of each weight to its level in units of α.

Why: oscillation dampening (the qat option ``dampen``) is meant to pull latent weights off the
thresholds and onto their levels; this says whether it did, from the checkpoints alone (read a
snapped run before its BN freeze: ``snap_at_freeze`` puts every latent on its level). Per
channel both Δ and α scale with the channel, so the BN factor (a per-channel scale) cancels and
the latent weights of the checkpoint can be read as they are.

    python benchmarks/ternary_latents.py benchmarks/results/checkpoints/resnet20-w2a32-twn-builtin-e30 \
        benchmarks/results/checkpoints/resnet20-w2a32-twn-builtin-dampen1-bf16-e30
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from lowbit.quant.learned.ternary import DELTA_FACTOR
from lowbit.state_io import committed_tensors

NEAR = 0.05  # "at the threshold": within this share of α


def layer_stats(w: torch.Tensor) -> tuple[float, float]:
    """(share of weights within NEAR·α of Δ, mean |W − level|/α) of one layer's latent weights."""
    a = w.reshape(w.shape[0], -1).abs().double()
    delta = DELTA_FACTOR * a.mean(1, keepdim=True)
    keep = a > delta
    alpha = ((a * keep).sum(1, keepdim=True) / keep.sum(1, keepdim=True).clamp_min(1)).clamp_min(1e-12)
    level = torch.where(keep, alpha, torch.zeros_like(a))
    near = ((a - delta).abs() < NEAR * alpha).double().mean()
    return float(near), float(((a - level).abs() / alpha).mean())


def run_stats(run: Path, which: str) -> list[tuple[str, float, float]]:
    side = json.loads((run / "state.json").read_text())
    name = "state.safetensors" if which == "last" else "best.safetensors"
    path = committed_tensors(run, side, name) if which == "last" else run / name
    state = load_file(str(path))
    return [(key, *layer_stats(w)) for key, w in state.items()
            if key.endswith("module.weight") and w.dim() == 4 and "net.conv1." not in key
            and not key.startswith(("ema/", "optim/"))]  # the model's ternary convs only


def main() -> None:
    which = "last"
    for arg in sys.argv[1:]:
        if arg in ("--best", "--last"):
            which = arg[2:]
            continue
        rows = run_stats(Path(arg), which)
        near = sum(r[1] for r in rows) / len(rows)
        dist = sum(r[2] for r in rows) / len(rows)
        print(f"{arg} ({which}): {len(rows)} ternary convs; at a threshold (within {NEAR:.0%} of α of Δ) "
              f"{100 * near:.2f}% (layers {100 * min(r[1] for r in rows):.2f}-{100 * max(r[1] for r in rows):.2f}%), "
              f"mean |W - level|/α {dist:.3f}")


if __name__ == "__main__":
    main()
