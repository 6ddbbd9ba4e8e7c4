"""The quality gate of a diff transfer: seed accuracy of the source with its adapter,
the bare target and the target with the moved adapter."""

from __future__ import annotations

import math
from collections.abc import Callable

from ..adapter import AdapterLike
from ..errors import AdapterError

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
        from ..evaluate import evaluate as evaluate_fn  # needs transformers; only imported when used
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
