"""QAT: trainable quantizers' forward and gradients against their formulas, BN trained and
folded, the loop's accuracy, resume and refusal, deployment of the trained model."""
from __future__ import annotations

import math

import pytest
import torch

import lowbit
from lowbit.errors import LowbitError, RecipeError
from lowbit.quant.gaussian import optimal_gaussian_step
from lowbit.quant.quantizer import UniformQuantizer
from lowbit.quant.registry import make_trainable
from lowbit.quant.spec import QuantSpec


def _uniform(bits=4, signed=True, symmetric=True, scale=0.1, zero_point=0.0, per_channel=False):
    q = UniformQuantizer(QuantSpec(bits=bits, signed=signed, symmetric=symmetric, per_channel=per_channel))
    q.signed = signed
    q.set_params(torch.tensor(scale), torch.tensor(zero_point))
    return q


def test_lsq_step_gradient_equals_the_paper_formula():
    src = _uniform(bits=3, scale=0.25)
    q = make_trainable(src, "lsq", "weights")
    x = torch.tensor([-2.0, -0.8, -0.3, 0.0, 0.12, 0.4, 0.6, 1.9])
    out = q(x)
    out.sum().backward()
    s, qmin, qmax = 0.25, -3, 3
    v = x / s
    inside = (v >= qmin) & (v <= qmax)
    # LSQ eq. 3: round(v/s) - v/s inside, qmin / qmax where clipped; times g = 1/sqrt(N*Qp).
    expected = torch.where(inside, torch.round(v) - v, torch.where(v < qmin, float(qmin), float(qmax)))
    g = 1 / math.sqrt(x.numel() * qmax)
    assert q.scale.grad.item() == pytest.approx(float(expected.sum()) * g, rel=1e-5)
    assert torch.allclose(out, torch.clamp(torch.round(v), qmin, qmax) * s)


def test_lsq_activation_gradient_scale_counts_features_per_sample():
    src = _uniform(bits=4, signed=False, symmetric=False, scale=0.1)
    q = make_trainable(src, "lsq", "activations")
    x = torch.rand(5, 3, 2, 2, requires_grad=True)
    q(x).sum().backward()
    v = x.detach() / 0.1
    expected = torch.where(v <= 15, torch.round(v) - v, torch.tensor(15.0)).sum()
    assert q.scale.grad.item() == pytest.approx(float(expected) / math.sqrt(12 * 15), abs=1e-5)
    assert torch.equal(x.grad, (v <= 15).float())  # straight through inside, 0 where clipped


def test_lsq_plus_learns_an_offset_only_on_affine_grids():
    affine = _uniform(bits=4, signed=False, symmetric=False, scale=0.1, zero_point=5.0)
    relu = _uniform(bits=4, signed=False, symmetric=False, scale=0.1, zero_point=0.0)
    assert isinstance(make_trainable(affine, "lsq+", "activations").zero_point, torch.nn.Parameter)
    assert not isinstance(make_trainable(relu, "lsq+", "activations").zero_point, torch.nn.Parameter)


def test_pact_gradient_flows_to_alpha_only_from_clipped_inputs():
    src = _uniform(bits=2, signed=False, symmetric=False, scale=0.5)  # alpha = 1.5
    q = make_trainable(src, "pact", "activations")
    assert q.alpha.item() == pytest.approx(1.5)
    x = torch.tensor([-1.0, 0.2, 0.7, 1.4, 1.5, 2.0, 3.0], requires_grad=True)
    out = q(x)
    upstream = torch.arange(1.0, 8.0)
    (out * upstream).sum().backward()
    clipped = x.detach() >= 1.5
    assert q.alpha.grad.item() == pytest.approx(float(upstream[clipped].sum()))  # PACT eq. 3
    assert torch.equal(x.grad, torch.where((x.detach() > 0) & ~clipped, upstream, torch.zeros(7)))
    assert torch.allclose(out, torch.round(torch.clamp(x.detach(), 0, 1.5) / 0.5) * 0.5)
    assert q.weight_decay_groups()[0][1] == pytest.approx(5e-4)


def test_pact_refuses_a_signed_input():
    with pytest.raises(RecipeError, match="lsq\\+"):
        make_trainable(_uniform(bits=4, signed=True), "pact", "activations")


@pytest.mark.parametrize("bits", [1, 2, 4])
def test_ul2q_forward_is_standardise_quantize_rescale(bits):
    torch.manual_seed(bits)
    w = (torch.randn(16, 8, 3, 3) * 0.07 + 0.003).requires_grad_()
    grid = "midrise" if bits == 1 else "midtread"
    q = make_trainable(_uniform(bits=max(bits, 2)) if bits > 1 else _midrise1(), "ul2q", "weights")
    out = q(w)
    sigma = w.detach().pow(2).mean().sqrt()  # spread about zero: the grid stays on zero
    alpha = optimal_gaussian_step(bits, "midrise")[0]
    phi = w.detach() / sigma
    codes = torch.clamp(torch.floor(phi / alpha), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    assert torch.allclose(out, (codes + 0.5) * alpha * sigma, atol=1e-7)
    assert len(torch.unique(out.detach())) <= 2**bits
    out.sum().backward()
    inside = (phi / alpha >= -(2 ** (bits - 1))) & (phi / alpha < 2 ** (bits - 1))
    assert torch.equal(w.grad, inside.float())  # straight through, 0 where clipped
    assert grid  # the 1-bit grid is the mid-rise one the quantizer forces


def test_ul2q_keeps_a_channel_mean_instead_of_dropping_it():
    """Dropping μ shifts every weight of a channel (ResNet-20 fell to 19% at 4 bits); about zero it stays."""
    w = torch.randn(4, 64) * 0.05 + torch.tensor([0.0, 0.03, -0.03, 0.01])[:, None]  # |μ| up to 0.6σ
    q = make_trainable(_uniform(bits=4, per_channel=True), "ul2q", "weights")
    out = q(w).detach()
    assert torch.allclose(out.mean(1), w.mean(1), atol=0.004)
    assert float((out - w).pow(2).mean() / w.pow(2).mean()) < 0.02  # 4-bit Gaussian MSE is ~0.01


def _midrise1():
    q = UniformQuantizer(QuantSpec(bits=1, grid="midrise"))
    q.signed = True
    q.set_params(torch.tensor(0.1), torch.tensor(0.0))
    return q


def test_dorefa_two_bit_weights_follow_eq_9():
    w = torch.tensor([[-0.5, -0.1, 0.0, 0.05, 0.3, 0.45]])
    q = make_trainable(_uniform(bits=2), "dorefa", "weights")
    t = torch.tanh(w)
    expected = (2 * torch.round((t / (2 * t.abs().max()) + 0.5) * 3) / 3 - 1) * w.abs().max()
    assert torch.allclose(q(w), expected)
    assert q.spec.grid == "midrise"


def test_trainable_kinds_are_checked_in_recipes():
    with pytest.raises(RecipeError, match="weights.quantizer must be one of"):
        lowbit.load_recipe({"extends": "w4a4", "weights": {"quantizer": "lsqq"}})
    with pytest.raises(RecipeError, match="activations only"):
        lowbit.load_recipe({"extends": "w4a4", "weights": {"quantizer": "pact"}})
    with pytest.raises(RecipeError, match="not options of quantizer 'lsq'"):
        lowbit.load_recipe({"extends": "w4a4", "weights": {"quantizer": "lsq", "quantizer_options": {"alpha": 1}}})
    with pytest.raises(RecipeError, match="kd"):
        lowbit.load_recipe({"extends": "w4a4-lsq", "steps": ["calibrate", {"qat": {"kd": {"temp": 2}}}]})


def test_qat_recipe_without_training_data_is_refused(mnist_cnn):
    model, calib, _ = mnist_cnn
    with pytest.raises(RecipeError, match="pass the training data"):
        lowbit.quantize(model, "w4a4-lsq", calib=calib, progress=False)
    with pytest.raises(LowbitError, match="no `qat` step"):
        lowbit.quantize(model, "w4a4", calib=calib, train=(calib, torch.zeros(len(calib))), progress=False)


@pytest.fixture(scope="module")
def mnist_train(data_dir):
    from lowbit.data import dataset_tensors, load_dataset

    train = load_dataset("mnist", "train", data_dir=data_dir, download=False)
    return dataset_tensors(train, torch.arange(4000))


def _qat_recipe(**qat):
    params = {"epochs": 2, "batch_size": 64, "lr": 0.01, "val_samples": 500, **qat}
    return {"extends": "w4a4", "name": "test-w2a2", "weights": {"bits": 2, "quantizer": "lsq"},
            "activations": {"bits": 2, "quantizer": "lsq+"}, "steps": ["calibrate", {"qat": params}]}


def _run_killed_after_its_first_checkpoint(monkeypatch, model, recipe, calib, train):
    """A QAT run "killed" (KeyboardInterrupt) right after it wrote its first checkpoint."""
    from lowbit.qat import engine

    real_save = engine.save_state

    def save_then_stop(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(engine, "save_state", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        lowbit.quantize(model, recipe, calib=calib, train=train, progress=False)
    monkeypatch.setattr(engine, "save_state", real_save)


def _top1(model, xy):
    with torch.no_grad():
        return float((model(xy[0]).argmax(1) == xy[1]).float().mean())


def test_short_qat_recovers_w2a2_accuracy_and_deploys_bit_exact(mnist_cnn, mnist_train, tmp_path):
    model, calib, test = mnist_cnn
    float_top1 = _top1(model.eval(), test)
    ptq = lowbit.quantize(model, {**_qat_recipe(), "steps": ["calibrate"]}, calib=calib, progress=False)
    qm = lowbit.quantize(model, _qat_recipe(), calib=calib, train=mnist_train, progress=False)
    ptq_top1, qat_top1 = _top1(ptq, test), _top1(qm, test)
    assert qat_top1 > ptq_top1 + 0.05
    assert qat_top1 > 0.9 * float_top1  # most of the float accuracy back at W2A2
    assert qm.meta["qat"]["best_epoch"] in (1, 2)
    assert all(r.layer.bn is None for r in qm.layers)  # BN folded back
    assert type(qm.layers[0].layer.weight_quantizer) is UniformQuantizer
    path = lowbit.save(qm, tmp_path / "qat.lowbit")
    back = lowbit.load(path, model=type(model)())
    assert torch.equal(back(test[0][:200]), qm(test[0][:200]))
    assert qm.layers[1].w_bits == 2 and len(torch.unique(qm.layers[1].layer.quantized_weight()[0])) <= 3


def test_bf16_channels_last_training_matches_fp32_and_deploys_float32_contiguous(mnist_cnn, mnist_train, tmp_path):
    model, calib, test = mnist_cnn
    small = (mnist_train[0][:3000], mnist_train[1][:3000])
    fp32 = lowbit.quantize(model, _qat_recipe(epochs=1, val_samples=500), calib=calib, train=small, progress=False)
    fast_recipe = _qat_recipe(epochs=1, val_samples=500, precision="bf16", channels_last=True,
                              checkpoint=str(tmp_path / "run"))
    fast = lowbit.quantize(model, fast_recipe, calib=calib, train=small, progress=False)
    assert abs(_top1(fast, test) - _top1(fp32, test)) < 0.02  # bf16 convolutions: the same training, to noise
    assert _top1(fast, test) > _top1(model.eval(), test) - 0.05
    for name, p in list(fast.named_parameters()) + list(fast.named_buffers()):
        assert p.dtype != torch.bfloat16 and p.is_contiguous(), name  # deployed in float32, usual layout
    assert fast(test[0][:8]).dtype == torch.float32
    fingerprint = (tmp_path / "run" / "state.json").read_text()
    assert '"precision": "bf16"' in fingerprint and '"channels_last": true' in fingerprint
    layer = fast.layers[1].layer  # under autocast only the convolution runs in bf16: its output is float32 again
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert layer(torch.rand(2, layer.module.in_channels, 8, 8)).dtype == torch.float32


@pytest.mark.parametrize("name", ["w3a32-kmeans-ft", "w1a1-xnor", "w1a2-hwgq", "w2a2-lqnet", "w5a32-inq", "w2a32-ttq"])
def test_every_quantizer_kind_trains_in_bf16_channels_last_without_warnings(mnist_cnn, mnist_train, name):
    import warnings

    from lowbit.recipes.recipe import load_recipe

    model, calib, test = mnist_cnn
    source = load_recipe(name).source
    steps = [{"qat": {**{k: v for k, v in s["qat"].items() if k != "freeze_bn_after"},  # (W1A1's 29 > 1 epoch)
                      "epochs": 1, "steps_per_epoch": 2, "val_samples": 200, "precision": "bf16",
                      "channels_last": True}} if isinstance(s, dict) and "qat" in s else s for s in source["steps"]]
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # e.g. torch's "non-contiguous input" performance warnings
        qm = lowbit.quantize(model, {**source, "steps": steps, "name": name}, calib=calib[:256],
                             train=(mnist_train[0][:1000], mnist_train[1][:1000]), progress=False)
    assert qm(test[0][:4]).dtype == torch.float32
    assert all(p.is_contiguous() for p in qm.parameters())


def test_an_fp32_run_keeps_the_fingerprint_of_runs_written_before_precision_existed(mnist_cnn, mnist_train, tmp_path):
    import json

    model, calib, _ = mnist_cnn
    small = (mnist_train[0][:800], mnist_train[1][:800])
    lowbit.quantize(model, _qat_recipe(epochs=1, val_samples=200, steps_per_epoch=2, checkpoint=str(tmp_path / "r")),
                    calib=calib, train=small, progress=False)
    text = (tmp_path / "r" / "state.json").read_text()
    assert '"precision"' not in text and '"channels_last"' not in text and '"snap_at_freeze"' not in text
    spelled_out = _qat_recipe(epochs=1, val_samples=200, steps_per_epoch=2, checkpoint=str(tmp_path / "r"),
                              precision="fp32", channels_last=False, snap_at_freeze=False, ema=0.0)
    again = lowbit.quantize(model, spelled_out, calib=calib, train=small, progress=False)  # the off values: resumes
    assert again.meta["qat"]["history"][0]["seconds"] == json.loads(text)["history"][0]["seconds"]
    with pytest.raises(LowbitError, match="precision: checkpoint 'fp32', now 'bf16'"):
        lowbit.quantize(model, {**spelled_out, "steps": ["calibrate", {"qat": {**spelled_out["steps"][1]["qat"],
                                                                              "precision": "bf16"}}]},
                        calib=calib, train=small, progress=False)


def test_the_kept_epoch_is_the_latest_within_one_standard_error_of_the_best():
    from lowbit.qat.checkpoint import TrainingState
    from lowbit.qat.engine import keeps_epoch

    def after(vals, rule="within_error", n=5000):
        state = TrainingState(best={"w": torch.zeros(1)}, best_val=-1.0)
        kept = 0
        for epoch, v in enumerate(vals, 1):
            state.history.append({"val_top1": v})
            if keeps_epoch(rule, v, state, n):
                state.best_val, state.best_epoch, kept = v, epoch, epoch
        return kept

    seed1 = [97.32, 98.10, 98.32, 98.62, 98.60]  # a measured W4A4 run: one standard error at 98.62 % of 5,000 is 0.166
    assert after(seed1) == 5 and after(seed1, "best") == 4
    assert after([98.62, 98.40]) == 1  # 0.22 below: outside the error, the earlier epoch stays
    assert after([98.62, 98.40], n=1000) == 2  # 1,000 images resolve only ±0.37 pt
    assert after([90.0, 91.0, 90.9, 95.0, 94.0]) == 4  # the error is measured from the highest so far
    assert after([100.0, 99.98]) == 1 and after([100.0, 100.0]) == 2  # p = 1: no error, ties go to the later
    assert keeps_epoch("best", 10.0, TrainingState(best=None, best_val=50.0, history=[{"val_top1": 10.0}]), 100)


def test_qat_select_is_checked_and_old_checkpoints_resume_under_best(mnist_cnn, mnist_train, tmp_path):
    import json

    model, calib, _ = mnist_cnn
    small = (mnist_train[0][:800], mnist_train[1][:800])
    with pytest.raises(RecipeError, match="select"):
        lowbit.quantize(model, _qat_recipe(epochs=1, select="last"), calib=calib, train=small, progress=False)
    recipe = _qat_recipe(epochs=1, val_samples=200, steps_per_epoch=2, checkpoint=str(tmp_path / "r"), select="best")
    lowbit.quantize(model, recipe, calib=calib, train=small, progress=False)
    text = (tmp_path / "r" / "state.json").read_text()
    assert "select" not in json.loads(text)["fingerprint"]["qat"]  # "best": how runs chose before the option existed
    with pytest.raises(LowbitError, match="select: checkpoint 'best', now 'within_error'"):
        lowbit.quantize(model, _qat_recipe(epochs=1, val_samples=200, steps_per_epoch=2,
                                           checkpoint=str(tmp_path / "r")), calib=calib, train=small, progress=False)
    again = lowbit.quantize(model, recipe, calib=calib, train=small, progress=False)
    assert again.meta["qat"]["history"][0]["seconds"] == json.loads(text)["history"][0]["seconds"]


def test_a_checkpoint_written_before_narrow_range_existed_resumes(mnist_cnn, mnist_train, tmp_path):
    import json

    model, calib, _ = mnist_cnn
    small = (mnist_train[0][:800], mnist_train[1][:800])
    recipe = _qat_recipe(epochs=1, val_samples=200, steps_per_epoch=2, checkpoint=str(tmp_path / "r"))
    lowbit.quantize(model, recipe, calib=calib, train=small, progress=False)
    path = tmp_path / "r" / "state.json"
    side = json.loads(path.read_text())
    for part in ("weights", "activations"):  # as written before the option existed (it was always narrow then)
        assert side["fingerprint"]["recipe"][part].pop("narrow_range") is True
    path.write_text(json.dumps(side))
    again = lowbit.quantize(model, recipe, calib=calib, train=small, progress=False)  # resumes: nothing retrained
    assert again.meta["qat"]["history"][0]["seconds"] == side["history"][0]["seconds"]
    side["fingerprint"]["recipe"]["weights"]["narrow_range"] = False
    path.write_text(json.dumps(side))
    with pytest.raises(LowbitError, match="weights.narrow_range: checkpoint False, now True"):
        lowbit.quantize(model, recipe, calib=calib, train=small, progress=False)


def test_qat_model_runs_the_same_in_onnx_runtime(mnist_cnn, mnist_train, tmp_path):
    pytest.importorskip("onnxruntime")
    model, calib, test = mnist_cnn
    recipe = _qat_recipe(epochs=1)
    recipe["weights"]["bits"] = recipe["activations"]["bits"] = 4
    qm = lowbit.quantize(model, recipe, calib=calib, train=mnist_train, progress=False)
    path = lowbit.export_onnx(qm, tmp_path / "qat.onnx", test[0][:1])
    onnx_model = lowbit.OnnxModel(path, threads=1)
    logits = onnx_model(test[0][:500])
    agree = (logits.argmax(1) == qm(test[0][:500]).argmax(1)).float().mean()
    assert agree > 0.99


def test_folded_batchnorm_starts_as_the_folded_layer(mnist_cnn):
    from lowbit.qat.convert import to_deployed_form, to_training_form

    model, calib, test = mnist_cnn
    qm = lowbit.quantize(model, "w4a4", calib=calib, progress=False)
    before = qm(test[0][:100])
    info = to_training_form(qm, "lsq", "lsq+", batches=[calib])
    assert info["batchnorms"] == 3
    qm.eval()
    assert torch.allclose(qm(test[0][:100]), before, atol=1e-4)
    qm.train()
    train_out = qm(calib[:256])  # batch statistics: close to the running ones on the same data
    qm.eval()
    assert (train_out.argmax(1) == qm(calib[:256]).argmax(1)).float().mean() > 0.95
    trained_form = qm(test[0][:100])  # the training forward moved the running statistics
    to_deployed_form(qm)
    assert torch.allclose(qm(test[0][:100]), trained_form, atol=1e-4)


def test_kill_and_resume_ends_with_identical_weights(mnist_cnn, mnist_train, tmp_path):
    model, calib, _ = mnist_cnn
    small = (mnist_train[0][:1500], mnist_train[1][:1500])
    straight = lowbit.quantize(model, _qat_recipe(epochs=2, val_samples=300), calib=calib, train=small, progress=False)
    ckpt = tmp_path / "run"
    first = _qat_recipe(epochs=2, val_samples=300, checkpoint=str(ckpt))
    # "Killed" after epoch 1: a run that stops there leaves the checkpoint of epoch 1.
    from lowbit.qat import engine

    calls = {"n": 0}
    original = engine.save_state

    def save_then_die(*args, **kwargs):
        original(*args, **kwargs)
        calls["n"] += 1
        raise KeyboardInterrupt

    engine.save_state = save_then_die
    try:
        with pytest.raises(KeyboardInterrupt):
            lowbit.quantize(model, first, calib=calib, train=small, progress=False)
    finally:
        engine.save_state = original
    assert calls["n"] == 1 and (ckpt / "state.json").is_file() and (ckpt / "metrics.jsonl").read_text().count("\n") == 1
    moved = tmp_path / "moved"  # a folder moved (or brought back from another machine) still resumes
    ckpt.rename(moved)
    ckpt = moved
    reworded = {**_qat_recipe(epochs=2, val_samples=300, checkpoint=str(moved)),
                "description": "the same recipe, described differently"}  # prose does not refuse a resume
    resumed = lowbit.quantize(model, reworded, calib=calib, train=small, progress=False)
    for (k, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), k
    assert (ckpt / "metrics.jsonl").read_text().count("\n") == 2
    other = _qat_recipe(epochs=2, val_samples=300, checkpoint=str(ckpt), lr=0.02)
    with pytest.raises(LowbitError, match="another recipe or other qat settings .*lr"):
        lowbit.quantize(model, other, calib=calib, train=small, progress=False)
    fewer = (mnist_train[0][:1200], mnist_train[1][:1200])  # another epoch length: another lr schedule
    with pytest.raises(LowbitError, match="trained on other data .train_samples: checkpoint 1200, now 900"):
        lowbit.quantize(model, reworded, calib=calib, train=fewer, progress=False)


def test_stochastic_sampling_is_seeded_per_step_so_a_resumed_run_draws_the_same(mnist_cnn, mnist_train, tmp_path,
                                                                                monkeypatch):
    """Stochastic BinaryConnect draws from the global generator, seeded from (seed, step) before every step:
    a killed run resumed without its saved generator state (a GPU's is not saved) ends where the
    uninterrupted one does."""
    model, calib, _ = mnist_cnn
    small = (mnist_train[0][:1000], mnist_train[1][:1000])

    def recipe(**qat):
        return {"extends": "w4a4", "name": "test-bc-stochastic", "overrides": [{"pattern": "*", "a_bits": 32}],
                "quantize_adds": False, "weights": {"bits": 1, "grid": "midrise", "quantizer": "binaryconnect",
                                                    "quantizer_options": {"stochastic": True}},
                "steps": ["calibrate", {"qat": {"epochs": 2, "batch_size": 64, "lr": 0.002, "val_samples": 200,
                                                "steps_per_epoch": 4, **qat}}]}

    straight = lowbit.quantize(model, recipe(), calib=calib, train=small, progress=False)
    again = lowbit.quantize(model, recipe(), calib=calib, train=small, progress=False)
    ckpt = str(tmp_path / "run")
    _run_killed_after_its_first_checkpoint(monkeypatch, model, recipe(checkpoint=ckpt), calib, small)
    # As on a GPU, whose generator the checkpoint does not hold: the saved CPU generator state is not restored.
    monkeypatch.setattr(torch, "set_rng_state", lambda state: None)
    resumed = lowbit.quantize(model, recipe(checkpoint=ckpt), calib=calib, train=small, progress=False)
    monkeypatch.undo()
    weights = [k for k in straight.state_dict() if k.endswith("weight")]
    for k in weights:
        assert torch.equal(straight.state_dict()[k], again.state_dict()[k]), k
        assert torch.allclose(straight.state_dict()[k], resumed.state_dict()[k], atol=1e-6), k


def test_a_run_killed_between_its_tensors_and_its_json_resumes_from_the_previous_epoch(mnist_cnn, mnist_train,
                                                                                        monkeypatch, tmp_path):
    import lowbit.state_io as state_io

    model, calib, _ = mnist_cnn
    small = (mnist_train[0][:1500], mnist_train[1][:1500])
    recipe = _qat_recipe(epochs=2, val_samples=300, steps_per_epoch=5, checkpoint=str(tmp_path / "run"))
    straight = lowbit.quantize(model, _qat_recipe(epochs=2, val_samples=300, steps_per_epoch=5), calib=calib,
                               train=small, progress=False)
    real_write = state_io.atomic_write_text

    def die_before_the_second_json(path, text):
        if path.name == "state.json" and '"epoch": 2' in text:
            raise KeyboardInterrupt  # epoch 2's tensors are on disk, its state.json is not
        real_write(path, text)

    monkeypatch.setattr(state_io, "atomic_write_text", die_before_the_second_json)
    with pytest.raises(KeyboardInterrupt):
        lowbit.quantize(model, recipe, calib=calib, train=small, progress=False)
    monkeypatch.setattr(state_io, "atomic_write_text", real_write)
    assert {p.name for p in (tmp_path / "run").glob("state*.safetensors")} == {"state-1.safetensors",
                                                                               "state-2.safetensors"}
    resumed = lowbit.quantize(model, recipe, calib=calib, train=small, progress=False)  # epoch 2 again, from epoch 1
    for (k, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), k
    assert sorted(p.name for p in (tmp_path / "run").glob("state*.safetensors")) == ["state-2.safetensors"]


@pytest.mark.parametrize("text", ["{not json", "[1, 2]"])
def test_an_unreadable_state_json_is_refused_with_the_folder_named(tmp_path, text):
    from lowbit.qat.checkpoint import load_state

    (tmp_path / "state.json").write_text(text)
    model = torch.nn.Linear(2, 1)
    with pytest.raises(LowbitError, match=f"cannot read QAT checkpoint {tmp_path}.*delete the folder"):
        load_state(tmp_path, model, torch.optim.SGD(model.parameters(), lr=0.1), {})


def test_a_checkpoint_naming_a_file_outside_its_folder_is_refused(tmp_path):
    from lowbit.state_io import committed_tensors

    assert committed_tensors(tmp_path, {}, "state.safetensors") == tmp_path / "state.safetensors"
    assert committed_tensors(tmp_path, {"tensors": "state-3.safetensors"}, "x") == tmp_path / "state-3.safetensors"
    for bad in ("../state-3.safetensors", "/etc/passwd", "", 7):
        with pytest.raises(ValueError, match="not a file in the folder"):
            committed_tensors(tmp_path, {"tensors": bad}, "state.safetensors")


def test_weight_average_follows_its_recursion_and_restores_the_live_state():
    from lowbit.qat.ema import WeightAverage

    layer = torch.nn.Linear(2, 1)
    layer.register_buffer("count", torch.tensor(0))
    with torch.no_grad():
        layer.weight.fill_(1.0)
    average = WeightAverage(layer, 0.9)
    expected = torch.ones(1, 2)
    for step, value in enumerate([3.0, -1.0, 5.0, 2.0, 2.0, 7.0, 0.5, 1.0, 4.0, -2.0, 6.0, 3.0]):
        with torch.no_grad():
            layer.weight.fill_(value)
            layer.count.fill_(step)
        average.update(step)
        d = min(0.9, (1 + step) / (10 + step))  # the ramp, then the decay
        expected = d * expected + (1 - d) * value
    assert torch.allclose(average.shadow["weight"], expected, atol=1e-6)
    assert int(average.shadow["count"]) == 11  # integer state is copied, not averaged
    with average.applied(layer):
        assert torch.allclose(layer.weight, expected)
    assert torch.all(layer.weight == 3.0)
    with pytest.raises(ValueError, match="does not fit"):
        WeightAverage(torch.nn.Linear(3, 1), 0.9, shadow=average.shadow)
    layer.weight = torch.nn.Parameter(torch.full((1, 2), 10.0))  # a rebound parameter is followed, not the old one
    average.update(100)
    assert torch.allclose(average.shadow["weight"], 0.9 * expected + 0.1 * 10.0)


def test_qat_with_a_weight_average_keeps_it_and_resumes_it(mnist_cnn, mnist_train, tmp_path):
    from lowbit.qat import engine

    model, calib, _ = mnist_cnn
    small = (mnist_train[0][:1500], mnist_train[1][:1500])
    short = {"val_samples": 300, "steps_per_epoch": 6, "lr": 0.05}
    plain = lowbit.quantize(model, _qat_recipe(**short), calib=calib, train=small, progress=False)
    straight = lowbit.quantize(model, _qat_recipe(ema=0.9, **short), calib=calib, train=small, progress=False)
    w_plain, w_avg = plain.state_dict(), straight.state_dict()
    assert any(not torch.allclose(w_plain[k], w_avg[k]) for k in w_plain if w_plain[k].is_floating_point())
    ckpt = tmp_path / "run"
    original = engine.save_state

    def save_then_die(*args, **kwargs):
        original(*args, **kwargs)
        raise KeyboardInterrupt

    engine.save_state = save_then_die
    try:
        with pytest.raises(KeyboardInterrupt):
            lowbit.quantize(model, _qat_recipe(ema=0.9, checkpoint=str(ckpt), **short), calib=calib, train=small,
                            progress=False)
    finally:
        engine.save_state = original
    resumed = lowbit.quantize(model, _qat_recipe(ema=0.9, checkpoint=str(ckpt), **short), calib=calib, train=small,
                              progress=False)
    for k, v in resumed.state_dict().items():
        assert torch.allclose(v, w_avg[k], atol=1e-6), k


def test_distillation_changes_the_loss_and_keeps_training(mnist_cnn, mnist_train):
    from lowbit.qat.engine import distillation_loss

    s, t, y = torch.randn(4, 10), torch.randn(4, 10), torch.tensor([1, 2, 3, 4])
    kl = torch.nn.functional.kl_div(torch.log_softmax(s / 2, 1), torch.softmax(t / 2, 1), reduction="batchmean")
    expected = 0.7 * torch.nn.functional.cross_entropy(s, y) + 0.3 * 4 * kl
    assert distillation_loss(s, t, y, 2.0, 0.3).item() == pytest.approx(expected.item(), rel=1e-6)
    model, calib, test = mnist_cnn
    small = (mnist_train[0][:1500], mnist_train[1][:1500])
    qm = lowbit.quantize(model, _qat_recipe(epochs=1, val_samples=300, kd={"temperature": 4, "weight": 0.5}),
                         calib=calib, train=small, progress=False)
    assert _top1(qm, test) > 0.5


class _ConstantTeacher(torch.nn.Module):
    """Predicts one class whatever the input: a student distilled from it alone must follow it."""

    def __init__(self, classes: int, favoured: int) -> None:
        super().__init__()
        self.logits = torch.full((classes,), -5.0)
        self.logits[favoured] = 5.0

    def forward(self, x):
        return self.logits.expand(x.shape[0], -1)


def test_a_given_teacher_is_the_one_distilled_from(mnist_cnn, mnist_train):
    model, calib, test = mnist_cnn
    small = (mnist_train[0][:1500], mnist_train[1][:1500])
    recipe = _qat_recipe(epochs=1, val_samples=300)
    params = {"epochs": 1, "batch_size": 64, "lr": 0.02, "val_samples": 300, "kd": {"temperature": 1.0, "weight": 1.0}}
    qm = lowbit.quantize(model, dict(recipe, steps=["calibrate"]), calib=calib, progress=False)
    lowbit.train_qat(qm, small, recipe=recipe, config=params, teacher=_ConstantTeacher(10, 3), progress=False)
    with torch.no_grad():
        share = float((qm(test[0]).argmax(1) == 3).float().mean())
    assert share > 0.9  # the float model's own teacher would keep ~10% of the images in class 3

    qm = lowbit.quantize(model, dict(recipe, steps=["calibrate"]), calib=calib, progress=False)
    with pytest.raises(LowbitError, match="same classes"):
        lowbit.train_qat(qm, small, recipe=recipe, config=params, teacher=_ConstantTeacher(5, 0), progress=False)
    with pytest.raises(LowbitError, match="distillation is off"):
        lowbit.train_qat(qm, small, recipe=recipe, config=dict(params, kd={}), teacher=_ConstantTeacher(10, 0),
                         progress=False)
    with pytest.raises(RecipeError, match="not a zoo model.*resnet32"):
        lowbit.load_recipe(_qat_recipe(kd={"weight": 1.0, "teacher": "resnet-32"}))


def test_cli_train_with_a_qat_recipe_resumes_and_saves(mnist_cnn, data_dir, tmp_path, capsys):
    from lowbit.cli import main
    from lowbit.zoo import save_weights

    model, _, _ = mnist_cnn
    weights = save_weights(model, tmp_path / "float.safetensors")
    args = ["train", "--model", "small_cnn", "--weights", str(weights), "--recipe", "w4a4-lsq", "--epochs", "1",
            "--train-limit", "1500", "--val-samples", "300", "--batch-size", "64", "--data-dir", str(data_dir),
            "--checkpoint", str(tmp_path / "run"), "--save", str(tmp_path / "m.lowbit"), "--no-progress",
            "--test-limit", "500"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert "kept epoch 1/1 by validation on 300 training images (within_error)" in first and (tmp_path / "m.lowbit").is_file()
    assert (tmp_path / "run" / "state.json").is_file()
    assert main(args) == 0  # the same command again: the finished checkpoint is reused, not retrained
    again = capsys.readouterr().out
    assert first.split("test top-1")[1].split("%")[0] == again.split("test top-1")[1].split("%")[0]
    assert main(args[:-2] + ["--lr", "0.05"]) == 2
    assert "written with another recipe or other qat settings" in capsys.readouterr().err
    assert main(args + ["--precision", "bf16", "--channels-last"]) == 2  # the flags reach the qat step
    assert "precision: checkpoint 'fp32', now 'bf16'" in capsys.readouterr().err
    assert main(["train", "--model", "small_cnn", "--weights", str(weights), "--recipe", "w4a4",
                 "--data-dir", str(data_dir)]) == 2
    assert "has no `qat` step" in capsys.readouterr().err
    assert main(["train", "--model", "small_cnn", "--weights", str(weights), "--recipe", "w2a32-ul2q",
                 "--kd-teacher", "small_cnn", "--data-dir", str(data_dir)]) == 2
    assert "--kd-teacher needs distillation on" in capsys.readouterr().err


def test_lsq_step_pushed_through_zero_keeps_quantizing_and_learning():
    q = make_trainable(_uniform(bits=4, signed=False, symmetric=False, scale=0.1), "lsq", "activations")
    with torch.no_grad():
        q.scale.fill_(-0.1)  # an optimiser step overshot zero
    x = torch.linspace(0, 2, 11)
    out = q(x)
    assert torch.allclose(out, torch.clamp(torch.round(x / 0.1), 0, 15) * 0.1)  # quantizes with |step|
    out.sum().backward()
    assert q.scale.grad.abs().item() > 0  # and the step still gets a gradient


@pytest.mark.parametrize("epochs, after, expected", [(1, -1, 0.75), (2, -1, 1.0), (3, -1, 2.0), (4, -1, 3.0),
                                                    (5, -1, 4.0), (30, -1, 22.0), (30, 29, 29.0)])
def test_bn_freezes_at_three_quarters_and_always_before_the_last_epoch_ends(epochs, after, expected):
    """Round-half-to-even put a 2-epoch run's default freeze at epoch 2 of 2: never frozen."""
    from lowbit.qat.engine import QATConfig

    assert QATConfig.from_params({"epochs": epochs, "freeze_bn_after": after}).bn_freeze_epoch == expected


def test_a_one_epoch_run_trains_bn_for_three_quarters_of_its_steps(mnist_cnn, mnist_train, monkeypatch):
    """Freezing BN from the first step left 1-bit ResNet-20 at chance; a 1-epoch run freezes at 3/4."""
    import lowbit.qat.engine as engine

    model, calib, _ = mnist_cnn
    steps, frozen_after = [0], []
    real_step, real_freeze = torch.optim.SGD.step, engine.freeze_batchnorms

    def counted_step(self, *args, **kwargs):
        steps[0] += 1
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", counted_step)
    monkeypatch.setattr(engine, "freeze_batchnorms", lambda qm: (frozen_after.append(steps[0]), real_freeze(qm)))
    small = (mnist_train[0][:1500], mnist_train[1][:1500])
    qm = lowbit.quantize(model, _qat_recipe(epochs=1, val_samples=300, steps_per_epoch=8), calib=calib,
                         train=small, progress=False)
    assert steps[0] == 8 and frozen_after == [6]  # 6 of 8 steps with batch statistics, then frozen
    assert qm.meta["qat"]["history"][0]["bn_frozen"] is True
    frozen_after.clear()
    with pytest.warns(UserWarning, match="freeze_bn_after 1 is not below epochs 1: BN statistics never freeze"):
        lowbit.quantize(model, _qat_recipe(epochs=1, val_samples=300, steps_per_epoch=4, freeze_bn_after=1),
                        calib=calib, train=small, progress=False)
    assert frozen_after == []


def test_snap_at_freeze_snaps_once_at_the_freeze_and_a_resumed_run_does_not_again(mnist_cnn, mnist_train, monkeypatch,
                                                                                  tmp_path):
    import lowbit.qat.engine as engine

    model, calib, _ = mnist_cnn
    steps, snaps, stop_at = [0], [], [10]
    real_step, real_snap = torch.optim.SGD.step, engine.snap_latent_weights

    def counted_step(self, *args, **kwargs):
        steps[0] += 1
        if steps[0] == stop_at[0]:
            raise KeyboardInterrupt  # Ctrl-C in epoch 3: epochs 1-2 are in the checkpoint
        return real_step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", counted_step)
    monkeypatch.setattr(engine, "snap_latent_weights", lambda qm: (snaps.append(steps[0]), real_snap(qm))[1])
    small = (mnist_train[0][:1500], mnist_train[1][:1500])
    recipe = {**_qat_recipe(epochs=3, val_samples=300, steps_per_epoch=4, freeze_bn_after=1, snap_at_freeze=True,
                            checkpoint=str(tmp_path / "run")),
              "weights": {"bits": 2, "quantizer": "twn"}}
    with pytest.raises(KeyboardInterrupt):
        lowbit.quantize(model, recipe, calib=calib, train=small, progress=False)
    assert snaps == [4]  # before the first step of epoch 2, when BN froze
    assert '"snap_at_freeze": true' in (tmp_path / "run" / "state.json").read_text()
    snaps.clear()
    stop_at[0] = -1
    qm = lowbit.quantize(model, recipe, calib=calib, train=small, progress=False)  # resumes in epoch 3, BN frozen
    assert snaps == [] and len(qm.meta["qat"]["history"]) == 3 and qm.meta["qat"]["history"][2]["bn_frozen"]


def test_snap_at_freeze_snaps_the_weight_average_too_and_keeps_the_live_state(mnist_cnn, mnist_train, monkeypatch):
    """With ``ema`` the average is what is validated and kept: its latents must be snapped at the freeze too, or the
    kept model's ternary latents sit at their thresholds as before (snapping an already snapped state is a no-op)."""
    from lowbit.qat.convert import snap_latent_weights
    from lowbit.qat.ema import WeightAverage

    model, calib, _ = mnist_cnn
    seen = []
    real_transform = WeightAverage.transform

    def checked_transform(self, qm, edit):
        live = {k: v.clone() for k, v in qm.state_dict().items()}
        before = {k: v.clone() for k, v in self.shadow.items()}
        real_transform(self, qm, edit)
        assert all(torch.equal(v, live[k]) for k, v in qm.state_dict().items())  # the live state is restored
        moved = [k for k in self.shadow if not torch.equal(self.shadow[k], before[k])]
        with self.applied(qm):
            snapped = {k: v.clone() for k, v in qm.state_dict().items()}
            snap_latent_weights(qm)
            again = [k for k, v in qm.state_dict().items() if not torch.allclose(v, snapped[k], atol=1e-6)]
        seen.append((moved, again))

    monkeypatch.setattr(WeightAverage, "transform", checked_transform)
    small = (mnist_train[0][:1500], mnist_train[1][:1500])
    recipe = {**_qat_recipe(epochs=2, val_samples=300, steps_per_epoch=4, freeze_bn_after=1, snap_at_freeze=True,
                            ema=0.9, lr=0.05),
              "weights": {"bits": 2, "quantizer": "twn"}}
    lowbit.quantize(model, recipe, calib=calib, train=small, progress=False)
    assert len(seen) == 1
    moved, again = seen[0]
    assert any(k.endswith("weight") for k in moved)  # the average's latents were snapped ...
    assert again == []  # ... to values that snapping again leaves where they are


def test_a_branch_before_the_freeze_equals_the_run_from_scratch_and_a_late_one_is_refused(mnist_cnn, mnist_train,
                                                                                         monkeypatch, tmp_path):
    model, calib, _ = mnist_cnn
    small = (mnist_train[0][:1500], mnist_train[1][:1500])

    def twn(**qat):
        return {**_qat_recipe(epochs=3, val_samples=300, steps_per_epoch=4, **qat),
                "weights": {"bits": 2, "quantizer": "twn"}}

    def run_one_epoch(recipe):
        _run_killed_after_its_first_checkpoint(monkeypatch, model, recipe, calib, small)

    source = tmp_path / "late-freeze"
    run_one_epoch(twn(freeze_bn_after=2, checkpoint=str(source)))
    straight = lowbit.quantize(model, twn(freeze_bn_after=1, snap_at_freeze=True), calib=calib, train=small,
                               progress=False)
    branch = tmp_path / "early-freeze-snapped"
    branched = lowbit.quantize(model, twn(freeze_bn_after=1, snap_at_freeze=True, branch_from=str(source),
                                          checkpoint=str(branch)), calib=calib, train=small, progress=False)
    for (k, a), (_, b) in zip(straight.state_dict().items(), branched.state_dict().items()):
        assert torch.allclose(a, b, atol=1e-6), k
    assert branched.meta["qat"]["branched_from"] == {"folder": str(source), "epoch": 1}
    assert [r["bn_frozen"] for r in branched.meta["qat"]["history"]] == [False, True, True]
    import json
    source_epoch = json.loads((source / "metrics.jsonl").read_text().splitlines()[0])
    assert branched.meta["qat"]["history"][0]["seconds"] == source_epoch["seconds"]  # epoch 1 was not recomputed
    assert '"branched_from"' in (branch / "state.json").read_text()
    # Only BN-freeze settings may differ, and only before either run freezes.
    with pytest.raises(LowbitError, match="another recipe or other qat settings .*lr"):
        lowbit.quantize(model, twn(freeze_bn_after=2, lr=0.02, branch_from=str(source), checkpoint=str(tmp_path / "a")),
                        calib=calib, train=small, progress=False)
    with pytest.raises(LowbitError, match="at epoch 1, past this run's BN freeze"):
        lowbit.quantize(model, twn(freeze_bn_after=0, branch_from=str(source), checkpoint=str(tmp_path / "b")),
                        calib=calib, train=small, progress=False)
    early = tmp_path / "frozen-from-the-start"
    run_one_epoch(twn(freeze_bn_after=0, checkpoint=str(early)))
    with pytest.raises(LowbitError, match="past the source run's BN freeze"):
        lowbit.quantize(model, twn(freeze_bn_after=2, branch_from=str(early), checkpoint=str(tmp_path / "c")),
                        calib=calib, train=small, progress=False)
    with pytest.raises(LowbitError, match="no QAT checkpoint there"):
        lowbit.quantize(model, twn(branch_from=str(tmp_path / "nothing"), checkpoint=str(tmp_path / "d")),
                        calib=calib, train=small, progress=False)


def test_a_branch_keeps_the_best_epoch_from_before_its_branch_point_when_resumed(tmp_path):
    """The source run's best came before the branch point: the branch's folder must hold that model too,
    or a branch killed and rerun would forget it (best_val -1) and keep a worse epoch."""
    from lowbit.qat.checkpoint import TrainingState, load_state, save_state

    torch.manual_seed(0)
    net = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    fingerprint = {"recipe": {}, "qat": {"epochs": 6}}
    best = {k: v.clone() for k, v in net.state_dict().items()}
    source, branch = tmp_path / "source", tmp_path / "branch"
    state = TrainingState(epoch=2, best_val=80.0, best_epoch=2, best=best, history=[{}, {}])
    save_state(source, net, opt, state, fingerprint)
    with torch.no_grad():
        net.weight.add_(1.0)  # epoch 3 moved the weights and scored lower: best stays epoch 2
    state.epoch, state.history = 3, [{}, {}, {}]
    save_state(source, net, opt, state, fingerprint)
    at_branch = load_state(source, net, opt, fingerprint)
    save_state(branch, net, opt, at_branch, fingerprint)  # what lowbit.qat.engine does at the branch point
    resumed = load_state(branch, net, opt, fingerprint)
    assert (resumed.epoch, resumed.best_epoch, resumed.best_val) == (3, 2, 80.0)
    assert all(torch.equal(resumed.best[k], best[k]) for k in best)


def test_non_finite_bn_running_statistics_stop_training_with_the_layer_named():
    from lowbit.errors import NumericalError
    from lowbit.qat.bn import FoldedBatchNorm
    from lowbit.qat.engine import check_bn_statistics, trained_batchnorms

    net = torch.nn.Module()
    net.block = torch.nn.Module()
    net.block.bn = FoldedBatchNorm(torch.zeros(4), torch.ones(4), torch.zeros(4))
    check_bn_statistics(trained_batchnorms(net), 0, 0)  # finite: nothing happens
    net.block.bn.running_var[2] = float("inf")
    with pytest.raises(NumericalError, match=r"'block'.*epoch 4, step 17"):
        check_bn_statistics(trained_batchnorms(net), 3, 17)


def test_fused_batchnorm_path_equals_the_explicit_expression():
    """The single-process path (torch's batch_norm on z = y0·σ/γ) against the explicit one
    DDP uses: outputs, gradients and running statistics, a negative γ and a γ = 0 channel included."""
    from lowbit.qat.bn import FoldedBatchNorm

    torch.manual_seed(3)
    mean, var, bias = torch.randn(5), torch.rand(5) + 0.2, torch.randn(5)
    y0 = (torch.randn(8, 5, 6, 6) * 3 + 1).double()
    results = []
    for path in ("_normalise_native", "_normalise_global"):
        bn = FoldedBatchNorm(mean, var, bias).double()
        with torch.no_grad():
            bn.gamma[1] = -bn.gamma[1]
            bn.gamma[3] = 0.0
        y = y0.clone().requires_grad_()
        out = getattr(bn, path)(y)
        (out * torch.linspace(-1, 2, out.numel(), dtype=out.dtype).reshape(out.shape)).sum().backward()
        results.append((out.detach(), y.grad, bn.gamma.grad, bn.beta.grad, bn.running_mean.clone(), bn.running_var.clone()))
    (o1, gy1, gg1, gb1, m1, v1), (o2, gy2, gg2, gb2, m2, v2) = results
    for a, b in ((o1, o2), (gy1, gy2), (gb1, gb2), (m1, m2), (v1, v2)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    live = torch.tensor([True, True, True, False, True])
    torch.testing.assert_close(gg1[live], gg2[live], rtol=1e-9, atol=1e-9)  # γ = 0: outputs β on both paths
    assert m1[3] == mean.double()[3] and v1[3] == var.double()[3]  # γ = 0: statistics kept, not updated
    assert not torch.equal(m1[0], mean.double()[0])  # a live channel's statistics moved


def _trained_form_w2a2(model, calib, weight_kind="lsq"):
    from lowbit.qat.convert import to_training_form

    weights = {"bits": 1, "grid": "midrise"} if weight_kind == "binaryconnect" else {"bits": 2}
    qm = lowbit.quantize(model, {"extends": "w4a4", "name": "t", "weights": weights, "activations": {"bits": 2}},
                         calib=calib, progress=False)
    to_training_form(qm, weight_kind, "lsq+", batches=[calib])
    return qm


@pytest.mark.parametrize("weight_kind", ["twn", "xnor", "binaryconnect"])
def test_snapping_latent_weights_keeps_the_forward_and_leaves_them_at_their_fixed_point(mnist_cnn, weight_kind):
    from lowbit.qat.convert import freeze_batchnorms, snap_latent_weights, to_training_form

    model, calib, _ = mnist_cnn
    weights = {"bits": 2} if weight_kind == "twn" else {"bits": 1, "grid": "midrise"}
    qm = lowbit.quantize(model, {"extends": "w4a4", "name": "t", "weights": weights, "activations": {"bits": 8}},
                         calib=calib, progress=False)
    to_training_form(qm, weight_kind, "lsq+", batches=[calib])
    torch.manual_seed(0)
    with torch.no_grad():
        for r in qm.layers:
            if r.layer.bn is not None:  # BN factors away from 1, one negative
                r.layer.bn.gamma.mul_(torch.rand_like(r.layer.bn.gamma) + 0.5)
                r.layer.bn.gamma[0] = -r.layer.bn.gamma[0]
            r.layer.module.weight.add_(torch.randn_like(r.layer.module.weight) * 1e-3)  # latents off the grid
    freeze_batchnorms(qm)
    qm.train()
    before = qm(calib).detach()
    latent_before = {r.name: r.layer.module.weight.detach().clone() for r in qm.layers}
    quantized_before = {r.name: r.layer.quantized_weight().detach().clone() for r in qm.layers}
    snapped = snap_latent_weights(qm)
    # the 8-bit first/last layers train as LSQ, which is not snapped
    assert snapped == [r.name for r in qm.layers][1:-1] and snapped
    for r in qm.layers:  # the weights the layers compute with: unchanged up to float rounding of (w/f)·f
        torch.testing.assert_close(r.layer.quantized_weight(), quantized_before[r.name], rtol=1e-6, atol=1e-8)
    # (that rounding moves a few 8-bit activation codes by one step downstream: the logits of a few
    # images move by about one step of a layer's input times its weights, the rest not at all; the
    # exact images depend on the CPU's convolution kernels: 1e-2 was exceeded by 1e-4 on one machine; and on
    # float-level changes upstream: match_moments' float64 targets moved XNOR's share from 1.95% to 3.3%)
    moved = (qm(calib).detach() - before).abs()
    assert float((moved.amax(1) > 1e-4).float().mean()) < 0.05, "more than a few images' logits moved"
    assert float(moved.max()) < 3e-2
    for r in qm.layers:
        layer, w = r.layer, r.layer.module.weight
        if r.name not in snapped:
            assert torch.equal(w, latent_before[r.name])
            continue
        assert not torch.equal(w, latent_before[r.name])
        f = layer.bn.weight_factor().reshape([-1] + [1] * (w.dim() - 1))
        torch.testing.assert_close(layer.quantized_weight() / f, w, rtol=1e-5, atol=1e-7)  # a fixed point


@pytest.mark.parametrize("weight_kind", ["lsq", "uniform", "binaryconnect"])
def test_weight_step_follows_the_bn_factor_so_running_variance_ignores_gamma(mnist_cnn, weight_kind):
    """The running variance estimates var(conv(x, Q(W))) before BN; with a weight step that
    did not scale with γ/σ it depended on γ (a feedback loop that ran to inf at ResNet-20 W2A2
    with learned steps, with the fixed min-max grid at 1 and 2 bits and with BinaryConnect's
    calibrated level)."""
    model, calib, _ = mnist_cnn
    runs = []
    for gamma_scale in (1.0, 0.2):
        qm = _trained_form_w2a2(model, calib, weight_kind)
        layer = qm.layers[1].layer
        assert layer.bn_factor_follows()
        with torch.no_grad():
            layer.bn.gamma.mul_(gamma_scale)
        qm.train()
        for _ in range(60):
            with torch.no_grad():
                qm(calib)
        runs.append(layer.bn.running_var.clone())
    assert torch.isfinite(runs[1]).all()
    assert torch.allclose(runs[0], runs[1], rtol=1e-4)


@pytest.mark.parametrize("weight_kind", ["lsq", "uniform", "binaryconnect"])
def test_deployed_form_keeps_a_trained_bn_factor_and_its_bias_grid(mnist_cnn, weight_kind):
    from lowbit.qat.convert import to_deployed_form

    model, calib, test = mnist_cnn
    qm = _trained_form_w2a2(model, calib, weight_kind)
    torch.manual_seed(3)
    with torch.no_grad():  # a BN whose factor γ/σ is far from 1, some channels negative
        for r in qm.layers:
            if r.layer.bn is not None:
                bn = r.layer.bn
                bn.gamma.mul_(torch.empty_like(bn.gamma).uniform_(0.3, 3.0))
                bn.gamma[0] = -bn.gamma[0]
                bn.running_var.mul_(torch.empty_like(bn.running_var).uniform_(0.5, 2.0))
    qm.eval()
    trained = qm(test[0][:200])
    steps = {r.name: r.layer.weight_step().detach().clone() for r in qm.layers if r.layer.bn is not None}
    to_deployed_form(qm)
    assert torch.allclose(qm(test[0][:200]), trained, atol=1e-4)
    for r in qm.layers:
        if r.name in steps:
            assert torch.allclose(r.layer.weight_quantizer.scale.reshape(-1), steps[r.name].reshape(-1))


@pytest.mark.parametrize("role,bits,grid,per_channel,zero_point", [
    ("weights", 4, "midtread", True, 0.0), ("weights", 2, "midrise", True, 0.0),
    ("activations", 4, "midtread", False, 3.0), ("activations", 2, "midtread", False, 0.0),
])
def test_lsq_fused_op_equals_the_autograd_chain(monkeypatch, role, bits, grid, per_channel, zero_point):
    """The one-op LSQ fake-quant gives the chain's values and gradients (x, step, and the BN factor's step)."""
    import lowbit.quant.functional as F

    signed = role == "weights"
    spec = QuantSpec(bits=bits, signed=signed, symmetric=signed, per_channel=per_channel, grid=grid)
    src = UniformQuantizer(spec)
    src.signed = signed
    channels = 6
    scale = torch.linspace(0.05, 0.2, channels) if per_channel else torch.tensor(0.1)
    src.set_params(scale, torch.full_like(scale, zero_point))
    torch.manual_seed(0)
    x0 = torch.randn(channels, 4, 3, 3) * 0.3 if role == "weights" else torch.rand(5, channels, 4, 4) * 2 - 0.3
    x0[0, 0, 0, 0] = 0.25  # values on the boundaries of a code and of the range
    runs = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(F, "lsq_fake_quantize", lambda *a, **k: None)
        q = make_trainable(src, "lsq", role)
        x = x0.clone().requires_grad_(True)
        w = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
        (q(x) * w).sum().backward()
        runs.append((q(x0).detach(), x.grad, q.scale.grad))
    (out_f, gx_f, gs_f), (out_c, gx_c, gs_c) = runs
    assert torch.equal(out_f, out_c)
    assert torch.equal(gx_f == 0, gx_c == 0)  # the same elements clipped
    assert torch.allclose(gx_f, gx_c, rtol=1e-6, atol=0)  # the chain's w·s/s rounds; the op passes w
    assert torch.allclose(gs_f, gs_c, rtol=1e-5, atol=1e-7)


def test_clip_grad_norm_bounds_each_step(mnist_cnn, mnist_train, monkeypatch):
    """With clip_grad_norm set, the optimizer sees a gradient of at most that norm (and the unclipped one otherwise)."""
    model, calib, _ = mnist_cnn
    norms = {}
    original = torch.optim.SGD.step

    def spy(self, *a, **k):  # noqa: ANN001, ANN202
        grads = [p.grad.detach().flatten() for g in self.param_groups for p in g["params"] if p.grad is not None]
        norms.setdefault(self.defaults["lr"], []).append(float(torch.cat(grads).norm()))
        return original(self, *a, **k)

    monkeypatch.setattr(torch.optim.SGD, "step", spy)
    for lr, clip in ((0.01, 0.0), (0.02, 0.05)):  # the lr tells the two runs apart in `norms`
        lowbit.quantize(model, _qat_recipe(epochs=1, steps_per_epoch=4, lr=lr, clip_grad_norm=clip),
                        calib=calib, train=mnist_train, progress=False)
    assert max(norms[0.01]) > 0.05  # the unclipped W2A2 gradient is larger than the cap
    assert max(norms[0.02]) <= 0.05 * (1 + 1e-4)
    with pytest.raises(RecipeError, match="clip_grad_norm"):
        lowbit.load_recipe(_qat_recipe(clip_grad_norm=-1))


def test_qat_starts_from_a_gptq_result_and_the_builtin_composes_it(mnist_cnn, mnist_train):
    """w4a4-gptq-lsq: GPTQ + bias correction, then QAT (distillation only). The PTQ steps
    before `qat` are its starting point: the trained model scores at least what it started at."""
    model, calib, test = mnist_cnn
    recipe = lowbit.load_recipe("w4a4-gptq-lsq")
    assert [name for name, _ in recipe.steps] == ["calibrate", "gptq", "bias_correction", "qat"]
    assert recipe.steps[-1][1]["kd"]["weight"] == 1.0
    start = lowbit.quantize(model, {"extends": "w4a4-gptq-lsq", "steps": ["calibrate", "gptq", "bias_correction"]},
                            calib=calib, progress=False)
    short = {"extends": "w4a4-gptq-lsq", "steps": ["calibrate", "gptq", "bias_correction",
                                                   {"qat": {"epochs": 1, "batch_size": 64, "val_samples": 500,
                                                            "kd": {"weight": 1.0}}}]}
    qm = lowbit.quantize(model, short, calib=calib, train=mnist_train, progress=False)
    assert qm.meta["qat"]["epochs"] == 1
    assert _top1(qm, test) >= _top1(start, test) - 0.01


@pytest.mark.parametrize("name, before", [
    ("w3a3-gptq-lsq", [("calibrate", {"observe": "float"}), ("gptq", {"target": "float"}), ("bias_correction", {})]),
    ("w2a2-gptq-lsq", [("calibrate", {}), ("gptq", {"target": "float"}), ("bias_correction", {})]),
    ("w2a2-lqnet", [("calibrate", {}), ("gptq", {"target": "float", "regrid": True})])])
def test_the_gptq_start_qat_builtins_run_the_steps_their_figures_were_measured_with(name, before):
    """Each description quotes a 30-epoch ResNet-20 run (README, QAT results); these are that run's steps."""
    recipe = lowbit.load_recipe(name)
    assert recipe.steps[:-1] == before
    qat = recipe.steps[-1]
    assert qat[0] == "qat" and qat[1]["epochs"] == 30 and qat[1]["kd"] == {"temperature": 4.0, "weight": 1.0}
    if name == "w2a2-lqnet":  # LQ-Nets' initial basis (s/2, s) is the 2-bit mid-rise grid: GPTQ's result is its start
        assert (recipe.weights.quantizer, recipe.weights.spec.grid, recipe.weights.spec.bits) == ("lqnet", "midrise", 2)


def test_dampening_weight_rises_from_zero_to_its_final_value_on_a_half_cosine():
    from lowbit.qat.dampen import dampening_weight

    assert dampening_weight(0.1, 0, 100) == 0.0
    assert dampening_weight(0.1, 50, 100) == pytest.approx(0.05)
    assert dampening_weight(0.1, 25, 100) == pytest.approx(0.1 * (1 - math.cos(math.pi / 4)) / 2)
    assert dampening_weight(0.1, 100, 100) == pytest.approx(0.1)
    assert dampening_weight(0.0, 50, 100) == 0.0


def _dampening_layer(mnist_cnn, weight_kind):
    """Layer 1 of the MNIST CNN in training form at 2 bits (LQ-Nets and LSQ: the 4-level mid-rise grid), its BN
    factors moved away from 1 and one made negative."""
    from lowbit.qat.convert import to_training_form

    model, calib, _ = mnist_cnn
    weights = {"bits": 2, "grid": "midtread" if weight_kind.startswith("twn") else "midrise"}
    if weight_kind == "twn-fullrange":  # the calibrated grid [−2, 1]: TWN's codes are still −1, 0, 1
        weights["narrow_range"] = False
    qm = lowbit.quantize(model, {"extends": "w4a4", "name": "t", "weights": weights, "activations": {"bits": 8}},
                         calib=calib, progress=False)
    to_training_form(qm, weight_kind.split("-")[0], "lsq+", batches=[calib])
    layer = qm.layers[1].layer
    torch.manual_seed(0)
    with torch.no_grad():
        layer.bn.gamma.mul_(torch.rand_like(layer.bn.gamma) + 0.5)
        layer.bn.gamma[0] = -layer.bn.gamma[0]
    qm.train()
    return qm, layer


def _grid_ends(layer, weight_kind, wf):
    """The grid's outer levels per channel, found without lowbit.qat.dampen: LSQ's quantizer saturated by huge
    inputs, TWN's ±α from its formula (α = mean |w| over |w| > 0.7·mean|w|), LQ-Nets' ±(v1 + v2)."""
    q = layer.weight_quantizer
    shape = [-1] + [1] * (wf.dim() - 1)
    with torch.no_grad():
        if weight_kind == "lsq":
            big = torch.ones_like(wf) * 1e6
            f = layer.bn.weight_factor()
            return q.quantize_folded(-big, f).amin((1, 2, 3)).reshape(shape), q.quantize_folded(big, f).amax(
                (1, 2, 3)).reshape(shape)
        if weight_kind.startswith("twn"):
            a = wf.abs().reshape(wf.shape[0], -1)
            keep = a > 0.7 * a.mean(1, keepdim=True)
            alpha = (a * keep).sum(1) / keep.sum(1)
            return -alpha.reshape(shape), alpha.reshape(shape)
        top = q.basis.sum(1)
        return -top.reshape(shape), top.reshape(shape)


@pytest.mark.parametrize("weight_kind", ["lsq", "twn", "twn-fullrange", "lqnet"])
def test_dampening_gradient_pulls_each_latent_weight_to_its_level_inside_the_grid_only(mnist_cnn, weight_kind):
    """∂/∂W of ‖sg(Q(W·f)) − clip(W·f, lo, hi)‖² is 2·(W·f − Q)·f between the grid's outer levels lo/hi and 0
    beyond them (Nagel et al. 2022 eq. 6), f = γ/σ held still. lo/hi are the grid's, not the levels in use."""
    from lowbit.qat.dampen import dampening_loss

    qm, layer = _dampening_layer(mnist_cnn, weight_kind)
    w = layer.module.weight
    if weight_kind == "lsq":  # channel 1 inside its grid: it uses only the inner levels, yet its clip is the grid's
        with torch.no_grad():
            w[1].mul_(0.15)
    f = layer.bn.weight_factor().detach().reshape([-1] + [1] * (w.dim() - 1))
    layer.weight_quantizer.eval()  # (in training mode LQ-Nets would refit its basis while quantizing)
    with torch.no_grad():
        wf = w * f
        q = layer.quantized_weight()
    layer.weight_quantizer.train()
    lo, hi = _grid_ends(layer, weight_kind, wf)
    inside = (wf >= lo) & (wf <= hi)
    assert (~inside).any() and inside.any()  # both cases occur in this layer
    if weight_kind == "lsq":  # channel 1 leaves its outer levels unused: the clip must not stop at its inner ones
        assert float(q[1].abs().max()) < float(hi[1].abs()) - 1e-9
    basis = layer.weight_quantizer.basis.clone() if weight_kind == "lqnet" else None
    loss = dampening_loss([layer])
    torch.testing.assert_close(loss, (q - wf.clamp(min=lo, max=hi)).pow(2).sum(), rtol=1e-5, atol=1e-8)
    w.grad = None
    loss.backward()
    expected = torch.where(inside, 2 * (wf - q) * f, torch.zeros_like(w))
    torch.testing.assert_close(w.grad, expected, rtol=1e-4, atol=1e-8)
    assert layer.bn.gamma.grad is None  # BN's scale is not pulled
    assert layer.weight_quantizer.training  # the target is taken in eval mode, the mode restored
    if basis is not None:  # nor does taking it refit LQ-Nets' basis
        assert torch.equal(layer.weight_quantizer.basis, basis)


def test_dampening_target_of_stochastic_binaryconnect_is_its_deterministic_sign(mnist_cnn):
    from lowbit.qat.convert import to_training_form
    from lowbit.qat.dampen import dampening_loss

    model, calib, _ = mnist_cnn
    qm = lowbit.quantize(model, {"extends": "w4a4", "name": "t", "weights": {"bits": 1, "grid": "midrise"},
                                 "activations": {"bits": 8}}, calib=calib, progress=False)
    to_training_form(qm, "binaryconnect", "lsq+", {"stochastic": True}, batches=[calib])
    qm.train()
    layer = qm.layers[1].layer
    torch.manual_seed(0)
    sampled = [layer.quantized_weight().detach() for _ in range(2)]
    assert not torch.equal(*sampled)  # the training forward samples
    losses = [float(dampening_loss([layer]).detach()) for _ in range(3)]
    assert losses[0] == losses[1] == losses[2] > 0


def test_qat_with_dampening_logs_its_weight_and_changes_the_training(mnist_cnn, mnist_train, tmp_path):
    import json

    model, calib, test = mnist_cnn
    results = {}
    for dampen in (0.0, 50.0):
        folder = tmp_path / f"d{dampen}"
        qm = lowbit.quantize(model, _qat_recipe(epochs=1, steps_per_epoch=6, dampen=dampen, checkpoint=str(folder)),
                             calib=calib, train=mnist_train, progress=False)
        results[dampen] = qm(test[0][:256]).detach()
        row = json.loads((folder / "metrics.jsonl").read_text().splitlines()[-1])
        assert row.get("dampen_weight") == (pytest.approx(dampen) if dampen else None)
    assert not torch.allclose(results[0.0], results[50.0])
    with pytest.raises(RecipeError, match="dampen"):
        lowbit.load_recipe(_qat_recipe(dampen=-0.1))


def test_the_logged_training_loss_is_the_task_loss_without_the_dampening_term(mnist_cnn, mnist_train, tmp_path,
                                                                              monkeypatch):
    """A dampening term of 1e6 (constant, so training is unchanged) must not show in train_loss."""
    import json

    import lowbit.qat.engine as engine

    model, calib, _ = mnist_cnn
    logged = {}
    for name, fake in (("plain", None), ("damped", lambda layers: torch.tensor(1e6))):
        if fake is not None:
            monkeypatch.setattr(engine, "dampening_loss", fake)
        folder = tmp_path / name
        lowbit.quantize(model, _qat_recipe(epochs=1, steps_per_epoch=3, dampen=1.0 if fake else 0.0,
                                           checkpoint=str(folder)), calib=calib, train=mnist_train, progress=False)
        logged[name] = json.loads((folder / "metrics.jsonl").read_text().splitlines()[-1])["train_loss"]
    assert logged["damped"] == pytest.approx(logged["plain"], rel=1e-6)
