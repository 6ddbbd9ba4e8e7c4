"""Stage (c): labels for the kept inputs, answered by the source base + adapter."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..adapter import AdapterLike, as_adapter
from ..evaluate import (
    greedy_completions,
    load_model,
    load_tokenizer,
)
from ..evaluate import sft_batch as _sft_batch
from .config import Progress, TransLoraConfig

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
