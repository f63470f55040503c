"""BatchNorm folding on an FX graph, keeping the BN statistics as activation priors."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn

BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d)


@dataclass
class BNPrior:
    """Per-channel distribution a BN layer imposes on its output: N(beta, gamma^2).

    Seed 002 reads activation ranges from these coefficients instead of scanning data.
    """

    beta: torch.Tensor
    gamma: torch.Tensor


def bn_prior(bn: nn.Module) -> BNPrior:
    gamma = bn.weight.detach().clone() if bn.weight is not None else torch.ones(bn.num_features)
    beta = bn.bias.detach().clone() if bn.bias is not None else torch.zeros(bn.num_features)
    return BNPrior(beta=beta, gamma=gamma)


def fold_into(layer: nn.Module, bn: nn.Module) -> None:
    """W' = W·γ/σ (per output channel), b' = (b − μ)·γ/σ + β, with σ = sqrt(var + eps)."""
    with torch.no_grad():
        sigma = torch.sqrt(bn.running_var + bn.eps)
        gamma = bn.weight if bn.weight is not None else torch.ones_like(sigma)
        beta = bn.bias if bn.bias is not None else torch.zeros_like(sigma)
        factor = gamma / sigma
        shape = [-1] + [1] * (layer.weight.dim() - 1)
        layer.weight.mul_(factor.reshape(shape))
        bias = layer.bias if layer.bias is not None else torch.zeros_like(sigma)
        new_bias = (bias - bn.running_mean) * factor + beta
        layer.bias = nn.Parameter(new_bias.detach().clone())


def foldable_batchnorms(gm: fx.GraphModule, foldable: tuple[type, ...]) -> list[tuple[fx.Node, fx.Node]]:
    """(layer node, BN node) for every BN that directly follows a foldable layer used only by
    that BN and keeps running statistics: the pairs :func:`fold_batchnorms` folds."""
    modules = dict(gm.named_modules())
    pairs = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), BN_TYPES):
            continue
        src = node.args[0]
        if not (isinstance(src, fx.Node) and src.op == "call_module" and len(src.users) == 1):
            continue
        if not isinstance(modules.get(src.target), foldable):
            continue
        bn = modules[node.target]
        if not bn.track_running_stats or bn.running_mean is None:
            continue
        pairs.append((src, node))
    return pairs


def fold_batchnorms(gm: fx.GraphModule, foldable: tuple[type, ...]) -> dict[str, BNPrior]:
    """Fold every BN that directly follows a foldable layer used only by that BN.

    Returns the folded BNs' priors keyed by the producing layer's node name, so range
    estimators can still use them after the BN is gone.
    """
    modules = dict(gm.named_modules())
    priors: dict[str, BNPrior] = {}
    for src, node in foldable_batchnorms(gm, foldable):
        bn = modules[node.target]
        priors[src.name] = bn_prior(bn)
        fold_into(modules[src.target], bn)
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return priors
