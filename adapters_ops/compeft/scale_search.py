"""Picking the scale (and the magnitude levels) of a compression on held-out examples, as
the paper tunes it on validation data (`choose_scale`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ..adapter import Adapter, AdapterLike, as_adapter
from ..errors import AdapterError
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
