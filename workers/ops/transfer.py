"""`transfer`: move an adapter to another base version as a new adapter there.

`diff` re-bases the LoRA (a low-rank diff vector) onto the target when the
bases' manifests line up, optionally followed by a short fine-tune on the
seed examples ("recycle then fine-tune"). `translora` distills it through
synthetic data (adapters_ops.translora; resumable by stage). `auto` tries diff
and falls back to Trans-LoRA when the bases differ or diff fails the quality
gate. With seeds, the gate's metrics are stored (on the examples it chose on),
and the revision's verdict (adapters_ops.verdict) compares source and result
on seeds nothing chose on; a failed verdict leaves `main` unset (runner).

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
    from adapters_ops import transfer as lib
    from adapters_ops import verdict

    p = ctx.params
    adapter = ctx.adapter
    source = ctx.revision(adapter, p.get("revision"))
    target = base_model_get(p["target"])
    if target.pk == source.base_model_id:
        raise runner.OpError(f"{adapter.repo_id} already sits on {target.slug}.", "same_base")
    ctx.progress(0.05, f"Loading {adapter.repo_id}@{source.sha[:8]}")
    lora = inputs.load_adapter(ctx, source)
    compat = lib.check_compatible(source.base_model.manifest, target.manifest, lora)
    method = p["method"]
    if method == "diff" and not compat:
        raise runner.OpError(compat.message, "incompatible_bases")
    seeds = inputs.seeds(adapter)
    # Fine-tuning, the auto gate's choice and Trans-LoRA's kept state read one part of the seeds;
    # the verdict scores the other. A plain diff transfer chooses nothing and is judged on all.
    selects = method != "diff" or bool(p.get("finetune_steps"))
    plan = verdict.plan_examples(seeds, selects=selects)
    chosen = plan.choose
    metrics: dict = {"compatible": bool(compat)}
    transferred, used = None, None
    if compat and method in ("diff", "auto"):
        transferred, used = lib.rebase(lora, target.slug, scale=p.get("scale", 1.0)), "diff"
        if chosen and p.get("finetune_steps"):
            tdir = inputs.base_dir(ctx, target)
            ctx.progress(0.3, f"Recycle then fine-tune: {p['finetune_steps']} steps on {len(chosen)} seeds")
            transferred = lib.recycle_finetune(
                transferred, tdir, chosen, steps=p["finetune_steps"], seed=p.get("seed", 0), target_slug=target.slug,
                progress=lambda f, msg="": ctx.progress(0.3 + 0.4 * f, msg or "fine-tuning"))
            used = "diff+finetune"
    if chosen and transferred is not None:
        ctx.progress(0.75, f"Quality gate on {len(chosen)} seed examples")
        gate = lib.quality_gate(inputs.base_dir(ctx, source.base_model), inputs.base_dir(ctx, target), lora,
                                transferred, chosen)
        metrics.update(gate["metrics"], verified=gate["verified"], recovered=gate["recovered"])
        if not gate["verified"] and method == "auto":
            transferred = None  # fall through to Trans-LoRA
    if transferred is None:
        transferred, used, report = _translora(ctx, source, lora, target, chosen)
        metrics.update(report)
    metrics["method"] = used
    if seeds:
        ctx.progress(0.95, "Verdict: scoring the transferred adapter against the source")
        src_dir, tgt_dir = inputs.base_dir(ctx, source.base_model), inputs.base_dir(ctx, target)
        judged = verdict.assess(plan, source=(src_dir, lora), derived=(tgt_dir, transferred), bare=(tgt_dir, None))
    else:
        judged = verdict.unverified("the adapter has no seed examples", verdict.describe(plan))
    out = transferred.save(ctx.workdir / "transferred")
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
        metrics=metrics, message=f"{used} transfer {source.base_model.slug} -> {target.slug} ({judged['status']})",
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


def _translora(ctx, source, lora, target, seeds):
    try:
        from adapters_ops import translora
    except ImportError:
        raise runner.OpError("Trans-LoRA is not available in this worker.", "translora_unavailable") from None
    if not seeds:
        raise runner.OpError(
            "Trans-LoRA needs seed examples (upload them with the adapter: --seeds FILE); "
            "the bases are not compatible for diff transfer.", "no_seeds")
    p = ctx.params
    config = translora.TransLoraConfig(**{k: v for k, v in (p.get("translora") or {}).items()})
    ctx.progress(0.1, "Trans-LoRA: synthetic data, filter, label, distill")
    result, report = translora.run(
        inputs.base_dir(ctx, source.base_model), lora, inputs.base_dir(ctx, target), seeds, config,
        progress=lambda f, msg="": ctx.progress(0.1 + 0.85 * f, msg or "Trans-LoRA"),
        checkpoint=_Checkpoints(ctx),
    )
    result.config["base_model_name_or_path"] = target.slug
    summary = report if isinstance(report, dict) else getattr(report, "as_dict", lambda: {})()
    return result, "translora", {"translora": summary, **_gate_from(summary)}


def _gate_from(summary: dict) -> dict:
    m = summary.get("metrics") or {}
    out = {k: m[k] for k in ("source_with_adapter", "target_base", "target_with_transferred") if k in m}
    if "target_with_transferred" in out and "target_base" in out:
        out["verified"] = out["target_with_transferred"] > out["target_base"]
    return out


@app.task(name="ops.transfer", bind=True)
def transfer_task(self, job_id: str) -> str:
    return runner.run(job_id, transfer, task=self)
