"""`quantize`: a QA-LoRA quantized merged expert as a `qalora` revision.

The base is quantized group-wise, the adapter brought into QA-LoRA form
(optionally recovered: distilled from the fp base + adapter on synthetic task
inputs written from the seed examples, early-stopped on the seeds), and
merged exactly into the zero points. The revision stores the packed model (quantized.safetensors +
config and tokenizer), the QA-LoRA adapter under qalora/, and for 4 bits a
GGUF Q4_1 file that llama.cpp and transformers+gguf load. With seeds, the
revision's verdict (adapters_ops.verdict) scores the stored quantized model
against the fp base + adapter (on seeds recovery did not stop on).
"""

from __future__ import annotations

from workers import inputs, runner
from workers.app import app


def quantize(ctx: runner.JobContext) -> runner.RevisionOutput:
    from adapters_ops import qalora, verdict

    p = ctx.params
    adapter = ctx.adapter
    source = ctx.revision(adapter, p.get("revision"))
    ctx.progress(0.02, f"Loading {adapter.repo_id}@{source.sha[:8]} and {source.base_model.slug}")
    lora = inputs.load_adapter(ctx, source)
    base = inputs.base_dir(ctx, source.base_model)
    seeds = inputs.seeds(adapter)
    if p["qalora_finetune_steps"] and not seeds:
        raise runner.OpError("qalora_finetune_steps needs seed examples on the adapter (upload them with --seeds).",
                             "no_seeds")
    steps, auto = p["qalora_finetune_steps"], p["bits"] == "auto"
    if auto and not seeds:
        raise runner.OpError("bits auto searches on the seed examples; this adapter has none "
                             "(upload them with --seeds, or give bits).", "no_seeds")
    # recovery is early-stopped (and bits auto chosen) on one part of the seeds; the verdict scores the other
    plan = verdict.plan_examples(seeds, selects=bool(steps) or auto)

    def quantize_at(bits: int, lo: float, hi: float):
        out = ctx.workdir / f"quantized-{bits}"
        report = qalora.quantize_merged(
            base, lora, bits=bits, group_size=p["group_size"], out_dir=out,
            finetune_steps=steps, examples=plan.choose if steps else None,
            progress=lambda f, msg="": ctx.progress(lo + (hi - lo) * f, msg or f"quantizing to INT{bits}"),
        )
        # the stored model, read back and dequantized, is what a user would load
        served = qalora.load_quantized(out).save_dequantized(ctx.workdir / f"dequantized-{bits}") if seeds else None
        return out, report, served

    if auto:
        before = inputs.seed_accuracy(base, plan.choose, lora)
        span = 0.85 / len(verdict.AUTO_BITS)

        def trial(bits):
            lo = 0.05 + span * verdict.AUTO_BITS.index(bits)
            made = quantize_at(bits, lo, lo + span)
            return made, verdict.ratio_of(before, inputs.seed_accuracy(made[2], plan.choose))

        found = verdict.search(verdict.AUTO_BITS, trial)  # the fewest bits that pass on the search's seeds
        bits, (out, report, served) = found.candidate, found.result
        bits_search = {"examples": len(plan.choose), "source_accuracy": before, "passed": found.passed,
                       "tried": [{"bits": t["candidate"], "ratio": t["ratio"]} for t in found.tried]}
    else:
        bits, bits_search = p["bits"], None
        out, report, served = quantize_at(bits, 0.05, 0.9)
    if plan.verdict:
        ctx.progress(0.92, "Verdict: scoring the quantized merged expert against the fp adapter")
        judged = verdict.assess(plan, source=(base, lora), derived=(served, None), bare=(base, None))
    else:
        judged = verdict.assess(plan, source=(base, lora), derived=(base, None))
    files = {str(f.relative_to(out)): f for f in sorted(out.rglob("*")) if f.is_file()}
    sizes = report.get("bytes", {})
    metrics = {
        "bits": bits, "bits_search": bits_search, "group_size": p["group_size"],
        "size_ratio_vs_bf16": round(sizes["bf16"] / sizes["quantized"], 2) if sizes.get("quantized") else None,
        "merge_max_logit_diff": report.get("merge_max_logit_diff"),
        "codes_unchanged": report.get("codes_unchanged"),
        "conversion_rel_error": report.get("conversion_rel_error"),
        "integer_zero_point_error": report.get("integer_zero_point_error"),
        "bits_per_weight": report.get("bits_per_weight"),
        "bytes": sizes,
    }
    if "recovery" in report:
        rec = report["recovery"]
        metrics["recovery"] = {k: rec.get(k) for k in ("steps_run", "best_step", "best_seed_loss", "train_examples",
                                                        "seconds")}
        metrics["synthetic_examples"] = report.get("synthetic", {}).get("examples", 0)
    return runner.RevisionOutput(
        adapter=adapter, kind="qalora", parents=[source], files=files,
        metrics={k: v for k, v in metrics.items() if v is not None},
        message=f"QA-LoRA INT{bits}{' (auto)' if auto else ''} g{p['group_size']} merged expert",
        done_message=f"Quantized to INT{bits} g{p['group_size']} "
                     f"({metrics.get('size_ratio_vs_bf16', '?')}x smaller than bf16).", verdict=judged,
    )


@app.task(name="ops.quantize", bind=True)
def quantize_task(self, job_id: str) -> str:
    return runner.run(job_id, quantize, task=self)
