"""A mixed-precision plan: bits per layer as plain data, applied through the layer table.

A plan is ``{layer name: {"w_bits": b, "a_bits": b}}`` (32 = float), optionally with a
weight quantizer kind per layer (``"w_quantizer": "twn"``), so one plan may mix kinds. It is saved as JSON
(no pickle: plans are shared between people), validated on load, and applied after the
recipe's own first/last and pattern overrides, so a plan always has the last word.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

from lowbit.errors import BitsError, LowbitError, RecipeError
from lowbit.model.layer_table import FLOAT_BITS, LayerTable
from lowbit.quant.registry import check_kind
from lowbit.quant.spec import MAX_BITS
from lowbit.state_io import atomic_write_text

PLAN_FORMAT = "lowbit-plan/1"
ARCHITECTURE_KEY = "architecture"  # in a plan's meta: the quantizable layers it was searched on, name -> weights
BIT_KEYS = ("w_bits", "a_bits")
KIND_KEY = "w_quantizer"


def write_text_file(path: Path, text: str) -> None:
    """Write ``text`` at ``path``: a regular file (or a new one) atomically, so a killed save leaves the old
    file whole; a symlink, a pipe or a device written through, since replacing it would cut the link (or
    fail on /dev/stdout) instead of writing where the user pointed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.is_symlink() or (path.exists() and not path.is_file()):
        path.write_text(text)
    else:
        atomic_write_text(path, text)


def check_plan_bits(value: Any, where: str) -> int:
    """1..8 or 32 (float). 1 weight bit is binary (see weight_spec_at); activation grids
    reject 1 bit when the plan is applied."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise BitsError(f"{where} must be an integer bit width, got {value!r}")
    if value != FLOAT_BITS and not 1 <= value <= MAX_BITS:
        raise BitsError(f"{where}={value} is outside 1..{MAX_BITS} (or {FLOAT_BITS} to keep float)")
    return value


@dataclass
class Plan:
    """Bits per layer name, in network order, plus free-form provenance (method, budget)."""

    layers: dict[str, dict[str, Any]]
    meta: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], where: str = "plan") -> "Plan":
        """Accepts the saved form ``{"format", "layers", "meta"}`` or a bare layer mapping."""
        if not isinstance(data, Mapping):
            raise RecipeError(f"{where} must be a mapping of layer name -> {{w_bits, a_bits}}")
        meta: dict[str, Any] = {}
        layers_data: Any = data
        if "layers" in data:
            fmt = data.get("format", PLAN_FORMAT)
            if fmt != PLAN_FORMAT:
                raise RecipeError(f"{where}: unknown plan format {fmt!r} (expected {PLAN_FORMAT!r})")
            layers_data, meta_data = data["layers"], data.get("meta") or {}
            if not isinstance(meta_data, Mapping):  # dict() of a list or a string raised a raw TypeError/ValueError
                raise RecipeError(f"{where}.meta must be a mapping (method, budget, ...), "
                                  f"got {type(meta_data).__name__}")
            meta = dict(meta_data)
            if not isinstance(layers_data, Mapping):
                raise RecipeError(f"{where}.layers must be a mapping of layer name -> {{w_bits, a_bits}}")
        layers: dict[str, dict[str, int]] = {}
        for name, bits in layers_data.items():
            if not isinstance(bits, Mapping) or not bits:
                raise RecipeError(f"{where}[{name!r}] must be a mapping with w_bits and/or a_bits")
            unknown = set(bits) - set(BIT_KEYS) - {KIND_KEY}
            if unknown:
                raise RecipeError(f"{where}[{name!r}]: unknown key(s) {sorted(unknown)}; allowed: "
                                  f"{[*BIT_KEYS, KIND_KEY]}")
            entry: dict[str, Any] = {k: check_plan_bits(bits[k], f"{where}[{name!r}].{k}") for k in BIT_KEYS if k in bits}
            if bits.get(KIND_KEY) is not None:
                entry[KIND_KEY] = check_kind(bits[KIND_KEY], "weights", f"{where}[{name!r}].weights")
            layers[str(name)] = entry
        return cls(layers, meta)

    @classmethod
    def from_table(cls, table: LayerTable, **meta: Any) -> "Plan":
        return cls(table.plan(), dict(meta))

    def to_dict(self) -> dict[str, Any]:
        return {"format": PLAN_FORMAT, "layers": self.layers, "meta": self.meta}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        write_text_file(path, json.dumps(self.to_dict(), indent=2))
        return path

    def apply(self, table: LayerTable) -> None:
        """Set every listed layer's bits; an unknown layer name is an error, not a skip."""
        names = set(table.names())
        missing = [n for n in self.layers if n not in names]
        if missing:
            raise LowbitError(f"plan names layer(s) {missing} that the model does not have; layers: {table.names()}")
        self._check_architecture(table)
        self._check_shared_inputs(table)
        for name, bits in self.layers.items():
            row = table[name]
            try:
                if "w_bits" in bits:
                    row.w_bits = bits["w_bits"]
                if "a_bits" in bits:
                    row.a_bits = bits["a_bits"]
                if KIND_KEY in bits:  # after the bits: a binary/ternary kind checks them
                    row.w_quantizer = bits[KIND_KEY]
            except BitsError as err:
                raise BitsError(f"plan layer {name!r}: {err}") from None

    def _check_architecture(self, table: LayerTable) -> None:
        """A searched plan records the layers it was searched on. Applied to another network whose layer names
        include them (a ResNet-20 plan on a ResNet-32, or on a widened ResNet-20) it would pass the name check
        and give bits chosen for other layers and sizes; that is refused. Hand-written plans record none."""
        recorded = self.meta.get(ARCHITECTURE_KEY)
        if recorded is None:
            return
        if not isinstance(recorded, Mapping) or not isinstance(recorded.get("layers"), Mapping):
            raise RecipeError(f"plan meta.{ARCHITECTURE_KEY} must be {{'layers': {{name: weight count}}}}")
        made_for, here = dict(recorded["layers"]), table_params(table)
        if made_for == here:
            return
        extra = [n for n in here if n not in made_for]
        absent = [n for n in made_for if n not in here]
        resized = [f"{n} ({made_for[n]} -> {here[n]} weights)" for n in here if n in made_for and made_for[n] != here[n]]
        diffs = [f"{what}: {', '.join(names[:4])}{' ...' if len(names) > 4 else ''}"
                 for what, names in (("layers the plan does not know", extra), ("layers missing", absent),
                                     ("other sizes", resized)) if names]
        raise LowbitError(f"plan was searched on another network ({'; '.join(diffs)}): search a plan for this model, "
                          f"or delete meta.{ARCHITECTURE_KEY} from the file to apply it anyway")

    def _check_shared_inputs(self, table: LayerTable) -> None:
        """Layers reading the same tensor share one activation quantizer (the integer graph
        has one tensor): a plan that gives them different a_bits cannot be built, and one that
        sets a_bits on some readers only would silently change the others' (as an override's
        a_bits on part of them is refused), unless those already have these bits."""
        seen: dict[int, tuple[str, int]] = {}
        for name, bits in self.layers.items():
            q = table[name].input_quantizer
            if q is None or "a_bits" not in bits:
                continue
            first = seen.setdefault(id(q), (name, bits["a_bits"]))
            if first[1] != bits["a_bits"]:
                raise LowbitError(f"plan gives a_bits {first[1]} to {first[0]!r} and {bits['a_bits']} to {name!r}, "
                                  "but both read the same tensor through one activation quantizer; give them equal a_bits")
        for first, a_bits in seen.values():
            q = table[first].input_quantizer
            others = [f"{r.name!r} (at {r.a_bits})" for r in table if r.input_quantizer is q
                      and "a_bits" not in self.layers.get(r.name, {}) and r.a_bits != a_bits]
            if others:
                raise LowbitError(f"plan gives a_bits {a_bits} to {first!r}, but {', '.join(others)} read(s) the same "
                                  "tensor through one activation quantizer and the plan gives it no a_bits, so it "
                                  f"would silently change too: give every reader a_bits {a_bits} in the plan")

    def kinds(self) -> set[str]:
        """The per-layer weight kinds the plan names (k-means, binary, ... ; empty: the recipe's own)."""
        return {str(b[KIND_KEY]) for b in self.layers.values() if KIND_KEY in b}

    def weight_bits(self, params: Mapping[str, int]) -> int:
        """Stored weight-code bits of the listed layers (the size a search budgets)."""
        return sum(params[n] * b.get("w_bits", FLOAT_BITS) for n, b in self.layers.items())


def load_plan(source: "str | Path | Mapping[str, Any] | Plan") -> Plan:
    """A Plan, a mapping, or a path to a plan JSON file."""
    if isinstance(source, Plan):
        return source
    if isinstance(source, Mapping):
        return Plan.from_mapping(source)
    path = Path(source)
    if not path.is_file():
        raise RecipeError(f"plan file {path} does not exist")
    try:
        data = json.loads(path.read_text(), object_pairs_hook=_unique_keys(path))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RecipeError(f"plan file {path} is not valid JSON: {err}") from None
    return Plan.from_mapping(data, where=f"plan {path.name}")


def _unique_keys(path: Path) -> Callable[[list[tuple[str, Any]]], dict[str, Any]]:
    """A JSON object hook refusing a key written twice (a layer listed twice): json.loads keeps the last one
    without a word, so the plan would silently apply whichever the editor put last."""
    def build(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, value in pairs:
            if key in out:
                raise RecipeError(f"plan file {path}: key {key!r} appears twice in one object; give each layer "
                                  "(and each of its keys) once")
            out[key] = value
        return out
    return build


def table_params(table: LayerTable) -> dict[str, int]:
    return {r.name: r.params for r in table}


def weight_compression(table: LayerTable, plan: Plan | None = None) -> float:
    """float32 weight bits / stored weight-code bits over every quantizable layer."""
    params = table_params(table)
    bits = (plan or Plan.from_table(table)).weight_bits(params)
    return FLOAT_BITS * sum(params.values()) / bits


def architecture_of(params: Mapping[str, int]) -> dict[str, Any]:
    """What a searched plan records of its network (see Plan._check_architecture)."""
    return {"layers": {str(n): int(p) for n, p in params.items()}}
