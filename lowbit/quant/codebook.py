"""Codebook weights (seed 001's codebook family): each weight is one of K ≤ 2^b float centroids.

Weight sharing (Gong et al. 2014; Deep Compression, Han et al. 2016) stores a layer as b-bit
indices into a small table of float centroids; TTQ's {−Wn, 0, +Wp} is the same shape with
three entries. The centroids need not lie on a grid, so no integer kernel runs them: a
runtime rebuilds the float weight from the indices (the ONNX export emits Gather), and the
``.lowbit`` artifact stores the indices at b bits plus the K floats.

:class:`CodebookQuantizer` is the deployed form and plugs into the uniform interface
(``codes``, ``dequantize``, ``code_range``, ``param_bits``) that artifacts and the layer table
use. :func:`kmeans_1d` is the (optionally weighted) Lloyd clustering that makes a codebook.
"""
from __future__ import annotations

import torch

from lowbit.errors import LowbitError, NumericalError
from lowbit.quant.quantizer import UniformQuantizer
from lowbit.quant.spec import QuantSpec


class CodebookQuantizer(UniformQuantizer):
    """Nearest-centroid quantizer over sorted tables of K ≤ 2^bits float values: one table
    (``centroids`` of shape [K], per tensor) or one per output channel (shape [C, K])."""

    kind = "codebook"

    def __init__(self, spec: QuantSpec, centroids: torch.Tensor, name: str = "", method: str = "kmeans") -> None:
        per_channel = centroids.dim() == 2
        super().__init__(spec.with_(per_channel=per_channel), name=name)
        if centroids.dim() not in (1, 2) or not 1 <= centroids.shape[-1] <= 2**spec.bits:
            raise ValueError(f"a {spec.bits}-bit codebook holds 1..{2 ** spec.bits} centroids (per tensor [K] or "
                             f"per channel [C, K]), got shape {list(centroids.shape)}")
        self.register_buffer("centroids", torch.sort(centroids.detach().float(), dim=-1)[0].clone())
        self.signed = True
        self.scale = torch.ones(())  # the uniform interface's fields, unused by a codebook
        self.zero_point = torch.zeros(())
        self.calibrated = True
        self.method = method

    @property
    def integer_kernel(self) -> bool:
        return False  # float levels: a runtime looks them up (Gather) and runs the layer in float

    def code_range(self) -> tuple[int, int]:
        return 0, self.centroids.shape[-1] - 1

    def set_bits(self, bits: int) -> None:
        if bits != self.spec.bits:
            raise LowbitError(f"{self.name!r}: a codebook's bit width is fixed by its table ({self.spec.bits} bits); "
                             "cluster again for another width")

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        c = self.centroids
        if c.dim() == 1:
            return count_below(x.detach(), (c[1:] + c[:-1]) / 2)
        rows = x.detach().reshape(x.shape[0], -1).contiguous()
        return torch.searchsorted(((c[:, 1:] + c[:, :-1]) / 2).contiguous(), rows).reshape(x.shape)

    def dequantize(self, codes: torch.Tensor) -> torch.Tensor:
        c = self.centroids
        if c.dim() == 1:
            return c[codes.long()]
        return torch.gather(c, 1, codes.long().reshape(codes.shape[0], -1)).reshape(codes.shape)

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        # the centroid exactly (x − x.detach() is 0), gradient straight through
        return self.dequantize(self.codes(x)) + (x - x.detach())

    def param_bits(self) -> int:
        return 32 * self.centroids.numel()

    def extra_repr(self) -> str:
        per = f", per channel ({self.centroids.shape[0]})" if self.centroids.dim() == 2 else ""
        return f"codebook {self.spec.bits}-bit, {self.centroids.shape[-1]} centroids{per} ({self.method})"


COMPARE_MAX_MIDPOINTS = 15  # a ≤ 4-bit table; past it bucketize's binary search wins


def count_below(x: torch.Tensor, midpoints: torch.Tensor, compact: bool = False) -> torch.Tensor:
    """How many of the sorted ``midpoints`` lie strictly below each value: the index of its nearest
    level, ties to the lower one (``torch.bucketize``'s answer, int64). For up to 15 midpoints one
    comparison pass per midpoint into a uint8 counter runs 2–3× faster on a batch of activations
    than bucketize's per-element binary search (LQ-Nets encodes every activation every step).

    ``compact``: return that uint8 counter itself (when there is one) for a caller that only
    bincounts it: a bincount scans its input for min and max before counting, over 8× fewer bytes
    in uint8 than in int64, and the int64 copy is skipped."""
    if midpoints.numel() == 0 or midpoints.numel() > COMPARE_MAX_MIDPOINTS:
        return torch.bucketize(x.contiguous(), midpoints)  # it copies a channels-last input anyway, with a warning
    pos = torch.gt(x, midpoints[0]).view(torch.uint8)  # a fresh bool tensor, read as 0/1 counts
    above = torch.empty_like(pos, dtype=torch.bool)     # one buffer for every later comparison
    for m in midpoints[1:].unbind():
        torch.gt(x, m, out=above)
        pos.add_(above.view(torch.uint8))               # no bool → uint8 conversion pass
    return pos if compact else pos.long()


def kmeans_1d(values: torch.Tensor, k: int, importance: torch.Tensor | None = None, iterations: int = 100,
              tol: float = 1e-7) -> torch.Tensor:
    """K sorted centroids minimising Σ h_i (v_i − c(v_i))² (h = ``importance``, 1 if None).

    Linear initialisation between min and max (Deep Compression found it best: it keeps
    centroids on the rare large weights that quantile or random starts lose). Each Lloyd
    step assigns every value to its nearest centroid — the weighted distance h_i (v_i − c)²
    has the same nearest c for every h_i > 0 — and moves each centroid to the importance-
    weighted mean of its values (Choi et al.'s Hessian-weighted k-means when h is the
    diagonal Hessian). An empty cluster keeps its centroid.
    """
    v = values.detach().reshape(-1).double()
    if v.numel() == 0:
        raise NumericalError("k-means of an empty tensor")
    if not torch.isfinite(v).all():
        raise NumericalError("k-means got non-finite weights")
    h = torch.ones_like(v) if importance is None else importance.detach().reshape(-1).double().clamp_min(0)
    if h.numel() != v.numel():
        raise ValueError(f"importance has {h.numel()} entries for {v.numel()} values")
    if float(h.sum()) <= 0:
        h = torch.ones_like(v)
    lo, hi = float(v.min()), float(v.max())
    c = torch.linspace(lo, hi, k, dtype=torch.float64) if hi > lo else torch.full((k,), lo, dtype=torch.float64)
    for _ in range(iterations):
        idx = torch.bucketize(v, (c[1:] + c[:-1]) / 2)
        mass = torch.zeros(k, dtype=torch.float64).index_add_(0, idx, h)
        total = torch.zeros(k, dtype=torch.float64).index_add_(0, idx, h * v)
        new = torch.where(mass > 0, total / mass.clamp_min(1e-300), c)
        new = torch.sort(new)[0]
        moved = float((new - c).abs().max())
        c = new
        if moved <= tol * max(hi - lo, 1e-30):
            break
    return c.float()
