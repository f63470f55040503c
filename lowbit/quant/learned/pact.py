"""PACT (Choi et al. 2018): a learned clipping level α for activations.

y = clamp(x, 0, α), then y is quantized on k bits over [0, α] (PACT eq. 1-2). The gradient
with respect to α is 1 where x ≥ α and 0 elsewhere (eq. 3: the rounding passes straight
through and does not move α), and α carries its own L2 penalty (``alpha_decay``).
Deployed as the unsigned grid with step α / (2^k − 1).
"""
from __future__ import annotations


import torch
from torch import nn

from lowbit.errors import RecipeError
from lowbit.quant import functional as F
from lowbit.quant.learned.base import TrainableQuantizer
from lowbit.quant.quantizer import UniformQuantizer


class PACTQuantizer(TrainableQuantizer):
    kind = "pact"
    roles = ("activations",)

    def __init__(self, source: UniformQuantizer, role: str, alpha_decay: float = 5e-4) -> None:
        super().__init__(source, role)
        qmin, qmax = source.code_range()
        if qmin != 0 or bool(source.zero_point.ne(0).any()):
            raise RecipeError(f"PACT clips at 0 and needs a non-negative (post-ReLU) input; {source.name!r} is "
                              "signed: use activations.quantizer lsq+ for such tensors")
        self.alpha = nn.Parameter((source.scale.detach() * qmax).clone())
        self.alpha_decay = float(alpha_decay)

    def weight_decay_groups(self) -> list[tuple[list[nn.Parameter], float]]:
        return [([self.alpha], self.alpha_decay)]

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        _, qmax = self.code_range()
        alpha = self.alpha.abs().clamp_min(1e-8)
        y = torch.where(x >= alpha, alpha, torch.relu(x))  # d/dα = 1 exactly where x ≥ α (eq. 3)
        step = (alpha / qmax).detach()  # the rounding does not move α (eq. 3)
        with torch.no_grad():
            self.scale = step.clone()
        return F.round_ste(y / step) * step

    def deploy_params(self, x: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        _, qmax = self.code_range()
        with torch.no_grad():
            step = self.alpha.abs().clamp_min(1e-8) / qmax
        return step.clone(), torch.zeros_like(step)
