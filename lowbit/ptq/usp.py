"""USP (seed 004): re-estimate BatchNorm statistics of the quantized network.

Quantization shifts each layer's output mean and variance; the BN that follows still
normalises with the float network's statistics. USP runs calibration data through the
quantized network and replaces every BN's running mean/var with what it now sees —
no retraining, no labels.
"""
from __future__ import annotations

import torch
from tqdm import tqdm

from lowbit.errors import LowbitError
from lowbit.model.fold_bn import BN_TYPES
from lowbit.model.quant_model import QuantModel


@torch.no_grad()
def update_bn_statistics(qm: QuantModel, batches: list[torch.Tensor], progress: bool = True) -> int:
    """Cumulative (equal-weight) re-estimate over all batches; returns how many BNs changed."""
    bns = [m for m in qm.net.modules() if isinstance(m, BN_TYPES) and m.track_running_stats]
    if not bns:
        raise LowbitError(
            "USP re-estimates BatchNorm statistics, but this QuantModel has no BatchNorm left: "
            "set `fold_bn: false` in the recipe to keep BN layers for USP"
        )
    if not qm.calibrated:
        raise LowbitError("USP runs the quantized network: calibrate before the usp step")
    saved = [(bn.momentum, bn.training) for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative moving average: every batch counts equally
        bn.train()
    try:
        for x in tqdm(batches, desc="usp", unit="batch", disable=not progress, leave=False):
            qm(x)
    finally:
        for bn, (momentum, training) in zip(bns, saved):
            bn.momentum = momentum
            bn.train(training)
    return len(bns)
