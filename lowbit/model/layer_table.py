"""The layer table: one row per quantized layer, the only place bit widths are read from.

Rows do not copy bit widths: ``w_bits``/``a_bits`` read and write the layer's quantizers,
so mixed precision, reports, size accounting and export always agree with what runs.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Any, Iterator

from lowbit.errors import LowbitError
from lowbit.model.quant_layer import QuantLayer
from lowbit.quant.quantizer import UniformQuantizer

FLOAT_BITS = 32


@dataclass
class LayerRecord:
    name: str
    layer: QuantLayer
    input_quantizer: UniformQuantizer | None
    # under ``shortcut: stream``: the residual add's 8-bit quantizer this layer's input quantizer reads
    stream_quantizer: UniformQuantizer | None = None

    @property
    def kind(self) -> str:
        return self.layer.kind

    @property
    def params(self) -> int:
        return self.layer.weight.numel()

    @property
    def macs(self) -> int | None:
        return self.layer.macs

    @property
    def w_bits(self) -> int:
        return self.layer.weight_quantizer.bits if self.layer.quantize_weight else FLOAT_BITS

    @w_bits.setter
    def w_bits(self, bits: int) -> None:
        if bits >= FLOAT_BITS:
            self.layer.quantize_weight = False
            return
        self.layer.quantize_weight = True
        self.layer.set_weight_bits(bits)

    @property
    def a_bits(self) -> int:
        q = self.input_quantizer
        return q.bits if (q is not None and q.enabled) else FLOAT_BITS

    @a_bits.setter
    def a_bits(self, bits: int) -> None:
        q = self.input_quantizer
        if q is None:
            raise LowbitError(f"layer {self.name!r} has no input quantizer")
        stream = self.stream_quantizer
        if stream is not None and bits > stream.bits:
            raise LowbitError(f"layer {self.name!r} reads the residual stream at {stream.bits} bits (shortcut: stream: "
                              f"its input is requantized from the add's), so its input cannot have {bits} bits"
                              f"{' (float)' if bits >= FLOAT_BITS else ''}; use shortcut: real for wider inputs")
        if bits >= FLOAT_BITS:
            q.enabled = False
            return
        q.enabled = True
        q.set_bits(bits)

    @property
    def w_quantizer(self) -> str | None:
        """This layer's own weight kind (from an override or a plan), None for the recipe's."""
        return self.layer.weight_kind

    @w_quantizer.setter
    def w_quantizer(self, kind: str | None) -> None:
        self.layer.set_weight_kind(kind)

    @property
    def quantizer(self) -> str:
        """How the weights are quantized: uniform, a QAT kind (xnor, twn, lsq, ...), kmeans, ttq."""
        return getattr(self.layer.weight_quantizer, "method", "uniform") if self.layer.quantize_weight else "float"

    @property
    def a_quantizer(self) -> str:
        """How the input is quantized: uniform, a QAT kind (lsq+, bnn, hwgq, lqnet, ...) or float."""
        q = self.input_quantizer
        return getattr(q, "method", "uniform") if (q is not None and q.enabled) else "float"

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "params": self.params, "macs": self.macs,
                "w_bits": self.w_bits, "a_bits": self.a_bits, "quantizer": self.quantizer,
                "a_quantizer": self.a_quantizer}


class LayerTable:
    """Ordered rows (network execution order) with look-up by name or glob pattern."""

    def __init__(self, records: list[LayerRecord]) -> None:
        self._records = records
        self._by_name = {r.name: r for r in records}

    def __iter__(self) -> Iterator[LayerRecord]:
        return iter(self._records)

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, key: int | str) -> LayerRecord:
        if isinstance(key, int):
            return self._records[key]
        if key not in self._by_name:
            raise KeyError(f"no quantized layer named {key!r}; layers: {list(self._by_name)}")
        return self._by_name[key]

    def names(self) -> list[str]:
        return [r.name for r in self._records]

    def match(self, pattern: str) -> list[LayerRecord]:
        return [r for r in self._records if fnmatch.fnmatchcase(r.name, pattern)]

    def rows(self) -> list[dict[str, Any]]:
        return [r.as_dict() for r in self._records]

    def plan(self) -> dict[str, dict[str, Any]]:
        """Bits (and any per-layer weight kind) as plain data: what mixed plans save and apply."""
        return {r.name: {"w_bits": r.w_bits, "a_bits": r.a_bits,
                         **({"w_quantizer": r.w_quantizer} if r.w_quantizer else {})} for r in self._records}

    def __repr__(self) -> str:
        from lowbit.report.tables import format_table
        return format_table(self.rows())
