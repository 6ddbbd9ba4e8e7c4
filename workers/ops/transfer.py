"""`transfer`: move an adapter to another base version as a new adapter there.

The policy (diff, the quality gate, the Trans-LoRA fallback, the seed split
and the verdict) is the library's: adapters_ops.moving.move. This op loads
the inputs, calls it, and stores the result; Trans-LoRA's stages resume from
the job's checkpoints. A failed verdict leaves `main` unset (runner).

The result lands in `name` (default `<owner>/<name>-<target>`, see
default_name), a new adapter on the target base with the source's tags, whose
lineage points at the source revision.
"""

from __future__ import annotations

from hub.registry.selectors import base_model_get
from workers import inputs, runner
from workers.app import app


def default_name(repo_id: str, target_slug: str, source_slug: str = "") -> str:
    """`owner/<name>-<target>`, where <name> loses a `-<source>` (or `-<target>`)
    suffix an earlier transfer gave it: caesar-tiny-llama-3.1 moved on to 3.2 is
    caesar-tiny-llama-3.2, not caesar-tiny-llama-3.1-tiny-llama-3.2 (the lineage
    keeps the path it took)."""
    owner, name = repo_id.split("/", 1)
    suffixes = tuple(f"-{s}" for s in (source_slug, target_slug) if s)
    while suffixes and name.endswith(suffixes) and len(name) > max(map(len, suffixes)):
        name = name[: -len(next(x for x in suffixes if name.endswith(x)))]
    return f"{owner}/{name[: max(1, 95 - len(target_slug))]}-{target_slug}"


def transfer(ctx: runner.JobContext) -> runner.RevisionOutput:
    from adapters_ops import moving

    p = ctx.params
    adapter = ctx.adapter
    source = ctx.revision(adapter, p.get("revision"))
    target = base_model_get(p["target"])
    if target.pk == source.base_model_id:
        raise runner.OpError(f"{adapter.repo_id} already sits on {target.slug}.", "same_base")
    ctx.progress(0.05, f"Loading {adapter.repo_id}@{source.sha[:8]}")
    moved = moving.move(
        inputs.load_adapter(ctx, source), source_manifest=source.base_model.manifest,
        target_manifest=target.manifest, target_slug=target.slug,
        source_dir=lambda: inputs.base_dir(ctx, source.base_model), target_dir=lambda: inputs.base_dir(ctx, target),
        method=p["method"], seeds=inputs.seeds(adapter), finetune_steps=p.get("finetune_steps", 0),
        scale=p.get("scale", 1.0), seed=p.get("seed", 0), translora_config=p.get("translora"),
        checkpoint=_Checkpoints(ctx), progress=ctx.progress,
    )
    used, judged = moved.method, moved.verdict
    out = moved.adapter.save(ctx.workdir / "transferred")
    repo = p.get("name") or default_name(adapter.repo_id, target.slug, source.base_model.slug)
    owner, name = repo.split("/", 1)
    return runner.RevisionOutput(
        adapter=runner.NewAdapter(
            owner=owner, name=name, base=target, visibility=adapter.visibility, seeds=adapter.seeds,
            tags=tuple(adapter.tags.values_list("name", flat=True)),
            description=f"{adapter.repo_id} transferred from {source.base_model.slug} to {target.slug} ({used}).\n\n"
                        + adapter.description,
        ),
        kind="translora" if used == "translora" else "transfer", parents=[source], base=target, ref="main",
        metrics=moved.metrics, message=f"{used} transfer {source.base_model.slug} -> {target.slug} ({judged['status']})",
        files={"adapter_config.json": out / "adapter_config.json",
               "adapter_model.safetensors": out / "adapter_model.safetensors"},
        done_message=f"Transferred to {repo} by {used}.", verdict=judged,
    )


class _Checkpoints:
    """Trans-LoRA stage outputs kept as job checkpoints: a killed worker resumes."""

    def __init__(self, ctx):
        self.ctx = ctx

    def load(self, stage: str) -> bytes | None:
        path = self.ctx.load_checkpoint(stage)
        return path.read_bytes() if path else None

    def save(self, stage: str, data: bytes) -> None:
        self.ctx.save_checkpoint(stage, data)


@app.task(name="ops.transfer", bind=True)
def transfer_task(self, job_id: str) -> str:
    return runner.run(job_id, transfer, task=self)
