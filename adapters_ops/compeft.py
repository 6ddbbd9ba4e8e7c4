"""ComPEFT: compress a LoRA update to a sparse ternary tensor plus one scale.

Like the paper (Yadav et al., "ComPEFT", 2023), the LoRA factors A and B
themselves are the update: every entry whose magnitude is among the top
``density`` fraction is kept, and a kept entry becomes ``sign * scale`` with
``scale = replace_factor * std`` (std of the unpruned values, unbiased). By
default the threshold and the std are global over all tensors (the paper's
rule); ``scope="tensor"`` picks k and the std per tensor instead.

Two options go beyond the paper, for adapters that the one-magnitude rule
breaks (the tiny zoo loses every skill at density 0.1; docs/compeft.md):

* ``magnitude_bits=m`` gives each kept entry one of 2^m magnitudes per tensor
  (fitted to the kept values by 1-D k-means, data-free) for m more bits per
  kept entry; m = 0 is the paper's ternary tensor.
* ``factorization="balanced"`` first rewrites every LoRA pair as
  B' = U sqrt(S), A' = sqrt(S) V^T from the exact SVD of B @ A (same product,
  factors of equal scale, energy in the leading rank components).

What is new here, compared with the paper's code (which writes dense floats):

* an exact top-k threshold found with a two-level radix histogram over the
  float bit patterns, tensor by tensor (no flattening, no sort);
* a real file format near the entropy limit: positions as Golomb-Rice coded
  gaps, signs as packed bits, one fp32 scale per tensor, and a compact binary
  table of the tensors, in a safetensors container with a sha256 checksum
  (format version 2; version 1 files are still read; see docs/compeft.md).

How many entries are kept (``keep``):

* ``keep="exact"`` (the default): exactly ``k = floor(density * n + 1/2)``.
  Ties at the threshold are broken by position: entries are ordered by tensor
  name (sorted) and then row-major inside a tensor, and the first ones are kept.
* ``keep="paper"``: the rule of the paper's code, for files bit-compatible with
  it: t = the k-th largest magnitude with ``k = int(n * density) + 1`` (at most
  n), and every entry with magnitude >= t is kept, ties included. In bf16,
  where many magnitudes are equal, this keeps noticeably more than ``k``.

Exact zeros are never kept (a kept zero would have no sign; the paper's code
keeps them as 0 * scale, the same decoded value); if fewer than k entries are
non-zero, all non-zero entries are kept. The rule is recorded in the file
(``params.keep`` of a loaded file).
"""

from __future__ import annotations

import hashlib
import json
import math
import numbers
import os
import struct
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load as st_load_bytes

from .adapter import Adapter, AdapterLike, as_adapter
from .errors import AdapterError, CorruptFile

FORMAT_NAME = "compeft"
FORMAT_VERSION = 2
READABLE_VERSIONS = ("1", "2")
CODEC_RICE = "rice"
SCOPES = ("global", "tensor")
FACTORIZATIONS = ("as_is", "balanced")
KEEP_RULES = ("exact", "paper")
MAX_MAGNITUDE_BITS = 4
BLOB_NAME = "compeft"  # the one payload tensor of a version 2 file
FILE_NAME = "adapter_model.compeft.safetensors"

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
_DTYPE_CODES = ("float32", "float16", "bfloat16", "float64")  # their byte in a version 2 table
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
    magnitude_bits: int = 0
    factorization: str = "as_is"
    keep: str = "exact"

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
        m = self.magnitude_bits
        if not (isinstance(m, numbers.Integral) and not isinstance(m, bool) and 0 <= m <= MAX_MAGNITUDE_BITS):
            raise AdapterError(
                f"magnitude_bits must be an integer in 0..{MAX_MAGNITUDE_BITS}, got {m!r}", "invalid_magnitude_bits"
            )
        if m and self.alpha is not None:
            raise AdapterError("alpha fixes one magnitude for all entries; it cannot be combined with "
                               "magnitude_bits", "invalid_alpha")
        if self.factorization not in FACTORIZATIONS:
            raise AdapterError(
                f"factorization must be one of {FACTORIZATIONS}, got {self.factorization!r}", "invalid_factorization"
            )
        if self.keep not in KEEP_RULES:
            raise AdapterError(f"keep must be one of {KEEP_RULES}, got {self.keep!r}", "invalid_keep")


def keep_count(density: float, n: int, keep: str = "exact") -> int:
    """k for n entries. "exact": density * n rounded half up (0.1 * 25 -> 3), the number kept.
    "paper": int(n * density) + 1 (0.1 * 25 -> 3, 0.1 * 30 -> 4), the rank of the threshold
    magnitude (ties with it are kept too). Never more than n."""
    if keep == "paper":
        return min(n, int(n * density) + 1)
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


# --------------------------------------------------------------------------------------------
# the compressed adapter
# --------------------------------------------------------------------------------------------
@dataclass
class CompressedTensor:
    shape: tuple[int, ...]
    dtype: str
    count: int
    scale: float  # fp32 value: every kept entry decodes to +-scale (times its level, see below)
    std: float  # the scale is replace_factor * std (global or per tensor), fp32-rounded; 0 when alpha was given
    rice_bits: int
    unary: np.ndarray  # uint8
    rem: np.ndarray  # uint8
    signs: np.ndarray  # uint8, packed MSB first, 1 = negative
    codec: str = CODEC_RICE
    magnitude_bits: int = 0  # 0: ternary (the paper); m: kept entries carry an m-bit level code
    levels: tuple[float, ...] = ()  # 2^m fp32 multipliers of `scale`; empty for m = 0 (one level, 1)
    mags: np.ndarray = field(default_factory=lambda: np.zeros(0, np.uint8))  # m bits per kept entry, MSB first

    @property
    def numel(self) -> int:
        return int(math.prod(self.shape))

    def payload(self) -> np.ndarray:
        """signs | remainders | level codes | unary: all but the last have lengths known from the table."""
        return np.concatenate([self.signs, self.rem, self.mags, self.unary])

    def positions(self, name: str = "tensor") -> np.ndarray:
        return rice_decode(self.rice_bits, self.unary, self.rem, self.count, self.numel, name)

    def negative(self) -> np.ndarray:
        return np.unpackbits(self.signs)[: self.count].astype(bool)

    def level_codes(self) -> np.ndarray:
        if not self.magnitude_bits:
            return np.zeros(self.count, dtype=np.int64)
        return _unpack_fixed(self.mags, self.count, self.magnitude_bits)

    def dense(self, name: str = "tensor") -> torch.Tensor:
        """The decoded tensor (original dtype), built directly on the CPU."""
        dtype = _DTYPES[self.dtype]
        mags = np.float32(self.scale) * np.asarray(self.levels or (1.0,), dtype=np.float32)
        vals = torch.from_numpy(np.concatenate([mags, -mags])).to(dtype)  # index: level + L * negative
        # scatter the bit patterns through a same-width integer view: numpy has no bf16
        ints = vals.view(_INT_OF_WIDTH[vals.element_size()]).numpy()
        out = np.zeros(self.numel, dtype=ints.dtype)
        negative = self.negative().view(np.uint8)
        index = self.level_codes() + mags.size * negative if self.magnitude_bits else negative
        out[self.positions(name)] = ints[index]
        return torch.from_numpy(out).view(dtype).reshape(self.shape)

    def ternary_packed(self, name: str = "tensor") -> torch.Tensor:
        """The 2-bit device form (see adapter_kernels.ternary): 4 entries per byte, 01 = +1, 11 = -1."""
        from adapter_kernels.ternary import pack_codes

        if self.magnitude_bits:
            raise AdapterError(f"{name} has {2 ** self.magnitude_bits} magnitudes, not a ternary tensor",
                               "not_ternary")
        codes = np.zeros(self.numel, dtype=np.uint8)
        codes[self.positions(name)] = 1 | (self.negative().astype(np.uint8) << 1)
        return pack_codes(torch.from_numpy(codes))


def _pack_fixed(values: np.ndarray, bits: int) -> np.ndarray:
    """Non-negative integers < 2^bits as `bits` bits each, MSB first, packed into bytes."""
    if not bits:
        return np.zeros(0, dtype=np.uint8)
    shifts = np.arange(bits - 1, -1, -1, dtype=np.int64)
    return np.packbits(((values.astype(np.int64)[:, None] >> shifts) & 1).astype(np.uint8).reshape(-1))


def _unpack_fixed(data: np.ndarray, count: int, bits: int) -> np.ndarray:
    raw = np.unpackbits(data)[: count * bits].reshape(count, bits).astype(np.int64)
    return raw @ (np.int64(1) << np.arange(bits - 1, -1, -1, dtype=np.int64))


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
            if device.type == "cuda" and not t.magnitude_bits:
                from adapter_kernels.ternary import ternary_add

                w = torch.zeros(t.shape, dtype=_DTYPES[t.dtype], device=device)
                out[name] = ternary_add(w, t.ternary_packed(name).to(device), t.scale)
            else:
                out[name] = t.dense(name).to(device)
        return Adapter(config=json.loads(json.dumps(self.config)), tensors=out)

    # --- encode to bytes / file ---------------------------------------------------------------
    def _document(self) -> bytes:
        """The PEFT config and the compression parameters, as JSON."""
        p = self.params
        doc = {
            "adapter_config": self.config,
            "compression": {
                "density": p.density,
                "scope": p.scope,
                "alpha": p.alpha,
                "replace_factor": p.replace_factor,
                "magnitude_bits": p.magnitude_bits,
                "factorization": p.factorization,
                "k": self.count,
                **({"keep": p.keep} if p.keep != "exact" else {}),
                "n": self.numel,
            },
        }
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    def _blob_v2(self) -> bytes:
        """zlib(document | tensor table) | payloads (layout in docs/compeft.md, "File format").

        zlib takes the repetition out of the head: the PEFT config is ~1 KB of
        mostly null fields, and names and scales repeat from tensor to tensor;
        on a toy adapter that head would otherwise outweigh the payloads."""
        doc = self._document()
        parts = [_uvarint(len(doc)), doc, _uvarint(len(self.tensors))]
        previous = b""
        for name in sorted(self.tensors):
            t = self.tensors[name]
            key = name.encode()
            shared = _common_prefix(previous, key)
            previous = key
            parts += [_uvarint(shared), _uvarint(len(key) - shared), key[shared:],
                      bytes([_DTYPE_CODES.index(t.dtype)]), _uvarint(len(t.shape))]
            parts += [_uvarint(d) for d in t.shape]
            parts += [_uvarint(t.count), bytes([t.rice_bits, t.magnitude_bits]),
                      struct.pack("<fd", t.scale, t.std), struct.pack(f"<{len(t.levels)}f", *t.levels),
                      _uvarint(t.unary.size)]
        deflate = zlib.compressobj(9, zdict=_HEAD_DICTIONARY)
        head = deflate.compress(b"".join(parts)) + deflate.flush()
        payloads = [np.ascontiguousarray(self.tensors[name].payload()).tobytes() for name in sorted(self.tensors)]
        return b"".join([_uvarint(len(head)), head, *payloads])

    def to_bytes(self) -> bytes:
        if self._blob is None:
            blob = np.frombuffer(self._blob_v2(), dtype=np.uint8)
            meta = {"format": FORMAT_NAME, "format_version": str(FORMAT_VERSION)}
            meta["checksum"] = _checksum(meta, {BLOB_NAME: blob})
            self._blob = _safetensors_bytes({BLOB_NAME: blob}, meta)
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


# zlib's preset dictionary for the head of a version 2 file (part of the format: changing it
# needs a new version). Text that most heads repeat: a PEFT adapter_config (as PEFT 0.21 writes
# it), the compression parameters and LoRA tensor names; it saves ~330 bytes a file.
_HEAD_DICTIONARY = (
    b'base_model.model.model.layers.0.self_attn.q_proj.lora_A.weightmlp.down_proj.lora_B.weight{"adapt'
    b'er_config":{"alora_invocation_tokens":null,"alpha_pattern":{},"arrow_config":null,"auto_mapping"'
    b':null,"base_model_name_or_path":null,"bias":"none","corda_config":null,"ensure_weight_tying":fal'
    b'se,"eva_config":null,"exclude_modules":null,"fan_in_fan_out":false,"inference_mode":true,"init_l'
    b'ora_weights":true,"kasa_config":null,"layer_replication":null,"layers_pattern":null,"layers_to_t'
    b'ransform":null,"loftq_config":{},"lora_alpha":16,"lora_bias":false,"lora_dropout":0.0,"lora_ga_c'
    b'onfig":null,"megatron_config":null,"megatron_core":"megatron.core","modules_to_save":null,"monte'
    b'clora_config":null,"peft_type":"LORA","peft_version":"0.21.2","qalora_group_size":16,"r":8,"rank'
    b'_pattern":{},"revision":null,"target_modules":["q_proj","k_proj","v_proj","o_proj","gate_proj","'
    b'up_proj","down_proj"],"target_parameters":null,"task_type":"CAUSAL_LM","trainable_token_indices"'
    b':null,"use_bdlora":null,"use_dora":false,"use_qalora":false,"use_rslora":false,"velora_config":n'
    b'ull},"compression":{"alpha":null,"density":0.1,"factorization":"as_is","k":0,"magnitude_bits":0,'
    b'"n":0,"replace_factor":1.0,"scope":"global"}}'
)


def _uvarint(n: int) -> bytes:
    """LEB128: 7 bits per byte, low groups first, high bit set on all but the last byte."""
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _common_prefix(a: bytes, b: bytes) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


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
def fit_levels(magnitudes: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` magnitudes that minimise the squared error of these values, and each value's code.

    1-D k-means (Lloyd-Max) started from the quantiles. In one dimension the
    clusters are intervals between midpoints, so after one sort each iteration
    only needs a binary search per midpoint and prefix sums.
    """
    x = magnitudes.astype(np.float64)
    if x.size == 0:
        return np.zeros(count), np.zeros(0, dtype=np.int64)
    xs = np.sort(x)
    prefix = np.concatenate([[0.0], np.cumsum(xs)])
    centers = np.quantile(xs, (np.arange(count) + 0.5) / count)
    for _ in range(100):
        # cluster j holds the values in (midpoint j-1, midpoint j], as searchsorted assigns them below
        bounds = np.concatenate([[0], np.searchsorted(xs, (centers[1:] + centers[:-1]) / 2, "right"), [xs.size]])
        sizes = np.diff(bounds)
        sums = prefix[bounds[1:]] - prefix[bounds[:-1]]
        new = np.sort(np.where(sizes > 0, sums / np.maximum(sizes, 1), centers))  # an empty cluster stays put
        if np.array_equal(new, centers):
            break
        centers = new
    return centers, np.searchsorted((centers[1:] + centers[:-1]) / 2, x)


def _encode(name: str, t: torch.Tensor, bits: np.ndarray, thr_bits: int, ties: int | None, scale: float, std: float,
            magnitude_bits: int = 0):
    """Encode one tensor: keep magnitudes > thr_bits, plus entries equal to it.

    `ties=None` keeps every entry equal to the threshold; an int keeps only the
    first `ties` of them (row-major). With magnitude_bits, the kept magnitudes
    are fitted by 2^m levels, stored as multiples of `std` (so the scale
    replace_factor * std rescales them all). Returns (CompressedTensor, ties used).
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
    levels, mags = (), np.zeros(0, dtype=np.uint8)
    if magnitude_bits:
        centers, codes = fit_levels(np.abs(bits[pos].view(np.float32)), 1 << magnitude_bits)
        levels = tuple(_f32(c / std) if std > 0 else 0.0 for c in centers)
        mags = _pack_fixed(codes, magnitude_bits)
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
        magnitude_bits=magnitude_bits,
        levels=levels,
        mags=mags,
    )
    return ct, used


def balanced_pair(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A', B') with B' @ A' = B @ A: B' = U sqrt(S), A' = sqrt(S) V^T from the SVD of B @ A.

    The SVD of the rank-r product comes from two thin QRs and an r x r SVD, in
    fp64. Trained LoRA factors mix rank components of very different sizes;
    here component i has norm sqrt(s_i) in both factors. Shapes and dtypes
    stay those of A and B (zero rows/columns pad a rank above min(in, out)).
    """
    qb, rb = torch.linalg.qr(b.double())  # out x k1, k1 x r
    qa, ra = torch.linalg.qr(a.double().T)  # in x k2, k2 x r
    u, s, vh = torch.linalg.svd(rb @ ra.T, full_matrices=False)
    root = s.sqrt()
    a2 = torch.zeros(a.shape, dtype=torch.float64)
    b2 = torch.zeros(b.shape, dtype=torch.float64)
    a2[: root.numel()] = root[:, None] * (vh @ qa.T)
    b2[:, : root.numel()] = (qb @ u) * root
    return a2.to(a.dtype), b2.to(b.dtype)


def _balanced(adapter: Adapter) -> Adapter:
    """A copy of `adapter` with every LoRA pair rewritten by `balanced_pair` (other tensors as they are)."""
    tensors = dict(adapter.tensors)
    for module, (a, b) in adapter.pairs():
        for key, t in ((adapter.key(module, "A"), a), (adapter.key(module, "B"), b)):
            if not torch.isfinite(t).all():
                raise AdapterError(f"{key} holds inf or NaN values", "non_finite")
        tensors[adapter.key(module, "A")], tensors[adapter.key(module, "B")] = balanced_pair(a, b)
    return Adapter(config=adapter.config, tensors=tensors)


def compress(
    adapter: AdapterLike,
    density: float = 0.1,
    alpha: float | None = None,
    scope: str = "global",
    replace_factor: float = 1.0,
    magnitude_bits: int = 0,
    factorization: str = "as_is",
    keep: str = "exact",
) -> CompressedAdapter:
    """Sparsify every tensor of `adapter` (an Adapter or a PEFT adapter folder) to `density`
    and ternarise it (see module docstring).

    scope="global": one top-k threshold and one std over all tensors (the paper).
    scope="tensor": k and std per tensor. `alpha` fixes the scale instead of replace_factor * std.
    magnitude_bits=m: 2^m magnitudes per tensor instead of one. factorization="balanced":
    re-factor each LoRA pair through the SVD of its product first (a copy of the adapter).
    keep="exact": exactly round(density * n) entries, ties broken by position; keep="paper":
    every entry at least as large as the (int(density * n) + 1)-th largest, as the paper's code.
    Memory stays near one tensor plus the output: a statistics pass tensor by
    tensor, a refinement pass restricted to one histogram bin (skipped when all
    tensors are bf16: the high 16 bits are then the whole value), an encode pass.
    """
    params = CompressParams(density=density, alpha=alpha, scope=scope, replace_factor=replace_factor,
                            magnitude_bits=magnitude_bits, factorization=factorization, keep=keep)
    adapter = as_adapter(adapter)
    names = _float_tensors(adapter)
    if params.factorization == "balanced":
        adapter = _balanced(adapter)

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
        thr = _select(total.hist, keep_count(params.density, total.n, params.keep), low_hist(total.hist, group))
        std = total.std
        scale = scale_of(std)
        # "paper" keeps every entry tied with the threshold; "exact" only the first thr.ties of them
        ties = None if params.keep == "paper" or thr.ties == thr.tie_total else thr.ties
        expected = thr.k + (thr.tie_total - thr.ties if params.keep == "paper" else 0)
        kept = 0
        for name in group:
            ct, used = _encode(name, adapter.tensors[name], bits_of(name), thr.bits, ties, scale,
                               std if params.alpha is None else 0.0, params.magnitude_bits)
            if ties is not None:
                ties -= used
            kept += ct.count
            out[name] = ct
        if kept != expected:  # an internal invariant, not bad input
            raise AssertionError(f"kept {kept} entries, the selection said {expected}")
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
    """Parse the bytes of a compressed file (see `load`); reads format versions 1 and 2."""
    meta = _read_metadata(data, source)
    try:
        payloads = st_load_bytes(data)
    except (SafetensorError, ValueError, TypeError) as exc:
        raise CorruptFile(f"{source} is not a valid safetensors file: {exc}") from exc
    if meta.get("checksum") != _checksum(meta, payloads):
        raise CorruptFile(f"{source}: checksum mismatch (the file is damaged or was modified)")
    # past the checksum only a crafted file can be malformed: every field is still bounds-checked
    try:
        if meta["format_version"] == "1":
            config, params, tensors = _parse_v1(meta, payloads)
        else:
            config, params, tensors = _parse_v2(payloads, source)
    except CorruptFile:
        raise
    except (KeyError, TypeError, ValueError, AdapterError, zlib.error, struct.error) as exc:
        raise CorruptFile(f"{source}: malformed metadata ({type(exc).__name__}: {exc})") from exc
    return CompressedAdapter(config=config, tensors=tensors, params=params, _blob=bytes(data))


def _params_from(comp: dict) -> CompressParams:
    return CompressParams(
        density=float(comp["density"]),
        alpha=None if comp["alpha"] is None else float(comp["alpha"]),
        scope=comp["scope"],
        replace_factor=float(comp["replace_factor"]),
        magnitude_bits=int(comp.get("magnitude_bits", 0)),
        factorization=comp.get("factorization", "as_is"),
        keep=comp.get("keep", "exact"),  # absent: "exact", the only rule before "keep" existed
    )


def _parse_v1(meta: dict[str, str], payloads: dict[str, np.ndarray]):
    """Version 1: JSON metadata per tensor in the safetensors header, one payload tensor per tensor."""
    config = json.loads(meta["adapter_config"])
    params = _params_from(json.loads(meta["compression"]))
    tmeta = json.loads(meta["tensors"])
    tensors = {name: _tensor_from(name, m, payloads) for name, m in sorted(tmeta.items())}
    if set(payloads) != set(tensors):
        raise CorruptFile("payload tensors do not match the metadata")
    return config, params, tensors


class _Reader:
    """Sequential reads from the head or the body of a version 2 blob; running past the end raises CorruptFile."""

    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise CorruptFile(f"the data ends early ({n} bytes wanted at offset {self.pos} of {len(self.data)})")
        self.pos += n
        return self.data[self.pos - n : self.pos]

    def byte(self) -> int:
        return self.take(1)[0]

    def uvarint(self) -> int:
        n = shift = 0
        while True:
            byte = self.byte()
            n |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return n
            shift += 7
            if shift > 63:
                raise CorruptFile("an integer in the tensor table is too long")


_MAX_HEAD = 1 << 26  # bytes of the inflated head; bounds what a crafted zlib stream may make us allocate


def _parse_v2(payloads: dict[str, np.ndarray], source: str):
    blob = payloads.get(BLOB_NAME)
    if set(payloads) != {BLOB_NAME} or blob.dtype != np.uint8 or blob.ndim != 1:
        raise CorruptFile(f"{source}: expected one uint8 tensor {BLOB_NAME!r}, found {sorted(payloads)}")
    body = _Reader(blob.tobytes())
    inflate = zlib.decompressobj(zdict=_HEAD_DICTIONARY)
    r = _Reader(inflate.decompress(body.take(body.uvarint()), _MAX_HEAD))
    if inflate.unconsumed_tail or not inflate.eof or inflate.unused_data:
        raise CorruptFile(f"{source}: the compressed head is incomplete or too large")
    doc = json.loads(r.take(r.uvarint()))
    config, comp = doc["adapter_config"], doc["compression"]
    if not isinstance(config, dict):
        raise CorruptFile(f"{source}: adapter_config is not an object")
    params = _params_from(comp)
    count = r.uvarint()
    if count > len(r.data):
        raise CorruptFile(f"{source}: {count} tensors cannot fit in a head of {len(r.data)} bytes")
    records, previous = [], b""
    for _ in range(count):
        shared = r.uvarint()
        if shared > len(previous):
            raise CorruptFile(f"{source}: a tensor name shares more bytes than its predecessor has")
        key = previous[:shared] + r.take(r.uvarint())
        if key <= previous:
            raise CorruptFile(f"{source}: tensor names are not in strictly increasing order")
        previous = key
        dtype = r.byte()
        if dtype >= len(_DTYPE_CODES):
            raise CorruptFile(f"{source}: unknown dtype code {dtype}")
        ndim = r.uvarint()
        if ndim > 8:
            raise CorruptFile(f"{source}: a tensor of {ndim} dimensions")
        shape = tuple(r.uvarint() for _ in range(ndim))
        n_kept, rice_bits, mag_bits = r.uvarint(), r.byte(), r.byte()
        if mag_bits > MAX_MAGNITUDE_BITS:
            raise CorruptFile(f"{source}: {mag_bits} magnitude bits (at most {MAX_MAGNITUDE_BITS})")
        scale, std = struct.unpack("<fd", r.take(12))
        levels = struct.unpack(f"<{(1 << mag_bits) if mag_bits else 0}f", r.take(4 << mag_bits if mag_bits else 0))
        records.append((key.decode(), _DTYPE_CODES[dtype], shape, n_kept, rice_bits, mag_bits,
                        scale, std, levels, r.uvarint()))
    if r.pos != len(r.data):
        raise CorruptFile(f"{source}: {len(r.data) - r.pos} bytes after the tensor table")
    tensors = {}
    for name, dtype, shape, n_kept, b, m, scale, std, levels, unary_len in records:
        numel = math.prod(shape)
        if numel > _MAX_NUMEL or not (0 <= n_kept <= numel) or b > 40:
            raise CorruptFile(f"{name}: inconsistent shape/count/rice parameter in the table")
        if not all(math.isfinite(x) for x in (scale, std, *levels)):
            raise CorruptFile(f"{name}: a scale or level is not finite")
        ns, nr, nm = (n_kept + 7) // 8, (n_kept * b + 7) // 8, (n_kept * m + 7) // 8
        data = np.frombuffer(body.take(ns + nr + nm + unary_len), dtype=np.uint8)
        t = CompressedTensor(shape=shape, dtype=dtype, count=n_kept, scale=scale, std=std, rice_bits=b,
                             signs=data[:ns], rem=data[ns : ns + nr], mags=data[ns + nr : ns + nr + nm],
                             unary=data[ns + nr + nm :], magnitude_bits=m, levels=levels)
        t.positions(name)  # validates the streams now, not at first use
        tensors[name] = t
    if body.pos != len(body.data):
        raise CorruptFile(f"{source}: {len(body.data) - body.pos} bytes after the last payload")
    if sum(t.count for t in tensors.values()) != comp["k"] or sum(t.numel for t in tensors.values()) != comp["n"]:
        raise CorruptFile(f"{source}: the tensors do not add up to the recorded k and n")
    return config, params, tensors


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
    if meta.get("format_version") not in READABLE_VERSIONS:
        raise CorruptFile(
            f"{source}: unsupported {FORMAT_NAME} format version {meta.get('format_version')!r} "
            f"(this library reads versions {', '.join(READABLE_VERSIONS)})"
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
# fitted levels start near the right size (factor 1), the paper's std-based scale far below it
LEVEL_CANDIDATES = (0.75, 1.0, 1.25, 1.5, 2.0)


@dataclass(frozen=True)
class ScaleChoice:
    replace_factor: float
    score: float
    scores: dict[float, float]
    compressed: CompressedAdapter


def choose_scale(
    adapter: AdapterLike,
    density: float,
    score_fn: Callable[[Adapter], float],
    candidates: Iterable[float] | None = None,
    scope: str = "global",
    magnitude_bits: int = 0,
    factorization: str = "as_is",
    keep: str = "exact",
) -> ScaleChoice:
    """Pick replace_factor by `score_fn(decompressed_adapter) -> float` (higher is better).

    `candidates` default to DEFAULT_CANDIDATES (the paper's rule) or, with
    magnitude_bits, LEVEL_CANDIDATES.

    The positions and signs do not depend on the factor, so the adapter is
    compressed once and only the scale changes per candidate. Ties go to the
    earliest candidate; NaN scores never win.
    """
    adapter = as_adapter(adapter)
    if candidates is None:
        candidates = LEVEL_CANDIDATES if magnitude_bits else DEFAULT_CANDIDATES
    cands = [float(c) for c in candidates]
    if not cands:
        raise AdapterError("choose_scale needs at least one candidate", "invalid_candidates")
    for c in cands:
        CompressParams(density=density, scope=scope, replace_factor=c, keep=keep)  # validates each
    base = compress(adapter, density=density, scope=scope, replace_factor=1.0, magnitude_bits=magnitude_bits,
                    factorization=factorization, keep=keep)
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
