"""Dense diffs of full fine-tunes (`extract_dense`): fine-tune minus base, streamed in the
checkpoint's own dtype (or exact in F64), with grown vocabularies."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

from ..errors import AdapterError, IncompatibleAdapters
from .checkpoint_io import (
    _CODES,
    _DTYPES,
    _MATH_DTYPES,
    STREAM_CHUNK_BYTES,
    VOCAB_GROWTH_KEY,
    Progress,
    _Checkpoint,
    _natural_key,
    _one_thread,
    _report,
    _row_chunks,
    _Spec,
    _write_file,
)
from .compat import _first_mismatch

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
