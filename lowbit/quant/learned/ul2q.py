"""μL2Q (seed 000): quantize weights as a standard normal with the loss-optimal step.

Every forward pass (seed 000's procedure, DESIGN.md's summary): standardise the weight by
its *current* spread σ, φ = w/σ, taken without gradient; quantize φ on the b-bit mid-rise
grid with the step α_b that minimises E[(φ − Q(φ))²] for φ ~ N(0, 1) (derived numerically
in lowbit.quant.gaussian, not a table constant); rescale by σ. The gradient passes straight
through to the float weight (zero where φ is clipped).

One deliberate difference from (w − μ)/σ: σ is measured about zero, σ = sqrt(E[w²]), and no
mean is subtracted. For a centred tensor the two are the same; the difference is what an
integer kernel can run. Adding μ back after quantizing puts the grid off zero (a fractional
weight zero point, which no integer kernel has), and subtracting μ without adding it back
shifts every weight of the layer, which a post-ReLU input turns into a large bias. Measured
on ResNet-20 (BN folded, 4-bit weights, float activations, 512 training images): μ dropped
13.5% (per tensor) / 19.3% (per channel), μ added back 67.2% / 90.4%, σ about zero 78.5% /
90.2%. The result is a symmetric mid-rise grid of step α_b·σ, deployed as such. Per tensor
as in the paper; per output channel when the recipe's weights are per-channel.
"""
from __future__ import annotations


import torch

from lowbit.quant import functional as F
from lowbit.quant.gaussian import optimal_gaussian_step
from lowbit.quant.learned.base import TrainableQuantizer, midrise_weight_spec, per_row, weight_rows
from lowbit.quant.quantizer import UniformQuantizer


class MuL2QQuantizer(TrainableQuantizer):
    kind = "ul2q"
    roles = ("weights",)

    def __init__(self, source: UniformQuantizer, role: str) -> None:
        super().__init__(source, role)
        self.spec = midrise_weight_spec(source, self.kind)
        self.signed = True
        self.alpha = optimal_gaussian_step(self.spec.bits, "midrise")[0]

    def statistics(self, w: torch.Tensor) -> torch.Tensor:
        """σ = sqrt(E[w²]) of the current weight, per tensor or per output channel, shaped to broadcast."""
        sigma = weight_rows(w.detach(), self.spec.per_channel).pow(2).mean(1).sqrt()
        # an all-zero channel: a tiny step (mid-rise has no 0 level), not 1e-12, which its bias cannot be stored at
        return per_row(F.fill_dead_steps(sigma, sigma > 0), w, self.spec.per_channel)

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        qmin, qmax = self.code_range()
        sigma = self.statistics(x)
        phi = x / sigma                                          # standardise (no gradient through σ)
        q = torch.clamp(F.floor_ste(phi / self.alpha), qmin, qmax)  # mid-rise codes
        with torch.no_grad():
            self.scale = (self.alpha * sigma).reshape(-1 if self.spec.per_channel else ()).clone()
        return (q + 0.5) * (self.alpha * sigma)                 # rescale by σ

    def deploy_params(self, x: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if x is None:
            return self.scale.detach().clone(), self.zero_point.detach().clone()
        sigma = self.statistics(x)
        step = (self.alpha * sigma).reshape(-1 if self.spec.per_channel else ())
        return step, torch.zeros_like(step)
