"""`merge`: compose skills by merging adapters on one base into a new adapter.

Weight-space methods (adapters_ops.merge): weights are the user's, or found on
the inputs' seed examples by a small gradient-free search (LoraHub's idea) when
`search_weights` is set. `method="distill"` (adapters_ops.compose) instead
distils one student from every input on its own skill, from the seeds. When
seeds exist, the revision's verdict (adapters_ops.verdict) scores the merged
adapter against each single adapter on that skill's seeds (held out from the
search or the distillation), and takes the worst skill.
"""

from __future__ import annotations

from workers import inputs, runner
from workers.app import app


def merge(ctx: runner.JobContext) -> runner.RevisionOutput:
    from adapters_ops import merge as merging
    from adapters_ops import verdict

    p = ctx.params
    sources = [ctx.adapter_get(repo) for repo in p["adapters"]]
    bases = {a.base_model.slug for a in sources}
    if len(bases) > 1:
        raise runner.OpError(f"The adapters sit on different bases ({', '.join(sorted(bases))}); "
                             "merge adapters of one base, or transfer them first.", "incompatible_adapters")
    base_model = sources[0].base_model
    revisions = [ctx.revision(a) for a in sources]
    loras = []
    for i, (a, rev) in enumerate(zip(sources, revisions)):
        ctx.progress(0.05 + 0.15 * i / len(sources), f"Loading {a.repo_id}")
        loras.append(inputs.load_adapter(ctx, rev, name=f"in{i}"))
    seeds = {a.repo_id: s for a in sources if (s := inputs.seeds(a))}
    auto = p["method"] == "auto"
    distilled = p["method"] == "distill"
    if (distilled or auto) and len(seeds) < len(sources):
        missing = ", ".join(a.repo_id for a in sources if a.repo_id not in seeds)
        raise runner.OpError(f"method {p['method']} needs seed examples on every input adapter; {missing} has none "
                             "(upload them with `hubctl push --seeds`).", "no_seeds")
    base = inputs.base_dir(ctx, base_model) if seeds else None
    # The weight search and distillation learn from one part of each skill's seeds; the verdict
    # scores the other part, so it never reads an example that chose the result.
    selects = distilled or auto or bool(p.get("search_weights"))
    plans = {repo: verdict.plan_examples(ex, selects=selects) for repo, ex in seeds.items()}
    chosen = {repo: plan.choose for repo, plan in plans.items()}

    def skill_scores(lora) -> dict[str, float]:
        return {repo: inputs.seed_accuracy(base, ex, lora) for repo, ex in chosen.items()}

    weights = p.get("weights")
    metrics: dict = {"method": p["method"]}
    method, density = p["method"], p.get("density")
    if auto:
        method, density, metrics["method_search"] = _auto_method(ctx, base, loras, chosen, skill_scores)
        metrics["method"] = method
        distilled = method == "distill"
    if distilled:
        merged, metrics["distill"] = _distill(ctx, base, base_model.slug, sources, loras, chosen)
    elif p.get("search_weights"):
        if not seeds:
            raise runner.OpError("search_weights needs seed examples on at least one input adapter.", "no_seeds")
        budget, tried = p.get("budget", 12), []

        def score(candidate) -> float:
            s = skill_scores(candidate)
            tried.append(s)
            ctx.progress(0.2 + 0.55 * len(tried) / budget, f"Weight search {len(tried)}/{budget}: "
                         f"mean seed accuracy {sum(s.values()) / len(s):.2f}")
            return sum(s.values()) / len(s)

        found = merging.search_weights(loras, score, p["method"], budget=budget, seed=p["seed"],
                                       density=p.get("density"), device=ctx.device, **rank_kwargs(p))
        weights = [round(w, 4) for w in found.weights]
        metrics["weight_search"] = {"score": found.score, "evaluations": len(found.history)}
    if not distilled:
        weights = weights or [1.0 / len(loras)] * len(loras)
        ctx.progress(0.8, f"Merging {len(loras)} adapters ({method})")
        # Dense methods build each module's updates on the worker's GPU when it has one.
        result = merging.merge_with_report(loras, weights, method, density=density,
                                           seed=p["seed"], device=ctx.device, **rank_kwargs(p))
        merged, report = result.adapter, result.report
        merged.config["base_model_name_or_path"] = base_model.slug
        metrics.update(weights=list(weights), **rank_metrics(report))
    ctx.progress(0.9, "Verdict: scoring the merged adapter on each skill's seeds")
    judged = verdict.combine({
        a.repo_id: verdict.assess(plans[a.repo_id], source=(base, lora), derived=(base, merged), bare=(base, None))
        for a, lora in zip(sources, loras) if a.repo_id in plans
    }) if seeds else verdict.unverified("no input adapter has seed examples")
    if seeds:  # per skill, as before: the merged adapter and the single one, on the examples the verdict read
        metrics["seed_accuracy"] = {r: v["after"] for r, v in judged["skills"].items() if "after" in v}
        metrics["seed_accuracy_single"] = {r: v["before"] for r, v in judged["skills"].items() if "before" in v}
    out = merged.save(ctx.workdir / "merged")
    owner, name = p["name"].split("/", 1)
    private = any(a.visibility == "private" for a in sources)
    return runner.RevisionOutput(
        adapter=runner.NewAdapter(
            owner=owner, name=name, base=base_model, visibility="private" if private else "public",
            description=f"Merge ({p['method']}) of " + ", ".join(a.repo_id for a in sources) + ".",
        ),
        kind="merge", parents=revisions, metrics=metrics, ref="main",
        files={"adapter_config.json": out / "adapter_config.json",
               "adapter_model.safetensors": out / "adapter_model.safetensors"},
        message=f"{method}{' (auto)' if auto else ''} merge of {len(sources)} adapters", verdict=judged,
    )


def _auto_method(ctx, base, loras, chosen, skill_scores) -> tuple[str, float | None, dict]:
    """method auto: the data-free method (equal weights) whose worst skill keeps the most of its
    single adapter's seed accuracy, on the search's half of the seeds; if none passes, distill."""
    from adapters_ops import merge as merging
    from adapters_ops import verdict

    p = ctx.params
    singles = {repo: inputs.seed_accuracy(base, chosen[repo], lora) for repo, lora in zip(p["adapters"], loras)}
    weights = [1.0 / len(loras)] * len(loras)

    def trial(candidate):
        method, density = candidate
        ctx.progress(0.2 + 0.4 * verdict.AUTO_MERGE_METHODS.index(candidate) / len(verdict.AUTO_MERGE_METHODS),
                     f"method auto: trying {method}")
        merged = merging.merge(loras, weights, method=method, density=density, seed=p["seed"], device=ctx.device,
                               **rank_kwargs(p))
        scores = skill_scores(merged)
        return None, min(verdict.ratio_of(singles[r], scores[r]) for r in scores)

    found = verdict.search(verdict.AUTO_MERGE_METHODS, trial, cheapest_first=False)
    report = {"examples": {r: len(ex) for r, ex in chosen.items()}, "source_accuracy": singles,
              # in the order tried; ratio: the worst skill's after / before
              "tried": [{"method": t["candidate"][0], "ratio": t["ratio"]} for t in found.tried],
              "passed": found.passed}
    if found.passed:
        return found.candidate[0], found.candidate[1], report
    ctx.progress(0.6, "method auto: no data-free method passes; distilling")
    return "distill", None, report


def rank_kwargs(p: dict) -> dict:
    """The library's rank arguments from the job's cleaned params: rank (an
    integer, "auto" or "full"; absent: the method's default) and, with "auto",
    energy and max_rank."""
    out = {"rank": p.get("rank")}
    if p.get("rank") == "auto":
        out.update(energy=p.get("energy"), max_rank=p.get("max_rank"))
    return out


def rank_metrics(report) -> dict:
    """What the merge kept, for the revision's metrics (shown in the UI and on
    the model card): the rank asked for, the output ranks, and the captured
    energy (fraction of each module's merged update the factors keep; 1.0 = exact)."""
    ranks = [m["rank"] for m in report.modules.values()]
    out = {"requested_rank": report.rank if report.rank is not None else "default",
           "output_rank": min(ranks) if min(ranks) == max(ranks) else f"{min(ranks)}-{max(ranks)}",
           "min_captured_energy": round(report.min_energy, 6),
           "mean_captured_energy": round(report.mean_energy, 6)}
    if report.energy_target is not None:
        out["energy_target"] = report.energy_target
        if report.max_rank is not None:
            out["max_rank"] = report.max_rank
    return out


def _distill(ctx: runner.JobContext, base, slug: str, sources, loras, seeds) -> tuple:
    from adapters_ops import compose

    p = ctx.params
    cfg = compose.ComposeConfig(synthetic=p.get("synthetic", 1024), steps=p.get("steps"), rank=p.get("rank"),
                                seed=p["seed"])
    student, report = compose.distill_merge(
        base, loras, [seeds[a.repo_id] for a in sources], cfg, base_slug=slug,
        progress=lambda f, msg: ctx.progress(0.2 + 0.7 * f, f"Distilling: {msg}"))
    d = report["distill"]
    summary = {"examples_per_skill": {a.repo_id: s["examples"] for a, s in zip(sources, report["skills"])},
               "steps": d["steps_run"], "best_step": d["best_step"], "best_seed_accuracy": d["best_seed_accuracy"],
               "rank": d["rank"], "seconds": report["seconds"]}
    return student, summary


@app.task(name="ops.merge", bind=True)
def merge_task(self, job_id: str) -> str:
    return runner.run(job_id, merge, task=self)
