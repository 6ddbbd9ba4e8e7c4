"""Stage (d): the student LoRA on the target base, distilled from the labelled data and
early-stopped on the seeds; and teacher examples for other distillations (QA-LoRA)."""

from __future__ import annotations

import random
import tempfile
from collections.abc import Callable, Sequence

import torch

from ..adapter import Adapter, AdapterLike, as_adapter
from ..errors import AdapterError, IncompatibleAdapters
from ..evaluate import (
    SeedSelection,
    load_model,
    load_tokenizer,
    read_examples,
    seed_check,
)
from ..evaluate import sft_batch as _sft_batch
from .common import _model_dir
from .config import Progress, TransLoraConfig
from .discriminator import _linear_names, _lora, _schedule, filter_candidates
from .labels import label
from .synthetic import generate_candidates

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
