"""Skill composition by distillation: one LoRA on the base that keeps every input skill.

Weight-space merges (merge.py) add the skills' updates; on the tiny zoo every
method loses the skills of a two- or three-skill merge, because two attention
updates do not add up (docs/merge.md). Here each input adapter teaches its own
skill instead: Trans-LoRA's generate and filter stages write task inputs from
that skill's seed examples, the base + that adapter answers them
(`translora.teacher_examples`), and one student LoRA on the same base learns
the union of the answers, keeping the state with the best exact match on all
skills' seeds (`translora.distill`). The student starts from scratch, with the
rank of the `cat` merge (the sum of the input ranks) on the union of the
inputs' target modules.

    from adapters_ops import compose
    merged, report = compose.distill_merge(
        "zoo/bases/tiny-llama-3.0", ["zoo/adapters/caesar", "zoo/adapters/date"],
        ["zoo/tasks/caesar/seed.jsonl", "zoo/tasks/date/seed.jsonl"])

It needs what weight-space merges do not: seed examples for every skill and
minutes of CPU (docs/merge.md, "Composition by distillation").
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from . import merge, translora
from ._zoo_train import deterministic
from .adapter import Adapter, as_adapter
from .errors import AdapterError
from .evaluate import read_examples

__all__ = ["ComposeConfig", "distill_merge"]

Progress = Callable[[float, str], None] | None
STEPS_PER_SKILL = 1000
MAX_DEFAULT_STEPS = 8000  # many inputs: keep the default run well inside the merge job's one-hour limit


@dataclass(frozen=True)
class ComposeConfig:
    """How `distill_merge` builds the student; validated on construction."""

    synthetic: int = 1024  # task inputs requested per skill (before de-duplication and filtering)
    # None: 1000 per skill, at most 8000. On the zoo 1000 steps kept caesar + date at 1.00 / 1.00; three skills
    # in 1500 steps kept caesar and date but digitsum only at 0.46 of its 0.71 (docs/merge.md).
    steps: int | None = None
    rank: int | None = None  # None: the sum of the input ranks (the `cat` merge's rank)
    # None: Trans-LoRA's (32, 5e-3); a 135M model on a CPU needs smaller batches to finish in minutes
    batch_size: int | None = None
    lr: float | None = None
    seed: int = 0
    threads: int | None = None  # torch threads; None: min(2, cores)

    def __post_init__(self):
        for name, low in (("synthetic", 1), ("seed", 0)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise AdapterError(f"{name} must be an integer >= {low}, got {v!r}", "invalid_parameter")
        if self.lr is not None and (not isinstance(self.lr, int | float) or isinstance(self.lr, bool)
                                    or not 0 < self.lr <= 1):
            raise AdapterError(f"lr must be a number in (0, 1] or None, got {self.lr!r}", "invalid_parameter")
        for name in ("steps", "rank", "batch_size", "threads"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                raise AdapterError(f"{name} must be a positive integer or None, got {v!r}", "invalid_parameter")


def distill_merge(base_dir: str | os.PathLike, adapters: Sequence[Adapter | str | os.PathLike],
                  seeds: Sequence, config: ComposeConfig | None = None, *, progress: Progress = None,
                  base_slug: str | None = None) -> tuple[Adapter, dict]:
    """One LoRA on `base_dir` distilled from every adapter on its own skill.

    `seeds[i]` are adapter i's seed examples (a JSONL path or a list of
    {"prompt", "completion"}), at least 2 each. The adapters must sit on one
    base with matching shapes, as for `merge.merge(..., modules="union")`.
    Returns the student (PEFT layout, base set to `base_slug` or the folder's
    name) and a JSON-able report: per skill the synthetic-data stages and the
    examples used, and the distillation's seed-selection history."""
    cfg = config or ComposeConfig()
    adapters = [as_adapter(a) for a in adapters]
    if not adapters:
        raise AdapterError("distill_merge needs at least one adapter", "invalid_weights")
    if len(seeds) != len(adapters):
        raise AdapterError(f"{len(adapters)} adapters but {len(seeds)} seed sets", "invalid_examples")
    seed_sets = [[{"prompt": e["prompt"], "completion": e["completion"]} for e in read_examples(s)] for s in seeds]
    for i, s in enumerate(seed_sets):
        if len(s) < 2:
            raise AdapterError(f"adapter {i + 1} has {len(s)} seed examples; each skill needs at least 2",
                               "invalid_examples")
    # The exact sum's shape: checks one base and matching module shapes, and gives
    # the student its rank (sum of the input ranks) and its target modules.
    shape = merge.merge(adapters, [1.0] * len(adapters), "cat", modules="union")
    tcfg = translora.TransLoraConfig(steps=cfg.steps or min(STEPS_PER_SKILL * len(adapters), MAX_DEFAULT_STEPS),
                                     rank=cfg.rank or int(shape.config["r"]), seed=cfg.seed,
                                     **{k: v for k in ("batch_size", "lr") if (v := getattr(cfg, k)) is not None})

    def say(lo: float, hi: float, prefix: str):
        return None if progress is None else (lambda f, msg: progress(lo + (hi - lo) * f, f"{prefix}: {msg}"))

    report: dict = {"config": dataclasses.asdict(cfg), "skills": [], "seconds": {}}
    share = 0.3 / len(adapters)  # the synthetic data takes about a third of the time
    t0 = time.perf_counter()
    with deterministic(cfg.threads or min(2, os.cpu_count() or 1)):
        per_skill = []
        for i, (adapter, skill_seeds) in enumerate(zip(adapters, seed_sets, strict=True)):
            rows, info = translora.teacher_examples(
                base_dir, adapter, skill_seeds, n=cfg.synthetic, seed=cfg.seed + i,
                progress=say(i * share, (i + 1) * share, f"skill {i + 1}/{len(adapters)}"))
            if not rows:
                raise AdapterError(f"no synthetic examples survived for adapter {i + 1}: its seeds may be too "
                                   "few or too unlike each other", "no_synthetic_data")
            # The seeds stay out of the training data: they pick the kept state.
            per_skill.append(rows)
            report["skills"].append({"synthetic": info, "examples": len(rows)})
        report["seconds"]["synthetic"] = round(time.perf_counter() - t0, 2)
        # Every skill as often as the largest: a skill whose filter kept fewer
        # inputs is not drowned out by the others in the shared batches.
        most = max(map(len, per_skill))
        data = [rows[j % len(rows)] for rows in per_skill for j in range(most)]
        t1 = time.perf_counter()
        student, info = translora.distill(base_dir, shape, data, [e for s in seed_sets for e in s], tcfg,
                                          seed=cfg.seed, target_slug=base_slug, progress=say(0.3, 1.0, "distill"))
        report["seconds"]["distill"] = round(time.perf_counter() - t1, 2)
    report["distill"] = info
    return student, report
