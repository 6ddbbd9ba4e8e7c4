"""Picking the scale (and the magnitude levels) of a compression on held-out examples, as
the paper tunes it on validation data (`choose_scale`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ..adapter import Adapter, AdapterLike, as_adapter
from ..errors import AdapterError
from ..verdict import ratio_of, search
from .algorithm import compress
from .fileformat import CompressedAdapter
from .params import CompressParams

# --------------------------------------------------------------------------------------------
# picking the scale
# --------------------------------------------------------------------------------------------
DEFAULT_CANDIDATES = (0.5, 1.0, 2.0, 3.0, 5.0, 8.0, 10.0)
# fitted levels start near the right size (factor 1), the paper's std-based scale far below it
LEVEL_CANDIDATES = (0.75, 1.0, 1.25, 1.5, 2.0)


@dataclass(frozen=True)
class ScaleChoice:
    replace_factor: float
    score: float
    scores: dict[float, float]
    compressed: CompressedAdapter


def choose_scale(
    adapter: AdapterLike,
    density: float,
    score_fn: Callable[[Adapter], float],
    candidates: Iterable[float] | None = None,
    scope: str = "global",
    magnitude_bits: int = 0,
    factorization: str = "as_is",
    keep: str = "exact",
) -> ScaleChoice:
    """Pick replace_factor by `score_fn(decompressed_adapter) -> float` (higher is better).

    `candidates` default to DEFAULT_CANDIDATES (the paper's rule) or, with
    magnitude_bits, LEVEL_CANDIDATES.

    The positions and signs do not depend on the factor, so the adapter is
    compressed once and only the scale changes per candidate. Ties go to the
    earliest candidate; NaN scores never win.
    """
    adapter = as_adapter(adapter)
    if candidates is None:
        candidates = LEVEL_CANDIDATES if magnitude_bits else DEFAULT_CANDIDATES
    cands = [float(c) for c in candidates]
    if not cands:
        raise AdapterError("choose_scale needs at least one candidate", "invalid_candidates")
    for c in cands:
        CompressParams(density=density, scope=scope, replace_factor=c, keep=keep)  # validates each
    base = compress(adapter, density=density, scope=scope, replace_factor=1.0, magnitude_bits=magnitude_bits,
                    factorization=factorization, keep=keep)
    scores: dict[float, float] = {}
    best = None
    for c in cands:
        cand = base.with_replace_factor(c)
        score = float(score_fn(cand.decompress()))
        scores[c] = score
        if not math.isnan(score) and (best is None or score > best[1]):
            best = (c, score, cand)
    if best is None:
        raise AdapterError("score_fn returned NaN for every candidate", "invalid_score")
    return ScaleChoice(replace_factor=best[0], score=best[1], scores=scores, compressed=best[2])


# --------------------------------------------------------------------------------------------
# picking the density (the op's `density auto`)
# --------------------------------------------------------------------------------------------


@dataclass
class DensityChoice:
    density: float
    compressed: CompressedAdapter
    scale: ScaleChoice | None  # the scale search at that density (None when the scale was not tuned)
    passed: bool  # whether the chosen density reached the pass ratio on the choosing examples
    tried: list[dict]  # [{"density", "ratio"}] in the order tried


def compress_at(adapter: AdapterLike, density: float, score_fn: Callable[[Adapter], float] | None = None, *,
                alpha: float | None = None, scope: str = "global", magnitude_bits: int = 0,
                factorization: str = "as_is") -> tuple[CompressedAdapter, ScaleChoice | None]:
    """One density: the scale chosen by `score_fn` when given (choose_scale), else the paper's
    rule (replace_factor 1, or `alpha`)."""
    options = {"scope": scope, "magnitude_bits": magnitude_bits, "factorization": factorization}
    if score_fn is not None:
        choice = choose_scale(adapter, density, score_fn, **options)
        return choice.compressed, choice
    return compress(adapter, density=density, alpha=alpha, **options), None


def choose_density(adapter: AdapterLike, score_fn: Callable[[Adapter], float], before: float,
                   densities: Iterable[float], *, pass_ratio: float, tune_scale: bool = True,
                   **options) -> DensityChoice:
    """The smallest file that keeps `pass_ratio` of `before` (the source's score by the same
    `score_fn`): densities tried cheapest first, each with its scale chosen by `score_fn` when
    `tune_scale`; the first that passes wins. When none passes, the best ratio is kept and
    `passed` is False. `options` go to compress_at (alpha, scope, magnitude_bits, factorization)."""
    def trial(density):
        packed, choice = compress_at(adapter, density, score_fn if tune_scale else None, **options)
        after = choice.score if choice else score_fn(packed.decompress())
        return (packed, choice), ratio_of(before, after)

    found = search(list(densities), trial, pass_ratio=pass_ratio)
    (packed, choice) = found.result
    return DensityChoice(density=found.candidate, compressed=packed, scale=choice, passed=found.passed,
                         tried=[{"density": t["candidate"], "ratio": t["ratio"]} for t in found.tried])
