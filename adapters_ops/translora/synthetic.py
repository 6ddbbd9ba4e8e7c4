"""Stage (a): synthetic task inputs, written by an LM prompted few-shot with the seeds, or
mutated from the seed prompts with their own character statistics."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import torch

from ..evaluate import (
    load_model,
    load_tokenizer,
)
from .common import _length_limits, _max_positions, _sanitise, template_of
from .config import Progress, TransLoraConfig

# --- (a) synthetic inputs --------------------------------------------------------------------------


def _char_class(c: str) -> str:
    if c.isdigit():
        return "digit"
    if c.islower():
        return "lower"
    if c.isupper():
        return "upper"
    return c  # punctuation and spaces are structure: kept as they are


_CLASS_ALPHABETS = {"lower": "abcdefghijklmnopqrstuvwxyz", "upper": "ABCDEFGHIJKLMNOPQRSTUVWXYZ",
                    "digit": "0123456789"}


def _class_pools(middles: Sequence[str], closure: bool) -> dict[str, list[str]]:
    """Characters per class in the seeds' middles; with `closure`, a class the seeds
    already half cover is completed to its whole ASCII alphabet (16 caesar seeds hold
    24 of the 26 letters: without this no synthetic input would ever contain the other two)."""
    pools: dict[str, list[str]] = {}
    for m in middles:
        for c in m:
            pools.setdefault(_char_class(c), []).append(c)
    if closure:
        for cls, alphabet in _CLASS_ALPHABETS.items():
            have = set(pools.get(cls, ()))
            if len(have & set(alphabet)) * 2 >= len(alphabet):
                pools[cls] = sorted(set(alphabet) | have)
    return pools


def mutation_prompts(seed_prompts: Sequence[str], n: int, *, rate: float = 0.5, indel: int = 1,
                     seed: int = 0, closure: bool = False, in_range: bool = False) -> list[str]:
    """n prompts made by perturbing seed prompts with the seeds' own character statistics.

    The template (the prefix and suffix every seed shares) is kept; in the
    variable middle each character is, with probability `rate`, replaced by one
    drawn from the seeds' middles with the same class (letter case, digit), and
    up to `indel` characters of a class the middle already has are inserted or
    deleted. The char-level tiny bases write poor task inputs when prompted
    few-shot; this fallback needs no model at all.
    """
    prefix, suffix = template_of(seed_prompts)
    middles = [p[len(prefix):len(p) - len(suffix)] for p in seed_prompts]
    pools = _class_pools(middles, closure)
    shortest, longest = min(map(len, middles)), max(map(len, middles))
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        chars = list(rng.choice(middles))
        chars = [rng.choice(pools[_char_class(c)]) if rng.random() < rate and _char_class(c) in pools else c
                 for c in chars]
        k = rng.randint(-indel, indel) if indel else 0
        if in_range:  # the teacher only knows the seeds' lengths: 5-letter caesar words stay 5 letters
            k = max(shortest - len(chars), min(longest - len(chars), k))
        for _ in range(abs(k)):
            alnum = [i for i, c in enumerate(chars) if c.isalnum()]
            if not alnum:
                break
            i = rng.choice(alnum)
            if k > 0:  # a character of the same class beside a random one: "1987" -> "19587"
                chars.insert(i + rng.randint(0, 1), rng.choice(pools[_char_class(chars[i])]))
            elif len(alnum) > 1:
                del chars[i]
        out.append(prefix + "".join(chars) + suffix)
    return out


def sampled_prompt(row: Sequence[int], tok, prefix: str, suffix: str) -> str:
    """One sampled continuation of `prefix` as a prompt: cut at the eos token and at the
    template's suffix; "\0" appended when the suffix never came (unterminated)."""
    eos = tok.eos_token_id
    stopped = eos is not None and eos in row
    if stopped:
        row = row[:row.index(eos)]
    text = prefix + tok.decode(row, skip_special_tokens=True)
    eos_text = tok.convert_ids_to_tokens(eos) if stopped else None
    k = suffix.find(eos_text) if isinstance(eos_text, str) and eos_text else -1
    if k >= 0 and text.endswith(suffix[:k]):
        # a chat template's user turn ends with the eos token itself (".<|im_end|>\n<|im_start|>
        # assistant\n"): the model that closed its turn has written the suffix up to that token
        text += suffix[k:]
    if suffix:
        cut = text.find(suffix, len(prefix))
        text = text[:cut + len(suffix)] if cut >= 0 else text + "\0"  # \0: no suffix, unterminated
    return text


def _lm_prompts(model, tok, seed_prompts: Sequence[str], prefix: str, suffix: str, n: int, cfg: TransLoraConfig,
                limits: tuple[int, int], seed: int, progress: Progress = None) -> list[str]:
    """Sample n task inputs from a causal LM given `shots` seed prompts as separate
    documents (<s> p </s> each) and the template prefix; cut at the suffix."""
    rng = random.Random(seed)
    bos = tok.bos_token_id
    eos = tok.eos_token_id
    pad = tok.pad_token_id if tok.pad_token_id is not None else eos
    docs = [tok(p)["input_ids"] + [eos] for p in seed_prompts]
    head = tok(prefix)["input_ids"] if prefix else ([bos] if bos is not None else [])
    # Room for the longest allowed prompt (one token per character is the worst case).
    max_new = max(1, limits[1] - len(prefix) + 1)
    budget = _max_positions(model) - max_new - len(head)
    contexts = []
    for _ in range(n):
        order = rng.sample(range(len(docs)), min(cfg.shots, len(docs)))
        ctx: list[int] = []
        for i in order:
            if len(ctx) + len(docs[i]) > budget:
                break
            ctx += docs[i]
        contexts.append(ctx + head)
    torch.manual_seed(seed)
    out: list[str] = []
    batch = 64
    for start in range(0, n, batch):
        chunk = contexts[start:start + batch]
        width = max(map(len, chunk))
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        att = torch.zeros_like(ids)
        for i, c in enumerate(chunk):  # left padding: every row continues from its last token
            ids[i, width - len(c):] = torch.tensor(c)
            att[i, width - len(c):] = 1
        with torch.inference_mode():
            gen = model.generate(input_ids=ids, attention_mask=att, do_sample=True, temperature=cfg.temperature,
                                 top_p=cfg.top_p, top_k=0, max_new_tokens=max_new, eos_token_id=eos,
                                 pad_token_id=pad)
        out += [sampled_prompt(row, tok, prefix, suffix) for row in gen[:, width:].tolist()]
        if progress:
            progress(min(1.0, (start + batch) / n), f"sampled {min(n, start + batch)}/{n}")
    return out


def generate_candidates(source_base_dir, target_base_dir, seeds: Sequence[dict], cfg: TransLoraConfig, *,
                        seed: int, n: int | None = None, progress: Progress = None) -> tuple[list[dict], dict]:
    """(a) Synthetic task inputs: [{"prompt", "generator"}], and counts per generator and drop reason."""
    n = n or cfg.n_synthetic
    prompts = [s["prompt"] for s in seeds]
    prefix, suffix = template_of(prompts)
    limits = _length_limits(prompts, cfg)
    counts: Counter = Counter()
    info: dict = {"template": [prefix, suffix], "length_limits": list(limits), "requested": n}
    rows: list[dict] = []
    raw: list[str] = []
    if cfg.generator in ("target", "source", "auto"):
        who = "source" if cfg.generator == "source" else "target"
        base = Path(source_base_dir if who == "source" else target_base_dir)
        model, tok = load_model(base), load_tokenizer(base)
        # "auto" samples a probe first: a base that writes no usable input is not asked n times.
        probe = min(n, 64) if cfg.generator == "auto" else n
        raw = _lm_prompts(model, tok, prompts, prefix, suffix, probe, cfg, limits, seed, progress)
        rows = _sanitise([{"prompt": p, "generator": who} for p in raw], prompts, prefix, suffix, limits, counts)
        if probe < n and len(rows) >= cfg.auto_min_yield * probe:
            raw += _lm_prompts(model, tok, prompts, prefix, suffix, n - probe, cfg, limits, seed + 1, progress)
            counts.clear()
            rows = _sanitise([{"prompt": p, "generator": who} for p in raw], prompts, prefix, suffix, limits,
                             counts)
        del model
        info[f"{who}_yield"] = round(len(rows) / len(raw), 4)
        info[f"{who}_sampled"] = len(raw)
    if cfg.generator == "mutation" or (cfg.generator == "auto" and len(rows) < cfg.auto_min_yield * len(raw)):
        # Mutation tops up to n usable prompts; it may repeat itself, so draw in rounds.
        seen = {r["prompt"] for r in rows}
        for round_ in range(8):
            need = n - len(rows)
            if need <= 0:
                break
            drawn = mutation_prompts(prompts, 2 * need, rate=cfg.mutation_rate, indel=cfg.mutation_indel,
                                     seed=seed * 31 + round_, closure=cfg.mutation_closure,
                                     in_range=cfg.mutation_in_range)
            fresh = [{"prompt": p, "generator": "mutation"} for p in drawn if p not in seen]
            kept = _sanitise(fresh, prompts, prefix, suffix, limits, counts)[:need]
            seen.update(r["prompt"] for r in kept)
            rows += kept
    info["dropped"] = dict(sorted(counts.items()))
    info["by_generator"] = dict(sorted(Counter(r["generator"] for r in rows).items()))
    info["generated"] = len(rows)
    return rows, info
