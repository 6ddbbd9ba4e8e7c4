"""Applying a diff (dense, low-rank or a LoRA) to a target checkpoint folder, a state
dict or a module, streamed in row chunks."""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from pathlib import Path

import torch

from ..adapter import _LORA_KEY, PEFT_PREFIX, Adapter, as_adapter
from ..errors import AdapterError, CorruptFile, IncompatibleAdapters
from .checkpoint_io import (
    _CODES,
    _DTYPES,
    _MATH_DTYPES,
    DEFAULT_CHUNK_BYTES,
    DEFAULT_SHARD_BYTES,
    EXTRA_NAME,
    STREAM_CHUNK_BYTES,
    VOCAB_GROWTH_KEY,
    Progress,
    _Checkpoint,
    _itemsize,
    _natural_key,
    _one_thread,
    _row_chunks,
    write_checkpoint,
)
from .compat import _TRANSLORA_HINT
from .dense import _grows_vocab
from .lora import _check_scale

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
