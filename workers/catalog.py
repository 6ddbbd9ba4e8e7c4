"""The ops the hub can run, by name: one name per op everywhere (REST `op`,
`hubctl` subcommand, module `workers/ops/<name>.py`, Celery task `ops.<name>`).

The web process imports this module to validate a job request before it
creates the Job row, so it must stay free of torch and of the op modules:
each entry only names its queue, its time limits and a params validator.

Adding an op: write `workers/ops/<name>.py` (a task `ops.<name>` whose body is
`runner.run(job_id, fn)`), then `register(OpSpec(...))` below.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from hub.registry.validation import ValidationError

QUEUES = ("cpu", "gpu")
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
REV = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass(frozen=True)
class OpSpec:
    name: str
    queue: str  # "cpu" or "gpu" (a gpu worker without CUDA runs it on the CPU)
    soft_time_limit: int  # seconds: the op gets SoftTimeLimitExceeded, the job fails cleanly
    time_limit: int  # seconds: the worker child is killed
    validate: Callable[[dict], dict]  # params -> cleaned params, or ValidationError
    description: str = ""
    # The param that names the adapter the job acts on ("owner/name"): the
    # user must be able to write it, and Job.adapter points to it.
    adapter_param: str | None = "adapter"
    # Params naming adapters the op only reads ("owner/name" or a list of them):
    # they must be visible to the caller. `creates`: the param naming an adapter
    # the op may create, whose owner namespace the caller must be able to write.
    reads: tuple[str, ...] = ()
    creates: str | None = None
    bases: tuple[str, ...] = ()  # params naming base model slugs that must be registered
    # Given the cleaned params, whether every adapter named by `reads` must carry
    # seed examples (checked at submission, so a missing one is a 400, not a failed job).
    needs_seeds: Callable[[dict], bool] | None = None
    module: str = ""
    test_only: bool = False
    extra: dict = field(default_factory=dict)

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


OPS: dict[str, OpSpec] = {}


def register(spec: OpSpec) -> OpSpec:
    if spec.name in OPS:
        raise ValueError(f"op {spec.name!r} is registered twice")
    OPS[spec.name] = spec
    return spec


def get(name) -> OpSpec:
    spec = OPS.get(name) if isinstance(name, str) else None
    if spec is None:
        known = ", ".join(sorted(OPS)) or "none"
        raise ValidationError("unknown_op", f"Unknown op {name!r}; known ops: {known}.", field="op")
    return spec


def clean(name, params) -> tuple[OpSpec, dict]:
    """The spec and the validated params of a job request."""
    spec = get(name)
    if params is None:
        params = {}
    if not isinstance(params, dict):
        raise ValidationError("invalid_params", "params must be a JSON object.", field="params")
    return spec, spec.validate(dict(params))


def max_time_limit() -> int:
    return max((s.time_limit for s in OPS.values()), default=0)


def test_ops_enabled() -> bool:
    # An env var, not a setting: test fixtures set it for the test process and
    # for the worker subprocesses alike.
    return os.environ.get("HUB_TEST_OPS", "").strip().lower() in ("1", "true", "yes")


# --- params helpers ------------------------------------------------------------------


def bad(detail: str, field: str | None = None, code: str = "invalid_params") -> ValidationError:
    return ValidationError(code, detail, field=f"params.{field}" if field else "params")


def only(params: dict, allowed: set[str]) -> None:
    unknown = sorted(set(params) - allowed)
    if unknown:
        raise bad(f"Unknown parameter(s) {', '.join(unknown)}; allowed: {', '.join(sorted(allowed))}.", unknown[0])


def repo_id(params: dict, key: str = "adapter", required: bool = True) -> str | None:
    value = params.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not REPO_ID.match(value):
        raise bad(f"{key} must name an adapter as \"owner/name\", got {value!r}.", key)
    return value


def revision(params: dict, key: str = "revision") -> str | None:
    value = params.get(key)
    if value is None or value == "":
        return None
    if not isinstance(value, str) or not REV.match(value):
        raise bad(f"{key} must be a ref name or a commit id, got {value!r}.", key)
    return value


def number(params: dict, key: str, default, lo: float, hi: float, integer: bool = False):
    value = params.get(key, default)
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if integer:
        ok = ok and float(value).is_integer()
    if not ok or not lo <= value <= hi:
        kind = "an integer" if integer else "a number"
        raise bad(f"{key} must be {kind} between {lo} and {hi}, got {value!r}.", key)
    return int(value) if integer else float(value)


# --- the ops -----------------------------------------------------------------------------


def _validate_params(params: dict) -> dict:
    only(params, {"adapter", "revision"})
    out = {"adapter": repo_id(params)}
    rev = revision(params)
    if rev:
        out["revision"] = rev
    return out


register(OpSpec(
    name="validate", queue="cpu", soft_time_limit=1800, time_limit=2100, validate=_validate_params,
    description="Re-hash every blob of a revision and re-check its safetensors header and LoRA shapes "
                "against the base model. Creates no revision.",
))


def _compress_params(params: dict) -> dict:
    only(params, {"adapter", "revision", "density", "scope", "alpha", "tune_scale", "magnitude_bits",
                  "factorization"})
    out = {"adapter": repo_id(params)}
    # "auto": the smallest file whose result passes its verdict (docs/jobs.md)
    out["density"] = "auto" if params.get("density") == "auto" else number(params, "density", 0.1, 0.001, 1.0)
    scope = params.get("scope", "global")
    if scope not in ("global", "tensor"):
        raise bad(f"scope must be global or tensor, got {scope!r}.", "scope")
    out["scope"] = scope
    if params.get("alpha") is not None:
        out["alpha"] = number(params, "alpha", None, 1e-12, 1e6)
    tune = params.get("tune_scale", True)
    if not isinstance(tune, bool):
        raise bad("tune_scale must be true or false.", "tune_scale")
    out["tune_scale"] = tune
    out["magnitude_bits"] = number(params, "magnitude_bits", 0, 0, 4, integer=True)
    if out["magnitude_bits"] and "alpha" in out:
        raise bad("alpha fixes one magnitude; it cannot be combined with magnitude_bits.", "alpha")
    factorization = params.get("factorization", "as_is")
    if factorization not in ("as_is", "balanced"):
        raise bad(f"factorization must be as_is or balanced, got {factorization!r}.", "factorization")
    out["factorization"] = factorization
    rev = revision(params)
    if rev:
        out["revision"] = rev
    return out


register(OpSpec(
    name="compress", queue="cpu", soft_time_limit=3600, time_limit=3900, validate=_compress_params,
    description="ComPEFT: sparsify and ternary-quantize a revision into a compact `compeft` revision.",
))


# Names of adapters_ops.merge.METHODS (a test keeps the two lists equal; the
# web process must not import torch to validate a request), then "distill"
# (adapters_ops.compose: one student distilled from every input, from the seeds).
MERGE_METHODS = ("cat", "svd", "linear", "ties", "dare_linear", "dare_ties", "magnitude_prune",
                 "ties_svd", "dare_ties_svd", "dare_linear_svd", "magnitude_prune_svd")
COMPOSE_METHODS = MERGE_METHODS + ("distill",)


def _merge_params(params: dict) -> dict:
    only(params, {"adapters", "weights", "method", "density", "rank", "energy", "max_rank", "seed", "name",
                  "search_weights", "budget", "steps", "synthetic"})
    adapters = params.get("adapters")
    if not isinstance(adapters, list) or not 2 <= len(adapters) <= 16:
        raise bad("adapters must list 2 to 16 adapters as \"owner/name\".", "adapters")
    out = {"adapters": [repo_id({"a": a}, "a") for a in adapters]}
    if len(set(out["adapters"])) != len(adapters):
        raise bad("adapters lists the same adapter twice.", "adapters")
    method = params.get("method", "linear")
    if method not in COMPOSE_METHODS + ("auto",):
        raise bad(f"method must be one of {', '.join(COMPOSE_METHODS)} or auto; got {method!r}.", "method")
    out["method"] = method
    # Shared by every method, distill included (distill: an integer only).
    if params.get("rank") is not None:
        out["rank"] = _merge_rank(params, method)
    out["seed"] = number(params, "seed", 0, 0, 2**31 - 1, integer=True)
    out["name"] = repo_id(params, "name")
    if method in ("distill", "auto"):  # auto: the best data-free method on the seeds, else distill
        for key in ("energy", "max_rank"):
            if params.get(key) is not None:
                raise bad(f"{key} goes with rank \"auto\" of a weight-space merge, not with method {method}.", key)
        return _distill_params(params, out)
    for key in ("steps", "synthetic"):
        if params.get(key) is not None:
            raise bad(f"{key} is a parameter of method distill, not of {method}.", key)
    weights = params.get("weights")
    if weights is not None:
        if not isinstance(weights, list) or len(weights) != len(adapters):
            raise bad(f"weights must list one number per adapter ({len(adapters)}).", "weights")
        out["weights"] = [number({"w": w}, "w", None, -10, 10) for w in weights]
    _merge_rank_auto(params, out)
    if params.get("density") is not None:
        out["density"] = number(params, "density", None, 0.001, 1.0)
    elif method not in ("cat", "svd", "linear"):
        out["density"] = 0.5 if "magnitude" in method or "ties" in method else 0.7
    if params.get("search_weights") not in (None, False, True):
        raise bad("search_weights must be true or false.", "search_weights")
    out["search_weights"] = bool(params.get("search_weights"))
    if out["search_weights"] and "weights" in out:
        raise bad("Give weights or search_weights, not both.", "weights")
    out["budget"] = number(params, "budget", 12, 2, 200, integer=True)
    return out


# The output rank of a weight-space merge (adapters_ops.merge): an integer,
# "full" (the exact merged update) or "auto" (per module the smallest rank
# keeping `energy` of it, default 0.99, at most `max_rank`).
MERGE_RANK_MODES = ("auto", "full")
DEFAULT_MERGE_ENERGY = 0.99  # = adapters_ops.merge.DEFAULT_ENERGY (a test keeps them equal)


def _merge_rank(params: dict, method: str):
    rank = params["rank"]
    if isinstance(rank, str) and method not in ("distill", "auto"):
        if rank not in MERGE_RANK_MODES:
            raise bad(f"rank must be a positive integer, \"auto\" or \"full\", got {rank!r}.", "rank")
        if method == "cat" and rank == "auto":
            raise bad("method cat keeps every factor; use svd (or linear) to choose a rank.", "rank")
        return rank
    if method == "cat":
        raise bad("method cat keeps every factor (rank = sum of the input ranks); use svd (or linear) to choose "
                  "a rank.", "rank")
    return number(params, "rank", None, 1, 4096, integer=True)


def _merge_rank_auto(params: dict, out: dict) -> None:
    """energy and max_rank, which only rank "auto" takes."""
    if out.get("rank") != "auto":
        for key in ("energy", "max_rank"):
            if params.get(key) is not None:
                raise bad(f"{key} goes with rank \"auto\" (rank is {out.get('rank', 'the default')!r}).", key)
        return
    energy = params.get("energy", DEFAULT_MERGE_ENERGY)
    if isinstance(energy, bool) or not isinstance(energy, (int, float)) or not math.isfinite(energy) \
            or not 0 < energy <= 1:
        raise bad(f"energy must be a fraction in (0, 1], got {energy!r}.", "energy")
    out["energy"] = float(energy)
    if params.get("max_rank") is not None:
        out["max_rank"] = number(params, "max_rank", None, 1, 4096, integer=True)


def _distill_params(params: dict, out: dict) -> dict:
    for key in ("weights", "density", "budget"):
        if params.get(key) is not None:
            raise bad(f"method distill learns from the seeds; it takes no {key}.", key)
    if params.get("search_weights"):
        raise bad("method distill learns from the seeds; it takes no search_weights.", "search_weights")
    if params.get("steps") is not None:  # default: 1000 per adapter (adapters_ops.compose)
        out["steps"] = number(params, "steps", None, 1, 100_000, integer=True)
    out["synthetic"] = number(params, "synthetic", 1024, 1, 16_384, integer=True)
    return out


register(OpSpec(
    name="merge", queue="cpu", soft_time_limit=3600, time_limit=3900, validate=_merge_params,
    description="Merge adapters of one base into a new adapter (cat, svd, linear, ties, dare, ..., "
                "or distill: one student taught by every input from its seeds).",
    adapter_param=None, reads=("adapters",), creates="name",
    needs_seeds=lambda p: p["method"] in ("distill", "auto"),
))


def _transfer_params(params: dict) -> dict:
    only(params, {"adapter", "revision", "target", "method", "finetune_steps", "name", "scale", "seed", "translora"})
    out = {"adapter": repo_id(params)}
    target = params.get("target")
    if not isinstance(target, str) or not REV.match(target):
        raise bad(f"target must name a registered base model slug, got {target!r}.", "target")
    out["target"] = target
    method = params.get("method", "auto")
    if method not in ("diff", "translora", "auto"):
        raise bad(f"method must be diff, translora or auto, got {method!r}.", "method")
    out["method"] = method
    out["finetune_steps"] = number(params, "finetune_steps", 0, 0, 10000, integer=True)
    out["scale"] = number(params, "scale", 1.0, -10, 10)
    out["seed"] = number(params, "seed", 0, 0, 2**31 - 1, integer=True)
    if params.get("name") is not None:
        out["name"] = repo_id(params, "name")
    if params.get("translora") is not None:
        if not isinstance(params["translora"], dict):
            raise bad("translora must be an object of Trans-LoRA settings.", "translora")
        out["translora"] = params["translora"]
    rev = revision(params)
    if rev:
        out["revision"] = rev
    return out


register(OpSpec(
    name="transfer", queue="gpu", soft_time_limit=7200, time_limit=7500, validate=_transfer_params,
    description="Move an adapter to another base: diff transfer, Trans-LoRA, or auto (diff, else Trans-LoRA).",
    adapter_param=None, reads=("adapter",), creates="name", bases=("target",),
))


def _translora_params(params: dict) -> dict:
    if params.get("method", "translora") != "translora":
        raise bad("The translora op always uses method translora; use the transfer op for diff or auto.", "method")
    out = _transfer_params({**params, "method": "translora"})
    return out


register(OpSpec(
    name="translora", queue="gpu", soft_time_limit=7200, time_limit=7500, validate=_translora_params,
    description="Trans-LoRA: distill an adapter onto another base through synthetic data (resumable by stage).",
    adapter_param=None, reads=("adapter",), creates="name", bases=("target",),
))


def _quantize_params(params: dict) -> dict:
    only(params, {"adapter", "revision", "bits", "group_size", "qalora_finetune_steps"})
    out = {"adapter": repo_id(params)}
    bits = params.get("bits", 4)
    if bits != "auto" and (bits not in (2, 3, 4, 8) or isinstance(bits, bool)):  # auto: fewest bits that pass
        raise bad(f"bits must be 2, 3, 4, 8 or \"auto\", got {bits!r}.", "bits")
    group = params.get("group_size", 64)
    if group not in (4, 8, 16, 32, 64, 128) or isinstance(group, bool):
        raise bad(f"group_size must be 4, 8, 16, 32, 64 or 128, got {group!r}.", "group_size")
    out.update(bits=bits, group_size=group)
    out["qalora_finetune_steps"] = number(params, "qalora_finetune_steps", 0, 0, 10000, integer=True)
    rev = revision(params)
    if rev:
        out["revision"] = rev
    return out


register(OpSpec(
    name="quantize", queue="gpu", soft_time_limit=7200, time_limit=7500, validate=_quantize_params,
    description="QA-LoRA: quantize the base group-wise and merge the adapter exactly into its zero points.",
))


# Test-only ops: the engine's own tests drive the runner with them
# (workers/ops/testing.py). Never registered in a served hub unless asked.

def _sleep_params(params: dict) -> dict:
    only(params, {"seconds", "steps", "adapter"})
    out = {"seconds": number(params, "seconds", 1.0, 0, 120), "steps": number(params, "steps", 10, 1, 10000, True)}
    if params.get("adapter") is not None:
        out["adapter"] = repo_id(params)
    return out


def _fail_params(params: dict) -> dict:
    only(params, {"kind", "seconds", "adapter"})
    kind = params.get("kind", "user")
    if kind not in ("user", "transient", "bug"):
        raise bad(f"kind must be user, transient or bug, got {kind!r}.", "kind")
    out = {"kind": kind, "seconds": number(params, "seconds", 0.0, 0, 60)}
    if params.get("adapter") is not None:
        out["adapter"] = repo_id(params)
    return out


def _touch_params(params: dict) -> dict:
    only(params, {"adapter", "seconds", "steps"})
    return {
        "adapter": repo_id(params),
        "seconds": number(params, "seconds", 0.0, 0, 120),
        "steps": number(params, "steps", 4, 1, 10000, True),
    }


TEST_OPS = (
    OpSpec(name="sleep", queue="cpu", soft_time_limit=150, time_limit=180, validate=_sleep_params,
           description="Test op: sleep in steps, reporting progress.", module="workers.ops.testing", test_only=True),
    OpSpec(name="fail", queue="cpu", soft_time_limit=150, time_limit=180, validate=_fail_params,
           description="Test op: raise a user error, a transient fault or a bug.", module="workers.ops.testing",
           test_only=True),
    OpSpec(name="touch", queue="gpu", soft_time_limit=150, time_limit=180, validate=_touch_params,
           description="Test op: copy the adapter's main revision into a new `merge` revision.",
           module="workers.ops.testing", test_only=True),
)


def register_test_ops() -> None:
    """Idempotent; the worker registers them at import when HUB_TEST_OPS=1."""
    for spec in TEST_OPS:
        OPS.setdefault(spec.name, spec)


if test_ops_enabled():
    register_test_ops()
