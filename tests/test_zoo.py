"""Tests of lowbit.zoo: architectures, pretrained weights, weight I/O, training (no network)."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch
import torch.fx
from safetensors.torch import load_file
from torch.utils.data import Subset

import lowbit.data.download as dl
from lowbit.data import load_dataset, make_loader
from lowbit.api import evaluate
from lowbit.evaluation import TensorBatches
from lowbit.errors import ChecksumError, LowbitError
from lowbit.zoo import (
    ARCHITECTURES,
    CONSTRUCTORS,
    build,
    list_models,
    load_weights,
    model_info,
    pretrained,
    save_weights,
    train_classifier,
)

from tests.conftest import DATA_DIR as SHARED
from tests.conftest import MODELS_DIR as MODELS

# The shared copies must be there (conftest's fixtures fail loudly if not).
needs_data = pytest.mark.usefixtures("data_dir")
needs_models = pytest.mark.usefixtures("models_dir")


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LOWBIT_DATA_DIR", str(SHARED))
    monkeypatch.setenv("LOWBIT_MODELS_DIR", str(MODELS))
    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path / "cache"))

    def no_network(url: str, dest: Path, *, progress: bool = True) -> None:
        raise OSError(f"network disabled in tests ({url})")

    monkeypatch.setattr(dl, "fetch_url", no_network)


# ---------------------------------------------------------------------------- architectures


@pytest.mark.parametrize(
    ("name", "params"),
    [("resnet20", 269_722), ("resnet32", 464_154), ("resnet44", 658_586), ("resnet56", 853_018), ("resnet110", 1_727_962)],
)
def test_resnet_parameter_counts(name: str, params: int) -> None:
    model = build(name)
    assert sum(p.numel() for p in model.parameters()) == params
    assert len(model.layer1) == len(model.layer3) == (int(name[6:]) - 2) // 6


def test_resnet20_is_about_027m_and_small_cnn_size() -> None:
    assert round(sum(p.numel() for p in build("resnet20").parameters()) / 1e6, 2) == 0.27
    n = sum(p.numel() for p in build("small_cnn").parameters())
    assert 50_000 <= n <= 100_000


@pytest.mark.parametrize(("name", "shape"), [("resnet20", (2, 3, 32, 32)), ("small_cnn", (2, 1, 28, 28))])
def test_fx_traceable(name: str, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = build(name).eval()
    gm = torch.fx.symbolic_trace(model)
    targets = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    assert any("pad" in t for t in targets) or name != "resnet20"  # option-A shortcut is a plain op
    x = torch.randn(shape)
    assert torch.equal(gm(x), model(x))


def test_registry_and_model_info() -> None:
    assert {"resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "small_cnn"} <= set(list_models())
    info = model_info("resnet56")
    arch, kwargs, dataset = info
    assert (arch, dataset) == ("resnet_cifar", "cifar10") and kwargs["depth"] == 56
    rebuilt = CONSTRUCTORS[arch](**kwargs)
    assert sum(p.numel() for p in rebuilt.parameters()) == 853_018
    assert model_info("small_cnn").dataset == "mnist"
    assert build("resnet20", num_classes=100).linear.out_features == 100
    with pytest.raises(LowbitError, match="known models: .*resnet110.*small_cnn"):
        build("vgg16")
    with pytest.raises(LowbitError, match="no published weights"):
        pretrained("small_cnn")


def test_untrained_init_is_kaiming() -> None:
    torch.manual_seed(0)
    w = build("resnet56").layer2[3].conv1.weight
    fan_in = w[0].numel()
    assert w.std().item() == pytest.approx((2.0 / fan_in) ** 0.5, rel=0.1)


# ---------------------------------------------------------------------------- pretrained


@needs_models
@needs_data
def test_pretrained_resnet20_accuracy_on_2000_test_images() -> None:
    model = pretrained("resnet20", download=False)  # via LOWBIT_MODELS_DIR
    assert not model.training
    test = load_dataset("cifar10", "test", download=False)
    acc = evaluate(model, TensorBatches(test, limit=2000))
    assert acc > 0.88, acc


@needs_models
def test_pretrained_resnet32_loads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LOWBIT_MODELS_DIR")
    model = pretrained("resnet32", models_dir=MODELS, download=False)
    assert len(model.layer1) == 5
    assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


def test_pretrained_missing_without_download(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("LOWBIT_MODELS_DIR")
    with pytest.raises(LowbitError, match="resnet44-014dd654.th.*LOWBIT_MODELS_DIR"):
        pretrained("resnet44", models_dir=tmp_path, download=False)


@needs_models
def test_corrupt_local_checkpoint_is_checksum_error(tmp_path: Path) -> None:
    data = bytearray((MODELS / "resnet20-12fca82f.th").read_bytes())
    data[-100] ^= 0xFF
    (tmp_path / "resnet20-12fca82f.th").write_bytes(bytes(data))
    with pytest.raises(ChecksumError, match="sha256"):
        pretrained("resnet20", models_dir=tmp_path, download=False)


@needs_models
def test_download_pretrained_from_local_url(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("LOWBIT_MODELS_DIR")
    monkeypatch.setattr(dl, "fetch_url", _REAL_FETCH)
    spec = ARCHITECTURES["resnet20"]

    def serve(src: Path) -> None:
        weights = dataclasses.replace(spec.weights, url=src.as_uri())
        monkeypatch.setitem(ARCHITECTURES, "resnet20", dataclasses.replace(spec, weights=weights))

    serve(MODELS / "resnet32-d509ac18.th")  # wrong file behind the URL
    with pytest.raises(ChecksumError):
        pretrained("resnet20")
    cached = tmp_path / "cache" / "models" / "resnet20-12fca82f.th"
    assert not cached.exists() and not list(cached.parent.glob("*.part"))
    serve(MODELS / "resnet20-12fca82f.th")
    model = pretrained("resnet20")
    assert cached.is_file() and len(model.layer1) == 3


_REAL_FETCH = dl.fetch_url


# ---------------------------------------------------------------------------- weight files


def test_save_load_roundtrip_and_mismatch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    src = build("resnet20")
    path = save_weights(src, tmp_path / "r20.safetensors")
    dst = load_weights(build("resnet20"), path)
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))
    torch.save({"state_dict": {f"module.{k}": v for k, v in src.state_dict().items()}}, tmp_path / "r20.th")
    again = load_weights(build("resnet20"), tmp_path / "r20.th")
    assert torch.equal(again.linear.weight, src.linear.weight)

    with pytest.raises(LowbitError, match=r"missing keys \(60\).*layer1\.3\.conv1\.weight"):
        load_weights(build("resnet32"), path)
    with pytest.raises(LowbitError, match=r"unexpected keys.*layer1\.3"):
        load_weights(build("resnet20"), save_weights(build("resnet32"), tmp_path / "r32.safetensors"))
    with pytest.raises(LowbitError, match=r"shape mismatches.*linear\.weight"):
        load_weights(build("resnet20", num_classes=100), path)
    (tmp_path / "r20.txt").write_text("not weights")
    with pytest.raises(LowbitError, match="unknown weights format"):
        load_weights(src, tmp_path / "r20.txt")


# ---------------------------------------------------------------------------- training


@pytest.fixture(scope="module")
def mnist_train() -> object:
    return load_dataset("mnist", "train", data_dir=SHARED, download=False)


@needs_data
def test_train_small_cnn_one_epoch(mnist_train: object) -> None:
    torch.manual_seed(0)
    model = build("small_cnn")
    loader = make_loader(Subset(mnist_train, range(2000)), batch_size=32, shuffle=True, seed=0)
    train_classifier(model, loader, epochs=1, lr=0.02, progress=False)
    test = load_dataset("mnist", "test", data_dir=SHARED, download=False)
    acc = evaluate(model, TensorBatches(test, limit=1000))
    assert acc > 0.8, acc


class _CrashingLoader:
    """Wraps a loader and dies when epoch ``crash_at`` starts, like a killed job."""

    def __init__(self, loader: torch.utils.data.DataLoader, crash_at: int) -> None:
        self.loader, self.crash_at, self.calls = loader, crash_at, 0
        self.sampler = loader.sampler

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):  # noqa: ANN204
        self.calls += 1
        if self.calls > self.crash_at:
            raise RuntimeError("simulated crash")
        return iter(self.loader)


@needs_data
def test_train_resumes_from_checkpoint(mnist_train: object, tmp_path: Path) -> None:
    loader = make_loader(Subset(mnist_train, range(384)), batch_size=64, shuffle=True, seed=1)
    ckpt = tmp_path / "run" / "ckpt.safetensors"

    torch.manual_seed(0)
    uninterrupted = train_classifier(build("small_cnn"), loader, epochs=2, lr=0.02, progress=False)

    torch.manual_seed(0)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_classifier(build("small_cnn"), _CrashingLoader(loader, 1), epochs=2, lr=0.02, checkpoint=ckpt, progress=False)
    side = json.loads((tmp_path / "run" / "ckpt.safetensors.json").read_text())
    assert side["epoch"] == 1 and side["optimizer"] == "sgd"
    tensors = load_file(str(ckpt))
    assert "model/conv1.weight" in tensors and any(k.startswith("optim/") for k in tensors)
    # killed after the tensors file and before the sidecar: the sidecar still says epoch 0, and the epoch
    # counter must come from the tensors file itself, or epoch 1 would be trained twice
    (tmp_path / "run" / "ckpt.safetensors.json").write_text(json.dumps({**side, "epoch": 0}))
    with pytest.raises(LowbitError, match="lr: checkpoint 0.02, now 0.03"):  # another schedule: refused
        train_classifier(build("small_cnn"), loader, epochs=2, lr=0.03, checkpoint=ckpt, progress=False)

    torch.manual_seed(123)  # different init: everything must come from the checkpoint
    resumed = train_classifier(build("small_cnn"), loader, epochs=2, lr=0.02, checkpoint=ckpt, progress=False)
    for (k, a), b in zip(uninterrupted.state_dict().items(), resumed.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-6), k
    assert json.loads((tmp_path / "run" / "ckpt.safetensors.json").read_text())["epoch"] == 2

    # A finished checkpoint means nothing left to do.
    done = train_classifier(build("small_cnn"), _CrashingLoader(loader, 0), epochs=2, lr=0.02, checkpoint=ckpt, progress=False)
    assert torch.equal(done.linear.weight, resumed.linear.weight)
    with pytest.raises(LowbitError, match="optimizer"):
        train_classifier(build("small_cnn"), loader, epochs=3, checkpoint=ckpt, optimizer="adam", progress=False)


def test_trained_here_reuses_its_cache_and_refuses_published_models(tmp_path: Path) -> None:
    from lowbit.zoo import build, save_weights, trained_here, trained_here_path

    torch.manual_seed(3)
    ref = build("small_cnn_fashion")
    cache = save_weights(ref, tmp_path / "fashion.safetensors")
    got = trained_here("small_cnn_fashion", data_dir=tmp_path / "no-data-here", cache=cache, download=False)
    assert not got.training  # loaded from the cache: the missing data dir is never read
    for k, v in ref.state_dict().items():
        assert torch.equal(got.state_dict()[k], v), k
    assert trained_here_path("lenet5").name == "lenet5-mnist-e3-s0.safetensors"
    assert trained_here_path("small_cnn_fashion", epochs=2, seed=1).name == "small_cnn_fashion-fashion-mnist-e2-s1.safetensors"
    with pytest.raises(LowbitError, match="has published weights"):
        trained_here("resnet20")
    with pytest.raises(LowbitError, match="epochs must be >= 1"):
        trained_here("lenet5", epochs=0)
    with pytest.raises(LowbitError, match="unknown model"):
        trained_here("lenet6")


def test_trained_here_initial_weights_come_from_its_seed(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """build() ran before torch.manual_seed(seed): the same seed (and cache name) gave different initial weights
    depending on the caller's RNG; and the caller's RNG state was changed."""
    import lowbit.data
    import lowbit.zoo.train
    from lowbit.zoo import trained_here

    monkeypatch.setattr(lowbit.zoo.train, "train_classifier", lambda model, loader, epochs, **kw: model)
    tiny = torch.utils.data.TensorDataset(torch.zeros(8, 1, 28, 28), torch.zeros(8, dtype=torch.long))
    monkeypatch.setattr(lowbit.data, "load_dataset", lambda *a, **k: tiny)
    got = []
    for caller_seed in (123, 456):
        torch.manual_seed(caller_seed)
        before = torch.random.get_rng_state()
        got.append(trained_here("small_cnn", seed=0, cache=tmp_path / f"c{caller_seed}.safetensors", progress=False))
        assert torch.equal(torch.random.get_rng_state(), before)  # the caller's RNG is left as it was
    for k, v in got[0].state_dict().items():
        assert torch.equal(got[1].state_dict()[k], v), k
    other = trained_here("small_cnn", seed=1, cache=tmp_path / "s1.safetensors", progress=False)
    assert not torch.equal(other.conv1.weight, got[0].conv1.weight)


def test_trained_here_names_an_unusable_cache_file(tmp_path: Path) -> None:
    """A garbage cache file raised a raw SafetensorError, another model's weights a raw RuntimeError."""
    from lowbit.zoo import build, save_weights, trained_here

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"garbage")
    name = re.escape(str(garbage))
    with pytest.raises(LowbitError, match=f"unusable: {name}: cannot read weights .*Delete {name}"):
        trained_here("small_cnn", cache=garbage, download=False)
    other = save_weights(build("lenet5"), tmp_path / "lenet5.safetensors")
    name = re.escape(str(other))
    with pytest.raises(LowbitError, match=f"{name} does not fit SmallCNN: missing keys.*Delete {name}"):
        trained_here("small_cnn", cache=other, download=False)
