"""PD-Quant's distribution correction of a block's calibration input.

Reconstruction on a small calibration set over-fits it; PD-Quant moves each block's
input X̃ (starting from the quantized network's activations X) so that the statistics it
produces at the block's BatchNorm positions match the BN running statistics, while
staying close to X:  min_X̃ Σ_j ‖μ_j(X̃) − μ_j‖ + ‖σ_j(X̃) − σ_j‖ + λ_c ‖X̃ − X‖².
"""
from __future__ import annotations

import torch

from lowbit.ptq.bn_stats import bn_statistic_loss, bn_targets
from lowbit.ptq.units import Unit

DC_CHUNK = 256


def correct_block_input(qm, unit: Unit, q_in: torch.Tensor, iters: int, lr: float, reg: float,
                        gen: torch.Generator) -> torch.Tensor:
    """The corrected copy of ``q_in`` (unchanged when the block has no BN statistics)."""
    targets = bn_targets(qm, list(unit.module.modules()))
    if not targets or iters <= 0:
        return q_in
    corrected = []
    for i in range(0, q_in.shape[0], DC_CHUNK):
        x0 = q_in[i:i + DC_CHUNK]
        x = x0.clone().requires_grad_(True)
        opt = torch.optim.Adam([x], lr=lr)
        with bn_statistic_loss(targets) as terms:
            for _ in range(iters):
                terms.clear()
                unit(x)
                loss = sum(terms) + reg * (x - x0).pow(2).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        corrected.append(x.detach())
    return torch.cat(corrected)
