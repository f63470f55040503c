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
from lowbit.ptq.cache import capture_layers, run_chunked
from lowbit.ptq.units import split_units


def _channel_mean(t: torch.Tensor) -> torch.Tensor:
    return t.mean([d for d in range(t.dim()) if d != 1]) if t.dim() > 1 else t


@torch.no_grad()
def correct_bias(qm, batches: list[torch.Tensor], progress: bool = True) -> dict[str, float]:
    """Returns the mean absolute correction per layer (for the report)."""
    if not qm.calibrated:
        raise LowbitError("bias correction compares against the quantized network: calibrate first")
    x = torch.cat(batches)
    fp_in, q_in = x, x
    shifts: dict[str, float] = {}
    for unit in tqdm(split_units(qm), desc="bias correction", unit="unit", disable=not progress, leave=False):
        with qm.float_reference():
            _, fp_out, fp_next = capture_layers(unit, fp_in, unit.layers, inputs=False)
        for layer in unit.layers:
            if not layer.quantize_weight:
                continue
            _, q_out, _ = capture_layers(unit, q_in, [layer], inputs=False)
            shift = _channel_mean(fp_out[layer.name]) - _channel_mean(q_out[layer.name])
            module = layer.module
            if module.bias is None:
                module.bias = nn.Parameter(torch.zeros_like(shift))
                qm.register_float_param(module.bias, torch.zeros_like(shift))
            module.bias.add_(shift)
            shifts[layer.name] = float(shift.abs().mean())
        q_in = run_chunked(unit, q_in)
        fp_in = fp_next
    qm.meta["bias_correction"] = shifts
    return shifts
