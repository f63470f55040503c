"""Empirical bias correction: remove the per-channel mean shift quantization adds.

Quantization errors do not average out: a layer's quantized output has a biased mean
per output channel, and the bias compounds through the network. Layer by layer in
network order (so each layer sees the already corrected ones before it), the expected
output of the float layer on the float input minus that of the quantized layer on the
quantized input is added to the layer's bias.
"""
from __future__ import annotations

import torch
from torch import nn
from tqdm import tqdm

from lowbit.errors import LowbitError
from lowbit.ptq.cache import capture_layers, walk_units
from lowbit.ptq.units import split_units


def _channel_mean(t: torch.Tensor) -> torch.Tensor:
    return t.mean([d for d in range(t.dim()) if d != 1]) if t.dim() > 1 else t


@torch.no_grad()
def correct_bias(qm, batches: list[torch.Tensor], progress: bool = True) -> dict[str, float]:
    """Returns the mean absolute correction per layer (for the report)."""
    if not qm.calibrated:
        raise LowbitError("bias correction compares against the quantized network: calibrate first")
    x = torch.cat(batches)
    shifts: dict[str, float] = {}
    units = split_units(qm)
    bar = tqdm(total=len(units), desc="bias correction", unit="unit", disable=not progress, leave=False)
    for step in walk_units(qm, units, x, layer_outputs=True):
        for layer in step.unit.layers:
            if not layer.quantize_weight:
                continue
            _, q_out, _ = capture_layers(step.unit, step.q_in, [layer], inputs=False)
            shift = _channel_mean(step.fp_layer_out[layer.name]) - _channel_mean(q_out[layer.name])
            module = layer.module
            if module.bias is None:
                module.bias = nn.Parameter(torch.zeros_like(shift))
                qm.register_float_param(module.bias, torch.zeros_like(shift))
            module.bias.add_(shift)
            shifts[layer.name] = float(shift.abs().mean())
        bar.update(1)
    bar.close()
    qm.meta["bias_correction"] = shifts
    return shifts
