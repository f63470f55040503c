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
Above 4 bits (the 8-bit first/last layers) weights and activations keep LSQ(+)'s integer grid.

Activations (:class:`LQNetActivationQuantizer`, the paper's sec. 3.1 for a ReLU output): levels
vᵀb with b ∈ {0, 1}^K and one basis per tensor, starting at s·[1, 2, …, 2^(K−1)] (the
calibrated unsigned grid 0, s, …, (2^K − 1)s); the same QEM step fits v on each training
batch (on its first quarter of images by default: ``fit_fraction``). Values above the top level
clip to it, with zero gradient there (the clipped ReLU's straight-through gradient, 1 inside
[0, top]). Deployed as a per-tensor codebook: the runtime computes the nearest level with
standard ops and the next layer runs in float.
"""
from __future__ import annotations

import math

import torch

from lowbit.errors import RecipeError
from lowbit.quant.codebook import CodebookQuantizer, count_below
from lowbit.quant.learned.base import TrainableQuantizer, weight_rows
from lowbit.quant.quantizer import UniformQuantizer


def _all_bits(k: int, signed: bool = True, device: torch.device | None = None) -> torch.Tensor:
    """[2^K, K] matrix of every b ∈ {−1, +1}^K ({0, 1}^K if not ``signed``; row j: the bits of j)."""
    j = torch.arange(2**k, device=device)[:, None]
    b = ((j >> torch.arange(k, device=device)) & 1).float()
    return b * 2 - 1 if signed else b


MAX_ACTIVATION_BITS = 4  # above this the codebook (2^K float levels) buys nothing over the int8 grid
# Weights likewise: an 8-bit first/last layer as LQ-Nets would store 256 float levels per channel
# (ResNet-20 W2A2: 27 KB of its 110 KB file) and no integer kernel could run it; it keeps LSQ's grid.
MAX_WEIGHT_BITS = 4


@torch.no_grad()
def code_statistics(values: torch.Tensor, codes: torch.Tensor, levels: int) -> torch.Tensor:
    """[2, R, 2^K] float64: how many of the values [R, N] take each code, and their sum per code (all the
    least-squares fit reads of them; sums over processes under DDP are the global batch's)."""
    rows = values.shape[0]
    flat = codes.reshape(-1)
    if rows > 1:  # row r's codes count in bins r·2^K …; one row (an activation tensor) needs no offset pass
        flat = (codes.reshape(rows, -1) + levels * torch.arange(rows, device=codes.device)[:, None]).reshape(-1)
    counts = torch.bincount(flat, minlength=rows * levels).reshape(rows, levels).double()
    # summed in the values' own precision (a float64 copy of a batch of activations costs more than it buys)
    sums = torch.bincount(flat, weights=values.reshape(-1), minlength=rows * levels).reshape(rows, levels).double()
    return torch.stack([counts, sums])


@torch.no_grad()
def least_squares_basis(values: torch.Tensor, codes: torch.Tensor, table: torch.Tensor,
                        statistics: torch.Tensor | None = None) -> torch.Tensor:
    """QEM's basis step: v* = (BᵀB)⁻¹Bᵀx for values [R, N] whose encodings are the rows ``codes``
    [R, N] of ``table`` [2^K, K] (a tiny ridge keeps an unused bit from making BᵀB singular); a
    row whose solve is not finite comes back NaN for the caller to skip. ``statistics``: their
    :func:`code_statistics` where the caller has them already (summed over processes).

    Every value with code j has the same encoding b_j, so BᵀB = Σ_j n_j b_j b_jᵀ and
    Bᵀx = Σ_j (Σ of the values coded j) b_j: two bincounts instead of the [R, N, K] matrix B,
    which for one batch of ResNet-20 activations is ~25 MB per layer per step."""
    if statistics is None:
        statistics = code_statistics(values, codes, table.shape[0])
    counts, sums = statistics[0], statistics[1]
    b = table.double()
    btb = torch.einsum("rj,jk,jl->rkl", counts, b, b)                   # [R, K, K]
    btx = sums @ b                                                      # [R, K]
    ridge = torch.eye(b.shape[1], dtype=b.dtype, device=b.device) * 1e-6 \
        * btb.diagonal(dim1=1, dim2=2).mean(1, keepdim=True).unsqueeze(-1)
    return torch.linalg.solve(btb + ridge, btx).to(values.dtype)


def _channels_last_only(t: torch.Tensor) -> bool:
    """Laid out NHWC (and not also NCHW, as a tensor with 1×1 images or one channel is)."""
    return t.dim() == 4 and not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def memory_order_flat(t: torch.Tensor) -> torch.Tensor:
    """``t``'s elements as a 1-D view in the order memory holds them: for a channels-last
    tensor a plain ``reshape(-1)`` would copy the batch into NCHW order first, and a bincount or
    a lookup does not care about the order (a copy only where ``t`` is neither layout)."""
    if _channels_last_only(t):
        return t.permute(0, 2, 3, 1).reshape(-1)
    return t.reshape(-1)


def shaped_like(flat: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Undo :func:`memory_order_flat`: ``flat`` as a tensor of ``like``'s shape and layout."""
    if _channels_last_only(like):
        n, c, h, w = like.shape
        return flat.reshape(n, h, w, c).permute(0, 3, 1, 2)
    return flat.reshape(like.shape)


class _ClippedStraightThrough(torch.autograd.Function):
    """Forward: the nearest level ``q`` of ``x``; backward: the clipped ReLU's straight-through
    gradient, 1 where bottom ≤ x ≤ top and 0 where the top level clipped (one saved mask,
    instead of the where/detach chain that builds the same gradient from three full tensors)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, q: torch.Tensor, bottom: torch.Tensor, top: torch.Tensor) -> torch.Tensor:  # noqa: ANN001
        if not ctx.needs_input_grad[0]:
            ctx.save_for_backward(None)  # no gradient asked for: no mask pass at all
        elif x.device.type == "cpu" and x.numel() and bool(bottom <= 0) and float(x.min()) >= 0:
            # a ReLU output never lies below a bottom level ≤ 0: a read-only min and one comparison
            # instead of two comparisons and an AND into fresh bool tensors (on a GPU the min would sync)
            ctx.save_for_backward(x <= top)
        else:
            ctx.save_for_backward((x >= bottom) & (x <= top))
        return q

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # noqa: ANN001, ANN205
        (inside,) = ctx.saved_tensors
        return (None if inside is None else grad * inside), None, None, None


class LQNetQuantizer(TrainableQuantizer):
    kind = "lqnet"
    deploys_to_codebook = True
    roles = ("weights", "activations")  # activations: LQNetActivationQuantizer
    takes_weight = True  # where given: all-zero channels are found, and their basis starts at 0

    @classmethod
    def from_uniform(cls, source: UniformQuantizer, role: str, **options):  # noqa: ANN206 - either class
        if role == "activations":
            return LQNetActivationQuantizer(source, role, **options)
        return cls(source, role, **options)

    def __init__(self, source: UniformQuantizer, role: str, momentum: float = 0.1,
                 weight: torch.Tensor | None = None) -> None:
        if source.spec.bits > MAX_WEIGHT_BITS:  # the 8-bit first/last layers keep LSQ's integer grid
            raise RecipeError(f"lqnet weights are for {MAX_WEIGHT_BITS} bits or fewer; "
                              f"{source.name!r} has {source.spec.bits}")
        super().__init__(source, role)
        self.spec = source.spec.with_(signed=True, symmetric=True)
        k = self.spec.bits
        step = source.scale.detach().reshape(-1, 1).clamp_min(1e-12)  # [C, 1] or [1, 1]
        # on the source's device: QAT builds its quantizers after the model moved to the training device
        basis = step * (2.0 ** torch.arange(k, dtype=torch.float32, device=step.device) / 2)
        if weight is not None:
            # No level vᵀb (b ∈ {−1, +1}^K) is 0 unless v = 0: an all-zero channel (γ = 0, a pruned filter)
            # would start at ±s/2, and on a mid-tread source, whose step for such a channel is 1, at ±0.5.
            # Its basis starts at 0 (every level 0); least squares on its zeros keeps it there.
            live = weight_rows(weight.detach(), self.spec.per_channel).abs().amax(1, keepdim=True) > 0
            basis = torch.where(live.to(basis.device), basis, torch.zeros_like(basis))
        self.register_buffer("basis", basis)
        self.register_buffer("bits_table", _all_bits(k, device=step.device))
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
        fitted = least_squares_basis(rows, codes, self.bits_table)
        ok = torch.isfinite(fitted).all(1, keepdim=True)
        self.basis.copy_(torch.where(ok, (1 - self.momentum) * self.basis + self.momentum * fitted, self.basis))

    def deployed_weight(self, weight: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return torch.gather(self.levels(), 1, self.encode(weight)).reshape(weight.shape)

    def deploy(self, weight: torch.Tensor | None = None) -> UniformQuantizer:
        lv = self.levels()
        return CodebookQuantizer(self.spec, lv if self.spec.per_channel else lv.reshape(-1), name=self.name,
                                 method="lqnet")


class LQNetActivationQuantizer(TrainableQuantizer):
    """LQ-Nets on a non-negative tensor: levels vᵀb, b ∈ {0, 1}^K, one learned basis."""

    kind = "lqnet"
    deploys_to_codebook = True
    roles = ("activations",)

    def __init__(self, source: UniformQuantizer, role: str, momentum: float = 0.1, fit_fraction: float = 0.25) -> None:
        super().__init__(source, role)
        k = self.spec.bits
        if k > MAX_ACTIVATION_BITS:  # the 8-bit first/last layers keep LSQ+'s integer grid
            raise RecipeError(f"lqnet activations are for {MAX_ACTIVATION_BITS} bits or fewer; {source.name!r} has {k}")
        if source.signed or float(source.zero_point.detach().abs().max()) != 0:
            raise RecipeError(f"lqnet activations quantize non-negative (ReLU) tensors with levels vᵀb, b ∈ {{0, 1}}; "
                              f"{source.name!r} is signed or offset")
        step = source.scale.detach().reshape(1, 1).clamp_min(1e-12)
        self.register_buffer("basis", step * 2.0 ** torch.arange(k, dtype=torch.float32, device=step.device))  # [1, K]
        self.register_buffer("bits_table", _all_bits(k, signed=False, device=step.device))
        self.momentum = float(momentum)
        if not 0 < fit_fraction <= 1:
            raise RecipeError(f"lqnet fit_fraction must be in (0, 1], got {fit_fraction}")
        self.fit_fraction = float(fit_fraction)

    def levels(self) -> torch.Tensor:
        """[2^K] levels vᵀb (index j: the bits of j)."""
        return (self.basis @ self.bits_table.T).reshape(-1)

    def _sorted_nearest(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(levels sorted, the sort's permutation, each value's position among the sorted levels)."""
        ordered, perm = torch.sort(self.levels())
        return ordered, perm, count_below(x.detach(), (ordered[1:] + ordered[:-1]) / 2, compact=True)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        _, perm, pos = self._sorted_nearest(x)
        return perm[pos.long()]

    def fake_quant(self, x: torch.Tensor) -> torch.Tensor:
        # Works in the sorted level order throughout: a whole batch of activations goes through
        # one nearest-level count and one lookup, not a second lookup through the sort's permutation.
        ordered, perm, pos = self._sorted_nearest(x)
        if self.training:
            self.fit_basis(x, pos, self.bits_table[perm])
        # the fit bincounts the uint8 positions; the lookup widens them to int32 (half the bytes of int64,
        # ~5% of a W3A3 step), a flat index_select: ~2× faster than ordered[pos]
        q = shaped_like(ordered.index_select(0, memory_order_flat(pos).int()), x)
        return _ClippedStraightThrough.apply(x, q, ordered[0], ordered[-1])

    def fit_sample(self, t: torch.Tensor) -> torch.Tensor:
        """The batch's first ``fit_fraction`` of images (at least one): a contiguous slice in
        either memory layout, since the batch is the outermost dimension of both."""
        if self.fit_fraction >= 1 or t.dim() < 2:
            return t
        return t[:max(1, math.ceil(t.shape[0] * self.fit_fraction))]

    @torch.no_grad()
    def fit_basis(self, x: torch.Tensor, codes: torch.Tensor, table: torch.Tensor) -> None:
        """The weights' QEM step (one basis for the tensor) over the batch's first ``fit_fraction``
        of images; ``codes`` index the rows of ``table`` (``bits_table`` in the sorted level order).

        Algorithm 1 fits on the whole batch; its two bincounts over it were ~10% of a ResNet-20 W3A3
        training step. A quarter of a ResNet-20 batch of 128 is still ≥ 130k values for ≤ 16 levels
        (under DDP, a quarter of every process's share, its counts and sums added over processes as
        HWGQ adds its σ statistics: each process fitting its own shard left the ranks with different
        bases, and each validated its own); on CIFAR-10 batches the fitted basis stays close to the
        whole-batch fit, and the moving average (m = 0.1) spreads the difference over ~19 batches
        (benchmarks/lqnet_fit_sample.py, README)."""
        from lowbit.qat.distributed import all_reduce_sum

        x, codes = self.fit_sample(x.detach()), self.fit_sample(codes)
        # both in memory order (x and its codes share a layout): no channels-last copy of the batch
        values, flat_codes = memory_order_flat(x).reshape(1, -1).float(), memory_order_flat(codes).reshape(1, -1)
        statistics = all_reduce_sum(code_statistics(values, flat_codes, table.shape[0]))
        fitted = least_squares_basis(values, flat_codes, table, statistics)
        if bool(torch.isfinite(fitted).all()):
            self.basis.copy_((1 - self.momentum) * self.basis + self.momentum * fitted)

    def deploy(self, weight: torch.Tensor | None = None) -> UniformQuantizer:
        book = CodebookQuantizer(self.spec, self.levels(), name=self.name, method="lqnet")
        book.signed = False
        return book
