"""Trans-LoRA: move a LoRA to another base model without its training data.

When diff transfer cannot work (the bases drifted too far, have other widths,
or belong to another family), the skill is re-learnt on the target from
synthetic data, after Wang et al., "Trans-LoRA: towards data-free
Transferable Parameter Efficient Finetuning" (arXiv 2405.17258):

    generate  a generator model, prompted few-shot with the seed examples,
              writes new task inputs (or, for tiny bases that write garbage,
              the "mutation" generator perturbs the seed prompts with the
              seeds' own character statistics)
    filter    a discriminator on the source base keeps the inputs that score
              as real as held-out seeds do: by default the inputs' likelihood
              under the source base after a shape check against the seeds;
              optionally the paper's LoRA classifier trained on the seeds
    label     the source base + adapter answers every kept input (greedy)
    distill   a fresh LoRA on the target base learns those answers, with
              early stopping on the seed examples
    evaluate  target base, result and source + adapter on the seeds

    from adapters_ops.translora import TransLoraConfig, run
    adapter, report = run("zoo/bases/tiny-llama-3.0", "zoo/adapters/caesar",
                          "zoo/bases/tiny-other-1.0", "zoo/tasks/caesar/seed.jsonl",
                          TransLoraConfig(seed=0), progress=print_progress, checkpoint=DirCheckpoint("ckpt"))

Every stage writes its output to the optional `checkpoint` store (JSONL for
the sample stages, safetensors bytes for the adapter, JSON for the metrics),
so a worker killed mid-way resumes after the last finished stage; each stage
reseeds torch, so a resumed run equals an uninterrupted one. Design choices
and where we differ from the paper: docs/translora.md.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import random
import struct
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

from . import opspecs
from ._zoo_train import deterministic  # fixed threads + deterministic kernels, restored after
from .adapter import Adapter, AdapterLike, as_adapter
from .errors import AdapterError, IncompatibleAdapters
from .evaluate import (
    SELECTIONS,
    SeedSelection,
    evaluate_model,
    greedy_completions,
    load_model,
    load_tokenizer,
    read_examples,
    seed_check,
)
from .evaluate import sft_batch as _sft_batch

__all__ = [
    "DirCheckpoint",
    "GENERATORS",
    "MemoryCheckpoint",
    "STAGES",
    "TransLoraConfig",
    "discriminator_scores",
    "distill",
    "filter_candidates",
    "generate_candidates",
    "label",
    "likelihood_scores",
    "mutation_prompts",
    "run",
    "template_of",
    "train_discriminator",
]

STAGES = ("generate", "filter", "label", "distill", "evaluate")
# Declared with the op's other settings (a job's translora params are checked against them at submission).
GENERATORS = opspecs.TRANSLORA_GENERATORS
DISCRIMINATORS = opspecs.TRANSLORA_DISCRIMINATORS
# Share of the progress bar each stage fills (distillation dominates the time).
_SPAN = {"generate": (0.0, 0.15), "filter": (0.15, 0.35), "label": (0.35, 0.45), "distill": (0.45, 0.95),
         "evaluate": (0.95, 1.0)}
LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

Progress = Callable[[float, str], None] | None


# --- configuration ---------------------------------------------------------------------------


@dataclass(frozen=True)
class TransLoraConfig:
    """Parameters of one Trans-LoRA run; validated on construction."""

    # (a) synthetic inputs
    n_synthetic: int = 2048  # candidates requested from the generator (before de-dup and filtering)
    generator: str = "auto"  # target | source | mutation | auto (LM of the target, topped up by mutation)
    shots: int = 5  # seed prompts in each few-shot context (fewer when the context would not fit)
    temperature: float = 1.0
    top_p: float = 0.95
    min_chars: int | None = None  # prompt length limits; default half the shortest / twice the longest seed
    max_chars: int | None = None
    auto_min_yield: float = 0.5  # "auto": below this share of usable LM samples, top up with mutation
    mutation_rate: float = 0.5  # chance to resample each variable character of a seed prompt
    mutation_indel: int = 1  # up to this many characters inserted or deleted per mutated prompt
    mutation_closure: bool = True  # complete a character class the seeds half cover (a-z, A-Z, 0-9)
    mutation_in_range: bool = True  # insertions/deletions keep the middle within the seeds' length range
    # (b) discriminator
    filter: bool = True
    discriminator: str = "likelihood"  # likelihood (source base LM + shape, no training) | lora (the paper's)
    disc_rank: int = 4
    disc_steps: int = 60
    disc_lr: float = 3e-3
    disc_quantile: float = 0.0  # keep candidates scoring at least this quantile of the seeds' held-out scores
    disc_slack: float = 0.5  # likelihood: the seeds' band [q, 1-q] widened by this times their spread
    # (c) labels
    label_slack: int = 4  # tokens beyond the longest seed completion before a label counts as unterminated
    label_drop: float = 0.0  # share of labels dropped, least confident first (teacher loss on its own answer)
    # (d) distillation
    soft_labels: float = 0.0  # weight of the KL to the teacher's token distributions (0: text labels only)
    soft_temperature: float = 1.0  # both distributions are softened by this before the KL
    rank: int | None = None  # None: the source adapter's r
    alpha: int | None = None  # None: the source adapter's alpha scaled to the new rank
    target_modules: tuple[str, ...] | None = None  # None: the source adapter's, where the target has them
    steps: int = 2000
    lr: float = 5e-3
    batch_size: int = 32
    warmup: int = 10
    eval_every: int = 50
    patience: int = 40  # evaluations without a better seed score before stopping (40 x 50: the whole schedule)
    select: str = "accuracy"  # the seed score that picks the kept state: accuracy (ties: later state) | loss
    # everything
    seed: int = 0
    threads: int | None = None  # torch threads inside run(); None: min(2, cores)

    def __post_init__(self):
        def positive_int(name, low=1):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise AdapterError(f"{name} must be an integer >= {low}, got {v!r}", "invalid_parameter")

        def number(name, lo, hi, lo_open=False):
            v = getattr(self, name)
            if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v) \
                    or v > hi or v < lo or (lo_open and v == lo):
                raise AdapterError(f"{name} must be in {'(' if lo_open else '['}{lo}, {hi}], got {v!r}",
                                   "invalid_parameter")

        if self.discriminator not in DISCRIMINATORS:
            raise AdapterError(f"discriminator must be one of {', '.join(DISCRIMINATORS)}, got {self.discriminator!r}",
                               "invalid_parameter")
        for name in ("filter", "mutation_closure", "mutation_in_range"):
            if not isinstance(getattr(self, name), bool):
                raise AdapterError(f"{name} must be true or false, got {getattr(self, name)!r}", "invalid_parameter")
        if self.select not in SELECTIONS:
            raise AdapterError(f"select must be one of {', '.join(SELECTIONS)}, got {self.select!r}",
                               "invalid_parameter")
        if self.generator not in GENERATORS:
            raise AdapterError(f"generator must be one of {', '.join(GENERATORS)}, got {self.generator!r}",
                               "invalid_parameter")
        for name in ("n_synthetic", "shots", "disc_rank", "disc_steps", "steps", "batch_size", "eval_every",
                     "patience"):
            positive_int(name)
        for name in ("mutation_indel", "warmup", "label_slack", "seed"):
            positive_int(name, 0)
        for name in ("rank", "alpha", "min_chars", "max_chars", "threads"):
            if getattr(self, name) is not None:
                positive_int(name)
        if self.min_chars and self.max_chars and self.min_chars > self.max_chars:
            raise AdapterError("min_chars must not exceed max_chars", "invalid_parameter")
        number("temperature", 0.0, 100.0, lo_open=True)
        number("top_p", 0.0, 1.0, lo_open=True)
        number("auto_min_yield", 0.0, 1.0)
        number("mutation_rate", 0.0, 1.0)
        number("disc_quantile", 0.0, 0.5)
        number("disc_slack", 0.0, 100.0)
        number("label_drop", 0.0, 0.9)
        number("soft_labels", 0.0, 1.0)
        number("soft_temperature", 0.0, 100.0, lo_open=True)
        number("lr", 0.0, 1.0, lo_open=True)
        number("disc_lr", 0.0, 1.0, lo_open=True)
        if isinstance(self.target_modules, list):  # JSON job parameters have no tuples
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
        if self.target_modules is not None and (
                not isinstance(self.target_modules, tuple) or not self.target_modules
                or not all(isinstance(m, str) and m for m in self.target_modules)):
            raise AdapterError("target_modules must be a non-empty tuple of module names", "invalid_parameter")

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["target_modules"] = list(self.target_modules) if self.target_modules else None
        return d


# --- checkpoint stores -------------------------------------------------------------------------


class Checkpoint(Protocol):
    def load(self, stage: str) -> bytes | None: ...

    def save(self, stage: str, data: bytes) -> None: ...


class MemoryCheckpoint:
    """Stage outputs in a dict (tests; a worker keeps them in the blob store)."""

    def __init__(self):
        self.data: dict[str, bytes] = {}

    def load(self, stage: str) -> bytes | None:
        return self.data.get(stage)

    def save(self, stage: str, data: bytes) -> None:
        self.data[stage] = bytes(data)


class DirCheckpoint:
    """Stage outputs as files `<dir>/<stage>.ckpt`, written atomically."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def load(self, stage: str) -> bytes | None:
        f = self.path / f"{stage}.ckpt"
        return f.read_bytes() if f.is_file() else None

    def save(self, stage: str, data: bytes) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        tmp = self.path / f".{stage}.ckpt.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, self.path / f"{stage}.ckpt")


def _jsonl_bytes(fingerprint: str, info: dict, rows: Sequence[dict]) -> bytes:
    head = json.dumps({"fingerprint": fingerprint, "info": info}, sort_keys=True)
    return "".join([head + "\n"] + [json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in rows]).encode()


def _jsonl_parse(data: bytes) -> tuple[str, dict, list[dict]]:
    lines = data.decode("utf-8").splitlines()
    head = json.loads(lines[0])
    return head["fingerprint"], head["info"], [json.loads(x) for x in lines[1:] if x.strip()]


def _adapter_bytes(adapter: Adapter, fingerprint: str, info: dict) -> bytes:
    from safetensors.torch import save

    meta = {"fingerprint": fingerprint, "adapter_config": json.dumps(adapter.config, sort_keys=True),
            "info": json.dumps(info, sort_keys=True)}
    return save({k: v.contiguous() for k, v in adapter.tensors.items()}, metadata=meta)


def _adapter_parse(data: bytes) -> tuple[str, dict, Adapter]:
    from safetensors.torch import load

    (n,) = struct.unpack("<Q", data[:8])
    meta = json.loads(data[8:8 + n]).get("__metadata__", {})
    adapter = Adapter(config=json.loads(meta["adapter_config"]), tensors=load(data))
    return meta["fingerprint"], json.loads(meta["info"]), adapter


# Each stage's (dump(fingerprint, info, value) -> bytes, parse(bytes) -> (fingerprint, info, value)).
_JSONL = (_jsonl_bytes, _jsonl_parse)
_ADAPTER = (lambda fp, info, adapter: _adapter_bytes(adapter, fp, info), _adapter_parse)
_METRICS = (lambda fp, metrics, _: json.dumps({"fingerprint": fp, "metrics": metrics}).encode(),
            lambda data: (json.loads(data)["fingerprint"], json.loads(data)["metrics"], None))


# --- helpers ---------------------------------------------------------------------------------------


def _report(progress: Progress, stage: str, fraction: float, message: str) -> None:
    if progress is not None:
        lo, hi = _SPAN[stage]
        progress(min(1.0, max(0.0, lo + (hi - lo) * fraction)), f"{stage}: {message}")


def _stage_seed(seed: int, stage: str) -> int:
    """Each stage draws from its own stream: a resumed run draws what an uninterrupted one does."""
    return seed * 1000 + STAGES.index(stage) + 1


def _model_dir(path) -> Path:
    path = Path(path)
    if not (path / "config.json").is_file():
        raise AdapterError(f"{path} is not a model directory (no config.json)", "missing_base")
    return path


def _max_positions(model) -> int:
    return int(getattr(model.config, "max_position_embeddings", 0) or 2048)


def _common_prefix(texts: Sequence[str]) -> str:
    p = os.path.commonprefix(list(texts))
    p = p[:min(map(len, texts)) - 1]  # at least one variable character is left in every text
    # Cut back to a word boundary: seeds "date 1987-.." and "date 1950-.." share "date 19",
    # but only "date " is template; the digits are content.
    while p and p[-1].isalnum() and any(len(t) > len(p) and t[len(p)].isalnum() for t in texts):
        p = p[:-1]
    return p


def template_of(prompts: Sequence[str]) -> tuple[str, str]:
    """The (prefix, suffix) every seed prompt shares, cut at word boundaries ("caesar ", "=")."""
    prefix = _common_prefix(prompts)
    rest = [t[len(prefix):] for t in prompts]
    suffix = _common_prefix([t[::-1] for t in rest])[::-1]
    if any(len(r) <= len(suffix) for r in rest):  # keep at least one variable character
        suffix = ""
    return prefix, suffix


def _length_limits(prompts: Sequence[str], cfg: TransLoraConfig) -> tuple[int, int]:
    lo = cfg.min_chars if cfg.min_chars is not None else max(1, min(map(len, prompts)) // 2)
    hi = cfg.max_chars if cfg.max_chars is not None else 2 * max(map(len, prompts))
    return lo, hi


def _sanitise(rows: list[dict], seed_prompts: Sequence[str], prefix: str, suffix: str, limits: tuple[int, int],
              counts: Counter) -> list[dict]:
    """Drop empty, unterminated, too short/long, seed copies and duplicates; count each reason."""
    seeds = set(seed_prompts)
    seen: set[str] = set()
    out = []
    for r in rows:
        p = r["prompt"]
        middle = p[len(prefix):len(p) - len(suffix)] if p.startswith(prefix) and p.endswith(suffix) else None
        if middle is None:
            counts["unterminated"] += 1
        elif not middle.strip():
            counts["empty"] += 1
        elif not limits[0] <= len(p) <= limits[1]:
            counts["length"] += 1
        elif p in seeds:
            counts["seed_copy"] += 1
        elif p in seen:
            counts["duplicate"] += 1
        else:
            seen.add(p)
            out.append(r)
    return out


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
        for row in gen[:, width:].tolist():
            if eos in row:
                row = row[:row.index(eos)]
            text = prefix + tok.decode(row, skip_special_tokens=True)
            if suffix:
                cut = text.find(suffix, len(prefix))
                text = text[:cut + len(suffix)] if cut >= 0 else text + "\0"  # \0: no suffix, unterminated
            out.append(text)
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


# --- (c) labels ------------------------------------------------------------------------------------


def label(source_base_dir, adapter: AdapterLike, seeds: Sequence[dict], rows: list[dict], cfg: TransLoraConfig,
          progress: Progress = None) -> tuple[list[dict], dict]:
    """(c) The source base + adapter answers each input greedily; answers that do
    not end (no EOS within the longest seed completion + label_slack tokens) are dropped."""
    adapter = as_adapter(adapter)
    model = load_model(source_base_dir, adapter)
    tok = load_tokenizer(source_base_dir)
    longest = max(len(tok(s["completion"], add_special_tokens=False)["input_ids"]) for s in seeds)
    max_new = longest + 1 + cfg.label_slack
    out, unterminated = [], 0
    step = 64
    for start in range(0, len(rows), step):
        chunk = rows[start:start + step]
        # One token more than allowed: a label that uses it never ended.
        answers = greedy_completions(model, tok, [r["prompt"] for r in chunk], max_new + 1)
        for r, a in zip(chunk, answers, strict=True):
            if len(tok(a, add_special_tokens=False)["input_ids"]) >= max_new:
                unterminated += 1
            else:
                out.append(dict(r, completion=a))
        if progress:
            progress(min(1.0, (start + step) / max(1, len(rows))), f"labelled {min(len(rows), start + step)}")
    info = {"unterminated": unterminated, "max_new_tokens": max_new}
    if out:
        losses = _example_losses(model, tok, out)
        for r, v in zip(out, losses, strict=True):
            r["teacher_loss"] = v
        if cfg.label_drop > 0:
            # Greedy answers the teacher itself finds unlikely are the ones it gets wrong most often.
            keep = sorted(range(len(out)), key=lambda i: (losses[i], i))[:max(1, round(len(out) * (1 - cfg.label_drop)))]
            info["dropped_unconfident"] = len(out) - len(keep)
            info["max_teacher_loss"] = max(losses[i] for i in keep)
            out = [out[i] for i in sorted(keep)]
    info.update(labelled=len(out), empty=sum(1 for r in out if not r["completion"]))
    return out, info


@torch.inference_mode()
def _example_losses(model, tok, items: Sequence[dict], batch_size: int = 64) -> list[float]:
    """Mean cross-entropy per completion token (EOS included) of each example."""
    out: list[float] = []
    for start in range(0, len(items), batch_size):
        ids, att, lab = _sft_batch(tok, items[start:start + batch_size])
        logits = model(input_ids=ids, attention_mask=att).logits.float()
        lab = lab[:, 1:]
        ce = torch.nn.functional.cross_entropy(logits[:, :-1].transpose(1, 2), lab, ignore_index=-100,
                                               reduction="none").sum(1)
        out += [round(float(x), 6) for x in ce / (lab != -100).sum(1).clamp(min=1)]
    return out


# --- (d) distillation -----------------------------------------------------------------------------




def _student_shape(adapter: Adapter, target_model, cfg: TransLoraConfig) -> tuple[int, int, list[str]]:
    src_r = int(adapter.config.get("r", 8))
    r = cfg.rank or src_r
    alpha = cfg.alpha or max(1, round(float(adapter.config.get("lora_alpha", src_r)) * r / src_r))
    have = set(_linear_names(target_model))
    wanted = list(cfg.target_modules) if cfg.target_modules else [m for m in adapter.target_modules if m in have]
    missing = [m for m in wanted if m not in have]
    if missing:
        raise IncompatibleAdapters(f"the target base has no Linear modules named {', '.join(missing)}",
                                   "missing_module")
    return r, alpha, wanted or sorted(have)


def _same_vocabulary(tok_a, tok_b) -> bool:
    """Token ids mean the same text in both tokenizers (soft labels compare distributions id by id)."""
    return (tok_a.get_vocab() == tok_b.get_vocab()
            and (tok_a.bos_token_id, tok_a.eos_token_id) == (tok_b.bos_token_id, tok_b.eos_token_id))


def _soft_label_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                     temperature: float) -> torch.Tensor:
    """KL(teacher || student) per completion token, both softened by `temperature`, scaled by its
    square (so its gradient keeps the hard loss's size); positions without a label are context."""
    mask = labels[:, 1:] != -100
    s = torch.log_softmax(student_logits[:, :-1][mask].float() / temperature, dim=-1)
    t = torch.log_softmax(teacher_logits[:, :-1][mask].float() / temperature, dim=-1)
    kl = (t.exp() * (t - s)).sum(-1)
    return kl.mean() * temperature ** 2


def distill(target_base_dir, adapter: AdapterLike, data: Sequence[dict], seeds: Sequence[dict], cfg: TransLoraConfig,
            *, seed: int, target_slug: str | None = None, progress: Progress = None,
            source_base_dir=None) -> tuple[Adapter, dict]:
    """(d) Train a fresh LoRA on the target base on the labelled inputs; every
    `eval_every` steps score the seeds (`cfg.select`: teacher-forced loss, or
    exact match with ties to the later state) and keep the best state; stop
    after `patience` evaluations without improvement.

    With `cfg.soft_labels` > 0 and a source base whose tokenizer is the target's,
    the student also matches the teacher's (source + adapter) whole next-token
    distribution along each label: a wrong greedy label still carries the
    teacher's second choices. Across tokenizers only the text labels are used."""
    adapter = as_adapter(adapter)
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    if not data:
        raise AdapterError("no labelled synthetic examples left to distill from", "no_synthetic_data")
    target_base_dir = _model_dir(target_base_dir)
    tok = load_tokenizer(target_base_dir)
    base = load_model(target_base_dir)
    r, alpha, targets = _student_shape(adapter, base, cfg)
    teacher, soft = None, "off"
    if cfg.soft_labels > 0:
        if source_base_dir is None:
            raise AdapterError("soft labels need the source base (source_base_dir)", "invalid_parameter")
        if _same_vocabulary(load_tokenizer(source_base_dir), tok):
            teacher, soft = load_model(_model_dir(source_base_dir), adapter), "on"
        else:
            soft = "off: the tokenizers differ"
    model = _lora(base, r, alpha, targets, seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr)
    sched = _schedule(opt, cfg.steps, cfg.warmup)
    rng = random.Random(seed)
    bs = min(cfg.batch_size, len(data))

    selection = SeedSelection(cfg.select, cfg.patience)
    loss0, acc0 = seed_check(model, tok, seeds, cfg.select)
    selection.offer(0, loss0, acc0)
    history = [(0, round(loss0, 5))]
    acc_history = [(0, acc0)] if acc0 is not None else []
    best_state = {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}
    step, train_losses = 0, []
    model.train()
    for step in range(1, cfg.steps + 1):
        batch = [data[rng.randrange(len(data))] for _ in range(bs)]
        ids, att, lab = _sft_batch(tok, batch)
        out = model(input_ids=ids, attention_mask=att, labels=lab)
        loss = out.loss
        if teacher is not None:
            with torch.no_grad():
                teacher_logits = teacher(input_ids=ids, attention_mask=att).logits
            kl = _soft_label_loss(out.logits, teacher_logits, lab, cfg.soft_temperature)
            loss = (1 - cfg.soft_labels) * loss + cfg.soft_labels * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        train_losses.append(loss.item())
        if step % cfg.eval_every == 0 or step == cfg.steps:
            v, acc = seed_check(model, tok, seeds, cfg.select)
            history.append((step, round(v, 5)))
            if acc is not None:
                acc_history.append((step, acc))
            if selection.offer(step, v, acc):
                best_state = {k: t.detach().clone() for k, t in get_peft_model_state_dict(model).items()}
            if progress:
                progress(step / cfg.steps, f"step {step}/{cfg.steps}, train loss {train_losses[-1]:.4f}, seed loss {v:.4f}")
            if selection.stop:
                break
    set_peft_model_state_dict(model, best_state)
    model.eval()
    with tempfile.TemporaryDirectory(prefix="translora-") as tmp:
        model.save_pretrained(tmp)  # PEFT's own config and key names
        out = Adapter.load(tmp)
    out.config["base_model_name_or_path"] = target_slug or target_base_dir.name
    head = train_losses[:10]
    info = {"steps_run": step, "best_step": selection.best_step, "best_seed_loss": round(selection.best_loss, 5),
            "seed_loss_history": history, "seed_accuracy_history": acc_history, "select": cfg.select,
            "best_seed_accuracy": selection.best_accuracy if acc0 is not None else None, "rank": r, "alpha": alpha, "target_modules": targets,
            "train_examples": len(data), "soft_labels": soft,
            "train_loss_first": round(sum(head) / max(1, len(head)), 5),
            "train_loss_last": round(sum(train_losses[-10:]) / max(1, len(train_losses[-10:])), 5)}
    return out, info


def teacher_examples(base_dir, adapter: AdapterLike, seeds, *, n: int = 1024, generator: str = "auto",
                     filter_inputs: bool = True, seed: int = 0,
                     progress: Callable[[float, str], None] | None = None) -> tuple[list[dict], dict]:
    """Stages (a)-(c) on one base: task inputs written from the seeds (`generator`), kept by the
    discriminator (`filter_inputs`), answered by `base_dir` + `adapter` (the teacher). What a
    student on the same base learns the adapter's skill from (QA-LoRA recovery, distilled
    composition). Returns [{"prompt", "completion"}] and the stages' reports."""
    adapter = as_adapter(adapter)
    seeds = read_examples(seeds)
    if n < 1:
        raise AdapterError(f"n must be >= 1, got {n!r}", "invalid_parameter")
    cfg = TransLoraConfig(n_synthetic=n, generator=generator, filter=filter_inputs, seed=seed)

    def say(fraction: float, message: str) -> None:
        if progress is not None:
            progress(fraction, message)

    say(0.0, f"generating {n} task inputs")
    rows, gen_info = generate_candidates(base_dir, base_dir, seeds, cfg, seed=seed)
    say(0.4, f"filtering {len(rows)} task inputs")
    rows, filter_info = filter_candidates(base_dir, base_dir, seeds, rows, cfg, seed=seed)
    say(0.6, f"labelling {len(rows)} task inputs with the teacher")
    rows, label_info = label(base_dir, adapter, seeds, rows, cfg)
    say(1.0, f"{len(rows)} synthetic examples")
    out = [{"prompt": r["prompt"], "completion": r["completion"]} for r in rows]
    return out, {"generate": gen_info, "filter": filter_info, "label": label_info, "examples": len(out)}


# --- (e) evaluation and the whole run ---------------------------------------------------------------


def _metrics(r) -> dict:
    return {"accuracy": round(r.accuracy, 5), "loss": round(r.loss, 5), "n": r.n}


def evaluate_on(examples: Sequence[dict], source_base_dir, adapter: AdapterLike, target_base_dir,
                result: Adapter | None) -> dict:
    """(e) Accuracy and loss of the target base, target + result, and source + adapter."""
    adapter = as_adapter(adapter)
    out = {}
    tgt_tok, src_tok = load_tokenizer(target_base_dir), load_tokenizer(source_base_dir)
    out["target_base"] = _metrics(evaluate_model(load_model(target_base_dir), tgt_tok, examples))
    if result is not None:
        out["result"] = _metrics(evaluate_model(load_model(target_base_dir, result), tgt_tok, examples))
    out["source"] = _metrics(evaluate_model(load_model(source_base_dir, adapter), src_tok, examples))
    return out


def _fingerprint(cfg: TransLoraConfig, seeds: Sequence[dict], adapter: Adapter, source: Path, target: Path) -> str:
    """What a stage's output depends on; a checkpoint written for other inputs is recomputed."""
    h = hashlib.sha256()
    h.update(json.dumps({"config": cfg.as_dict(), "seeds": list(seeds), "adapter_config": adapter.config},
                        sort_keys=True, default=str).encode())
    for k in sorted(adapter.tensors):
        t = adapter.tensors[k].contiguous()
        h.update(k.encode() + str(tuple(t.shape)).encode() + str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    for base in (source, target):
        h.update((base / "config.json").read_bytes())
        for f in sorted(base.glob("*.safetensors")):
            h.update(f.name.encode() + str(f.stat().st_size).encode())
    return h.hexdigest()[:24]


def run(source_base_dir, adapter: Adapter | str | os.PathLike, target_base_dir, seeds,
        config: TransLoraConfig | None = None, progress: Progress = None, checkpoint: Checkpoint | None = None,
        *, target_slug: str | None = None) -> tuple[Adapter, dict]:
    """Trans-LoRA from the source base + adapter onto the target base, from the
    seed examples alone. Returns the distilled adapter (PEFT layout, base set to
    `target_slug` or the target folder's name) and a JSON-able report: counts
    per stage, the filter rate, seed metrics of target base, result and source,
    and which stages were resumed from the checkpoint."""
    cfg = config or TransLoraConfig()
    source_base_dir, target_base_dir = _model_dir(source_base_dir), _model_dir(target_base_dir)
    adapter = as_adapter(adapter)
    adapter.validate()
    seeds = [{"prompt": s["prompt"], "completion": s["completion"]} for s in read_examples(seeds)]
    if len(seeds) < 2:
        raise AdapterError("Trans-LoRA needs at least 2 seed examples", "invalid_examples")
    fp = _fingerprint(cfg, seeds, adapter, source_base_dir, target_base_dir)
    report: dict = {"config": cfg.as_dict(), "fingerprint": fp, "seeds": len(seeds), "resumed": [], "stale": [],
                    "seconds": {}}

    def cached(stage: str, parse):
        if checkpoint is None:
            return None
        data = checkpoint.load(stage)
        if data is None:
            return None
        try:
            got_fp, info, value = parse(data)
        except Exception:  # a truncated or foreign blob: recompute rather than fail the job
            report["stale"].append(stage)
            return None
        if got_fp != fp:
            report["stale"].append(stage)
            return None
        report["resumed"].append(stage)
        return info, value

    def sub(stage):
        return lambda f, msg: _report(progress, stage, f, msg)

    def stage(name: str, codec: tuple[Callable, Callable], compute):
        """One resumable stage: its output from the checkpoint when that holds this run's
        (same fingerprint), else computed and saved. `compute() -> (value, info)`."""
        dump, parse = codec
        t0 = time.perf_counter()
        hit = cached(name, parse)
        if hit is None:
            _report(progress, name, 0.0, "started")
            value, info = compute()
            if checkpoint is not None:
                checkpoint.save(name, dump(fp, info, value))
        else:
            info, value = hit
        report["seconds"][name] = round(time.perf_counter() - t0, 2)
        _report(progress, name, 1.0, "done")
        return value, info

    with deterministic(cfg.threads or min(2, os.cpu_count() or 1)):
        candidates, report["generate"] = stage("generate", _JSONL, lambda: generate_candidates(
            source_base_dir, target_base_dir, seeds, cfg, seed=_stage_seed(cfg.seed, "generate"),
            progress=sub("generate")))
        kept, report["filter"] = stage("filter", _JSONL, lambda: filter_candidates(
            source_base_dir, target_base_dir, seeds, candidates, cfg, seed=_stage_seed(cfg.seed, "filter"),
            progress=sub("filter")))
        labelled, report["label"] = stage("label", _JSONL, lambda: label(
            source_base_dir, adapter, seeds, kept, cfg, progress=sub("label")))
        result, report["distill"] = stage("distill", _ADAPTER, lambda: distill(
            target_base_dir, adapter, labelled, seeds, cfg, seed=_stage_seed(cfg.seed, "distill"),
            target_slug=target_slug, progress=sub("distill"), source_base_dir=source_base_dir))
        _, metrics = stage("evaluate", _METRICS, lambda: (
            None, evaluate_on(seeds, source_base_dir, adapter, target_base_dir, result)))
        report["seed_metrics"] = metrics

    n = report["generate"]["requested"]
    report["counts"] = {"requested": n, "generated": len(candidates), "kept": len(kept), "labelled": len(labelled)}
    report["filter_rate"] = report["filter"]["filter_rate"]
    # The same gate as diff transfer's quality_gate (adapters_ops.transfer), on seed accuracy,
    # so the worker and the CLI read both kinds of transfer alike.
    gate = {"source_with_adapter": metrics["source"]["accuracy"], "target_base": metrics["target_base"]["accuracy"],
            "target_with_transferred": metrics["result"]["accuracy"]}
    gain = gate["source_with_adapter"] - gate["target_base"]
    kept_gain = gate["target_with_transferred"] - gate["target_base"]
    report["metrics"] = gate
    report["recovered"] = round(kept_gain / gain, 5) if gain > 0 else None
    report["verified"] = kept_gain > 0
    return result, report
