"""Range estimators: data in, clipping range (lo, hi) out. They hold no state.

Every estimator takes ``x`` as a 2-D tensor [rows, values] — one row per output channel
for per-channel weights, a single row for a per-tensor quantizer — and returns ``lo`` and
``hi`` of shape [rows]. The quantizer turns the range into scale/zero point
(:func:`lowbit.quant.functional.range_to_scale_zero_point`), so the search-based
estimators score candidates with exactly the arithmetic that will run.
"""
from __future__ import annotations

import math
import warnings
from typing import Any, Callable

import torch

from lowbit.errors import NumericalError, RecipeError
from lowbit.quant import functional as F
from lowbit.quant.gaussian import optimal_gaussian_step, optimal_half_gaussian_step
from lowbit.quant.spec import QuantSpec

Range = tuple[torch.Tensor, torch.Tensor]


def check_finite(x: torch.Tensor, what: str, extremes: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
    """Refuse NaN/Inf. Given the tensor's (min, max), checks those two only: any NaN or
    Inf in x makes one of them non-finite, so the full scan runs only to count them."""
    if extremes is not None and bool(torch.isfinite(extremes[0]) & torch.isfinite(extremes[1])):
        return
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).sum().item()
        raise NumericalError(f"{what} holds {bad} NaN/Inf value(s); quantization needs finite numbers")


def _minmax(x: torch.Tensor) -> Range:
    return x.min(dim=1).values, x.max(dim=1).values


def minmax(x: torch.Tensor, spec: QuantSpec, signed: bool) -> Range:
    """Full observed range: no clipping noise, the largest rounding noise."""
    return _minmax(x)


def percentile(x: torch.Tensor, spec: QuantSpec, signed: bool, q: float = 99.99) -> Range:
    """Clip at the q-th percentile (of |x| when symmetric): drops rare outliers."""
    if not 50.0 < q <= 100.0:
        raise RecipeError(f"percentile q={q} must be in (50, 100]")
    if spec.symmetric:
        amax = _quantile(x.abs(), q / 100.0)
        return -amax, amax
    return _quantile(x, 1 - q / 100.0), _quantile(x, q / 100.0)


def _quantile(x: torch.Tensor, q: float) -> torch.Tensor:
    """Per-row linear-interpolated quantile, as torch.quantile, which refuses rows over 2^24 values (a large
    per-tensor Linear): those go through a sort."""
    if x.shape[1] <= 1 << 24:
        return torch.quantile(x, q, dim=1)
    ordered = x.sort(dim=1).values
    pos = q * (x.shape[1] - 1)
    below, frac = int(pos), pos - int(pos)
    above = min(below + 1, x.shape[1] - 1)
    return ordered[:, below] + frac * (ordered[:, above] - ordered[:, below])


def _scaled_candidates(x: torch.Tensor, spec: QuantSpec, fractions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidate ranges as fractions of the full range: lo/hi of shape [K, rows]."""
    lo, hi = _minmax(x)
    if spec.symmetric:
        amax = torch.maximum(lo.abs(), hi.abs())
        lo, hi = -amax, amax
    return fractions[:, None] * lo[None], fractions[:, None] * hi[None]


# Candidates scored per vectorised pass: at most this many float32 values at a time.
SEARCH_CHUNK_VALUES = 1 << 22


def search_shrink(
    x: torch.Tensor, spec: QuantSpec, signed: bool, score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    grid_points: int = 100, refine_points: int = 20,
) -> Range:
    """Coarse-to-fine search over a shrink factor of the full range, per row; ``score``
    (reducing the last dimension) is minimised. Costs (grid_points + refine_points)
    fake-quant passes over x, run as a few batched passes of many candidates each."""
    qmin, qmax = spec.code_range(signed)
    lo0, hi0 = _scaled_candidates(x, spec, torch.ones(1))
    per_pass = max(1, SEARCH_CHUNK_VALUES // max(1, x.numel()))

    def scores_of(frac: torch.Tensor) -> torch.Tensor:
        """Scores [K, rows] of the ranges frac * full range, frac of shape [K, rows]."""
        s, z = F.range_to_scale_zero_point(frac * lo0[0], frac * hi0[0], spec, signed)
        out = torch.empty_like(frac)
        for k in range(0, frac.shape[0], per_pass):
            sk, zk = s[k:k + per_pass, :, None], z[k:k + per_pass, :, None]
            xq = F.fake_quantize_broadcast(x[None], sk, zk, qmin, qmax, spec.grid)
            out[k:k + per_pass] = score(x[None], xq)
        return out

    coarse = torch.linspace(1.0 / grid_points, 1.0, grid_points)
    best = coarse[scores_of(coarse[:, None].expand(grid_points, x.shape[0])).argmin(dim=0)]  # [rows]
    step = 1.0 / grid_points
    # Refine each row around its own coarse optimum (a shared set of offsets); on ties the
    # earliest offset wins, as the coarse grid's argmin does.
    # (the offsets skip 0, the coarse optimum itself, so a row can end up to ~0.003% worse in MSE than its coarse
    # best; re-scoring it moved every MSE-calibrated figure by noise, ResNet-20 w8a8 91.68 -> 91.63 and w4a4
    # 90.47 -> 90.41 at seed 0, benchmarks/mse_refine_ab.py, so it stays as measured)
    offsets = torch.linspace(-step, step, refine_points)
    frac = torch.clamp(best[None] + offsets[:, None], min=1e-4, max=1.0)  # [refine, rows]
    scores = scores_of(frac)
    best_frac = frac.gather(0, scores.argmin(dim=0, keepdim=True))[0]
    return best_frac * lo0[0], best_frac * hi0[0]


def search_ends(x: torch.Tensor, spec: QuantSpec, signed: bool,
                score: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                coarse_points: int = 25, refine_points: int = 9) -> Range:
    """Coarse-to-fine search of lo and hi *independently*, per row, each a fraction of its own
    end (an affine grid's two ends need not shrink together: a skewed channel wants its long
    tail clipped and its short one kept). A coarse_points² grid of (lo, hi) fractions, then a
    refine_points² grid around each row's best."""
    qmin, qmax = spec.code_range(signed)
    lo0, hi0 = _minmax(x)
    rows = x.shape[0]
    per_pass = max(1, SEARCH_CHUNK_VALUES // max(1, x.numel()))

    def scores_of(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Scores [K, rows] of the ranges (a·lo, b·hi), a and b of shape [K, rows]."""
        s, z = F.range_to_scale_zero_point(a * lo0, b * hi0, spec, signed)
        out = torch.empty_like(a)
        for k in range(0, a.shape[0], per_pass):
            xq = F.fake_quantize_broadcast(x[None], s[k:k + per_pass, :, None], z[k:k + per_pass, :, None], qmin,
                                           qmax, spec.grid)
            out[k:k + per_pass] = score(x[None], xq)
        return out

    def best_of(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        i = scores_of(a, b).argmin(dim=0, keepdim=True)
        return a.gather(0, i)[0], b.gather(0, i)[0]

    fractions = torch.linspace(1.0 / coarse_points, 1.0, coarse_points)
    a, b = (t.reshape(-1, 1).expand(-1, rows) for t in torch.meshgrid(fractions, fractions, indexing="ij"))
    best_a, best_b = best_of(a, b)
    offsets = torch.linspace(-1.0 / coarse_points, 1.0 / coarse_points, refine_points)
    da, db = (t.reshape(-1, 1) for t in torch.meshgrid(offsets, offsets, indexing="ij"))
    best_a, best_b = best_of((best_a[None] + da).clamp(1e-4, 1.0), (best_b[None] + db).clamp(1e-4, 1.0))
    return best_a * lo0, best_b * hi0


ENDS = ("shared", "independent")


def mse(x: torch.Tensor, spec: QuantSpec, signed: bool, ends: str = "shared") -> Range:
    """QMSE (seed 004): the clip that minimises rounding noise + clipping noise together,
    measured as the mean squared error of the actual quantizer over the data.

    ``ends="independent"`` searches an affine grid's lo and hi separately (as MCT's uniform
    weights do; ResNet-20 W3A3, affine weights, 3 seeds: 81.89 -> 82.61); symmetric grids
    have one end to search, so it changes nothing there."""
    if ends not in ENDS:
        raise RecipeError(f"estimator 'mse': ends must be one of {', '.join(ENDS)}, not {ends!r}")

    def squared_error(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return b.sub_(a).square_().mean(dim=-1)  # b is the search's fresh fake-quant buffer: in place

    if ends == "independent" and not spec.symmetric:  # any affine grid: the default uint8 activations too
        return search_ends(x, spec, signed, squared_error)
    return search_shrink(x, spec, signed, squared_error)


def cosine(x: torch.Tensor, spec: QuantSpec, signed: bool) -> Range:
    """Seed 002's weight init / seed 003's EasyQuant criterion: maximise the cosine
    similarity between the float and the quantized tensor."""
    def neg_cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return -torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-12)
    return search_shrink(x, spec, signed, neg_cos)


def gaussian(x: torch.Tensor, spec: QuantSpec, signed: bool) -> Range:
    """μL2Q (seed 000): standardise, then use the minimum-MSE step of a unit Gaussian.

    Symmetric grids take σ = RMS(x) (the distribution is centred on 0 by the grid). A
    non-negative tensor (post-ReLU) is taken as a ReLU'd N(0, σ²): σ = √2·RMS(x) (the RMS of
    a ReLU'd Gaussian is σ/√2) and the half-Gaussian optimum step; on an affine grid too, whose
    low end is then 0 (a grid centred on the mean wasted levels on values that never occur).
    Other affine rows centre on the mean and use the 2^b-level (mid-rise) optimum, whose end
    levels sit at ±(2^(b−1) − ½) steps.
    """
    xf = x.float()
    rms = xf.pow(2).mean(dim=1).sqrt()
    half_step, _ = optimal_half_gaussian_step(spec.bits)
    half_gaussian_amax = math.sqrt(2.0) * rms * half_step * (2**spec.bits - 1)
    if spec.symmetric:
        if spec.grid == "midrise":
            step, _ = optimal_gaussian_step(spec.bits, "midrise")
            amax = rms * step * 2 ** (spec.bits - 1)
        elif signed:
            step, _ = optimal_gaussian_step(spec.bits, "midtread")
            amax = rms * step * (2 ** (spec.bits - 1) - 1)
        else:
            amax = half_gaussian_amax
        return -amax, amax
    mu = xf.mean(dim=1)
    sigma = xf.std(dim=1, unbiased=False)
    step, _ = optimal_gaussian_step(spec.bits, "midrise")
    half = sigma * step * (2 ** (spec.bits - 1) - 0.5)
    nonnegative = xf.amin(dim=1) >= 0
    lo = torch.where(nonnegative, torch.zeros_like(mu), mu - half)
    hi = torch.where(nonnegative, half_gaussian_amax, mu + half)
    return lo, hi


MIN_KL_VALUES_PER_LEVEL = 32


def kl(x: torch.Tensor, spec: QuantSpec, signed: bool, bins: int = 2048) -> Range:
    """Entropy calibration: the threshold whose quantized histogram is closest in KL
    divergence to the clipped float histogram (of |x| for symmetric grids). An affine grid on
    data of both signs takes each tail's threshold from that tail, with the levels shared in
    proportion to the tails' extents (the sides follow the data, not the grid's ``signed``: the
    default unsigned activation grid on a signed tensor, the network input, had its negative side
    mirrored from the positive one and clipped). Exact zeros are left out; a tail with fewer than
    32 values per level keeps its full extent."""
    qmin, qmax = spec.code_range(signed)
    lo_all, hi_all = _minmax(x)
    out_lo, out_hi = lo_all.clone(), hi_all.clone()
    for r in range(x.shape[0]):
        lo, hi = float(lo_all[r]), float(hi_all[r])
        if spec.symmetric:
            t = _kl_tail(x[r].abs(), qmax + 1, bins)
            if t is not None:
                out_lo[r], out_hi[r] = -t, t
            continue
        steps = qmax - qmin
        if lo < 0 < hi:  # both tails on one affine grid: each gets its share of the steps
            up = min(steps - 1, max(1, round(steps * hi / (hi - lo))))
            t_up, t_down = _kl_tail(x[r], up, bins), _kl_tail(-x[r], steps - up, bins)
            out_hi[r] = t_up if t_up is not None else hi
            out_lo[r] = -t_down if t_down is not None else lo
        elif hi > 0:
            t = _kl_tail(x[r], steps + 1, bins)
            out_hi[r] = t if t is not None else hi
        elif lo < 0:
            t = _kl_tail(-x[r], steps + 1, bins)
            out_lo[r] = -t if t is not None else lo
    return out_lo, out_hi


def _kl_tail(values: torch.Tensor, n_levels: int, bins: int) -> float | None:
    """The KL threshold of the positive values among ``values`` for ``n_levels`` levels, or None when
    there are too few for a histogram with that many levels (e.g. one output channel of a small conv
    at 8 bits): no divergence to minimise."""
    # Exact zeros (ReLU's spike, padding) are stored exactly by every candidate; left in,
    # their spike dominates the divergence and drags the threshold down.
    row = values[values > 0]
    if row.numel() < max(1, MIN_KL_VALUES_PER_LEVEL * n_levels):
        return None
    if bins <= n_levels:  # the histogram below would have n_levels bins: no threshold to search, i.e. min-max
        warnings.warn(f"estimator 'kl': bins={bins} is not above the grid's {n_levels} levels, so there is no "
                      "threshold to search and the range is the full extent (min-max); use more bins (default "
                      "2048)", stacklevel=2)
    amax = float(row.max())
    nb = max(int(min(bins, max(4 * n_levels, row.numel() // 4))), n_levels)
    hist = torch.histc(row.float(), bins=nb, min=0.0, max=amax).double()
    return _kl_threshold(hist, n_levels) * amax / nb


def _kl_threshold(hist: torch.Tensor, n_levels: int, max_candidates: int = 256) -> int:
    """Number of histogram bins to keep (TensorRT-style entropy calibration).

    For each candidate count i: P = the first i bins with the outlier mass added to the
    last one; Q = those bins merged into n_levels groups, each group's mass spread evenly
    over its non-empty bins. All candidates are scored at once as a [candidates, bins]
    matrix.
    """
    nb = hist.numel()
    if nb <= n_levels:
        return nb
    stride = max(1, (nb - n_levels) // max_candidates)
    cand = torch.arange(n_levels, nb + 1, stride)
    bins = torch.arange(nb)
    inside = bins[None, :] < cand[:, None]                               # [C, nb]
    kept = hist[None, :] * inside
    tail = hist.sum() - kept.sum(dim=1)
    p = kept.clone()
    p[torch.arange(len(cand)), cand - 1] += tail
    group = torch.clamp((bins[None, :] * n_levels) // cand[:, None], max=n_levels - 1)
    nonzero = (kept > 0).double()
    group_mass = torch.zeros(len(cand), n_levels, dtype=hist.dtype).scatter_add_(1, group, kept)
    group_count = torch.zeros(len(cand), n_levels, dtype=hist.dtype).scatter_add_(1, group, nonzero)
    q = torch.gather(group_mass / group_count.clamp(min=1), 1, group) * nonzero
    p = p / p.sum(dim=1, keepdim=True)
    q = q / q.sum(dim=1, keepdim=True).clamp(min=1e-300)
    terms = torch.where(p > 0, p * torch.log(p / q.clamp(min=1e-12)), torch.zeros_like(p))
    return int(cand[terms.sum(dim=1).argmin()])


ESTIMATORS: dict[str, Callable[..., Range]] = {
    "minmax": minmax,
    "percentile": percentile,
    "mse": mse,
    "cosine": cosine,
    "gaussian": gaussian,
    "kl": kl,
}
# "bn" is resolved by the calibration step: it synthesises the BN-implied distribution and
# scores it with the MSE criterion (lowbit.ptq.bn_ranges).
DATA_FREE = {"bn"}


# Values each option's estimator can use, checked when the recipe is read: (low, low open?, high) or the choices.
# kl bins <= 0 made every histogram one of n_levels bins, i.e. silently min-max; percentile's q and mse's ends were
# refused only after the calibration passes.
OPTION_RANGES: dict[tuple[str, str], tuple[float, bool, float | None] | tuple[str, ...]] = {
    ("kl", "bins"): (2, False, None),
    ("percentile", "q"): (50.0, True, 100.0),
    ("mse", "ends"): ENDS,
}


def check_estimator_options(name: str, options: dict[str, Any], where: str, key: str = "estimator_options") -> None:
    """Refuse an estimator option the estimator does not take, of the wrong type or out of its range, when the
    recipe is read (they failed after the calibration passes, a wrong type reported as an unknown option, or
    never). ``key``: what the options are called where they were given (``{where}.{key}`` in messages)."""
    import inspect

    if name not in ESTIMATORS:
        if options:
            raise RecipeError(f"{where}: estimator {name!r} takes no options, got {sorted(options)}")
        return
    params = {p.name: p.default for p in list(inspect.signature(ESTIMATORS[name]).parameters.values())[3:]}
    unknown = sorted(set(options) - set(params))
    if unknown:
        raise RecipeError(f"{where}.{key}: unknown option(s): estimator {name!r} takes "
                          f"{sorted(params) or 'no options'}, not {unknown}")
    for option, value in options.items():
        default = params[option]
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        else:
            ok = isinstance(value, type(default))
        if not ok:
            raise RecipeError(f"{where}.{key}.{option} must be a {type(default).__name__} "
                              f"(e.g. {default!r}), got {value!r}")
        allowed = OPTION_RANGES.get((name, option))
        if allowed is None:
            continue
        if isinstance(allowed[0], str):
            if value not in allowed:
                raise RecipeError(f"{where}.{key}.{option} must be one of {', '.join(allowed)}, got {value!r}")
            continue
        low, open_low, high = allowed
        if (value <= low if open_low else value < low) or (high is not None and value > high):
            span = f"{'(' if open_low else '['}{low:g}, {'∞)' if high is None else f'{high:g}]'}"
            raise RecipeError(f"{where}.{key}.{option} of estimator {name!r} must be in {span}, got {value!r}")


def estimate_range(name: str, x: torch.Tensor, spec: QuantSpec, signed: bool, **options: Any) -> Range:
    """Run a named estimator on a [rows, values] tensor; per-tensor results are scalars."""
    if name not in ESTIMATORS:
        raise RecipeError(f"unknown range estimator {name!r}; known: {sorted(ESTIMATORS) + sorted(DATA_FREE)}")
    check_estimator_options(name, options, "estimate_range", "options")  # Python callers skip the recipe's check
    if x.dim() != 2 or x.numel() == 0:
        raise ValueError("estimate_range expects a non-empty [rows, values] tensor")
    check_finite(x, "tensor to calibrate", extremes=torch.aminmax(x.float()))
    try:
        lo, hi = ESTIMATORS[name](x.float(), spec, signed, **options)
    except TypeError as err:
        raise RecipeError(f"estimator {name!r} got unknown option(s) {sorted(options)}: {err}") from None
    return lo, hi
