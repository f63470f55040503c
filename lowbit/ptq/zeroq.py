"""ZeroQ's distilled data: calibration inputs made from the model itself.

Random Gaussian inputs are optimised until the per-channel mean and standard deviation
at every BatchNorm position of the float network match that BN's statistics (ZeroQ's
loss Σ ‖μ̃ − μ‖₂ + ‖σ̃ − σ‖₂). No real image is read.
"""
from __future__ import annotations

import torch
from tqdm import tqdm

from lowbit.errors import LowbitError
from lowbit.ptq.bn_stats import bn_statistic_loss, bn_targets
from lowbit.ptq.reconstruct import requires_grad


def distill_inputs(qm, samples: int, input_shape: tuple[int, ...], iters: int = 200, lr: float = 0.2,
                   batch_size: int = 128, seed: int = 0, progress: bool = True) -> list[torch.Tensor]:
    targets = bn_targets(qm)
    if not targets:
        raise LowbitError("ZeroQ needs BatchNorm statistics to distil data from, and this model has none")
    gen = torch.Generator().manual_seed(seed)
    like = next(qm.parameters())  # drawn on the CPU generator (same images on any device), made like the model's
    out: list[torch.Tensor] = []
    n_batches = -(-samples // batch_size)
    bar = tqdm(total=n_batches * iters, desc="zeroq distil", disable=not progress, leave=False, mininterval=1.0)
    try:
        with requires_grad(list(qm.parameters()), False), qm.float_reference(), \
                bn_statistic_loss(targets) as terms:
            for b in range(n_batches):
                n = min(batch_size, samples - b * batch_size)
                x = torch.randn((n, *input_shape), generator=gen).to(like.device, like.dtype).requires_grad_(True)
                opt = torch.optim.Adam([x], lr=lr)
                for _ in range(iters):
                    terms.clear()
                    qm(x)
                    loss = sum(terms)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    bar.update(1)
                bar.set_postfix(loss=f"{float(loss.detach()):.3g}")
                out.append(x.detach())
    finally:
        bar.close()
    return out
