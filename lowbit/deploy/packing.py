"""Bit packing of integer codes: any width 1–8, little-endian bit order, no padding
between values (four 2-bit codes per byte, eight 3-bit codes per three bytes)."""
from __future__ import annotations

import numpy as np

from lowbit.errors import BitsError, LowbitError


def packed_nbytes(count: int, bits: int) -> int:
    return (count * bits + 7) // 8


def _check_bits(bits: object, what: str) -> None:
    if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or not 1 <= bits <= 8:
        raise BitsError(f"cannot {what} {bits!r}-bit codes: widths 1..8 are supported")


def pack_codes(codes: np.ndarray, bits: int, qmin: int) -> np.ndarray:
    """Codes in [qmin, qmin + 2^bits − 1] → uint8 bytes holding ``bits`` bits each."""
    _check_bits(bits, "pack")
    shifted = _as_int64(codes).reshape(-1) - qmin
    if shifted.size and (shifted.min() < 0 or shifted.max() >= 2**bits):
        raise LowbitError(f"codes outside [{qmin}, {qmin + 2**bits - 1}] cannot be packed in {bits} bits")
    as_bytes = shifted.astype(np.uint8)[:, None]
    bit_planes = np.unpackbits(as_bytes, axis=1, bitorder="little")[:, :bits]
    return np.packbits(bit_planes.reshape(-1), bitorder="little")


def _as_int64(codes: np.ndarray) -> np.ndarray:
    """``codes`` as int64, refusing what a cast would silently change: ``astype`` truncates
    floats toward zero, so -0.9 and 3.9 would pass a 2-bit range check as 0 and 3."""
    codes = np.asarray(codes)
    if codes.dtype == np.bool_ or np.issubdtype(codes.dtype, np.integer):
        return codes.astype(np.int64)
    if np.issubdtype(codes.dtype, np.floating):
        with np.errstate(invalid="ignore"):
            whole = np.isfinite(codes) & (codes == np.round(codes))
        if whole.all():
            return codes.astype(np.int64)
        bad = codes[~whole].reshape(-1)[:3].tolist()
        raise LowbitError(f"codes must be integers; got {codes.dtype} values that are not whole numbers, e.g. {bad}")
    raise LowbitError(f"codes must be integers, got an array of {codes.dtype}")


def unpack_codes(packed: np.ndarray, count: int, bits: int, qmin: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: ``count`` codes as int32."""
    _check_bits(bits, "unpack")
    if isinstance(count, bool) or not isinstance(count, (int, np.integer)) or count < 0:
        raise LowbitError(f"cannot unpack {count!r} codes: the count must be a whole number ≥ 0")
    if packed.size != packed_nbytes(count, bits):
        raise LowbitError(f"packed buffer holds {packed.size} bytes; {count} {bits}-bit codes need "
                          f"{packed_nbytes(count, bits)}")
    bit_stream = np.unpackbits(packed.astype(np.uint8), bitorder="little")[: count * bits]
    planes = np.zeros((count, 8), dtype=np.uint8)
    planes[:, :bits] = bit_stream.reshape(count, bits)
    values = np.packbits(planes, axis=1, bitorder="little").reshape(-1)
    return values.astype(np.int32) + qmin
