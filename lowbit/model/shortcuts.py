"""What residual adds read: the recipe's ``shortcut`` key, a rewrite of the traced graph.

By default one activation quantizer sits on a tensor and every consumer reads its quantized
value (the QDQ placement of lowbit.model.graph): right for int8, where the two differ by
half a step. At one bit they differ by everything: a ResNet whose shortcuts read sign(x)
carries only signs down its residual stream. Binary networks keep the stream real-valued:

- ``real``: only quantized layers read the quantizer; adds, pools and other branches read
  the tensor before it (XNOR-Net and BNN ResNets).
- ``bireal``: ``real`` plus a real-valued shortcut around every conv but the first (Bi-Real
  Net, Liu et al. 2018, its eq. (5)-(6): each binary conv's BN output is added to that conv's
  real input, so every layer, not every block, has an identity path). Where the conv already
  ends a residual block, its add's shortcut operand becomes this conv's input: the block's
  shortcut is the per-conv one of its last conv. A stride-s conv's shortcut averages s×s
  windows; extra output channels get zeros (the option-A shortcut of CIFAR ResNets), so no
  weight is added. On an odd-sized map the conv's padding adds a last, partial window, and so
  does the shortcut: it pads s − 1 zeros on the right and bottom before averaging (dropped
  again by the pooling on even sizes, where the result is unchanged).
"""
from __future__ import annotations

import operator

import torch.nn.functional as F
from torch import fx, nn

from lowbit.errors import RecipeError
from lowbit.model import graph as G
from lowbit.model.fold_bn import BN_TYPES
from lowbit.model.quant_layer import QuantLayer

# node.meta key of the zero pad in front of a shortcut's pooling: the pool's input is the node before it
SHORTCUT_PAD = "lowbit_shortcut_pad"


def read_real_values(gm: fx.GraphModule, quant_source: dict[fx.Node, fx.Node]) -> int:
    """Rewire every consumer of an activation quantizer that is not a quantized layer to the
    quantizer's input; returns how many inputs were rewired."""
    modules = dict(gm.named_modules())
    moved = 0
    for qnode, real in quant_source.items():
        for user in list(qnode.users):
            if user.op == "call_module" and isinstance(modules.get(str(user.target)), QuantLayer):
                continue
            user.replace_input_with(qnode, real)
            moved += 1
    return moved


def _conv_output(node: fx.Node, modules: dict[str, nn.Module]) -> fx.Node:
    """The conv's output after its BatchNorm when BN was not folded into it."""
    users = list(node.users)
    if len(users) == 1 and users[0].op == "call_module" and isinstance(modules.get(str(users[0].target)), BN_TYPES):
        return users[0]
    return node


def _check_geometry(name: str, conv: nn.Conv2d) -> None:
    """A shortcut adds the input to the output, so the conv must keep the spatial size (up to
    its stride) and not drop channels."""
    if conv.padding == "same":  # torch keeps the size itself (stride 1 only)
        padding = tuple(d * (k - 1) // 2 for k, d in zip(conv.kernel_size, conv.dilation))
    else:
        padding = conv.padding if isinstance(conv.padding, tuple) else (0, 0)  # "valid"
    for k, p, d in zip(conv.kernel_size, padding, conv.dilation):
        if k % 2 == 0 or p != d * (k - 1) // 2:
            raise RecipeError(f"shortcut: bireal adds each conv's input to its output, so every conv must keep its "
                              f"input's size (odd kernel, padding = dilation·(kernel−1)/2): layer {name!r} has kernel "
                              f"{tuple(conv.kernel_size)}, padding {conv.padding!r}")
    if conv.out_channels < conv.in_channels:
        raise RecipeError(f"shortcut: bireal cannot add {conv.in_channels} input channels to the {conv.out_channels} "
                          f"outputs of layer {name!r}")


def _shortcut(gm: fx.GraphModule, x: fx.Node, conv: nn.Conv2d) -> fx.Node:
    """Nodes computing the parameter-free shortcut of ``conv`` from its real input ``x``.

    The pooling's output must have the conv's size, ceil(H/s) (padding (k−1)/2): plain pooling gives
    floor(H/s), so the input is first zero-padded by s − 1 (not ``ceil_mode``, which the ONNX export
    refuses). On even sizes the pooling never reads that column and the numbers are the same; at an odd
    edge the last window averages the padded zeros too, as the conv's own window there reads its padding."""
    out = x
    stride = tuple(conv.stride)
    if stride != (1, 1):
        out = gm.graph.call_function(F.pad, (out, (0, stride[1] - 1, 0, stride[0] - 1)))
        out.meta[SHORTCUT_PAD] = True
        out = gm.graph.call_function(F.avg_pool2d, (out, stride, stride))
    extra = conv.out_channels - conv.in_channels
    if extra:
        out = gm.graph.call_function(F.pad, (out, (0, 0, 0, 0, extra // 2, extra - extra // 2)))
    return out


def add_bireal_shortcuts(gm: fx.GraphModule, layer_nodes: list[fx.Node], quant_source: dict[fx.Node, fx.Node]) -> list[str]:
    """Bi-Real's per-conv shortcuts on every Conv2d node but the first layer; returns the
    layers that got one. Call after :func:`read_real_values`."""
    modules = dict(gm.named_modules())
    done: list[str] = []
    for node in layer_nodes[1:]:
        layer = modules[str(node.target)]
        conv = layer.module
        if not isinstance(conv, nn.Conv2d):
            continue
        _check_geometry(str(node.target), conv)
        real = quant_source.get(node.args[0], node.args[0])
        out = _conv_output(node, modules)
        users = list(out.users)
        block_add = (users[0] if len(users) == 1 and users[0].op == "call_function"
                     and users[0].target in G.ADD_FUNCTIONS and len(users[0].args) == 2
                     and sum(a is out for a in users[0].args) == 1 else None)
        if block_add is not None:
            with gm.graph.inserting_before(block_add):
                s = _shortcut(gm, real, conv)
            block_add.args = tuple(a if a is out else s for a in block_add.args)
        else:
            with gm.graph.inserting_before(out.next):  # new nodes in order, right after the conv's output
                s = _shortcut(gm, real, conv)
                added = gm.graph.call_function(operator.add, (out, s))
            out.replace_all_uses_with(added, delete_user_cb=lambda user: user is not added)
        done.append(str(node.target))
    gm.graph.eliminate_dead_code()
    return done
