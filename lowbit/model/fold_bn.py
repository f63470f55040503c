"""BatchNorm folding on an FX graph, keeping the BN statistics as activation priors."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx, nn

from lowbit.model.quant_layer import custom_op

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
    """W' = W·γ/σ (per output channel), b' = (b − μ)·γ/σ + β, with σ = sqrt(var + eps).

    W' and b' are new Parameters: a weight tied to another layer (``c2.weight = c1.weight``) keeps
    its value there, where this BN does not apply."""
    with torch.no_grad():
        sigma = torch.sqrt(bn.running_var + bn.eps)
        gamma = bn.weight if bn.weight is not None else torch.ones_like(sigma)
        beta = bn.bias if bn.bias is not None else torch.zeros_like(sigma)
        factor = gamma / sigma
        shape = [-1] + [1] * (layer.weight.dim() - 1)
        layer.weight = nn.Parameter(layer.weight * factor.reshape(shape), requires_grad=layer.weight.requires_grad)
        bias = layer.bias if layer.bias is not None else torch.zeros_like(sigma)
        new_bias = (bias - bn.running_mean) * factor + beta
        layer.bias = nn.Parameter(new_bias.detach().clone())


def reused_modules(gm: fx.GraphModule) -> set[str]:
    """Modules the graph calls more than once or whose parameters it also reads directly (``get_attr``):
    folding a BN that follows one call into the module's weight would change every other use too."""
    calls: dict[str, int] = {}
    reused = set()
    for node in gm.graph.nodes:
        if node.op == "call_module":
            calls[str(node.target)] = calls.get(str(node.target), 0) + 1
        elif node.op == "get_attr":
            reused.add(str(node.target).rpartition(".")[0])
    return reused | {name for name, n in calls.items() if n > 1}


def foldable_batchnorms(gm: fx.GraphModule, foldable: tuple[type, ...]) -> list[tuple[fx.Node, fx.Node]]:
    """(layer node, BN node) for every BN that directly follows a foldable layer used only by
    that BN and keeps running statistics: the pairs :func:`fold_batchnorms` folds. Not folded (the
    BN stays): a layer used elsewhere too (:func:`reused_modules`) or computing its own op (``custom_op``)."""
    modules = dict(gm.named_modules())
    reused = reused_modules(gm)
    pairs = []
    for node in gm.graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), BN_TYPES):
            continue
        src = node.args[0]
        if not (isinstance(src, fx.Node) and src.op == "call_module" and len(src.users) == 1):
            continue
        layer = modules.get(src.target)
        if not isinstance(layer, foldable) or custom_op(layer) is not None or str(src.target) in reused:
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
