"""`compress`: ComPEFT-compress a revision into a `compeft` revision.

The revision holds the compact file (`adapter_model.compeft.safetensors`) and
the PEFT config; `hubctl pull --compressed` decodes it on the client. When the
adapter has seed examples and no explicit `alpha`, the scale is chosen on part
of them (the paper tunes it on validation data); the revision's verdict
(adapters_ops.verdict) scores the other part, original against compressed.
"""

from __future__ import annotations

from workers import inputs, runner
from workers.app import app

COMPRESSED_NAME = "adapter_model.compeft.safetensors"


def compress(ctx: runner.JobContext) -> runner.RevisionOutput:
    from adapters_ops import compeft, verdict

    p = ctx.params
    adapter = ctx.adapter
    source = ctx.revision(adapter, p.get("revision"))
    ctx.progress(0.05, f"Loading {adapter.repo_id}@{source.sha[:8]}")
    lora = inputs.load_adapter(ctx, source)
    original_bytes = (ctx.workdir / "adapter" / "adapter_model.safetensors").stat().st_size
    seeds = inputs.seeds(adapter)
    tune = bool(seeds) and p.get("tune_scale", True) and p.get("alpha") is None
    # the scale search chooses on one part of the seeds; the verdict reads the other
    plan = verdict.plan_examples(seeds, selects=tune)
    # beyond the paper's rule (docs/compeft.md); absent params keep the paper's ternary factors
    options = {"magnitude_bits": p.get("magnitude_bits", 0), "factorization": p.get("factorization", "as_is")}
    metrics = {"density": p["density"], "scope": p["scope"], **options}
    base = inputs.base_dir(ctx, source.base_model) if seeds else None
    if tune:
        chosen_on = plan.choose
        ctx.progress(0.15, f"Choosing the scale on {len(chosen_on)} seed examples")
        tried = []

        def score(candidate):
            acc = inputs.seed_accuracy(base, chosen_on, candidate)
            tried.append(acc)
            ctx.progress(0.15 + 0.5 * len(tried) / 7, f"Scale candidate {len(tried)}: seed accuracy {acc:.2f}")
            return acc

        choice = compeft.choose_scale(lora, p["density"], score, scope=p["scope"], **options)
        packed = choice.compressed
        metrics.update(replace_factor=choice.replace_factor, scale_search={
            "examples": len(chosen_on), "best_accuracy": round(choice.score, 4),
            "accuracy_by_factor": {str(k): v for k, v in choice.scores.items()}})
    else:
        ctx.progress(0.3, f"Compressing at density {p['density']}")
        packed = compeft.compress(lora, density=p["density"], alpha=p.get("alpha"), scope=p["scope"], **options)
        metrics["replace_factor"] = 1.0 if p.get("alpha") is None else None
    ctx.progress(0.7, "Verdict: scoring the compressed expert against the original")
    judged = verdict.assess(plan, source=(base, lora), derived=(base, packed.decompress()), bare=(base, None))
    out = ctx.workdir / COMPRESSED_NAME
    packed.save(out)
    ctx.progress(0.9, "Storing the compressed expert")
    metrics.update(nbytes=out.stat().st_size, original_nbytes=original_bytes,
                   size_ratio=round(original_bytes / out.stat().st_size, 2))
    metrics = {k: v for k, v in metrics.items() if v is not None}
    return runner.RevisionOutput(
        adapter=adapter, kind="compeft", parents=[source], metrics=metrics,
        files={COMPRESSED_NAME: out, "adapter_config.json": ctx.workdir / "adapter" / "adapter_config.json"},
        message=f"ComPEFT density {p['density']} ({metrics['size_ratio']}x smaller)",
        done_message=f"Compressed {metrics['size_ratio']}x ({out.stat().st_size} bytes).", verdict=judged,
    )


@app.task(name="ops.compress", bind=True)
def compress_task(self, job_id: str) -> str:
    return runner.run(job_id, compress, task=self)
