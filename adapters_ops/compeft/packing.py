"""Bit-level packing of a compressed tensor: Golomb-Rice coding of the kept positions' gaps
(vectorised) and fixed-width fields."""

from __future__ import annotations

import math

import numpy as np

from ..errors import CorruptFile


# --------------------------------------------------------------------------------------------
# Golomb-Rice coding of position gaps (vectorised)
# --------------------------------------------------------------------------------------------
def _rice_param(gaps: np.ndarray) -> int:
    """The Rice parameter b that gives the fewest bits for these gaps (exact, a few candidates)."""
    if gaps.size == 0:
        return 0
    mean = float(gaps.mean())
    guess = max(0, int(round(math.log2(max(mean * math.log(2), 1e-9))))) if mean > 0 else 0
    best, best_bits = 0, None
    for b in range(max(0, guess - 1), min(guess + 2, 40) + 1):
        nbits = int((gaps >> b).sum()) + gaps.size * (1 + b)
        if best_bits is None or nbits < best_bits:
            best, best_bits = b, nbits
    return best


def rice_encode(positions: np.ndarray) -> tuple[int, bytes, bytes]:
    """(b, unary stream, remainder stream) for strictly increasing positions.

    gap_i = p_i - p_{i-1} - 1 (p_{-1} = -1); q = gap >> b is written as q zero
    bits and a one, r = gap & (2^b - 1) as b bits MSB first, in two streams so
    both encode and decode vectorise.
    """
    gaps = np.diff(positions.astype(np.int64), prepend=-1) - 1
    b = _rice_param(gaps)
    q = gaps >> b
    ends = np.cumsum(q + 1) - 1  # index of each terminating one bit
    unary = np.zeros(int(ends[-1]) + 1 if ends.size else 0, dtype=np.uint8)
    unary[ends] = 1
    rem = _pack_fixed(gaps & ((1 << b) - 1), b)
    return b, np.packbits(unary).tobytes(), rem.tobytes()


def rice_decode(b: int, unary: np.ndarray, rem: np.ndarray, count: int, numel: int, name: str) -> np.ndarray:
    """Inverse of rice_encode; checks every structural invariant (CorruptFile otherwise)."""
    if count == 0:
        if unary.size or rem.size:
            raise CorruptFile(f"{name}: payload present for an empty tensor")
        return np.zeros(0, dtype=np.int64)
    ubits = np.unpackbits(unary)
    ends = np.flatnonzero(ubits)
    if ends.size != count or (ends[-1] // 8) != unary.size - 1:
        raise CorruptFile(f"{name}: position stream holds {ends.size} codes, expected {count}")
    if int(rem.size) != (count * b + 7) // 8:
        raise CorruptFile(f"{name}: remainder stream is {rem.size} bytes, expected {(count * b + 7) // 8}")
    q = np.diff(ends, prepend=-1) - 1
    gaps = q << b
    if b:
        gaps |= _unpack_fixed(rem, count, b)
    positions = np.cumsum(gaps + 1) - 1
    if positions[-1] >= numel:
        raise CorruptFile(f"{name}: position {int(positions[-1])} is outside a tensor of {numel} entries")
    return positions


def _pack_fixed(values: np.ndarray, bits: int) -> np.ndarray:
    """Non-negative integers < 2^bits as `bits` bits each, MSB first, packed into bytes."""
    if not bits:
        return np.zeros(0, dtype=np.uint8)
    shifts = np.arange(bits - 1, -1, -1, dtype=np.int64)
    return np.packbits(((values.astype(np.int64)[:, None] >> shifts) & 1).astype(np.uint8).reshape(-1))


def _unpack_fixed(data: np.ndarray, count: int, bits: int) -> np.ndarray:
    raw = np.unpackbits(data)[: count * bits].reshape(count, bits).astype(np.int64)
    return raw @ (np.int64(1) << np.arange(bits - 1, -1, -1, dtype=np.int64))
