"""The op vocabulary, declared once as data: each op's parameters (name, type,
default, choices or range, help), the revision kind it makes, the queue it
runs on, what it reads and writes, and whether it needs seed examples.

Standard library only: the web process imports this module (REST validation,
`GET /api/v1/ops`, the UI's job form, Revision kinds), `hubctl` builds its op
flags from the same declarations (served by `GET /api/v1/ops`), the workers
take queues and time limits from it, and the library takes its merge method
names and Trans-LoRA settings from it.

Adding an op: a library function, a worker op `workers/ops/<name>.py` (task
`ops.<name>`), an `OpSpec` below, tests and a docs page. Nothing else.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

QUEUES = ("cpu", "gpu")
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
REF = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")

# Parameter kinds: what a value may be in JSON, and how the CLI and the UI ask for it.
KINDS = ("int", "float", "bool", "choice", "str", "repo", "repos", "ref", "base", "floats", "strs", "object")


class ParamError(ValueError):
    """A job request refused before any row exists: `field` is the parameter's
    dotted path ("density", "translora.steps"), None for the request as a whole."""

    def __init__(self, detail: str, field: str | None = None, code: str = "invalid_params"):
        super().__init__(detail)
        self.detail, self.field, self.code = detail, field, code


@dataclass(frozen=True)
class Param:
    name: str
    kind: str
    help: str = ""
    default: Any = None  # None: absent unless given (the op or the library decides)
    required: bool = False
    choices: tuple = ()  # "choice": the allowed values (str or int)
    min: float | None = None  # int / float / floats: inclusive bounds
    max: float | None = None
    words: tuple[str, ...] = ()  # int / float: words accepted instead of a number ("auto", "full")
    items: tuple[int, int] = (1, 64)  # repos / floats / strs: allowed list lengths
    fields: tuple[Param, ...] = ()  # object: its keys, each a Param
    label: str = ""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"{self.name}: kind must be one of {KINDS}")
        if self.kind == "choice" and not self.choices:
            raise ValueError(f"{self.name}: a choice needs choices")

    @property
    def title(self) -> str:
        return self.label or self.name.replace("_", " ").capitalize()

    def describe(self) -> dict:
        """The JSON form of `GET /api/v1/ops`."""
        out: dict[str, Any] = {"name": self.name, "type": self.kind, "help": self.help, "label": self.title,
                               "required": self.required}
        if self.default is not None:
            out["default"] = self.default
        for key in ("choices", "words"):
            if getattr(self, key):
                out[key] = list(getattr(self, key))
        if self.min is not None:
            out["min"] = self.min
        if self.max is not None:
            out["max"] = self.max
        if self.kind in ("repos", "floats", "strs"):
            out["min_items"], out["max_items"] = self.items
        if self.fields:
            out["fields"] = [f.describe() for f in self.fields]
        return out

    def clean(self, value, path: str):
        """The value in its canonical type, or ParamError."""
        kind = self.kind
        if kind in ("int", "float"):
            if isinstance(value, str) and value in self.words:
                return value
            return _number(value, path, self.min, self.max, kind == "int", self.words)
        if kind == "bool":
            if not isinstance(value, bool):
                raise ParamError(f"{path} must be true or false, got {value!r}.", path)
            return value
        if kind == "choice":
            if isinstance(value, bool) or value not in self.choices:
                raise ParamError(f"{path} must be {_one_of(self.choices)}; got {value!r}.", path)
            return value
        if kind == "str":
            if not isinstance(value, str) or not value or len(value) > 200:
                raise ParamError(f"{path} must be a non-empty string of at most 200 characters.", path)
            return value
        if kind == "repo":
            return _repo(value, path)
        if kind == "ref":
            if not isinstance(value, str) or not REF.match(value):
                raise ParamError(f"{path} must be a ref name or a commit id, got {value!r}.", path)
            return value
        if kind == "base":
            if not isinstance(value, str) or not REF.match(value):
                raise ParamError(f"{path} must name a registered base model slug, got {value!r}.", path)
            return value
        if kind == "object":
            return _object(value, self.fields, path)
        lo, hi = self.items  # the list kinds
        if not isinstance(value, list) or not lo <= len(value) <= hi:
            what = {"repos": "adapters as \"owner/name\"", "floats": "numbers", "strs": "strings"}[kind]
            raise ParamError(f"{path} must list {lo} to {hi} {what}.", path)
        if kind == "repos":
            out = [_repo(v, path) for v in value]
            if len(set(out)) != len(out):
                raise ParamError(f"{path} lists the same adapter twice.", path)
            return out
        if kind == "floats":
            return [_number(v, path, self.min, self.max, False) for v in value]
        if not all(isinstance(v, str) and 0 < len(v) <= 200 for v in value):
            raise ParamError(f"{path} must list non-empty strings.", path)
        return list(value)


def _one_of(values) -> str:
    words = [str(v) for v in values]
    return words[0] if len(words) == 1 else f"{', '.join(words[:-1])} or {words[-1]}"


def _number(value, path, lo, hi, integer: bool, words=()):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if integer:
        ok = ok and float(value).is_integer()
    if ok and ((lo is not None and value < lo) or (hi is not None and value > hi)):
        ok = False
    if not ok:
        kind = "an integer" if integer else "a number"
        bounds = f" between {lo} and {hi}" if lo is not None and hi is not None else \
            f" >= {lo}" if lo is not None else f" <= {hi}" if hi is not None else ""
        alt = "".join(f", \"{w}\"" for w in words)
        raise ParamError(f"{path} must be {kind}{bounds}{alt}, got {value!r}.", path)
    return int(value) if integer else float(value)


def _repo(value, path):
    if not isinstance(value, str) or not REPO_ID.match(value):
        raise ParamError(f"{path} must name an adapter as \"owner/name\", got {value!r}.", path)
    return value


def _object(value, fields: tuple[Param, ...], path: str) -> dict:
    if not isinstance(value, dict):
        raise ParamError(f"{path} must be an object of settings.", path)
    known = {f.name: f for f in fields}
    unknown = sorted(set(value) - set(known))
    if unknown:
        raise ParamError(f"Unknown {path} setting(s) {', '.join(unknown)}; allowed: {', '.join(sorted(known))}.",
                         f"{path}.{unknown[0]}")
    return {k: known[k].clean(v, f"{path}.{k}") for k, v in value.items() if v is not None}


@dataclass(frozen=True)
class OpSpec:
    name: str
    title: str
    summary: str
    params: tuple[Param, ...]
    queue: str  # "cpu" or "gpu" (a gpu worker without CUDA runs it on the CPU)
    soft_time_limit: int  # seconds: the op gets SoftTimeLimitExceeded and fails cleanly
    time_limit: int  # seconds: the worker child is killed
    produces: tuple[str, ...] = ()  # the revision kinds it may create (none: it creates no revision)
    card_relation: str = "adapter"  # the HF model card's base_model_relation of what it makes
    # Adapter params (owner/name): `writes` the job acts on (the caller must be able to
    # write it; Job.adapter points at it), `reads` only read (visible to the caller),
    # `creates` a new adapter's name (its namespace writable by the caller).
    writes: str | None = "adapter"
    reads: tuple[str, ...] = ()
    creates: str | None = None
    bases: tuple[str, ...] = ()  # params naming base model slugs that must be registered
    # Seed examples every adapter in `reads`/`writes` must carry: never, always, or
    # only when a param has one of some values ({"method": ("distill",)}).
    needs_seeds: bool | dict[str, tuple] = False
    # Rules across params (defaults that depend on another param, exclusions):
    # cleaned params in, cleaned params out, ParamError on a conflict.
    check: Callable[[dict], dict] | None = None
    module: str = ""  # the worker module holding the task `ops.<name>`
    test_only: bool = False

    def __post_init__(self):
        if self.queue not in QUEUES:
            raise ValueError(f"{self.name}: queue must be one of {QUEUES}")
        if not 0 < self.soft_time_limit < self.time_limit:
            raise ValueError(f"{self.name}: need 0 < soft_time_limit < time_limit")
        if not self.module:
            object.__setattr__(self, "module", f"workers.ops.{self.name}")

    @property
    def task_name(self) -> str:
        return f"ops.{self.name}"

    def param(self, name: str) -> Param:
        return next(p for p in self.params if p.name == name)

    def clean(self, params) -> dict:
        """Validated params with their defaults filled in, or ParamError."""
        if params is None:
            params = {}
        if not isinstance(params, dict):
            raise ParamError("params must be a JSON object.")
        known = [p.name for p in self.params]
        unknown = sorted(set(params) - set(known))
        if unknown:
            raise ParamError(f"Unknown parameter(s) {', '.join(unknown)}; allowed: {', '.join(sorted(known))}.",
                             unknown[0])
        out = {}
        for p in self.params:
            value = params.get(p.name)
            if value is None:
                if p.required:
                    raise ParamError(f"{p.name} is required: {p.help}", p.name)
                if p.default is not None:
                    out[p.name] = p.default
                continue
            out[p.name] = p.clean(value, p.name)
        return self.check(out) if self.check else out

    def seeds_needed(self, cleaned: dict) -> bool:
        if isinstance(self.needs_seeds, bool):
            return self.needs_seeds
        return any(cleaned.get(k) in values for k, values in self.needs_seeds.items())

    def describe(self) -> dict:
        """The JSON form of `GET /api/v1/ops`."""
        return {
            "name": self.name, "title": self.title, "summary": self.summary, "queue": self.queue,
            "produces": list(self.produces), "card_relation": self.card_relation, "writes": self.writes,
            "reads": list(self.reads), "creates": self.creates, "bases": list(self.bases),
            "needs_seeds": self.needs_seeds if isinstance(self.needs_seeds, bool)
            else {k: list(v) for k, v in self.needs_seeds.items()},
            "params": [p.describe() for p in self.params],
        }


# --- shared params --------------------------------------------------------------------------

ADAPTER = Param("adapter", "repo", "the adapter, as owner/name", required=True)
REVISION = Param("revision", "ref", "the revision to start from: a ref or commit (default: main)")
SEED = Param("seed", "int", "random seed (the same seed gives the same result)", default=0, min=0, max=2**31 - 1)

# --- the library's vocabularies (the library imports these; one list each) ------------------

# adapters_ops.merge.METHODS keys, in this order; "distill" is adapters_ops.compose.
MERGE_METHODS = ("cat", "svd", "linear", "ties", "dare_linear", "dare_ties", "magnitude_prune",
                 "ties_svd", "dare_ties_svd", "dare_linear_svd", "magnitude_prune_svd")
COMPOSE_METHODS = MERGE_METHODS + ("distill",)
# The output rank of a weight-space merge: an integer, "full" (the exact merged update) or
# "auto" (per module the smallest rank keeping `energy` of it, at most `max_rank`).
MERGE_RANK_WORDS = ("auto", "full")
DEFAULT_MERGE_ENERGY = 0.99

TRANSLORA_GENERATORS = ("auto", "target", "source", "mutation")
TRANSLORA_DISCRIMINATORS = ("likelihood", "lora")
TRANSLORA_SELECTIONS = ("accuracy", "loss")

# adapters_ops.translora.TransLoraConfig, field by field (a test keeps the two equal):
# an unknown or ill-typed key is a 400 at submission, not a failed job.
TRANSLORA_FIELDS = (
    Param("n_synthetic", "int", "synthetic candidates requested from the generator", 2048, min=1),
    Param("generator", "choice", "who writes the synthetic inputs", "auto", choices=TRANSLORA_GENERATORS),
    Param("shots", "int", "seed prompts in each few-shot context", 5, min=1),
    Param("temperature", "float", "sampling temperature of the generator", 1.0, min=1e-9, max=100.0),
    Param("top_p", "float", "nucleus sampling of the generator", 0.95, min=1e-9, max=1.0),
    Param("min_chars", "int", "shortest synthetic prompt (default: half the shortest seed)", min=1),
    Param("max_chars", "int", "longest synthetic prompt (default: twice the longest seed)", min=1),
    Param("auto_min_yield", "float", "generator auto: below this share of usable samples, top up by mutation",
          0.5, min=0.0, max=1.0),
    Param("mutation_rate", "float", "chance to resample each variable character of a seed", 0.5, min=0.0, max=1.0),
    Param("mutation_indel", "int", "characters inserted or deleted per mutated prompt", 1, min=0),
    Param("mutation_closure", "bool", "complete a character class the seeds half cover", True),
    Param("mutation_in_range", "bool", "insertions and deletions keep the seeds' length range", True),
    Param("filter", "bool", "filter the synthetic inputs with the discriminator", True),
    Param("discriminator", "choice", "likelihood (no training) or lora (the paper's)", "likelihood",
          choices=TRANSLORA_DISCRIMINATORS),
    Param("disc_rank", "int", "rank of the lora discriminator", 4, min=1),
    Param("disc_steps", "int", "training steps of the lora discriminator", 60, min=1),
    Param("disc_lr", "float", "learning rate of the lora discriminator", 3e-3, min=1e-12, max=1.0),
    Param("disc_quantile", "float", "keep candidates scoring at least this quantile of the seeds", 0.0,
          min=0.0, max=0.5),
    Param("disc_slack", "float", "likelihood: the seeds' band widened by this times their spread", 0.5,
          min=0.0, max=100.0),
    Param("label_slack", "int", "tokens beyond the longest seed answer before a label counts as unterminated",
          4, min=0),
    Param("label_drop", "float", "share of labels dropped, least confident first", 0.0, min=0.0, max=0.9),
    Param("soft_labels", "float", "weight of the KL to the teacher's token distributions", 0.0, min=0.0, max=1.0),
    Param("soft_temperature", "float", "softening of both distributions in the KL", 1.0, min=1e-9, max=100.0),
    Param("rank", "int", "the student's rank (default: the source adapter's)", min=1),
    Param("alpha", "int", "the student's alpha (default: the source's, scaled to the new rank)", min=1),
    Param("target_modules", "strs", "the student's modules (default: the source's, where the target has them)"),
    Param("steps", "int", "distillation steps", 2000, min=1),
    Param("lr", "float", "distillation learning rate", 5e-3, min=1e-12, max=1.0),
    Param("batch_size", "int", "distillation batch size", 32, min=1),
    Param("warmup", "int", "warm-up steps", 10, min=0),
    Param("eval_every", "int", "steps between seed evaluations", 50, min=1),
    Param("patience", "int", "evaluations without a better seed score before stopping", 40, min=1),
    Param("select", "choice", "the seed score that picks the kept state", "accuracy", choices=TRANSLORA_SELECTIONS),
    Param("seed", "int", "random seed", 0, min=0),
    Param("threads", "int", "torch threads inside the run (default: up to 2)", min=1),
)


# --- the ops -------------------------------------------------------------------------------

def _without_alpha_and_bits(p: dict) -> dict:
    if p.get("magnitude_bits") and p.get("alpha") is not None:
        raise ParamError("alpha fixes one magnitude; it cannot be combined with magnitude_bits.", "alpha")
    return p


def _merge_check(p: dict) -> dict:
    method, rank = p["method"], p.get("rank")
    if rank is not None:
        if method == "cat" and rank != "full":
            raise ParamError("method cat keeps every factor (rank = sum of the input ranks); use svd (or linear) "
                             "to choose a rank.", "rank")
        if method in ("distill", "auto") and isinstance(rank, str):
            raise ParamError(f"method {method} takes an integer rank.", "rank")
    if method in ("distill", "auto"):  # auto may end in distill: it takes distill's settings
        for key in ("energy", "max_rank"):
            if p.get(key) is not None:
                raise ParamError(f"{key} goes with rank \"auto\" of a weight-space merge, not with method "
                                 f"{method}.", key)
        for key in ("weights", "density"):
            if p.get(key) is not None:
                raise ParamError(f"method {method} learns from the seeds; it takes no {key}.", key)
        if p.get("search_weights"):
            raise ParamError(f"method {method} learns from the seeds; it takes no search_weights.", "search_weights")
        p.pop("search_weights", None)
        p.pop("budget", None)
        p.setdefault("synthetic", 1024)
        return p
    for key in ("steps", "synthetic"):
        if p.get(key) is not None:
            raise ParamError(f"{key} is a parameter of method distill, not of {method}.", key)
    if p.get("weights") is not None and len(p["weights"]) != len(p["adapters"]):
        raise ParamError(f"weights must list one number per adapter ({len(p['adapters'])}).", "weights")
    if rank == "auto":
        p.setdefault("energy", DEFAULT_MERGE_ENERGY)
    else:
        for key in ("energy", "max_rank"):
            if p.get(key) is not None:
                raise ParamError(f"{key} goes with rank \"auto\" (rank is {rank if rank is not None else 'the default'!r}).",
                                 key)
    if p.get("density") is None and method not in ("cat", "svd", "linear"):
        p["density"] = 0.5 if "magnitude" in method or "ties" in method else 0.7
    if p.get("search_weights") and p.get("weights") is not None:
        raise ParamError("Give weights or search_weights, not both.", "weights")
    p.setdefault("budget", 12)
    return p


def _transfer_check(p: dict) -> dict:
    if p.get("translora") and p["method"] == "diff":
        raise ParamError("translora settings go with method translora or auto, not diff.", "translora")
    return p


def _translora_check(p: dict) -> dict:
    if p.get("method", "translora") != "translora":
        raise ParamError("The translora op always uses method translora; use the transfer op for diff or auto.",
                         "method")
    p["method"] = "translora"
    return _transfer_check(p)


TRANSFER_PARAMS = (
    Param("adapter", "repo", "the adapter to move, as owner/name", required=True),
    REVISION,
    Param("target", "base", "the base model to move to (a registered slug)", required=True),
    Param("method", "choice", "diff (exact re-application), translora (distillation through synthetic data) or "
          "auto (diff when shapes match, else Trans-LoRA)", "auto", choices=("auto", "diff", "translora")),
    Param("finetune_steps", "int", "diff: recycle-then-fine-tune steps on the seeds", 0, min=0, max=10_000),
    Param("name", "repo", "owner/name of the new adapter (default: <owner>/<name>-<target>)"),
    Param("scale", "float", "diff: multiplier of the base-model difference", 1.0, min=-10, max=10),
    SEED,
    Param("translora", "object", "Trans-LoRA settings (docs/translora.md)", fields=TRANSLORA_FIELDS),
)

_OPS: tuple[OpSpec, ...] = (
    OpSpec(
        name="validate", title="Validate", queue="cpu", soft_time_limit=1800, time_limit=2100,
        summary="Re-hash every blob of a revision and re-check its safetensors header and LoRA shapes against the "
                "base model. Creates no revision.",
        params=(ADAPTER, REVISION),
    ),
    OpSpec(
        name="compress", title="Compress (ComPEFT)", queue="cpu", soft_time_limit=3600, time_limit=3900,
        summary="ComPEFT: sparsify and ternary-quantize a revision into a compact `compeft` revision.",
        produces=("compeft",), card_relation="quantized", check=_without_alpha_and_bits,
        params=(
            ADAPTER, REVISION,
            Param("density", "float", "fraction of entries kept; auto: the smallest file whose result passes its "
                  "verdict", 0.1, min=0.001, max=1.0, words=("auto",)),
            Param("scope", "choice", "one threshold for all tensors (global) or one per tensor", "global",
                  choices=("global", "tensor")),
            Param("alpha", "float", "a fixed magnitude scale (default: chosen on the seeds, else the paper's)",
                  min=1e-12, max=1e6),
            Param("tune_scale", "bool", "choose the scale on the seed examples when there are some", True),
            Param("magnitude_bits", "int", "0: one magnitude per tensor (ternary, the paper); k: 2^k magnitudes",
                  0, min=0, max=4),
            Param("factorization", "choice", "as_is: the trained factors; balanced: SVD of B @ A", "as_is",
                  choices=("as_is", "balanced")),
        ),
    ),
    OpSpec(
        name="merge", title="Merge", queue="cpu", soft_time_limit=3600, time_limit=3900,
        summary="Merge adapters of one base into a new adapter (cat, svd, linear, ties, dare, ..., or distill: one "
                "student taught by every input from its seeds).",
        produces=("merge",), card_relation="merge", writes=None, reads=("adapters",), creates="name",
        needs_seeds={"method": ("distill", "auto")}, check=_merge_check,
        params=(
            Param("adapters", "repos", "the adapters to merge, as owner/name", required=True, items=(2, 16)),
            Param("name", "repo", "owner/name of the merged adapter", required=True),
            Param("method", "choice", "how to combine them; auto: the best data-free method on the seeds, else "
                  "distill", "linear", choices=COMPOSE_METHODS + ("auto",)),
            Param("weights", "floats", "one weight per adapter (default: equal)", min=-10, max=10, items=(2, 16)),
            Param("density", "float", "ties, dare, magnitude_prune: fraction of entries kept", min=0.001, max=1.0),
            Param("rank", "int", "output rank: a number, full (exact) or auto (smallest rank keeping energy)",
                  min=1, max=4096, words=MERGE_RANK_WORDS),
            Param("energy", "float", "rank auto: share of each module's merged update to keep", min=1e-9, max=1.0),
            Param("max_rank", "int", "rank auto: the largest rank accepted", min=1, max=4096),
            SEED,
            Param("search_weights", "bool", "search the weights on the seed examples", False),
            Param("budget", "int", "search_weights: merges tried", min=2, max=200),
            Param("steps", "int", "distill: training steps (default 1000 per adapter)", min=1, max=100_000),
            Param("synthetic", "int", "distill: synthetic task inputs per adapter", min=1, max=16_384),
        ),
    ),
    OpSpec(
        name="transfer", title="Transfer to another base", queue="gpu", soft_time_limit=7200, time_limit=7500,
        summary="Move an adapter to another base: diff transfer, Trans-LoRA, or auto (diff, else Trans-LoRA).",
        produces=("transfer", "translora"), card_relation="adapter", writes=None, reads=("adapter",),
        creates="name", bases=("target",), check=_transfer_check, params=TRANSFER_PARAMS,
    ),
    OpSpec(
        name="translora", title="Trans-LoRA", queue="gpu", soft_time_limit=7200, time_limit=7500,
        summary="Trans-LoRA: distill an adapter onto another base through synthetic data (resumable by stage).",
        produces=("translora",), card_relation="adapter", writes=None, reads=("adapter",), creates="name",
        bases=("target",), needs_seeds=True, check=_translora_check,
        params=tuple(p if p.name != "method" else Param("method", "choice", "always translora", "translora",
                                                        choices=("translora",))
                     for p in TRANSFER_PARAMS if p.name not in ("finetune_steps", "scale")),
    ),
    OpSpec(
        name="quantize", title="Quantize (QA-LoRA)", queue="gpu", soft_time_limit=7200, time_limit=7500,
        summary="QA-LoRA: quantize the base group-wise and merge the adapter exactly into its zero points.",
        produces=("qalora",), card_relation="quantized",
        params=(
            ADAPTER, REVISION,
            Param("bits", "choice", "bits per weight; auto: the fewest whose result passes its verdict", 4,
                  choices=(4, 8, 3, 2, "auto")),
            Param("group_size", "choice", "weights sharing one scale and zero point", 64,
                  choices=(4, 8, 16, 32, 64, 128)),
            Param("qalora_finetune_steps", "int", "QA-LoRA fine-tune steps on the seeds (0: none)", 0,
                  min=0, max=10_000),
        ),
    ),
    OpSpec(
        name="scale", title="Scale", queue="cpu", soft_time_limit=600, time_limit=900,
        summary="Multiply an adapter's update by a factor (a new scale revision): 0.5 halves its effect, "
                "-1 negates it.",
        produces=("scale",), card_relation="adapter",
        params=(
            ADAPTER, REVISION,
            Param("factor", "float", "the multiplier of the update B @ A", required=True, min=-100, max=100),
        ),
    ),
)

# Test-only ops: the engine's own tests drive the runner with them (workers/ops/testing.py).
# Never offered by a served hub unless HUB_TEST_OPS is set.
_TEST_OPS: tuple[OpSpec, ...] = (
    OpSpec(name="sleep", title="sleep", summary="Test op: sleep in steps, reporting progress.", queue="cpu",
           soft_time_limit=150, time_limit=180, module="workers.ops.testing", test_only=True,
           produces=("merge",),  # the runner's own tests stand a revision-making function in for it
           params=(Param("seconds", "float", "", 1.0, min=0, max=120), Param("steps", "int", "", 10, min=1, max=10_000),
                   Param("adapter", "repo", "")), writes="adapter"),
    OpSpec(name="fail", title="fail", summary="Test op: raise a user error, a transient fault or a bug.",
           queue="cpu", soft_time_limit=150, time_limit=180, module="workers.ops.testing", test_only=True,
           params=(Param("kind", "choice", "", "user", choices=("user", "transient", "bug")),
                   Param("seconds", "float", "", 0.0, min=0, max=60), Param("adapter", "repo", ""))),
    OpSpec(name="touch", title="touch", summary="Test op: copy the adapter's main revision into a new merge revision.",
           queue="gpu", soft_time_limit=150, time_limit=180, module="workers.ops.testing", test_only=True,
           produces=("merge",),
           params=(ADAPTER, Param("seconds", "float", "", 0.0, min=0, max=120),
                   Param("steps", "int", "", 4, min=1, max=10_000))),
)

OPS: dict[str, OpSpec] = {spec.name: spec for spec in _OPS}


def test_ops_enabled() -> bool:
    # An env var, not a setting: test fixtures set it for the test process and the workers alike.
    return os.environ.get("HUB_TEST_OPS", "").strip().lower() in ("1", "true", "yes")


def register_test_ops() -> None:
    """Idempotent; the worker and the web process call it at import when HUB_TEST_OPS=1."""
    for spec in _TEST_OPS:
        OPS.setdefault(spec.name, spec)


if test_ops_enabled():
    register_test_ops()


def get(name) -> OpSpec:
    spec = OPS.get(name) if isinstance(name, str) else None
    if spec is None:
        known = ", ".join(sorted(OPS)) or "none"
        raise ParamError(f"Unknown op {name!r}; known ops: {known}.", code="unknown_op")
    return spec


def revision_kinds() -> tuple[str, ...]:
    """Every kind a revision may have: uploads, then what the ops make (test ops included)."""
    kinds = ["upload"]
    for spec in (*_OPS, *_TEST_OPS):
        kinds += [k for k in spec.produces if k not in kinds]
    return tuple(kinds)


def max_time_limit() -> int:
    return max((s.time_limit for s in OPS.values()), default=0)
