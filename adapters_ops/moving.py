"""Moving an adapter to another base: the one policy a transfer job runs.

    diff       re-base the LoRA onto the target (the bases line up tensor by
               tensor), optionally recycle-then-fine-tune on the seeds;
    translora  distil it onto the target through synthetic data (Trans-LoRA);
    auto       diff when the bases line up and the diff passes its quality gate
               on the seeds, else Trans-LoRA.

Seeds are split once (adapters_ops.verdict.plan_examples): whatever chooses or
trains (the fine-tune, auto's gate, Trans-LoRA's kept state) reads one part,
and the verdict scores the other. A plain diff chooses nothing and is judged
on all of them. Without seeds the verdict is `unverified`.

Base folders are asked for only when a step needs one (`source_dir()`,
`target_dir()`): a plain diff without seeds reads no base weights at all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from . import transfer as diff
from . import verdict
from .adapter import Adapter, AdapterLike, as_adapter
from .errors import AdapterError, IncompatibleAdapters

METHODS = ("auto", "diff", "translora")
Progress = Callable[[float, str], None] | None


@dataclass
class Moved:
    adapter: Adapter
    method: str  # what was used: "diff", "diff+finetune" or "translora"
    metrics: dict = field(default_factory=dict)
    verdict: dict = field(default_factory=dict)


def _report(progress: Progress, fraction: float, message: str) -> None:
    if progress is not None:
        progress(fraction, message)


def move(adapter: AdapterLike, *, source_manifest: dict, target_manifest: dict, target_slug: str,
         source_dir: Callable[[], Path], target_dir: Callable[[], Path], method: str = "auto",
         seeds: Sequence[dict] | None = None, finetune_steps: int = 0, scale: float = 1.0, seed: int = 0,
         translora_config: dict | None = None, checkpoint=None, progress: Progress = None) -> Moved:
    """`adapter` (on the source base) as an adapter of the target base, with the
    gate's metrics and the verdict. IncompatibleAdapters when `method` is diff
    and the bases do not line up; AdapterError (no_seeds) when Trans-LoRA is
    needed and there are no seeds."""
    lora = as_adapter(adapter)
    if method not in METHODS:
        raise AdapterError(f"method must be one of {', '.join(METHODS)}, got {method!r}", "invalid_parameter")
    compat = diff.check_compatible(source_manifest, target_manifest, lora)
    if method == "diff" and not compat:
        raise IncompatibleAdapters(compat.message, "incompatible_bases")
    selects = method != "diff" or bool(finetune_steps)
    plan = verdict.plan_examples(seeds, selects=selects)
    chosen = plan.choose
    metrics: dict = {"compatible": bool(compat)}
    moved, used = None, None
    if compat and method in ("diff", "auto"):
        moved, used = diff.rebase(lora, target_slug, scale=scale), "diff"
        if chosen and finetune_steps:
            _report(progress, 0.3, f"Recycle then fine-tune: {finetune_steps} steps on {len(chosen)} seeds")
            moved = diff.recycle_finetune(
                moved, target_dir(), chosen, steps=finetune_steps, seed=seed, target_slug=target_slug,
                progress=lambda f, msg="": _report(progress, 0.3 + 0.4 * f, msg or "fine-tuning"))
            used = "diff+finetune"
    if chosen and moved is not None:
        _report(progress, 0.75, f"Quality gate on {len(chosen)} seed examples")
        gate = diff.quality_gate(source_dir(), target_dir(), lora, moved, chosen)
        metrics.update(gate["metrics"], verified=gate["verified"], recovered=gate["recovered"])
        if not gate["verified"] and method == "auto":
            moved = None  # the diff lost the skill here: distil instead
    if moved is None:
        moved, report = _translora(lora, source_dir, target_dir, target_slug, chosen, translora_config,
                                   checkpoint, progress)
        used = "translora"
        metrics.update(translora=report, **_gate_from(report))
    metrics["method"] = used
    if seeds:
        _report(progress, 0.95, "Verdict: scoring the moved adapter against the source")
        judged = verdict.assess(plan, source=(source_dir(), lora), derived=(target_dir(), moved),
                                bare=(target_dir(), None))
    else:
        judged = verdict.unverified("the adapter has no seed examples", verdict.describe(plan))
    return Moved(adapter=moved, method=used, metrics=metrics, verdict=judged)


def _translora(lora, source_dir, target_dir, target_slug, seeds, config, checkpoint, progress):
    if not seeds:
        raise AdapterError("Trans-LoRA needs seed examples (upload them with the adapter: --seeds FILE); the "
                           "bases are not compatible for diff transfer.", "no_seeds")
    from . import translora

    _report(progress, 0.1, "Trans-LoRA: synthetic data, filter, label, distill")
    result, report = translora.run(
        source_dir(), lora, target_dir(), seeds, translora.TransLoraConfig(**(config or {})),
        progress=lambda f, msg="": _report(progress, 0.1 + 0.85 * f, msg or "Trans-LoRA"),
        checkpoint=checkpoint, target_slug=target_slug,
    )
    result.config["base_model_name_or_path"] = target_slug
    return result, report


def _gate_from(report: dict) -> dict:
    """Trans-LoRA's seed metrics under the diff gate's names, so both kinds of move read alike."""
    m = report.get("metrics") or {}
    out = {k: m[k] for k in ("source_with_adapter", "target_base", "target_with_transferred") if k in m}
    if "target_with_transferred" in out and "target_base" in out:
        out["verified"] = out["target_with_transferred"] > out["target_base"]
    return out
