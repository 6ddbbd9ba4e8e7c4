"""Stage (b): the discriminator that keeps synthetic inputs resembling the seeds (a
likelihood band on the source base, or the paper's trained LoRA classifier)."""

from __future__ import annotations

import dataclasses
import math
import random
from collections import Counter
from collections.abc import Callable, Sequence

import torch

from ..evaluate import (
    load_model,
    load_tokenizer,
)
from .common import _model_dir, template_of
from .config import Progress, TransLoraConfig
from .synthetic import _char_class, generate_candidates

# --- (b) discriminator --------------------------------------------------------------------------


def _lora(model, r: int, alpha: int, targets: Sequence[str], seed: int):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(targets), bias="none",
                     task_type="CAUSAL_LM")
    return get_peft_model(model, cfg)


def _linear_names(model) -> list[str]:
    names = {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    names.discard("lm_head")
    return sorted(names)


def _schedule(opt, steps: int, warmup: int):
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / max(1, warmup)) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))


def _class_tokens(tok) -> tuple[int, int]:
    """Token ids the discriminator answers with: "1" real, "0" synthetic."""
    return tok("1", add_special_tokens=False)["input_ids"][-1], tok("0", add_special_tokens=False)["input_ids"][-1]


def _disc_batch(tok, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    seqs = [tok(t)["input_ids"] + [tok.eos_token_id] for t in texts]
    width = max(map(len, seqs))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    att = torch.zeros_like(ids)
    for i, s in enumerate(seqs):  # right padding; the answer is read at each row's last token
        ids[i, :len(s)] = torch.tensor(s)
        att[i, :len(s)] = 1
    return ids, att, torch.tensor([len(s) - 1 for s in seqs])


def _disc_logits(model, tok, texts: Sequence[str]) -> torch.Tensor:
    """Two logits per text: (real, synthetic)."""
    ids, att, last = _disc_batch(tok, texts)
    logits = model(input_ids=ids, attention_mask=att).logits
    real, fake = _class_tokens(tok)
    rows = logits[torch.arange(len(texts)), last]
    return torch.stack([rows[:, real], rows[:, fake]], dim=1)


def _noise_texts(prompts: Sequence[str], n: int, rng: random.Random, tok=None) -> list[str]:
    """Easy negatives, in turn: random strings over the seeds' characters, random strings over
    every single-character token of the tokenizer, and seeds with their characters shuffled."""
    chars = sorted(set("".join(prompts)))
    wide = chars
    if tok is not None:
        vocab = [t for t in tok.get_vocab() if len(t) == 1 and t.isprintable()]
        wide = sorted(set(vocab) | set(chars))
    lo, hi = min(map(len, prompts)), max(map(len, prompts))
    out = []
    for i in range(n):
        if i % 3 == 0:
            out.append("".join(rng.choice(chars) for _ in range(rng.randint(lo, hi))))
        elif i % 3 == 1:
            out.append("".join(rng.choice(wide) for _ in range(rng.randint(lo, hi))))
        else:
            p = list(rng.choice(prompts))
            rng.shuffle(p)
            out.append("".join(p))
    return out


def train_discriminator(source_base_dir, real: Sequence[str], fake: Sequence[str], cfg: TransLoraConfig, *,
                        seed: int):
    """A LoRA on the source base that answers "1" after real inputs and "0" after synthetic ones
    (a two-way cross-entropy on those two logits at the last token, balanced batches).
    Returns (model, tok, final training loss)."""
    source_base_dir = _model_dir(source_base_dir)
    tok = load_tokenizer(source_base_dir)
    base = load_model(source_base_dir)
    model = _lora(base, cfg.disc_rank, 2 * cfg.disc_rank, _linear_names(base), seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.disc_lr)
    sched = _schedule(opt, cfg.disc_steps, cfg.warmup)
    rng = random.Random(seed)
    half = max(1, cfg.batch_size // 2)
    model.train()
    loss = torch.tensor(0.0)
    for _ in range(cfg.disc_steps):
        texts = [rng.choice(real) for _ in range(half)] + [rng.choice(fake) for _ in range(half)]
        target = torch.tensor([0] * half + [1] * half)
        loss = torch.nn.functional.cross_entropy(_disc_logits(model, tok, texts), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
    model.eval()
    return model, tok, loss.item()


@torch.inference_mode()
def discriminator_scores(model, tok, texts: Sequence[str], batch_size: int = 64) -> list[float]:
    """P(real) of each text under a trained discriminator."""
    out: list[float] = []
    for start in range(0, len(texts), batch_size):
        probs = torch.softmax(_disc_logits(model, tok, texts[start:start + batch_size]).float(), dim=1)
        out += [round(float(p), 6) for p in probs[:, 0]]
    return out


@torch.inference_mode()
def likelihood_scores(model, tok, texts: Sequence[str], batch_size: int = 64) -> list[float]:
    """Minus the mean cross-entropy per token of each text (after <s>) under a causal LM:
    higher is more like what the model expects."""
    out: list[float] = []
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    for start in range(0, len(texts), batch_size):
        seqs = [tok(t)["input_ids"] for t in texts[start:start + batch_size]]
        width = max(map(len, seqs))
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        att = torch.zeros_like(ids)
        for i, q in enumerate(seqs):
            ids[i, :len(q)] = torch.tensor(q)
            att[i, :len(q)] = 1
        logits = model(input_ids=ids, attention_mask=att).logits.float()
        lab = ids[:, 1:].masked_fill(att[:, 1:] == 0, -100)
        ce = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), lab, ignore_index=-100,
                                               reduction="none").sum(1)
        n = (lab != -100).sum(1).clamp(min=1)
        out += [round(-float(x), 6) for x in ce / n]
    return out


def _shape_check(seed_prompts: Sequence[str]) -> Callable[[str], bool]:
    """True for a prompt shaped like the seeds: their template, a middle as long as
    theirs (min..max) and made of character classes (lower, upper, digit) or
    punctuation their middles use."""
    prefix, suffix = template_of(seed_prompts)
    middles = [p[len(prefix):len(p) - len(suffix)] for p in seed_prompts]
    classes = {_char_class(c) for m in middles for c in m}
    lo, hi = min(map(len, middles)), max(map(len, middles))

    def ok(p: str) -> bool:
        if not (p.startswith(prefix) and p.endswith(suffix) and len(p) >= len(prefix) + len(suffix)):
            return False
        middle = p[len(prefix):len(p) - len(suffix)]
        return lo <= len(middle) <= hi and all(_char_class(c) in classes for c in middle)

    return ok


def _keep_calibrated(rows: list[dict], scores: list[float], cal: list[float], cfg: TransLoraConfig,
                     floor: int, two_sided: bool = False) -> tuple[list[dict], list[float], bool]:
    """Keep rows scoring at least the disc_quantile quantile of the held-out seeds' scores
    (`two_sided`: also at most the 1 - disc_quantile quantile; the band is widened by
    disc_slack times the seeds' spread). If fewer than `floor` pass, the `floor` rows
    nearest the band are kept (an over-strict filter must not starve distillation)."""
    cal = sorted(cal)
    if not cal:
        band = [0.5, math.inf]
    else:
        k = min(len(cal) - 1, int(cfg.disc_quantile * len(cal)))
        lo, hi = cal[k], cal[len(cal) - 1 - k]
        if two_sided:
            slack = cfg.disc_slack * (cal[-1] - cal[0])
            band = [round(lo - slack, 6), round(hi + slack, 6)]
        else:
            band = [lo, math.inf]

    def distance(s: float) -> float:
        return max(0.0, band[0] - s, s - band[1])

    kept = [dict(r, disc_score=s) for r, s in zip(rows, scores, strict=True) if distance(s) == 0.0]
    fallback = False
    floor = min(len(rows), floor)
    if len(kept) < floor:
        best = sorted(range(len(rows)), key=lambda i: (distance(scores[i]), -scores[i], i))[:floor]
        kept = [dict(rows[i], disc_score=scores[i]) for i in sorted(best)]
        fallback = True
    return kept, band, fallback


def filter_candidates(source_base_dir, target_base_dir, seeds: Sequence[dict], rows: list[dict],
                      cfg: TransLoraConfig, *, seed: int, progress: Progress = None) -> tuple[list[dict], dict]:
    """(b) Keep the candidates the discriminator finds as real as held-out seeds.

    `discriminator="likelihood"` (default): the score is minus the mean
    per-token loss of the input under the source base (the base the teacher
    adapter was trained on; the adapter itself is left out, its loss never
    covered prompts and it blurs their likelihood). Nothing is trained, so
    every seed is held out and calibrates a band: real inputs of one task
    score alike (caesar seeds within 0.1 nats), random strings score lower
    and degenerate ones ("aaaa") higher, so both ends are cut.

    `discriminator="lora"` (the paper's classifier): half the seeds (and a fresh draw of the same generator, plus random-string
    negatives) train the discriminator; the other half calibrates it: the
    threshold is the `disc_quantile` quantile of their scores, so "real-like"
    means "scores like real inputs the discriminator never saw"."""
    if not cfg.filter:
        return [dict(r) for r in rows], {"enabled": False, "kept": len(rows), "filter_rate": 0.0}
    if not rows:
        return [], {"enabled": True, "kept": 0, "filter_rate": 0.0}
    prompts = [s["prompt"] for s in seeds]
    floor = max(8, len(seeds))
    if cfg.discriminator == "likelihood":
        if progress:
            progress(0.0, f"scoring {len(rows)} inputs and {len(prompts)} seeds")
        model, tok = load_model(source_base_dir), load_tokenizer(source_base_dir)
        scores = likelihood_scores(model, tok, [r["prompt"] for r in rows])
        cal = likelihood_scores(model, tok, prompts)
        del model
        # Outside the seeds' shape the likelihood is no evidence: such a row gets a score below any band.
        shape = _shape_check(prompts)
        bad_shape = [not shape(r["prompt"]) for r in rows]
        floor_score = min(scores + cal) - 1e6
        scores = [floor_score if b else x for x, b in zip(scores, bad_shape, strict=True)]
        kept, threshold, fallback = _keep_calibrated(rows, scores, cal, cfg, floor, two_sided=True)
        return kept, {
            "enabled": True, "discriminator": "likelihood", "kept": len(kept), "off_shape": sum(bad_shape),
            "filter_rate": round(1 - len(kept) / len(rows), 4), "threshold": threshold,
            "calibration_scores": sorted(cal), "mean_score": round(sum(scores) / len(scores), 5),
            "fallback_top_k": fallback,
            "kept_by_generator": dict(sorted(Counter(r["generator"] for r in kept).items())),
        }
    rng = random.Random(seed)
    order = list(range(len(prompts)))
    rng.shuffle(order)
    # Two folds: each discriminator trains on half the seeds and scores the other half, so every
    # seed gets an out-of-fold score; candidates get the mean of both discriminators.
    folds = [[prompts[i] for i in order[k::2]] for k in range(2)] if len(prompts) >= 4 else [prompts]
    if progress:
        progress(0.0, "drawing negatives")
    # Negatives: a fresh draw of the generator that wrote the candidates (the paper trains on
    # the source model's own synthetic inputs); an LM that yielded nothing usable is not asked again.
    neg_cfg = cfg
    if {r["generator"] for r in rows} == {"mutation"}:
        neg_cfg = dataclasses.replace(cfg, generator="mutation")
    negatives, _ = generate_candidates(source_base_dir, target_base_dir, seeds, neg_cfg, seed=seed + 7919,
                                       n=max(32, len(rows) // 2))
    tok = load_tokenizer(source_base_dir)
    fake = [r["prompt"] for r in negatives] + _noise_texts(prompts, max(16, len(negatives) // 2), rng, tok)
    texts = [r["prompt"] for r in rows]
    scores = [0.0] * len(rows)
    cal: list[float] = []
    losses = []
    for k, fold in enumerate(folds):
        if progress:
            progress(0.1 + 0.8 * k / len(folds), f"discriminator {k + 1}/{len(folds)}: {len(fold)} seeds vs "
                                                 f"{len(fake)} synthetic")
        model, dtok, loss = train_discriminator(source_base_dir, fold, fake, cfg, seed=seed + k)
        losses.append(round(loss, 5))
        scores = [a + b / len(folds) for a, b in zip(scores, discriminator_scores(model, dtok, texts), strict=True)]
        if len(folds) > 1:
            cal += discriminator_scores(model, dtok, folds[1 - k])
        del model
    scores = [round(x, 6) for x in scores]
    kept, threshold, fallback = _keep_calibrated(rows, scores, cal, cfg, floor)
    cal = sorted(cal)
    info = {
        "enabled": True, "discriminator": "lora", "kept": len(kept), "filter_rate": round(1 - len(kept) / len(rows), 4),
        "threshold": threshold[0], "train_loss": losses, "folds": len(folds), "train_fake": len(fake),
        "calibration_scores": cal, "mean_score": round(sum(scores) / len(scores), 5), "fallback_top_k": fallback,
        "kept_by_generator": dict(sorted(Counter(r["generator"] for r in kept).items())),
    }
    return kept, info
