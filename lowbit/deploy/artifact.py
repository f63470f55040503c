"""The .lowbit file: one safetensors file holding every weight's bit-packed codes, the
float tensors that stay float, and a compact JSON header. No pickle anywhere.

Layout: three tensors — ``codes`` (uint8, every packed weight back to back, each segment
byte-aligned), ``floats`` (float32: scales, zero points, biases, unfolded BN, …) and
``header`` (uint8: the JSON header compressed by lowbit.deploy.header_codec) — so the
file's size tracks the theoretical bit count instead of paying a safetensors header entry
per tensor. The header records the format version, architecture, recipe, layer table,
per-quantizer state, the order, shape and bit width of each stored tensor (offsets
follow from them), metrics, and a sha256 of the header and the tensor bytes. Formats 1
and 2 (header as base64 text in the safetensors metadata) still load.
"""
from __future__ import annotations

import hashlib
import json
import math
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file
from torch import nn
from torch.overrides import TorchFunctionMode

from lowbit.deploy import header_codec
from lowbit.deploy.packing import pack_codes, packed_nbytes, unpack_codes
from lowbit.errors import LowbitError
from lowbit.model.quant_layer import QUANTIZABLE, QuantLayer
from lowbit.model.quant_model import QuantModel
from lowbit.quant.codebook import CodebookQuantizer
from lowbit.quant.quantizer import UniformQuantizer
from lowbit.quant.spec import QuantSpec
from lowbit.state_io import write_atomically

FORMAT = "lowbit"
# 2: the checksum covers the header; 3: header as a compressed tensor; 4: no scale/zero point stored for a
# quantizer nothing reads (a disabled activation quantizer, a float layer's or codebook's placeholder), so a
# lowbit that reads only 1-3 would find them missing: a new version tells it why (1-3 still load here)
FORMAT_VERSION = 4
READABLE_VERSIONS = (1, 2, 3, 4)


class ArtifactError(LowbitError):
    """A .lowbit file is corrupt, truncated, of another format version, or unusable."""


def _quantizers(qm: QuantModel) -> dict[str, UniformQuantizer]:
    return {n: m for n, m in qm.named_modules() if isinstance(m, UniformQuantizer)}


def _packed_weights(qm: QuantModel) -> dict[str, QuantLayer]:
    """state-dict key of each weight stored as codes → its layer."""
    names = {id(m): n for n, m in qm.named_modules()}
    return {f"{names[id(r.layer)]}.module.weight": r.layer for r in qm.layers if r.layer.quantize_weight}


def _unread_quantizers(qm: QuantModel) -> set[str]:
    """Quantizers whose scale and zero point no computation reads: a disabled activation quantizer (its
    tensor stays float), the weight quantizer of a layer kept float, and a codebook (its centroids are
    its grid; scale and zero point are placeholders). qm.size_bits() does not count them either."""
    weight_quantizers = {id(r.layer.weight_quantizer) for r in qm.layers}
    return {n for n, q in _quantizers(qm).items()
            if isinstance(q, CodebookQuantizer)
            or (not _quantizes_weight(qm, q) if id(q) in weight_quantizers else not q.enabled)}


def _unread_keys(qm: QuantModel) -> set[str]:
    return {f"{n}.{b}" for n in _unread_quantizers(qm) for b in ("scale", "zero_point")}


def _stored_tensors(qm: QuantModel) -> tuple[dict[str, QuantLayer], dict[str, torch.Tensor]]:
    """(weights stored as codes, float tensors stored as float32): everything that
    defines the quantized model's output, nothing that does not (integer BN counters, the
    placeholder scales of quantizers nothing reads: see _unread_quantizers)."""
    packed = _packed_weights(qm)
    # Zero points of symmetric grids are always 0: not stored.
    constant = {f"{n}.zero_point" for n, q in _quantizers(qm).items() if q.spec.symmetric} | _unread_keys(qm)
    floats = {key: t for key, t in qm.state_dict().items()
              if key not in packed and key not in constant and t.is_floating_point()}
    return packed, floats


def theoretical_bytes(qm: QuantModel) -> int:
    """Bytes the content needs: packed codes + float32 tensors (no header, no padding)."""
    packed, floats = _stored_tensors(qm)
    code_bytes = sum(packed_nbytes(l.weight.numel(), l.weight_quantizer.bits) for l in packed.values())
    return code_bytes + 4 * sum(t.numel() for t in floats.values())


def _digest(codes: np.ndarray, floats: np.ndarray, header: dict[str, Any] | None = None) -> str:
    """sha256 of the tensor bytes and, from version 2 on, of the header itself (canonical
    JSON without the checksum field), so an edited bit width is caught like a flipped byte."""
    h = hashlib.sha256()
    if header is not None:
        body = {k: v for k, v in header.items() if k != "sha256"}
        h.update(json.dumps(body, sort_keys=True, separators=(",", ":")).encode())
    h.update(codes.tobytes())
    h.update(floats.astype("<f4").tobytes())
    return h.hexdigest()


def check_target(path: Path) -> None:
    """Never write over a directory or over a file that is not a .lowbit artifact."""
    if path.is_dir():
        raise ArtifactError(f"cannot save to {path}: it is a directory; give a file path such as {path / 'model.lowbit'}")
    if path.exists():
        try:
            with safe_open(str(path), framework="numpy") as f:
                ours = "lowbit" in (f.metadata() or {})
        except Exception:  # noqa: BLE001 - anything unreadable is not ours
            ours = False
        if not ours:
            raise ArtifactError(f"refusing to overwrite {path}: it exists and is not a .lowbit artifact")


def save(qm: QuantModel, path: str | Path, metrics: dict[str, Any] | None = None) -> Path:
    """Write ``qm`` as a .lowbit file (atomically: a killed save leaves any previous file
    whole); returns the path. Refuses a directory or a file that is not an artifact."""
    if not qm.calibrated:
        raise LowbitError("only a calibrated QuantModel can be saved")
    if not isinstance(qm.meta.get("recipe"), (dict, str)):
        # load rebuilds the network from the recipe; a header without one cannot be loaded
        raise ArtifactError("cannot save a QuantModel without a recipe (qm.meta['recipe'] is not set): load rebuilds "
                            "the network from it. Build the QuantModel with lowbit.prepare(model, recipe) or "
                            "lowbit.quantize(model, recipe, calib=...) instead of QuantModel(...)")
    if metrics is not None and not isinstance(metrics, dict):
        raise ArtifactError(f"metrics is a {type(metrics).__name__}; pass a dict of metric names to values")
    saved_metrics = _json_metrics(metrics or qm.meta.get("metrics", {}))
    path = Path(path)
    check_target(path)
    arch = qm.meta.get("arch")
    packed, floats = _stored_tensors(qm)
    code_chunks, float_chunks = [], []
    code_layout: list[list[Any]] = []
    float_layout: list[list[Any]] = []
    for key, layer in packed.items():
        q = layer.weight_quantizer
        qmin, _ = q.code_range()
        code_chunks.append(pack_codes(q.codes(layer.weight).numpy(), q.bits, qmin))
        code_layout.append([key, list(layer.weight.shape), q.bits, qmin])
    for key, t in floats.items():
        float_chunks.append(t.detach().float().reshape(-1).numpy())
        float_layout.append([key, list(t.shape)])
    codes = np.concatenate(code_chunks) if code_chunks else np.zeros(0, np.uint8)
    floats_arr = np.concatenate(float_chunks).astype(np.float32) if float_chunks else np.zeros(0, np.float32)
    header = {
        "format": FORMAT, "version": FORMAT_VERSION, "arch": arch, "recipe": _compact_recipe(qm.meta.get("recipe")),
        # a_quantizer is left out: each quantizer's own entry below says its method
        "layers": [{k: v for k, v in row.items() if k != "a_quantizer"} for row in qm.layers.rows()],
        "quantizers": {n: {"bits": q.bits, "signed": q.signed, "enabled": q.enabled, "calibrated": q.calibrated,
                           "spec": q.spec.to_dict(), "method": getattr(q, "method", "uniform"),
                           **({"kind": q.kind} if isinstance(q, CodebookQuantizer) else {})}
                       for n, q in _quantizers(qm).items()},
        "float_weights": [r.name for r in qm.layers if not r.layer.quantize_weight],
        # in buffer order; offsets and counts follow from the shapes and bit widths
        "layout": {"codes": code_layout, "floats": float_layout},
        "metrics": saved_metrics,
    }
    header["sha256"] = _digest(codes, floats_arr, header)
    blob = np.frombuffer(header_codec.encode(header), dtype=np.uint8)
    tensors = {"codes": codes, "floats": floats_arr, "header": blob}
    try:  # safetensors reports a full disk or an oversized file as SafetensorError, not OSError
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata={"lowbit": str(FORMAT_VERSION)}),
                         prefix=".", suffix=".tmp")
    except (OSError, SafetensorError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else err
        raise ArtifactError(f"cannot write {path}: {reason} (any previous file there is left as it was)") from None
    return path


def _json_metrics(metrics: Any, where: str = "metrics") -> Any:
    """``metrics`` as the JSON header holds them: a 0-d numpy or torch scalar (what an evaluation returns,
    e.g. ``np.float32``) becomes its Python number; anything else JSON cannot hold is an ArtifactError naming
    its key (it was a raw TypeError from deep inside the header encoder)."""
    if isinstance(metrics, (np.generic, np.ndarray, torch.Tensor)):
        if metrics.ndim != 0:
            raise ArtifactError(f"{where} is a {type(metrics).__name__} of shape {list(metrics.shape)}; a saved "
                                "metric is a number, a string or a list/dict of them")
        return metrics.item()
    if metrics is None or isinstance(metrics, (str, bool, int, float)):
        return metrics
    if isinstance(metrics, dict):
        for key in metrics:
            if not isinstance(key, str):
                raise ArtifactError(f"{where} has the key {key!r}; metric names are strings")
        return {k: _json_metrics(v, f"{where}[{k!r}]") for k, v in metrics.items()}
    if isinstance(metrics, (list, tuple)):
        return [_json_metrics(v, f"{where}[{i}]") for i, v in enumerate(metrics)]
    raise ArtifactError(f"{where} is a {type(metrics).__name__}; a saved metric is a number, a string or a "
                        "list/dict of them")


def _builtin_description(name: Any) -> str | None:
    from lowbit.recipes.recipe import builtin_names, load_recipe

    return load_recipe(name).description if isinstance(name, str) and name in builtin_names() else None


def _compact_recipe(recipe: Any) -> Any:
    """The recipe as the header keeps it: a built-in's unchanged description is left out (its
    name brings it back on load). On a 1-bit ResNet-20 that text is ~0.6% of the file."""
    if isinstance(recipe, dict) and recipe.get("description") is not None \
            and recipe.get("description") == _builtin_description(recipe.get("name")):
        return {k: v for k, v in recipe.items() if k != "description"}
    return recipe


def _full_recipe(recipe: Any) -> Any:
    """Inverse of _compact_recipe: a built-in's description back where the header left it out."""
    if isinstance(recipe, dict) and "description" not in recipe:
        text = _builtin_description(recipe.get("name"))
        if text is not None:
            return {"name": recipe["name"], "description": text, **{k: v for k, v in recipe.items() if k != "name"}}
    return recipe


def _listing(folder: Path, suffix: str) -> str:
    found = sorted(p.name for p in folder.glob(f"*{suffix}"))[:10]
    return f" (it holds: {', '.join(found)})" if found else f" (it holds no {suffix} file)"


def read_header(path: str | Path) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
    """Header and the two buffers, with format, version, checksum and the header's structure
    verified (so callers may index it without guarding every key)."""
    path = Path(path)
    if path.is_dir():
        raise ArtifactError(f"{path} is a directory; pass the path of a .lowbit file inside it"
                            + _listing(path, ".lowbit"))
    if not path.is_file():
        raise ArtifactError(f"{path} does not exist")
    try:
        with safe_open(str(path), framework="numpy") as f:
            meta = f.metadata() or {}
            if "lowbit" not in meta:
                raise ArtifactError(f"{path} is a safetensors file but not a .lowbit artifact (no lowbit header)")
            codes, floats = f.get_tensor("codes"), f.get_tensor("floats")
            blob = f.get_tensor("header").tobytes() if "header" in f.keys() else None
    except SafetensorError as err:
        raise ArtifactError(f"{path} is corrupt or truncated: {err}") from None
    except (OSError, ValueError) as err:
        raise ArtifactError(f"{path} cannot be read as a .lowbit file: {err}") from None
    for name, arr, dtype in (("codes", codes, np.uint8), ("floats", floats, np.float32)):
        if arr.dtype != dtype or arr.ndim != 1:
            raise ArtifactError(f"{path}: tensor {name!r} is {arr.dtype} of shape {list(arr.shape)}; a .lowbit file "
                                f"stores it as 1-D {np.dtype(dtype).name}")
    try:  # formats 3 and 4 keep the header as a tensor; 1 and 2 as base64 text in the metadata
        header = header_codec.decode(blob) if blob is not None else header_codec.decode_legacy(meta["lowbit"])
    except (ValueError, zlib.error) as err:
        raise ArtifactError(f"{path}: the lowbit header is corrupt ({err})") from None
    if header.get("format") != FORMAT:
        raise ArtifactError(f"{path}: not a lowbit artifact (format {header.get('format')!r})")
    version = header.get("version")
    if not _is_int(version) or version not in READABLE_VERSIONS:
        raise ArtifactError(f"{path}: format version {version} is not supported by this lowbit "
                            f"(reads versions {', '.join(map(str, READABLE_VERSIONS))})")
    covered = header if version >= 2 else None
    if _digest(codes, floats, covered) != header.get("sha256"):
        what = "the header or the tensor data" if covered is not None else "the tensor data"
        raise ArtifactError(f"{path}: checksum mismatch — {what} was altered or damaged")
    if isinstance(header.get("layout"), dict):
        header["layout"] = _expand_layout(path, header["layout"])
    _check_header(path, header)
    _check_layout(path, header, codes, floats)
    return header, codes, floats


def _is_int(value: Any) -> bool:
    """An integer as JSON gives one (True/False are bools, not widths or counts)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _is_shape(value: Any) -> bool:
    return isinstance(value, list) and all(_is_int(d) and d >= 0 for d in value)


def _expand_layout(path: Path, compact: dict[str, Any]) -> list[dict[str, Any]]:
    """Format 3's ``{"codes": [[key, shape, bits, qmin]...], "floats": [[key, shape]...]}``
    as the entries (with offsets and counts) that earlier formats stored."""
    entries, offsets = [], {"codes": 0, "floats": 0}
    for store, width in (("codes", 4), ("floats", 2)):
        items = compact.get(store, [])
        if not isinstance(items, list):
            raise ArtifactError(f"{path}: the header's layout is malformed ({store!r} is not a list)")
        for n, item in enumerate(items):
            fields = ("key, shape, bits, qmin" if store == "codes" else "key, shape")
            if not (isinstance(item, list) and len(item) == width and isinstance(item[0], str) and _is_shape(item[1])
                    and all(_is_int(v) for v in item[2:])):
                raise ArtifactError(f"{path}: the header's layout is malformed ({store} entry {n} is {item!r:.80}, "
                                    f"not [{fields}] with a shape of non-negative integers)")
            key, shape = item[0], item[1]
            count = math.prod(shape)
            e = {"key": key, "store": store, "offset": offsets[store], "count": count, "shape": shape}
            if store == "codes":
                e["bits"], e["qmin"] = item[2], item[3]
                offsets[store] += packed_nbytes(count, e["bits"]) if 1 <= e["bits"] <= 8 else 0
            else:
                offsets[store] += count
            entries.append(e)
    return entries


def _check_header(path: Path, header: dict[str, Any]) -> None:
    """The header's structure, checked once after reading so that crafted or damaged JSON
    fails here with the key named instead of as a KeyError/TypeError deep inside load: rows
    with integer bit widths, quantizer states with their flags, layout entries with integer
    offsets, counts and shapes."""
    def bad(what: str) -> ArtifactError:
        return ArtifactError(f"{path}: the header is malformed: {what}")

    for key in ("layers", "quantizers", "layout", "recipe"):
        if key not in header:
            raise ArtifactError(f"{path}: the header has no {key!r} entry")
    if header["recipe"] is None:
        raise ArtifactError(f"{path}: the header holds no recipe (it was saved from a QuantModel built without one), "
                            "so load cannot rebuild the network; quantize again with lowbit.prepare/lowbit.quantize "
                            "and a recipe, and save that")
    if not isinstance(header["recipe"], (dict, str)):
        raise bad(f"'recipe' is {type(header['recipe']).__name__}, not a recipe (dict) or a recipe name")
    arch = header.get("arch")
    if arch is not None and not (isinstance(arch, dict) and isinstance(arch.get("name"), str)
                                 and isinstance(arch.get("kwargs", {}), dict)):
        raise bad(f"'arch' is {arch!r:.80}, not {{\"name\": str, \"kwargs\": dict}} or null")
    if not isinstance(header.get("metrics", {}), dict):
        raise bad("'metrics' is not a dict")
    layers = header["layers"]
    if not isinstance(layers, list) or not all(isinstance(r, dict) for r in layers):
        raise bad("'layers' is not a list of rows (dicts)")
    for n, row in enumerate(layers):
        name = row.get("name")
        if not isinstance(name, str):
            raise bad(f"layers[{n}] has no 'name'")
        for key in ("w_bits", "a_bits"):
            if not _is_int(row.get(key)):
                raise bad(f"layer {name!r}: {key!r} is {row.get(key)!r}, not an integer")
        if row.get("macs") is not None and not _is_int(row["macs"]):
            raise bad(f"layer {name!r}: 'macs' is {row['macs']!r}, not an integer")
    quantizers = header["quantizers"]
    if not isinstance(quantizers, dict):
        raise bad("'quantizers' is not a dict of quantizer states")
    for name, state in quantizers.items():
        if not isinstance(state, dict):
            raise bad(f"quantizer {name!r}: its state is {state!r:.40}, not a dict")
        if not _is_int(state.get("bits")):
            raise bad(f"quantizer {name!r}: 'bits' is {state.get('bits')!r}, not an integer")
        for key in ("enabled", "calibrated"):
            if not isinstance(state.get(key), bool):
                raise bad(f"quantizer {name!r}: {key!r} is {state.get(key)!r}, not true or false")
        if "signed" not in state or not (state["signed"] is None or isinstance(state["signed"], bool)):
            raise bad(f"quantizer {name!r}: 'signed' is {state.get('signed')!r}, not true, false or null")
        for key, kind in (("spec", dict), ("method", str), ("kind", str)):
            if key in state and not isinstance(state[key], kind):
                raise bad(f"quantizer {name!r}: {key!r} is {state[key]!r:.40}, not a {kind.__name__}")
    layout = header["layout"]
    if not isinstance(layout, list) or not all(isinstance(e, dict) for e in layout):
        raise bad("'layout' is not a list of tensor entries (dicts)")
    for n, e in enumerate(layout):
        key = e.get("key")
        if not isinstance(key, str):
            raise bad(f"layout entry {n} has no 'key'")
        if e.get("store") not in ("codes", "floats"):
            raise bad(f"tensor {key!r}: 'store' is {e.get('store')!r}, not 'codes' or 'floats'")
        if not _is_shape(e.get("shape")):
            raise bad(f"tensor {key!r}: 'shape' is {e.get('shape')!r:.80}, not a list of non-negative integers")
        for field in ("offset", "count") + (("bits", "qmin") if e["store"] == "codes" else ()):
            if not _is_int(e.get(field)):
                raise bad(f"tensor {key!r}: {field!r} is {e.get(field)!r}, not an integer")


def _check_layout(path: Path, header: dict[str, Any], codes: np.ndarray, floats: np.ndarray) -> None:
    """The header agrees with the stored tensors: one entry per key, every entry inside its
    buffer, shapes that hold its count, bit widths and code ranges that exist."""
    seen: set[str] = set()
    for e in header["layout"]:
        key = e["key"]
        if key in seen:
            raise ArtifactError(f"{path}: tensor {key!r} appears twice in the layout (one of them would be ignored)")
        seen.add(key)
        size = codes.size if e["store"] == "codes" else floats.size
        count = e["count"]
        if count < 0 or math.prod(e["shape"]) != count:
            raise ArtifactError(f"{path}: tensor {key!r} has shape {e['shape']} but {count} values")
        need = count
        if e["store"] == "codes":
            bits, qmin = e["bits"], e["qmin"]
            if not 1 <= bits <= 8 or qmin not in (0, -(2 ** (bits - 1)), -(2 ** (bits - 1)) + 1):
                raise ArtifactError(f"{path}: tensor {key!r} claims {bits}-bit codes from {qmin}: no such grid")
            need = packed_nbytes(count, bits)
        if e["offset"] < 0 or e["offset"] + need > size:
            raise ArtifactError(f"{path}: tensor {key!r} lies outside the stored data (truncated or altered)")


def load(path: str | Path, model: nn.Module | None = None) -> QuantModel:
    """Rebuild the saved QuantModel; outputs equal the saved model's bit for bit.

    Zoo models rebuild themselves from the header; for other models pass the float
    architecture as ``model``. The stored weights replace the model's; the model's own weights
    become the float reference that steps comparing with the float network read (bias
    correction, GPTQ's float target, reconstruction, the analyzer, distillation), so pass the
    trained float model to run those on a loaded artifact; without one they are refused.
    """
    from lowbit.api import prepare

    header, codes, floats = read_header(path)
    given = model is not None
    if model is None:
        model = _build_from_header(Path(path), header)
    qm = prepare(model, header["recipe"])
    if not given:  # the rebuilt network's own weights are its random initialisation, not a float reference
        qm.no_float_reference = (f"{Path(path).name} was loaded without its float model (an artifact stores the "
                                 "quantized weights only); load it with load(path, model=<the float model>) to "
                                 "correct, reconstruct, analyse or distil against the float network")
    stored_layers = [r["name"] for r in header["layers"]]
    if qm.layers.names() != stored_layers:
        raise ArtifactError(f"{path}: its layers do not match the model's: "
                            f"{_first_difference(stored_layers, qm.layers.names())}")
    _check_shapes(path, qm, header)
    for row in header["layers"]:
        rec = qm.layers[row["name"]]
        try:
            rec.w_bits, rec.a_bits = row["w_bits"], row["a_bits"]
        except LowbitError as err:
            raise ArtifactError(f"{path}: layer {row['name']!r}: {err}") from None
        if "macs" in row:
            rec.layer.macs = row["macs"]
    quantizers = _quantizers(qm)
    unknown = sorted(set(header["quantizers"]) - set(quantizers))
    if unknown:
        raise ArtifactError(f"{path}: quantizers {unknown[:5]} are not in the rebuilt model: it was saved from "
                            "another model or recipe layout")
    missing = sorted(set(quantizers) - set(header["quantizers"]))
    if missing:
        raise ArtifactError(f"{path}: the header has no state for quantizers {missing[:5]} of the rebuilt model: it "
                            "was saved from another model or recipe layout, or edited")
    entries = {e["key"]: e for e in header["layout"]}
    for name, state in header["quantizers"].items():  # codebooks replace the recipe's uniform grids
        if state.get("kind") == "codebook":
            table = entries.get(f"{name}.centroids")
            if table is None or table["store"] != "floats":
                raise ArtifactError(f"{path}: codebook quantizer {name!r} has no centroids")
            if "spec" not in state:
                raise ArtifactError(f"{path}: codebook quantizer {name!r} has no 'spec'")
            try:
                book = CodebookQuantizer(QuantSpec.from_dict(state["spec"]), torch.zeros(table["shape"]), name=name)
            except (LowbitError, TypeError, ValueError) as err:
                raise ArtifactError(f"{path}: codebook quantizer {name!r} cannot be rebuilt: {err}") from None
            qm.replace_quantizer(quantizers[name], book)
            quantizers[name] = book
        elif state.get("kind", "uniform") != "uniform":
            raise ArtifactError(f"{path}: quantizer {name!r} has kind {state['kind']!r}, which this lowbit does not know")
    weight_quantizers = {id(r.layer.weight_quantizer) for r in qm.layers}
    for name, state in header["quantizers"].items():
        q = quantizers[name]
        try:
            # the grid QAT deployed (e.g. μL2Q's mid-rise), not only the recipe's
            if "spec" in state and not isinstance(q, CodebookQuantizer):
                q.spec = QuantSpec.from_dict(state["spec"])
            q.set_bits(state["bits"])
        except (LowbitError, TypeError) as err:
            raise ArtifactError(f"{path}: quantizer {name!r} has an invalid spec: {err}") from None
        if q.spec.per_channel and id(q) not in weight_quantizers:
            # recipes refuse per-channel activations and nothing runs them: such a file loaded, then failed
            # at its first forward with a raw size mismatch
            raise ArtifactError(f"{path}: activation quantizer {name!r} is per channel in the header (or has a "
                                "per-channel codebook); activation quantizers are per tensor")
        q.signed, q.enabled = state["signed"], state["enabled"]
        q.method = str(state.get("method", "uniform"))
    _add_learned_biases(path, qm, entries)
    _check_entries(path, qm, header, entries)
    params = dict(qm.state_dict())
    weights = {id(r.layer.weight_quantizer): r.layer.weight for r in qm.layers}

    def float_tensor(entry: dict[str, Any]) -> torch.Tensor:
        start = entry["offset"]
        return torch.from_numpy(floats[start: start + entry["count"]].copy()).reshape(entry["shape"])

    unread = _unread_quantizers(qm)
    with torch.no_grad():
        for name, q in quantizers.items():
            if name in unread and not isinstance(q, CodebookQuantizer):
                # nothing reads its grid: left uncalibrated (re-enabling it then asks for a calibration
                # instead of running a placeholder scale); files before this change stored one, ignored
                q.calibrated = False
                continue
            if not header["quantizers"][name]["calibrated"] or name in unread:
                continue
            scale = float_tensor(entries[f"{name}.scale"])
            zp_entry = entries.get(f"{name}.zero_point")
            zero_point = float_tensor(zp_entry) if zp_entry else torch.zeros_like(scale)
            _check_scale(path, name, q, scale, zero_point, weights.get(id(q)))
            q.set_params(scale, zero_point)
        # floats first: a codebook's centroids must be in place (and checked) before its indices decode
        for key, entry in entries.items():
            if entry["store"] == "floats" and (not key.endswith((".scale", ".zero_point"))
                                               or key.rsplit(".", 1)[0] not in quantizers):
                params[key].copy_(float_tensor(entry))
        for name, q in quantizers.items():
            if isinstance(q, CodebookQuantizer):
                _check_codebook(path, name, q, weights.get(id(q)))
        layers = _packed_weights(qm)
        for key, entry in entries.items():
            if entry["store"] != "codes":
                continue
            layer = layers[key]
            qmin, qmax = layer.weight_quantizer.code_range()
            nbytes = packed_nbytes(entry["count"], entry["bits"])
            c = unpack_codes(codes[entry["offset"]: entry["offset"] + nbytes], entry["count"], entry["bits"], entry["qmin"])
            if c.size and (int(c.min()) < qmin or int(c.max()) > qmax):
                raise ArtifactError(f"{path}: tensor {key!r} holds codes in [{int(c.min())}, {int(c.max())}], outside "
                                    f"its quantizer's range [{qmin}, {qmax}]")
            layer.weight.copy_(layer.weight_quantizer.dequantize(torch.from_numpy(c).reshape(entry["shape"])))
    uncalibrated = [n for n, q in quantizers.items()
                    if not q.calibrated and (q.enabled if id(q) not in weights else _quantizes_weight(qm, q))]
    if uncalibrated:
        raise ArtifactError(f"{path}: quantizers {uncalibrated[:5]} are in use but the header says they are not "
                            "calibrated (a saved model is always calibrated)")
    qm.meta.update({"arch": header.get("arch"), "recipe": _full_recipe(header["recipe"]),
                    "metrics": header.get("metrics", {})})
    return qm


def _first_difference(stored: list[str], built: list[str]) -> str:
    """Where two layer lists part, in a line (a crafted depth listed every one of thousands of names)."""
    i = next((i for i, (a, b) in enumerate(zip(stored, built)) if a != b), min(len(stored), len(built)))
    at = lambda names: repr(names[i]) if i < len(names) else "nothing"  # noqa: E731
    return (f"layer {i} is {at(stored)} in the file and {at(built)} in the model ({len(stored)} layers in the file, "
            f"{len(built)} in the model)")


class _ElementBudget(TorchFunctionMode):
    """Counts the elements of the tensors factory functions create and stops past ``limit``: building a
    header's architecture on the meta device costs no memory, but a crafted depth still made the
    constructor create millions of modules (minutes of Python, gigabytes of objects) before any check."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit, self.count = limit, 0

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if func in _FACTORIES and isinstance(out, torch.Tensor):
            self.count += out.numel()
            if self.count > self.limit:
                raise _OverBudget
        return out


class _OverBudget(Exception):
    """The architecture asks for more tensor elements than the file can account for."""


_FACTORIES = {torch.empty, torch.zeros, torch.ones, torch.full, torch.rand, torch.randn, torch.randint, torch.tensor,
              torch.as_tensor, torch.arange, torch.empty_strided, torch.eye, torch.linspace}


def _build_from_header(path: Path, header: dict[str, Any]) -> nn.Module:
    """The zoo model the header's ``arch`` names. Built first on the meta device (no memory), under a
    budget of tensor elements the file's stored values account for, and compared with the file's layout;
    only a model that matches is then built for real. Without this, crafted kwargs (num_classes=10**12,
    width=128, depth=2000) allocated gigabytes or ran for minutes before any check, or failed raw
    (num_classes=-1: a RuntimeError)."""
    from lowbit.zoo import build

    arch = header.get("arch")
    if not arch:
        raise ArtifactError(f"{path} holds no architecture name: pass the float model, load(path, model=...)")
    name, kwargs = arch["name"], arch.get("kwargs", {})
    what = f"architecture {name!r}" + (f" with {kwargs!r:.200}" if kwargs else "")
    stored = sum(e["count"] for e in header["layout"])
    # A float network holds about what its artifact stores (a folded BN's four statistics per channel
    # become a bias and a scale): 4x and a MiB of elements leave room, and still bound the work.
    limit = 4 * stored + (1 << 20)
    try:
        with torch.device("meta"), _ElementBudget(limit):
            shadow = build(name, **kwargs)
    except _OverBudget:
        raise ArtifactError(f"{path}: {what} would hold more than {limit} parameter values, far more than the "
                            f"{stored} the file stores: the header was altered or belongs to another model") from None
    except Exception as err:  # noqa: BLE001 - whatever the constructor raises on the header's kwargs
        raise ArtifactError(f"{path}: {what} cannot be built from the header ({_reason(err)})") from None
    _check_architecture(path, header, shadow, what)
    try:
        return build(name, **kwargs)
    except Exception as err:  # noqa: BLE001 - as above, now allocating
        raise ArtifactError(f"{path}: {what} cannot be built from the header ({_reason(err)})") from None


def _reason(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:200] if text else type(err).__name__


def _check_architecture(path: Path, header: dict[str, Any], model: nn.Module, what: str) -> None:
    """Every Conv/Linear of ``model`` (on the meta device) has a stored weight, and every tensor of it
    the layout names has the stored shape (in the QuantModel a wrapped layer's ``x.weight`` is
    ``net.x.module.weight``, any other ``y`` is ``net.y``). Under a widening recipe (WRPN) the stored
    layers are wider than the float model's, so only the names are compared."""
    from lowbit.recipes.recipe import load_recipe

    try:
        widen = load_recipe(header["recipe"]).widen
    except LowbitError:
        widen = 1  # prepare names the recipe's problem
    shapes = {e["key"]: e["shape"] for e in header["layout"]}
    layers = {n for n, m in model.named_modules() if isinstance(m, QUANTIZABLE)}
    differ: list[str] = []
    unstored: list[str] = []
    for key, t in model.state_dict().items():
        owner, _, leaf = key.rpartition(".")
        stored = next((shapes[k] for k in (f"net.{owner}.module.{leaf}", f"net.{key}") if k in shapes), None)
        if stored is None:
            if owner in layers and leaf == "weight":
                unstored.append(owner)
        elif widen == 1 and list(t.shape) != stored:
            differ.append(f"{key} is {list(t.shape)} in the model and {stored} in the file")
    if unstored or differ:
        first = (f"layer {unstored[0]!r}" + (f" and {len(unstored) - 1} more" if len(unstored) > 1 else "")
                 + " of the model have no stored weight" if unstored
                 else differ[0] + (f" ({len(differ) - 1} more tensors differ)" if len(differ) > 1 else ""))
        raise ArtifactError(f"{path}: the header's {what} does not match the stored tensors: {first}; the header was "
                            "altered or belongs to another model")


def _quantizes_weight(qm: QuantModel, q: UniformQuantizer) -> bool:
    return any(r.layer.weight_quantizer is q and r.layer.quantize_weight for r in qm.layers)


def _check_shapes(path: Path, qm: QuantModel, header: dict[str, Any]) -> None:
    """A model with the same layer names but other widths: name the first layer that differs."""
    params = {k: tuple(v.shape) for k, v in qm.state_dict().items()}
    quantizer_params = {f"{n}.{b}" for n in _quantizers(qm) for b in ("scale", "zero_point")}  # checked on load
    layer_of = {f"{n}.": r.name for r in qm.layers for n, m in qm.named_modules() if m is r.layer}
    for e in header["layout"]:
        key, shape = e["key"], tuple(e["shape"])
        if key in params and params[key] != shape and key not in quantizer_params:
            layer = next((v for k, v in layer_of.items() if key.startswith(k)), key)
            raise ArtifactError(f"{path}: layer {layer!r}: the file holds {key.rsplit('.', 1)[-1]} of shape "
                                f"{list(shape)}, the model's is {list(params[key])}")


def _check_entries(path: Path, qm: QuantModel, header: dict[str, Any], entries: dict[str, dict[str, Any]]) -> None:
    """The layout names exactly what this model stores: one codes entry per quantized weight,
    at its quantizer's (bits, qmin), and one float entry per float state tensor. Without this a
    missing entry left the rebuilt network's own (random) tensor in place, silently."""
    packed, stored_floats = _stored_tensors(qm)
    params = qm.state_dict()
    quantizer_params = {f"{n}.{b}" for n in _quantizers(qm) for b in ("scale", "zero_point")}  # see _check_scale
    unread = _unread_keys(qm)  # stored by files written before they were left out: ignored
    for key, e in entries.items():
        if key not in params:
            raise ArtifactError(f"{path}: tensor {key!r} does not exist in the rebuilt model")
        if e["store"] == "floats" and key in unread:
            continue
        if e["store"] == "floats" and key not in stored_floats:
            raise ArtifactError(f"{path}: tensor {key!r} is stored as floats, but the model stores it "
                                + ("as codes" if key in packed else "nowhere (it is constant or not a float tensor)"))
        if e["store"] == "codes":
            if key not in packed:
                raise ArtifactError(f"{path}: tensor {key!r} is stored as codes, but it is not a quantized weight of "
                                    "the model (its layer row says float, or the entry names another tensor)")
            q = packed[key].weight_quantizer
            try:
                qmin, _ = q.code_range()
            except LowbitError as err:
                raise ArtifactError(f"{path}: tensor {key!r}: {err}") from None
            if (e["bits"], e["qmin"]) != (q.bits, qmin):
                raise ArtifactError(f"{path}: tensor {key!r} holds {e['bits']}-bit codes from {e['qmin']}, but its "
                                    f"quantizer's grid is {q.bits}-bit from {qmin}")
        elif tuple(e["shape"]) != tuple(params[key].shape) and key not in quantizer_params:
            raise ArtifactError(f"{path}: tensor {key!r} has shape {e['shape']}, the model's is "
                                f"{list(params[key].shape)}")
    for key, layer in packed.items():
        if entries.get(key, {}).get("store") != "codes":
            raise ArtifactError(f"{path}: the quantized weight {key!r} has no codes entry (the layer would keep the "
                                "rebuilt model's weights)")
    for key in stored_floats:
        if entries.get(key, {}).get("store") != "floats":
            raise ArtifactError(f"{path}: tensor {key!r} of the model has no float entry (it would keep the rebuilt "
                                "model's value)")


def _check_scale(path: Path, name: str, q: UniformQuantizer, scale: torch.Tensor, zero_point: torch.Tensor,
                 weight: torch.Tensor | None) -> None:
    """A step that a grid can use: finite and positive (0 gave NaN outputs, a negative one a
    mirrored grid), one value or one per channel (a [2, 4] scale for 8 channels loaded, then
    failed at the first forward), and a finite zero point of the same size."""
    if not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
        raise ArtifactError(f"{path}: quantizer {name!r} has a scale that is not finite and positive "
                            f"(min {float(scale.min()) if scale.numel() else 'none'})")
    one_axis = sum(d != 1 for d in scale.shape) <= 1
    if weight is not None:  # a weight quantizer: one step, or one per output channel
        axis = q.spec.ch_axis
        channels = weight.shape[axis] if axis < weight.dim() else None
        fits = scale.numel() == 1 or (channels is not None and scale.numel() == channels)
        want = f"[] or [{channels}]" if channels is not None else "[]"
    else:  # an activation quantizer: per tensor (load refuses a per-channel one)
        fits, want = scale.numel() == 1, "[]"
    if not (one_axis and fits):
        raise ArtifactError(f"{path}: quantizer {name!r} has a scale of shape {list(scale.shape)}; it takes {want}")
    if not bool(torch.isfinite(zero_point).all()) or zero_point.numel() not in (1, scale.numel()) \
            or sum(d != 1 for d in zero_point.shape) > 1:
        raise ArtifactError(f"{path}: quantizer {name!r} has a zero point of shape {list(zero_point.shape)} that is "
                            f"not finite or does not match its scale's {list(scale.shape)}")


def _check_codebook(path: Path, name: str, q: CodebookQuantizer, weight: torch.Tensor | None) -> None:
    """Centroids as the quantizer keeps them: finite and sorted (codes() bisects them; reversed
    ones decoded the stored weight differently from the one the layer then ran), and one table
    per output channel when per channel."""
    c = q.centroids
    if not bool(torch.isfinite(c).all()) or not bool((c[..., 1:] >= c[..., :-1]).all()):
        raise ArtifactError(f"{path}: codebook quantizer {name!r} has centroids that are not finite and sorted")
    if c.dim() == 2 and weight is not None and c.shape[0] != weight.shape[0]:
        raise ArtifactError(f"{path}: codebook quantizer {name!r} has {c.shape[0]} tables for a weight with "
                            f"{weight.shape[0]} output channels")


def _add_learned_biases(path: Path, qm: QuantModel, entries: dict[str, Any]) -> None:
    """Bias correction gives bias-free layers a bias; the rebuilt model needs the slot, and
    the float network it stands for had none: its float value is 0 (float_reference)."""
    for r in qm.layers:
        key = next((k for k, m in qm.named_modules() if m is r.layer.module), None)
        bias_key = f"{key}.bias"
        module = r.layer.module
        if key is not None and module.bias is None and bias_key in entries:
            shape = entries[bias_key]["shape"]
            out = getattr(module, "out_channels", getattr(module, "out_features", None))
            if out is not None and shape != [out]:
                raise ArtifactError(f"{path}: tensor {bias_key!r} has shape {shape}; layer {r.name!r} has {out} outputs")
            module.bias = torch.nn.Parameter(torch.zeros(shape))
            qm.register_float_param(module.bias, torch.zeros(shape))
