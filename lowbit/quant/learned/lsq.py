"""LSQ (Esser et al. 2020) and LSQ+ (Bhalgat et al. 2020): the step size is a parameter
learned by gradient descent; LSQ+ also learns the offset of affine activation grids.

Gradient of the fake-quantized value v̂ = (clamp(round(v/s) + z, qmin, qmax) − z)·s with
respect to s (LSQ eq. 3): round(v/s) − v/s inside the range, qmin − z or qmax − z where v is
clipped; autograd derives exactly that from the straight-through rounding. The step's
gradient is scaled by g = 1/sqrt(N·Qp) (LSQ section 2.2), N the number of elements one
step quantizes (a weight tensor or channel, one sample's activations), Qp = qmax.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from lowbit.quant import functional as F
from lowbit.quant.learned.base import TrainableQuantizer, grad_scale
from lowbit.quant.quantizer import UniformQuantizer

MIN_STEP = 1e-8  # |step| is used and kept off 0: a step pushed through zero stays trainable (a clamp
# alone would freeze it below MIN_STEP, quantizing everything to 0: measured at W2A2)


class LSQQuantizer(TrainableQuantizer):
    """Learned step; ``learn_offset`` (LSQ+) makes an affine grid's zero point learnable too."""

    kind = "lsq"

    def __init__(self, source: UniformQuantizer, role: str, learn_offset: bool = False, grad_scale: bool = True) -> None:
        super().__init__(source, role)
        self.scale = nn.Parameter(source.scale.detach().clone().clamp_min(MIN_STEP))
        # LSQ+ applies to grids whose zero point is not pinned at 0 (signed tensors on an
        # unsigned grid); after a ReLU the offset is exactly 0 and stays there.
        affine = not self.spec.symmetric and bool(source.zero_point.ne(0).any())
        self.learn_offset = bool(learn_offset and affine)
        if self.learn_offset:
            self.zero_point = nn.Parameter(source.zero_point.detach().clone())
        self.use_grad_scale = grad_scale

    def set_params(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        with torch.no_grad():
            self.scale.copy_(scale.to(self.scale.device).reshape(self.scale.shape).clamp_min(MIN_STEP))
            self.zero_point.copy_(zero_point.to(self.zero_point.device).reshape(self.zero_point.shape))
        self.calibrated = True

    def _grad_factor(self, x: torch.Tensor) -> float:
        if not self.use_grad_scale:
            return 1.0
        _, qmax = self.code_range()
        if self.role == "weights":
            n = x[0].numel() if self.spec.per_channel else x.numel()
        else:  # one sample's features (the batch dimension is not part of N)
            n = x[0].numel() if x.dim() > 1 else x.numel()
        return 1.0 / math.sqrt(max(n, 1) * max(qmax, 1))

    def follows_bn_factor(self) -> bool:
        # Q(W·f; s·|f|) = |f|·Q(sign(f)·W; s) needs a zero point of 0 and one step per
        # output channel (f is one factor per output channel).
        return (self.role == "weights" and self.spec.per_channel and self.spec.ch_axis == 0
                and not self.learn_offset and bool(self.zero_point.eq(0).all()))

    def folded_step(self, factor: torch.Tensor) -> torch.Tensor:
        return self.scale.abs().clamp_min(MIN_STEP) * factor.abs().reshape(self.scale.shape)

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        qmin, qmax = self.code_range()
        g = self._grad_factor(x)
        s = grad_scale(self.scale.abs().clamp_min(MIN_STEP), g)
        if self._step_factor is not None:  # the layer's BN factor |γ/σ| (TrainableQuantizer.follows_bn_factor)
            s = s * self._step_factor.reshape(s.shape)
        z = self.zero_point
        if self.learn_offset:  # an integer offset on the grid, learned through the STE
            z = F.round_ste(grad_scale(z, g)).clamp(qmin, qmax)
        s = F.broadcast_shape(s, x, self.spec.ch_axis)
        z = F.broadcast_shape(z, x, self.spec.ch_axis)
        fused = F.lsq_fake_quantize(x, s, z, qmin, qmax, self.spec.grid == "midrise")
        if fused is not None:  # the chain below as one op: same values and gradients, ~2x less time
            return fused
        if self.spec.grid == "midrise":
            return (torch.clamp(F.floor_ste(x / s), qmin, qmax) + 0.5) * s
        # Clip before rounding: LSQ's eq. 3 decides "clipped" on v/s, not on round(v/s). Clipping v/s to
        # [qmin − z, qmax − z] (integers) gives the same gradients as clamp(v/s + z, qmin, qmax) − z and the
        # value clamp(round(v/s) + z) − z that the deployed grid computes, which round(v/s + z) − z in
        # float32 is not at every tie.
        return F.round_ste(torch.clamp(x / s, qmin - z, qmax - z)) * s

    def deploy_params(self, x: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        qmin, qmax = self.code_range()
        with torch.no_grad():
            return self.scale.abs().clamp_min(MIN_STEP).clone(), torch.round(self.zero_point).clamp(qmin, qmax).clone()


class LSQPlusQuantizer(LSQQuantizer):
    """LSQ+: LSQ with the offset learned where the grid is affine."""

    kind = "lsq+"

    def __init__(self, source: UniformQuantizer, role: str, **options: Any) -> None:
        options.setdefault("learn_offset", True)
        super().__init__(source, role, **options)


class FixedGridWeightQuantizer(LSQQuantizer):
    """The calibrated grid kept fixed while QAT trains the weights through the straight-through
    estimator (a recipe's ``weights.quantizer: uniform`` with a ``qat`` step): LSQ's forward
    with the step frozen. Its step belongs to the weight before the layer's BN factor, like
    LSQ's (TrainableQuantizer.follows_bn_factor): a step fixed on the folded weight W·γ/σ
    makes BN's running variance grow without bound (measured: ResNet-20 1-bit and 2-bit
    min-max rows, σ² non-finite within 60–270 steps)."""

    kind = "uniform"

    def __init__(self, source: UniformQuantizer, role: str) -> None:
        super().__init__(source, role, learn_offset=False, grad_scale=False)
        self.scale.requires_grad_(False)
