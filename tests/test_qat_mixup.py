"""Mixed batches in QAT (``qat: {mix: mixup | cutmix, mix_alpha: α}``): the mixed batch, its losses, a run."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import lowbit
from lowbit.errors import LowbitError
from lowbit.qat.engine import distillation_loss, mix_batch, mixed_cross_entropy
from tests.test_qat_fixes import _calib, _data, _model, _recipe


def test_the_mixed_batch_is_lambda_x_plus_one_minus_lambda_x_permuted():
    x = torch.randn(16, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    y = torch.arange(16)
    torch.manual_seed(1)
    mixed, other, lam = mix_batch(x, y, "mixup", 0.4, seed=123)
    assert 0.0 <= lam <= 1.0
    perm = other  # the labels are the positions: y[π] is π
    assert sorted(perm.tolist()) == list(range(16))
    torch.testing.assert_close(mixed, lam * x + (1 - lam) * x[perm])
    torch.manual_seed(2)  # the global generator (seeded per process for dropout) does not move the draw
    again, other_again, lam_again = mix_batch(x, y, "mixup", 0.4, seed=123)
    assert lam_again == lam and torch.equal(other_again, other) and torch.equal(again, mixed)
    assert mix_batch(x, y, "mixup", 0.4, seed=124)[2] != lam


def test_cutmix_pastes_one_box_of_the_permuted_image_and_lambda_is_the_area_left():
    x = torch.arange(2 * 1 * 8 * 8, dtype=torch.float32).reshape(2, 1, 8, 8)
    y = torch.tensor([0, 1])
    for seed in range(30):
        mixed, other, lam = mix_batch(x, y, "cutmix", 1.0, seed=seed)
        src = x[[0, 1] if other.tolist() == [0, 1] else [1, 0]]
        pasted = mixed != x  # where the image took the other's pixels (all differ between the two images)
        if other.tolist() == [0, 1]:  # π is the identity: nothing changes, whatever λ says
            assert torch.equal(mixed, x)
            continue
        assert bool((mixed[pasted] == src[pasted]).all())
        rows, cols = pasted[0, 0].any(1).nonzero().flatten(), pasted[0, 0].any(0).nonzero().flatten()
        if len(rows):  # one solid box
            box = pasted[0, 0, rows.min():rows.max() + 1, cols.min():cols.max() + 1]
            assert bool(box.all()) and int(pasted[0, 0].sum()) == box.numel()
        assert lam == pytest.approx(1 - float(pasted[0, 0].float().mean()))


def test_cutmix_on_inputs_that_are_not_images_is_refused():
    with pytest.raises(LowbitError, match="cutmix cuts boxes from images"):
        mix_batch(torch.zeros(4, 10), torch.zeros(4), "cutmix", 1.0, seed=0)


def test_small_alpha_draws_lambda_near_zero_or_one():
    lams = [mix_batch(torch.zeros(2, 1), torch.zeros(2), "mixup", 0.05, seed=s)[2] for s in range(200)]
    assert sum(min(v, 1 - v) < 0.05 for v in lams) > 150  # Beta(0.05, 0.05) is U-shaped
    assert 0.3 < sum(v > 0.5 for v in lams) / 200 < 0.7  # and symmetric


def test_mixed_cross_entropy_is_the_lambda_weighted_sum_of_both_labels():
    logits = torch.randn(8, 5, generator=torch.Generator().manual_seed(3), requires_grad=True)
    y, other = torch.tensor([0, 1, 2, 3, 4, 0, 1, 2]), torch.tensor([4, 3, 2, 1, 0, 4, 3, 2])
    logp = F.log_softmax(logits, 1)
    by_hand = -(0.3 * logp[torch.arange(8), y] + 0.7 * logp[torch.arange(8), other]).mean()
    torch.testing.assert_close(mixed_cross_entropy(logits, y, (other, 0.3)), by_hand)
    torch.testing.assert_close(mixed_cross_entropy(logits, y, None), F.cross_entropy(logits, y))


def test_distillation_on_mixed_images_mixes_only_the_label_term():
    g = torch.Generator().manual_seed(4)
    student, teacher = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    y, other = torch.tensor([0, 1, 2, 3, 0, 1]), torch.tensor([3, 2, 1, 0, 3, 2])
    t = 2.0
    kl = (F.softmax(teacher / t, 1) * (F.log_softmax(teacher / t, 1) - F.log_softmax(student / t, 1))).sum(1).mean()
    torch.testing.assert_close(distillation_loss(student, teacher, y, t, 1.0, (other, 0.25)), kl * t * t)
    ce = 0.25 * F.cross_entropy(student, y) + 0.75 * F.cross_entropy(student, other)
    torch.testing.assert_close(distillation_loss(student, teacher, y, t, 0.5, (other, 0.25)), 0.5 * ce + 0.5 * kl * t * t)


def test_a_qat_run_with_mixed_batches_trains_and_its_checkpoint_refuses_another_alpha(tmp_path):
    runs = {}
    for mix in ("none", "mixup", "cutmix"):
        recipe = _recipe("lsq", "lsq+", 4, 4, epochs=2, mix=mix, mix_alpha=0.4, checkpoint=str(tmp_path / mix))
        qm = lowbit.quantize(_model(), recipe, calib=_calib(), train=_data(), progress=False)
        runs[mix] = qm.meta["qat"]["history"]
        assert all(math.isfinite(r["train_loss"]) for r in runs[mix])
    losses = {mix: h[0]["train_loss"] for mix, h in runs.items()}
    assert len(set(losses.values())) == 3, losses  # each option acts
    other = _recipe("lsq", "lsq+", 4, 4, epochs=2, mix="mixup", mix_alpha=0.2, checkpoint=str(tmp_path / "mixup"))
    with pytest.raises(LowbitError, match="mix_alpha"):
        lowbit.quantize(_model(), other, calib=_calib(), train=_data(), progress=False)


@pytest.mark.parametrize("params, name", [({"mix": "mixer"}, "mix"), ({"mix": "mixup", "mix_alpha": 0}, "mix_alpha")])
def test_bad_mix_settings_are_refused_by_name(params, name):
    with pytest.raises(LowbitError, match=name):
        lowbit.quantize(_model(), _recipe(**params), calib=_calib(), train=_data(), progress=False)
