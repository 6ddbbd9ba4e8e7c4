"""Reading and writing HF safetensors checkpoints in bounded memory: headers read
without mmap, tensors read by row chunks with read-ahead, files written tensor by
tensor (sharded like HF), and the dtype tables."""

from __future__ import annotations

import contextlib
import json
import math
import os
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import AdapterError, CorruptFile
from ..lineup import natural_key as _natural_key  # noqa: F401  (read order, shared)
from ..safetensors_header import DTYPE_BITS, HeaderError, read_header

Progress = Callable[[float, str], None] | None

EXTRA_NAME = "diff_extra.safetensors"  # dense diffs extract() cannot express as LoRA (norms, embeddings)
REPORT_NAME = "extract_report.json"
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
DEFAULT_SHARD_BYTES = 2 * 10**9  # HF counts "2GB" in powers of ten too
DEFAULT_CHUNK_BYTES = 16 * 2**20  # fp32 working set of one row chunk
# extract_dense and apply stream each chunk through read, one or two passes of
# arithmetic and write: a chunk that stays in the CPU's L2 makes those passes
# cache hits. Measured on a 1.14 GiB fp32 pair (2-core Xeon, 4 MiB L2): apply
# 1.1 s at 2 MiB, 1.2 at 4, 1.3 at 8, 2.9 at 32 (the naive load-add-save 4.6);
# extract_dense 2.1 s at 4 MiB, 2.8 at 16, 4.2 at 32 (naive 3.2). Python's
# cost per chunk stays small at this size (~300 chunks per GiB).
STREAM_CHUNK_BYTES = 4 * 2**20
DEFAULT_HOLD_BYTES = 128 * 2**20  # extract() factors a diff matrix up to this size (fp32) in memory
MAX_HEADER_BYTES = 100 * 2**20  # the cap safetensors itself enforces
MAX_HEADER_TENSORS = 10**6  # far above any checkpoint; bounds what a crafted header allocates
VOCAB_GROWTH_KEY = "vocab_growth"  # diff metadata: JSON {tensor: [base rows, fine-tune rows]}

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_CODES = {v: k for k, v in _DTYPES.items()}
_MATH_DTYPES = {"F64", "F32", "F16", "BF16"}  # dtypes a diff is computed and stored in


def _itemsize(code: str) -> int:
    return DTYPE_BITS[code] // 8  # the one dtype size table (whole-byte dtypes here)


def _report(progress: Progress, fraction: float, message: str) -> None:
    if progress is not None:
        progress(min(1.0, max(0.0, fraction)), message)


# --- reading safetensors without mmap ------------------------------------------------------


@dataclass(frozen=True)
class _Entry:
    name: str
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    path: Path
    start: int  # absolute byte offset in the file
    nbytes: int

    @property
    def row_bytes(self) -> int:
        return math.prod(self.shape[1:]) * _itemsize(self.dtype) if self.shape else self.nbytes

    @property
    def rows(self) -> int:
        return self.shape[0] if self.shape else 1


def _read_header(path: Path) -> tuple[dict, int]:
    """The JSON header of a safetensors file and the offset its data starts at,
    validated as the format's own reader does (adapters_ops.safetensors_header,
    which upload validation shares: caps, dtypes, dtype x shape = bytes, tiled
    offsets, exact file length); dtypes this reader cannot compute in are refused."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        try:
            header = read_header(fh, size, max_bytes=MAX_HEADER_BYTES, max_tensors=MAX_HEADER_TENSORS)
        except HeaderError as exc:
            raise CorruptFile(f"{path.name}: {exc.detail}", exc.code) from None
        fh.seek(0)
        (n,) = struct.unpack("<Q", fh.read(8))
    for name, info in header.items():
        if name != "__metadata__" and info["dtype"] not in _DTYPES:
            raise CorruptFile(f"{path.name}: {name} has unsupported dtype {info['dtype']!r}", "unsupported_dtype")
    return header, 8 + n


def _file_entries(path: Path) -> tuple[dict[str, _Entry], dict]:
    """The file's tensors, and its __metadata__ (str -> str, empty when absent)."""
    header, base = _read_header(path)
    entries = {
        name: _Entry(name, info["dtype"], tuple(int(d) for d in info["shape"]), path,
                     base + info["data_offsets"][0], info["data_offsets"][1] - info["data_offsets"][0])
        for name, info in header.items() if name != "__metadata__"
    }
    metadata = header.get("__metadata__")
    return entries, metadata if isinstance(metadata, dict) else {}


class _Checkpoint:
    """The tensors of a HF-layout folder (model.safetensors, or shards listed by
    model.safetensors.index.json) or of one .safetensors file, read by row range
    into fresh buffers: nothing stays resident after a read."""

    def __init__(self, path: str | os.PathLike):
        path = Path(path)
        if path.is_file():
            files = [path]
        elif (path / INDEX_NAME).is_file():
            try:
                weight_map = json.loads((path / INDEX_NAME).read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise CorruptFile(f"{path / INDEX_NAME} has no valid weight_map", "index_invalid") from exc
            files = []
            for fname in sorted(set(weight_map.values())):
                if "/" in fname or "\\" in fname or fname.startswith("."):
                    raise CorruptFile(f"{INDEX_NAME} names an unsafe file {fname!r}", "index_invalid")
                files.append(path / fname)
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise CorruptFile(f"{INDEX_NAME} lists {missing[0]}, which is not in {path}", "index_invalid")
        elif (path / SINGLE_NAME).is_file():
            files = [path / SINGLE_NAME]
        elif path.is_dir():
            files = sorted(p for p in path.glob("*.safetensors")
                           if not p.name.startswith("adapter_model") and p.name != EXTRA_NAME)
        else:
            raise AdapterError(f"{path} does not exist", "missing_checkpoint")
        if not files:
            raise AdapterError(f"{path} holds no .safetensors weights", "missing_checkpoint")
        self.path = path
        self.entries: dict[str, _Entry] = {}
        self.metadata: dict = {}
        for f in files:
            entries, metadata = _file_entries(f)
            self.metadata.update(metadata)
            for name, entry in entries.items():
                if name in self.entries:
                    raise CorruptFile(f"{name} is stored twice ({self.entries[name].path.name}, {f.name})",
                                      "duplicate_tensor")
                self.entries[name] = entry
        self._handles: dict[Path, object] = {}

    def __enter__(self) -> _Checkpoint:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        for fh in self._handles.values():
            fh.close()
        self._handles.clear()

    def names(self) -> list[str]:
        return sorted(self.entries, key=_natural_key)

    def manifest(self) -> dict[str, dict]:
        return {n: {"shape": list(e.shape), "dtype": e.dtype} for n, e in self.entries.items()}

    def read(self, name: str, r0: int = 0, r1: int | None = None) -> torch.Tensor:
        """Rows r0:r1 of a tensor (all of it by default), in its own dtype, in a new buffer."""
        e = self.entries[name]
        r1 = e.rows if r1 is None else r1
        nbytes = (r1 - r0) * e.row_bytes if e.shape else e.nbytes
        buf = torch.empty(nbytes, dtype=torch.uint8)
        fh = self._handles.get(e.path)
        if fh is None:
            fh = self._handles[e.path] = open(e.path, "rb", buffering=0)  # noqa: SIM115 (closed in close())
        start = e.start + r0 * e.row_bytes
        fh.seek(start)
        view, got = memoryview(buf.numpy()), 0
        while got < nbytes:
            n = fh.readinto(view[got:])
            if not n:
                raise CorruptFile(f"{e.path.name}: unexpected end of file in {name}", "truncated")
            got += n
        if _FADVISE:  # the disk fetches the next piece while this one is computed and written: no RSS
            os.posix_fadvise(fh.fileno(), start + nbytes, nbytes, os.POSIX_FADV_WILLNEED)
        shape = ((r1 - r0), *e.shape[1:]) if e.shape else ()
        return buf.view(_DTYPES[e.dtype]).reshape(shape)


_FADVISE = hasattr(os, "posix_fadvise")


@contextlib.contextmanager
def _one_thread(enabled: bool = True) -> Iterator[None]:
    """One intra-op thread for the block, restored after. Streaming a checkpoint
    is element-wise arithmetic on cache-sized chunks between reads and writes:
    memory-bound, so a second thread adds little, while its barrier per op (and
    OpenMP's spin-waiting between ops, which takes a core from the I/O) made
    extract_dense/apply 1.2-2x slower than the naive way on a loaded 2-core box."""
    old = torch.get_num_threads()
    if enabled:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if enabled:
            torch.set_num_threads(old)


def _row_chunks(entry_shape: tuple[int, ...], chunk_bytes: int, width_bytes: int = 4) -> list[tuple[int, int]]:
    """Row ranges whose fp32 working copy stays under chunk_bytes (at least one row)."""
    if not entry_shape:
        return [(0, 1)]
    rows = entry_shape[0]
    row = max(1, math.prod(entry_shape[1:]) * width_bytes)
    step = max(1, chunk_bytes // row)
    return [(r, min(rows, r + step)) for r in range(0, rows, step)] or [(0, 0)]


def manifest_of(base_dir: str | os.PathLike) -> dict[str, dict]:
    """tensor name -> {"shape": [...], "dtype": "BF16"} of a HF-layout folder (or one
    .safetensors file), from the headers only: no tensor is loaded."""
    with _Checkpoint(base_dir) as ck:
        return ck.manifest()


# --- writing safetensors incrementally ----------------------------------------------------


@dataclass(frozen=True)
class _Spec:
    name: str
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _itemsize(self.dtype)


def _write_file(path: Path, specs: Sequence[_Spec], produce: Callable[[_Spec], Iterable[torch.Tensor]],
                metadata: dict[str, str] | None = None, on_tensor: Callable[[_Spec], None] | None = None) -> int:
    """Write one safetensors file whose header is known up front (every shape and
    dtype), then stream each tensor's bytes in order from `produce(spec)`, which
    yields row chunks. Written under a temporary name, then os.replace."""
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for s in specs:
        header[s.name] = {"dtype": s.dtype, "shape": list(s.shape), "data_offsets": [offset, offset + s.nbytes]}
        offset += s.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as safetensors writes it
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(struct.pack("<Q", len(raw)))
            fh.write(raw)
            for s in specs:
                written = 0
                for chunk in produce(s):
                    if chunk.dtype != _DTYPES[s.dtype]:
                        raise AssertionError(f"{s.name}: produced {chunk.dtype}, header says {s.dtype}")
                    data = chunk.contiguous().reshape(-1).view(torch.uint8).numpy()
                    fh.write(memoryview(data))
                    written += data.nbytes
                if written != s.nbytes:
                    raise AssertionError(f"{s.name}: produced {written} bytes, header says {s.nbytes}")
                if on_tensor is not None:
                    on_tensor(s)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return 8 + len(raw) + offset


def _plan_shards(specs: Sequence[_Spec], max_shard_bytes: int | None) -> list[list[_Spec]]:
    shards: list[list[_Spec]] = [[]]
    size = 0
    for s in specs:
        if shards[-1] and max_shard_bytes is not None and size + s.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += s.nbytes
    return shards


def write_checkpoint(out_dir: str | os.PathLike, specs: Sequence[tuple[str, str | torch.dtype, Sequence[int]]],
                     produce: Callable[[str], Iterable[torch.Tensor]], *,
                     max_shard_bytes: int | None = DEFAULT_SHARD_BYTES, progress: Progress = None,
                     metadata: dict[str, str] | None = None) -> list[Path]:
    """Write tensors (name, dtype, shape) into `out_dir` the way HF does: one
    `model.safetensors`, or `model-0000k-of-0000n.safetensors` shards of at most
    `max_shard_bytes` (a bigger tensor gets a shard of its own) plus
    `model.safetensors.index.json`. `produce(name)` yields the tensor as row
    chunks, so memory stays at one chunk. Returns the files written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plan = [_Spec(n, d if isinstance(d, str) else _CODES[d], tuple(int(x) for x in shape)) for n, d, shape in specs]
    if len({s.name for s in plan}) != len(plan):
        raise AdapterError("write_checkpoint: duplicate tensor names", "duplicate_tensor")
    shards = _plan_shards(plan, max_shard_bytes)
    total = sum(s.nbytes for s in plan) or 1
    done = 0

    def tick(s: _Spec) -> None:
        nonlocal done
        done += s.nbytes
        _report(progress, done / total, f"wrote {s.name}")

    names = [SINGLE_NAME] if len(shards) == 1 else [
        f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    files = []
    for fname, shard in zip(names, shards, strict=True):
        _write_file(out / fname, shard, lambda s: produce(s.name), metadata, tick)
        files.append(out / fname)
    if len(shards) > 1:
        index = {"metadata": {"total_size": sum(s.nbytes for s in plan)},
                 "weight_map": {s.name: f for f, shard in zip(names, shards, strict=True) for s in shard}}
        tmp = out / (INDEX_NAME + ".tmp")
        tmp.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, out / INDEX_NAME)
        files.append(out / INDEX_NAME)
    return files
