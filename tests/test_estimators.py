"""Range estimators against known answers."""
import pytest
import torch

from lowbit.errors import RecipeError
from lowbit.model.fold_bn import BNPrior
from lowbit.ptq.bn_ranges import bn_implied_sample
from lowbit.quant.estimators import ESTIMATORS, estimate_range
from lowbit.quant.gaussian import optimal_gaussian_step
from lowbit.quant.spec import QuantSpec

GEN = torch.Generator().manual_seed(0)
GAUSS = torch.randn(1, 400_000, generator=GEN)


@pytest.mark.parametrize("bits", [2, 3, 4, 6])
def test_mse_search_finds_the_gaussian_optimum(bits):
    """QMSE on Gaussian data must land on the analytically derived step."""
    spec = QuantSpec(bits=bits)
    _, hi = estimate_range("mse", GAUSS, spec, True)
    step = float(hi[0]) / (2 ** (bits - 1) - 1)
    assert step == pytest.approx(optimal_gaussian_step(bits, "midtread")[0], rel=0.03)


def test_mse_with_independent_ends_clips_only_the_long_tail():
    """A skewed row (short negative side, long positive tail): the shared-shrink search must
    cut both ends by one factor, the independent search keeps lo and clips hi; it reaches the
    brute-force optimum of a fine 2-D grid and never scores worse than the shared search."""
    from lowbit.quant import functional as F

    gen = torch.Generator().manual_seed(1)
    x = torch.cat([-3.0 * torch.rand(20_000, generator=gen), torch.empty(20_000).exponential_(1.0, generator=gen)])
    x = torch.stack([x, -x])  # the mirror row: the long tail on the other side
    spec = QuantSpec(bits=3, symmetric=False)
    qmin, qmax = spec.code_range(True)

    def error(lo, hi):
        s, z = F.range_to_scale_zero_point(lo, hi, spec, True)
        xq = F.fake_quantize_broadcast(x, s[:, None], z[:, None], qmin, qmax, spec.grid)
        return (xq - x).square().mean(1)

    shared = estimate_range("mse", x, spec, True)
    independent = estimate_range("mse", x, spec, True, ends="independent")
    assert torch.all(error(*independent) < 0.85 * error(*shared))  # 0.0925 vs 0.1178
    lo0, hi0 = x.min(1).values, x.max(1).values
    # more of the short side kept, more of the long tail clipped (row 0: tail positive; row 1: mirrored)
    assert float(independent[0][0] / lo0[0]) > float(shared[0][0] / lo0[0])
    assert float(independent[1][0] / hi0[0]) < float(shared[1][0] / hi0[0])
    assert float(independent[1][1] / hi0[1]) > float(shared[1][1] / hi0[1])
    fractions = torch.linspace(0.0125, 1.0, 80)
    brute = torch.stack([torch.stack([error(a * lo0, b * hi0) for b in fractions]) for a in fractions])  # [a, b, row]
    best = brute.reshape(-1, 2).min(0).values
    assert torch.all(error(*independent) <= best * 1.01)
    # one end to search: symmetric and unsigned grids are left to the shared search
    sym = QuantSpec(bits=3)
    assert all(torch.equal(a, b) for a, b in zip(estimate_range("mse", x, sym, True, ends="independent"),
                                                  estimate_range("mse", x, sym, True)))
    with pytest.raises(RecipeError, match="ends must be one of shared, independent"):
        estimate_range("mse", x, spec, True, ends="both")


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_gaussian_estimator_scales_with_sigma(bits):
    spec = QuantSpec(bits=bits)
    _, hi1 = estimate_range("gaussian", GAUSS, spec, True)
    _, hi3 = estimate_range("gaussian", 3 * GAUSS, spec, True)
    assert float(hi3[0]) == pytest.approx(3 * float(hi1[0]), rel=1e-4)
    expected = optimal_gaussian_step(bits, "midtread")[0] * (2 ** (bits - 1) - 1)
    assert float(hi1[0]) == pytest.approx(expected, rel=0.01)


def test_minmax_and_percentile():
    x = torch.cat([torch.linspace(-1, 1, 10_001), torch.tensor([50.0])]).reshape(1, -1)
    spec = QuantSpec(bits=8)
    lo, hi = estimate_range("minmax", x, spec, True)
    assert (float(lo[0]), float(hi[0])) == (-1.0, 50.0)
    _, hi = estimate_range("percentile", x, spec, True, q=99.0)
    assert float(hi[0]) == pytest.approx(0.99, abs=0.01)


def test_search_estimators_clip_outliers_at_low_bits():
    x = torch.cat([GAUSS[0, :100_000], torch.tensor([40.0])]).reshape(1, -1)
    spec = QuantSpec(bits=4)
    for name in ("mse", "cosine", "kl", "percentile"):
        _, hi = estimate_range(name, x, spec, True)
        assert float(hi[0]) < 10.0, name


def test_per_channel_rows_are_independent():
    w = torch.randn(4, 500, generator=GEN) * torch.tensor([0.01, 0.1, 1.0, 10.0])[:, None]
    spec = QuantSpec(bits=4, per_channel=True)
    for name in ESTIMATORS:
        _, hi = estimate_range(name, w, spec, True)
        ratios = hi[1:] / hi[:-1]
        assert torch.allclose(ratios, torch.full((3,), 10.0), rtol=0.35), name


def test_unsigned_activations_get_nonnegative_ranges():
    x = torch.relu(GAUSS)
    spec = QuantSpec(bits=4, signed=False)
    for name in ESTIMATORS:
        lo, hi = estimate_range(name, x, spec, False)
        assert float(hi[0]) > 0, name


def test_bn_prior_sample_matches_the_distribution():
    prior = BNPrior(beta=torch.tensor([0.0, 2.0]), gamma=torch.tensor([1.0, 0.5]))
    s = bn_implied_sample(prior, rectified=False, total=200_000).reshape(2, -1)
    assert s.mean(dim=1).tolist() == pytest.approx([0.0, 2.0], abs=0.01)
    assert s.std(dim=1).tolist() == pytest.approx([1.0, 0.5], abs=0.01)
    assert bn_implied_sample(prior, rectified=True).min() >= 0


def test_unknown_estimator_and_option():
    with pytest.raises(RecipeError, match="unknown range estimator 'bogus'"):
        estimate_range("bogus", GAUSS, QuantSpec(), True)
    with pytest.raises(RecipeError, match="unknown option"):
        estimate_range("minmax", GAUSS, QuantSpec(), True, q=3)


@pytest.mark.parametrize("bits", [2, 4])
def test_gaussian_estimator_on_relu_and_affine_grids_hits_the_optima(bits):
    """ReLU'd N(0, 1): the unsigned grid is the half-Gaussian optimum in units of σ = 1 (σ was taken as the
    RMS, σ/√2, a step √2 too small), with low end 0 on an affine grid too; an affine grid on N(0, 1) spans
    2^b − 1 optimal mid-rise steps between its end levels (it spanned 2^b)."""
    from lowbit.quant.gaussian import optimal_half_gaussian_step

    relu = torch.relu(GAUSS)
    half = optimal_half_gaussian_step(bits)[0] * (2**bits - 1)
    _, hi = estimate_range("gaussian", relu, QuantSpec(bits=bits, signed=False), False)
    assert float(hi[0]) == pytest.approx(half, rel=0.01)
    lo, hi = estimate_range("gaussian", relu, QuantSpec(bits=bits, signed=False, symmetric=False), False)
    assert float(lo[0]) == 0.0 and float(hi[0]) == pytest.approx(half, rel=0.01)
    lo, hi = estimate_range("gaussian", GAUSS, QuantSpec(bits=bits, symmetric=False), True)
    span = optimal_gaussian_step(bits, "midrise")[0] * (2**bits - 1)
    assert float(hi[0] - lo[0]) == pytest.approx(span, rel=0.01)


def test_kl_on_a_signed_tensor_with_an_unsigned_affine_grid_sizes_each_tail_from_its_own_values():
    """The default activation layout (unsigned affine) on a signed tensor: the negative tail, 4× wider here, was
    clipped at the mirror of the positive threshold (17% of values clipped)."""
    z = torch.randn(1, 200_000, generator=torch.Generator().manual_seed(3))
    x = torch.where(z < 0, 4 * z, z)
    spec = QuantSpec(bits=8, signed=False, symmetric=False)
    lo, hi = estimate_range("kl", x, spec, False)
    assert 2.5 < float(-lo[0] / hi[0]) < 6.0
    assert float((x < lo[0]).float().mean()) < 0.01


def _mse_at(x: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, spec: QuantSpec, signed: bool) -> torch.Tensor:
    from lowbit.quant import functional as F

    qmin, qmax = spec.code_range(signed)
    s, z = F.range_to_scale_zero_point(lo, hi, spec, signed)
    xq = F.fake_quantize_broadcast(x[None], s[None, :, None], z[None, :, None], qmin, qmax, spec.grid)[0]
    return (xq - x).square().mean(1)


def test_independent_ends_search_an_unsigned_affine_grid_on_a_signed_tensor():
    """``ends: independent`` was gated on a signed grid: the default (unsigned affine) activation layout on the
    network's signed input kept the shared shrink."""
    z = torch.randn(1, 50_000, generator=torch.Generator().manual_seed(4))
    x = torch.where(z < 0, 3 * z, z)
    spec = QuantSpec(bits=4, signed=False, symmetric=False)
    shared = estimate_range("mse", x, spec, False)
    lo, hi = estimate_range("mse", x, spec, False, ends="independent")
    assert float(lo[0] / x.min()) != pytest.approx(float(hi[0] / x.max()), abs=0.02)  # the ends moved apart
    assert float(_mse_at(x, lo, hi, spec, False)[0]) < float(_mse_at(x, *shared, spec, False)[0])


def test_percentile_of_a_tensor_over_torch_quantiles_limit():
    x = torch.arange((1 << 24) + 101, dtype=torch.float32).reshape(1, -1)
    lo, hi = estimate_range("percentile", x, QuantSpec(bits=8, symmetric=False), True, q=99.0)
    n = x.shape[1]
    assert float(hi[0]) == pytest.approx(0.99 * (n - 1), rel=1e-6)
    assert float(lo[0]) == pytest.approx(0.01 * (n - 1), rel=1e-6)


def test_observer_keeps_a_remainder_batch_in_proportion_to_its_size():
    """1,025 calibration images are 8 batches of 128 and one of 1: the one image's values were kept at a full
    batch's count, 1/9 of the sample from 1/1025 of the data."""
    from lowbit.quant.observer import SampleObserver

    obs = SampleObserver("t", per_batch=1 << 12)
    for _ in range(8):
        obs(torch.zeros(128, 64))
    obs(torch.full((1, 64), 5.0))
    values = obs.sample()[0, :-2]  # (less the exact extremes it appends)
    assert int((values == 5.0).sum()) == 32  # 4096 · 1/128
    assert values.numel() == 8 * 4096 + 32
