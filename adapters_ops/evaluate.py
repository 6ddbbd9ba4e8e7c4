"""Score a base model, with or without a LoRA adapter, on prompt/completion
examples: exact match of greedy completions and mean teacher-forced loss.

    from adapters_ops.evaluate import evaluate
    r = evaluate("zoo/bases/tiny-llama-3.0", "zoo/tasks/caesar/test.jsonl", adapter="zoo/adapters/caesar")
    r.accuracy, r.loss, r.n

`load_model(base_dir, adapter)` is the shared way to get a base with an
adapter applied: by default the dense deltas `scaling * B @ A` are added to
the base weights (works for any `Adapter`, including ones our ops produce);
`method="peft"` wraps the base in a real `peft.PeftModel` instead.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .adapter import _LORA_KEY, PEFT_PREFIX, Adapter, as_adapter
from .errors import AdapterError, IncompatibleAdapters


@dataclass(frozen=True)
class EvalResult:
    accuracy: float  # exact match of the greedy completion, 0..1
    loss: float  # mean cross-entropy per completion token (incl. EOS), teacher-forced
    n: int
    predictions: tuple[str, ...] = field(default=(), repr=False, compare=False)


# --- inputs ----------------------------------------------------------------------------


def read_examples(source: str | os.PathLike | Iterable[dict]) -> list[dict]:
    """Examples from a JSONL file or an iterable of {"prompt", "completion"} dicts."""
    if isinstance(source, str | os.PathLike):
        path = Path(source)
        if not path.is_file():
            raise AdapterError(f"no examples file at {path}", "missing_examples")
        items = []
        for no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                items.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise AdapterError(f"{path.name} line {no} is not JSON: {exc}", "invalid_examples") from exc
    else:
        items = list(source)
    for i, it in enumerate(items):
        if not (isinstance(it, dict) and isinstance(it.get("prompt"), str) and isinstance(it.get("completion"), str)):
            raise AdapterError(f"example {i} needs string 'prompt' and 'completion' fields", "invalid_examples")
    if not items:
        raise AdapterError("no examples to evaluate", "invalid_examples")
    return items


# --- models ----------------------------------------------------------------------------


def load_tokenizer(base_dir: str | os.PathLike):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base_dir))
    tok.padding_side = "left"  # batched generation continues every prompt from its last token
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def apply_adapter(model: torch.nn.Module, adapter: Adapter | str | os.PathLike, weight: float = 1.0) -> torch.nn.Module:
    """Add `weight * scaling * B @ A` of every LoRA pair to the matching Linear of `model`, in place."""
    adapter = as_adapter(adapter)
    unknown = [k for k in adapter.tensors if not _LORA_KEY.match(k)]
    if unknown:
        raise AdapterError(f"cannot merge non-LoRA tensors such as {unknown[0]!r}", "unsupported_tensor")
    transpose = bool(adapter.config.get("fan_in_fan_out"))
    with torch.no_grad():
        for module, _ in adapter.pairs():
            name = module.removeprefix(PEFT_PREFIX)
            try:
                target = model.get_submodule(name)
            except AttributeError as exc:
                raise IncompatibleAdapters(f"the base has no module {name!r} for the adapter", "missing_module") from exc
            delta = adapter.delta(module)
            if transpose:
                delta = delta.T
            w = getattr(target, "weight", None)
            if w is None or tuple(w.shape) != tuple(delta.shape):
                shape = None if w is None else tuple(w.shape)
                raise IncompatibleAdapters(
                    f"{name}: adapter delta {tuple(delta.shape)} does not fit base weight {shape}", "shape_mismatch")
            w.add_((weight * delta).to(w.dtype))
    return model


def load_model(base_dir: str | os.PathLike, adapter: Adapter | str | os.PathLike | None = None, *,
               method: str = "merge", dtype: torch.dtype = torch.float32, device: str = "cpu"):
    """The base in eval mode, with the adapter merged into its weights ("merge")
    or attached through `peft.PeftModel` ("peft")."""
    from transformers import AutoModelForCausalLM

    if method not in ("merge", "peft"):
        raise AdapterError(f"method must be 'merge' or 'peft', got {method!r}", "invalid_parameter")
    base_dir = Path(base_dir)
    if not (base_dir / "config.json").is_file():
        raise AdapterError(f"{base_dir} is not a model directory (no config.json)", "missing_base")
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype).to(device)
    if adapter is not None:
        if method == "merge":
            apply_adapter(model, adapter)
        else:
            from peft import PeftModel

            if isinstance(adapter, Adapter):
                with tempfile.TemporaryDirectory() as tmp:
                    adapter.save(tmp)
                    model = PeftModel.from_pretrained(model, tmp)
            else:
                model = PeftModel.from_pretrained(model, str(adapter))
            model = model.to(device)
    model.eval()
    return model


# --- scoring ---------------------------------------------------------------------------


def _completion_ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


def sft_sequences(tok, examples: Sequence[dict]) -> tuple[list[list[int]], list[list[bool]]]:
    """`<s> prompt completion </s>` ids and a mask that is True on the completion and its EOS
    (the prompt is context). The one definition of a completion target: scoring here and
    every trainer (the zoo's real lane included) use it."""
    seqs, masks = [], []
    for ex in examples:
        p = tok(ex["prompt"])["input_ids"]  # with <s> where the tokenizer adds one
        c = _completion_ids(tok, ex["completion"])
        seqs.append(p + c)
        masks.append([False] * len(p) + [True] * len(c))
    return seqs, masks


def sft_batch(tok, examples: Sequence[dict]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`sft_sequences` right-padded: ids, attention mask and labels (-100 off the completion)."""
    seqs, masks = sft_sequences(tok, examples)
    width = max(map(len, seqs))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids = torch.full((len(seqs), width), pad, dtype=torch.long)
    att = torch.zeros_like(ids)
    lab = torch.full_like(ids, -100)
    for i, (s, m) in enumerate(zip(seqs, masks, strict=True)):
        ids[i, :len(s)] = torch.tensor(s)
        att[i, :len(s)] = 1
        lab[i, :len(s)] = torch.where(torch.tensor(m), torch.tensor(s), -100)
    return ids, att, lab


@torch.inference_mode()
def completion_loss(model, tok, examples: Sequence[dict], batch_size: int = 64) -> float:
    """Mean cross-entropy per completion token (EOS included), prompt tokens masked."""
    dev = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        ids, att, lab = sft_batch(tok, chunk)
        logits = model(input_ids=ids.to(dev), attention_mask=att.to(dev)).logits.float()
        lab = lab[:, 1:].to(dev)
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), lab.reshape(-1), ignore_index=-100, reduction="sum")
        total += float(losses)
        count += int((lab != -100).sum())
    return total / count


@torch.inference_mode()
def greedy_completions(model, tok, prompts: Sequence[str], max_new_tokens: int, batch_size: int = 64) -> list[str]:
    """Greedy continuations of each prompt, cut at the first EOS."""
    dev = next(model.parameters()).device
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        enc = tok(list(prompts[start:start + batch_size]), return_tensors="pt", padding=True)
        gen = model.generate(
            input_ids=enc["input_ids"].to(dev), attention_mask=enc["attention_mask"].to(dev),
            max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        )
        for row in gen[:, enc["input_ids"].shape[1]:].tolist():
            if tok.eos_token_id in row:
                row = row[:row.index(tok.eos_token_id)]
            out.append(tok.decode(row, skip_special_tokens=True))
    return out


def evaluate_model(model, tok, examples: Sequence[dict], *, batch_size: int = 64,
                   max_new_tokens: int | None = None, with_loss: bool = True) -> EvalResult:
    """Score an already-loaded model (so one model can serve several task sets). `with_loss=False`
    skips the teacher-forced pass (loss is then nan): on a 135M model that pass costs as much
    as the decoding."""
    examples = read_examples(examples)
    if batch_size < 1:
        raise AdapterError("batch_size must be >= 1", "invalid_parameter")
    if max_new_tokens is None:
        # Room for the longest reference and its EOS: a longer answer cannot match anyway.
        max_new_tokens = max(len(_completion_ids(tok, ex["completion"])) for ex in examples)
    preds = greedy_completions(model, tok, [ex["prompt"] for ex in examples], max_new_tokens, batch_size)
    hits = sum(p == ex["completion"] for p, ex in zip(preds, examples, strict=True))
    loss = completion_loss(model, tok, examples, batch_size) if with_loss else math.nan
    return EvalResult(accuracy=hits / len(examples), loss=loss, n=len(examples), predictions=tuple(preds))


def evaluate(base_dir: str | os.PathLike, task: str | os.PathLike | Iterable[dict],
             adapter: Adapter | str | os.PathLike | None = None, *, batch_size: int = 64,
             max_new_tokens: int | None = None, method: str = "merge", device: str = "cpu") -> EvalResult:
    """Exact match of greedy completions and mean completion loss of base (+ adapter) on a task."""
    examples = read_examples(task)
    model = load_model(base_dir, adapter, method=method, device=device)
    tok = load_tokenizer(base_dir)
    return evaluate_model(model, tok, examples, batch_size=batch_size, max_new_tokens=max_new_tokens)


# --- choosing the kept state of a training run ------------------------------------------


SELECTIONS = ("accuracy", "loss")  # how the trainers (Trans-LoRA distill, QA-LoRA recover) score a state on the seeds


@dataclass
class SeedSelection:
    """Which checked state a trainer keeps, and when it stops: fed one (step, loss, accuracy) per check.

    "loss": a strictly lower seed loss wins (the first of equal losses is kept). "accuracy": an exact
    match at least as high wins, so ties go to the later state, trained further down the cosine
    schedule; the seed loss can rise while the student grows confident and its answers still improve.
    `patience` checks in a row that do not win stop the training."""

    select: str
    patience: int
    best_loss: float = math.inf
    best_accuracy: float = -math.inf
    best_step: int = 0
    misses: int = 0

    def __post_init__(self):
        if self.select not in SELECTIONS:
            raise AdapterError(f"select must be one of {', '.join(SELECTIONS)}, got {self.select!r}",
                               "invalid_parameter")

    def offer(self, step: int, loss: float, accuracy: float | None = None) -> bool:
        """True when the state checked at `step` becomes the kept one."""
        if self.select == "accuracy":
            if accuracy is None:
                raise AdapterError("selection by accuracy needs the seed accuracy", "invalid_parameter")
            wins = accuracy >= self.best_accuracy
        else:
            wins = loss < self.best_loss - 1e-6
        if wins:
            self.best_loss, self.best_step, self.misses = loss, step, 0
            if accuracy is not None:
                self.best_accuracy = accuracy
        else:
            self.misses += 1
        return wins

    @property
    def stop(self) -> bool:
        return self.misses >= self.patience


def seed_check(model, tok, seeds: Sequence[dict], select: str) -> tuple[float, float | None]:
    """(loss, exact match) of a training model on the seeds; exact match only when it selects (it
    decodes, which costs more). Leaves the model in training mode."""
    model.eval()
    if select == "accuracy":
        scored = evaluate_model(model, tok, seeds)
        out = (scored.loss, scored.accuracy)
    else:
        out = (completion_loss(model, tok, seeds), None)
    model.train()
    return out

