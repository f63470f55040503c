"""Tests of lowbit.data against the real local dataset copies (no network)."""

from __future__ import annotations

import dataclasses
import gzip
import hashlib
import io
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

import lowbit.data.download as dl
from lowbit.data import (
    DATASETS,
    ImageDataset,
    Resource,
    calibration_subset,
    dataset_tensors,
    load_dataset,
    make_loader,
)
from lowbit.errors import ChecksumError, DatasetNotFoundError, LowbitError

from tests.conftest import DATA_DIR as SHARED

CIFAR_DIR = SHARED / "cifar-10-batches-bin"

# The shared copies must be there (conftest's data_dir fixture fails loudly if not).
needs_data = pytest.mark.usefixtures("data_dir")


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Real data via LOWBIT_DATA_DIR, an empty private cache, and no network at all."""
    monkeypatch.setenv("LOWBIT_DATA_DIR", str(SHARED))
    monkeypatch.setenv("LOWBIT_CACHE_DIR", str(tmp_path / "cache"))

    def no_network(url: str, dest: Path, *, progress: bool = True) -> None:
        raise OSError(f"network disabled in tests ({url})")

    monkeypatch.setattr(dl, "fetch_url", no_network)


@pytest.fixture(scope="module")
def cifar_test() -> ImageDataset:
    return load_dataset("cifar10", "test", data_dir=SHARED, download=False)


@pytest.fixture(scope="module")
def cifar_train() -> ImageDataset:
    return load_dataset("cifar10", "train", data_dir=SHARED, download=False)


# ---------------------------------------------------------------------------- CIFAR-10


@needs_data
def test_cifar_shapes_and_labels(cifar_train: ImageDataset, cifar_test: ImageDataset) -> None:
    assert len(cifar_train) == 50000 and len(cifar_test) == 10000
    x, y = cifar_test[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and isinstance(y, int)
    assert cifar_train.images.dtype == torch.uint8  # kept compact in memory
    for ds in (cifar_train, cifar_test):
        assert int(ds.labels.min()) == 0 and int(ds.labels.max()) == 9
        assert torch.bincount(ds.labels).tolist() == [len(ds) // 10] * 10
    assert DATASETS["cifar10"].input_shape == (3, 32, 32) and DATASETS["cifar10"].num_classes == 10


@needs_data
def test_cifar_normalisation_of_a_known_pixel(cifar_test: ImageDataset) -> None:
    idx, c, h, w = 17, 1, 5, 7
    rec = 1 + 3072
    raw = (CIFAR_DIR / "test_batch.bin").read_bytes()[idx * rec : (idx + 1) * rec]
    pixel = raw[1 + c * 1024 + h * 32 + w]
    x, y = cifar_test[idx]
    assert y == raw[0]
    expected = (pixel / 255.0 - 0.456) / 0.224
    assert x[c, h, w].item() == pytest.approx(expected, abs=1e-5)
    xb, yb = cifar_test.tensors([3, idx])
    assert torch.equal(xb[1], x) and yb.tolist()[1] == y and yb.dtype == torch.long


@needs_data
def test_calibration_subset_is_seeded_and_from_train(cifar_train: ImageDataset) -> None:
    a = calibration_subset(cifar_train, n=256, seed=3)
    b = calibration_subset(cifar_train, n=256, seed=3)
    c = calibration_subset(cifar_train, n=256, seed=4)
    assert list(a.indices) == list(b.indices) != list(c.indices)
    assert len(a) == 256 and len(set(a.indices)) == 256
    assert a.dataset is cifar_train and a.dataset.split == "train"
    assert all(0 <= i < 50000 for i in a.indices)
    x, y = dataset_tensors(a)
    assert x.shape == (256, 3, 32, 32)
    x5, y5 = a[5]
    assert torch.equal(x[5], x5) and int(y[5]) == y5
    with pytest.raises(LowbitError, match="only 50000"):
        calibration_subset(cifar_train, n=50001)


@needs_data
def test_make_loader_deterministic(cifar_test: ImageDataset) -> None:
    sub = torch.utils.data.Subset(cifar_test, range(64))
    first = [y.tolist() for _, y in make_loader(sub, batch_size=16, shuffle=True, seed=1)]
    again = [y.tolist() for _, y in make_loader(sub, batch_size=16, shuffle=True, seed=1)]
    assert first == again and len(first) == 4
    plain = next(iter(make_loader(sub, batch_size=8)))
    assert plain[0].shape == (8, 3, 32, 32) and plain[1].tolist() == cifar_test.labels[:8].tolist()


def test_missing_dataset_message(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("LOWBIT_DATA_DIR", str(empty))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with pytest.raises(DatasetNotFoundError) as exc:
        load_dataset("cifar10", "test", data_dir=elsewhere, download=False)
    msg = str(exc.value)
    assert isinstance(exc.value, FileNotFoundError)
    for part in ("cifar10", str(elsewhere), str(empty), str(tmp_path / "cache"), "LOWBIT_DATA_DIR", "--data-dir", "download"):
        assert part in msg, part


def test_explicit_data_dir_that_does_not_exist_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                          data_dir: Path) -> None:
    """A typo in --data-dir must not silently read the data from $LOWBIT_DATA_DIR instead."""
    monkeypatch.setenv("LOWBIT_DATA_DIR", str(data_dir))
    typo = tmp_path / "shraed"
    with pytest.raises(LowbitError, match=r"data_dir argument '.*shraed' does not exist"):
        load_dataset("cifar10", "test", data_dir=typo, download=False)
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    with pytest.raises(LowbitError, match="is a file, not a directory"):
        load_dataset("cifar10", "test", data_dir=a_file, download=False)


def test_env_data_dir_that_does_not_exist_warns(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                 data_dir: Path) -> None:
    monkeypatch.setenv("LOWBIT_DATA_DIR", os.pathsep.join([str(tmp_path / "gone"), str(data_dir)]))
    with pytest.warns(UserWarning, match=r"\$LOWBIT_DATA_DIR names .*gone.*not a directory"):
        ds = load_dataset("mnist", "test", download=False)
    assert len(ds) == 10000


def test_download_failure_is_dataset_not_found(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("LOWBIT_DATA_DIR")
    with pytest.raises(DatasetNotFoundError, match="Download failed.*network disabled"):
        load_dataset("mnist", "test", download=True)


@needs_data
def test_cifar_file_cut_at_a_record_boundary_is_not_a_smaller_test_set(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    (folder / "test_batch.bin").write_bytes((CIFAR_DIR / "test_batch.bin").read_bytes()[: 3073 * 5000])
    with pytest.raises(LowbitError, match=r"test_batch.bin: 15365000 bytes, the official file has 30730000"):
        load_dataset("cifar10", "test", data_dir=tmp_path, download=False)


@needs_data
def test_truncated_cifar_file(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    (folder / "test_batch.bin").write_bytes((CIFAR_DIR / "test_batch.bin").read_bytes()[: 3073 * 10 + 100])
    with pytest.raises(LowbitError, match="truncated"):
        load_dataset("cifar10", "test", data_dir=tmp_path, download=False)


def _write_gz(path: Path, payload: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wb") as f:
        f.write(payload)


def test_bad_idx_magic_and_truncated_idx(tmp_path: Path) -> None:
    folder = tmp_path / "mnist"
    labels = b"\x00\x00\x08\x01" + (3).to_bytes(4, "big") + bytes([1, 2, 3])
    _write_gz(folder / "t10k-labels-idx1-ubyte.gz", labels)
    _write_gz(folder / "t10k-images-idx3-ubyte.gz", b"\x00\x00\x0d\x03" + b"\x00" * 100)  # float code
    with pytest.raises(LowbitError, match="bad idx magic"):
        load_dataset("mnist", "test", data_dir=tmp_path, download=False)
    header = b"\x00\x00\x08\x03" + b"".join(d.to_bytes(4, "big") for d in (3, 28, 28))
    _write_gz(folder / "t10k-images-idx3-ubyte.gz", header + b"\x00" * (2 * 784))  # one image short
    with pytest.raises(LowbitError, match="truncated"):
        load_dataset("mnist", "test", data_dir=tmp_path, download=False)
    (folder / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(header + b"\x00" * (3 * 784))[:-20])
    with pytest.raises(LowbitError, match="gzip"):
        load_dataset("mnist", "test", data_dir=tmp_path, download=False)


def test_unknown_name_and_split() -> None:
    with pytest.raises(LowbitError, match="cifar10.*fashion-mnist.*mnist"):
        load_dataset("imagenet", "test")
    with pytest.raises(LowbitError, match="train, test"):
        load_dataset("mnist", "val")


# ---------------------------------------------------------------------------- MNIST family


@needs_data
@pytest.mark.parametrize(
    ("name", "train_first", "test_first"), [("mnist", 5, 7), ("fashion-mnist", 9, 9)]
)
def test_mnist_family_loads(name: str, train_first: int, test_first: int) -> None:
    test = load_dataset(name, "test", download=False)  # found through LOWBIT_DATA_DIR
    assert len(test) == 10000 and test[0][1] == test_first
    x, _ = test[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32
    info = DATASETS[name]
    assert x.min().item() == pytest.approx((0 - info.mean[0]) / info.std[0], abs=1e-6)
    train = load_dataset(name, "train", data_dir=SHARED / name, download=False)  # dir *is* the folder
    assert len(train) == 60000 and train[0][1] == train_first
    assert int(train.labels.max()) == 9
    xs, _ = train.tensors()
    assert abs(xs.mean().item()) < 0.05 and abs(xs.std().item() - 1) < 0.05  # the published stats fit


@needs_data
def test_a_folder_of_files_another_dataset_shares_names_with_is_not_taken_for_it(tmp_path: Path,
                                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """MNIST and Fashion-MNIST files have the same names: the MNIST folder passed as Fashion-MNIST's data dir loaded
    MNIST under Fashion-MNIST's name and normalisation. A folder holding the files itself must be named for them."""
    monkeypatch.delenv("LOWBIT_DATA_DIR", raising=False)
    with pytest.raises(DatasetNotFoundError, match="fashion-mnist"):
        load_dataset("fashion-mnist", "test", data_dir=SHARED / "mnist", download=False)
    digits = tmp_path / "digits"
    digits.mkdir()
    for n in DATASETS["mnist"].files["test"]:
        (digits / n).symlink_to(SHARED / "mnist" / n)
    with pytest.raises(DatasetNotFoundError):
        load_dataset("mnist", "test", data_dir=digits, download=False)
    (tmp_path / "mnist").symlink_to(digits)
    assert load_dataset("mnist", "test", data_dir=tmp_path, download=False)[0][1] == 7


@needs_data
def test_uncompressed_idx_is_accepted(tmp_path: Path) -> None:
    folder = tmp_path / "mnist"
    folder.mkdir()
    for n in ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        with gzip.open(SHARED / "mnist" / f"{n}.gz", "rb") as src, open(folder / n, "wb") as out:
            shutil.copyfileobj(src, out)
    ds = load_dataset("mnist", "test", data_dir=tmp_path, download=False)
    assert len(ds) == 10000 and ds[0][1] == 7


# ---------------------------------------------------------------------------- downloads


def _fake_cifar_archive(path: Path, records: int = 3, evil: str | None = None) -> str:
    """A tiny archive in the official layout; returns its md5."""
    rng = np.random.default_rng(0)
    with tarfile.open(path, "w:gz") as tar:

        def add(name: str, data: bytes) -> None:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        for fname in [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]:
            recs = rng.integers(0, 256, size=(records, 3073), dtype=np.uint8)
            recs[:, 0] = rng.integers(0, 10, size=records)
            add(f"cifar-10-batches-bin/{fname}", recs.tobytes())
        add("cifar-10-batches-bin/batches.meta.txt", b"airplane\n")
        if evil:
            add(evil, b"pwned")
    return hashlib.md5(path.read_bytes()).hexdigest()


def _use_archive(monkeypatch: pytest.MonkeyPatch, archive: Path, md5: str) -> None:
    res = Resource("cifar-10-binary.tar.gz", (archive.as_uri(),), md5)
    small = {"train": 15, "test": 3}  # the fake archive's sizes (5 x 3 and 3 records)
    monkeypatch.setitem(DATASETS, "cifar10", dataclasses.replace(DATASETS["cifar10"], resources=(res,),
                                                                 split_sizes=small))
    monkeypatch.setattr(dl, "fetch_url", _REAL_FETCH)  # serve the file:// URL for real
    monkeypatch.delenv("LOWBIT_DATA_DIR")


_REAL_FETCH = dl.fetch_url


def test_download_cifar_from_local_archive(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    archive = tmp_path / "served" / "cifar-10-binary.tar.gz"
    archive.parent.mkdir()
    _use_archive(monkeypatch, archive, _fake_cifar_archive(archive))
    ds = load_dataset("cifar10", "train", download=True)
    assert len(ds) == 15 and ds[0][0].shape == (3, 32, 32)
    cache = tmp_path / "cache" / "data"
    assert (cache / "cifar-10-batches-bin" / "test_batch.bin").is_file()
    assert not (cache / "cifar-10-binary.tar.gz").exists()  # archive removed after extraction
    archive.unlink()  # now it must come from the cache
    assert len(load_dataset("cifar10", "test", download=True)) == 3


def test_download_md5_mismatch(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    archive = tmp_path / "served.tar.gz"
    _fake_cifar_archive(archive)
    _use_archive(monkeypatch, archive, "0" * 32)
    with pytest.raises(ChecksumError, match="md5"):
        load_dataset("cifar10", "test", download=True)
    cache = tmp_path / "cache" / "data"
    assert not any(cache.rglob("*.bin")) and not any(cache.rglob("*.tar.gz*"))


def test_download_rejects_path_traversal(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    archive = tmp_path / "served.tar.gz"
    _use_archive(monkeypatch, archive, _fake_cifar_archive(archive, evil="../../escaped.txt"))
    with pytest.raises(LowbitError, match="path traversal"):
        load_dataset("cifar10", "test", download=True)
    assert not list(tmp_path.rglob("escaped.txt"))
    assert not (tmp_path / "cache" / "data" / "cifar-10-batches-bin").exists()


def test_safe_extract_rejects_symlinks(tmp_path: Path) -> None:
    archive = tmp_path / "links.tar"
    with tarfile.open(archive, "w") as tar:
        link = tarfile.TarInfo("data/passwd")
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        tar.addfile(link)
    with pytest.raises(LowbitError, match="not a regular file"):
        dl.safe_extract_tar(archive, tmp_path / "out")


@needs_data
def test_download_mnist_verifies_official_checksums(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The local .gz files are re-compressed copies: their content must match the official
    decompressed md5s, so the real checksum table is exercised here."""
    monkeypatch.delenv("LOWBIT_DATA_DIR")
    fetched: list[str] = []

    def fake_fetch(url: str, dest: Path, *, progress: bool = True) -> None:
        fetched.append(url)
        shutil.copyfile(SHARED / "mnist" / url.rsplit("/", 1)[1], dest)

    monkeypatch.setattr(dl, "fetch_url", fake_fetch)
    ds = load_dataset("mnist", "test", download=True)
    assert len(ds) == 10000 and ds[0][1] == 7
    assert len(fetched) == 4 and all(u.startswith("https://") for u in fetched)

    def corrupt_fetch(url: str, dest: Path, *, progress: bool = True) -> None:
        fetched.append(url)
        dest.write_bytes(gzip.compress(b"not mnist"))

    monkeypatch.setattr(dl, "fetch_url", corrupt_fetch)
    shutil.rmtree(tmp_path / "cache")
    with pytest.raises(ChecksumError):
        load_dataset("mnist", "test", download=True)


# ---------------------------------------------------------------------------- corrupt and dropped downloads


def _damaged_gzip(src: Path, dest: Path) -> Path:
    """``src`` with its deflate stream damaged: the gzip header is fine, decompressing raises zlib.error."""
    data = bytearray(src.read_bytes())
    for i in range(30, 60):
        data[i] ^= 0xFF
    dest.write_bytes(bytes(data))
    with pytest.raises(Exception) as raw:  # the failure the download code must turn into a ChecksumError
        gzip.decompress(bytes(data))
    assert type(raw.value).__module__ == "zlib"
    return dest


def _labels_resource() -> Resource:
    return next(r for r in DATASETS["mnist"].resources if r.filename == "t10k-labels-idx1-ubyte.gz")


@needs_data
def test_corrupt_gzip_mirror_falls_back_to_the_next(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A mirror serving a gzip with a broken deflate stream raised a raw zlib.error: no fallback, .part left."""
    res = _labels_resource()
    good = SHARED / "mnist" / res.filename
    bad = _damaged_gzip(good, tmp_path / "bad.gz")
    with pytest.raises(ChecksumError, match="corrupt gzip"):
        dl.file_hash(bad, decompress=True)
    monkeypatch.setattr(dl, "fetch_url", _REAL_FETCH)
    dest = tmp_path / "got" / res.filename
    got = dl.download_file([bad.as_uri(), good.as_uri()], dest, md5=res.md5, raw_md5=res.raw_md5, progress=False)
    assert got == dest and dest.read_bytes() == good.read_bytes()
    assert sorted(p.name for p in dest.parent.iterdir()) == [res.filename]  # no .part left
    dest.unlink()
    with pytest.raises(ChecksumError, match="could not get a valid"):
        dl.download_file([bad.as_uri()], dest, md5=res.md5, raw_md5=res.raw_md5, progress=False)
    assert not any(dest.parent.iterdir())


@needs_data
def test_corrupt_cached_gzip_is_deleted_and_fetched_again(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A corrupt .gz in an incomplete cache folder escaped download_dataset's LowbitError handler as zlib.error."""
    monkeypatch.delenv("LOWBIT_DATA_DIR")
    res = _labels_resource()
    cached = tmp_path / "cache" / "data" / "mnist" / res.filename
    cached.parent.mkdir(parents=True)
    _damaged_gzip(SHARED / "mnist" / res.filename, cached)
    fetched: list[str] = []

    def fake_fetch(url: str, dest: Path, *, progress: bool = True) -> None:
        fetched.append(url.rsplit("/", 1)[1])
        shutil.copyfile(SHARED / "mnist" / url.rsplit("/", 1)[1], dest)

    monkeypatch.setattr(dl, "fetch_url", fake_fetch)
    ds = load_dataset("mnist", "test", download=True)
    assert len(ds) == 10000 and ds[0][1] == 7
    assert res.filename in fetched
    assert cached.read_bytes() == (SHARED / "mnist" / res.filename).read_bytes()


def test_dropped_http_response_falls_back_to_the_next_mirror(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A chunked response cut mid-chunk raises http.client.IncompleteRead, which is not an OSError."""
    import http.client

    payload = b"the real file"

    def flaky_fetch(url: str, dest: Path, *, progress: bool = True) -> None:
        dest.write_bytes(payload[:3])
        if "dropped" in url:
            raise http.client.IncompleteRead(payload[:3], len(payload) - 3)
        dest.write_bytes(payload)

    monkeypatch.setattr(dl, "fetch_url", flaky_fetch)
    md5 = hashlib.md5(payload).hexdigest()
    dest = tmp_path / "dl" / "f.bin"
    assert dl.download_file(["http://dropped/f.bin", "http://fine/f.bin"], dest, md5=md5, progress=False) == dest
    assert dest.read_bytes() == payload and sorted(p.name for p in dest.parent.iterdir()) == ["f.bin"]
    dest.unlink()
    with pytest.raises(LowbitError, match="could not download f.bin: http://dropped/f.bin: IncompleteRead"):
        dl.download_file(["http://dropped/f.bin"], dest, md5=md5, progress=False)
    assert not any(dest.parent.iterdir())


def test_download_into_a_symlinked_dataset_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A cache whose dataset folder links to another disk was refused as 'would land outside'."""
    archive = tmp_path / "served" / "cifar-10-binary.tar.gz"
    archive.parent.mkdir()
    _use_archive(monkeypatch, archive, _fake_cifar_archive(archive))
    bigdisk = tmp_path / "bigdisk"
    bigdisk.mkdir()
    cache = tmp_path / "cache" / "data"
    cache.mkdir(parents=True)
    (cache / "cifar-10-batches-bin").symlink_to(bigdisk, target_is_directory=True)
    assert len(load_dataset("cifar10", "test", download=True)) == 3
    assert (bigdisk / "test_batch.bin").is_file() and (cache / "cifar-10-batches-bin").is_symlink()
    # A link below the dataset folder that leads elsewhere is still refused.
    outside = tmp_path / "outside"
    outside.mkdir()
    (bigdisk / "sub").symlink_to(outside, target_is_directory=True)
    evil = tmp_path / "evil.tar"
    with tarfile.open(evil, "w") as tar:
        info = tarfile.TarInfo("cifar-10-batches-bin/sub/x.bin")
        info.size = 1
        tar.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(LowbitError, match="would land outside"):
        dl.safe_extract_tar(evil, cache, only_under="cifar-10-batches-bin")
    assert not any(outside.iterdir())


def test_epoch_sampler_orders_of_two_seeds_share_no_epoch() -> None:
    """seed + epoch had made seed 1's epoch k the shuffle of seed 0's epoch k + 1."""
    from lowbit.data import EpochSampler

    def orders(seed: int) -> list[list[int]]:
        s = EpochSampler(50, seed=seed)
        out = []
        for epoch in range(4):
            s.set_epoch(epoch)
            out.append(list(s))
        return out

    zero, one = orders(0), orders(1)
    assert not any(a == b for a in zero for b in one)
    # seed 0 keeps the orders it always had (the zoo's trained-here baselines use it)
    assert zero[2] == torch.randperm(50, generator=torch.Generator().manual_seed(2)).tolist()
    assert sorted(one[0]) == list(range(50))


def test_seeds_the_schema_allows_draw_without_overflow() -> None:
    """seed * 1000003 + index passed torch's 64-bit seed range for seeds over ~1.8e13 (raw ValueError)."""
    from lowbit.data import EpochSampler
    from lowbit.data.subsets import run_seed
    from lowbit.qat.engine import epoch_batches
    from lowbit.recipes.schema import MAX_SEED

    for seed in (10**14, MAX_SEED):
        s = EpochSampler(20, seed=seed)
        s.set_epoch(3)
        assert sorted(s) == list(range(20))
        assert sum(len(b) for b in epoch_batches(20, 5, seed, 7)) == 20
    assert run_seed(0, 5) == 5 and run_seed(2, 1) == 2 * 1000003 + 1
