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
# Pooling that averages: its output leaves the input grid, so an integer runtime needs its
# input quantized. Max pooling keeps values on the grid and commutes with a quantizer.
POOL_FUNCTIONS = {F.adaptive_avg_pool2d, F.avg_pool2d}


class LayerTracer(fx.Tracer):
    """torch.fx's tracer, keeping every Conv1d/Conv2d/Linear (subclasses included) as one module call.

    The default tracer enters modules defined outside torch.nn: a user's ``class MyConv(nn.Conv2d)`` became
    a ``conv2d`` call on a ``get_attr`` of its weight, so it was left float and missing from the layer
    table, and an activation quantizer could land on an expression of its weight. As one call it is
    quantized like any Conv2d, or (overriding the op, see ``custom_op``) refused by name or kept float.
    """

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, QUANTIZABLE) or super().is_leaf_module(m, module_qualified_name)


def trace(model: nn.Module) -> fx.GraphModule:
    """``fx.symbolic_trace`` with :class:`LayerTracer`."""
    tracer = LayerTracer()
    graph = tracer.trace(model)
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def depends_on_training(model: nn.Module, eval_graph: fx.GraphModule) -> bool:
    """Whether ``model`` (in eval mode) traces to other code in training mode.

    Why: the tracer runs ``forward`` once, so ``F.dropout(x, training=self.training)`` or an
    ``if self.training:`` branch is frozen at the eval-mode value, and QAT would train without it.
    Modules the tracer keeps as calls (nn.Dropout, BatchNorm) switch at run time and do not count."""
    model.train()
    try:
        train_code = trace(model).code
    except Exception:  # noqa: BLE001 - training mode does not even trace: it differs
        return True
    finally:
        model.eval()
    return train_code != eval_graph.code


def weights_read_not_called(model: nn.Module, gm: fx.GraphModule) -> list[str]:
    """Conv/Linear modules of ``model`` that ``gm`` never calls but whose parameters it reads
    (``F.linear(h, self.fc.weight)``, ``self.fc.forward(h)``): they stay float, as lowbit quantizes
    a layer where it is called."""
    called = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    read = {str(n.target).rpartition(".")[0] for n in gm.graph.nodes if n.op == "get_attr"}
    return [name for name, m in model.named_modules()
            if isinstance(m, QUANTIZABLE) and name not in called and name in read]


def _plain(module: nn.Module | None, kinds: tuple[type, ...]) -> bool:
    """Exactly one of ``kinds`` (not a subclass computing its own op) and without hooks."""
    return type(module) in kinds and not (module._forward_hooks or module._forward_pre_hooks)


def normalize_spellings(gm: fx.GraphModule) -> int:
    """Rewrite ``a.add(b)`` (and ``a.add_(b)`` where nothing else reads ``a``) as ``a + b``, and
    ``nn.AvgPool2d`` / ``nn.AdaptiveAvgPool2d`` modules as their ``F.`` calls; returns how many.

    Why: add and pool detection (``quantize_adds``, Bi-Real's block adds, the exporter) read the
    functional form; another spelling of the same op left its inputs unquantized (``add_bits``
    never applied) and gave a Bi-Real block a second identity path. Each rewrite computes the same."""
    modules = dict(gm.named_modules())
    count = pools = 0
    for node in list(gm.graph.nodes):
        new_target, args, kwargs = None, (), {}
        if node.op == "call_method" and node.target in ("add", "add_") and node.args:
            other = node.args[1] if len(node.args) > 1 else node.kwargs.get("other")
            alpha = node.kwargs.get("alpha", 1)
            if (len(node.args) > 2 or set(node.kwargs) - {"other", "alpha"} or other is None
                    or (node.target == "add_" and not (isinstance(node.args[0], fx.Node)
                                                        and len(node.args[0].users) == 1))):
                continue
            new_target, args = (operator.add, (node.args[0], other)) if alpha == 1 else \
                (torch.add, (node.args[0], other))
            kwargs = {} if alpha == 1 else {"alpha": alpha}
        elif node.op == "call_module" and len(node.args) == 1 and not node.kwargs:
            m = modules.get(str(node.target))
            if _plain(m, (nn.AdaptiveAvgPool2d,)):
                new_target, args = F.adaptive_avg_pool2d, (node.args[0], m.output_size)
            elif _plain(m, (nn.AvgPool2d,)):
                new_target, args = F.avg_pool2d, (node.args[0], m.kernel_size, m.stride, m.padding, m.ceil_mode,
                                                  m.count_include_pad, m.divisor_override)
            else:
                continue
            pools += 1
        else:
            continue
        with gm.graph.inserting_before(node):
            new = gm.graph.call_function(new_target, args, kwargs)
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
        count += 1
    if count:
        gm.graph.lint()
        if pools:
            gm.delete_all_unused_submodules()
        gm.recompile()
    return count


def layer_input(node: fx.Node) -> fx.Node | None:
    """The tensor a Conv/Linear call reads, passed by position or as ``input=``; the call is rewritten to
    pass it by position, the form every graph pass reads (``node.args[0]``). None: no tensor input."""
    if node.args:
        inp = node.args[0]
    elif set(node.kwargs) == {"input"}:
        inp = node.kwargs["input"]
        node.args, node.kwargs = (inp,), {}
    else:
        return None
    return inp if isinstance(inp, fx.Node) else None


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


def replace_relus_with_hardtanh(gm: fx.GraphModule) -> int:
    """Every ReLU becomes hardtanh (clip to [−1, 1]), in place; returns how many. Binary
    activations (BNN, XNOR-Net) take the sign of a layer's input, which after a ReLU is
    constant; BNN's own networks use hardtanh there, whose gradient is the sign's STE."""
    modules = dict(gm.named_modules())
    nodes = [n for n in gm.graph.nodes if is_relu(n, modules)]
    for node in nodes:
        with gm.graph.inserting_after(node):
            new = gm.graph.call_function(F.hardtanh, (node.args[0],))
        node.replace_all_uses_with(new)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return len(nodes)


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


def add_alpha(node: fx.Node) -> object:
    """The ``alpha`` of an add call: ``torch.add(a, b, alpha=k)`` computes a + k·b, so an add is a plain
    sum only when this is 1 (an exporter writing it as one dropped the k). Read from the keyword (torch
    takes no third positional argument, but a hand-built graph may hold one); 1 for ``operator.add``."""
    if node.target is not torch.add:
        return 1
    return node.kwargs.get("alpha", node.args[2] if len(node.args) > 2 else 1)


def is_grid_preserving(node: fx.Node) -> bool:
    """Ops whose output values lie on their input's quantization grid: slicing, and
    padding with the constant 0 (every grid lowbit builds holds 0 exactly). A quantized
    tensor passed through them needs no second quantizer, and an integer runtime runs
    them on the codes (the CIFAR ResNets' option-A shortcut is slice + zero-pad)."""
    if node.op != "call_function":
        return False
    if node.target is operator.getitem:
        index = node.args[1]
        return all(isinstance(i, slice) for i in (index if isinstance(index, tuple) else (index,)))
    if node.target is F.pad:
        mode = node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant")
        value = node.kwargs.get("value", node.args[3] if len(node.args) > 3 else None)
        return mode == "constant" and not value
    return False


def quantized_through_grid_ops(node: fx.Node, quantized: set[fx.Node]) -> bool:
    """True when ``node`` is a quantized tensor, possibly behind grid-preserving ops."""
    while node not in quantized and is_grid_preserving(node) and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node in quantized


def quantizable_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    modules = dict(gm.named_modules())
    return [n for n in gm.graph.nodes if n.op == "call_module" and isinstance(modules.get(n.target), QUANTIZABLE)]


def insertion_point(graph: fx.Graph, node: fx.Node) -> fx.Node:
    """Insert after the node, or after the last placeholder when the node is an input."""
    if node.op != "placeholder":
        return node
    return [n for n in graph.nodes if n.op == "placeholder"][-1]

