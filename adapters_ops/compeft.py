"""ComPEFT: compress a LoRA update to a sparse ternary tensor plus one scale.

Like the paper (Yadav et al., "ComPEFT", 2023), the LoRA factors A and B
themselves are the update: every entry whose magnitude is among the top
``density`` fraction is kept, and a kept entry becomes ``sign * scale`` with
``scale = replace_factor * std`` (std of the unpruned values, unbiased). By
default the threshold and the std are global over all tensors (the paper's
rule); ``scope="tensor"`` picks k and the std per tensor instead.

What is new here, compared with the paper's code (which writes dense floats):

* an exact top-k threshold found with a two-level radix histogram over the
  float bit patterns, tensor by tensor (no flattening, no sort);
* a real file format near the entropy limit: positions as Golomb-Rice coded
  gaps, signs as packed bits, one fp32 scale per tensor, in a safetensors
  container with a sha256 checksum (see docs/compeft.md for the byte layout).

Ties at the threshold are broken by position: entries are ordered by tensor
name (sorted) and then row-major inside a tensor, and the first ones are kept,
so the count is exactly ``k = floor(density * n + 1/2)``. Exact zeros are never
kept (a kept zero would have no sign); if fewer than k entries are non-zero,
all non-zero entries are kept.
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load as st_load_bytes

from .adapter import Adapter
from .errors import AdapterError, CorruptFile

FORMAT_NAME = "compeft"
FORMAT_VERSION = 1
CODEC_RICE = "rice"
SCOPES = ("global", "tensor")
FILE_NAME = "adapter_model.compeft.safetensors"

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
_INT_OF_WIDTH = {2: torch.int16, 4: torch.int32, 8: torch.int64}
_SIGN = np.int32(0x7FFFFFFF)
_MAX_NUMEL = 1 << 34  # per tensor; far above any LoRA factor
_MAG_INF = 0x7F800000  # fp32 bit pattern of +inf; anything >= is inf or NaN


# --------------------------------------------------------------------------------------------
# parameters
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CompressParams:
    density: float = 0.1
    alpha: float | None = None
    scope: str = "global"
    replace_factor: float = 1.0

    def __post_init__(self):
        def number(x):
            return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)

        if not (number(self.density) and 0.0 < self.density <= 1.0):
            raise AdapterError(f"density must be in (0, 1], got {self.density!r}", "invalid_density")
        if self.scope not in SCOPES:
            raise AdapterError(f"scope must be one of {SCOPES}, got {self.scope!r}", "invalid_scope")
        if self.alpha is not None and not (number(self.alpha) and self.alpha > 0):
            raise AdapterError(f"alpha must be a positive finite number, got {self.alpha!r}", "invalid_alpha")
        if not (number(self.replace_factor) and self.replace_factor > 0):
            raise AdapterError(
                f"replace_factor must be a positive finite number, got {self.replace_factor!r}",
                "invalid_replace_factor",
            )


def keep_count(density: float, n: int) -> int:
    """k for n entries: density * n rounded half up (0.1 * 25 -> 3)."""
    return min(n, int(math.floor(density * n + 0.5)))


# --------------------------------------------------------------------------------------------
# bit patterns and the exact top-k threshold
# --------------------------------------------------------------------------------------------
def _bits(t: torch.Tensor) -> np.ndarray:
    """fp32 bit pattern (int32, flat) of a tensor; bf16/fp16 widen exactly, fp64 rounds to fp32.

    Widening happens in numpy: torch's multi-threaded casts stall badly on a busy CPU.
    """
    f = t.detach().reshape(-1).cpu()
    if f.dtype == torch.float32:
        return f.numpy().view(np.int32)
    if f.dtype == torch.bfloat16:  # bf16 is the top half of an fp32
        return f.view(torch.int16).numpy().astype(np.int32) << 16
    return f.numpy().astype(np.float32).view(np.int32)


def _float_tensors(adapter: Adapter) -> list[str]:
    names = sorted(adapter.tensors)
    for name in names:
        t = adapter.tensors[name]
        if t.dtype not in _DTYPE_NAMES:
            raise AdapterError(f"{name}: dtype {t.dtype} cannot be compressed (floating point only)", "invalid_dtype")
        if t.numel() == 0:
            raise AdapterError(f"{name} is empty", "invalid_adapter")
    if not names:
        raise AdapterError("the adapter has no tensors", "invalid_adapter")
    return names


@dataclass
class _Threshold:
    """Keep entries with magnitude bits > `bits`, plus the first `ties` entries equal to it."""

    bits: int
    ties: int  # entries equal to `bits` to keep, in scan order
    tie_total: int  # entries equal to `bits` in all
    k: int  # entries kept in all


def _select(hist_hi: np.ndarray, k: int, low_hist: Callable[[int], np.ndarray]) -> _Threshold:
    """Exact k-th largest magnitude from a histogram of the high 16 bits, refined on the low 16.

    `low_hist(bin)` returns the histogram of the low 16 bits of the entries whose
    high bits equal `bin` (a second pass, but only the chosen bin is counted).
    Zeros (bits == 0) are never selected.
    """
    hist_hi = hist_hi.copy()
    # cumulative count from the largest magnitudes downwards
    above = np.cumsum(hist_hi[::-1])[::-1]  # above[b] = entries with high bits >= b
    nonzero_possible = int(above[0])
    if k == 0 or nonzero_possible == 0:
        return _Threshold(bits=_MAG_INF, ties=0, tie_total=0, k=0)
    # first bin b (from the top) where the count reaches k
    b = int(np.nonzero(above >= k)[0][-1]) if above[0] >= k else 0
    count_above_bin = int(above[b + 1]) if b + 1 < above.size else 0
    low = low_hist(b).astype(np.int64)
    if b == 0:
        low[0] = 0  # the value 0.0 itself is never kept
    low_above = np.cumsum(low[::-1])[::-1]
    need = k - count_above_bin
    if low_above[0] < need:  # fewer non-zero entries than k: keep them all
        nz = np.nonzero(low)[0]
        lo = int(nz[0]) if nz.size else 0
        kept = count_above_bin + int(low_above[0])
        if not nz.size:  # nothing non-zero in this bin at all
            return _Threshold(bits=(b << 16) | 0xFFFF, ties=0, tie_total=0, k=kept)
        return _Threshold(bits=(b << 16) | lo, ties=int(low[lo]), tie_total=int(low[lo]), k=kept)
    j = int(np.nonzero(low_above >= need)[0][-1])
    count_above = count_above_bin + (int(low_above[j + 1]) if j + 1 < low_above.size else 0)
    return _Threshold(bits=(b << 16) | j, ties=k - count_above, tie_total=int(low[j]), k=k)


@dataclass
class _Stats:
    n: int
    sum: float
    sumsq: float
    hist: np.ndarray  # high-16-bit histogram of magnitudes

    @property
    def std(self) -> float:
        if self.n < 2:
            return 0.0
        var = (self.sumsq - self.sum * self.sum / self.n) / (self.n - 1)
        return math.sqrt(max(var, 0.0))


def _stats(name: str, bits: np.ndarray) -> _Stats:
    hist = np.bincount((bits & _SIGN) >> 16, minlength=1 << 15)
    if hist.size > (_MAG_INF >> 16) and hist[_MAG_INF >> 16 :].any():
        raise AdapterError(f"{name} holds inf or NaN values", "non_finite")
    # numpy (single-threaded, steady on a shared CPU); squares in fp32, sums in fp64
    x = bits.view(np.float32)
    s = float(np.add.reduce(x, dtype=np.float64))
    s2 = float(np.add.reduce(np.square(x), dtype=np.float64))
    return _Stats(n=int(bits.size), sum=s, sumsq=s2, hist=hist)


def _low_hist(bits_iter: Callable[[], Iterable[np.ndarray]], b: int) -> np.ndarray:
    out = np.zeros(1 << 16, dtype=np.int64)
    for bits in bits_iter():
        mag = bits & _SIGN
        sel = mag[(mag >> 16) == b] & 0xFFFF
        if sel.size:
            out += np.bincount(sel, minlength=1 << 16)
    return out


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
    if b:
        shifts = np.arange(b - 1, -1, -1, dtype=np.int64)
        rem = ((gaps[:, None] >> shifts) & 1).astype(np.uint8).reshape(-1)
    else:
        rem = np.zeros(0, dtype=np.uint8)
    return b, np.packbits(unary).tobytes(), np.packbits(rem).tobytes()


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
        rbits = np.unpackbits(rem)[: count * b].reshape(count, b).astype(np.int64)
        gaps |= rbits @ (np.int64(1) << np.arange(b - 1, -1, -1, dtype=np.int64))
    positions = np.cumsum(gaps + 1) - 1
    if positions[-1] >= numel:
        raise CorruptFile(f"{name}: position {int(positions[-1])} is outside a tensor of {numel} entries")
    return positions


# --------------------------------------------------------------------------------------------
# the compressed adapter
# --------------------------------------------------------------------------------------------
@dataclass
class CompressedTensor:
    shape: tuple[int, ...]
    dtype: str
    count: int
    scale: float  # fp32 value: every kept entry decodes to +-scale
    std: float  # std the scale was derived from (global or per tensor); 0 when alpha was given
    rice_bits: int
    unary: np.ndarray  # uint8
    rem: np.ndarray  # uint8
    signs: np.ndarray  # uint8, packed MSB first, 1 = negative
    codec: str = CODEC_RICE

    @property
    def numel(self) -> int:
        return int(math.prod(self.shape))

    def meta(self) -> dict:
        # short keys: this JSON is repeated per tensor in the header (a few % of the file)
        return {
            "shape": list(self.shape),
            "dtype": self.dtype,
            "count": self.count,
            "scale": _f32_text(self.scale),
            "std": self.std,
            "codec": self.codec,
            "b": self.rice_bits,
        }

    def payload(self) -> np.ndarray:
        """signs | remainders | unary: the first two have lengths known from count and b."""
        return np.concatenate([self.signs, self.rem, self.unary])

    def positions(self, name: str = "tensor") -> np.ndarray:
        return rice_decode(self.rice_bits, self.unary, self.rem, self.count, self.numel, name)

    def negative(self) -> np.ndarray:
        return np.unpackbits(self.signs)[: self.count].astype(bool)

    def dense(self, name: str = "tensor") -> torch.Tensor:
        """The decoded tensor (original dtype), built directly on the CPU."""
        dtype = _DTYPES[self.dtype]
        vals = torch.tensor([self.scale, -self.scale], dtype=torch.float32).to(dtype)
        # scatter the bit patterns through a same-width integer view: numpy has no bf16
        ints = vals.view(_INT_OF_WIDTH[vals.element_size()]).numpy()
        out = np.zeros(self.numel, dtype=ints.dtype)
        out[self.positions(name)] = ints[self.negative().view(np.uint8)]
        return torch.from_numpy(out).view(dtype).reshape(self.shape)

    def ternary_packed(self, name: str = "tensor") -> torch.Tensor:
        """The 2-bit device form (see kernels.ternary): 4 entries per byte, 01 = +1, 11 = -1."""
        from kernels.ternary import pack_codes

        codes = np.zeros(self.numel, dtype=np.uint8)
        codes[self.positions(name)] = 1 | (self.negative().astype(np.uint8) << 1)
        return pack_codes(torch.from_numpy(codes))


def _resolve_device(device) -> torch.device:
    return device if isinstance(device, torch.device) else torch.device(device)


@dataclass
class CompressedAdapter:
    config: dict
    tensors: dict[str, CompressedTensor]
    params: CompressParams = field(default_factory=CompressParams)
    _blob: bytes | None = field(default=None, repr=False, compare=False)

    # --- info -------------------------------------------------------------------------------
    @property
    def count(self) -> int:
        return sum(t.count for t in self.tensors.values())

    @property
    def numel(self) -> int:
        return sum(t.numel for t in self.tensors.values())

    @property
    def nbytes(self) -> int:
        """Size in bytes of the file `save` writes."""
        return len(self.to_bytes())

    def with_replace_factor(self, replace_factor: float) -> CompressedAdapter:
        """The same positions and signs with scale = replace_factor * std (needs a std-derived scale)."""
        if self.params.alpha is not None:
            raise AdapterError("this adapter was compressed with a fixed alpha; no std to rescale", "fixed_alpha")
        params = replace(self.params, replace_factor=float(replace_factor))
        tensors = {n: replace(t, scale=_f32(replace_factor * t.std)) for n, t in self.tensors.items()}
        return CompressedAdapter(config=self.config, tensors=tensors, params=params)

    # --- decode -----------------------------------------------------------------------------
    def decompress(self, device="cpu") -> Adapter:
        """A normal PEFT Adapter holding the ternary tensors in their original dtypes.

        On CUDA the entropy code is decoded on the CPU to the 2-bit form (a quarter
        byte per entry), moved over, and expanded by the ternary kernel.
        """
        device = _resolve_device(device)
        out = {}
        for name, t in self.tensors.items():
            if device.type == "cuda":
                from kernels.ternary import ternary_add

                w = torch.zeros(t.shape, dtype=_DTYPES[t.dtype], device=device)
                out[name] = ternary_add(w, t.ternary_packed(name).to(device), t.scale)
            else:
                out[name] = t.dense(name).to(device)
        return Adapter(config=json.loads(json.dumps(self.config)), tensors=out)

    # --- encode to bytes / file ---------------------------------------------------------------
    def _metadata(self) -> dict[str, str]:
        p = self.params
        return {
            "format": FORMAT_NAME,
            "format_version": str(FORMAT_VERSION),
            "adapter_config": json.dumps(self.config, sort_keys=True),
            "compression": json.dumps(
                {
                    "density": p.density,
                    "scope": p.scope,
                    "alpha": p.alpha,
                    "replace_factor": p.replace_factor,
                    "k": self.count,
                    "n": self.numel,
                },
                sort_keys=True,
            ),
            "tensors": json.dumps({n: t.meta() for n, t in self.tensors.items()}, sort_keys=True, separators=(",", ":")),
        }

    def _payloads(self) -> dict[str, np.ndarray]:
        return {name: t.payload() for name, t in self.tensors.items()}

    def to_bytes(self) -> bytes:
        if self._blob is None:
            meta = self._metadata()
            payloads = self._payloads()
            meta["checksum"] = _checksum(meta, payloads)
            self._blob = _safetensors_bytes(payloads, meta)
        return self._blob

    def save(self, path: str | os.PathLike) -> Path:
        """Write the compressed file (atomically). A directory gets FILE_NAME inside it."""
        path = Path(path)
        if path.is_dir():
            path = path / FILE_NAME
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(self.to_bytes())
        os.replace(tmp, path)
        return path


def _f32(x: float) -> float:
    return float(np.float32(x))


def _f32_text(x: float) -> str:
    """Shortest text that reads back to the same fp32 value."""
    return np.format_float_positional(np.float32(x), unique=True, trim="-") if x else "0"


def _safetensors_bytes(payloads: dict[str, np.ndarray], meta: dict[str, str]) -> bytes:
    """A safetensors file written deterministically (sorted keys), so equal inputs give equal
    bytes and the blob store deduplicates them; the safetensors writer orders keys at random."""
    header: dict = {"__metadata__": dict(sorted(meta.items()))}
    offset = 0
    for name in sorted(payloads):
        size = int(payloads[name].size)
        header[name] = {"dtype": "U8", "shape": [size], "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the format pads the header to 8 bytes with spaces
    parts = [len(text).to_bytes(8, "little"), text]
    parts += [np.ascontiguousarray(payloads[name]).tobytes() for name in sorted(payloads)]
    return b"".join(parts)


def _checksum(meta: dict[str, str], payloads: dict[str, np.ndarray]) -> str:
    h = hashlib.sha256()
    for key in sorted(meta):
        if key == "checksum":
            continue
        h.update(key.encode() + b"\0" + meta[key].encode() + b"\0")
    for name in sorted(payloads):
        data = np.ascontiguousarray(payloads[name]).tobytes()
        h.update(name.encode() + b"\0" + len(data).to_bytes(8, "little") + data)
    return "sha256:" + h.hexdigest()


# --------------------------------------------------------------------------------------------
# compress
# --------------------------------------------------------------------------------------------
def _encode(name: str, t: torch.Tensor, bits: np.ndarray, thr_bits: int, ties: int | None, scale: float, std: float):
    """Encode one tensor: keep magnitudes > thr_bits, plus entries equal to it.

    `ties=None` keeps every entry equal to the threshold; an int keeps only the
    first `ties` of them (row-major). Returns (CompressedTensor, ties used).
    """
    mag = bits & _SIGN
    if ties is None:
        keep = mag >= thr_bits
        used = 0
    else:
        keep = mag > thr_bits
        if ties > 0:
            eq = np.flatnonzero(mag == thr_bits)[:ties]
            keep[eq] = True
            used = int(eq.size)
        else:
            used = 0
    pos = np.flatnonzero(keep)
    b, unary, rem = rice_encode(pos)
    ct = CompressedTensor(
        shape=tuple(int(s) for s in t.shape),
        dtype=_DTYPE_NAMES[t.dtype],
        count=int(pos.size),
        scale=scale,
        std=std,
        rice_bits=b,
        unary=np.frombuffer(unary, dtype=np.uint8),
        rem=np.frombuffer(rem, dtype=np.uint8),
        signs=np.packbits(bits[pos] < 0),  # the fp32 sign bit: 1 = negative
    )
    return ct, used


def compress(
    adapter: Adapter,
    density: float = 0.1,
    alpha: float | None = None,
    scope: str = "global",
    replace_factor: float = 1.0,
) -> CompressedAdapter:
    """Sparsify every tensor of `adapter` to `density` and ternarise it (see module docstring).

    scope="global": one top-k threshold and one std over all tensors (the paper).
    scope="tensor": k and std per tensor. `alpha` fixes the scale instead of replace_factor * std.
    Memory stays near one tensor plus the output: a statistics pass tensor by
    tensor, a refinement pass restricted to one histogram bin (skipped when all
    tensors are bf16: the high 16 bits are then the whole value), an encode pass.
    """
    params = CompressParams(density=density, alpha=alpha, scope=scope, replace_factor=replace_factor)
    names = _float_tensors(adapter)

    def bits_of(name):
        return _bits(adapter.tensors[name])

    def low_hist(hist, group):
        if all(adapter.tensors[nm].dtype == torch.bfloat16 for nm in group):
            # bf16 widened to fp32 has zero low bits: the bin is one value, no second pass
            def one_value(b):
                h = np.zeros(1 << 16, dtype=np.int64)
                h[0] = hist[b]
                return h

            return one_value
        return lambda b: _low_hist(lambda: (bits_of(nm) for nm in group), b)

    def scale_of(std):
        return _f32(params.alpha if params.alpha is not None else params.replace_factor * std)

    groups = [names] if params.scope == "global" else [[name] for name in names]
    out: dict[str, CompressedTensor] = {}
    for group in groups:
        total = _Stats(n=0, sum=0.0, sumsq=0.0, hist=np.zeros(1 << 15, dtype=np.int64))
        for name in group:  # one tensor at a time: only the running totals stay
            s = _stats(name, bits_of(name))
            total.n += s.n
            total.sum += s.sum
            total.sumsq += s.sumsq
            total.hist += s.hist[: 1 << 15]
        thr = _select(total.hist, keep_count(params.density, total.n), low_hist(total.hist, group))
        std = total.std
        scale = scale_of(std)
        ties = None if thr.ties == thr.tie_total else thr.ties
        kept = 0
        for name in group:
            ct, used = _encode(name, adapter.tensors[name], bits_of(name), thr.bits, ties, scale,
                               std if params.alpha is None else 0.0)
            if ties is not None:
                ties -= used
            kept += ct.count
            out[name] = ct
        if kept != thr.k:  # an internal invariant, not bad input
            raise AssertionError(f"kept {kept} entries, the selection said {thr.k}")
    return CompressedAdapter(config=json.loads(json.dumps(adapter.config)), tensors=out, params=params)


# --------------------------------------------------------------------------------------------
# load
# --------------------------------------------------------------------------------------------
def load(path: str | os.PathLike) -> CompressedAdapter:
    """Read a compressed file written by `CompressedAdapter.save`; CorruptFile if it is damaged."""
    path = Path(path)
    if path.is_dir():
        path = path / FILE_NAME
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise AdapterError(f"cannot read {path}: {exc}", "missing_file") from exc
    return loads(data, source=str(path))


def loads(data: bytes, source: str = "compressed adapter") -> CompressedAdapter:
    """Parse the bytes of a compressed file (see `load`)."""
    meta = _read_metadata(data, source)
    try:
        payloads = st_load_bytes(data)
    except (SafetensorError, ValueError, TypeError) as exc:
        raise CorruptFile(f"{source} is not a valid safetensors file: {exc}") from exc
    if meta.get("checksum") != _checksum(meta, payloads):
        raise CorruptFile(f"{source}: checksum mismatch (the file is damaged or was modified)")
    try:
        config = json.loads(meta["adapter_config"])
        comp = json.loads(meta["compression"])
        tmeta = json.loads(meta["tensors"])
        params = CompressParams(
            density=float(comp["density"]),
            alpha=None if comp["alpha"] is None else float(comp["alpha"]),
            scope=comp["scope"],
            replace_factor=float(comp["replace_factor"]),
        )
        tensors = {name: _tensor_from(name, m, payloads) for name, m in sorted(tmeta.items())}
    except CorruptFile:
        raise
    except (KeyError, TypeError, ValueError, AdapterError) as exc:
        raise CorruptFile(f"{source}: malformed metadata ({type(exc).__name__}: {exc})") from exc
    if set(payloads) != set(tensors):
        raise CorruptFile(f"{source}: payload tensors do not match the metadata")
    return CompressedAdapter(config=config, tensors=tensors, params=params, _blob=bytes(data))


def _read_metadata(data: bytes, source: str) -> dict[str, str]:
    # Parse the header ourselves first so a damaged header gets a precise message.
    if len(data) < 8:
        raise CorruptFile(f"{source} is truncated ({len(data)} bytes)")
    n = int.from_bytes(data[:8], "little")
    if n > min(len(data) - 8, 100_000_000):
        raise CorruptFile(f"{source} is truncated or not a safetensors file (header of {n} bytes)")
    try:
        header = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CorruptFile(f"{source}: damaged header ({exc})") from exc
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict):
        raise CorruptFile(f"{source} has no compression metadata")
    if meta.get("format") != FORMAT_NAME:
        raise CorruptFile(f"{source} is not a {FORMAT_NAME} file (format={meta.get('format')!r})")
    if meta.get("format_version") != str(FORMAT_VERSION):
        raise CorruptFile(
            f"{source}: unsupported {FORMAT_NAME} format version {meta.get('format_version')!r} "
            f"(this library reads version {FORMAT_VERSION})"
        )
    return meta


def _tensor_from(name: str, m: dict, payloads: dict[str, np.ndarray]) -> CompressedTensor:
    if m.get("codec") != CODEC_RICE:
        raise CorruptFile(f"{name}: unsupported codec {m.get('codec')!r}")
    if m["dtype"] not in _DTYPES:
        raise CorruptFile(f"{name}: unsupported dtype {m['dtype']!r}")
    shape = tuple(int(s) for s in m["shape"])
    count, b = int(m["count"]), int(m["b"])
    numel = math.prod(shape)
    # a crafted file can carry a valid checksum: bound what it may make us allocate
    if any(s < 0 for s in shape) or numel > _MAX_NUMEL or not (0 <= count <= numel) or not (0 <= b <= 40):
        raise CorruptFile(f"{name}: inconsistent shape/count/rice parameter in metadata")
    data = payloads.get(name)
    if data is None or data.dtype != np.uint8 or data.ndim != 1:
        raise CorruptFile(f"{name}: payload missing or not a flat uint8 tensor")
    ns, nr = (count + 7) // 8, (count * b + 7) // 8
    if data.size < ns + nr:
        raise CorruptFile(f"{name}: payload of {data.size} bytes is shorter than its signs and remainders")
    t = CompressedTensor(
        shape=shape,
        dtype=m["dtype"],
        count=count,
        scale=float(np.float32(m["scale"])),
        std=float(m["std"]),
        rice_bits=b,
        signs=data[:ns],
        rem=data[ns : ns + nr],
        unary=data[ns + nr :],
    )
    t.positions(name)  # validates the streams now, not at first use
    return t


# --------------------------------------------------------------------------------------------
# picking the scale
# --------------------------------------------------------------------------------------------
DEFAULT_CANDIDATES = (0.5, 1.0, 2.0, 3.0, 5.0, 8.0, 10.0)


@dataclass(frozen=True)
class ScaleChoice:
    replace_factor: float
    score: float
    scores: dict[float, float]
    compressed: CompressedAdapter


def choose_scale(
    adapter: Adapter,
    density: float,
    score_fn: Callable[[Adapter], float],
    candidates: Iterable[float] = DEFAULT_CANDIDATES,
    scope: str = "global",
) -> ScaleChoice:
    """Pick replace_factor by `score_fn(decompressed_adapter) -> float` (higher is better).

    The positions and signs do not depend on the factor, so the adapter is
    compressed once and only the scale changes per candidate. Ties go to the
    earliest candidate; NaN scores never win.
    """
    cands = [float(c) for c in candidates]
    if not cands:
        raise AdapterError("choose_scale needs at least one candidate", "invalid_candidates")
    for c in cands:
        CompressParams(density=density, scope=scope, replace_factor=c)  # validates each
    base = compress(adapter, density=density, scope=scope, replace_factor=1.0)
    scores: dict[float, float] = {}
    best = None
    for c in cands:
        cand = base.with_replace_factor(c)
        score = float(score_fn(cand.decompress()))
        scores[c] = score
        if not math.isnan(score) and (best is None or score > best[1]):
            best = (c, score, cand)
    if best is None:
        raise AdapterError("score_fn returned NaN for every candidate", "invalid_score")
    return ScaleChoice(replace_factor=best[0], score=best[1], scores=scores, compressed=best[2])
