"""The .lowbit artifact: exact round trips, sizes that track the bit count, integrity."""
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lowbit
from lowbit.deploy.artifact import ArtifactError, read_header, theoretical_bytes
from lowbit.deploy.packing import pack_codes, packed_nbytes, unpack_codes
from lowbit.errors import LowbitError
from lowbit.zoo import build


@settings(max_examples=80, deadline=None)
@given(bits=st.integers(1, 8), count=st.integers(0, 300), seed=st.integers(0, 1000), signed=st.booleans())
def test_pack_unpack_round_trip(bits, count, seed, signed):
    qmin = -(2 ** (bits - 1)) if signed else 0
    codes = np.random.default_rng(seed).integers(qmin, qmin + 2**bits, size=count)
    packed = pack_codes(codes, bits, qmin)
    assert packed.size == packed_nbytes(count, bits) == (count * bits + 7) // 8
    assert np.array_equal(unpack_codes(packed, count, bits, qmin), codes)


def test_known_packing_layout():
    # four 2-bit codes per byte, first code in the lowest bits
    assert pack_codes(np.array([0, 1, 2, 3]), 2, 0).tolist() == [0b11100100]
    with pytest.raises(LowbitError, match="outside"):
        pack_codes(np.array([4]), 2, 0)


@pytest.fixture(scope="module")
def small():
    torch.manual_seed(0)
    model = build("resnet20").eval()
    x = torch.randn(16, 3, 32, 32)
    return model, x


@pytest.mark.parametrize("recipe", ["w8a8", "w4a4", "w2a4", "w3a3"])
def test_round_trip_is_bit_exact_and_size_tracks_bits(small, tmp_path, recipe):
    model, x = small
    qm = lowbit.quantize(model, recipe, calib=x, progress=False)
    path = lowbit.save(qm, tmp_path / f"{recipe}.lowbit")
    loaded = lowbit.load(path)
    assert torch.equal(loaded(x), qm(x))
    assert loaded.layers.rows() == qm.layers.rows()
    size, ideal = os.path.getsize(path), theoretical_bytes(qm)
    # what is stored beyond the packed codes and float tensors is the compressed header
    # (~1 KB for ResNet-20's 40 quantizers), not something that grows with the weights
    assert ideal <= size <= ideal + 1280, (size, ideal)


def test_a_builtin_description_is_left_to_its_name_and_a_custom_one_kept(small, tmp_path):
    model, x = small
    qm = lowbit.quantize(model, "w8a8", calib=x, progress=False)
    text = lowbit.load_recipe("w8a8").description
    assert text and qm.meta["recipe"]["description"] == text
    header, _, _ = read_header(lowbit.save(qm, tmp_path / "b.lowbit"))
    assert header["recipe"]["name"] == "w8a8" and "description" not in header["recipe"]
    assert lowbit.load(tmp_path / "b.lowbit").meta["recipe"] == qm.meta["recipe"]
    mine = lowbit.quantize(model, {"extends": "w8a8", "description": "mine"}, calib=x, progress=False)
    header, _, _ = read_header(lowbit.save(mine, tmp_path / "c.lowbit"))
    assert header["recipe"]["description"] == "mine"
    assert lowbit.load(tmp_path / "c.lowbit").meta["recipe"]["description"] == "mine"


def test_saved_files_are_readable_like_any_other_file(small, tmp_path):
    """safetensors writes 0600; an artifact or checkpoint gets the mode open() would give."""
    from lowbit.state_io import atomic_save_tensors

    model, x = small
    mask = os.umask(0o022)
    try:
        art = lowbit.save(lowbit.quantize(model, "w8a8", calib=x, progress=False), tmp_path / "m.lowbit")
        atomic_save_tensors({"a": torch.zeros(2)}, tmp_path / "s.safetensors")
    finally:
        os.umask(mask)
    assert os.stat(art).st_mode & 0o777 == 0o644
    assert os.stat(tmp_path / "s.safetensors").st_mode & 0o777 == 0o644


def test_mixed_bits_and_float_layers_round_trip(small, tmp_path):
    model, x = small
    recipe = {"extends": "w4a4", "overrides": [{"pattern": "layer2.*", "w_bits": 3},
                                               {"pattern": "layer3.0.conv1", "w_bits": 32}]}
    qm = lowbit.quantize(model, recipe, calib=x, progress=False)
    loaded = lowbit.load(lowbit.save(qm, tmp_path / "mixed.lowbit"))
    assert torch.equal(loaded(x), qm(x))
    assert loaded.layers["layer3.0.conv1"].w_bits == 32 and loaded.layers["layer2.1.conv2"].w_bits == 3


def test_truncated_and_altered_files(small, tmp_path):
    model, x = small
    path = lowbit.save(lowbit.quantize(model, "w4a4", calib=x, progress=False), tmp_path / "m.lowbit")
    data = path.read_bytes()
    truncated = tmp_path / "truncated.lowbit"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(ArtifactError, match="corrupt or truncated"):
        lowbit.load(truncated)
    altered = tmp_path / "altered.lowbit"
    flipped = bytearray(data)
    meta_len = int.from_bytes(data[:8], "little")
    codes_start = __import__("json").loads(data[8: 8 + meta_len])["codes"]["data_offsets"][0]
    flipped[8 + meta_len + codes_start + 100] ^= 0xFF  # one weight byte
    altered.write_bytes(bytes(flipped))
    with pytest.raises(ArtifactError, match="checksum mismatch"):
        lowbit.load(altered)
    with pytest.raises(ArtifactError, match="does not exist"):
        lowbit.load(tmp_path / "nope.lowbit")


def test_other_version_and_wrong_architecture(small, tmp_path, monkeypatch):
    import lowbit.deploy.artifact as artifact

    model, x = small
    qm = lowbit.quantize(model, "w8a8", calib=x, progress=False)
    monkeypatch.setattr(artifact, "FORMAT_VERSION", 99)
    future = lowbit.save(qm, tmp_path / "future.lowbit")
    monkeypatch.undo()
    with pytest.raises(ArtifactError, match="format version 99 is not supported"):
        lowbit.load(future)
    path = lowbit.save(qm, tmp_path / "r20.lowbit")
    header, _, _ = read_header(path)
    assert header["arch"] == {"name": "resnet20", "kwargs": {}}
    with pytest.raises(ArtifactError, match="do not match"):
        lowbit.load(path, model=build("resnet32"))
    qm.meta["arch"] = {"name": "resnet7", "kwargs": {}}
    with pytest.raises(LowbitError, match="unknown model 'resnet7'"):
        lowbit.load(lowbit.save(qm, tmp_path / "bad_arch.lowbit"))


def test_plain_safetensors_is_not_an_artifact(tmp_path):
    from safetensors.torch import save_file

    p = tmp_path / "w.safetensors"
    save_file({"a": torch.zeros(3)}, str(p))
    with pytest.raises(ArtifactError, match="not a .lowbit artifact"):
        lowbit.load(p)


def test_format_2_files_still_load(small, tmp_path):
    """Files written before the header moved into a tensor (base64 JSON in the metadata,
    layout with explicit offsets) load bit-exact."""
    import base64
    import json
    import zlib

    from safetensors.numpy import save_file

    import lowbit.deploy.artifact as artifact

    model, x = small
    qm = lowbit.quantize(model, "w4a4", calib=x, progress=False)
    header, codes, floats = read_header(lowbit.save(qm, tmp_path / "new.lowbit"))
    assert header["version"] == 3 and header["layout"][1]["offset"] > 0  # expanded on reading
    old = dict(header, version=2)
    old["sha256"] = artifact._digest(codes, floats, old)
    blob = base64.b64encode(zlib.compress(json.dumps(old).encode(), 9)).decode()
    save_file({"codes": codes, "floats": floats}, str(tmp_path / "old.lowbit"), metadata={"lowbit": blob})
    assert torch.equal(lowbit.load(tmp_path / "old.lowbit")(x), qm(x))


def test_header_codec_round_trip_and_damage():
    from lowbit.deploy import header_codec

    header = {"format": "lowbit", "version": 3, "layout": {"codes": [["net.fc.module.weight", [10, 64], 2, -2]]},
              "recipe": {"name": "w2a2-lsq", "description": "ünïcode"}}
    blob = header_codec.encode(header)
    assert header_codec.decode(blob) == header
    # the preset dictionary is what makes a small header small
    assert len(blob) < len(__import__("zlib").compress(__import__("json").dumps(header).encode(), 9))
    with pytest.raises(ValueError, match="truncated"):
        header_codec.decode(blob[: len(blob) // 2])


def test_truncated_header_tensor_is_named(small, tmp_path):
    from safetensors.numpy import load_file, save_file

    model, x = small
    path = lowbit.save(lowbit.quantize(model, "w4a4", calib=x, progress=False), tmp_path / "m.lowbit")
    tensors = load_file(str(path))
    tensors["header"] = tensors["header"][:-7]
    save_file(tensors, str(path), metadata={"lowbit": "3"})
    with pytest.raises(ArtifactError, match="header is corrupt"):
        lowbit.load(path)


def test_a_loaded_artifact_has_no_float_reference_unless_given_its_float_model(resnet20, cifar_slices, tmp_path):
    """An artifact holds quantized weights only: rebuilt from the zoo name, the network's own weights are its
    random initialisation, so a step that compares with the float network must refuse rather than use them;
    with the float model passed, it is that model."""
    calib, _ = cifar_slices
    qm = lowbit.quantize(resnet20, "w8a8", calib=calib[:64], progress=False)
    path = lowbit.save(qm, tmp_path / "r.lowbit")
    bare = lowbit.load(path)
    with pytest.raises(lowbit.LowbitError, match="loaded without its float model .*load\\(path, model="):
        with bare.float_reference():
            pass
    labels = torch.zeros(len(calib), dtype=torch.long)
    with pytest.raises(lowbit.LowbitError, match="distillation needs the float network as its teacher"):
        lowbit.train_qat(bare, (calib, labels), epochs=1, progress=False, recipe={"extends": "w8a8+lsq"},
                         kd={"temperature": 4.0, "weight": 1.0}, batch_size=32, val_samples=32, steps_per_epoch=1)
    given = lowbit.load(path, model=resnet20)
    with torch.no_grad(), given.float_reference():
        assert torch.allclose(given(calib[:4]), resnet20(calib[:4]), atol=1e-4)
    assert torch.equal(bare(calib[:4]), qm(calib[:4])) and torch.equal(given(calib[:4]), qm(calib[:4]))
