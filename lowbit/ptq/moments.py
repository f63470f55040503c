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
calibration set goes through in chunks (``chunk``), layer by layer: each layer's statistics
are summed over every chunk before any chunk moves past it, so the result does not depend on
the chunk size (beyond float rounding), at the cost of re-running the chunks once per layer.
Matching the mean alone (bias correction on outputs) is worse than leaving it: on
ResNet-20 W4A4 it is the variance that carries the gain (README, issue 16 part 1).
"""
from __future__ import annotations

import warnings
from typing import Callable

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
    one chunk the correction is exact layer after layer in one pass; with several, each layer's
    statistics are summed over all chunks before it is corrected and any chunk moves past it (the same
    answer to float rounding, about layers/2 passes), memory bounded by one chunk. ``chunk=0``: as many
    images as hold AUTO_CHUNK_VALUES input values (all 1,024 CIFAR images; 27 ImageNet-sized ones)."""
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
    if len(chunks) == 1:
        _correct_in_one_pass(qm, layers, chunks[0], apply)
    else:
        _correct_streamed(qm, layers, chunks, apply, progress)
    report.update({name: {"skipped": why} for name, why in skipped.items()})
    qm.meta["match_moments"] = report
    return report


class _Measured(Exception):
    """Raised by the measuring hook once a chunk has reached the layer being measured: the rest of the
    network is not needed for that chunk (private to ``_correct_streamed``)."""


def _correct_in_one_pass(qm, layers: list[QuantLayer], x: torch.Tensor,
                         apply: Callable[[QuantLayer, torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
    """All samples at once: each layer's hook measures its output, corrects the layer and hands the corrected
    output on, so every later layer is measured on corrected inputs (exact, one pass)."""
    seen: set[str] = set()  # a module called twice per pass is taken on its first call

    def correct(layer: QuantLayer, _args: tuple, out: torch.Tensor) -> torch.Tensor | None:
        if layer.name in seen:
            return None
        seen.add(layer.name)
        m_q, v_q = _channel_moments(channels_first(layer.module, out))
        # the weight part of the output scales by a (same codes, step × a), the bias part is the new int32-grid bias
        old_bias = _bias_term(layer, out)
        a = apply(layer, m_q, v_q)
        return (out - old_bias) * a.reshape(channel_shape(layer.module, out)) + _bias_term(layer, out)

    handles = [layer.register_forward_hook(correct) for layer in layers]
    try:
        qm(x)
    finally:
        for h in handles:
            h.remove()


def _correct_streamed(qm, layers: list[QuantLayer], chunks: tuple[torch.Tensor, ...],
                      apply: Callable[[QuantLayer, torch.Tensor, torch.Tensor], torch.Tensor],
                      progress: bool) -> None:
    """Several chunks (bounded memory), layer by layer: every chunk runs up to the first layer not yet corrected,
    that layer's statistics are summed over all the chunks, and only then is it corrected, so the layers after
    it are measured on exactly corrected inputs, as in one pass. Correcting each chunk on the way with its own
    statistics instead made the result depend on the chunk size: a chunk of 1-2 samples has no per-channel
    variance at a Linear layer, and every later layer was corrected from constant inputs (MLP logit MSE 0.75
    with one chunk, 69 with chunks of 1). The cost: the chunks run once per layer, each only up to that layer
    (about layers/2 network passes), memory bounded by one chunk."""
    done: set[str] = set()
    bar = tqdm(total=len(layers), desc="match_moments", unit="layer", disable=not progress, leave=False)
    try:
        while len(done) < len(layers):
            measured: list[QuantLayer] = []  # the first layer not yet corrected that the chunks reach
            seen: set[str] = set()
            # uncorrected output over all chunks: channel sum, sum of squares (float64, against cancellation), count
            acc: list[torch.Tensor | int] = []

            def measure(layer: QuantLayer, _args: tuple, out: torch.Tensor) -> None:
                if layer.name in done or layer.name in seen:  # corrected ones already output corrected values
                    return
                seen.add(layer.name)
                if not measured:
                    measured.append(layer)
                if layer is not measured[0]:
                    return
                m_q, v_q = _channel_moments(channels_first(layer.module, out))
                n = out.numel() // m_q.numel()
                m64 = m_q.double()
                if not acc:
                    acc.extend([torch.zeros_like(m64), torch.zeros_like(m64), 0])
                acc[0], acc[1], acc[2] = acc[0] + m64 * n, acc[1] + (v_q.double() + m64 * m64) * n, acc[2] + n
                raise _Measured

            handles = [layer.register_forward_hook(measure) for layer in layers if layer.name not in done]
            try:
                for part in chunks:
                    seen.clear()
                    try:
                        qm(part)
                    except _Measured:
                        pass
            finally:
                for h in handles:
                    h.remove()
            if not measured:  # the remaining layers never ran on these images: nothing to measure them by
                break
            layer = measured[0]
            total, squares, n = acc
            mean = total / n
            dtype = layer.module.weight.dtype
            apply(layer, mean.to(dtype), (squares / n - mean * mean).clamp_min(0).to(dtype))
            done.add(layer.name)
            bar.update(1)
    finally:
        bar.close()
