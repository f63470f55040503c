"""Give each quantized layer weights of its own where the float model ties them.

Two layers that share one weight tensor (tied weights) get a quantizer each, possibly of other
bit widths, and the steps that rewrite weights (GPTQ, AdaRound, bias correction, QAT, loading
an artifact) write one layer's result into the other's. Each layer therefore holds a copy. A
module that is not quantized (a ``keep_float`` layer, an embedding) sharing a quantized layer's
weight gets a copy too: the edits of the quantized layer must not reach it.
"""
from __future__ import annotations

import warnings

import torch
from torch import nn


def _storage_key(p: torch.Tensor) -> int:
    """Where a tensor's data lives (0: nowhere, e.g. on the meta device: nothing can be shared)."""
    return 0 if p.device.type == "meta" else p.untyped_storage().data_ptr()


def untie_layer_weights(qm: nn.Module) -> list[str]:
    """Copy every weight or bias a quantized layer shares with an earlier one, and every parameter
    another module of ``qm.net`` shares with a quantized layer; returns the ``"first and second"``
    pairs it separated (and warns once, naming them).

    Each copy is recorded as a float parameter (``register_float_param``) with the float value of
    the tensor it copies: the QuantModel took its float reference before untying, and without the
    record ``float_reference()`` ran the copy with whatever GPTQ, AdaRound or QAT made of it."""
    float_of = {id(t): f for t, f in getattr(qm, "_float_copy", [])}

    def copy_of(module: nn.Module, attr: str, p: nn.Parameter) -> None:
        new = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
        setattr(module, attr, new)
        if hasattr(qm, "register_float_param"):
            qm.register_float_param(new, float_of.get(id(p), p.detach()))

    owner: dict[int, str] = {}
    untied: list[str] = []
    layer_modules: set[int] = set()
    for row in qm.layers:  # type: ignore[attr-defined]
        module = row.layer.module
        layer_modules.add(id(module))
        for attr in ("weight", "bias"):
            p = getattr(module, attr, None)
            if not isinstance(p, nn.Parameter) or not (key := _storage_key(p)):
                continue
            if key in owner and owner[key] != row.name:
                copy_of(module, attr, p)
                untied.append(f"{owner[key]} and {row.name}")
            else:
                owner[key] = row.name
    for name, module in qm.net.named_modules():  # type: ignore[attr-defined]
        if id(module) in layer_modules:
            continue
        for attr, p in list(module._parameters.items()):
            if p is None or not (key := _storage_key(p)) or key not in owner:
                continue
            copy_of(module, attr, p)
            untied.append(f"{owner[key]} and {name}.{attr}" if attr not in ("weight", "bias") else
                          f"{owner[key]} and {name}")
    if untied:
        pairs = sorted(set(untied))
        warnings.warn(f"layers {', '.join(pairs)} share weights in the float model; each is quantized (and trained) "
                      "on a copy of its own, since each has its own quantizer (a float layer keeps its own float "
                      "copy)", stacklevel=3)
    return untied
