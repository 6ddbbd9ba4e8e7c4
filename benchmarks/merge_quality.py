"""Does a merged adapter keep each skill? Accuracy of every merge method on the
zoo's skill adapters (all trained on tiny-llama-3.0), next to each single adapter.

    .venv/bin/python benchmarks/merge_quality.py [--zoo DIR] [--skills caesar reverse]
        [--methods cat svd ties ...] [--weight 1.0] [--density 0.5] [--limit N] [--search BUDGET]
        [--search-objective mean-loss|worst-loss] [--distill STEPS]

Rows: the base alone, each skill's own adapter, then one merge of all chosen
skills' adapters per method (same weight for each, default 1.0: every skill's
full update). Cells: exact match on the skill's test split (teacher-forced
completion loss in parentheses). With --search, one more row: `linear` with
weights from merge.search_weights, scored on the skills' seed examples only
(minus the mean completion loss, LoraHub's objective, or with
--search-objective worst-loss minus the worst skill's), as a LoraHub worker would.
With --distill, one more row: one student distilled from every adapter on its
own skill from the seeds (adapters_ops.compose; 0 steps: its default).

With --train-low-interference, the zoo's adapters are replaced by fresh ones
trained here on tiny-llama-3.0 from each skill's train split, with settings
meant to change the base less off-task (fewer target modules, a smaller rank,
an L2 penalty on the update, a KL-to-base "replay" term, early stopping on a
held-out slice of the train split); see `LowInterference`. They are cached
under --cache, keyed by the zoo and the settings, so reruns only merge and score.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adapters_ops import _zoo_data, merge, zoo  # noqa: E402
from adapters_ops._zoo_train import deterministic  # noqa: E402
from adapters_ops.adapter import Adapter  # noqa: E402
from adapters_ops.evaluate import (  # noqa: E402
    completion_loss,
    evaluate_model,
    greedy_completions,
    load_model,
    load_tokenizer,
    read_examples,
    sft_batch,
)

DEFAULT_METHODS = ["cat", "svd", "ties", "ties_svd", "dare_linear", "dare_ties", "magnitude_prune"]
BASE_SLUG = "tiny-llama-3.0"
TRAINER_VERSION = 2  # part of the cache key: bump when train_low_interference changes what it trains


# --- low-interference skill adapters ------------------------------------------------------


@dataclass(frozen=True)
class LowInterference:
    """How the fresh skill adapters are trained. Every field enters the cache key.

    The loss per step is the skill's completion cross-entropy on a batch of its
    train split, plus `kl` x KL(base || adapted) over every position of a batch
    of replay sequences, plus `l2` x sum over modules of ||scaling B A||_F^2.
    Replay sequences keep the adapted model's next-token distributions at the
    base's off-task: `text` are documents of the base's own pretraining mix
    (fresh draws, another data seed); `skills` are the *other* zoo skills'
    train prompts, each followed by the base's own greedy continuation (never
    the other skill's reference answer), or with `continuation="reference"`
    by the other skill's reference answer, used as input only: the targets are
    still the base's own next-token distributions, so the adapter learns to
    leave those positions alone, not the other skill. The learning rate warms
    up over 20 steps and decays (cosine) towards `max_steps`.
    """

    # Defaults: the settings of docs/merge.md's tables. Attention-only or q/v-only
    # rank-4 adapters did not learn date or reverse in a few hundred steps.
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    rank: int = 8
    alpha: int = 16
    lr: float = 1e-2
    max_steps: int = 500
    batch_size: int = 16
    l2: float = 1e-3
    kl: float = 3.0
    replay: str = "both"  # none | text | skills | both
    replay_size: int = 256  # sequences per replay source (text; each other skill)
    continuation: str = "base"  # base | reference: what follows another skill's prompt in replay
    stop_accuracy: float = 0.98
    check_every: int = 25
    val_size: int = 64  # held out from the end of the train split for early stopping
    seed: int = 0

    def key(self, zoo_root: Path) -> str:
        blob = json.dumps({"zoo": zoo_root.name, "trainer": TRAINER_VERSION, **dataclasses.asdict(self)},
                          sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _replay_examples(root: Path, skill: str, settings: LowInterference, base_model, tok) -> list[dict]:
    """Off-task sequences as {"prompt", "completion"} pairs (only used as inputs:
    the KL term scores every position against the base)."""
    items: list[dict] = []
    if settings.replay in ("text", "both"):
        # Same generator mix and lexicon as the base's pretraining, another data seed.
        docs = _zoo_data.corpus(dict(zoo.MIX_30), settings.replay_size, seed=1000 + settings.seed, lexicon_seed=1)
        items += [{"prompt": d, "completion": ""} for d in docs]
    if settings.replay in ("skills", "both"):
        others = [s["name"] for s in zoo.manifest(root)["skills"] if s["name"] != skill]
        for other in others:
            examples = read_examples(root / "tasks" / other / "train.jsonl")[: settings.replay_size]
            if settings.continuation == "reference":
                items += examples
                continue
            prompts = [ex["prompt"] for ex in examples]
            outs = greedy_completions(base_model, tok, prompts, max_new_tokens=16)
            items += [{"prompt": p, "completion": o} for p, o in zip(prompts, outs, strict=True)]
    return items


def _update_sq_norm(peft_model, scaling: float) -> torch.Tensor:
    """sum over LoRA modules of ||scaling * B @ A||_F^2 (differentiable)."""
    total = torch.zeros(())
    for module in peft_model.modules():
        if hasattr(module, "lora_A") and "default" in getattr(module, "lora_A", {}):
            delta = module.lora_B["default"].weight @ module.lora_A["default"].weight
            total = total + (scaling * delta).pow(2).sum()
    return total


def _kl_to_base(logits: torch.Tensor, base_logits: torch.Tensor, att: torch.Tensor) -> torch.Tensor:
    """Mean over attended positions of KL(base || adapted) of the next-token distributions."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    base_logp = torch.log_softmax(base_logits.float(), dim=-1)
    per_pos = (base_logp.exp() * (base_logp - logp)).sum(-1)
    mask = att.float()
    return (per_pos * mask).sum() / mask.sum()


def train_low_interference(root: Path, skill: str, settings: LowInterference) -> tuple[Adapter, dict]:
    """A fresh LoRA for `skill` on tiny-llama-3.0 (real `peft`), trained as `settings` says."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base_dir = root / "bases" / BASE_SLUG
    tok = load_tokenizer(base_dir)
    train_items = read_examples(root / "tasks" / skill / "train.jsonl")
    train_items, val_items = train_items[: -settings.val_size], train_items[-settings.val_size:]
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    model.eval()
    replay = _replay_examples(root, skill, settings, model, tok) if settings.replay != "none" else []

    torch.manual_seed(settings.seed)
    cfg = LoraConfig(r=settings.rank, lora_alpha=settings.alpha, lora_dropout=0.0,
                     target_modules=list(settings.targets), bias="none", task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, cfg)
    scaling = settings.alpha / settings.rank
    params = [p for p in peft_model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / settings.max_steps)))
    rng = random.Random(settings.seed)
    t0 = time.perf_counter()
    history = []
    steps_done, val_acc = 0, 0.0
    for step in range(settings.max_steps):
        peft_model.train()
        batch = [train_items[rng.randrange(len(train_items))] for _ in range(settings.batch_size)]
        ids, att, lab = sft_batch(tok, batch)
        task_loss = peft_model(input_ids=ids, attention_mask=att, labels=lab).loss
        loss = task_loss
        kl = torch.zeros(())
        if replay and settings.kl > 0:
            rb = [replay[rng.randrange(len(replay))] for _ in range(settings.batch_size)]
            r_ids, r_att, _ = sft_batch(tok, rb)
            with torch.no_grad(), peft_model.disable_adapter():
                base_logits = peft_model(input_ids=r_ids, attention_mask=r_att).logits
            kl = _kl_to_base(peft_model(input_ids=r_ids, attention_mask=r_att).logits, base_logits, r_att)
            loss = loss + settings.kl * kl
        if settings.l2 > 0:
            loss = loss + settings.l2 * _update_sq_norm(peft_model, scaling)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        steps_done = step + 1
        if steps_done % settings.check_every == 0 or steps_done == settings.max_steps:
            peft_model.eval()
            val_acc = evaluate_model(peft_model, tok, val_items, batch_size=len(val_items)).accuracy
            history.append({"step": steps_done, "task_loss": round(task_loss.item(), 4),
                            "kl": round(kl.item(), 4), "val_accuracy": val_acc})
            print(f"#   {skill} step {steps_done}: task loss {task_loss.item():.3f}, kl {kl.item():.4f}, "
                  f"val acc {val_acc:.2f}", file=sys.stderr, flush=True)
            if val_acc >= settings.stop_accuracy:
                break
    peft_model.eval()
    with tempfile.TemporaryDirectory(prefix="lowi-") as tmp:
        peft_model.save_pretrained(tmp)
        conf_path = Path(tmp) / "adapter_config.json"
        conf = json.loads(conf_path.read_text())
        conf["base_model_name_or_path"] = BASE_SLUG  # merge refuses adapters of different bases
        conf_path.write_text(json.dumps(conf, indent=2))
        adapter = Adapter.load(tmp)
    norm = math.sqrt(float(_update_sq_norm(peft_model, scaling)))
    info = {"skill": skill, "steps": steps_done, "val_accuracy": val_acc, "update_norm": round(norm, 3),
            "train_s": round(time.perf_counter() - t0, 1), "replay_sequences": len(replay), "history": history}
    return adapter, info


def low_interference_adapters(root: Path, skills: list[str], settings: LowInterference,
                              cache: Path) -> tuple[list[Adapter], list[dict]]:
    """The trained adapters for `skills`, from the cache when this zoo and these settings were trained before."""
    folder = cache / settings.key(root)
    adapters, infos = [], []
    for skill in skills:
        out = folder / skill
        if not (out / "train_info.json").is_file():
            with deterministic(1):  # one thread: the machine is shared, and the result does not depend on it
                adapter, info = train_low_interference(root, skill, settings)
            tmp = folder / f".{skill}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            adapter.save(tmp)
            (tmp / "train_info.json").write_text(json.dumps({"settings": dataclasses.asdict(settings), **info},
                                                            indent=2))
            shutil.rmtree(out, ignore_errors=True)
            tmp.rename(out)
        adapters.append(Adapter.load(out))
        infos.append(json.loads((out / "train_info.json").read_text()))
    return adapters, infos


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--zoo", type=Path, default=None, help="zoo folder (default: the cached zoo)")
    ap.add_argument("--skills", nargs="+", default=None, help="skills to merge (default: the first three)")
    ap.add_argument("--methods", nargs="+", default=DEFAULT_METHODS, choices=list(merge.METHODS))
    ap.add_argument("--weight", type=float, default=1.0, help="weight of every adapter in the merge")
    ap.add_argument("--density", type=float, default=0.5, help="for ties / dare / magnitude_prune")
    ap.add_argument("--rank", type=int, default=None, help="output rank (default: each method's default)")
    ap.add_argument("--limit", type=int, default=None, help="score only the first N test examples")
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--search", type=int, default=0, metavar="BUDGET", help="also search weights (0: off)")
    ap.add_argument("--search-objective", choices=["mean-loss", "worst-loss"], default="mean-loss",
                    help="seed score the search maximises: minus the mean, or minus the worst, skill's loss")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--distill", type=int, default=None, metavar="STEPS",
                    help="also compose by distillation (adapters_ops.compose) with this many steps (0: its default, "
                         "1000 per skill)")
    li = ap.add_argument_group("low-interference adapters (trained here instead of the zoo's)")
    li.add_argument("--train-low-interference", action="store_true")
    d = LowInterference()
    li.add_argument("--li-targets", nargs="+", default=list(d.targets), help="LoRA target modules")
    li.add_argument("--li-rank", type=int, default=d.rank)
    li.add_argument("--li-alpha", type=int, default=d.alpha)
    li.add_argument("--li-lr", type=float, default=d.lr)
    li.add_argument("--li-steps", type=int, default=d.max_steps, help="at most this many steps")
    li.add_argument("--li-l2", type=float, default=d.l2, help="weight of ||scaling B A||^2 summed over modules")
    li.add_argument("--li-kl", type=float, default=d.kl, help="weight of the KL-to-base replay term")
    li.add_argument("--li-replay", choices=["none", "text", "skills", "both"], default=d.replay)
    li.add_argument("--li-continuation", choices=["base", "reference"], default=d.continuation,
                    help="what follows another skill's prompt in replay (input only; targets stay the base's)")
    li.add_argument("--li-stop", type=float, default=d.stop_accuracy, help="stop at this held-out accuracy")
    li.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "adapter-hub-merge-quality",
                    help="where trained adapters are kept, keyed by zoo and settings")
    args = ap.parse_args(argv)
    torch.set_num_threads(2)

    root = args.zoo or zoo.ensure_built()
    man = zoo.manifest(root)
    skills = args.skills or [s["name"] for s in man["skills"]][:3]
    base = root / "bases" / "tiny-llama-3.0"
    tok = load_tokenizer(base)
    tests = {s: read_examples(root / "tasks" / s / "test.jsonl")[: args.limit] for s in skills}
    seeds = {s: read_examples(root / "tasks" / s / "seed.jsonl") for s in skills}
    train_infos: list[dict] = []
    if args.train_low_interference:
        settings = LowInterference(
            targets=tuple(args.li_targets), rank=args.li_rank, alpha=args.li_alpha, lr=args.li_lr,
            max_steps=args.li_steps, l2=args.li_l2, kl=args.li_kl, replay=args.li_replay,
            continuation=args.li_continuation, stop_accuracy=args.li_stop, seed=args.seed)
        adapters, train_infos = low_interference_adapters(root, skills, settings, args.cache)
        torch.set_num_threads(2)
    else:
        adapters = [Adapter.load(root / "adapters" / s) for s in skills]
    weights = [args.weight] * len(adapters)

    rows: list[tuple[str, dict[str, str], str]] = []
    t0 = time.perf_counter()

    def score_row(label: str, adapter: Adapter | None, note: str = "") -> None:
        model = load_model(base, adapter)
        cells = {}
        for s in skills:
            r = evaluate_model(model, tok, tests[s], batch_size=args.batch_size)
            cells[s] = f"{r.accuracy:.2f} ({r.loss:.2f})"
        rows.append((label, cells, note))
        print(f"# {label}: {cells} {note}", file=sys.stderr, flush=True)

    score_row("base alone", None)
    for s, a in zip(skills, adapters, strict=True):
        score_row(f"{s} adapter only", a)
    for method in args.methods:
        density = args.density if merge.METHODS[method].needs_density else None
        rank = args.rank if method != "cat" else None
        m0 = time.perf_counter()
        merged, report = merge.merge_with_report(adapters, weights, method=method, density=density, rank=rank,
                                                 seed=args.seed)
        note = (f"rank {merged.config['r']}, energy kept {report.mean_energy:.2f}, "
                f"merge {time.perf_counter() - m0:.2f}s")
        score_row(f"merge: {method}", merged, note)

    if args.search:
        def seed_score(candidate: Adapter) -> float:
            model = load_model(base, candidate)
            losses = [completion_loss(model, tok, seeds[s]) for s in skills]
            return -(max(losses) if args.search_objective == "worst-loss" else sum(losses) / len(losses))

        found = merge.search_weights(adapters, seed_score, "linear", budget=args.search, seed=args.seed)
        merged = merge.merge(adapters, found.weights, method="linear")
        score_row("merge: linear, searched weights", merged,
                  f"weights {[round(w, 2) for w in found.weights]} after {len(found.history)} evaluations")

    if args.distill is not None:
        from adapters_ops import compose

        d0 = time.perf_counter()
        student, rep = compose.distill_merge(base, adapters, [seeds[s] for s in skills],
                                             compose.ComposeConfig(steps=args.distill or None, seed=args.seed))
        info = rep["distill"]
        score_row("distill (compose)", student,
                  f"rank {info['rank']}, {info['steps_run']} steps, kept step {info['best_step']}, "
                  f"{sum(x['examples'] for x in rep['skills'])} synthetic examples, "
                  f"{time.perf_counter() - d0:.0f}s")

    print(f"Merging {', '.join(skills)} (weight {args.weight} each, density {args.density} where used); "
          f"exact match on the test split (completion loss); {time.perf_counter() - t0:.0f}s")
    if train_infos:
        print(f"Adapters trained here: {json.dumps(train_infos[0]['settings'])}")
        print()
        print("| skill | steps | held-out accuracy | update norm | train s | replay sequences |")
        print("|---|---:|---:|---:|---:|---:|")
        for info in train_infos:
            print(f"| {info['skill']} | {info['steps']} | {info['val_accuracy']:.2f} | {info['update_norm']} "
                  f"| {info['train_s']} | {info['replay_sequences']} |")
    print()
    print("| adapter | " + " | ".join(skills) + " | notes |")
    print("|---|" + "---:|" * len(skills) + "---|")
    for label, cells, note in rows:
        print(f"| {label} | " + " | ".join(cells[s] for s in skills) + f" | {note} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
