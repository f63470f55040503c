"""Oscillation dampening (Nagel et al. 2022, "Overcoming Oscillations in Quantization-Aware Training").

With a straight-through gradient, latent weights that sit near a decision threshold flip
between two neighbouring levels at almost every step; the forward keeps changing while the
latent weight hardly moves. lowbit's own probe found this in ternary ResNet-20 (README,
"Why the freeze can collapse a run"). The paper's remedy (its eq. 6) adds to the task loss

    L_dampen = Σ ‖ sg(Q(w)) − clip(w, lo, hi) ‖²

so each latent weight is pulled towards the centre of the level it rounds to, away from the
thresholds; sg is stop-gradient, and the clip keeps weights beyond the outer levels (whose
gradient belongs to the range, not the rounding) out of it. Its weight λ rises from 0 to
its final value on a cosine (sec. 4.1), so early training explores and late training settles.

Kind-independent: the target is whatever the layer's weight quantizer puts the weight on
(uniform grid, ternary, binary, learned basis), taken in eval mode so that a stochastic kind
gives its deterministic level and LQ-Nets does not refit its basis; lo/hi are the lowest and
highest level of the layer's grid (per output channel where the grid is), whether or not a
weight uses them: clipping to the levels in use would leave a weight just inside the grid's
outer threshold unpulled and, once it flipped outward, pull it further out. Kinds whose
forward does not round the latent weight (k-means: a fixed assignment; INQ: its quantized
portion frozen) have nothing to oscillate and are left out.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from lowbit.model.quant_model import QuantModel
from lowbit.quant import functional as F
from lowbit.quant.codebook import CodebookQuantizer
from lowbit.quant.learned.base import TrainableQuantizer


def dampening_weight(final: float, step: int, total: int) -> float:
    """λ at global ``step`` of ``total``: 0 → ``final`` on a half cosine (Nagel et al. sec. 4.1)."""
    if final <= 0 or total <= 0:
        return 0.0
    t = min(max(step / total, 0.0), 1.0)
    return final * 0.5 * (1.0 - math.cos(math.pi * t))


def dampened_layers(qm: QuantModel) -> list[nn.Module]:
    """The layers whose quantized weights round their latent weights (not being reconstructed by a
    rounding of their own, and not a kind that keeps a fixed assignment: k-means, INQ)."""
    return [r.layer for r in qm.layers if r.layer.quantize_weight and r.layer.weight_fn is None
            and getattr(r.layer.weight_quantizer, "rounds_latent_weights", True)]


def _target_and_factor(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(Q(W·f) without gradient, f = γ/σ without gradient or None): the level each weight rounds
    to after this step's forward, and the BN factor the quantized weight is taken of."""
    q = layer.weight_quantizer
    was = q.training
    q.eval()
    try:
        with torch.no_grad():
            target = layer.quantized_weight().float()
            factor = layer.bn.weight_factor().detach() if layer.bn is not None else None
    finally:
        q.train(was)
    return target, factor


def grid_span(layer: nn.Module, folded: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The lowest and highest level of the layer's weight grid, per output channel where the grid is
    per channel, shaped to broadcast against the weight (eq. 6's clip). Call after the target:
    kinds that derive their step from the weight (TWN, XNOR, DoReFa, μL2Q) have just set it."""
    q = layer.weight_quantizer
    shape = [-1] + [1] * (folded.dim() - 1)
    with torch.no_grad():
        if isinstance(q, TrainableQuantizer) and type(q).deploy is not TrainableQuantizer.deploy:
            book = q.deploy(folded)  # a codebook kind (LQ-Nets, TTQ): its levels
            if isinstance(book, CodebookQuantizer):
                c = book.centroids.detach().float()
                rows = c if c.dim() == 2 else c.reshape(1, -1)
                return rows.amin(1).reshape(shape), rows.amax(1).reshape(shape)
        step = layer.weight_step().detach().abs().float()  # the folded weight's step (s·|f| where it follows BN)
        ends = torch.tensor([q.code_range()], dtype=torch.float32, device=step.device).expand(max(step.numel(), 1), 2)
        ends = F.dequantize_codes(ends, step.reshape(-1) if step.dim() else step,
                                  q.zero_point.detach().float(), q.spec.grid, 0)  # rows: (lowest, highest) level
    return ends[:, 0].reshape(shape), ends[:, 1].reshape(shape)


def dampening_loss(layers: list[nn.Module]) -> torch.Tensor:
    """Σ over ``layers`` of ‖sg(Q(W·f)) − clip(W·sg(f), lo, hi)‖² (the paper's eq. 6, summed).

    The BN factor f is held still: the pull moves latent weights, not BN's scale."""
    total: torch.Tensor | None = None
    for layer in layers:
        target, factor = _target_and_factor(layer)
        w = layer.module.weight
        if factor is not None:
            w = w * factor.reshape([-1] + [1] * (w.dim() - 1))
        lo, hi = grid_span(layer, w.detach())
        clipped = torch.maximum(torch.minimum(w.float(), hi), lo)
        term = (target - clipped).pow(2).sum()
        total = term if total is None else total + term
    if total is None:
        return torch.zeros(())
    return total
