"""What the stages share: progress reporting, per-stage seeds, model folders, and the
prompt template and length limits read off the seed prompts."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

from ..errors import AdapterError
from .config import _SPAN, STAGES, Progress, TransLoraConfig

# --- helpers ---------------------------------------------------------------------------------------


def _report(progress: Progress, stage: str, fraction: float, message: str) -> None:
    if progress is not None:
        lo, hi = _SPAN[stage]
        progress(min(1.0, max(0.0, lo + (hi - lo) * fraction)), f"{stage}: {message}")


def _stage_seed(seed: int, stage: str) -> int:
    """Each stage draws from its own stream: a resumed run draws what an uninterrupted one does."""
    return seed * 1000 + STAGES.index(stage) + 1


def _model_dir(path) -> Path:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise AdapterError(f"{path} is not a model directory (no config.json)", "missing_base")
    return path


def _max_positions(model) -> int:
    return int(getattr(model.config, "max_position_embeddings", 0) or 2048)


def _common_prefix(texts: Sequence[str]) -> str:
    p = os.path.commonprefix(list(texts))
    p = p[:min(map(len, texts)) - 1]  # at least one variable character is left in every text
    # Cut back to a word boundary: seeds "date 1987-.." and "date 1950-.." share "date 19",
    # but only "date " is template; the digits are content.
    while p and p[-1].isalnum() and any(len(t) > len(p) and t[len(p)].isalnum() for t in texts):
        p = p[:-1]
    return p


def template_of(prompts: Sequence[str]) -> tuple[str, str]:
    """The (prefix, suffix) every seed prompt shares, cut at word boundaries ("caesar ", "=")."""
    prefix = _common_prefix(prompts)
    rest = [t[len(prefix):] for t in prompts]
    suffix = _common_prefix([t[::-1] for t in rest])[::-1]
    if any(len(r) <= len(suffix) for r in rest):  # keep at least one variable character
        suffix = ""
    return prefix, suffix


def _length_limits(prompts: Sequence[str], cfg: TransLoraConfig) -> tuple[int, int]:
    lo = cfg.min_chars if cfg.min_chars is not None else max(1, min(map(len, prompts)) // 2)
    hi = cfg.max_chars if cfg.max_chars is not None else 2 * max(map(len, prompts))
    return lo, hi


def _sanitise(rows: list[dict], seed_prompts: Sequence[str], prefix: str, suffix: str, limits: tuple[int, int],
              counts: Counter) -> list[dict]:
    """Drop empty, unterminated, too short/long, seed copies and duplicates; count each reason."""
    seeds = set(seed_prompts)
    seen: set[str] = set()
    out = []
    for r in rows:
        p = r["prompt"]
        middle = p[len(prefix):len(p) - len(suffix)] if p.startswith(prefix) and p.endswith(suffix) else None
        if middle is None:
            counts["unterminated"] += 1
        elif not middle.strip():
            counts["empty"] += 1
        elif not limits[0] <= len(p) <= limits[1]:
            counts["length"] += 1
        elif p in seeds:
            counts["seed_copy"] += 1
        elif p in seen:
            counts["duplicate"] += 1
        else:
            seen.add(p)
            out.append(r)
    return out
