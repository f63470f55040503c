"""How much of ResNet-20 INQ's power-of-two level set sends to zero, per bit width, on the raw
conv weights and on the BN-folded ones (why INQ at 3 bits fails where 5 bits works):

    python benchmarks/inq_levels.py [--models-dir ../shared/models] [--top-level max|mse]

Each conv but the first (the first stays 8-bit in the recipes) is quantized as a whole tensor
to INQ's levels (lowbit.quant.learned.inq.power_of_two_levels, INQ eq. 2-3); printed: the
share of weights that become zero and ‖Q(W) − W‖/‖W‖, averaged over the layers.
"""
from __future__ import annotations

import argparse

import torch

from lowbit.quant.learned.inq import nearest_levels, power_of_two_levels
from lowbit.zoo import pretrained


def conv_bn_pairs(model: torch.nn.Module) -> list[tuple[torch.nn.Conv2d, torch.nn.BatchNorm2d]]:
    """Each conv with the BatchNorm that follows it in module order (ResNet-20's layout)."""
    mods = list(model.modules())
    return [(m, nxt) for m, nxt in zip(mods, mods[1:])
            if isinstance(m, torch.nn.Conv2d) and isinstance(nxt, torch.nn.BatchNorm2d)]


def zero_share_and_error(w: torch.Tensor, bits: int, top_level: str = "max") -> tuple[float, float]:
    q = nearest_levels(w, power_of_two_levels(w, bits, top_level))
    return float((q == 0).float().mean()), float((q - w).norm() / w.norm())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models-dir", default="../shared/models")
    ap.add_argument("--top-level", default="max", choices=["max", "mse"],
                    help="INQ's largest level from max|W| (eq. 2) or by least squares (weights.quantizer_options)")
    args = ap.parse_args()
    pairs = conv_bn_pairs(pretrained("resnet20", models_dir=args.models_dir, download=False))[1:]
    for bits in (3, 4, 5):
        for label, fold in (("raw W", False), ("folded W·γ/σ", True)):
            stats = []
            for conv, bn in pairs:
                w = conv.weight.detach()
                if fold:
                    w = w * (bn.weight / (bn.running_var + bn.eps).sqrt()).detach().reshape(-1, 1, 1, 1)
                stats.append(zero_share_and_error(w, bits, args.top_level))
            zero = sum(z for z, _ in stats) / len(stats)
            err = sum(e for _, e in stats) / len(stats)
            print(f"{bits}-bit INQ ({args.top_level}) on {label}: {100 * zero:.1f}% of weights zero, relative error {err:.3f} "
                  f"(mean over {len(stats)} convs)")


if __name__ == "__main__":
    main()
