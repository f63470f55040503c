"""Cut a traced QuantModel into a chain of units (residual blocks) for reconstruction.

A unit boundary is a tensor that is the only live value at that point of the graph:
everything after it depends on the network input through it alone. In a ResNet those
are exactly the block outputs, so "residual blocks as units" (BRECQ) falls out of the
graph instead of a per-architecture block list. Running the units one after the other
equals running the whole model, which is what lets reconstruction cache one unit's
inputs, optimise it, and push the cache on to the next unit.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import fx, nn

from lowbit.errors import UnsupportedModelError
from lowbit.model.quant_layer import QuantLayer
from lowbit.quant.quantizer import UniformQuantizer


@dataclass
class Unit:
    """One block: a GraphModule sharing its modules with the QuantModel."""

    name: str
    module: fx.GraphModule
    layers: list[QuantLayer] = field(default_factory=list)
    quantizers: list[UniformQuantizer] = field(default_factory=list)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x)


def _called_module(node: fx.Node, modules: dict[str, nn.Module]) -> nn.Module | None:
    return modules.get(str(node.target)) if node.op == "call_module" else None


def split_units(qm) -> list[Unit]:
    """The QuantModel's graph as a chain of units, each holding ≥ 1 quantized layer."""
    if qm.mode != "graph":
        raise UnsupportedModelError(
            "reconstruction needs the traced (graph) QuantModel; this model fell back to hooks "
            f"({qm.trace_error}). Use range-setting steps (calibrate, usp, bias_correction) instead")
    gm: fx.GraphModule = qm.net
    modules = dict(gm.named_modules())
    nodes = list(gm.graph.nodes)
    placeholders = [n for n in nodes if n.op == "placeholder"]
    if len(placeholders) != 1:
        raise UnsupportedModelError(f"reconstruction supports single-input models; this one has {len(placeholders)} inputs")
    index = {n: i for i, n in enumerate(nodes)}
    last_use = {n: max((index[u] for u in n.users), default=index[n]) for n in nodes}

    # Candidate cuts: the only live tensor after node i, and not a quantizer (a unit starts
    # at the float tensor so its input quantizer belongs to it).
    cuts: list[int] = []
    live: set[fx.Node] = set()
    for i, n in enumerate(nodes):
        if n.op == "output":
            break
        live = {m for m in live if last_use[m] > i}
        if n.users:
            live.add(n)
        if live == {n} and not isinstance(_called_module(n, modules), UniformQuantizer):
            cuts.append(i)
    layer_idx = [i for i, n in enumerate(nodes) if isinstance(_called_module(n, modules), QuantLayer)]
    targets = [str(nodes[i].target) for i in layer_idx]
    twice = sorted({t for t in targets if targets.count(t) > 1})
    if twice:  # its cached inputs and outputs would pair one call's inputs with the other's outputs
        # recommend only steps that handle such a layer: GPTQ and EasyQuant come through here and refuse it too,
        # bias correction and moment matching measure and correct it on its first call
        raise UnsupportedModelError(f"reconstruction, gptq and easyquant fit each layer to its own inputs and outputs; "
                                    f"layer(s) {twice} are called more than once per forward. Use calibrate, "
                                    "bias_correction or match_moments (which correct such a layer on its first "
                                    "call) for this model")
    # Between two consecutive quantized layers, cut at the latest candidate (so a ReLU or
    # pooling after a layer stays with it).
    bounds = []
    for a, b in zip(layer_idx, layer_idx[1:]):
        # ...but before the next layer's input quantizer, which must open that layer's unit
        # (with pooling inputs quantized, the pooling and a flatten sit between the two).
        inp = nodes[b].args[0]
        limit = index[inp] if isinstance(inp, fx.Node) and isinstance(_called_module(inp, modules), UniformQuantizer) else b
        between = [c for c in cuts if a <= c < limit]
        if between:
            bounds.append(between[-1])

    units: list[Unit] = []
    start_input = placeholders[0]
    start = index[start_input] + 1
    output = nodes[-1]
    for k, end in enumerate(bounds + [len(nodes) - 2]):
        body = nodes[start:end + 1]
        result = None if k == len(bounds) else nodes[end]
        units.append(_make_unit(gm, modules, body, start_input, result, output, k))
        start_input, start = nodes[end], end + 1
    return units


def _make_unit(gm, modules, body, input_node, result, output_node, k) -> Unit:
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {input_node: graph.placeholder("x")}
    for n in body:
        if n.op in ("placeholder", "output"):
            continue
        env[n] = graph.node_copy(n, lambda a: env[a])
    if result is None:  # the last unit returns what the model returns
        graph.output(fx.node.map_arg(output_node.args[0], lambda a: env[a]))
    else:
        graph.output(env[result])
    unit_gm = fx.GraphModule(gm, graph)
    called = [modules[str(n.target)] for n in body if n.op == "call_module"]
    layers = list(dict.fromkeys(m for m in called if isinstance(m, QuantLayer)))
    quantizers = list(dict.fromkeys(m for m in called if isinstance(m, UniformQuantizer)))
    name = layers[0].name.rsplit(".", 1)[0] if layers and "." in layers[0].name else f"unit{k}"
    if len(layers) == 1:
        name = layers[0].name
    return Unit(name=name, module=unit_gm, layers=layers, quantizers=quantizers)


@contextlib.contextmanager
def quantization_off(units: list[Unit]) -> Iterator[None]:
    """Run these units in float (the rest of the model keeps its state)."""
    saved_w = [(layer, layer.quantize_weight) for u in units for layer in u.layers]
    saved_a = [(q, q.enabled) for u in units for q in u.quantizers]
    try:
        for layer, _ in saved_w:
            layer.quantize_weight = False
        for q, _ in saved_a:
            q.enabled = False
        yield
    finally:
        for layer, s in saved_w:
            layer.quantize_weight = s
        for q, s in saved_a:
            q.enabled = s
