"""Give each quantized layer weights of its own where the float model ties them.

Two layers that share one weight tensor (tied weights) get a quantizer each, possibly of other
bit widths, and the steps that rewrite weights (GPTQ, AdaRound, bias correction, QAT, loading
an artifact) write one layer's result into the other's. Each layer therefore holds a copy.
"""
from __future__ import annotations

import warnings

from torch import nn


def untie_layer_weights(qm: nn.Module) -> list[str]:
    """Copy every weight or bias a quantized layer shares with an earlier one; returns the
    ``"first and second"`` layer pairs it separated (and warns once, naming them)."""
    owner: dict[int, str] = {}
    untied: list[str] = []
    for row in qm.layers:  # type: ignore[attr-defined]
        module = row.layer.module
        for attr in ("weight", "bias"):
            p = getattr(module, attr, None)
            if not isinstance(p, nn.Parameter) or p.device.type == "meta":
                continue
            key = p.untyped_storage().data_ptr()
            if key == 0:  # (no storage: nothing can be shared)
                continue
            if key in owner and owner[key] != row.name:
                setattr(module, attr, nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad))
                untied.append(f"{owner[key]} and {row.name}")
            else:
                owner[key] = row.name
    if untied:
        pairs = sorted(set(untied))
        warnings.warn(f"layers {', '.join(pairs)} share weights in the float model; each is quantized (and trained) "
                      "on a copy of its own, since each has its own quantizer", stacklevel=3)
    return untied
