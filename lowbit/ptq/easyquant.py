"""EasyQuant (seed 003, eqs. 6–7): choose scales that maximise the cosine similarity of
each layer's output with the float network's, on calibration data.

Layer by layer in network order, alternating: (a) the weight scale of every output
channel, searched over factors of its current scale — channel c of the output depends
only on weight row c, so one sweep scores all channels at once; (b) the layer's input
activation scale, scored on the whole output. Eq. 6 is the mean over samples i of
cos(r_i, r̄_i), with r the float layer output and r̄ the quantized one; eq. 7 picks the
scale with the largest mean.
"""
from __future__ import annotations

import torch
from tqdm import tqdm

from lowbit.errors import LowbitError, RecipeError
from lowbit.model.quant_layer import QuantLayer
from lowbit.ptq.cache import capture_inputs, walk_units
from lowbit.ptq.channels import channels_first
from lowbit.ptq.units import split_units
from lowbit.quant.quantizer import UniformQuantizer


def mean_cosine(out: torch.Tensor, target: torch.Tensor, per_channel: bool,
                module: torch.nn.Module | None = None) -> torch.Tensor:
    """Eq. 6: mean over samples of cos(r_i, r̄_i); per output channel when asked (``module``: the layer
    that made ``out``, which says where its channels are)."""
    if module is not None:
        out, target = channels_first(module, out), channels_first(module, target)
    if per_channel and out.dim() > 2 and out[0, 0].numel() > 1:
        a, b = out.flatten(2), target.flatten(2)  # [N, C, positions]
        cos = torch.nn.functional.cosine_similarity(a, b, dim=2, eps=1e-12)  # [N, C]
        return cos.mean(0)
    if per_channel and out.dim() > 2:  # one position (a 1x1 output): a cosine of one value is ±1 whatever the
        a = out.transpose(0, 1).reshape(out.shape[1], -1)  # scale, so score each channel over samples × positions
        b = target.transpose(0, 1).reshape(out.shape[1], -1)
        return torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-12)
    if per_channel:  # Linear: one value per sample and channel; score channels over samples
        return torch.nn.functional.cosine_similarity(out, target, dim=0, eps=1e-12)
    return torch.nn.functional.cosine_similarity(out.flatten(1), target.flatten(1), dim=1, eps=1e-12).mean()


def _best_factor(scores: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Eq. 7's best factor per column of ``scores`` [F] or [F, C], but 1 (the calibrated scale) unless a
    candidate scores strictly better: where every candidate ties (one sample on a 1x1 output, a dead
    channel) argmax took the first, the smallest factor, and shrank such scales to ``low``×."""
    keep = int((factors == 1).nonzero()[0])
    best = scores.argmax(0)
    better = scores.gather(0, best.unsqueeze(0)).squeeze(0) > scores[keep]
    return torch.where(better, factors[best], torch.ones_like(factors[best]))


@torch.no_grad()
def _search_weight(layer: QuantLayer, act: UniformQuantizer | None, x: torch.Tensor, target: torch.Tensor,
                   factors: torch.Tensor) -> None:
    q = layer.weight_quantizer
    base = q.scale.clone()
    xin = act(x) if act is not None else x
    scores = []
    for f in factors:
        q.scale = base * f
        scores.append(mean_cosine(layer(xin), target, per_channel=q.spec.per_channel, module=layer.module))
    q.scale = base * _best_factor(torch.stack(scores), factors)  # scores [F] or [F, C]


@torch.no_grad()
def _search_act(layer: QuantLayer, act: UniformQuantizer, x: torch.Tensor, target: torch.Tensor,
                factors: torch.Tensor) -> None:
    base = act.scale.clone()
    scores = []
    for f in factors:
        act.scale = base * f
        scores.append(mean_cosine(layer(act(x)), target, per_channel=False))
    act.scale = base * _best_factor(torch.stack(scores), factors)


def easyquant(qm, batches: list[torch.Tensor], progress: bool = True, rounds: int = 2, candidates: int = 50,
              low: float = 0.5, high: float = 1.2, samples: int = 256) -> None:
    """Scales start from calibration and are searched in [low, high] × their value."""
    if not qm.calibrated:
        raise LowbitError("EasyQuant refines calibrated scales: run the calibrate step first")
    if not (0 < low < high) or candidates < 2 or rounds < 1 or samples < 1:
        raise RecipeError("easyquant: need 0 < low < high, candidates ≥ 2, rounds ≥ 1, samples ≥ 1")
    # Include 1: the search can only keep or improve the calibrated scale.
    x = torch.cat(batches)[:samples]
    device = next(qm.parameters()).device  # the factors scale the quantizers' scales, which live with the model
    factors = torch.unique(torch.cat([torch.linspace(low, high, candidates, device=device),
                                      torch.ones(1, device=device)]))
    searched: set[int] = set()
    units = split_units(qm)
    bar = tqdm(total=len(units), desc="easyquant", unit="unit", disable=not progress, leave=False)
    for step in walk_units(qm, units, x, layer_outputs=True):
        for layer in step.unit.layers:
            q_lin = capture_inputs(step.unit, step.q_in, [layer])
            xin, target = q_lin[layer.name], step.fp_layer_out[layer.name]
            act = layer.input_ref[0] if layer.input_ref and layer.input_ref[0].enabled else None
            # A shared activation quantizer is searched once, by its first consumer.
            search_act = act is not None and id(act) not in searched
            for _ in range(rounds):
                if layer.quantize_weight:
                    _search_weight(layer, act, xin, target, factors)
                if search_act:
                    _search_act(layer, act, xin, target, factors)
            if act is not None:
                searched.add(id(act))
        bar.update(1)
    bar.close()
