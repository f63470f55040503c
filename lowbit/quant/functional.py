"""Quantization arithmetic as pure functions (no state).

Rounding is round-half-to-even (``torch.round``), the rounding ONNX QuantizeLinear uses,
so fake-quant here and an integer runtime agree code for code. Gradients pass straight
through the rounding (STE) and are zero where values are clipped, which also gives the
scale the LSQ-style gradient when it is a learnable tensor.
"""
from __future__ import annotations

import torch

from lowbit.quant.spec import QuantSpec


def _needs_grad(x: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and x.requires_grad


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round half to even in the forward pass, identity gradient in the backward pass."""
    return x + (torch.round(x) - x).detach() if _needs_grad(x) else torch.round(x)


def floor_ste(x: torch.Tensor) -> torch.Tensor:
    return x + (torch.floor(x) - x).detach() if _needs_grad(x) else torch.floor(x)


def broadcast_shape(param: torch.Tensor, x: torch.Tensor, ch_axis: int) -> torch.Tensor:
    """Reshape a per-channel parameter of shape [C] so it broadcasts along ``ch_axis`` of x."""
    if param.dim() == 0:
        return param
    shape = [1] * x.dim()
    shape[ch_axis] = -1
    return param.reshape(shape)


def fake_quantize(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
    qmin: int, qmax: int, grid: str = "midtread", ch_axis: int = 0,
) -> torch.Tensor:
    """Quantize then dequantize, differentiable through the STE."""
    s = broadcast_shape(scale, x, ch_axis)
    z = broadcast_shape(zero_point, x, ch_axis)
    if not (_needs_grad(x) or _needs_grad(s)):
        return _fake_quantize_inplace(x, s, z, qmin, qmax, grid)
    if not _needs_grad(z) and x.dtype == s.dtype:
        return _FakeQuantSTE.apply(x, s, z, qmin, qmax, grid == "midrise")
    if grid == "midrise":
        q = torch.clamp(floor_ste(x / s), qmin, qmax)
        return (q + 0.5) * s
    q = torch.clamp(round_ste(x / s) + z, qmin, qmax)
    return (q - z) * s


def float_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask as 0/1 in ``dtype``: multiplying by it is ~7x faster on CPU than by the bool
    tensor itself (which promotes element by element), and the conversion through uint8 costs
    less than one float multiply."""
    return mask.view(torch.uint8).to(dtype)


class _FakeQuantSTE(torch.autograd.Function):
    """The straight-through fake-quant below as one op: the same forward and the same
    gradients as the autograd chain of ``round_ste``/``clamp`` (which allocates a tensor
    per step forward and back), with the backward reduced to two passes: about 2× faster
    on a reconstruction batch's activation tensor (benchmarks/recon_step_time.py, README).

    d out/dx = 1 inside the grid (bounds inclusive, like ``clamp``), 0 outside;
    d out/ds = (q − z + o) − u inside, (q − z + o) outside, with u = x/s, q the clamped
    code and o = ½ on a mid-rise grid (LSQ's step gradient, without its scale factor).
    "Inside" is decided on the rounded code, or with ``clip_value`` on u itself before
    rounding (LSQ's eq. 3: qmin − z ≤ u ≤ qmax − z, exact since z and the bounds are integers).
    The code is round(u) + z either way, as the deployed grid and ONNX QuantizeLinear compute
    it: round(u + z) in float32 can differ from it at a tie (u = 0.49999997, z = 1 gives 2).
    """

    @staticmethod
    def forward(ctx, x, s, z, qmin, qmax, midrise, clip_value=False):  # noqa: ANN001, ANN205
        u = torch.div(x, s)
        q = torch.floor(u) if midrise else torch.round(u).add_(z)
        if clip_value and not midrise:  # "inside" decided before rounding, on u exactly
            inside = torch.ge(u, qmin - z).logical_and_(u <= qmax - z)
        else:
            inside = (q >= qmin).logical_and_(q <= qmax)
        q.clamp_(qmin, qmax)
        q.add_(0.5) if midrise else q.sub_(z)
        out = q * s
        if ctx.needs_input_grad[1]:
            # the per-element step gradient, kept instead of x: one tensor for backward
            q.sub_(u.mul_(float_mask(inside, u.dtype)))
            ctx.save_for_backward(inside, q)
        else:
            ctx.save_for_backward(inside)
        ctx.s_shape = s.shape
        return out

    @staticmethod
    def backward(ctx, grad):  # noqa: ANN001, ANN205
        inside = ctx.saved_tensors[0]
        gx = grad * float_mask(inside, grad.dtype) if ctx.needs_input_grad[0] else None
        gs = None
        if ctx.needs_input_grad[1]:
            d = ctx.saved_tensors[1] * grad
            shape = ctx.s_shape  # a scalar, or broadcast_shape's [1, .., C, .., 1]
            if len(shape) == 0:
                gs = d.sum()
            else:
                gs = d.sum([i for i, n in enumerate(shape) if n == 1], keepdim=True)
        return gx, gs, None, None, None, None, None


def lsq_fake_quantize(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor, qmin: int, qmax: int,
                      midrise: bool) -> torch.Tensor | None:
    """LSQ's fake-quant as one op, with s and z already broadcast: mid-tread clips on x/s (against
    qmin − z, qmax − z) before rounding (LSQ eq. 3), mid-rise on the floored code. None where the
    fused op does not apply (a zero point that learns, or dtypes that differ): the caller runs its
    autograd chain instead."""
    if _needs_grad(z) or x.dtype != s.dtype:
        return None
    return _FakeQuantSTE.apply(x, s, z, qmin, qmax, midrise, True)


def fake_quantize_broadcast(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor, qmin: int, qmax: int,
                            grid: str = "midtread") -> torch.Tensor:
    """Fake-quantize with scale/zero point already shaped to broadcast against x (no
    gradient): many candidate grids over one tensor in one pass, for range searches."""
    with torch.no_grad():
        return _fake_quantize_inplace(x, s, z, qmin, qmax, grid)


def _fake_quantize_inplace(x: torch.Tensor, s: torch.Tensor, z: torch.Tensor, qmin: int, qmax: int, grid: str) -> torch.Tensor:
    """Same arithmetic on one fresh buffer: inference runs several times faster."""
    q = torch.div(x, s)
    if grid == "midrise":
        return q.floor_().clamp_(qmin, qmax).add_(0.5).mul_(s)
    q.round_()
    affine = bool(z.ne(0).any())
    if affine:
        q.add_(z)
    q.clamp_(qmin, qmax)
    if affine:
        q.sub_(z)
    return q.mul_(s)


def quantize_codes(
    x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
    qmin: int, qmax: int, grid: str = "midtread", ch_axis: int = 0,
) -> torch.Tensor:
    """The integers that get stored (int32; every grid here fits in 8 bits)."""
    s = broadcast_shape(scale, x, ch_axis)
    z = broadcast_shape(zero_point, x, ch_axis)
    with torch.no_grad():
        if grid == "midrise":
            q = torch.clamp(torch.floor(x / s), qmin, qmax)
        else:
            q = torch.clamp(torch.round(x / s) + z, qmin, qmax)
    return q.to(torch.int32)


def dequantize_codes(
    codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
    grid: str = "midtread", ch_axis: int = 0,
) -> torch.Tensor:
    s = broadcast_shape(scale, codes, ch_axis)
    z = broadcast_shape(zero_point, codes, ch_axis)
    c = codes.to(s.dtype if s.is_floating_point() else torch.float32)
    if grid == "midrise":
        return (c + 0.5) * s
    return (c - z) * s


# A mid-rise grid has no 0 level: an all-zero channel (BN γ = 0, a pruned filter) takes ±step/2 whatever its
# step, so it gets this fraction of its layer's median live step. Its values stay ≈ 0 (1e-4 of a live
# weight), and its int32 bias grid s_in·step stays coarse enough for a bias of any realistic size (a step
# of 1e-12, what a clamp_min alone leaves, made the ONNX export fail: "bias does not fit int32").
DEAD_STEP_RATIO = 1e-4


def fill_dead_steps(step: torch.Tensor, live: torch.Tensor) -> torch.Tensor:
    """``step`` where ``live``, elsewhere DEAD_STEP_RATIO × the median live step along the last
    dimension (a layer's channels; 1 when none is live): the step of an all-zero channel on a
    grid without a 0 level. The reference carries no gradient; live entries keep theirs."""
    ref = torch.where(live, step.detach(), torch.full_like(step.detach(), float("nan")))
    ref = ref.reshape(1) if ref.dim() == 0 else ref
    ref = torch.nan_to_num(ref.nanmedian(dim=-1, keepdim=True).values, nan=1.0)
    return torch.where(live, step, (ref * DEAD_STEP_RATIO).reshape(ref.shape if step.dim() else ()))


def range_to_scale_zero_point(
    lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec, signed: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Turn a clipping range into (scale, zero_point) for the spec's grid.

    Symmetric grids use max(|lo|, |hi|); a midrise grid's clip is ``scale * 2^(b-1)``
    (DESIGN.md's convention). Affine grids stretch the range to contain 0 so that zero
    padding and ReLU zeros are exact. A zero-width range (an all-zero channel, a constant
    0 tensor) gets scale 1, which stores it exactly as code 0; on a mid-rise grid, which has
    no code for 0, a tiny step instead (:func:`fill_dead_steps`), so that it stays ≈ 0 rather
    than becoming +½ everywhere.
    """
    qmin, qmax = spec.code_range(signed)
    lo = torch.as_tensor(lo, dtype=torch.float32)
    hi = torch.as_tensor(hi, dtype=torch.float32)
    if spec.symmetric:
        amax = torch.maximum(lo.abs(), hi.abs())
        denom = 2 ** (spec.bits - 1) if spec.grid == "midrise" else qmax
        if spec.grid == "midrise":
            scale = fill_dead_steps(amax / denom, amax > 0)
        else:
            scale = torch.where(amax > 0, amax / denom, torch.ones_like(amax))
        return scale, torch.zeros_like(scale)
    lo = torch.minimum(lo, torch.zeros_like(lo))
    hi = torch.maximum(hi, torch.zeros_like(hi))
    width = hi - lo
    scale = torch.where(width > 0, width / (qmax - qmin), torch.ones_like(width))
    zero_point = torch.clamp(torch.round(qmin - lo / scale), qmin, qmax)
    return scale, zero_point
