"""QAT defects found in review, each pinned by a small synthetic run (no dataset needed):
tensors made on the wrong device, k-means and LQ-Nets under DDP, train_qat's config handling,
the BN freeze of very short runs, INQ's validated-vs-deployed model, and error messages."""
from __future__ import annotations

import json
import os
import sys
import warnings

import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

import lowbit
from lowbit.errors import LowbitError, RecipeError
from lowbit.quant.quantizer import UniformQuantizer
from lowbit.quant.registry import make_trainable
from lowbit.quant.spec import QuantSpec


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.b1(self.c1(x)))
        x = torch.relu(self.b2(self.c2(x)))
        return self.fc(x.mean((2, 3)))


def _data(n: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=g)
    y = (x[:, 0, :4].mean((1, 2)) > 0).long() + 2 * (x[:, 0, 4:].mean((1, 2)) > 0).long()
    return x, y


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    m = _Net().train()
    with torch.no_grad():  # BNs with non-trivial statistics
        for _ in range(5):
            m(_data(64, 99)[0])
    return m.eval()


def _recipe(wq: str = "lsq", aq: str = "lsq+", wbits: int = 2, abits: int = 4, weights: dict | None = None,
            pre: tuple[str, ...] = (), **qat) -> dict:
    params = {"epochs": 2, "batch_size": 32, "lr": 0.01, "val_samples": 64, **qat}
    return {"extends": "w4a4", "name": "t", "weights": {"bits": wbits, "quantizer": wq, **(weights or {})},
            "activations": {"bits": abits, "quantizer": aq}, "steps": ["calibrate", *pre, {"qat": params}]}


def _calib() -> list[torch.Tensor]:
    return [_data(128, 5)[0]]


def _source(bits: int, signed: bool, per_channel: bool = False, grid: str = "midtread") -> UniformQuantizer:
    q = UniformQuantizer(QuantSpec(bits=bits, signed=signed, symmetric=signed, per_channel=per_channel, grid=grid))
    q.signed = signed
    shape = (4,) if per_channel else ()
    q.set_params(torch.full(shape, 0.1), torch.zeros(shape))
    q.calibrated = True
    return q


# -- 1. every tensor on the source's device -------------------------------------------------------
@pytest.mark.parametrize("kind, role, bits, signed, per_channel, grid", [
    ("lqnet", "weights", 2, True, True, "midrise"), ("lqnet", "activations", 2, False, False, "midtread"),
    ("ttq", "weights", 2, True, False, "midtread"), ("inq", "weights", 3, True, False, "midtread")])
def test_trainable_kinds_make_their_tensors_where_their_source_is(kind, role, bits, signed, per_channel, grid):
    """train_qat moves the model to the training device before it builds the trainable quantizers:
    a tensor a kind makes without a device lands on the default device (the CPU) beside a GPU model.
    Here the default device is meta and the source on the CPU: whatever a kind makes on its own
    shows up on meta (or fails), in building, training and eval forwards, and deployment."""
    w = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    source = _source(bits, signed, per_channel, grid)
    x = w if role == "weights" else torch.rand(2, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    with torch.device("meta"):
        q = make_trainable(source, kind, role, weight=w if role == "weights" else None)
        where = {n: t.device.type for n, t in [*q.named_buffers(), *q.named_parameters()]}
        assert set(where.values()) == {"cpu"}, where
        q.train()
        assert q(x).device.type == "cpu"
        q.eval()
        assert q(x).device.type == "cpu"
        deployed = q.deploy(w if role == "weights" else None)
        assert deployed.centroids.device.type == "cpu"
        if role == "weights":
            assert q.deployed_weight(w).device.type == "cpu"


@pytest.mark.parametrize("kind, bits, per_channel, grid", [("lqnet", 2, True, "midrise"), ("inq", 3, False, "midtread")])
def test_trainable_kinds_built_from_a_meta_source_hold_only_meta_tensors(kind, bits, per_channel, grid):
    q = make_trainable(_source(bits, True, per_channel, grid).to("meta"), kind, "weights", weight=torch.randn(4, 3))
    assert {t.device.type for t in [*q.buffers(), *q.parameters()]} == {"meta"}


def _calibrated(recipe: dict | None = None):
    base = {**(recipe or _recipe()), "steps": ["calibrate"]}
    return lowbit.quantize(_model(), base, calib=_calib(), progress=False), base


def test_dampening_grid_ends_are_made_on_the_weights_device():
    from lowbit.qat.convert import to_training_form
    from lowbit.qat.dampen import dampened_layers, dampening_loss

    qm, _ = _calibrated()
    to_training_form(qm, "lsq", "lsq+")
    with torch.device("meta"):
        loss = dampening_loss(dampened_layers(qm))
    assert loss.device.type == "cpu" and torch.isfinite(loss)


def test_a_swapped_in_quantizer_is_moved_to_the_device_of_the_one_it_replaces(monkeypatch):
    """Whatever a kind builds, convert's swap puts it where the model is (here meta: a CPU-built
    quantizer stands in for a kind that missed a tensor)."""
    import lowbit.qat.convert as convert

    qm, _ = _calibrated()
    qm.to("meta")
    real = convert.make_trainable

    def built_on_the_cpu(q, kind, role, weight=None, **options):  # noqa: ANN001, ANN202
        twin = _source(q.spec.bits, q.signed, q.spec.per_channel, q.spec.grid)
        if q.spec.per_channel:
            twin.set_params(torch.full(tuple(q.scale.shape), 0.1), torch.zeros(tuple(q.scale.shape)))
        twin.name = q.name
        return real(twin, kind, role, **options)

    monkeypatch.setattr(convert, "make_trainable", built_on_the_cpu)
    old = qm.layers[1].layer.weight_quantizer
    convert._swap(qm, old, "lsq", "weights", {}, {})
    new = qm.layers[1].layer.weight_quantizer
    assert new is not old and {t.device.type for t in [*new.buffers(), *new.parameters()]} == {"meta"}


# -- 2. and 4. under two gloo processes -------------------------------------------------------------
def _ddp_worker(rank: int, world: int, folder: str, recipe: dict) -> None:
    import torch.distributed as dist
    from safetensors.torch import save_file

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world)
    try:
        try:
            qm = lowbit.quantize(_model(), recipe, calib=_calib(), train=_data(), progress=False)
            save_file({k: v.detach().clone().contiguous() for k, v in qm.state_dict().items()},
                      os.path.join(folder, f"rank{rank}.safetensors"))
            result = "ok"
        except Exception as e:  # noqa: BLE001 - reported to the test
            result = f"{type(e).__name__}: {e}"
        with open(os.path.join(folder, f"rank{rank}.txt"), "w") as f:
            f.write(result)
    finally:
        dist.destroy_process_group()


def _two_processes(tmp_path, recipe: dict) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    mp.spawn(_ddp_worker, args=(2, str(tmp_path), recipe), nprocs=2, join=True)
    results = [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)]
    assert results == ["ok", "ok"], results
    return load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))


@pytest.mark.skipif(sys.platform == "win32", reason="file:// rendezvous")
def test_kmeans_centroid_fine_tuning_trains_under_two_processes(tmp_path):
    """Its forward reads only the centroids: the latent weight, left in training, got no gradient and
    DDP (no find_unused_parameters) stopped the second step."""
    r0, r1 = _two_processes(tmp_path, _recipe("kmeans", "lsq+", 2, 4, pre=("kmeans",)))
    assert set(r0) == set(r1) and all(torch.equal(r0[k], r1[k]) for k in r0)


def test_kmeans_leaves_its_latent_weights_out_of_training_and_gives_them_back_deployed(monkeypatch):
    import lowbit.qat.engine as engine

    seen = {}
    real = engine.make_optimizer

    def spy(qm, cfg):  # noqa: ANN001, ANN202
        opt = real(qm, cfg)
        inner = qm.layers[1].layer
        in_opt = {id(p) for g in opt.param_groups for p in g["params"]}
        seen.update(requires_grad=inner.module.weight.requires_grad, in_optimizer=id(inner.module.weight) in in_opt,
                    centroids=id(inner.weight_quantizer.centroids) in in_opt)
        return opt

    monkeypatch.setattr(engine, "make_optimizer", spy)
    qm = lowbit.quantize(_model(), _recipe("kmeans", "lsq+", 2, 4, pre=("kmeans",), epochs=1), calib=_calib(),
                         train=_data(), progress=False)
    assert seen == {"requires_grad": False, "in_optimizer": False, "centroids": True}
    assert all(r.layer.module.weight.requires_grad for r in qm.layers)


@pytest.mark.skipif(sys.platform == "win32", reason="file:// rendezvous")
def test_lqnet_activation_bases_are_the_same_on_every_process(tmp_path):
    """Each process fitted the basis on its own shard: after the last step every rank validated,
    kept and returned its own codebooks."""
    r0, r1 = _two_processes(tmp_path, _recipe("lsq", "lqnet", 2, 2, epochs=1))
    books = [k for k in r0 if k.endswith("centroids")]
    assert books
    differ = [k for k in r0 if not torch.equal(r0[k], r1[k])]
    assert differ == []


# -- 3. train_qat(config=QATConfig(...)) ------------------------------------------------------------
def test_a_qatconfig_takes_epochs_and_overrides_and_is_checked():
    from lowbit.qat.engine import QATConfig

    qm, base = _calibrated()
    out = lowbit.train_qat(qm, _data(), 1, config=QATConfig(batch_size=32, val_samples=64, schedule="constant"),
                           recipe=base, progress=False, lr=0.05)
    assert out.meta["qat"]["epochs"] == 1 and len(out.meta["qat"]["history"]) == 1
    assert out.meta["qat"]["history"][0]["lr"] == pytest.approx(0.05)
    qm, base = _calibrated()
    with pytest.raises(RecipeError, match="lr"):
        lowbit.train_qat(qm, _data(), 1, config=QATConfig(batch_size=32, val_samples=64), recipe=base,
                         progress=False, lr=-1.0)
    qm, base = _calibrated()
    with pytest.raises(RecipeError, match="optimizer"):
        lowbit.train_qat(qm, _data(), 1, config=QATConfig(batch_size=32, val_samples=64, optimizer="lbfgs"),
                         recipe=base, progress=False)


def test_a_qatconfig_with_kd_gets_its_defaults_and_trains():
    from lowbit.qat.engine import QATConfig

    assert QATConfig(kd={"weight": 1.0}).kd == {"temperature": 4.0, "weight": 1.0}
    qm, base = _calibrated()
    out = lowbit.train_qat(qm, _data(), 1, config=QATConfig(batch_size=32, val_samples=64, kd={"weight": 1.0}),
                           recipe=base, progress=False)
    assert len(out.meta["qat"]["history"]) == 1


# -- 5. the BN freeze of a 1-epoch run of one or two steps -----------------------------------------
def test_the_freeze_step_is_before_the_last_step_when_a_freeze_is_meant():
    from lowbit.qat.engine import QATConfig

    assert [QATConfig(epochs=1).freeze_step(p) for p in (1, 2, 3, 8)] == [1, 1, 2, 6]  # (one step: no room)
    assert QATConfig(epochs=1, freeze_bn_after=1).freeze_step(2) == 2  # asked never to freeze
    assert QATConfig(epochs=3).freeze_step(1) == 2


def test_a_one_epoch_run_of_two_steps_freezes_bn_before_its_last_step(monkeypatch):
    import lowbit.qat.engine as engine

    frozen = []
    real = engine.freeze_batchnorms
    monkeypatch.setattr(engine, "freeze_batchnorms", lambda qm: (frozen.append(True), real(qm)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a freeze happens: nothing to warn about
        qm = lowbit.quantize(_model(), _recipe(epochs=1), calib=_calib(), train=_data(64 + 64), progress=False)
    assert frozen and qm.meta["qat"]["history"][0]["bn_frozen"] is True


def test_a_run_of_one_step_says_its_bn_never_freezes():
    with pytest.warns(UserWarning, match="1 training step.*too few to freeze BN"):
        qm = lowbit.quantize(_model(), _recipe(epochs=1), calib=_calib(), train=_data(64 + 32), progress=False)
    assert qm.meta["qat"]["history"][0]["bn_frozen"] is False


# -- 6. INQ: the validated model is the deployed one -----------------------------------------------
@pytest.mark.parametrize("ema", [0.0, 0.9])
def test_inq_validates_and_reports_the_model_it_deploys(monkeypatch, ema):
    """The last 12.5% of the weights were quantized only at deployment: the score recorded was
    of a network with them still float."""
    import lowbit.api
    import lowbit.qat.engine as engine

    x = _data(64, 77)[0]
    before, scores = {}, []
    real_deploy, real_evaluate = engine.to_deployed_form, lowbit.api.evaluate

    def spy(qm):  # noqa: ANN001, ANN202
        with torch.no_grad():
            before["logits"] = qm.eval()(x).clone()
        real_deploy(qm)

    def evaluate(qm, batches, **kw):  # noqa: ANN001, ANN202
        batches = list(batches)
        scores.append((real_evaluate(qm, batches, **kw), batches))
        return scores[-1][0]

    monkeypatch.setattr(engine, "to_deployed_form", spy)
    monkeypatch.setattr(lowbit.api, "evaluate", evaluate)
    qm = lowbit.quantize(_model(), _recipe("inq", "lsq", 3, 4, weights={"per_channel": False}, lr=0.05, ema=ema),
                         calib=_calib(), train=_data(), progress=False)
    monkeypatch.setattr(lowbit.api, "evaluate", real_evaluate)
    with torch.no_grad():
        assert torch.equal(qm(x), before["logits"])
    last_score, val = scores[-1]
    assert 100 * real_evaluate(qm, val) == pytest.approx(qm.meta["qat"]["best_val_top1"])
    assert 100 * last_score == pytest.approx(qm.meta["qat"]["best_val_top1"])


# -- 7. the "fewer than one batch" error -----------------------------------------------------------
def test_too_few_training_samples_names_the_held_out_validation_samples():
    from lowbit.qat.engine import QATConfig

    qm, base = _calibrated()
    with pytest.raises(LowbitError, match=r"holds 32 samples after val_samples=64 of its 96 were held out"):
        lowbit.train_qat(qm, _data(96), config=QATConfig(batch_size=64, val_samples=64), recipe=base, progress=False)


# -- 8. BN statistics of a layer whose output mean dwarfs its spread -------------------------------
def test_attached_batchnorm_variance_survives_a_large_output_mean():
    from lowbit.qat.convert import attach_batchnorms

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(72, 2))
    with torch.no_grad():
        model[0].weight.fill_(1 / 9)
        model[0].bias.zero_()
    model.eval()
    g = torch.Generator().manual_seed(3)
    batches = [3e4 + 0.3 * torch.randn(64, 1, 8, 8, generator=g) for _ in range(4)]
    recipe = {"extends": "w8a8", "name": "t", "overrides": [{"pattern": "*", "a_bits": 32}], "steps": ["calibrate"]}
    qm = lowbit.quantize(model, recipe, calib=batches, progress=False)
    layer = qm.layers[0].layer
    outs = []
    handle = layer.register_forward_hook(lambda m, i, o: outs.append(o.detach().double()))
    with torch.no_grad():
        for x in batches:
            qm(x)
    handle.remove()
    b = layer.quantized_bias()
    y0 = torch.cat(outs) - (0 if b is None else b.detach().double().reshape(1, -1, 1, 1))
    expected = y0.var((0, 2, 3), unbiased=False)
    assert float((y0.mean((0, 2, 3)).abs() / expected.sqrt()).min()) > 1e4  # |μ|/σ far past float32's reach
    assert attach_batchnorms(qm, batches) == 1
    assert torch.allclose(layer.bn.running_var.double(), expected, rtol=1e-3)


# -- 9. checkpoints that do not fit --------------------------------------------------------------
def _checkpoint(folder, model, opt, ema=None):
    from lowbit.qat.checkpoint import TrainingState, save_state

    save_state(folder, model, opt, TrainingState(epoch=1, best_val=1.0, best_epoch=1, history=[{"epoch": 1}],
                                                 best=model.state_dict(), ema=ema), {"x": 1})


@pytest.mark.parametrize("case", ["unexpected", "optimizer", "param_groups", "ema"])
def test_a_checkpoint_that_does_not_fit_is_refused_with_the_folder_named(tmp_path, case):
    from lowbit.qat.checkpoint import load_state

    folder = tmp_path / "ck"
    saved = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)) if case == "unexpected" else nn.Sequential(nn.Linear(2, 2))
    opt = torch.optim.SGD(saved.parameters(), lr=0.1)
    _checkpoint(folder, saved, opt, ema={"other": torch.zeros(1)} if case == "ema" else None)
    if case == "param_groups":
        side = json.loads((folder / "state.json").read_text())
        del side["param_groups"]
        (folder / "state.json").write_text(json.dumps(side))
    model = nn.Sequential(nn.Linear(2, 2))
    params = list(model.parameters())
    opt = (torch.optim.SGD([{"params": params[:1]}, {"params": params[1:]}], lr=0.1) if case == "optimizer"
           else torch.optim.SGD(params, lr=0.1))
    with pytest.raises(LowbitError, match=f"checkpoint {folder} .*delete this one to start over"):
        load_state(folder, model, opt, {"x": 1})


# -- 10. snap_at_freeze without a BN freeze --------------------------------------------------------
def test_snap_at_freeze_without_trained_batchnorms_warns():
    with pytest.warns(UserWarning, match="snap_at_freeze"):
        lowbit.quantize(_model(), _recipe(epochs=1, train_bn=False, snap_at_freeze=True), calib=_calib(),
                        train=_data(), progress=False)


def _first_buildable(kind: str, role: str):
    import itertools

    from lowbit.qat.convert import make_trainable

    w = torch.randn(4, 3, generator=torch.Generator().manual_seed(0))
    for bits, signed, per_channel, grid in itertools.product([1, 2, 3, 4], [True, False], [True, False],
                                                             ["midtread", "midrise"]):
        try:
            return make_trainable(_source(bits, signed, per_channel, grid), kind, role,
                                  weight=w if role == "weights" else None)
        except Exception:  # noqa: BLE001 - a grid this kind does not take: try the next
            continue
    return None


def test_every_trainable_kind_moves_all_its_tensors_with_the_model():
    """XNOR's activation window was a plain tensor attribute: `.to(device)` left it on the CPU
    (a device mismatch in the first GPU forward). Every tensor a kind holds must be a parameter or
    a buffer."""
    from lowbit.quant.registry import TRAINABLE

    checked = []
    for kind, entry in TRAINABLE.items():
        for role in entry.roles:
            q = _first_buildable(kind, role)
            if q is None:  # k-means starts from its own clustering step, not a uniform grid
                continue
            q.to("meta")
            plain = [name for name, value in vars(q).items() if isinstance(value, torch.Tensor)]
            tensors = {t.device.type for t in [*q.buffers(), *q.parameters()]}
            assert plain == [] and tensors <= {"meta"}, (kind, role, plain, tensors)
            checked.append((kind, role))
    assert ("xnor", "activations") in checked and len(checked) >= 18, checked
