"""Reading a safetensors header without reading tensor data, validated as the
format's own reader does: the size caps, UTF-8 JSON without duplicate keys,
known dtypes, dtype x shape = bytes, tensors tiling the data with no hole or
overlap, and the data ending the file.

Standard library only: the hub's upload validation (web process) and the
library's streamed checkpoint reader (adapters_ops.transfer) share it, with
their own error types (HeaderError carries `code` and `detail`).
"""

from __future__ import annotations

import json
import math
import struct
from typing import BinaryIO

# Bits per element of every safetensors dtype (the sub-byte floats pack several to a byte).
DTYPE_BITS = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8,
    "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8, "F8_E5M2FNUZ": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
    "C64": 64, "F64": 64, "I64": 64, "U64": 64,
}


class HeaderError(ValueError):
    def __init__(self, code: str, detail: str):
        super().__init__(detail)
        self.code, self.detail = code, detail


def read_header(
    fileobj: BinaryIO, size: int | None = None, *, max_bytes: int, max_tensors: int,
) -> dict:
    """Read and validate a safetensors header without reading any tensor data.

    Returns the header: {name: {"dtype", "shape", "data_offsets"}}, plus
    "__metadata__" (str -> str) when the file has one. `max_bytes` and
    `max_tensors` cap what a crafted header may make the reader allocate.
    """
    if size is None:  # fall back to the stream's own length
        size = fileobj.seek(0, 2)
    fileobj.seek(0)
    if size == 0:
        raise HeaderError("empty_file", "The file is empty (0 bytes).")
    prefix = fileobj.read(8)
    if len(prefix) < 8:
        raise HeaderError("truncated_safetensors", f"The file has {size} bytes; a safetensors file starts with 8.")
    (n,) = struct.unpack("<Q", prefix)
    if n > max_bytes:
        raise HeaderError("header_too_large", f"The header claims {n} bytes; the limit is {max_bytes}.")
    if 8 + n > size:
        raise HeaderError("truncated_safetensors", f"The header claims {n} bytes but the file has only {size}.")
    raw = fileobj.read(n)
    if len(raw) < n:
        raise HeaderError("truncated_safetensors", f"The header claims {n} bytes but only {len(raw)} could be read.")
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_header_object_hook(max_tensors))
    except HeaderError:  # the tensor cap, hit while parsing
        raise
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise HeaderError("invalid_header", f"The header is not valid UTF-8 JSON: {exc}.") from None
    if not isinstance(header, dict):
        raise HeaderError("invalid_header", f"The header must be a JSON object, not {type(header).__name__}.")
    meta = header.get("__metadata__")
    if meta is not None and not (
        isinstance(meta, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    ):
        raise HeaderError("invalid_header", "__metadata__ must map strings to strings.")
    tensors = [(name, _tensor_info(name, info)) for name, info in header.items() if name != "__metadata__"]
    if len(tensors) > max_tensors:  # the hook's count allows for a __metadata__ this header may lack
        raise HeaderError("too_many_tensors", f"The header describes more than {max_tensors} tensors.")
    # Like safetensors' validate(): sorted by offsets, the tensors must tile the
    # byte buffer from 0 with no hole or overlap, and the buffer must end the file.
    end = 0
    for name, info in sorted(tensors, key=lambda t: tuple(t[1]["data_offsets"])):
        begin, stop = info["data_offsets"]
        if begin != end:
            kind = "a gap" if begin > end else "an overlap"
            raise HeaderError(
                "bad_offsets", f"Tensor {name} starts at byte {begin} but the data before it ends at {end} ({kind})."
            )
        end = stop
    if 8 + n + end != size:
        code = "truncated_safetensors" if 8 + n + end > size else "bad_offsets"
        why = "truncated" if code == "truncated_safetensors" else "trailing bytes after the tensors"
        raise HeaderError(code, f"Header and tensors need {8 + n + end} bytes but the file has {size} ({why}).")
    out = dict(tensors)
    if meta is not None:
        out["__metadata__"] = dict(meta)
    return out


def _header_object_hook(max_tensors: int):
    """json's object_pairs_hook for a header: refuses duplicate keys (two readers
    would see different tensors) and stops at the tensor cap while parsing, before
    a huge header has become millions of Python objects."""
    seen = 0

    def hook(pairs):
        nonlocal seen
        seen += 1  # one object per tensor, plus __metadata__ and the header itself
        if seen > max_tensors + 2:
            raise HeaderError("too_many_tensors", f"The header describes more than {max_tensors} tensors.")
        out = {}
        for k, v in pairs:
            if k in out:
                raise ValueError(f"duplicate key {k!r}")
            out[k] = v
        return out

    return hook


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _tensor_info(name: str, info) -> dict:
    if not isinstance(info, dict):
        raise HeaderError("invalid_header", f"Tensor {name}: the entry must be an object.")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if dtype not in DTYPE_BITS:
        raise HeaderError("unknown_dtype", f"Tensor {name} has unknown dtype {dtype!r}.")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise HeaderError("invalid_header", f"Tensor {name}: shape must be a list of non-negative integers.")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) and o >= 0 for o in offsets)):
        raise HeaderError("bad_offsets", f"Tensor {name}: data_offsets must be [begin, end] byte positions.")
    numel = math.prod(shape)
    bits = numel * DTYPE_BITS[dtype]
    if bits % 8:
        raise HeaderError("bad_offsets", f"Tensor {name}: {numel} x {dtype} does not end on a byte boundary.")
    begin, end = offsets
    if end - begin != bits // 8:
        raise HeaderError(
            "bad_offsets",
            f"Tensor {name}: {dtype} {shape} needs {bits // 8} bytes but data_offsets {offsets} span {end - begin}.",
        )
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}
