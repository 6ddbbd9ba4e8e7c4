"""Fine-tuning transfer: move a fine-tune from one base version to the next.

A fine-tune is a *diff vector* ``finetuned - base``; when two versions of a
base are linearly connected (the newer one continued training from the
older), adding the diff to the newer base recovers most of the fine-tune
without training, and a short fine-tune from there ("recycling then
fine-tuning") beats training from scratch (Lin et al., "Efficient Model
Development through Fine-tuning Transfer", 2025). A LoRA already is a
low-rank diff vector, so for adapters the transfer is a re-labelling plus an
optional short fine-tune; full fine-tunes are turned into a diff first.

Adapters (small, in memory):
    check_compatible / require_compatible   do the two bases line up?
    rebase(adapter, target_slug, scale)       the same LoRA, now on the target
    recycle_finetune(adapter, target_dir, examples, steps=..)
    transfer(adapter, source_dir, target_dir, target_slug, ..)  all three, for a worker
    quality_gate(...)                          did the transfer help on the target?

Full checkpoints (streamed, memory bounded by a chunk, never a checkpoint):
    manifest_of(dir)                           tensor name -> shape/dtype from headers
    extract_dense(finetuned_dir, base_dir, out_path)   the exact diff, one file
    extract(finetuned_dir, base_dir, rank)     the diff as a LoRA (randomized SVD)
    apply(diff, target_dir, out_dir, scale)    target + diff as a sharded checkpoint
    apply_to_state_dict(state_dict, diff, scale) / apply_to_model(model, diff, scale)
                                               the same in memory, in place

Entry points that take an adapter take an Adapter or a PEFT adapter folder (as_adapter).

Checkpoints are read with our own header parser and positioned reads into
buffers we own, not with ``safe_open``: safe_open memory-maps the file, and
every page it touches stays resident (and counted in RSS) until the file is
closed, so a tensor-by-tensor loop over one safe_open handle still ends with
the whole checkpoint resident (see docs/transfer.md). Large tensors are
processed in row chunks, so peak memory is a few chunks whatever the size of
the checkpoint or of its largest tensor.
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import re
import shutil
import struct
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .adapter import _LORA_KEY, PEFT_PREFIX, Adapter, AdapterLike, as_adapter
from .errors import AdapterError, CorruptFile, IncompatibleAdapters
from .evaluate import sft_batch as _sft_batch

__all__ = [
    "Compatibility",
    "ExtractReport",
    "Mismatch",
    "apply",
    "apply_to_model",
    "apply_to_state_dict",
    "check_compatible",
    "extract",
    "extract_dense",
    "manifest_of",
    "quality_gate",
    "rebase",
    "recycle_finetune",
    "require_compatible",
    "transfer",
    "write_checkpoint",
]

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
    return torch.empty((), dtype=_DTYPES[code]).element_size()


def _natural_key(name: str) -> list:
    """layers.2 before layers.10: the order a person reads a model in."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


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
    validated as the format's own reader does (size cap, dtypes, dtype x shape
    = bytes, contiguous offsets without holes or overlaps, exact file length)."""
    size = path.stat().st_size
    with open(path, "rb") as fh:
        raw = fh.read(8)
        if len(raw) < 8:
            raise CorruptFile(f"{path.name}: too short for a safetensors file", "header_truncated")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise CorruptFile(f"{path.name}: header length {n} is impossible for a {size}-byte file",
                              "header_too_large")
        try:
            header = json.loads(fh.read(n).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise CorruptFile(f"{path.name}: header is not JSON: {exc}", "header_invalid") from exc
    if not isinstance(header, dict):
        raise CorruptFile(f"{path.name}: header is not a JSON object", "header_invalid")
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            code, shape, (s, e) = info["dtype"], [int(d) for d in info["shape"]], info["data_offsets"]
        except (TypeError, KeyError, ValueError) as exc:
            raise CorruptFile(f"{path.name}: entry {name!r} is malformed", "header_invalid") from exc
        if code not in _DTYPES:
            raise CorruptFile(f"{path.name}: {name} has unsupported dtype {code!r}", "unsupported_dtype")
        if any(d < 0 for d in shape) or not (isinstance(s, int) and isinstance(e, int)) or e < s:
            raise CorruptFile(f"{path.name}: {name} has invalid shape or offsets", "header_invalid")
        if e - s != math.prod(shape) * _itemsize(code):
            raise CorruptFile(f"{path.name}: {name} is {e - s} bytes, {code} x {shape} needs "
                              f"{math.prod(shape) * _itemsize(code)}", "size_mismatch")
        spans.append((s, e, name))
    end = 0
    for s, e, name in sorted(spans):
        if s != end:
            raise CorruptFile(f"{path.name}: {name} starts at {s}, expected {end} (hole or overlap)", "bad_offsets")
        end = e
    if 8 + n + end != size:
        raise CorruptFile(f"{path.name}: data is {size - 8 - n} bytes, the header describes {end}", "size_mismatch")
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


# --- compatibility -----------------------------------------------------------------------


@dataclass(frozen=True)
class Mismatch:
    tensor: str
    source_shape: tuple[int, ...] | None  # None: the source has no such tensor
    target_shape: tuple[int, ...] | None  # None: the target has no such tensor


@dataclass(frozen=True)
class Compatibility:
    compatible: bool
    checked: int  # tensors compared
    mismatch: Mismatch | None = None
    message: str = ""

    def __bool__(self) -> bool:
        return self.compatible


_TRANSLORA_HINT = ("the bases' weights do not line up, so a diff (a LoRA is one) cannot be added to the target; "
                   "use Trans-LoRA instead (`hubctl transfer --method translora`), which distills the adapter "
                   "onto any target through synthetic data")


def _shape(manifest: Mapping[str, dict], name: str) -> tuple[int, ...] | None:
    info = manifest.get(name)
    if info is None:
        return None
    try:
        return tuple(int(d) for d in info["shape"])
    except (TypeError, KeyError, ValueError) as exc:
        raise AdapterError(f"manifest entry {name!r} has no valid shape", "invalid_manifest") from exc


def _adapter_tensor_names(adapter: Adapter) -> list[str]:
    """Base tensor names an adapter touches: each LoRA module's weight, and
    any other tensor it stores (modules_to_save) under its own name."""
    names = {m.removeprefix(PEFT_PREFIX) + ".weight" for m in adapter.modules()}
    for key in adapter.tensors:
        if not _LORA_KEY.match(key):
            names.add(re.sub(r"\.modules_to_save\.[^.]+", "", key.removeprefix(PEFT_PREFIX)))
    return sorted(names, key=_natural_key)


def _first_mismatch(src: Mapping[str, dict], tgt: Mapping[str, dict],
                    names: Sequence[str]) -> tuple[int, Mismatch | None]:
    for i, name in enumerate(names):
        a, b = _shape(src, name), _shape(tgt, name)
        if a is None or a != b:
            return i + 1, Mismatch(name, a, b)
    return len(names), None


def check_compatible(source_manifest: Mapping[str, dict], target_manifest: Mapping[str, dict],
                     adapter: AdapterLike | None = None) -> Compatibility:
    """Whether a diff taken on `source` can be added to `target`: every tensor the
    adapter targets (every tensor of either base when no adapter is given) exists
    on both with the same shape. Dtypes may differ: diffs are cast. The first
    mismatch (in reading order: layers.2 before layers.10) is named with both shapes."""
    src = {k: v for k, v in source_manifest.items() if k != "__metadata__"}
    tgt = {k: v for k, v in target_manifest.items() if k != "__metadata__"}
    names = (_adapter_tensor_names(as_adapter(adapter)) if adapter is not None
             else sorted(set(src) | set(tgt), key=_natural_key))
    checked, mm = _first_mismatch(src, tgt, names)
    if mm is None:
        return Compatibility(True, checked, None, f"{checked} tensors have the same shapes on both bases")
    name, a, b = mm.tensor, mm.source_shape, mm.target_shape
    if a is None and adapter is not None:
        why = f"{name} is not in the source base, so the adapter does not belong to it"
    elif a is None:
        why = f"{name} (shape {list(b)}) is in the target base but not in the source"
    elif b is None:
        why = f"{name} (shape {list(a)}) is missing from the target base"
    else:
        why = f"{name} has shape {list(a)} in the source base and {list(b)} in the target"
    return Compatibility(False, checked, mm, f"{why}: {_TRANSLORA_HINT}.")


def require_compatible(source_manifest: Mapping[str, dict], target_manifest: Mapping[str, dict],
                       adapter: AdapterLike | None = None) -> Compatibility:
    """check_compatible, raising IncompatibleAdapters (code shape_mismatch) when not."""
    result = check_compatible(source_manifest, target_manifest, adapter)
    if not result:
        raise IncompatibleAdapters(result.message, "shape_mismatch")
    return result


# --- adapters: rebase, recycle, transfer --------------------------------------------------


def _check_scale(scale: float) -> float:
    try:
        scale = float(scale)
    except (TypeError, ValueError) as exc:
        raise AdapterError(f"scale must be a number, got {scale!r}", "invalid_parameter") from exc
    if not math.isfinite(scale):
        raise AdapterError(f"scale must be finite, got {scale}", "invalid_parameter")
    return scale


def rebase(adapter: AdapterLike, target_slug: str, scale: float = 1.0) -> Adapter:
    """The same LoRA labelled for the target base: `base_model_name_or_path` set
    to `target_slug`, and `scale` (the paper's diff-vector coefficient) folded
    into every lora_B, so each module's update becomes scale * delta. The input
    is not modified."""
    scale = _check_scale(scale)
    if not isinstance(target_slug, str) or not target_slug:
        raise AdapterError("target_slug must be a non-empty string", "invalid_parameter")
    adapter = as_adapter(adapter)
    adapter.validate()
    tensors = {}
    for key, t in adapter.tensors.items():
        m = _LORA_KEY.match(key)
        tensors[key] = (t * scale).to(t.dtype) if (m and m["factor"] == "B" and scale != 1.0) else t.clone()
    config = copy.deepcopy(adapter.config)
    config["base_model_name_or_path"] = target_slug
    return Adapter(config=config, tensors=tensors)


def _read_examples(examples) -> list[dict]:
    if isinstance(examples, str | os.PathLike):
        lines = Path(examples).read_text(encoding="utf-8").splitlines() if Path(examples).is_file() else None
        if lines is None:
            raise AdapterError(f"no examples file at {examples}", "missing_examples")
        try:
            examples = [json.loads(line) for line in lines if line.strip()]
        except json.JSONDecodeError as exc:
            raise AdapterError(f"examples file is not JSONL: {exc}", "invalid_examples") from exc
    items = list(examples)
    if not items:
        raise AdapterError("recycle_finetune needs at least one example", "invalid_examples")
    for i, it in enumerate(items):
        if not (isinstance(it, dict) and isinstance(it.get("prompt"), str) and isinstance(it.get("completion"), str)):
            raise AdapterError(f"example {i} needs string 'prompt' and 'completion' fields", "invalid_examples")
    return items




def _require_fits(adapter: Adapter, manifest: Mapping[str, dict]) -> None:
    """Every LoRA module of the adapter has a weight of the matching shape in the base."""
    fifo = bool(adapter.config.get("fan_in_fan_out"))
    for module, (a, b) in adapter.pairs():
        name = module.removeprefix(PEFT_PREFIX) + ".weight"
        want = (a.shape[1], b.shape[0]) if fifo else (b.shape[0], a.shape[1])
        got = _shape(manifest, name)
        if got != tuple(want):
            have = "has no such tensor" if got is None else f"has {list(got)}"
            raise IncompatibleAdapters(f"{name}: the adapter's update is {list(want)}, the base {have}",
                                       "shape_mismatch")


def recycle_finetune(adapter: AdapterLike, target_base_dir: str | os.PathLike, examples, *, steps: int = 50,
                     lr: float = 1e-3, batch_size: int = 8, seed: int = 0, weight_decay: float = 0.0,
                     target_slug: str | None = None, progress: Progress = None) -> Adapter:
    """Short fine-tune of a transferred LoRA on the target base ("recycling then
    fine-tuning"): the target loaded with AutoModelForCausalLM (fp32), the adapter
    attached with real `peft` (trainable), AdamW on the LoRA factors only over
    seeded random batches of {"prompt", "completion"} examples, loss on the
    completion tokens. Same seed, same inputs, same threads -> same result.
    Returns a new Adapter with the config of the input (base set to
    `target_slug` when given) and its tensors' dtypes."""
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict
    from transformers import AutoModelForCausalLM, AutoTokenizer

    items = _read_examples(examples)
    if not isinstance(steps, int) or steps < 1:
        raise AdapterError(f"steps must be a positive integer, got {steps!r}", "invalid_parameter")
    if not (isinstance(lr, int | float) and lr > 0 and math.isfinite(lr)):
        raise AdapterError(f"lr must be a positive number, got {lr!r}", "invalid_parameter")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise AdapterError(f"batch_size must be a positive integer, got {batch_size!r}", "invalid_parameter")
    target_base_dir = Path(target_base_dir)
    if not (target_base_dir / "config.json").is_file():
        raise AdapterError(f"{target_base_dir} is not a model directory (no config.json)", "missing_base")
    adapter = as_adapter(adapter)
    adapter.validate()
    _require_fits(adapter, manifest_of(target_base_dir))

    torch.manual_seed(seed)  # dropout, if the adapter config asks for it
    tok = AutoTokenizer.from_pretrained(str(target_base_dir))
    model = AutoModelForCausalLM.from_pretrained(str(target_base_dir), dtype=torch.float32)
    with tempfile.TemporaryDirectory(prefix="recycle-") as tmp:
        adapter.save(tmp)
        model = PeftModel.from_pretrained(model, tmp, is_trainable=True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    bs = min(batch_size, len(items))
    model.train()
    for step in range(steps):
        idx = torch.randperm(len(items), generator=gen)[:bs].tolist()
        ids, att, labels = _sft_batch(tok, [items[i] for i in idx])
        loss = model(input_ids=ids, attention_mask=att, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        _report(progress, (step + 1) / steps, f"recycle step {step + 1}/{steps}, loss {loss.item():.4f}")
    model.eval()
    state = get_peft_model_state_dict(model)
    tensors = {}
    for key, t in adapter.tensors.items():
        if key not in state:
            raise AdapterError(f"peft did not return {key} after training", "missing_tensor")
        tensors[key] = state[key].detach().to(t.dtype).clone()
    config = copy.deepcopy(adapter.config)
    if target_slug:
        config["base_model_name_or_path"] = target_slug
    return Adapter(config=config, tensors=tensors)


def transfer(adapter: AdapterLike, source_base_dir: str | os.PathLike, target_base_dir: str | os.PathLike,
             target_slug: str, *, scale: float = 1.0, examples=None, steps: int = 0, lr: float = 1e-3,
             seed: int = 0, progress: Progress = None) -> tuple[Adapter, dict]:
    """What a transfer job runs: check that the bases line up for this adapter
    (IncompatibleAdapters with the first mismatch otherwise), rebase, and when
    `examples` and `steps` are given recycle-fine-tune on the target.
    Returns the new adapter and JSON-able params/metrics for the revision."""
    adapter = as_adapter(adapter)
    _report(progress, 0.0, "checking base compatibility")
    compat = require_compatible(manifest_of(source_base_dir), manifest_of(target_base_dir), adapter)
    out = rebase(adapter, target_slug, scale)
    info = {"method": "diff", "scale": _check_scale(scale), "checked_tensors": compat.checked,
            "source_base": adapter.base_model_name, "target_base": target_slug, "recycle_steps": 0}
    if examples is not None and steps:
        def sub(f, msg):
            _report(progress, 0.05 + 0.95 * f, msg)
        out = recycle_finetune(out, target_base_dir, examples, steps=steps, lr=lr, seed=seed,
                               target_slug=target_slug, progress=sub)
        info.update(recycle_steps=steps, lr=lr, seed=seed)
    _report(progress, 1.0, "transferred")
    return out, info


# --- full fine-tunes: dense diff ------------------------------------------------------------


# modules with one row per token: the tensors a fine-tune that adds tokens makes longer
_VOCAB_MODULES = {"embed_tokens", "tok_embeddings", "wte", "word_embeddings", "shared", "lm_head", "embed_out",
                  "output"}


def _grows_vocab(name: str, old: Sequence[int], new: Sequence[int]) -> bool:
    """A token embedding or output head that gained rows (added tokens), its other dims unchanged."""
    module, _, leaf = name.rpartition(".")
    return (leaf in ("weight", "bias") and module.rsplit(".", 1)[-1] in _VOCAB_MODULES
            and len(old) == len(new) >= 1 and new[0] > old[0] and tuple(old[1:]) == tuple(new[1:]))


def _pair(finetuned_dir, base_dir, *,
          vocab_growth: bool) -> tuple[_Checkpoint, _Checkpoint, dict[str, list[int]]]:
    """The two checkpoints, which must hold the same tensors with the same shapes;
    with vocab_growth, embeddings and output heads may have more rows in the
    fine-tune, returned as tensor name -> [base rows, fine-tune rows]."""
    ft, base = _Checkpoint(finetuned_dir), _Checkpoint(base_dir)
    grown = {n: [base.entries[n].rows, e.rows] for n, e in ft.entries.items()
             if n in base.entries and _grows_vocab(n, base.entries[n].shape, e.shape)}
    names = (set(ft.entries) | set(base.entries)) - (set(grown) if vocab_growth else set())
    _, mm = _first_mismatch(base.manifest(), ft.manifest(), sorted(names, key=_natural_key))
    if mm is not None:
        ft.close()
        base.close()
        hint = " (the fine-tune added tokens: use extract_dense, which pads the base)" if mm.tensor in grown else ""
        raise IncompatibleAdapters(f"the fine-tune does not match its base: {mm.tensor} has shape "
                                   f"{mm.target_shape and list(mm.target_shape)} in the fine-tune and "
                                   f"{mm.source_shape and list(mm.source_shape)} in the base{hint}",
                                   "shape_mismatch")
    return ft, base, grown if vocab_growth else {}


def _diff_dtype(code: str, dtype) -> str:
    if dtype is None:
        return "F64" if code == "F64" else "F32"  # exact for bf16/fp16 inputs
    if dtype == "native":
        return code
    code_out = dtype if isinstance(dtype, str) else _CODES.get(dtype)
    if code_out not in _MATH_DTYPES:
        raise AdapterError(f"dtype must be None, 'native' or a float dtype, got {dtype!r}", "invalid_parameter")
    return code_out


def _sq_norm(t: torch.Tensor) -> float:
    """Squared Frobenius norm without a squared (or fp64) copy of the chunk."""
    return float(torch.linalg.vector_norm(t.reshape(-1))) ** 2 if t.numel() else 0.0


def _work_dtype(*codes: str) -> torch.dtype:
    """fp32, or fp64 when an input or the output is fp64: the difference of two
    fp32 numbers often needs more than fp32's 24 bits, so an F64 diff is only
    exact when the subtraction itself runs in fp64."""
    return torch.float64 if "F64" in codes else torch.float32


def _diff_rows(ft: _Checkpoint, base: _Checkpoint, name: str, r0: int, r1: int, work: torch.dtype) -> torch.Tensor:
    """finetuned - base for rows r0:r1, computed in `work`. Rows past the base's
    last (tokens the fine-tune added) subtract nothing: the base counts as zero-padded."""
    d = ft.read(name, r0, r1).to(work)  # a fresh buffer unless already `work`; ours either way
    stop = min(r1, base.entries[name].rows)
    if d.ndim == 0:
        d.sub_(base.read(name))
    elif stop > r0:
        d[: stop - r0].sub_(base.read(name, r0, stop))  # mixed-dtype in-place: no `work` copy of the base chunk
    return d


def extract_dense(finetuned_dir: str | os.PathLike, base_dir: str | os.PathLike, out_path: str | os.PathLike, *,
                  dtype=None, chunk_bytes: int = STREAM_CHUNK_BYTES, progress: Progress = None) -> dict:
    """Write `finetuned - base` for every floating tensor as one safetensors file
    (same names and shapes), streamed row chunk by row chunk. dtype None stores
    fp32 (exact for bf16/fp16 checkpoints, so apply() reproduces such a
    fine-tune bit for bit; for fp32 ones base + diff is off by rounding only),
    "native" the checkpoints' own dtype, or any float dtype; the subtraction
    runs in fp64 when the output is, so "F64" is exact for fp32 checkpoints too.
    A fine-tune that added tokens (an embedding or output head with more rows,
    nothing else changed in shape) is diffed against the base padded with zero
    rows: the new rows of the diff are the fine-tune's own, and the file's
    metadata records `vocab_growth` = {tensor: [base rows, fine-tune rows]}.
    Integer tensors must be equal and are left out. Returns a JSON-able report."""
    t0 = time.perf_counter()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    ft, base, grown = _pair(finetuned_dir, base_dir, vocab_growth=True)
    with ft, base, _one_thread():
        names = ft.names()
        floats = [n for n in names if ft.entries[n].dtype in _MATH_DTYPES and base.entries[n].dtype in _MATH_DTYPES]
        skipped = [n for n in names if n not in floats]
        for n in skipped:
            if not torch.equal(ft.read(n), base.read(n)):
                raise AdapterError(f"{n} is a {ft.entries[n].dtype} tensor that differs between the fine-tune "
                                   "and its base: no diff can represent it", "unsupported_tensor")
        specs = [_Spec(n, _diff_dtype(ft.entries[n].dtype, dtype), ft.entries[n].shape) for n in floats]
        total = sum(ft.entries[n].nbytes + base.entries[n].nbytes for n in floats) or 1
        done, sq = 0, 0.0

        def produce(s: _Spec) -> Iterator[torch.Tensor]:
            nonlocal done, sq
            work = _work_dtype(ft.entries[s.name].dtype, base.entries[s.name].dtype, s.dtype)
            for r0, r1 in _row_chunks(s.shape, chunk_bytes, work.itemsize):
                d = _diff_rows(ft, base, s.name, r0, r1, work)
                sq += _sq_norm(d)
                yield d.to(_DTYPES[s.dtype])
            done += ft.entries[s.name].nbytes + base.entries[s.name].nbytes
            _report(progress, done / total, f"diff {s.name}")

        metadata = {"format": "pt", "kind": "finetune_diff"}
        if grown:
            metadata[VOCAB_GROWTH_KEY] = json.dumps(grown, sort_keys=True)
        nbytes = _write_file(out_path, specs, produce, metadata)
    return {"path": str(out_path), "tensors": len(specs), "skipped": skipped, "bytes_written": nbytes,
            "bytes_read": total if floats else 0, "diff_norm": math.sqrt(sq), "vocab_growth": grown,
            "seconds": time.perf_counter() - t0}


# --- full fine-tunes: low-rank diff ---------------------------------------------------------


@dataclass
class ExtractReport:
    rank: int
    energy: float  # captured / total squared Frobenius norm over the low-rank modules
    overall_energy: float  # the same with the dense tensors (kept exactly) counted in
    modules: dict[str, dict]  # tensor name -> {"shape", "rank", "energy", "norm"}
    dense: list[str]  # tensors kept as dense diffs (diff_extra.safetensors / .extra)
    unchanged: list[str]  # 2-D tensors whose diff is exactly zero: left out of the adapter
    skipped: list[str]  # tensors left out (integer tensors; embeddings with embeddings="skip")
    seconds: float
    bytes_read: int
    extra_path: str | None = None
    extra: dict[str, torch.Tensor] | None = field(default=None, repr=False)

    def as_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "extra"}


def _is_embedding(name: str) -> bool:
    leaf = name.removesuffix(".weight").rsplit(".", 1)[-1].lower()
    return "embed" in leaf or leaf in {"wte", "wpe", "shared"}


def _randomized_svd(matmul: Callable[[torch.Tensor], torch.Tensor], rmatmul: Callable[[torch.Tensor], torch.Tensor],
                    m: int, n: int, k: int, q: int, n_iter: int,
                    gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k SVD of an m x n matrix D seen only through D @ X and D^T @ Y
    (Halko, Martinsson & Tropp 2011, with re-orthonormalised power iterations),
    so D can be streamed from disk in row chunks. Exact when q >= min(m, n)."""
    q = min(q, m, n)
    y = matmul(torch.randn(n, q, generator=gen))
    for _ in range(n_iter):
        z = torch.linalg.qr(rmatmul(torch.linalg.qr(y).Q)).Q
        y = matmul(z)
    qm = torch.linalg.qr(y).Q  # m x q, an orthonormal basis of D's dominant range
    bt = rmatmul(qm)  # n x q = (Q^T D)^T
    ub, s, vh = torch.linalg.svd(bt.T, full_matrices=False)
    return qm @ ub[:, :k], s[:k], vh[:k]


class _DiffMatrix:
    """finetuned - base of one 2-D tensor, held whole when its fp32 copy fits in
    hold_bytes, else re-read in row chunks of chunk_bytes for every product
    (2 + 2 * n_iter passes over the two files instead of one)."""

    def __init__(self, ft: _Checkpoint, base: _Checkpoint, name: str, chunk_bytes: int, hold_bytes: int):
        self.ft, self.base, self.name = ft, base, name
        self.m, self.n = ft.entries[name].shape
        self.chunks = _row_chunks((self.m, self.n), chunk_bytes)
        self.work = _work_dtype(ft.entries[name].dtype, base.entries[name].dtype)
        self.whole = None
        if self.m * self.n * 4 <= hold_bytes:
            self.whole = torch.cat([_diff_rows(ft, base, name, r0, r1, self.work).float()
                                    for r0, r1 in self.chunks])
        self.reads = 0

    def rows(self) -> Iterator[tuple[int, int, torch.Tensor]]:
        if self.whole is not None:
            yield 0, self.m, self.whole
            return
        self.reads += 1
        for r0, r1 in self.chunks:
            yield r0, r1, _diff_rows(self.ft, self.base, self.name, r0, r1, self.work).float()

    def sq_norm(self) -> float:
        return sum(_sq_norm(d) for _, _, d in self.rows())

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.empty(self.m, x.shape[1])
        for r0, r1, d in self.rows():
            out[r0:r1] = d @ x
        return out

    def rmatmul(self, y: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(self.n, y.shape[1])
        for r0, r1, d in self.rows():
            out.addmm_(d.T, y[r0:r1])
        return out


def extract(finetuned_dir: str | os.PathLike, base_dir: str | os.PathLike, rank: int,
            out_dir: str | os.PathLike | None = None, progress: Progress = None, *, oversample: int = 8,
            n_iter: int = 2, seed: int = 0, embeddings: str = "dense", base_slug: str | None = None,
            chunk_bytes: int = DEFAULT_CHUNK_BYTES,
            hold_bytes: int = DEFAULT_HOLD_BYTES) -> tuple[Adapter, ExtractReport]:
    """A full fine-tune as a LoRA of rank `rank`: for every 2-D weight (Linear)
    the diff `finetuned - base` is factored by randomized SVD into B (out x r)
    and A (r x in), sqrt of the singular values on each side, lora_alpha = r so
    the scaling is 1. Tensors a LoRA cannot express (1-D norms and biases;
    embeddings unless embeddings="skip") are kept as exact dense diffs: written
    to out_dir/diff_extra.safetensors (every such tensor, zeros where unchanged),
    or held in `report.extra` when out_dir is None. With out_dir the adapter and
    extract_report.json are saved there too, and apply(out_dir, ...) uses both.
    The energy of a module is ||low-rank||^2 / ||diff||^2 (1.0 = exact).
    Memory: a diff matrix whose fp32 copy is at most hold_bytes is factored in
    memory; a bigger one (an lm_head of a large vocabulary) is streamed from
    the files in row chunks for each product of the randomized SVD."""
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise AdapterError(f"rank must be a positive integer, got {rank!r}", "invalid_parameter")
    if not isinstance(oversample, int) or oversample < 0 or not isinstance(n_iter, int) or n_iter < 0:
        raise AdapterError("oversample and n_iter must be non-negative integers", "invalid_parameter")
    if embeddings not in ("dense", "skip"):
        raise AdapterError(f"embeddings must be 'dense' or 'skip', got {embeddings!r}", "invalid_parameter")
    t0 = time.perf_counter()
    ft, base, _ = _pair(finetuned_dir, base_dir, vocab_growth=False)
    with ft, base:
        names = ft.names()
        lowrank, dense, skipped = [], [], []
        for n in names:
            e, b = ft.entries[n], base.entries[n]
            if e.dtype not in _MATH_DTYPES or b.dtype not in _MATH_DTYPES:
                skipped.append(n)
            elif _is_embedding(n):
                (dense if embeddings == "dense" else skipped).append(n)
            elif len(e.shape) == 2 and n.endswith(".weight"):
                lowrank.append(n)
            else:
                dense.append(n)
        for n in skipped:
            if ft.entries[n].dtype not in _MATH_DTYPES and not torch.equal(ft.read(n), base.read(n)):
                raise AdapterError(f"{n} is a {ft.entries[n].dtype} tensor that differs between the fine-tune "
                                   "and its base: no diff can represent it", "unsupported_tensor")
        total = sum(ft.entries[n].nbytes + base.entries[n].nbytes for n in lowrank + dense) or 1
        done = 0
        gen = torch.Generator().manual_seed(seed)
        tensors: dict[str, torch.Tensor] = {}
        modules: dict[str, dict] = {}
        unchanged: list[str] = []
        low_total = low_kept = dense_total = 0.0
        for name in lowrank:
            dm = _DiffMatrix(ft, base, name, chunk_bytes, hold_bytes)
            norm2 = dm.sq_norm()
            done += ft.entries[name].nbytes + base.entries[name].nbytes
            if norm2 == 0.0:
                unchanged.append(name)
                continue
            k = min(rank, dm.m, dm.n)
            u, s, vh = _randomized_svd(dm.matmul, dm.rmatmul, dm.m, dm.n, k, rank + oversample, n_iter, gen)
            root = s.sqrt()
            b_f = torch.zeros(dm.m, rank)
            a_f = torch.zeros(rank, dm.n)  # rank > min(m, n): zero-padded, PEFT needs one r everywhere
            b_f[:, :k] = u * root
            a_f[:k] = root[:, None] * vh
            module = PEFT_PREFIX + name.removesuffix(".weight")
            tensors[f"{module}.lora_A.weight"] = a_f.contiguous()
            tensors[f"{module}.lora_B.weight"] = b_f.contiguous()
            kept = min(float(s.double().pow(2).sum()), norm2)
            modules[name] = {"shape": [dm.m, dm.n], "rank": k, "energy": kept / norm2, "norm": math.sqrt(norm2)}
            low_total += norm2
            low_kept += kept
            _report(progress, 0.95 * done / total, f"factored {name} (energy {kept / norm2:.4f})")
            del dm

        def produce(s: _Spec) -> Iterator[torch.Tensor]:
            nonlocal done, dense_total
            work = _work_dtype(ft.entries[s.name].dtype, base.entries[s.name].dtype)
            for r0, r1 in _row_chunks(s.shape, chunk_bytes, work.itemsize):
                d = _diff_rows(ft, base, s.name, r0, r1, work)
                dense_total += _sq_norm(d)
                yield d.to(_DTYPES[s.dtype])
            done += ft.entries[s.name].nbytes + base.entries[s.name].nbytes
            _report(progress, 0.95 * done / total, f"dense diff {s.name}")

        specs = [_Spec(n, _diff_dtype(ft.entries[n].dtype, None), ft.entries[n].shape) for n in dense]
        extra, extra_path = None, None
        if out_dir is not None:
            out = Path(out_dir)
            out.mkdir(parents=True, exist_ok=True)
            if specs:
                extra_path = str(out / EXTRA_NAME)
                _write_file(out / EXTRA_NAME, specs, produce, {"format": "pt", "kind": "finetune_diff_extra"})
        else:
            extra = {}
            for s in specs:
                parts = list(produce(s))
                d = torch.cat(parts) if s.shape else parts[0]
                if d.count_nonzero():
                    extra[s.name] = d
    targets = sorted({m.rsplit(".", 1)[-1] for m in (n.removesuffix(".weight") for n in modules)})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": rank, "lora_dropout": 0.0,
        "target_modules": targets, "bias": "none", "fan_in_fan_out": False, "use_rslora": False,
        "init_lora_weights": True, "inference_mode": True, "modules_to_save": None,
        "base_model_name_or_path": base_slug or Path(base_dir).name,
    }
    adapter = Adapter(config=config, tensors=tensors)
    all_total = low_total + dense_total
    report = ExtractReport(
        rank=rank, energy=(low_kept / low_total) if low_total else 1.0,
        overall_energy=((low_kept + dense_total) / all_total) if all_total else 1.0,
        modules=modules, dense=dense, unchanged=unchanged, skipped=skipped,
        seconds=time.perf_counter() - t0, bytes_read=total if (lowrank or dense) else 0,
        extra_path=extra_path, extra=extra,
    )
    if out_dir is not None:
        adapter.save(out_dir)
        tmp = Path(out_dir) / (REPORT_NAME + ".tmp")
        tmp.write_text(json.dumps(report.as_dict(), indent=2) + "\n")
        os.replace(tmp, Path(out_dir) / REPORT_NAME)
    _report(progress, 1.0, f"extracted rank {rank}: energy {report.energy:.4f}")
    return adapter, report


# --- apply a diff to a target -----------------------------------------------------------

# what _DeltaSource checks a diff against: tensor name -> (shape, safetensors dtype code)
_TargetShapes = Mapping[str, tuple[tuple[int, ...], str]]


class _DeltaSource:
    """Per target tensor, the rows of the update to add: from a dense diff file,
    from LoRA factors (scaling * B @ A), or both. Checked against the target on
    construction; `grown` names the tensors the diff makes longer (added tokens)."""

    def __init__(self, diff, extra, target: _TargetShapes):
        self.dense: list[_Checkpoint] = []
        self.dense_mem: dict[str, torch.Tensor] = {}
        self.lora: dict[str, tuple[torch.Tensor, torch.Tensor, float, bool]] = {}
        adapter = None
        if isinstance(diff, Adapter):
            adapter = diff
        elif isinstance(diff, str | os.PathLike) and Path(diff).is_dir():
            adapter = as_adapter(diff)
            if extra is None and (Path(diff) / EXTRA_NAME).is_file():
                extra = Path(diff) / EXTRA_NAME
        elif isinstance(diff, str | os.PathLike) and Path(diff).is_file():
            self.dense.append(_Checkpoint(diff))
        elif isinstance(diff, Mapping):
            self.dense_mem.update(diff)
        else:
            raise AdapterError(f"diff must be an Adapter, an adapter folder, a diff file or a dict, not {diff!r}",
                               "invalid_parameter")
        if isinstance(extra, Mapping):
            self.dense_mem.update(extra)
        elif extra is not None:
            self.dense.append(_Checkpoint(extra))
        if adapter is not None:
            bad = [k for k in adapter.tensors if not _LORA_KEY.match(k)]
            if bad:
                raise AdapterError(f"apply adds LoRA updates only; {bad[0]!r} is not a LoRA factor",
                                   "unsupported_tensor")
            fifo = bool(adapter.config.get("fan_in_fan_out"))
            for module, (a, b) in adapter.pairs():
                name = module.removeprefix(PEFT_PREFIX) + ".weight"
                self.lora[name] = (a.float(), b.float(), adapter.scaling(module), fifo)
        self.grown = self._check(target)

    def _recorded_base_rows(self) -> dict[str, int]:
        """Row counts of the base a diff file grew the vocabulary of (extract_dense's metadata)."""
        rows = {}
        for ck in self.dense:
            raw = ck.metadata.get(VOCAB_GROWTH_KEY)
            if raw is None:
                continue
            try:
                rows.update({n: int(counts[0]) for n, counts in json.loads(raw).items()})
            except (TypeError, ValueError, AttributeError, IndexError, KeyError) as exc:
                raise CorruptFile(f"{ck.path.name}: its {VOCAB_GROWTH_KEY} metadata is malformed",
                                  "header_invalid") from exc
        return rows

    def _check(self, target: _TargetShapes) -> dict[str, list[int]]:
        """Every tensor of the diff is a float tensor of the target with the same shape,
        or an embedding / output head with fewer rows than the diff (tokens the
        fine-tune added; the base rows a diff file records must be the target's).
        Returns those: name -> [target rows, diff rows]."""
        shapes = {}
        for ck in self.dense:
            shapes.update({n: e.shape for n, e in ck.entries.items()})
        shapes.update({n: tuple(t.shape) for n, t in self.dense_mem.items()})
        for n, (a, b, _, fifo) in self.lora.items():
            shapes.setdefault(n, (a.shape[1], b.shape[0]) if fifo else (b.shape[0], a.shape[1]))
        recorded = self._recorded_base_rows()
        grown = {}
        for n in sorted(shapes, key=_natural_key):
            want, got = tuple(shapes[n]), target.get(n)
            have = None if got is None else tuple(got[0])
            if have is not None and _grows_vocab(n, have, want):
                if recorded.get(n, have[0]) != have[0]:
                    raise IncompatibleAdapters(f"{n}: the diff grew the vocabulary from {recorded[n]} to {want[0]} "
                                               f"rows, the target has {have[0]}: the diff was taken on another base",
                                               "shape_mismatch")
                grown[n] = [have[0], want[0]]
            elif have != want:
                raise IncompatibleAdapters(f"{n}: the diff has shape {list(want)}, the target "
                                           f"{'has no such tensor' if have is None else f'has {list(have)}'}: "
                                           f"{_TRANSLORA_HINT}.", "shape_mismatch")
            if got[1] not in _MATH_DTYPES:
                raise IncompatibleAdapters(f"{n}: cannot add a diff to a {got[1]} tensor", "unsupported_tensor")
        return grown

    def touches(self, name: str) -> bool:
        return name in self.lora or name in self.dense_mem or any(name in ck.entries for ck in self.dense)

    def rows(self, name: str, r0: int, r1: int, like: torch.Tensor) -> torch.Tensor:
        """The update for rows r0:r1, added into `like` (a fp32/fp64 chunk), in place."""
        for ck in self.dense:
            if name in ck.entries:
                like.add_(ck.read(name, r0, r1))
        if name in self.dense_mem:
            t = self.dense_mem[name]
            like.add_(t[r0:r1] if t.ndim else t)
        if name in self.lora:
            a, b, s, fifo = self.lora[name]
            d = (b @ a[:, r0:r1]).T if fifo else b[r0:r1] @ a
            like.add_(d, alpha=s)
        return like

    def close(self) -> None:
        for ck in self.dense:
            ck.close()


def _rows_of(t: torch.Tensor, r0: int, r1: int) -> torch.Tensor:
    return t[r0:r1] if t.ndim else t


def _target_rows(read: Callable[[int, int], torch.Tensor], have: int, shape: Sequence[int], r0: int, r1: int,
                 work: torch.dtype) -> torch.Tensor:
    """Rows r0:r1 of a target tensor of `have` rows, in `work`; rows from `have` on
    (tokens the diff adds) are zeros, so the result there is the diff's rows."""
    if r1 <= have:
        return read(r0, r1).to(work)
    w = torch.zeros((r1 - r0, *shape[1:]), dtype=work)
    if have > r0:
        w[: have - r0] = read(r0, have)
    return w


def _add_update(w: torch.Tensor, src: _DeltaSource, name: str, r0: int, r1: int, scale: float) -> torch.Tensor:
    """w + scale * (rows r0:r1 of the update), in place: the one formula of every apply."""
    if scale == 1.0:
        return src.rows(name, r0, r1, w)
    return w.add_(src.rows(name, r0, r1, torch.zeros_like(w)), alpha=scale)


def _raise_vocab_size(config_path: Path, rows: int) -> None:
    """config.json's vocab_size up to the grown row count: transformers refuses
    a checkpoint whose embedding is longer than the config says."""
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError):
        return  # no readable config: nothing to keep in step
    if isinstance(config, dict) and isinstance(config.get("vocab_size"), int) and config["vocab_size"] < rows:
        config["vocab_size"] = rows
        tmp = config_path.with_name(config_path.name + ".tmp")
        tmp.write_text(json.dumps(config, indent=2) + "\n")
        os.replace(tmp, config_path)


_WEIGHT_FILES = re.compile(r"(\.safetensors|\.bin|\.pt|\.pth|\.ckpt|\.h5|\.msgpack)$|^model\.safetensors\.index\.json$|"
                           r"^pytorch_model\.bin\.index\.json$")


def apply(diff, target_dir: str | os.PathLike, out_dir: str | os.PathLike, scale: float = 1.0,
          progress: Progress = None, *, extra=None, max_shard_bytes: int | None = DEFAULT_SHARD_BYTES,
          chunk_bytes: int = STREAM_CHUNK_BYTES) -> dict:
    """Write `target + scale * diff` as a new HF-layout checkpoint in out_dir.
    `diff` is a dense diff file (extract_dense), a folder written by extract()
    (adapter + diff_extra.safetensors), an Adapter (its `scaling * B @ A`; dense
    extras via `extra=` as a dict or a file) or a dict of dense tensors. Every
    tensor keeps the target's dtype and shape, except an embedding or output
    head the diff has more rows for (a fine-tune that added tokens): it grows to
    the diff's rows, the new rows being the diff's (base padded with zeros +
    diff), and config.json's vocab_size follows. One row chunk at a time is
    read, updated in fp32 and written, into model.safetensors or shards of at
    most max_shard_bytes with model.safetensors.index.json. The target's other
    files (config, tokenizer) are copied; no pickle is. An fp64 diff is added in
    fp64 and rounded once, so an F64 extract_dense gives an fp32 fine-tune back
    bit for bit. Returns a JSON-able report."""
    scale = _check_scale(scale)
    t0 = time.perf_counter()
    target_dir, out = Path(target_dir), Path(out_dir)
    if not target_dir.is_dir():
        raise AdapterError(f"{target_dir} is not a folder", "missing_base")
    if out.resolve() == target_dir.resolve():
        raise AdapterError("out_dir must differ from target_dir", "invalid_parameter")
    if out.is_dir() and any(out.glob("*.safetensors")):
        raise AdapterError(f"{out} already holds weights; pick an empty folder", "out_dir_not_empty")
    with _Checkpoint(target_dir) as target:
        src = _DeltaSource(diff, extra, {n: (e.shape, e.dtype) for n, e in target.entries.items()})
        dense_only = not src.lora  # LoRA factors mean a matmul per chunk: that one keeps its threads
        changed = [n for n in target.names() if src.touches(n)]
        shapes = {n: (src.grown[n][1], *e.shape[1:]) if n in src.grown else e.shape for n, e in target.entries.items()}

        def produce(name: str) -> Iterator[torch.Tensor]:
            e = target.entries[name]
            if not src.touches(name):
                for r0, r1 in _row_chunks(e.shape, chunk_bytes, _itemsize(e.dtype)):
                    yield target.read(name, r0, r1)  # copied as is, bit for bit
                return
            work = torch.float64 if e.dtype == "F64" else torch.float32
            for r0, r1 in _row_chunks(shapes[name], chunk_bytes):
                w = _target_rows(lambda a, b: target.read(name, a, b), e.rows, shapes[name], r0, r1, work)
                yield _add_update(w, src, name, r0, r1, scale).to(_DTYPES[e.dtype])

        try:
            specs = [(n, target.entries[n].dtype, shapes[n]) for n in target.names()]
            with _one_thread(dense_only):
                files = write_checkpoint(out, specs, produce, max_shard_bytes=max_shard_bytes, progress=progress,
                                         metadata={"format": "pt"})
        finally:
            src.close()
        bytes_read = sum(e.nbytes for e in target.entries.values())
    copied = []
    for f in sorted(target_dir.iterdir()):
        if f.is_file() and not _WEIGHT_FILES.search(f.name) and not f.name.startswith("."):
            shutil.copy2(f, out / f.name)
            copied.append(f.name)
    if src.grown and "config.json" in copied:
        _raise_vocab_size(out / "config.json", max(rows for _, rows in src.grown.values()))
    return {"out_dir": str(out), "files": [f.name for f in files], "copied": copied, "tensors": len(specs),
            "changed": len(changed), "scale": scale, "vocab_growth": src.grown, "bytes_read": bytes_read,
            "bytes_written": sum(f.stat().st_size for f in files), "seconds": time.perf_counter() - t0}


def _update_tensor(t: torch.Tensor, src: _DeltaSource, name: str, scale: float, chunk_bytes: int) -> torch.Tensor:
    """t + scale * update, row chunk by row chunk, computed on the CPU as apply() does:
    in place, or into a new longer tensor when the diff grows t (added tokens)."""
    shape = (src.grown[name][1], *t.shape[1:]) if name in src.grown else tuple(t.shape)
    dest = t.new_empty(shape) if name in src.grown else t
    work = torch.float64 if t.dtype == torch.float64 else torch.float32
    have = t.shape[0] if t.ndim else 1
    for r0, r1 in _row_chunks(shape, chunk_bytes):
        w = _target_rows(lambda a, b: _rows_of(t, a, b).cpu(), have, shape, r0, r1, work)
        _rows_of(dest, r0, r1).copy_(_add_update(w, src, name, r0, r1, scale))
    return dest


def _apply_in_memory(state: MutableMapping[str, torch.Tensor], diff, scale: float, extra, chunk_bytes: int, *,
                     can_grow: bool) -> dict:
    scale = _check_scale(scale)
    t0 = time.perf_counter()
    tensors = {n: t for n, t in state.items() if isinstance(t, torch.Tensor)}
    src = _DeltaSource(diff, extra, {n: (tuple(t.shape), _CODES.get(t.dtype, str(t.dtype)))
                                     for n, t in tensors.items()})
    try:
        if src.grown and not can_grow:
            name, (have, rows) = next(iter(src.grown.items()))
            raise IncompatibleAdapters(f"{name}: the diff has {rows} rows (tokens the fine-tune added), the model "
                                       f"{have}, and a module cannot grow in place: apply it to model.state_dict() "
                                       f"with apply_to_state_dict and load that into the model resized to {rows} "
                                       "tokens", "shape_mismatch")
        # Names that share storage (a tied embedding and output head) are one tensor:
        # it is updated once, and a diff that names several of them must agree on it.
        tied: dict[tuple, list[str]] = {}
        for n, t in tensors.items():
            key = (t.device, t.data_ptr(), tuple(t.shape), t.stride()) if t.numel() else (n,)
            tied.setdefault(key, []).append(n)
        groups = [(touched, names) for names in tied.values() if (touched := [n for n in names if src.touches(n)])]
        for touched, _ in groups:
            if len(touched) > 1:
                first, *others = (_update_tensor(torch.zeros(tensors[n].shape), src, n, 1.0, chunk_bytes)
                                  for n in touched)
                if not all(torch.equal(first, o) for o in others):
                    raise IncompatibleAdapters(f"{' and '.join(touched)} are one tied tensor here, and the diff "
                                               "changes them differently", "unsupported_tensor")
        with torch.no_grad():  # a module's parameters are leaves that require grad
            for touched, names in groups:
                updated = _update_tensor(tensors[touched[0]], src, touched[0], scale, chunk_bytes)
                if touched[0] in src.grown:  # a new tensor: every name of the old one now holds it
                    for n in names:
                        state[n] = updated
    finally:
        src.close()
    return {"tensors": len(tensors), "changed": sum(len(touched) for touched, _ in groups), "scale": scale,
            "vocab_growth": src.grown, "seconds": time.perf_counter() - t0}


def apply_to_state_dict(state_dict: MutableMapping[str, torch.Tensor], diff, scale: float = 1.0, *, extra=None,
                        chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> dict:
    """apply() in memory: `state_dict[name] += scale * diff` in place, for a dict of
    tensors (`model.state_dict()`, safetensors' `load_file`). `diff` and `extra` take
    what apply() takes (a loaded diff dict among them), names and shapes are checked
    the same way before anything changes, and the arithmetic is the same, so the
    result equals apply()'s checkpoint bit for bit. Tensors on any device, updated
    one row chunk at a time on the CPU. A tensor the diff grows (added tokens) is
    replaced by a new, longer one; tied tensors (one storage under several names)
    are updated once. Returns a JSON-able report."""
    return _apply_in_memory(state_dict, diff, scale, extra, chunk_bytes, can_grow=True)


def apply_to_model(model: torch.nn.Module, diff, scale: float = 1.0, *, extra=None,
                   chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> dict:
    """apply_to_state_dict on a module's parameters and buffers, in place, without
    autograd. A module's tensors cannot grow, so a diff that adds tokens is refused
    (IncompatibleAdapters, shape_mismatch) before anything changes."""
    return _apply_in_memory(model.state_dict(keep_vars=True), diff, scale, extra, chunk_bytes, can_grow=False)


# --- quality gate --------------------------------------------------------------------------


def _accuracy(value) -> float:
    acc = getattr(value, "accuracy", value)
    try:
        acc = float(acc)
    except (TypeError, ValueError) as exc:
        raise AdapterError(f"evaluate_fn must return a number or an object with .accuracy, got {value!r}",
                           "invalid_parameter") from exc
    if not math.isfinite(acc):
        raise AdapterError(f"evaluate_fn returned {acc}", "invalid_parameter")
    return acc


def quality_gate(source_base_dir, target_base_dir, adapter: AdapterLike, transferred: AdapterLike, examples,
                 evaluate_fn: Callable | None = None, *, min_gain: float = 0.0) -> dict:
    """Score the transfer on held-out examples: the adapter on its own base, the
    bare target, and the target with the transferred adapter. `verified` is
    True when the transferred adapter beats the bare target by more than
    `min_gain`; `recovered` is the share of the original gain kept on the target,
    (target_with_transferred - target_base) / (source_with_adapter - target_base).
    `evaluate_fn(base_dir, examples, adapter) -> accuracy` (or an object with
    .accuracy); by default adapters_ops.evaluate.evaluate."""
    if evaluate_fn is None:
        from .evaluate import evaluate as evaluate_fn  # needs transformers; only imported when used
    metrics = {
        "source_with_adapter": _accuracy(evaluate_fn(source_base_dir, examples, adapter)),
        "target_base": _accuracy(evaluate_fn(target_base_dir, examples, None)),
        "target_with_transferred": _accuracy(evaluate_fn(target_base_dir, examples, transferred)),
    }
    gain = metrics["source_with_adapter"] - metrics["target_base"]
    kept = metrics["target_with_transferred"] - metrics["target_base"]
    return {
        "metrics": metrics,
        "gain": kept,
        "recovered": (kept / gain) if gain > 0 else None,
        "verified": kept > min_gain,
    }
