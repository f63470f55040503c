"""Side-by-side caching of float and quantized tensors, written once for every
reconstruction-style algorithm (bias correction, EasyQuant, AdaRound, BRECQ, ...)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator

import torch
from torch import nn

from lowbit.model.quant_layer import QuantLayer

CHUNK = 128  # images per forward pass while caching: bounds peak memory


@torch.no_grad()
def run_chunked(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, chunk: int = CHUNK) -> torch.Tensor:
    return torch.cat([fn(x[i:i + chunk]) for i in range(0, x.shape[0], chunk)])


def _input_source(layer: QuantLayer) -> nn.Module:
    """The module whose input is the layer's float input: its input quantizer if it has one."""
    return layer.input_ref[0] if layer.input_ref else layer


@torch.no_grad()
def capture_layers(
    unit: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, layers: list[QuantLayer],
    inputs: bool = True, outputs: bool = True, chunk: int = CHUNK,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], torch.Tensor]:
    """Run ``unit`` over ``x`` and record, for each layer, the float tensor entering its
    input quantizer and the layer's output; also returns the unit's output.

    Inputs are taken before the activation quantizer so reconstruction can apply (and
    learn) that quantizer itself.
    """
    seen_in: dict[str, list[torch.Tensor]] = {layer.name: [] for layer in layers}
    seen_out: dict[str, list[torch.Tensor]] = {layer.name: [] for layer in layers}
    handles = []
    for layer in layers:
        if inputs:
            handles.append(_input_source(layer).register_forward_pre_hook(
                lambda _m, args, name=layer.name: seen_in[name].append(args[0].detach())))
        if outputs:
            handles.append(layer.register_forward_hook(
                lambda _m, _args, out, name=layer.name: seen_out[name].append(out.detach())))
    try:
        out = run_chunked(unit, x, chunk)
    finally:
        for h in handles:
            h.remove()
    # A quantizer shared by two layers fires once per pass; each layer saw the same tensor.
    cat = {n: torch.cat(v) for n, v in seen_in.items() if v}
    return cat, {n: torch.cat(v) for n, v in seen_out.items() if v}, out


class _SeenEnough(Exception):
    """Raised inside a forward pass once every wanted input has been recorded."""


@torch.no_grad()
def capture_inputs(unit: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, layers: list[QuantLayer],
                   chunk: int = CHUNK) -> dict[str, torch.Tensor]:
    """The tensors entering these layers' input quantizers, as :func:`capture_layers`
    records them, but each chunk's forward pass stops as soon as the last of them has
    been seen: the rest of the unit is not computed. Layer-wise methods call this once
    per layer, so a block's first layer costs nothing and its second half a pass."""
    seen: dict[str, list[torch.Tensor]] = {layer.name: [] for layer in layers}
    pending: set[str] = set()

    def record(name: str, value: torch.Tensor) -> None:
        seen[name].append(value.detach())
        pending.discard(name)
        if not pending:
            raise _SeenEnough

    handles = []
    for layer in layers:
        handles.append(_input_source(layer).register_forward_pre_hook(
            lambda _m, args, name=layer.name: record(name, args[0])))
    try:
        for i in range(0, x.shape[0], chunk):
            pending.update(seen)
            try:
                unit(x[i:i + chunk])
            except _SeenEnough:
                pass
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(v) for n, v in seen.items() if v}


@dataclass
class UnitStep:
    """One unit's view of the side-by-side walk: its float and quantized inputs, and
    the float (teacher) tensors captured before any edit to the unit."""

    index: int
    unit: Any
    fp_in: torch.Tensor
    q_in: torch.Tensor
    fp_layer_in: dict[str, torch.Tensor]
    fp_layer_out: dict[str, torch.Tensor]
    fp_out: torch.Tensor


def walk_units(qm, units: list, x: torch.Tensor, layer_inputs: bool = False,
               layer_outputs: bool = False, teacher: bool = True) -> Iterator[UnitStep]:
    """Visit units in order; after the caller edits a unit, the quantized cache is pushed
    through the edited unit and the float cache through the teacher's. ``teacher=False``
    skips the float side (fp_* fields empty) for callers that read only the quantized one."""
    fp_in, q_in = x, x
    for k, unit in enumerate(units):
        if not teacher:
            yield UnitStep(k, unit, fp_in, q_in, {}, {}, fp_in)
            q_in = run_chunked(unit, q_in)
            continue
        with qm.float_reference():
            fp_lin, fp_lout, fp_out = capture_layers(unit, fp_in, unit.layers, inputs=layer_inputs,
                                                     outputs=layer_outputs)
        yield UnitStep(k, unit, fp_in, q_in, fp_lin, fp_lout, fp_out)
        q_in = run_chunked(unit, q_in)
        fp_in = fp_out
