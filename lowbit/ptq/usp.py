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
    """Cumulative re-estimate over all batches, each weighted by its number of samples (a remainder batch of
    one image weighed as much as a full one); returns how many BNs changed. On any failure or interrupt
    (KeyboardInterrupt included) every BN gets back the statistics it had: a half-run USP left them reset or
    estimated from the first batches only."""
    bns = [m for m in qm.net.modules() if isinstance(m, BN_TYPES) and m.track_running_stats]
    if not bns:
        raise LowbitError(
            "USP re-estimates BatchNorm statistics, but this QuantModel has no BatchNorm left: "
            "set `fold_bn: false` in the recipe to keep BN layers for USP"
        )
    if not qm.calibrated:
        raise LowbitError("USP runs the quantized network: calibrate before the usp step")
    batches = _without_single_sample_batches(list(batches))
    saved = [(bn.momentum, bn.training) for bn in bns]
    stats = [{name: buf.clone() for name in ("running_mean", "running_var", "num_batches_tracked")
              if (buf := getattr(bn, name, None)) is not None} for bn in bns]
    seen = 0
    try:
        for bn in bns:
            bn.reset_running_stats()
            bn.train()
        for x in tqdm(batches, desc="usp", unit="batch", disable=not progress, leave=False):
            n = int(x.shape[0])
            for bn in bns:  # running := running + n/(seen + n)·(batch − running): the mean over all samples so far
                bn.momentum = n / (seen + n)
            qm(x)
            seen += n
    except BaseException:
        for bn, old in zip(bns, stats):
            for name, value in old.items():
                getattr(bn, name).copy_(value)
        raise
    finally:
        for bn, (momentum, training) in zip(bns, saved):
            bn.momentum = momentum
            bn.train(training)
    return len(bns)


def _without_single_sample_batches(batches: list[torch.Tensor]) -> list[torch.Tensor]:
    """The batches with every batch of one sample joined to the next (the last one to the one before), empty
    ones dropped: BN in training mode cannot take the statistics of one value per channel (BatchNorm1d
    raises), and one image is no estimate. Calibration with ``batch_size: 1`` becomes pairs of images."""
    if sum(int(x.shape[0]) for x in batches) < 2:
        raise LowbitError("USP re-estimates BatchNorm statistics from the calibration images: give it at least 2")
    out: list[torch.Tensor] = []
    carry: torch.Tensor | None = None
    for x in batches:
        if carry is not None:
            x, carry = torch.cat([carry, x]), None
        if int(x.shape[0]) == 1:
            carry = x
        elif int(x.shape[0]) > 1:
            out.append(x)
    if carry is not None:  # at least 2 samples in all, so some batch came before it
        out[-1] = torch.cat([out[-1], carry])
    return out
