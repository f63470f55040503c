"""Uniform quantizer properties (hypothesis) and edge cases."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lowbit.errors import BitsError, LowbitError, NumericalError, RecipeError
from lowbit.quant.estimators import estimate_range
from lowbit.quant.quantizer import UniformQuantizer
from lowbit.quant.spec import QuantSpec

specs = st.builds(
    QuantSpec,
    bits=st.integers(2, 8),
    signed=st.booleans(),
    symmetric=st.booleans(),
    per_channel=st.booleans(),
)


def calibrated(spec: QuantSpec, x: torch.Tensor) -> UniformQuantizer:
    q = UniformQuantizer(spec)
    rows = x.reshape(x.shape[0], -1) if spec.per_channel else x.reshape(1, -1)
    lo, hi = estimate_range("minmax", rows, spec, bool(spec.signed))
    if not spec.per_channel:
        lo, hi = lo[0], hi[0]
    q.set_range(lo, hi)
    return q


def sample(seed: int, signed: bool) -> torch.Tensor:
    x = torch.randn(4, 3, 5, 5, generator=torch.Generator().manual_seed(seed)) * torch.tensor([0.1, 1.0, 3.0, 0.5])[:, None, None, None]
    return x if signed else x.abs()


@settings(max_examples=60, deadline=None)
@given(spec=specs, seed=st.integers(0, 10_000))
def test_codes_in_range_and_dequant_equals_fake_quant(spec, seed):
    x = sample(seed, bool(spec.signed))
    q = calibrated(spec, x)
    codes = q.codes(x)
    qmin, qmax = q.code_range()
    assert codes.dtype == torch.int32
    assert int(codes.min()) >= qmin and int(codes.max()) <= qmax
    assert torch.equal(q.dequantize(codes), q(x))


@settings(max_examples=60, deadline=None)
@given(spec=specs, seed=st.integers(0, 10_000))
def test_fake_quant_is_idempotent(spec, seed):
    x = sample(seed, bool(spec.signed))
    q = calibrated(spec, x)
    once = q(x)
    assert torch.allclose(q(once), once, atol=1e-6, rtol=0)


@settings(max_examples=30, deadline=None)
@given(signed=st.booleans(), symmetric=st.booleans(), per_channel=st.booleans(), seed=st.integers(0, 10_000))
def test_error_shrinks_as_bits_grow(signed, symmetric, per_channel, seed):
    x = sample(seed, signed)
    errors = []
    for bits in range(2, 9):
        q = calibrated(QuantSpec(bits=bits, signed=signed, symmetric=symmetric, per_channel=per_channel), x)
        errors.append(float(((q(x) - x) ** 2).mean()))
    assert all(a >= b for a, b in zip(errors, errors[1:]))
    assert errors[-1] < errors[0] / 100


def test_known_codes_round_half_to_even():
    q = UniformQuantizer(QuantSpec(bits=4, signed=True))
    q.set_params(torch.tensor(0.5), torch.tensor(0.0))
    x = torch.tensor([0.25, 0.75, -0.25, 1.25, 100.0, -100.0])
    assert q.codes(x).tolist() == [0, 2, 0, 2, 7, -7]  # narrow signed range [-7, 7]


def test_affine_zero_point_makes_zero_exact():
    spec = QuantSpec(bits=8, signed=False, symmetric=False)
    q = UniformQuantizer(spec)
    q.set_range(torch.tensor(-0.3), torch.tensor(2.0))
    assert q(torch.zeros(3)).abs().max() == 0
    assert 0 <= q.zero_point.item() <= 255 and q.zero_point.item() == round(q.zero_point.item())


def test_straight_through_gradient_passes_inside_range_only():
    q = UniformQuantizer(QuantSpec(bits=4, signed=True))
    q.set_params(torch.tensor(0.1), torch.tensor(0.0))
    x = torch.tensor([0.03, -0.2, 5.0], requires_grad=True)
    q(x).sum().backward()
    assert x.grad.tolist() == [1.0, 1.0, 0.0]


def test_all_zero_channel_is_stored_exactly():
    w = torch.randn(3, 8)
    w[1] = 0
    spec = QuantSpec(bits=4, per_channel=True)
    for est in ("minmax", "mse", "cosine", "gaussian", "percentile", "kl"):
        q = UniformQuantizer(spec)
        lo, hi = estimate_range(est, w, spec, True)
        q.set_range(lo, hi)
        out = q(w)
        assert torch.isfinite(out).all(), est
        assert out[1].abs().max() == 0, est
        assert q.scale[1] == 1.0, est


def test_constant_tensor_affine():
    spec = QuantSpec(bits=8, signed=False, symmetric=False)
    x = torch.full((1, 50), 3.0)
    q = UniformQuantizer(spec)
    lo, hi = estimate_range("minmax", x, spec, False)
    q.set_range(lo[0], hi[0])
    assert torch.allclose(q(x), x, atol=3.0 / 255)


def test_nan_and_inf_are_refused():
    spec = QuantSpec(bits=8)
    with pytest.raises(NumericalError, match="NaN/Inf"):
        estimate_range("minmax", torch.tensor([[1.0, float("nan")]]), spec, True)
    with pytest.raises(NumericalError):
        estimate_range("mse", torch.tensor([[1.0, float("inf")]]), spec, True)


@pytest.mark.parametrize("bits", [0, 1, 9, 16, -3])
def test_bits_out_of_range(bits):
    with pytest.raises(BitsError, match="outside the supported range 2..8"):
        QuantSpec(bits=bits)


def test_midrise_grid_allows_one_bit_binary():
    q = UniformQuantizer(QuantSpec(bits=1, grid="midrise"))
    q.set_params(torch.tensor(2.0), torch.tensor(0.0))  # levels ±1
    assert q(torch.tensor([-3.0, -0.1, 0.1, 3.0])).tolist() == [-1.0, -1.0, 1.0, 1.0]
    assert q.codes(torch.tensor([-0.1, 0.1])).tolist() == [-1, 0]
    with pytest.raises(RecipeError):
        QuantSpec(bits=2, grid="midrise", symmetric=False)


def test_uncalibrated_quantizer_refuses_to_run():
    q = UniformQuantizer(QuantSpec(bits=4))
    with pytest.raises(LowbitError, match="calibrate"):
        q(torch.ones(2))
    q.set_params(torch.tensor(1.0), torch.tensor(0.0))
    q.set_bits(3)
    with pytest.raises(LowbitError, match="calibrate"):
        q(torch.ones(2))


@pytest.mark.parametrize("grid,per_channel", [("midtread", False), ("midtread", True), ("midrise", True)])
def test_fused_straight_through_fake_quant_matches_the_autograd_chain(grid, per_channel):
    """The one-op fake-quant (forward and both gradients) against the round_ste/clamp chain
    it replaces, on an affine per-channel grid with clipping on both sides."""
    import lowbit.quant.functional as QF

    torch.manual_seed(0)
    x0 = torch.randn(6, 4, 3, 3) * 2
    s0 = torch.rand(4) * 0.3 + 0.1 if per_channel else torch.tensor(0.2)
    z0 = torch.tensor([-2.0, 0.0, 1.0, 2.0]) if per_channel and grid == "midtread" else torch.zeros(s0.shape)
    g = torch.randn_like(x0)
    results = []
    for fused in (False, True):
        x, s = x0.clone().requires_grad_(True), s0.clone().requires_grad_(True)
        if fused:
            out = QF.fake_quantize(x, s, z0, -4, 3, grid, 1)
        else:
            sb, zb = QF.broadcast_shape(s, x, 1), QF.broadcast_shape(z0, x, 1)
            if grid == "midrise":
                out = (torch.clamp(QF.floor_ste(x / sb), -4, 3) + 0.5) * sb
            else:
                out = (torch.clamp(QF.round_ste(x / sb) + zb, -4, 3) - zb) * sb
        out.backward(g)
        results.append((out.detach(), x.grad, s.grad))
    (o1, gx1, gs1), (o2, gx2, gs2) = results
    assert torch.equal(o1, o2)
    assert torch.allclose(gx1, gx2, atol=1e-6) and (gx2 == 0).any()  # some elements clipped
    assert torch.allclose(gs1, gs2, rtol=1e-5, atol=1e-5) and gs2.shape == s0.shape


def test_full_range_symmetric_grid_adds_the_most_negative_code_and_keeps_zero_point_zero():
    from lowbit.quant import functional as QF

    narrow = QuantSpec(bits=4, signed=True, symmetric=True)
    full = QuantSpec(bits=4, signed=True, symmetric=True, narrow_range=False)
    assert narrow.code_range() == (-7, 7) and full.code_range() == (-8, 7)
    scale, zp = QF.range_to_scale_zero_point(torch.tensor(-1.4), torch.tensor(0.7), full, True)
    assert float(zp) == 0 and abs(float(scale) - 0.2) < 1e-7  # amax / 7, as the narrow grid
    x = torch.tensor([-1.6, -1.5, 1.4, 1.5])
    codes = QF.quantize_codes(x, scale, zp, -8, 7, "midtread", 0)
    assert codes.tolist() == [-8, -8, 7, 7]  # -1.6 reaches the extra level instead of clipping at -1.4
    # files written before the field existed hold no key: they load as the narrow grid they used
    assert QuantSpec.from_dict({k: v for k, v in full.to_dict().items() if k != "narrow_range"}) == narrow


def test_narrow_range_must_be_a_bool():
    with pytest.raises(RecipeError, match="narrow_range"):
        QuantSpec(bits=4, narrow_range="no")
