"""Inputs every tensor op needs, fetched from the blob store: a revision as a
PEFT folder, a base model as an HF folder (cached by its commit id, since
bases are large and immutable), and the adapter's seed examples."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from django.conf import settings

from hub.registry.models import Adapter, BaseModel, Revision
from hub.storage import open_blob
from workers import knob
from workers.runner import JobContext


def base_cache_root() -> Path:
    return Path(knob("BASE_CACHE_DIR", "") or settings.HUB_HOME / "cache" / "bases")


def base_dir(ctx: JobContext, base: BaseModel) -> Path:
    """The base's files as a local HF folder, shared by every job on this machine."""
    final = base_cache_root() / f"{base.slug}-{base.sha[:16]}"
    if (final / ".complete").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{base.slug}-", dir=final.parent))
    ctx.materialize_base(base, tmp)
    (tmp / ".complete").write_text(base.sha)
    try:
        os.rename(tmp, final)
    except OSError:  # another job finished the same copy first
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def adapter_dir(ctx: JobContext, revision: Revision, name: str = "adapter") -> Path:
    return ctx.materialize_revision(revision, ctx.workdir / name)


def load_adapter(ctx: JobContext, revision: Revision, name: str = "adapter"):
    from adapters_ops.adapter import Adapter as LoraAdapter

    return LoraAdapter.load(adapter_dir(ctx, revision, name))


def seeds(adapter: Adapter) -> list[dict] | None:
    """The adapter's seed examples ({"prompt", "completion"} dicts), if uploaded."""
    if adapter.seeds_id is None:
        return None
    # Read from the store directly: seed files are small (validation caps them), and a temporary
    # copy would outlive a worker killed while reading it.
    with open_blob(adapter.seeds) as f:
        text = f.read().decode("utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def seed_accuracy(base: Path, examples: list[dict], lora=None) -> float:
    from adapters_ops.evaluate import evaluate

    return round(float(evaluate(base, examples, adapter=lora).accuracy), 4)
