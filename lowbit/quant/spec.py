"""Quantizer specifications: what a quantizer is, as plain data.

A spec fixes the integer grid (bits, signedness, symmetric or affine, mid-tread or
mid-rise) and its granularity (per tensor or per output channel). Parameters that are
*estimated* (scale, zero point) live on the quantizer module, never here.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from lowbit.errors import BitsError, RecipeError

Grid = Literal["midtread", "midrise"]
Signedness = bool | Literal["auto"]

MIN_BITS = 2
MAX_BITS = 8


@dataclass(frozen=True)
class QuantSpec:
    """A uniform quantizer's grid.

    midtread: levels ``scale * (q - zero_point)`` with integer q; 0 is exactly representable.
      signed symmetric uses the narrow range ``[-(2^(b-1)-1), 2^(b-1)-1]`` (2^b - 1 levels,
      symmetric around 0: 2 bits is ternary), or with ``narrow_range: false`` the full
      ``[-2^(b-1), 2^(b-1)-1]`` (2^b levels, zero point still 0: one more level for the
      negative side; on ResNet-20 +0.2 pt at W4A4 but -7 pt at W3A3); signed affine uses
      ``[-2^(b-1), 2^(b-1)-1]``; unsigned uses ``[0, 2^b - 1]``.
    midrise: levels ``scale * (q + 0.5)`` with q in ``[-2^(b-1), 2^(b-1)-1]``, 2^b levels
      and no zero (μL2Q's quantizer, seed 000); 1 bit is allowed there (binary ±scale/2).
    """

    bits: int = 8
    signed: Signedness = True
    symmetric: bool = True
    per_channel: bool = False
    ch_axis: int = 0
    grid: Grid = "midtread"
    narrow_range: bool = True  # signed symmetric mid-tread only: drop the code -2^(b-1)

    def __post_init__(self) -> None:
        if self.grid not in ("midtread", "midrise"):
            raise RecipeError(f"grid must be 'midtread' or 'midrise', got {self.grid!r}")
        if isinstance(self.bits, bool) or not isinstance(self.bits, int):
            raise BitsError(f"bits must be an integer, got {self.bits!r}")
        lowest = 1 if self.grid == "midrise" else MIN_BITS
        if not lowest <= self.bits <= MAX_BITS:
            hint = (" (1-bit weights are binary: set w_bits 1 through an override or plan, "
                    "or use grid: midrise)") if self.bits == 1 else ""
            raise BitsError(
                f"bits={self.bits} is outside the supported range {lowest}..{MAX_BITS} "
                f"for a {self.grid} uniform quantizer{hint}"
            )
        if not (self.signed == "auto" or isinstance(self.signed, bool)):
            raise RecipeError(f"signed must be true, false or 'auto', got {self.signed!r}")
        for key in ("symmetric", "per_channel", "narrow_range"):
            if not isinstance(getattr(self, key), bool):
                raise RecipeError(f"{key} must be true or false, got {getattr(self, key)!r}")
        if isinstance(self.ch_axis, bool) or not isinstance(self.ch_axis, int) or self.ch_axis < 0:
            raise RecipeError(f"ch_axis must be a non-negative integer, got {self.ch_axis!r}")
        if self.grid == "midrise" and (self.signed is not True or not self.symmetric):
            raise RecipeError("a midrise grid is signed and symmetric by construction")

    @property
    def qmin(self) -> int:
        return self.code_range()[0]

    @property
    def qmax(self) -> int:
        return self.code_range()[1]

    def code_range(self, signed: bool | None = None) -> tuple[int, int]:
        """Integer code range; ``signed`` resolves an 'auto' spec."""
        s = self.signed if signed is None else signed
        if s == "auto":
            raise RecipeError("signedness is 'auto' and not yet resolved by calibration")
        b = self.bits
        if self.grid == "midrise":
            return -(2 ** (b - 1)), 2 ** (b - 1) - 1
        if not s:
            return 0, 2**b - 1
        if self.symmetric and self.narrow_range:
            return -(2 ** (b - 1) - 1), 2 ** (b - 1) - 1
        return -(2 ** (b - 1)), 2 ** (b - 1) - 1

    def with_(self, **changes: Any) -> "QuantSpec":
        return replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "QuantSpec":
        known = set(cls.__dataclass_fields__)
        unknown = set(data) - known
        if unknown:
            raise RecipeError(f"unknown quantizer spec key(s) {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)


def weight_spec_at(spec: QuantSpec, bits: int) -> QuantSpec:
    """A layer's weight grid at ``bits``. At 1 bit every mid-tread grid degenerates (one
    level, or two with one of them 0), so 1 weight bit means binary: sign x a per-channel
    scale, the mid-rise 1-bit grid (BinaryConnect/XNOR-Net's form, seed 001)."""
    if bits == 1 and spec.grid == "midtread":
        return QuantSpec(bits=1, signed=True, symmetric=True, per_channel=spec.per_channel,
                         ch_axis=spec.ch_axis, grid="midrise")
    return spec.with_(bits=bits)
