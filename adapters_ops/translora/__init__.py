"""Trans-LoRA: move a LoRA to another base model without its training data.

When diff transfer cannot work (the bases drifted too far, have other widths,
or belong to another family), the skill is re-learnt on the target from
synthetic data, after Wang et al., "Trans-LoRA: towards data-free
Transferable Parameter Efficient Finetuning" (arXiv 2405.17258):

    generate  a generator model, prompted few-shot with the seed examples,
              writes new task inputs (or, for tiny bases that write garbage,
              the "mutation" generator perturbs the seed prompts with the
              seeds' own character statistics)
    filter    a discriminator on the source base keeps the inputs that score
              as real as held-out seeds do: by default the inputs' likelihood
              under the source base after a shape check against the seeds;
              optionally the paper's LoRA classifier trained on the seeds
    label     the source base + adapter answers every kept input (greedy)
    distill   a fresh LoRA on the target base learns those answers, with
              early stopping on the seed examples
    evaluate  target base, result and source + adapter on the seeds

    from adapters_ops.translora import TransLoraConfig, run
    adapter, report = run("zoo/bases/tiny-llama-3.0", "zoo/adapters/caesar",
                          "zoo/bases/tiny-other-1.0", "zoo/tasks/caesar/seed.jsonl",
                          TransLoraConfig(seed=0), progress=print_progress, checkpoint=DirCheckpoint("ckpt"))

Every stage writes its output to the optional `checkpoint` store (JSONL for
the sample stages, safetensors bytes for the adapter, JSON for the metrics),
so a worker killed mid-way resumes after the last finished stage; each stage
reseeds torch, so a resumed run equals an uninterrupted one. Design choices
and where we differ from the paper: docs/translora.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .._zoo_train import deterministic  # fixed threads + deterministic kernels, restored after
from ..adapter import Adapter, AdapterLike, as_adapter
from ..errors import AdapterError
from ..evaluate import (
    evaluate_model,
    load_model,
    load_tokenizer,
    read_examples,
)
from .checkpoints import (
    _ADAPTER,
    _JSONL,
    _METRICS,
    Checkpoint,
    DirCheckpoint,
    MemoryCheckpoint,
    _jsonl_bytes,
    _jsonl_parse,
)
from .common import _model_dir, _report, _stage_seed, template_of
from .config import DISCRIMINATORS, GENERATORS, LINEAR_NAMES, STAGES, Progress, TransLoraConfig
from .discriminator import (
    _shape_check,
    discriminator_scores,
    filter_candidates,
    likelihood_scores,
    train_discriminator,
)
from .distillation import _same_vocabulary, _soft_label_loss, distill, teacher_examples
from .labels import label
from .synthetic import generate_candidates, mutation_prompts

# --- (e) evaluation and the whole run ---------------------------------------------------------------


def _metrics(r) -> dict:
    return {"accuracy": round(r.accuracy, 5), "loss": round(r.loss, 5), "n": r.n}


def evaluate_on(examples: Sequence[dict], source_base_dir, adapter: AdapterLike, target_base_dir,
                result: Adapter | None) -> dict:
    """(e) Accuracy and loss of the target base, target + result, and source + adapter."""
    adapter = as_adapter(adapter)
    out = {}
    tgt_tok, src_tok = load_tokenizer(target_base_dir), load_tokenizer(source_base_dir)
    out["target_base"] = _metrics(evaluate_model(load_model(target_base_dir), tgt_tok, examples))
    if result is not None:
        out["result"] = _metrics(evaluate_model(load_model(target_base_dir, result), tgt_tok, examples))
    out["source"] = _metrics(evaluate_model(load_model(source_base_dir, adapter), src_tok, examples))
    return out


def _fingerprint(cfg: TransLoraConfig, seeds: Sequence[dict], adapter: Adapter, source: Path, target: Path) -> str:
    """What a stage's output depends on; a checkpoint written for other inputs is recomputed."""
    h = hashlib.sha256()
    h.update(json.dumps({"config": cfg.as_dict(), "seeds": list(seeds), "adapter_config": adapter.config},
                        sort_keys=True, default=str).encode())
    for k in sorted(adapter.tensors):
        t = adapter.tensors[k].contiguous()
        h.update(k.encode() + str(tuple(t.shape)).encode() + str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    for base in (source, target):
        h.update((base / "config.json").read_bytes())
        for f in sorted(base.glob("*.safetensors")):
            h.update(f.name.encode() + str(f.stat().st_size).encode())
    return h.hexdigest()[:24]


def run(source_base_dir, adapter: Adapter | str | os.PathLike, target_base_dir, seeds,
        config: TransLoraConfig | None = None, progress: Progress = None, checkpoint: Checkpoint | None = None,
        *, target_slug: str | None = None) -> tuple[Adapter, dict]:
    """Trans-LoRA from the source base + adapter onto the target base, from the
    seed examples alone. Returns the distilled adapter (PEFT layout, base set to
    `target_slug` or the target folder's name) and a JSON-able report: counts
    per stage, the filter rate, seed metrics of target base, result and source,
    and which stages were resumed from the checkpoint."""
    cfg = config or TransLoraConfig()
    source_base_dir, target_base_dir = _model_dir(source_base_dir), _model_dir(target_base_dir)
    adapter = as_adapter(adapter)
    adapter.validate()
    seeds = [{"prompt": s["prompt"], "completion": s["completion"]} for s in read_examples(seeds)]
    if len(seeds) < 2:
        raise AdapterError("Trans-LoRA needs at least 2 seed examples", "invalid_examples")
    fp = _fingerprint(cfg, seeds, adapter, source_base_dir, target_base_dir)
    report: dict = {"config": cfg.as_dict(), "fingerprint": fp, "seeds": len(seeds), "resumed": [], "stale": [],
                    "seconds": {}}

    def cached(stage: str, parse):
        if checkpoint is None:
            return None
        data = checkpoint.load(stage)
        if data is None:
            return None
        try:
            got_fp, info, value = parse(data)
        except Exception:  # a truncated or foreign blob: recompute rather than fail the job
            report["stale"].append(stage)
            return None
        if got_fp != fp:
            report["stale"].append(stage)
            return None
        report["resumed"].append(stage)
        return info, value

    def sub(stage):
        return lambda f, msg: _report(progress, stage, f, msg)

    def stage(name: str, codec: tuple[Callable, Callable], compute):
        """One resumable stage: its output from the checkpoint when that holds this run's
        (same fingerprint), else computed and saved. `compute() -> (value, info)`."""
        dump, parse = codec
        t0 = time.perf_counter()
        hit = cached(name, parse)
        if hit is None:
            _report(progress, name, 0.0, "started")
            value, info = compute()
            if checkpoint is not None:
                checkpoint.save(name, dump(fp, info, value))
        else:
            info, value = hit
        report["seconds"][name] = round(time.perf_counter() - t0, 2)
        _report(progress, name, 1.0, "done")
        return value, info

    with deterministic(cfg.threads or min(2, os.cpu_count() or 1)):
        candidates, report["generate"] = stage("generate", _JSONL, lambda: generate_candidates(
            source_base_dir, target_base_dir, seeds, cfg, seed=_stage_seed(cfg.seed, "generate"),
            progress=sub("generate")))
        kept, report["filter"] = stage("filter", _JSONL, lambda: filter_candidates(
            source_base_dir, target_base_dir, seeds, candidates, cfg, seed=_stage_seed(cfg.seed, "filter"),
            progress=sub("filter")))
        labelled, report["label"] = stage("label", _JSONL, lambda: label(
            source_base_dir, adapter, seeds, kept, cfg, progress=sub("label")))
        result, report["distill"] = stage("distill", _ADAPTER, lambda: distill(
            target_base_dir, adapter, labelled, seeds, cfg, seed=_stage_seed(cfg.seed, "distill"),
            target_slug=target_slug, progress=sub("distill"), source_base_dir=source_base_dir))
        _, metrics = stage("evaluate", _METRICS, lambda: (
            None, evaluate_on(seeds, source_base_dir, adapter, target_base_dir, result)))
        report["seed_metrics"] = metrics

    n = report["generate"]["requested"]
    report["counts"] = {"requested": n, "generated": len(candidates), "kept": len(kept), "labelled": len(labelled)}
    report["filter_rate"] = report["filter"]["filter_rate"]
    # The same gate as diff transfer's quality_gate (adapters_ops.transfer), on seed accuracy,
    # so the worker and the CLI read both kinds of transfer alike.
    gate = {"source_with_adapter": metrics["source"]["accuracy"], "target_base": metrics["target_base"]["accuracy"],
            "target_with_transferred": metrics["result"]["accuracy"]}
    gain = gate["source_with_adapter"] - gate["target_base"]
    kept_gain = gate["target_with_transferred"] - gate["target_base"]
    report["metrics"] = gate
    report["recovered"] = round(kept_gain / gain, 5) if gain > 0 else None
    report["verified"] = kept_gain > 0
    return result, report

__all__ = ['Checkpoint', 'DISCRIMINATORS', 'DirCheckpoint', 'GENERATORS', 'LINEAR_NAMES', 'MemoryCheckpoint', 'Progress', 'STAGES', 'TransLoraConfig', 'discriminator_scores', 'distill', 'filter_candidates', 'generate_candidates', 'label', 'likelihood_scores', 'mutation_prompts', 'teacher_examples', 'template_of', 'train_discriminator', '_soft_label_loss', '_same_vocabulary', '_shape_check', '_jsonl_bytes', '_jsonl_parse', 'run', 'evaluate_on']
