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
    assert header["version"] == 4 and header["layout"][1]["offset"] > 0  # expanded on reading
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


# -- hostile or damaged files, concurrent and failing saves -------------------------------------------


class _Tiny(torch.nn.Module):
    """Conv+BN, a grouped conv, a bias-free conv and a linear layer: every kind of stored tensor, small."""

    def __init__(self) -> None:
        super().__init__()
        self.c0, self.b0 = torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.BatchNorm2d(8)
        self.g = torch.nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False)
        self.c1 = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.fc = torch.nn.Linear(8, 5)

    def forward(self, x):
        x = torch.relu(self.b0(self.c0(x)))
        x = torch.relu(self.c1(torch.relu(self.g(x))))
        return self.fc(x.mean((2, 3)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(float model, input, uniform w4a4 artifact, 3-bit k-means codebook artifact)."""
    torch.manual_seed(0)
    model = _Tiny().eval()
    x = torch.randn(16, 3, 8, 8)
    folder = tmp_path_factory.mktemp("tiny")
    uniform = lowbit.save(lowbit.quantize(model, "w4a4", calib=x, progress=False), folder / "w4a4.lowbit")
    kmeans = {"extends": "w4a4", "name": "km", "weights": {"bits": 3}, "steps": ["calibrate", "kmeans"]}
    codebook = lowbit.save(lowbit.quantize(model, kmeans, calib=x, progress=False), folder / "km.lowbit")
    return model, x, uniform, codebook


def _craft(src, dst, mutate=None, blob=None, version=3):
    """Rewrite ``src`` as ``dst`` with its header edited by ``mutate(header, codes, floats)`` (which may return
    new buffers) and a valid checksum: what someone editing a file on purpose produces. ``blob``: the header
    bytes as given instead; ``version`` 2: the header as base64 text in the metadata, as formats 1 and 2 kept it."""
    import base64
    import json
    import zlib

    from safetensors import safe_open
    from safetensors.numpy import save_file

    import lowbit.deploy.artifact as artifact
    from lowbit.deploy import header_codec

    with safe_open(str(src), framework="numpy") as f:
        header, codes, floats = header_codec.decode(f.get_tensor("header").tobytes()), f.get_tensor("codes"), \
            f.get_tensor("floats")
    if version == 2:  # the layout with explicit offsets, as formats 1 and 2 stored it
        header["layout"] = artifact._expand_layout(src, header["layout"])
        header["version"] = 2
    out = mutate(header, codes, floats) if mutate is not None else None
    if out is not None:
        header, codes, floats = out
    header["sha256"] = artifact._digest(codes, floats, header)
    if version == 2:
        text = blob if blob is not None else base64.b64encode(zlib.compress(json.dumps(header).encode())).decode()
        save_file({"codes": codes, "floats": floats}, str(dst), metadata={"lowbit": text})
    else:
        data = blob if blob is not None else header_codec.encode(header)
        save_file({"codes": codes, "floats": floats, "header": np.frombuffer(data, np.uint8)}, str(dst),
                  metadata={"lowbit": "3"})
    return dst


def _whitespace_bomb(mib: int, tail: bytes, zdict: bytes | None) -> bytes:
    """``mib`` MiB of JSON whitespace then ``tail``, deflated: a few hundred KB that inflate ~1000x."""
    import zlib

    packer = zlib.compressobj(9, zlib.DEFLATED, 15, 9, zlib.Z_DEFAULT_STRATEGY, **({"zdict": zdict} if zdict else {}))
    chunk = b" " * (1 << 20)
    return b"".join(packer.compress(chunk) for _ in range(mib)) + packer.compress(tail) + packer.flush()


@pytest.mark.parametrize("version", [3, 2])
def test_a_header_that_inflates_past_the_bound_is_refused_while_inflating(tiny, tmp_path, version):
    """A 300 KB file whose header inflated to 256 MB (then parsed and loaded) before any check: a
    decompression bomb. The header is inflated with a bound, in the new and the old formats alike,
    and never held in memory past it."""
    import base64
    import json
    import tracemalloc

    from safetensors import safe_open

    from lowbit.deploy import header_codec

    model, _, uniform, _ = tiny
    with safe_open(str(uniform), framework="numpy") as f:
        header = json.dumps(header_codec.decode(f.get_tensor("header").tobytes())).encode()
    mib = 96  # past the 64 MiB bound
    deflated = _whitespace_bomb(mib, header, header_codec.DICTIONARY_V3 if version == 3 else None)
    blob = deflated if version == 3 else base64.b64encode(deflated).decode()
    path = _craft(uniform, tmp_path / "bomb.lowbit", blob=blob, version=version)
    assert os.path.getsize(path) < 1 << 20
    with pytest.raises(ArtifactError, match="header is corrupt .*inflates to more than 64 MiB"):
        lowbit.load(path, model=model)
    decode = header_codec.decode if version == 3 else header_codec.decode_legacy
    tracemalloc.start()
    try:
        with pytest.raises(ValueError, match="inflates to more than"):
            decode(blob)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < (64 + 8) << 20, peak >> 20
    # a header padded below the bound is still a header
    assert header_codec.decode(_whitespace_bomb(2, header, header_codec.DICTIONARY_V3)) == json.loads(header)


def _drop_floats(names):
    """A mutation removing the float entries ``names`` (and their values) from a format-3 header."""
    def mutate(h, c, f):
        keep, values, off = [], [], 0
        for key, shape in h["layout"]["floats"]:
            n = int(np.prod(shape))
            if key not in names:
                keep.append([key, shape])
                values.append(f[off: off + n])
            off += n
        h["layout"]["floats"] = keep
        return h, c, np.concatenate(values).astype(np.float32)
    return mutate


def _set_floats(name, value):
    """A mutation setting every value of the float entry ``name`` (or the first of a codebook table)."""
    def mutate(h, c, f):
        f, off = f.copy(), 0
        for key, shape in h["layout"]["floats"]:
            n = int(np.prod(shape))
            if key == name:
                if value == "reverse":
                    f[off: off + n] = f[off: off + n][::-1].copy()
                else:
                    f[off: off + n] = value
            off += n
        return h, c, f
    return mutate


def _row(name, **changes):
    def mutate(h, c, f):
        row = next(r for r in h["layers"] if r["name"] == name)
        for k, v in changes.items():
            if v is None:
                row.pop(k)
            else:
                row[k] = v
    return mutate


def _quantizer(name, drop=None, **changes):
    def mutate(h, c, f):
        if drop == "all":
            del h["quantizers"][name]
            return
        if drop is not None:
            del h["quantizers"][name][drop]
        h["quantizers"][name].update(changes)
    return mutate


def _first_codebook(h):
    return next(n for n, s in h["quantizers"].items() if s.get("kind") == "codebook")


def _codebook_table(shape):
    def mutate(h, c, f):
        name = _first_codebook(h)
        entry = next(e for e in h["layout"]["floats"] if e[0] == f"{name}.centroids")
        entry[1] = shape
    return mutate


def _codebook_without_spec(h, c, f):
    del h["quantizers"][_first_codebook(h)]["spec"]


def _reverse_first_table(h, c, f):
    return _set_floats(f"{_first_codebook(h)}.centroids", "reverse")(h, c, f)


def _nan_in_first_table(h, c, f):
    return _set_floats(f"{_first_codebook(h)}.centroids", float("nan"))(h, c, f)


def _scale_shape(shape):
    def mutate(h, c, f):
        next(e for e in h["layout"]["floats"] if e[0] == "net.g.weight_quantizer.scale")[1] = shape
    return mutate


def _drop_codes(key):
    def mutate(h, c, f):
        from lowbit.deploy.packing import packed_nbytes

        keep, parts, off = [], [], 0
        for e in h["layout"]["codes"]:
            n = packed_nbytes(int(np.prod(e[1])), e[2])
            if e[0] != key:
                keep.append(e)
                parts.append(c[off: off + n])
            off += n
        h["layout"]["codes"] = keep
        return h, np.concatenate(parts), f
    return mutate


def _duplicate_bias(h, c, f):
    """A codes entry renamed to a float tensor's key: two entries for one tensor, the last one winning."""
    entry = next(e for e in h["layout"]["codes"] if e[0] == "net.g.module.weight")
    entry[0], entry[1] = "net.g.module.bias", [8, 4, 3, 3]


def _list_layout_without_offset(h, c, f):
    next(e for e in h["layout"] if e["store"] == "codes").pop("offset")


def _codes_qmin(qmin):
    def mutate(h, c, f):
        next(e for e in h["layout"]["codes"] if e[0] == "net.g.module.weight")[3] = qmin
    return mutate


def _two_bit_quantizer(h, c, f):
    """The quantizer (and its row) say 2 bits; the stored codes are still 4-bit."""
    q = h["quantizers"]["net.g.weight_quantizer"]
    q["bits"] = q["spec"]["bits"] = 2
    _row("g", w_bits=2)(h, c, f)


MALFORMED = {  # case: (artifact, format version, mutation or header bytes, what the error must name)
    "nested 100000 deep": ("uniform", 3, b'{"a":' + b"[" * 100000 + b"]" * 100000 + b"}", "nested too deeply"),
    "nested 200 deep in the recipe": ("uniform", 3, lambda h, c, f: h["recipe"].update(
        extra=__import__("functools").reduce(lambda inner, _: {"a": inner}, range(200), {})), "nests deeper than 64"),
    "layer row without w_bits": ("uniform", 3, _row("g", w_bits=None), "layer 'g': 'w_bits'"),
    "w_bits a string": ("uniform", 3, _row("g", w_bits="4"), "layer 'g': 'w_bits'"),
    "quantizer without calibrated": ("uniform", 3, _quantizer("net.g.weight_quantizer", drop="calibrated"),
                                     "'net.g.weight_quantizer': 'calibrated'"),
    "signed a string": ("uniform", 3, _quantizer("net.g.weight_quantizer", signed="no"), "'signed' is 'no'"),
    "calibrated quantizer without its scale": ("uniform", 3, _drop_floats({"net.g.weight_quantizer.scale"}),
                                               "'net.g.weight_quantizer.scale' of the model has no float entry"),
    "model quantizer absent from the header": ("uniform", 3, _quantizer("net.act_quant_1", drop="all"),
                                               "no state for quantizers \\['net.act_quant_1'\\]"),
    "row says float, codes stored": ("uniform", 3, _row("g", w_bits=32),
                                     "'net.g.module.weight' is stored as codes, but it is not a quantized weight"),
    "format-2 layout entry without offset": ("uniform", 2, _list_layout_without_offset, "'offset' is None"),
    "layers not dicts": ("uniform", 3, lambda h, c, f: h.update(layers=[1, 2, 3]), "'layers' is not a list of rows"),
    "quantizer state not a dict": ("uniform", 3, lambda h, c, f: h["quantizers"].update({"net.g.weight_quantizer": 5}),
                                   "'net.g.weight_quantizer': its state is 5"),
    "scale shape [-8, -1]": ("uniform", 3, _scale_shape([-8, -1]), "layout is malformed .*weight_quantizer.scale"),
    "scale shape [2, 4]": ("uniform", 3, _scale_shape([2, 4]),
                           "'net.g.weight_quantizer' has a scale of shape \\[2, 4\\]; it takes \\[\\] or \\[8\\]"),
    "recipe a number": ("uniform", 3, lambda h, c, f: h.update(recipe=5), "'recipe' is int"),
    "recipe null": ("uniform", 3, lambda h, c, f: h.update(recipe=None), "holds no recipe"),
    "version true": ("uniform", 3, lambda h, c, f: h.update(version=True), "format version True is not supported"),
    "codebook with an empty table": ("codebook", 3, _codebook_table([0]), "codebook quantizer .* cannot be rebuilt"),
    "codebook without spec": ("codebook", 3, _codebook_without_spec, "codebook quantizer .* has no 'spec'"),
}


def _v2_list_header():
    import base64
    import zlib

    return base64.b64encode(zlib.compress(b"[1,2]")).decode()


MALFORMED["format-2 header a JSON list"] = ("uniform", 2, _v2_list_header(), "not a JSON object")


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_headers_fail_with_the_key_named(tiny, tmp_path, case):
    """Crafted or damaged headers (checksums recomputed, as an editor would) raised KeyError, TypeError,
    AttributeError, RecursionError, RuntimeError or ValueError from deep inside load, or loaded; the header's
    structure is checked once after reading, and every one is an ArtifactError naming what is wrong."""
    model, x, uniform, codebook = tiny
    which, version, change, message = MALFORMED[case]
    src = uniform if which == "uniform" else codebook
    if isinstance(change, bytes):  # JSON text, deflated as format 3 does
        from lowbit.deploy.header_codec import DICTIONARY_V3

        path = _craft(src, tmp_path / "bad.lowbit", blob=_whitespace_bomb(0, change, DICTIONARY_V3))
    elif isinstance(change, str):  # format 2's base64 text
        path = _craft(src, tmp_path / "bad.lowbit", blob=change, version=version)
    else:
        path = _craft(src, tmp_path / "bad.lowbit", change, version=version)
    with pytest.raises(ArtifactError, match=message):
        lowbit.load(path, model=model)


MISMATCHED = {  # case: (artifact, mutation, what the error must name)
    "a layer's codes entry missing": ("uniform", _drop_codes("net.g.module.weight"),
                                      "quantized weight 'net.g.module.weight' has no codes entry"),
    "a bias missing": ("uniform", _drop_floats({"net.c1.module.bias"}), "'net.c1.module.bias' of the model has no float"),
    "duplicate keys": ("uniform", _duplicate_bias, "'net.g.module.bias' appears twice"),
    "codes wider than the quantizer": ("uniform", _two_bit_quantizer,
                                       "'net.g.module.weight' holds 4-bit codes from -7, but its quantizer's grid is "
                                       "2-bit from -1"),
    "codes from another qmin": ("uniform", _codes_qmin(-8), "holds 4-bit codes from -8, .* 4-bit from -7"),
    "codes unsigned for a signed grid": ("uniform", _codes_qmin(0), "holds 4-bit codes from 0"),
    "scale 0": ("uniform", _set_floats("net.act_quant_1.scale", 0.0), "'net.act_quant_1' has a scale that is not"),
    "scale negative": ("uniform", _set_floats("net.g.weight_quantizer.scale", -0.05),
                       "'net.g.weight_quantizer' has a scale that is not finite and positive"),
    "scale NaN": ("uniform", _set_floats("net.act_quant_1.scale", float("nan")), "scale that is not finite"),
    "zero point inf": ("uniform", _set_floats("net.act_quant_1.zero_point", float("inf")), "zero point"),
    "centroids reversed": ("codebook", _reverse_first_table, "centroids that are not finite and sorted"),
    "centroids NaN": ("codebook", _nan_in_first_table, "centroids that are not finite and sorted"),
}


@pytest.mark.parametrize("case", list(MISMATCHED))
def test_headers_that_disagree_with_their_tensors_are_refused(tiny, tmp_path, case):
    """These loaded silently wrong: a layer without codes kept the rebuilt model's random weights, a
    missing bias its initial value, a duplicate key let one entry shadow the other, codes of another
    grid decoded on the quantizer's, a scale of 0 or NaN gave NaN outputs, reversed centroids a weight
    other than the one stored. Each is now an ArtifactError naming the entry."""
    model, x, uniform, codebook = tiny
    which, change, message = MISMATCHED[case]
    path = _craft(uniform if which == "uniform" else codebook, tmp_path / "bad.lowbit", change)
    with pytest.raises(ArtifactError, match=message):
        lowbit.load(path, model=model)


def test_crafting_an_unchanged_file_still_loads_bit_exact(tiny, tmp_path):
    """The helper above, with no change, in both header formats: the checks refuse edits, not files."""
    model, x, uniform, codebook = tiny
    for src in (uniform, codebook):
        reference = lowbit.load(src, model=model)
        for version in (3, 2):
            back = lowbit.load(_craft(src, tmp_path / f"same{version}.lowbit", version=version), model=model)
            with torch.no_grad():
                assert torch.equal(back(x), reference(x))


def test_a_bias_added_by_bias_correction_is_zero_in_the_loaded_float_reference(tmp_path):
    """Bias correction gives bias-free layers a bias. On load the slot is recreated, and it must be
    registered as a float parameter whose float value is 0: the float network had no bias. It was not,
    so float_reference() of an artifact loaded with its float model ran with the corrected bias."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, bias=False), torch.nn.ReLU(),
                                torch.nn.Conv2d(8, 8, 3, bias=False), torch.nn.ReLU(), torch.nn.Flatten(),
                                torch.nn.Linear(8 * 4 * 4, 5, bias=False)).eval()
    x = torch.randn(32, 3, 8, 8)
    recipe = {"extends": "w4a4", "first_last_bits": None, "steps": ["calibrate", "bias_correction"]}
    qm = lowbit.quantize(model, recipe, calib=x, progress=False)
    assert any(float(p.detach().abs().max()) > 0 for n, p in qm.named_parameters() if n.endswith("bias"))
    back = lowbit.load(lowbit.save(qm, tmp_path / "bc.lowbit"), model=model)
    with torch.no_grad():
        assert torch.equal(back(x), qm(x))
        with back.float_reference():
            assert torch.allclose(back(x), model(x), atol=1e-6)
        assert torch.equal(back(x), qm(x))  # and the corrected bias is back afterwards


def test_a_quantmodel_without_a_recipe_is_not_saved(tmp_path):
    """A QuantModel built directly stored recipe: null, which load could not read: save refuses it and
    says how to build one that can be saved."""
    from lowbit.quant.spec import QuantSpec

    model = _Tiny().eval()
    qm = lowbit.QuantModel(model, QuantSpec(bits=4, per_channel=True), QuantSpec(bits=8, signed=False, symmetric=False))
    lowbit.calibrate(qm, [torch.randn(8, 3, 8, 8)])
    with pytest.raises(ArtifactError, match="without a recipe .*lowbit.prepare\\(model, recipe\\)"):
        lowbit.save(qm, tmp_path / "direct.lowbit")
    assert list(tmp_path.iterdir()) == []


def _interleave_a_second_writer(monkeypatch, second):
    """Make the first os.replace run ``second()`` (another process saving to the same path) just before
    it renames: the interleaving that made two writers of one path collide on one temporary name."""
    real = os.replace
    events: list[str] = []

    def replace(src, dst, *args, **kwargs):
        events.append("replace")
        if events.count("replace") == 1:
            second()
        return real(src, dst, *args, **kwargs)

    real_fsync = os.fsync
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append("fsync"), real_fsync(fd))[1])
    return events


@pytest.mark.parametrize("what", ["tensors", "text", "artifact"])
def test_two_writers_of_one_path_do_not_collide(tiny, tmp_path, monkeypatch, what):
    """Two processes saving to one path used one fixed temporary name (``<name>.part``, ``.<name>.tmp``):
    one renamed the other's file away and the other failed with a raw FileNotFoundError. Each save now
    writes a temporary file of its own, flushed to disk before the rename; the last rename wins, whole."""
    from safetensors.torch import load_file

    from lowbit.state_io import atomic_save_tensors, atomic_write_text

    model, x, uniform, _ = tiny
    path = tmp_path / {"tensors": "s.safetensors", "text": "s.json", "artifact": "m.lowbit"}[what]
    other = lowbit.quantize(model, "w8a8", calib=x, progress=False) if what == "artifact" else None
    mine = lowbit.load(uniform, model=model) if what == "artifact" else None
    write = {"tensors": lambda v: atomic_save_tensors({"w": torch.full((1000,), float(v))}, path),
             "text": lambda v: atomic_write_text(path, f'{{"w": {v}}}'),
             "artifact": lambda v: lowbit.save(mine if v == 1 else other, path)}[what]
    events = _interleave_a_second_writer(monkeypatch, lambda: write(2))
    mask = os.umask(0o022)
    try:
        write(1)
    finally:
        os.umask(mask)
    monkeypatch.undo()
    assert events == ["fsync", "replace", "fsync", "replace"]  # each file flushed to disk before its rename
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind
    assert os.stat(path).st_mode & 0o777 == 0o644
    if what == "tensors":
        assert torch.equal(load_file(str(path))["w"], torch.full((1000,), 1.0))
    elif what == "text":
        assert path.read_text() == '{"w": 1}'
    else:
        with torch.no_grad():
            assert torch.equal(lowbit.load(path, model=model)(x), mine(x))


def test_a_failed_save_is_an_artifact_error_and_leaves_the_old_file(tiny, tmp_path, monkeypatch):
    """safetensors reports a full disk or a file too large as SafetensorError, which is not an OSError,
    and a parent folder that cannot be made failed before the try: both escaped raw. Both are
    ArtifactErrors now, the previous file is untouched and no temporary file is left."""
    from safetensors import SafetensorError

    import lowbit.deploy.artifact as artifact
    from lowbit.state_io import atomic_save_tensors

    model, x, uniform, _ = tiny
    qm = lowbit.load(uniform, model=model)
    path = lowbit.save(qm, tmp_path / "m.lowbit")
    before = path.read_bytes()

    def disk_full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise SafetensorError("Error while serializing: IoError(Os { code: 28, kind: StorageFull })")

    monkeypatch.setattr(artifact, "save_file", disk_full)
    with pytest.raises(ArtifactError, match="cannot write .*m.lowbit: .*StorageFull"):
        lowbit.save(qm, path)
    monkeypatch.undo()
    assert path.read_bytes() == before and list(tmp_path.iterdir()) == [path]
    (tmp_path / "plain").write_text("a file, not a folder")
    with pytest.raises(ArtifactError, match="cannot write .*plain/sub/m.lowbit"):
        lowbit.save(qm, tmp_path / "plain" / "sub" / "m.lowbit")
    # the state files of training runs clean up the same way (their errors stay the caller's)
    import lowbit.state_io as state_io

    atomic_save_tensors({"w": torch.zeros(3)}, tmp_path / "s.safetensors")
    monkeypatch.setattr(state_io, "save_file", disk_full)
    with pytest.raises(SafetensorError):
        atomic_save_tensors({"w": torch.ones(3)}, tmp_path / "s.safetensors")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.lowbit", "plain", "s.safetensors"]


class _TiedLinears(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8), torch.nn.Linear(8, 3)
        self.b.weight = self.a.weight  # tied

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.relu(self.b(torch.relu(self.a(x)))))


def test_tied_weights_at_two_bit_widths_load_as_they_were_saved(tmp_path):
    """Both layers' stored codes were decoded into the one shared tensor, so the first layer ran with
    the second's 2-bit weights after loading (logits 0.08 apart)."""
    torch.manual_seed(0)
    model = _TiedLinears().eval()
    x = torch.randn(64, 8)
    recipe = {"extends": "w8a8", "overrides": [{"pattern": "b", "w_bits": 2}]}
    with pytest.warns(UserWarning, match="layers a and b share weights in the float model"):
        qm = lowbit.quantize(model, recipe, calib=x, progress=False)
    assert model.b.weight is model.a.weight  # the user's model keeps its tie
    assert qm.layers["a"].layer.module.weight is not qm.layers["b"].layer.module.weight
    path = lowbit.save(qm, tmp_path / "tied.lowbit")
    with pytest.warns(UserWarning, match="share weights"):
        loaded = lowbit.load(path, model=_TiedLinears().eval())
    assert torch.equal(loaded(x), qm(x))
