"""Graph surgery: trace a model, swap in quantized layers, place activation quantizers.

Placement rule (what an integer runtime runs): one activation quantizer sits on every
tensor that feeds a quantized layer, and *every* consumer of that tensor — a residual add,
a pooling op, a second branch — reads the quantized value, exactly as in a QDQ graph
where the tensor is quantized once and each consumer dequantizes it. Layers that read the
same tensor therefore share one quantizer (and one activation bit width).
"""
from __future__ import annotations

import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from lowbit.model.fold_bn import BN_TYPES, BNPrior, bn_prior
from lowbit.model.quant_layer import QUANTIZABLE

RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_}
RELU_MODULES = (nn.ReLU, nn.ReLU6)
ADD_FUNCTIONS = {operator.add, torch.add}
POOL_FUNCTIONS = {F.adaptive_avg_pool2d, F.avg_pool2d, F.max_pool2d}


def set_submodule(root: nn.Module, target: str, module: nn.Module) -> None:
    parent_name, _, attr = target.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, module)


def is_relu(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_module":
        return isinstance(modules.get(node.target), RELU_MODULES)
    if node.op == "call_function":
        return node.target in RELU_FUNCTIONS
    return node.op == "call_method" and node.target in ("relu", "relu_")


def find_bn_prior(
    node: fx.Node, modules: dict[str, nn.Module], folded: dict[str, BNPrior],
) -> tuple[BNPrior, bool] | None:
    """The BN distribution feeding this tensor, through at most one ReLU; None if the
    tensor is not a (rectified) BN output — e.g. a residual sum or the network input."""
    rectified = False
    if is_relu(node, modules) and node.args and isinstance(node.args[0], fx.Node):
        node, rectified = node.args[0], True
    if node.op != "call_module":
        return None
    if node.name in folded:
        return folded[node.name], rectified
    module = modules.get(node.target)
    if isinstance(module, BN_TYPES):
        return bn_prior(module), rectified
    return None


def is_flatten(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_function":
        return node.target is torch.flatten
    if node.op == "call_method":
        return node.target == "flatten"
    return node.op == "call_module" and isinstance(modules.get(node.target), nn.Flatten)


def quantizable_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    modules = dict(gm.named_modules())
    return [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(modules.get(n.target), QUANTIZABLE)]


def insertion_point(graph: fx.Graph, node: fx.Node) -> fx.Node:
    """Insert after the node, or after the last placeholder when the node is an input."""
    if node.op != "placeholder":
        return node
    return [n for n in graph.nodes if n.op == "placeholder"][-1]

