"""DoReFa-Net (Zhou et al. 2016) weights and activations.

Weights, k > 1 bits (DoReFa eq. 9): t = tanh(w), w01 = t / (2·max|t|) + 1/2, then
w_q = 2·quantize_k(w01) − 1 ∈ [−1, 1], quantize_k(r) = round((2^k − 1)·r) / (2^k − 1), the
rounding straight-through and the gradient flowing through tanh and the max as written.
k = 1: w_q = sign(w)·E|w| (DoReFa's binary case). A fine-tuned network has no BN left
to absorb DoReFa's [−1, 1] range (lowbit folds it), so the result is multiplied by max|w|
(per channel when the recipe's weights are per-channel), taken without gradient; 2^k levels
spaced 2/(2^k − 1) apart are exactly a mid-rise grid, which is how they are deployed.

Activations (eq. 10): clamp to [0, 1], then quantize_k: the unsigned grid of step 1/(2^k − 1).
"""
from __future__ import annotations


import torch

from lowbit.errors import RecipeError
from lowbit.quant import functional as F
from lowbit.quant.learned.base import TrainableQuantizer, midrise_weight_spec, per_row, weight_rows
from lowbit.quant.quantizer import UniformQuantizer


class DoReFaWeightQuantizer(TrainableQuantizer):
    kind = "dorefa"
    roles = ("weights", "activations")

    def __init__(self, source: UniformQuantizer, role: str) -> None:
        super().__init__(source, role)
        if role == "weights":
            # 2^k levels without zero: the mid-rise grid of the same width.
            self.spec = midrise_weight_spec(source, self.kind)
            self.signed = True
        else:
            qmin, _ = source.code_range()
            if qmin != 0 or bool(source.zero_point.ne(0).any()):
                raise RecipeError(f"DoReFa activations are clipped to [0, 1]; {source.name!r} is signed: use "
                                  "activations.quantizer lsq+ for such tensors")
            _, qmax = source.code_range()
            self.scale = torch.full_like(source.scale, 1.0 / qmax)
            self.zero_point = torch.zeros_like(source.zero_point)

    def _magnitude(self, w: torch.Tensor) -> torch.Tensor:
        rows = weight_rows(w.detach(), self.spec.per_channel)
        m = rows.abs().mean(1) if self.spec.bits == 1 else rows.abs().amax(1)
        # an all-zero channel: a tiny step (mid-rise has no 0 level), not 1e-12, which its bias cannot be stored at
        return per_row(F.fill_dead_steps(m, m > 0), w, self.spec.per_channel)

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        if self.role == "activations":
            _, qmax = self.code_range()
            return F.round_ste(torch.clamp(x, 0.0, 1.0) * qmax) / qmax
        mag = self._magnitude(x)
        if self.spec.bits == 1:
            sign = torch.where(x >= 0, 1.0, -1.0)
            wq = sign + (x - x.detach())  # straight through sign(), ±1 exactly (x + (sign − x) rounds)
        else:
            n = 2 ** self.spec.bits - 1
            t = torch.tanh(x)
            per_channel = self.spec.per_channel
            tmax = per_row(weight_rows(t.abs(), per_channel).amax(1).clamp_min(1e-12), x, per_channel)
            w01 = t / (2 * tmax) + 0.5
            wq = 2 * (F.round_ste(w01 * n) / n) - 1
        with torch.no_grad():
            self.scale = self._deploy_step(mag).clone()
        return wq * mag

    def _deploy_step(self, mag: torch.Tensor) -> torch.Tensor:
        # Levels mag·(2q+1)/n (mid-rise codes q, n = 2^k − 1), i.e. step 2·mag/n; binary: ±mag.
        n = 2 ** self.spec.bits - 1
        step = 2 * mag / n
        return step.reshape(-1) if self.spec.per_channel else step.reshape(())

    def deploy_params(self, x: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        if self.role == "activations" or x is None:
            return self.scale.detach().clone(), self.zero_point.detach().clone()
        step = self._deploy_step(self._magnitude(x))
        return step, torch.zeros_like(step)
