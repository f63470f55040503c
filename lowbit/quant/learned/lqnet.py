"""LQ-Nets weights (Zhang et al. 2018, seed 001's learned-basis family).

A K-bit weight is one of the 2^K levels vᵀb, b ∈ {−1, +1}^K, with a learned basis v ∈ R^K
per output channel (per tensor if the recipe says so). Each training step (the paper's
QEM, Algorithm 1): quantize every weight to its nearest level with the current basis
(straight-through gradient to the float weight), then, without gradient, solve the basis
that best fits those encodings by least squares, v* = (BᵀB)⁻¹Bᵀw over the channel's weights
(B: each weight's bits), and move v towards it with a moving average (v ← (1 − m)v + m·v*).
v starts as s·[1/2, 1, 2, …, 2^(K−2)] from the calibrated step s: exactly the uniform
mid-rise grid of that step, so training starts from the PTQ model. Deployed as a per-channel
codebook of the 2^K levels (lowbit.quant.codebook): the basis drifts off any uniform grid.

Only the weights are done; LQ-Nets' activation quantizer (the same with b ∈ {0, 1}^K) is not.
"""
from __future__ import annotations

import torch

from lowbit.quant.codebook import CodebookQuantizer
from lowbit.quant.learned.base import TrainableQuantizer
from lowbit.quant.quantizer import UniformQuantizer


def _all_bits(k: int) -> torch.Tensor:
    """[2^K, K] matrix of every b ∈ {−1, +1}^K (row j: the bits of j)."""
    j = torch.arange(2**k)[:, None]
    return ((j >> torch.arange(k)) & 1).float() * 2 - 1


class LQNetQuantizer(TrainableQuantizer):
    kind = "lqnet"
    roles = ("weights",)

    def __init__(self, source: UniformQuantizer, role: str, momentum: float = 0.1) -> None:
        super().__init__(source, role)
        self.spec = source.spec.with_(signed=True, symmetric=True)
        k = self.spec.bits
        step = source.scale.detach().reshape(-1, 1).clamp_min(1e-12)  # [C, 1] or [1, 1]
        self.register_buffer("basis", step * (2.0 ** torch.arange(k, dtype=torch.float32) / 2))
        self.register_buffer("bits_table", _all_bits(k))
        self.momentum = float(momentum)

    def levels(self) -> torch.Tensor:
        """[C, 2^K] levels vᵀb of every channel (row order: code j of ``bits_table``)."""
        return self.basis @ self.bits_table.T

    def encode(self, w: torch.Tensor) -> torch.Tensor:
        """Each weight's nearest level, as the index j into ``bits_table`` ([C, N])."""
        rows = w.detach().reshape(self.basis.shape[0], -1)
        lv = self.levels()
        ordered, perm = torch.sort(lv, dim=1)
        pos = torch.searchsorted(((ordered[:, 1:] + ordered[:, :-1]) / 2).contiguous(), rows.contiguous())
        return torch.gather(perm, 1, pos)

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        codes = self.encode(x)
        q = torch.gather(self.levels(), 1, codes).reshape(x.shape)
        if self.training:
            self.fit_basis(x, codes)
        return q + (x - x.detach())  # the level exactly, gradient straight through

    @torch.no_grad()
    def fit_basis(self, x: torch.Tensor, codes: torch.Tensor) -> None:
        """QEM's basis step: least squares for the current encodings, then the moving average."""
        rows = x.detach().reshape(self.basis.shape[0], -1)
        b = self.bits_table[codes]                                   # [C, N, K]
        btb = b.transpose(1, 2) @ b                                  # [C, K, K]
        btw = (b.transpose(1, 2) @ rows.unsqueeze(-1)).squeeze(-1)   # [C, K]
        eye = torch.eye(btb.shape[-1]) * 1e-6 * btb.diagonal(dim1=1, dim2=2).mean(1, keepdim=True).unsqueeze(-1)
        fitted = torch.linalg.solve(btb + eye, btw)
        ok = torch.isfinite(fitted).all(1, keepdim=True)
        self.basis.copy_(torch.where(ok, (1 - self.momentum) * self.basis + self.momentum * fitted, self.basis))

    def deployed_weight(self, weight: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.gather(self.levels(), 1, self.encode(weight)).reshape(weight.shape)

    def deploy(self, weight: torch.Tensor | None = None) -> UniformQuantizer:
        lv = self.levels()
        return CodebookQuantizer(self.spec, lv if self.spec.per_channel else lv.reshape(-1), name=self.name,
                                 method="lqnet")
