"""QDrop's mask and select: the right keep frequency, reproducible, and torch.where's gradients."""
import pytest
import torch

from lowbit.ptq.drop import keep_mask, select


@pytest.mark.parametrize("p", [0.3, 0.5, 0.9])
def test_keep_mask_frequency(p):
    m = keep_mask((16, 64, 32, 32), p, torch.Generator().manual_seed(1))
    assert m.dtype == torch.bool and m.shape == (16, 64, 32, 32)
    assert abs(m.float().mean().item() - p) < 0.003  # 1M draws: 6 standard deviations


def test_keep_mask_odd_size_edges_and_reproducibility():
    shape = (3, 5, 7)  # 105 elements: not a multiple of 4 draws per word
    assert keep_mask(shape, 1.0, torch.Generator()).all()
    assert not keep_mask(shape, 0.0, torch.Generator()).any()
    a = keep_mask(shape, 0.5, torch.Generator().manual_seed(7))
    b = keep_mask(shape, 0.5, torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    g = torch.Generator().manual_seed(7)
    assert not torch.equal(keep_mask((4096,), 0.5, g), keep_mask((4096,), 0.5, g))  # fresh draws each call


def test_select_matches_where_forward_and_backward():
    gen = torch.Generator().manual_seed(0)
    keep = keep_mask((4, 3, 5), 0.5, gen)
    a1, b1 = torch.randn(4, 3, 5, requires_grad=True), torch.randn(4, 3, 5, requires_grad=True)
    a2, b2 = a1.detach().clone().requires_grad_(), b1.detach().clone().requires_grad_()
    w = torch.randn(4, 3, 5)
    out1, out2 = select(keep, a1, b1), torch.where(keep, a2, b2)
    assert torch.equal(out1, out2)
    (out1 * w).sum().backward()
    (out2 * w).sum().backward()
    assert torch.equal(a1.grad, a2.grad) and torch.equal(b1.grad, b2.grad)
    assert torch.equal(a1.grad, torch.where(keep, w, torch.zeros_like(w)))
