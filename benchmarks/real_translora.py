"""Trans-LoRA 1.0 -> 1.1 on the real lane: does a skill survive a move from its 16 seeds alone?

    .venv/bin/python benchmarks/real_translora.py [--lane DIR] [--skills json_extract ...]
        [--set steps=150 --set n_synthetic=256 ...] [--quick | --limit N] [--json FILE]

Per skill: `translora.run` from the 1.0 LoRA to 1.1 with the 16 seed examples and nothing else
(the generator LM writes task inputs from few-shot seed prompts, the discriminator filters them,
the 1.0 LoRA labels them, a LoRA on 1.1 is distilled from them). Each row: exact match on the
test split of the source (1.0 + LoRA), bare 1.1, 1.1 + the unchanged LoRA (the diff transfer),
and 1.1 + the Trans-LoRA adapter, with its fraction of the source; the share of candidates the
filter kept; and the label precision: the share of the distilled-on labels that the skill's
own rule (re-derived here from the lane's data lists) agrees with, over the synthetic inputs
that rule can decide (the `decidable` share says how many). The default config is a CPU cut
of TransLoraConfig's (fewer candidates, fewer and smaller steps): --set restores any field.
Prints a markdown table; --json writes every number with the stage times and the peak RSS.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _real_lane as L  # noqa: E402
from translora_quality import config_overrides  # noqa: E402  (--set FIELD=VALUE, as there)

from adapters_ops import _real_data as D  # noqa: E402
from adapters_ops import translora  # noqa: E402
from adapters_ops.adapter import Adapter  # noqa: E402

# 135M parameters on 2 cores: one distillation step of 8 sequences takes ~2-5 s, so the library's
# defaults (2048 candidates, 2000 steps of 32) would run for hours per skill. The lane's own LoRAs
# were trained 40-80 steps of 8 at lr 3e-3 on 2000 examples: the student gets twice the steps.
CPU_CONFIG = {"n_synthetic": 256, "steps": 80, "batch_size": 8, "eval_every": 20, "patience": 3, "lr": 3e-3}


# --- the skills' rules, re-derived from the lane's data lists, to grade synthetic labels -----


def _question(prompt: str) -> str:
    """The user turn of a chat-templated prompt (the whole text when there is no template)."""
    m = re.search(r"user\n(.*?)(?:<\|im_end\|>|$)", prompt, re.S)
    return m.group(1) if m else prompt


_SPELLED = {D.number_words(n): n for n in range(100, 10000)}
_NUMBER_WORDS = {w for text in _SPELLED for w in re.split(r"[ -]", text)} | set(D._ONES[:20])
_VERBS = {v: D.past_tense(v) for v in (*D.REGULAR, *D.DOUBLED, *D.IRREGULAR)}
_SECTION_WORDS = {
    "sports": (*D.TEAMS, *D.ATHLETES, *D.EVENTS, "final", "goalkeeper", "derby", "semifinal", "coach", "record"),
    "business": (*D.COMPANIES, "shares", "stores", "interest rates", "startup", "Factory orders", "sales"),
    "science": (*D.PLANETS, *D.ANIMALS, "Astronomers", "comet", "genome", "battery", "Probe", "Study"),
    "weather": ("snow", "Storm", "Temperatures", "Floods", "Sunny", "rain", "degrees"),
}


def _words(text: str) -> set[str]:
    return set(re.findall(r"[A-Za-z]+", text))


def _json_rule(q: str) -> str | None:
    text = q.split("Text:", 1)[-1]
    names = [f"{f} {s}" for f in D.FIRST for s in D.LAST if f"{f} {s}" in text]
    cities = [c for c in D.CITIES if re.search(rf"\b{c}\b", text)]
    return f'{{"name": "{names[0]}", "city": "{cities[0]}"}}' if len(names) == 1 and len(cities) == 1 else None


def _past_rule(q: str) -> str | None:
    quoted = [w for w in re.findall(r'"([a-z]+)"', q.lower()) if w in _VERBS]  # the frames quote the verb
    found = set(quoted) or {v for v in _words(q.lower()) if v in _VERBS}
    return _VERBS[found.pop()] if len(found) == 1 else None


def _number_runs(low: str) -> list[str]:
    """Maximal runs of number words joined by spaces or hyphens, as written."""
    runs, cur = [], ""
    for word, sep in re.findall(r"([a-z]+)([ -]?)", low):
        if word in _NUMBER_WORDS:
            cur += word + sep
        elif cur:
            runs.append(cur.rstrip(" -"))
            cur = ""
    return [*runs, cur.rstrip(" -")] if cur else runs


def _digits_rule(q: str) -> str | None:
    """The number the question spells out, when one run of its words is exactly number_words(n)."""
    found = [_SPELLED[r] for r in _number_runs(q.lower()) if r in _SPELLED]
    return str(found[0]) if len(found) == 1 else None


def _section_rule(q: str) -> str | None:
    hits = {s for s, words in _SECTION_WORDS.items() if any(w.lower() in q.lower() for w in words)}
    return hits.pop() if len(hits) == 1 else None


RULES = {"json_extract": _json_rule, "past_tense": _past_rule, "number_digits": _digits_rule,
         "news_section": _section_rule}


def label_precision(skill: str, rows) -> dict:
    """Among labelled synthetic rows the rule decides: the share whose label is the rule's answer."""
    rule = RULES.get(skill)
    if rule is None:  # a skill of another lane: nothing here can grade it
        return {"rows": len(rows), "decidable": None, "precision": None}
    graded = [(rule(_question(r["prompt"])), r["completion"]) for r in rows]
    decided = [(want, got) for want, got in graded if want is not None]
    return {"rows": len(rows), "decidable": L.ratio(len(decided), len(rows)),
            "precision": L.ratio(sum(w == g for w, g in decided), len(decided))}


# --- the measurement --------------------------------------------------------------------


def run(root: Path, skills: list[str], source: str = L.SOURCE, target: str = L.TARGET, limit: int | None = None,
        config: dict | None = None, log=print) -> dict:
    src_dir, tgt_dir = root / "bases" / source, root / "bases" / target
    cfg = translora.TransLoraConfig(**{**CPU_CONFIG, **(config or {})})
    result = {"source": source, "target": target, "lane": root.name, "config": cfg.as_dict(), "skills": {}}
    src_scorer = tgt_scorer = None
    for skill in skills:
        adapter = Adapter.load(root / "adapters" / skill)
        test = L.examples(root, skill, "test", limit)
        seeds = L.examples(root, skill, "seed")
        store = translora.MemoryCheckpoint()
        op = L.timed(translora.run, src_dir, adapter, tgt_dir, seeds, cfg, checkpoint=store, target_slug=target)
        moved, report = op.value
        labelled = translora._jsonl_parse(store.load("label"))[2]
        row = {"n": len(test), "from": {}}
        for key, setting, adapter_, which in (("source", f"{source} + LoRA", adapter, "src"),
                                              ("target_base", target, None, "tgt"),
                                              ("unchanged", f"{target} + LoRA", adapter, "tgt")):
            score = L.lane_score(root, skill, setting, len(test))
            row["from"][key] = "scores.json" if score is not None else "measured"
            if score is None:
                if which == "src":
                    src_scorer = src_scorer or L.Scorer(src_dir)
                    score = src_scorer.accuracy(adapter_, test)
                else:
                    tgt_scorer = tgt_scorer or L.Scorer(tgt_dir)
                    score = tgt_scorer.accuracy(adapter_, test)
            row[key] = score
        tgt_scorer = tgt_scorer or L.Scorer(tgt_dir)
        row["translora"] = tgt_scorer.accuracy(moved, test)
        row["fraction_of_source"] = L.ratio(row["translora"], row["source"])
        row["unchanged_fraction"] = L.ratio(row["unchanged"], row["source"])
        row["counts"] = report["counts"]
        row["by_generator"] = report["generate"].get("by_generator")
        row["filter_rate"] = report["filter_rate"]
        row["kept_share"] = L.ratio(report["counts"]["kept"], report["counts"]["generated"])
        row["labels"] = label_precision(skill, labelled)
        row["distill"] = {k: report["distill"].get(k) for k in ("steps_run", "best_step", "best_seed_accuracy", "best_seed_loss")}
        row["seed_metrics"] = report["metrics"]
        row["stage_seconds"] = report["seconds"]
        row["op_seconds"], row["peak_rss_mb"] = op.seconds, op.peak_rss_mb
        log(f"{skill}: Trans-LoRA {row['translora']:.3f} of source {row['source']:.3f} "
            f"(unchanged LoRA {row['unchanged']:.3f}), kept {row['counts']['kept']}/{row['counts']['generated']}, "
            f"label precision {L.fmt(row['labels']['precision'], 2)}, {op.seconds:.0f} s")
        result["skills"][skill] = row
    return result


def table(result: dict) -> str:
    lines = ["| skill | source (1.0 + LoRA) | 1.1 base | 1.1 + unchanged LoRA | 1.1 + Trans-LoRA | kept by filter "
             "| label precision (decidable) | distill steps (best) | s |", "|---|---|---|---|---|---|---|---|---|"]
    for skill, r in result["skills"].items():
        c, lab, dis = r["counts"], r["labels"], r["distill"]
        lines.append(f"| {skill} | {r['source']:.3f} | {r['target_base']:.3f} | {r['unchanged']:.3f} "
                     f"({L.fmt(r['unchanged_fraction'], 2)}) | **{r['translora']:.3f} "
                     f"({L.fmt(r['fraction_of_source'], 2)})** | {c['kept']}/{c['generated']} "
                     f"| {L.fmt(lab['precision'], 2)} ({L.fmt(lab['decidable'], 2)}) "
                     f"| {dis['steps_run']} ({dis['best_step']}) | {r['op_seconds']:.0f} |")
    lines.append("\nCells: exact match on the test split (fraction of the source's).")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    L.add_common_args(ap)
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help=f"a TransLoraConfig field (a JSON value or a bare word); defaults here: {CPU_CONFIG}")
    args = ap.parse_args(argv)
    overrides = config_overrides(args.set)
    root = L.lane_dir(args.lane)
    skills = args.skills or L.skills_of(root)
    def measure(log):
        return run(root, skills, limit=L.limit_of(args), config={"threads": args.threads, **overrides}, log=log)

    return L.report(args, measure, table)


if __name__ == "__main__":
    sys.exit(main())
