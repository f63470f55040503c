"""Moment matching: seed 004's USP for a network whose BatchNorm is folded.

USP "corrects the mean and variance shift that quantization produces by updating the mean
and variance in the BatchNorm layers" (seed 004, abstract). Once BN is folded into the
convolution (the layout an integer runtime runs) there is no BN left to update, but the
same correction is an affine map per output channel of each layer: with the float
network's channel mean and variance of the layer's output (m_f, v_f) and the quantized
network's (m_q, v_q) on the same images,

    y' = a·y + c,    a = sqrt(v_f / v_q),    c = m_f − a·m_q,

which is exactly what re-estimated BN statistics do to the folded layer. The scale a is
applied to each output channel's weight step (and to the float weights with it, so the
integer codes stay the same), the shift goes into the bias: the corrected model has the
same integer weights and runs unchanged in every runtime.

With ``fold_bn: false`` the BN stays a float op after the layer; matching the layer's own
output to the float one then hands that BN the statistics it was trained for, the same end.
Layers are corrected in network order in one pass of the quantized network (each layer's
hook corrects it before its output moves on), plus one float pass for the targets; a large
calibration set goes through in chunks (``chunk``).
Matching the mean alone (bias correction on outputs) is worse than leaving it: on
ResNet-20 W4A4 it is the variance that carries the gain (README, issue 16 part 1).
"""
from __future__ import annotations

import warnings

import torch
from tqdm import tqdm

from lowbit.errors import LowbitError, NumericalError
from lowbit.model.quant_layer import QuantLayer
from lowbit.ptq.bias_correction import _add_to_bias, _float_pass_means
from lowbit.ptq.channels import channel_dim, channel_shape, channels_first
from lowbit.quant.quantizer import UniformQuantizer


AUTO_CHUNK_VALUES = 4 * 1024 * 1024


def _channel_moments(out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    dims = [d for d in range(out.dim()) if d != 1] if out.dim() > 1 else []
    return out.mean(dims), out.var(dims, unbiased=False)


def _why_not(layer: QuantLayer) -> str | None:
    """Why the layer's weight grid cannot take a per-channel scale (None: it can)."""
    q = layer.weight_quantizer
    if type(q) is not UniformQuantizer:  # subclasses (codebooks, learned kinds) read their scale otherwise
        return f"{type(q).__name__} weights"
    if q.scale.numel() != layer.module.weight.shape[0]:
        return "a per-tensor uniform grid"
    return None


def _scale_channels(layer: QuantLayer, a: torch.Tensor) -> None:
    """Multiply output channel k of the layer's weights, and its weight step, by a[k]: the
    integer codes stay what they were, the dequantized weights scale by a."""
    w = layer.module.weight
    w.mul_(a.reshape([-1] + [1] * (w.dim() - 1)))
    q = layer.weight_quantizer
    q.scale = q.scale * a.reshape(q.scale.shape).to(q.scale.dtype)
    if layer.module.bias is not None:
        layer.module.bias.mul_(a)


def _bias_term(layer: QuantLayer, out: torch.Tensor) -> torch.Tensor:
    """The bias as the layer adds it (on its int32 grid), shaped to broadcast over ``out``."""
    b = layer.quantized_bias()
    if b is None:
        return torch.zeros((), dtype=out.dtype, device=out.device)
    return b.reshape(channel_shape(layer.module, out))


@torch.no_grad()
def match_moments(qm, batches: list[torch.Tensor], progress: bool = True, variance: bool = True,
                  samples: int = 1024, max_ratio: float = 2.0, chunk: int = 0) -> dict[str, dict[str, float]]:
    """Match each layer's per-channel output mean (and variance) to the float network's.

    ``max_ratio`` bounds a to [1/max_ratio, max_ratio] so a channel that is nearly dead in
    one network cannot blow up. Returns, per layer, the mean |a − 1| and mean |c|, or why it
    was skipped (report). ``chunk`` images go through the network at once: with all the samples in
    one chunk the correction is exact layer after layer; with several, each chunk moves on corrected
    by its own statistics (as BN does in training mode) and each layer's correction is set from all
    of them, memory bounded by one chunk. ``chunk=0``: as many images as hold AUTO_CHUNK_VALUES input
    values (all 1,024 CIFAR images; 27 ImageNet-sized ones)."""
    if not qm.calibrated:
        raise LowbitError("match_moments compares the quantized network with the float one: calibrate first")
    if max_ratio < 1:
        raise LowbitError(f"match_moments: max_ratio must be at least 1, got {max_ratio}")
    layers = [r.layer for r in qm.layers if r.layer.quantize_weight]
    for layer in layers:
        if layer.bn is not None:
            raise LowbitError(f"match_moments: layer {layer.name!r} carries a BatchNorm that trains with it (QAT's "
                              "training form); match moments before the qat step or after its BN is folded")
    # matching the mean alone is worse than no correction (module docstring), so a layer whose grid cannot
    # take the variance's per-channel scale is left as it is, and the report and a warning say so
    skipped = {layer.name: why for layer in layers if variance and (why := _why_not(layer))}
    if skipped and len(skipped) == len(layers):
        first = next(iter(skipped.items()))
        raise LowbitError(f"match_moments: variance matching scales each output channel's weight step, but no layer "
                          f"can take it (e.g. {first[0]!r} has {first[1]}); use per-channel uniform weights or "
                          "variance: false")
    if skipped:
        warnings.warn(f"match_moments leaves {len(skipped)} layer(s) uncorrected, their weight grid cannot take a "
                      f"per-channel scale: {', '.join(f'{n} ({w})' for n, w in skipped.items())}", stacklevel=2)
    layers = [layer for layer in layers if layer.name not in skipped]
    x = torch.cat(batches)[:samples]
    # one float pass: channel means of y and y² give the targets' mean and variance, each layer on its first call
    # per pass (where `correct` below measures and corrects it). In float64: E[y²] − E[y]² in float32 cancelled
    # for a channel whose mean is large next to its spread (mean 20, std 0.003: the target std came out halved)
    sums = _float_pass_means(qm, layers, x, qm.float_reference(),
                             lambda layer, _x, out: torch.cat([out.double(), out.double().square()],
                                                              channel_dim(layer.module, out)))
    targets: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # float64; taken to the output's dtype where used
    for name, s in sums.items():
        mean, square = s.chunk(2)
        targets[name] = (mean, (square - mean * mean).clamp_min(0))

    def target(layer: QuantLayer, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m_f, v_f = targets[layer.name]
        return m_f.to(like.dtype), v_f.to(like.dtype)
    report: dict[str, dict[str, float]] = {}

    def ratio(v_f: torch.Tensor, v_q: torch.Tensor) -> torch.Tensor:
        if not variance:
            return torch.ones_like(v_q)
        tiny = 1e-12 * float(torch.maximum(v_f.max(), v_q.max()).clamp_min(1e-30))
        return ((v_f + tiny) / (v_q + tiny)).sqrt().clamp(1 / max_ratio, max_ratio)

    def apply(layer: QuantLayer, m_q: torch.Tensor, v_q: torch.Tensor) -> torch.Tensor:
        m_f, v_f = target(layer, m_q)
        a = ratio(v_f, v_q)
        if not (torch.isfinite(a).all() and torch.isfinite(m_f - a * m_q).all()):  # before any weight changes
            raise NumericalError(f"match_moments: layer {layer.name!r} has output moments that are not finite in "
                                 "float32 (outputs near 1e19 overflow their squares): check the input scaling")
        if variance:
            _scale_channels(layer, a)
        shift = m_f - a * m_q
        _add_to_bias(qm, layer, shift)
        report[layer.name] = {"scale": float((a - 1).abs().mean()), "shift": float(shift.abs().mean())}
        return a

    chunks = x.split(chunk if chunk > 0 else max(1, AUTO_CHUNK_VALUES // max(1, x[0].numel())))
    seen: set[str] = set()  # layers met in the current chunk (a module called twice is taken on its first call)
    # uncorrected output: channel sum, sum of squares (float64, against the cancellation above), count
    acc: dict[str, list[torch.Tensor | int]] = {}

    def correct(layer: QuantLayer, _args: tuple, out: torch.Tensor) -> torch.Tensor | None:
        if layer.name in seen:
            return None
        seen.add(layer.name)
        m_q, v_q = _channel_moments(channels_first(layer.module, out))
        shape = channel_shape(layer.module, out)
        if len(chunks) == 1:  # exact: correct the layer now; the weight part of its output scales by a (same
            old_bias = _bias_term(layer, out)  # codes, step × a), the bias part is the new int32-grid bias
            a = apply(layer, m_q, v_q)
            return (out - old_bias) * a.reshape(shape) + _bias_term(layer, out)
        # several chunks (bounded memory): like BN in training mode, each chunk moves on corrected by its own
        # statistics, while the layer's own correction waits for the statistics of every chunk
        n = out.numel() // out.shape[1]
        s = acc.setdefault(layer.name, [torch.zeros_like(m_q, dtype=torch.float64),
                                        torch.zeros_like(m_q, dtype=torch.float64), 0])
        m64 = m_q.double()
        s[0], s[1], s[2] = s[0] + m64 * n, s[1] + (v_q.double() + m64 * m64) * n, s[2] + n
        m_f, v_f = target(layer, m_q)
        a = ratio(v_f, v_q)
        return out * a.reshape(shape) + (m_f - a * m_q).reshape(shape)

    handles = [layer.register_forward_hook(correct) for layer in layers]
    try:
        for part in tqdm(chunks, desc="match_moments", unit="chunk", disable=not progress or len(chunks) == 1,
                         leave=False):
            seen.clear()
            qm(part)
    finally:
        for h in handles:
            h.remove()
    for layer in layers:
        if layer.name in acc:
            total, squares, n = acc[layer.name]
            mean = total / n
            dtype = layer.module.weight.dtype
            apply(layer, mean.to(dtype), (squares / n - mean * mean).clamp_min(0).to(dtype))
    report.update({name: {"skipped": why} for name, why in skipped.items()})
    qm.meta["match_moments"] = report
    return report
