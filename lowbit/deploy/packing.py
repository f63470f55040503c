"""Bit packing of integer codes: any width 1–8, little-endian bit order, no padding
between values (four 2-bit codes per byte, eight 3-bit codes per three bytes)."""
from __future__ import annotations

import numpy as np

from lowbit.errors import BitsError, LowbitError


def packed_nbytes(count: int, bits: int) -> int:
    return (count * bits + 7) // 8


def pack_codes(codes: np.ndarray, bits: int, qmin: int) -> np.ndarray:
    """Codes in [qmin, qmin + 2^bits − 1] → uint8 bytes holding ``bits`` bits each."""
    if not 1 <= bits <= 8:
        raise BitsError(f"cannot pack {bits}-bit codes: widths 1..8 are supported")
    shifted = codes.astype(np.int64).reshape(-1) - qmin
    if shifted.size and (shifted.min() < 0 or shifted.max() >= 2**bits):
        raise LowbitError(f"codes outside [{qmin}, {qmin + 2**bits - 1}] cannot be packed in {bits} bits")
    as_bytes = shifted.astype(np.uint8)[:, None]
    bit_planes = np.unpackbits(as_bytes, axis=1, bitorder="little")[:, :bits]
    return np.packbits(bit_planes.reshape(-1), bitorder="little")


def unpack_codes(packed: np.ndarray, count: int, bits: int, qmin: int) -> np.ndarray:
    """Inverse of :func:`pack_codes`: ``count`` codes as int32."""
    if packed.size != packed_nbytes(count, bits):
        raise LowbitError(f"packed buffer holds {packed.size} bytes; {count} {bits}-bit codes need "
                          f"{packed_nbytes(count, bits)}")
    bit_stream = np.unpackbits(packed.astype(np.uint8), bitorder="little")[: count * bits]
    planes = np.zeros((count, 8), dtype=np.uint8)
    planes[:, :bits] = bit_stream.reshape(count, bits)
    values = np.packbits(planes, axis=1, bitorder="little").reshape(-1)
    return values.astype(np.int32) + qmin
