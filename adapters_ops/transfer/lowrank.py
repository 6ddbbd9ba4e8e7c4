"""Low-rank diffs of full fine-tunes (`extract`): per matrix a truncated SVD of the
difference, with the dense rest (norms, embeddings) kept beside it."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..adapter import PEFT_PREFIX, Adapter
from ..errors import AdapterError
from .checkpoint_io import (
    _DTYPES,
    _MATH_DTYPES,
    DEFAULT_CHUNK_BYTES,
    DEFAULT_HOLD_BYTES,
    EXTRA_NAME,
    REPORT_NAME,
    Progress,
    _Checkpoint,
    _report,
    _row_chunks,
    _Spec,
    _write_file,
)
from .dense import _diff_dtype, _diff_rows, _pair, _sq_norm, _work_dtype

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
