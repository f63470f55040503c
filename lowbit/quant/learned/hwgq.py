"""HWGQ activations (Cai et al. 2017, seed 001): the half-wave Gaussian quantizer.

A BN output is close to N(0, σ²), so after the ReLU it is a half-wave Gaussian: half its
mass at 0, the rest the positive half of the normal. HWGQ quantizes it on the unsigned
uniform grid {0, s, …, (2^b − 1)s} whose step minimises the expected squared error for
that distribution; lowbit derives the step numerically
(lowbit.quant.gaussian.optimal_half_gaussian_step, Monte-Carlo checked in the tests) instead
of copying a table. Backward: the clipped ReLU, gradient 1 on [0, top level], 0 above.

HWGQ relies on BN to make σ = 1. lowbit folds BN into the layer before, so σ is tracked:
for x = max(0, z), z ~ N(0, σ²), E[x²] = σ²/2, so σ = sqrt(2·E[x²]) of each training batch
(the global batch under DDP), averaged with momentum like BN's running statistics, and
started from the calibrated grid (σ₀ = calibrated step / s*_b). Deployed as that grid.
"""
from __future__ import annotations

import torch

from lowbit.errors import RecipeError
from lowbit.quant import functional as F
from lowbit.quant.gaussian import optimal_half_gaussian_step
from lowbit.quant.learned.base import TrainableQuantizer
from lowbit.quant.quantizer import UniformQuantizer


class HWGQQuantizer(TrainableQuantizer):
    kind = "hwgq"
    roles = ("activations",)

    def __init__(self, source: UniformQuantizer, role: str, momentum: float = 0.1) -> None:
        super().__init__(source, role)
        qmin, _ = source.code_range()
        if qmin != 0 or bool(source.zero_point.ne(0).any()):
            raise RecipeError(f"HWGQ quantizes a half-wave (post-ReLU) input; {source.name!r} is signed: use "
                              "activations.quantizer lsq+ for such tensors")
        self.unit_step = optimal_half_gaussian_step(self.spec.bits)[0]
        self.register_buffer("sigma", (source.scale.detach().reshape(()) / self.unit_step).clamp_min(1e-12).clone())
        self.momentum = float(momentum)

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        from lowbit.qat.distributed import all_reduce_sum

        if self.training:
            with torch.no_grad():
                total = all_reduce_sum(torch.stack([x.detach().pow(2).sum(), torch.tensor(float(x.numel()),
                                                                                          device=x.device)]))
                batch_sigma = torch.sqrt(2 * total[0] / total[1].clamp_min(1))
                self.sigma.mul_(1 - self.momentum).add_(self.momentum * batch_sigma.clamp_min(1e-12))
        _, qmax = self.code_range()
        step = (self.unit_step * self.sigma).detach()
        with torch.no_grad():
            self.scale = step.clone()
        y = torch.clamp(x, 0, float(qmax * step))  # clipped-ReLU backward: 1 on [0, top level]
        return F.round_ste(y / step) * step

    def deploy_params(self, x: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        step = (self.unit_step * self.sigma).detach().clone()
        return step, torch.zeros_like(step)
