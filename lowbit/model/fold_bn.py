"""BatchNorm folding on an FX graph, keeping the BN statistics as activation priors."""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import fx, nn

from lowbit.model.quant_layer import custom_op

# SyncBatchNorm (a DDP model's BN) computes BatchNorm's function in eval mode, whatever the rank
BN_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.SyncBatchNorm)
# Ops that keep their input's rank: a 2-D tensor passed through them is still (batch, features).
_SHAPE_KEEPING_FUNCTIONS = {F.relu, torch.relu, F.relu6, F.hardtanh, F.dropout, torch.tanh, torch.sigmoid}
_SHAPE_KEEPING_MODULES = (nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.Dropout, nn.Identity, nn.Tanh, nn.Sigmoid,
                          nn.BatchNorm1d)


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


def _flattened_to_2d(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """``torch.flatten(x, 1)`` / ``x.flatten(1)`` / ``nn.Flatten()`` / ``x.view(n, -1)``: a 2-D result."""
    if node.op == "call_module":
        m = modules.get(str(node.target))
        return type(m) is nn.Flatten and m.start_dim == 1 and m.end_dim == -1
    if node.op == "call_method" and node.target in ("view", "reshape"):
        shape = node.args[1:]
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        return len(shape) == 2 and not node.kwargs
    if (node.op == "call_function" and node.target is torch.flatten) or (
            node.op == "call_method" and node.target == "flatten"):
        given = dict(zip(("start_dim", "end_dim"), node.args[1:]), **node.kwargs)
        return given.get("start_dim", 0) == 1 and given.get("end_dim", -1) == -1
    return False


def known_2d(node: object, modules: dict[str, nn.Module]) -> bool:
    """Whether the graph shows ``node`` to be a 2-D (batch, features) tensor: a flatten to 2-D, then
    only Linear layers and shape-keeping ops. Not known (False) is the safe answer."""
    while isinstance(node, fx.Node):
        if _flattened_to_2d(node, modules):
            return True
        m = modules.get(str(node.target)) if node.op == "call_module" else None
        if not (isinstance(m, nn.Linear) or isinstance(m, _SHAPE_KEEPING_MODULES)
                or (node.op == "call_function" and node.target in _SHAPE_KEEPING_FUNCTIONS)
                or (node.op == "call_method" and node.target in ("relu", "relu_"))):
            return False
        node = node.args[0] if node.args else node.kwargs.get("input")
    return False


def folds_along_channels(layer: nn.Module, bn: nn.Module, layer_node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """Whether ``bn`` normalises ``layer``'s output channels, the axis a fold scales.

    BN normalises dim 1, which is a Conv's channel axis but a Linear's output features only when
    that output is 2-D: after a Linear on (N, T, F), ``BatchNorm1d(T)`` normalises the T axis, and a
    Linear on 4-D input feeding ``BatchNorm2d`` normalises its dim 1 too. Such a BN is not folded (it
    stays, computing what it did): a Linear+BN pair folds only when the graph shows a 2-D input."""
    if not isinstance(layer, nn.Linear):
        return True
    inp = layer_node.args[0] if layer_node.args else layer_node.kwargs.get("input")
    return isinstance(bn, (nn.BatchNorm1d, nn.SyncBatchNorm)) and known_2d(inp, modules)


def foldable_batchnorms(gm: fx.GraphModule, foldable: tuple[type, ...],
                        unsure: list[tuple[str, str]] | None = None) -> list[tuple[fx.Node, fx.Node]]:
    """(layer node, BN node) for every BN that directly follows a foldable layer used only by
    that BN and keeps running statistics: the pairs :func:`fold_batchnorms` folds. Not folded (the
    BN stays): a layer used elsewhere too (:func:`reused_modules`), computing its own op (``custom_op``),
    or a Linear whose BN may normalise another axis than its output features (:func:`folds_along_channels`);
    those of the last kind whose BN has as many features as the Linear's output, which would have folded
    had the graph shown a 2-D input, are added to ``unsure`` as (layer, BN) names."""
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
        if not folds_along_channels(layer, bn, src, modules):
            if unsure is not None and isinstance(bn, (nn.BatchNorm1d, nn.SyncBatchNorm)) \
                    and bn.num_features == layer.out_features:
                unsure.append((str(src.target), str(node.target)))
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
    unsure: list[tuple[str, str]] = []
    pairs = foldable_batchnorms(gm, foldable, unsure)
    if unsure:
        warnings.warn(f"BatchNorm {', '.join(f'{bn!r} after Linear {layer!r}' for layer, bn in unsure)} kept unfolded "
                      "(it runs in float): BatchNorm1d normalises dim 1, the Linear's output features only when that "
                      "output is 2-D, and the graph does not show it to be (a (N, T, F) input gives dim 1 = T). "
                      "If it is 2-D, flatten it first (nn.Flatten(), torch.flatten(x, 1)) to have the BN folded",
                      stacklevel=4)
    for src, node in pairs:
        bn = modules[node.target]
        priors[src.name] = bn_prior(bn)
        fold_into(modules[src.target], bn)
        node.replace_all_uses_with(src)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.delete_all_unused_submodules()
    gm.recompile()
    return priors
