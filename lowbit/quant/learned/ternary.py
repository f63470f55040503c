"""Ternary weights (seed 001's ternary family): TWN (Li et al. 2016).

Each weight becomes −α, 0 or +α: W_t = α·sign(W)·1_{|W| > Δ} with the approximate
solution of TWN's eq. 5-6: threshold Δ = 0.7·E|W| and α = mean |W| over the weights with
|W| > Δ, both recomputed from the current weights every step (per output channel when the
recipe's weights are per-channel, per layer otherwise), and the gradient straight through
to the float weights. Deployed on the 2-bit signed mid-tread grid (codes −1, 0, 1) with
step α.
"""
from __future__ import annotations

import torch

from lowbit.quant.learned.base import TrainableQuantizer, per_row, weight_rows
from lowbit.quant.quantizer import UniformQuantizer

DELTA_FACTOR = 0.7  # TWN: Δ* ≈ 0.7·E|W| for uniform or normal weights


class TWNQuantizer(TrainableQuantizer):
    kind = "twn"
    roles = ("weights",)
    idempotent_weights = True  # {0, ±α}: Δ = 0.7·mean|·| < α keeps the non-zeros, whose mean is α
    grid_required = (2, "midtread")

    def __init__(self, source: UniformQuantizer, role: str) -> None:
        super().__init__(source, role)
        self.spec = source.spec.with_(signed=True, symmetric=True, narrow_range=True)  # codes −1, 0, 1 only
        self.signed = True

    def threshold_and_alpha(self, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(Δ, α) of TWN, shaped to broadcast against ``w`` (no gradient)."""
        a = weight_rows(w.detach(), self.spec.per_channel).abs()
        delta = DELTA_FACTOR * a.mean(1)
        keep = a > delta[:, None]
        alpha = (a * keep).sum(1) / keep.sum(1).clamp_min(1)
        # A channel with no weight kept (all zero) is 0 on any step: it gets step 1, as PTQ and LSQ give it
        # (a step of 1e-12 put its bias off the int32 grid at export).
        alpha = torch.where(keep.any(1), alpha, torch.ones_like(alpha))
        return per_row(delta, w, self.spec.per_channel), per_row(alpha, w, self.spec.per_channel)

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        delta, alpha = self.threshold_and_alpha(x)
        wt = alpha * torch.sign(x.detach()) * (x.detach().abs() > delta)
        with torch.no_grad():
            self.scale = alpha.reshape(-1 if self.spec.per_channel else ()).clone()
        return wt + (x - x.detach())  # wt exactly (x + (wt − x) rounds), gradient straight through

    def deploy_params(self, x: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if x is None:
            return self.scale.detach().clone(), self.zero_point.detach().clone()
        _, alpha = self.threshold_and_alpha(x)
        step = alpha.reshape(-1 if self.spec.per_channel else ()).clone()
        return step, torch.zeros_like(step)
