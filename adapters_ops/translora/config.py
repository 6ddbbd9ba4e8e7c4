"""Trans-LoRA's settings (`TransLoraConfig`, validated on construction) and stage names."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

from .. import opspecs
from ..errors import AdapterError
from ..evaluate import (
    SELECTIONS,
)

STAGES = ("generate", "filter", "label", "distill", "evaluate")
# Declared with the op's other settings (a job's translora params are checked against them at submission).
GENERATORS = opspecs.TRANSLORA_GENERATORS
DISCRIMINATORS = opspecs.TRANSLORA_DISCRIMINATORS
# Share of the progress bar each stage fills (distillation dominates the time).
_SPAN = {"generate": (0.0, 0.15), "filter": (0.15, 0.35), "label": (0.35, 0.45), "distill": (0.45, 0.95),
         "evaluate": (0.95, 1.0)}
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

Progress = Callable[[float, str], None] | None


# --- configuration ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TransLoraConfig:
    """Parameters of one Trans-LoRA run; validated on construction."""

    # (a) synthetic inputs
    n_synthetic: int = 2048  # candidates requested from the generator (before de-dup and filtering)
    generator: str = "auto"  # target | source | mutation | auto (LM of the target, topped up by mutation)
    shots: int = 5  # seed prompts in each few-shot context (fewer when the context would not fit)
    temperature: float = 1.0
    top_p: float = 0.95
    min_chars: int | None = None  # prompt length limits; default half the shortest / twice the longest seed
    max_chars: int | None = None
    auto_min_yield: float = 0.5  # "auto": below this share of usable LM samples, top up with mutation
    mutation_rate: float = 0.5  # chance to resample each variable character of a seed prompt
    mutation_indel: int = 1  # up to this many characters inserted or deleted per mutated prompt
    mutation_closure: bool = True  # complete a character class the seeds half cover (a-z, A-Z, 0-9)
    mutation_in_range: bool = True  # insertions/deletions keep the middle within the seeds' length range
    # (b) discriminator
    filter: bool = True
    discriminator: str = "likelihood"  # likelihood (source base LM + shape, no training) | lora (the paper's)
    disc_rank: int = 4
    disc_steps: int = 60
    disc_lr: float = 3e-3
    disc_quantile: float = 0.0  # keep candidates scoring at least this quantile of the seeds' held-out scores
    disc_slack: float = 0.5  # likelihood: the seeds' band [q, 1-q] widened by this times their spread
    # (c) labels
    label_slack: int = 4  # tokens beyond the longest seed completion before a label counts as unterminated
    label_drop: float = 0.0  # share of labels dropped, least confident first (teacher loss on its own answer)
    # (d) distillation
    soft_labels: float = 0.0  # weight of the KL to the teacher's token distributions (0: text labels only)
    soft_temperature: float = 1.0  # both distributions are softened by this before the KL
    rank: int | None = None  # None: the source adapter's r
    alpha: int | None = None  # None: the source adapter's alpha scaled to the new rank
    target_modules: tuple[str, ...] | None = None  # None: the source adapter's, where the target has them
    steps: int = 2000
    lr: float = 5e-3
    batch_size: int = 32
    warmup: int = 10
    eval_every: int = 50
    patience: int = 40  # evaluations without a better seed score before stopping (40 x 50: the whole schedule)
    select: str = "accuracy"  # the seed score that picks the kept state: accuracy (ties: later state) | loss
    # everything
    seed: int = 0
    threads: int | None = None  # torch threads inside run(); None: min(2, cores)

    def __post_init__(self):
        def positive_int(name, low=1):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise AdapterError(f"{name} must be an integer >= {low}, got {v!r}", "invalid_parameter")

        def number(name, lo, hi, lo_open=False):
            v = getattr(self, name)
            if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v) \
                    or v > hi or v < lo or (lo_open and v == lo):
                raise AdapterError(f"{name} must be in {'(' if lo_open else '['}{lo}, {hi}], got {v!r}",
                                   "invalid_parameter")

        if self.discriminator not in DISCRIMINATORS:
            raise AdapterError(f"discriminator must be one of {', '.join(DISCRIMINATORS)}, got {self.discriminator!r}",
                               "invalid_parameter")
        for name in ("filter", "mutation_closure", "mutation_in_range"):
            if not isinstance(getattr(self, name), bool):
                raise AdapterError(f"{name} must be true or false, got {getattr(self, name)!r}", "invalid_parameter")
        if self.select not in SELECTIONS:
            raise AdapterError(f"select must be one of {', '.join(SELECTIONS)}, got {self.select!r}",
                               "invalid_parameter")
        if self.generator not in GENERATORS:
            raise AdapterError(f"generator must be one of {', '.join(GENERATORS)}, got {self.generator!r}",
                               "invalid_parameter")
        for name in ("n_synthetic", "shots", "disc_rank", "disc_steps", "steps", "batch_size", "eval_every",
                     "patience"):
            positive_int(name)
        for name in ("mutation_indel", "warmup", "label_slack", "seed"):
            positive_int(name, 0)
        for name in ("rank", "alpha", "min_chars", "max_chars", "threads"):
            if getattr(self, name) is not None:
                positive_int(name)
        if self.min_chars and self.max_chars and self.min_chars > self.max_chars:
            raise AdapterError("min_chars must not exceed max_chars", "invalid_parameter")
        number("temperature", 0.0, 100.0, lo_open=True)
        number("top_p", 0.0, 1.0, lo_open=True)
        number("auto_min_yield", 0.0, 1.0)
        number("mutation_rate", 0.0, 1.0)
        number("disc_quantile", 0.0, 0.5)
        number("disc_slack", 0.0, 100.0)
        number("label_drop", 0.0, 0.9)
        number("soft_labels", 0.0, 1.0)
        number("soft_temperature", 0.0, 100.0, lo_open=True)
        number("lr", 0.0, 1.0, lo_open=True)
        number("disc_lr", 0.0, 1.0, lo_open=True)
        if isinstance(self.target_modules, list):  # JSON job parameters have no tuples
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if self.target_modules is not None and (
                not isinstance(self.target_modules, tuple) or not self.target_modules
                or not all(isinstance(m, str) and m for m in self.target_modules)):
            raise AdapterError("target_modules must be a non-empty tuple of module names", "invalid_parameter")

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["target_modules"] = list(self.target_modules) if self.target_modules else None
        return d
