"""Minimum-MSE uniform quantizers of a unit Gaussian, derived numerically.

μL2Q (seed 000) maps weights to N(0,1) and quantizes them with the step that minimises
the expected squared error for the bit width. The step is not a guessed constant: it is
the minimiser of the closed-form MSE below, found with a bounded scalar search. DESIGN.md
lists the resulting values as test vectors (tests/test_gaussian.py checks them).

For a symmetric quantizer with levels ``l_k`` and decision thresholds ``t_k`` the error is
E[(x - Q(x))^2] = sum_k ∫_{t_k}^{t_{k+1}} (x - l_k)^2 φ(x) dx, and each term has a closed
form through the Gaussian pdf φ and cdf Φ (seed 000, eq. for the quantization loss).
"""
from __future__ import annotations

from functools import lru_cache

import numpy as np
from scipy import optimize, special, stats


def _interval_sq_error(a: np.ndarray, b: np.ndarray, level: np.ndarray) -> np.ndarray:
    """∫_a^b (x - level)^2 φ(x) dx for a standard normal, vectorised.

    Uses ∫x²φ = Φ - xφ, ∫xφ = -φ, ∫φ = Φ over [a, b].
    """
    pdf_a, pdf_b = stats.norm.pdf(a), stats.norm.pdf(b)
    mass = special.ndtr(b) - special.ndtr(a)
    # x φ(x) -> 0 at ±inf; guard inf * 0.
    with np.errstate(invalid="ignore"):
        xa = np.where(np.isfinite(a), a * pdf_a, 0.0)
        xb = np.where(np.isfinite(b), b * pdf_b, 0.0)
    second = mass - (xb - xa)
    first = -(pdf_b - pdf_a)
    return second - 2 * level * first + level**2 * mass


def _levels(step: float, bits: int, grid: str) -> np.ndarray:
    if grid == "midrise":
        k = np.arange(-(2 ** (bits - 1)), 2 ** (bits - 1))
        return (k + 0.5) * step
    if grid == "midtread":
        half = 2 ** (bits - 1) - 1
        return np.arange(-half, half + 1) * step
    raise ValueError(f"unknown grid {grid!r}")


def gaussian_mse(step: float, bits: int, grid: str = "midrise") -> float:
    """Expected squared error of quantizing N(0,1) on a uniform grid with this step."""
    levels = _levels(step, bits, grid)
    mids = (levels[:-1] + levels[1:]) / 2
    lo = np.concatenate([[-np.inf], mids])
    hi = np.concatenate([mids, [np.inf]])
    return float(np.sum(_interval_sq_error(lo, hi, levels)))


@lru_cache(maxsize=None)
def optimal_gaussian_step(bits: int, grid: str = "midrise") -> tuple[float, float]:
    """(step, mse) of the minimum-MSE uniform quantizer of N(0,1), step in units of σ.

    midrise: 2^b levels, no zero (μL2Q); midtread: 2^b - 1 levels including 0.
    """
    if grid == "midtread" and bits < 2:
        raise ValueError("a mid-tread grid needs at least 2 bits")
    n_levels = 2**bits if grid == "midrise" else 2**bits - 1
    # The optimum clip lies below ~4.5σ for ≤ 8 bits: bracket the step accordingly.
    upper = 2 * 5.0 / max(n_levels - 1, 1)
    res = optimize.minimize_scalar(
        gaussian_mse, bounds=(1e-4, upper), args=(bits, grid), method="bounded",
        options={"xatol": 1e-9},
    )
    return float(res.x), float(res.fun)


def optimal_binary_level() -> float:
    """±α minimising E[(x - α·sign(x))^2] for N(0,1): α = E|x| = sqrt(2/π) (XNOR-Net's α)."""
    return float(np.sqrt(2 / np.pi))


def optimal_ternary_level() -> tuple[float, float]:
    """(a, threshold) of the minimum-MSE ternary quantizer {-a, 0, a} of N(0,1)."""
    step, _ = optimal_gaussian_step(2, "midtread")
    return step, step / 2


def loss_vs_bits(max_bits: int = 8, grid: str = "midrise") -> list[tuple[int, float, float]]:
    """μL2Q's loss-vs-bits curve: (bits, optimal step, MSE) for 1..max_bits."""
    first = 1 if grid == "midrise" else 2
    return [(b, *optimal_gaussian_step(b, grid)) for b in range(first, max_bits + 1)]


def half_gaussian_mse(step: float, bits: int) -> float:
    """E[(x − Q(x))²] for x = max(0, z), z ~ N(0, 1), on the unsigned grid {0, s, …, (2^b − 1)s}.

    Half the mass sits at x = 0, exactly on the level 0, and adds no error; the rest is the
    positive half of the Gaussian (HWGQ's half-wave Gaussian, Cai et al. 2017)."""
    levels = np.arange(2**bits) * step
    mids = (levels[:-1] + levels[1:]) / 2
    lo = np.concatenate([[0.0], mids])
    hi = np.concatenate([mids, [np.inf]])
    return float(np.sum(_interval_sq_error(lo, hi, levels)))


@lru_cache(maxsize=None)
def optimal_half_gaussian_step(bits: int) -> tuple[float, float]:
    """(step, mse) of the minimum-MSE unsigned uniform quantizer of a ReLU'd N(0, 1), in σ."""
    if bits < 1:
        raise ValueError("bits must be >= 1")
    upper = 2 * 5.0 / max(2**bits - 1, 1)
    res = optimize.minimize_scalar(half_gaussian_mse, bounds=(1e-4, upper), args=(bits,), method="bounded",
                                   options={"xatol": 1e-9})
    return float(res.x), float(res.fun)
