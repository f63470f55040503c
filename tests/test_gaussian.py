"""μL2Q's optimal steps, derived in code, against DESIGN.md's reference table."""
import numpy as np
import pytest
import torch

from lowbit.quant.gaussian import (gaussian_mse, loss_vs_bits, optimal_binary_level, optimal_gaussian_step,
                                   optimal_ternary_level)

MIDRISE_STEP = {1: 1.5958, 2: 0.9957, 3: 0.5860, 4: 0.3352, 5: 0.1881, 6: 0.1041, 7: 0.0569, 8: 0.0308}
MIDRISE_MSE = {1: 0.3634, 2: 0.1189, 3: 0.03744, 4: 0.01154, 5: 0.003495, 6: 0.001040, 7: 3.04e-4, 8: 8.77e-5}
MIDTREAD_STEP = {2: 1.2240, 3: 0.6508, 4: 0.3534, 5: 0.1933, 6: 0.1055, 7: 0.0573, 8: 0.0309}


@pytest.mark.parametrize("bits", range(1, 9))
def test_midrise_step_and_mse_match_reference(bits):
    step, mse = optimal_gaussian_step(bits, "midrise")
    assert step == pytest.approx(MIDRISE_STEP[bits], abs=1.5e-4)
    assert mse == pytest.approx(MIDRISE_MSE[bits], rel=2e-3)


@pytest.mark.parametrize("bits", range(2, 9))
def test_midtread_step_matches_reference(bits):
    step, _ = optimal_gaussian_step(bits, "midtread")
    assert step == pytest.approx(MIDTREAD_STEP[bits], abs=1.5e-4)


def test_binary_and_ternary_optima():
    assert optimal_binary_level() == pytest.approx(0.7979, abs=1e-4)
    # The 1-bit mid-rise quantizer is the binary one: levels ±step/2.
    assert optimal_gaussian_step(1, "midrise")[0] / 2 == pytest.approx(optimal_binary_level(), abs=1e-5)
    a, threshold = optimal_ternary_level()
    assert a == pytest.approx(1.2240, abs=1e-4) and threshold == pytest.approx(0.6120, abs=1e-4)
    # TWN's heuristic threshold 0.7·E|w| is lower than the MSE-optimal one.
    twn = 0.7 * optimal_binary_level()
    assert twn == pytest.approx(0.5585, abs=1e-4)
    assert twn < threshold


def test_closed_form_mse_agrees_with_monte_carlo():
    x = torch.randn(2_000_000, generator=torch.Generator().manual_seed(0)).double().numpy()
    step = 0.5
    q = np.clip(np.floor(x / step), -4, 3)
    empirical = np.mean((x - (q + 0.5) * step) ** 2)
    assert gaussian_mse(step, 3, "midrise") == pytest.approx(empirical, rel=0.01)


def test_loss_vs_bits_is_decreasing():
    curve = loss_vs_bits(8)
    losses = [mse for _, _, mse in curve]
    assert [b for b, _, _ in curve] == list(range(1, 9))
    assert all(a > b for a, b in zip(losses, losses[1:]))
    # Each extra bit cuts the error by roughly 4x at high rates (6 dB per bit) - at least 3x here.
    assert all(a / b > 3 for a, b in zip(losses, losses[1:]))
