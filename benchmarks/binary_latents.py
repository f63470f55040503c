"""How far a binary run's latent weights moved: per conv layer, the median of |W| over its channel's
mean |W| and the share of weights within a quarter of that mean of zero (where a sign can flip).

GPTQ's start leaves every weight at ±(its channel's level), so a median of 1.00 with almost nothing
near zero means training barely moved them (README, XNOR vs BinaryConnect).

    python benchmarks/binary_latents.py benchmarks/results/checkpoints/resnet20-w1a32-xnor-builtin-e30 \
        benchmarks/results/checkpoints/resnet20-w1a32-binaryconnect-builtin-e30
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from safetensors.torch import load_file

from lowbit.state_io import committed_tensors


def latent_stats(run: Path) -> list[tuple[str, float, float]]:
    state = load_file(str(committed_tensors(run, json.loads((run / "state.json").read_text()), "state.safetensors")))
    rows = []
    for key, w in state.items():
        if not key.endswith("module.weight") or w.dim() != 4 or "net.conv1." in key:
            continue  # conv layers only; the 8-bit first conv is not binary
        r = w.reshape(w.shape[0], -1)
        u = (r / r.abs().mean(1, keepdim=True).clamp_min(1e-12)).abs()
        rows.append((key, float(u.median()), float((u < 0.25).float().mean())))
    return rows


def main() -> None:
    for run in sys.argv[1:]:
        print(run)
        for key, median, near_zero in latent_stats(Path(run)):
            print(f"  {key}: median |W|/mean|W| {median:.3f}, within mean/4 of zero {100 * near_zero:.1f}%")


if __name__ == "__main__":
    main()
