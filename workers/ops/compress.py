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
    auto = p["density"] == "auto"
    if auto and not seeds:
        raise runner.OpError("density auto searches on the seed examples; this adapter has none "
                             "(upload them with --seeds, or give a density).", "no_seeds")
    tune = bool(seeds) and p.get("tune_scale", True) and p.get("alpha") is None
    # the scale (and density) search chooses on one part of the seeds; the verdict reads the other
    plan = verdict.plan_examples(seeds, selects=tune or auto)
    # beyond the paper's rule (docs/compeft.md); absent params keep the paper's ternary factors
    options = {"magnitude_bits": p.get("magnitude_bits", 0), "factorization": p.get("factorization", "as_is")}
    metrics = {"density": p["density"], "scope": p["scope"], **options}
    base = inputs.base_dir(ctx, source.base_model) if seeds else None
    chosen_on = plan.choose
    calls = []

    def score(candidate) -> float:
        acc = inputs.seed_accuracy(base, chosen_on, candidate)
        calls.append(acc)
        ctx.progress(min(0.65, 0.15 + 0.5 * len(calls) / (60 if auto else 7)),
                     f"Candidate {len(calls)}: seed accuracy {acc:.2f} on {len(chosen_on)} seeds")
        return acc

    if auto:
        # the smallest file that passes on the search's half of the seeds (densities cheapest first)
        ctx.progress(0.1, f"density auto: searching {len(verdict.AUTO_DENSITIES)} densities on {len(chosen_on)} seeds")
        before = inputs.seed_accuracy(base, chosen_on, lora)
        found = compeft.choose_density(lora, score, before, verdict.AUTO_DENSITIES, pass_ratio=verdict.PASS_RATIO,
                                       tune_scale=tune, alpha=p.get("alpha"), scope=p["scope"], **options)
        packed, choice, density = found.compressed, found.scale, found.density
        metrics.update(density=density, density_search={
            "examples": len(chosen_on), "source_accuracy": before, "passed": found.passed, "tried": found.tried})
    else:
        density = p["density"]
        ctx.progress(0.15, f"Compressing at density {density}" + (f", choosing the scale on {len(chosen_on)} seeds"
                                                                 if tune else ""))
        packed, choice = compeft.compress_at(lora, density, score if tune else None, alpha=p.get("alpha"),
                                             scope=p["scope"], **options)
    if choice is not None:
        metrics.update(replace_factor=choice.replace_factor, scale_search={
            "examples": len(chosen_on), "best_accuracy": round(choice.score, 4),
            "accuracy_by_factor": {str(k): v for k, v in choice.scores.items()}})
    else:
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
        message=f"ComPEFT density {density}{' (auto)' if auto else ''} ({metrics['size_ratio']}x smaller)",
        done_message=f"Compressed {metrics['size_ratio']}x ({out.stat().st_size} bytes).", verdict=judged,
    )


@app.task(name="ops.compress", bind=True)
def compress_task(self, job_id: str) -> str:
    return runner.run(job_id, compress, task=self)
