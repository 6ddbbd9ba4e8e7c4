"""The compressed adapter and its file: `CompressedTensor`, `CompressedAdapter` (decompress,
save), and reading a file back (`load`, `loads`; versions 1 and 2, checksummed)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import zlib
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.numpy import load as st_load_bytes

from ..adapter import Adapter
from ..errors import AdapterError, CorruptFile
from .packing import _unpack_fixed, rice_decode
from .params import (
    _DTYPE_CODES,
    _DTYPES,
    _INT_OF_WIDTH,
    _MAX_NUMEL,
    BLOB_NAME,
    CODEC_RICE,
    FILE_NAME,
    FORMAT_NAME,
    FORMAT_VERSION,
    MAX_MAGNITUDE_BITS,
    READABLE_VERSIONS,
    CompressParams,
)


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
