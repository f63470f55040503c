"""AdaRound's learned rounding (Nagel et al., 2020): each weight rounds down or up, and
which one is learned by minimising the output error rather than fixed at "nearest".

    W̃ = s · (clamp(⌊W/s⌋ + h(V) + z, qmin, qmax) − z)
    h(V) = clamp(σ(V)·(ζ − γ) + γ, 0, 1),  ζ = 1.1, γ = −0.1    (rectified sigmoid)
    f_reg(V) = Σ 1 − |2h(V) − 1|^β,  β annealed 20 → 2          (pushes h to 0 or 1)

The scale s and zero point z come from calibration and stay fixed.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from lowbit.model.quant_layer import QuantLayer
from lowbit.quant.functional import broadcast_shape

ZETA, GAMMA = 1.1, -0.1


class AdaRoundWeight(nn.Module):
    """The soft-rounded weight of one layer; installed as the layer's ``weight_fn``."""

    def __init__(self, layer: QuantLayer) -> None:
        super().__init__()
        q = layer.weight_quantizer
        w = layer.module.weight.detach()
        self.layer_name = layer.name
        self.scale = broadcast_shape(q.scale, w, q.spec.ch_axis).detach()
        self.zero_point = broadcast_shape(q.zero_point, w, q.spec.ch_axis).detach()
        self.qmin, self.qmax = q.code_range()
        # Mid-rise grids (e.g. binary weights) have levels at (q + 1/2)·scale: round on the
        # shifted axis so up/down means the neighbouring levels of that grid.
        self.offset = 0.5 if q.spec.grid == "midrise" else 0.0
        u = w / self.scale - self.offset
        self.register_buffer("w_floor", torch.floor(u))
        rest = (u - self.w_floor).clamp(1e-4, 1 - 1e-4)
        # Start where h(V) equals the fractional part, i.e. at the float weight itself.
        self.v = nn.Parameter(-torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1))

    def soft(self) -> torch.Tensor:
        return torch.clamp(torch.sigmoid(self.v) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def hard(self) -> torch.Tensor:
        return (self.v >= 0).to(self.v.dtype)

    def forward(self, hard: bool = False) -> torch.Tensor:
        h = self.hard() if hard else self.soft()
        q = torch.clamp(self.w_floor + h + self.zero_point, self.qmin, self.qmax)
        return (q - self.zero_point + self.offset) * self.scale

    def regularizer(self, beta: float) -> torch.Tensor:
        return (1 - (2 * self.soft() - 1).abs().pow(beta)).sum()

    @torch.no_grad()
    def bake(self, layer: QuantLayer) -> None:
        """Write the hard-rounded weight into the float master copy: round-to-nearest of
        the layer's unchanged quantizer then reproduces these codes exactly, so artifacts
        and ONNX export need to know nothing about AdaRound."""
        layer.module.weight.copy_(self.forward(hard=True))


def beta_schedule(step: int, total: int, warmup: float = 0.2, start: float = 20.0, end: float = 2.0) -> float | None:
    """β for the regulariser, or None during warm-up (regulariser off, as in the paper:
    first let the reconstruction loss move V, then force it to a decision)."""
    first = int(math.ceil(warmup * total))
    if step < first:
        return None
    frac = (step - first) / max(1, total - first)
    return end + (start - end) * (1 - frac)
