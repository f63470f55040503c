"""The per-channel statistics BatchNorm layers promise, as hookable loss targets.

ZeroQ distils inputs that reproduce them and PD-Quant's distribution correction pulls a
block's input towards them. A folded BN leaves its statistics with the QuantModel
(``layer_bn``): the folded layer's output should be N(β, γ²) per channel. A BN kept in
the graph is matched on its input against its running mean and variance.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from lowbit.model.fold_bn import BN_TYPES
from lowbit.model.quant_layer import QuantLayer


@dataclass
class BNTarget:
    module: nn.Module
    mean: torch.Tensor
    std: torch.Tensor
    on_input: bool  # match the module's input (kept BN) or output (folded layer)


def bn_targets(qm, modules: list[nn.Module] | None = None) -> list[BNTarget]:
    """Targets among ``modules`` (default: the whole network)."""
    modules = list(qm.net.modules()) if modules is None else modules
    out = []
    for m in modules:
        if isinstance(m, QuantLayer) and m.name in qm.layer_bn:
            prior = qm.layer_bn[m.name]
            out.append(BNTarget(m, prior.beta, prior.gamma.abs(), on_input=False))
        elif isinstance(m, BN_TYPES) and m.track_running_stats and m.running_mean is not None:
            out.append(BNTarget(m, m.running_mean.detach().clone(),
                                torch.sqrt(m.running_var.detach() + m.eps), on_input=True))
    return out


@contextlib.contextmanager
def bn_statistic_loss(targets: list[BNTarget]) -> Iterator[list[torch.Tensor]]:
    """While active, every forward appends Σ_targets ‖μ̂ − μ‖₂ + ‖σ̂ − σ‖₂ terms (ZeroQ's
    eq. 2 form) to the yielded list; the caller sums and clears it each step."""
    terms: list[torch.Tensor] = []

    def make_hook(t: BNTarget):
        def measure(x: torch.Tensor) -> None:
            dims = [d for d in range(x.dim()) if d != 1]
            mean = x.mean(dims)
            std = torch.sqrt(x.var(dims, unbiased=False) + 1e-8)
            terms.append(torch.norm(mean - t.mean) + torch.norm(std - t.std))
        if t.on_input:
            return t.module.register_forward_pre_hook(lambda _m, args: measure(args[0]))
        return t.module.register_forward_hook(lambda _m, _a, out: measure(out))

    handles = [make_hook(t) for t in targets]
    try:
        yield terms
    finally:
        for h in handles:
            h.remove()
