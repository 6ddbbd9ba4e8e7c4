"""Recovering a QA-LoRA on the frozen quantized base: a short distillation from the fp base +
the original adapter on synthetic task inputs, early-stopped on the seeds."""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from ..adapter import PEFT_PREFIX, Adapter, AdapterLike, as_adapter
from ..errors import AdapterError, IncompatibleAdapters
from ..evaluate import SELECTIONS, SeedSelection, seed_check
from ..evaluate import sft_batch as _sft_batch
from .codec import Progress, _report
from .conversion import (
    _pool_factor,
    _weight_name,
    check_base_shapes,
    qalora_group_size,
    to_dense_lora,
    to_qalora,
)
from .model import QuantizedModel, weight_shapes

# --- QA-LoRA on a quantized base (unmerged), for checks and fine-tuning ------------------


class QALoRALinear(torch.nn.Module):
    """y = x W^T (+ bias) + scaling * B (A' (mean of x over each group of G inputs)).

    (`scaling` here includes PEFT's pooling factor for `use_qalora` adapters.)"""

    def __init__(self, base: torch.nn.Linear, a: torch.Tensor, b: torch.Tensor, scaling: float, group_size: int):
        super().__init__()
        self.base = base
        self.group_size = group_size
        self.scaling = scaling
        self.lora_A = torch.nn.Parameter(a.float().clone())
        self.lora_B = torch.nn.Parameter(b.float().clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pooled = x.unflatten(-1, (-1, self.group_size)).mean(-1)
        upd = torch.nn.functional.linear(torch.nn.functional.linear(pooled.to(self.lora_A.dtype), self.lora_A),
                                         self.lora_B)
        return self.base(x) + (self.scaling * upd).to(x.dtype)


def attach_qalora(model: torch.nn.Module, adapter: AdapterLike) -> dict[str, QALoRALinear]:
    """Wrap each target Linear of `model` in a QALoRALinear (in place); returns module -> wrapper."""
    adapter = as_adapter(adapter)
    linears = {}
    for module, _ in adapter.pairs():
        name = module.removeprefix(PEFT_PREFIX)
        try:
            linears[module] = model.get_submodule(name)
        except AttributeError as exc:
            raise IncompatibleAdapters(f"the base has no module {name!r}", "missing_module") from exc
        if not isinstance(linears[module], torch.nn.Linear):
            raise IncompatibleAdapters(f"{name}: {linears[module]} is not a torch.nn.Linear", "shape_mismatch")
    g = check_base_shapes(adapter, {_weight_name(m): (lin.out_features, lin.in_features) for m, lin in linears.items()})
    if g is None:
        raise AdapterError("not a QA-LoRA adapter (no qalora_pooling / use_qalora in its config)", "not_qalora")
    wrappers = {}
    for module, (a, b) in adapter.pairs():
        name = module.removeprefix(PEFT_PREFIX)
        lin = linears[module]
        if not isinstance(lin, torch.nn.Linear) or lin.in_features != a.shape[1] * g or lin.out_features != b.shape[0]:
            raise IncompatibleAdapters(f"{name}: A' {tuple(a.shape)} x group {g} and B {tuple(b.shape)} do not "
                                       f"fit {lin}", "shape_mismatch")
        w = QALoRALinear(lin, a, b, adapter.scaling(module) * _pool_factor(adapter, module), g)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, w)
        wrappers[module] = w
    return wrappers


def _collect(adapter: Adapter, wrappers: dict[str, QALoRALinear]) -> Adapter:
    tensors = dict(adapter.tensors)
    for module, w in wrappers.items():
        tensors[adapter.key(module, "A")] = w.lora_A.detach().clone().to(adapter.tensors[adapter.key(module, "A")].dtype)
        tensors[adapter.key(module, "B")] = w.lora_B.detach().clone().to(adapter.tensors[adapter.key(module, "B")].dtype)
    return Adapter(config=dict(adapter.config), tensors=tensors)



@dataclass(frozen=True)
class RecoveryConfig:
    """How `recover` trains the QA-LoRA student on the frozen quantized base; validated on construction.

    The student learns from the teacher (fp base + the original LoRA): cross-entropy on the
    completions of the training examples (the teacher's own answers for synthetic inputs) plus the
    KL divergence to the teacher's full next-token distribution on every real position."""

    # 4000: reverse on the zoo still improved between 1000, 2000 and 4000 steps (docs/qalora.md)
    steps: int = 4000
    lr: float = 1e-2  # 2e-3 left the tiny zoo's students far from the teacher after 1000 steps
    batch_size: int = 32
    ce_weight: float = 1.0
    kl_weight: float = 1.0
    init: str = "converted"  # "converted": start from to_qalora's projection; "fresh": A' random, B = 0
    rank: int | None = None  # None: see student_adapter; larger ranks add capacity (alpha / r is kept)
    eval_every: int = 50  # seed checks (with eval_examples); the best state is returned
    # checks without a better seed score before stopping; 80 x 50 covers the default schedule: 16
    # seeds give a noisy signal while lr is high (patience 4 stopped digitsum at step 400 of 1000)
    patience: int = 80
    # the seed score that picks the kept state: "loss" (teacher-forced completion loss) or
    # "accuracy" (greedy exact match, ties to the later state; it decodes, so each check costs more)
    select: str = "accuracy"
    seed: int = 0

    def __post_init__(self):
        if self.select not in SELECTIONS:
            raise AdapterError(f"select must be one of {', '.join(SELECTIONS)}, got {self.select!r}",
                               "invalid_parameter")
        for name, low in (("steps", 0), ("batch_size", 1), ("eval_every", 1), ("patience", 1), ("seed", 0)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise AdapterError(f"{name} must be an integer >= {low}, got {v!r}", "invalid_parameter")
        if self.rank is not None and (not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank < 1):
            raise AdapterError(f"rank must be a positive integer or None, got {self.rank!r}", "invalid_parameter")
        for name in ("lr", "ce_weight", "kl_weight"):
            v = getattr(self, name)
            if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v) or v < 0:
                raise AdapterError(f"{name} must be a finite number >= 0, got {v!r}", "invalid_parameter")
        if self.lr == 0:
            raise AdapterError("lr must be > 0", "invalid_parameter")
        if self.ce_weight == 0 and self.kl_weight == 0:
            raise AdapterError("ce_weight and kl_weight cannot both be 0", "invalid_parameter")
        if self.init not in ("converted", "fresh"):
            raise AdapterError(f"init must be 'converted' or 'fresh', got {self.init!r}", "invalid_parameter")


def student_adapter(adapter: AdapterLike, group_size: int, *, init: str = "converted", rank: int | None = None,
                    seed: int = 0) -> Adapter:
    """The QA-LoRA that `recover` starts from, on the modules of `adapter` (a plain LoRA or a QA-LoRA).

    "converted": the least-squares projection (`to_qalora`) of a plain LoRA, or the QA-LoRA itself;
    with a larger `rank` the extra rows of A' are random and those of B zero, so the update is unchanged.
    "fresh": A' random (PEFT's uniform init over the in/G pooled inputs), B = 0 (no update yet).
    `rank` None: twice the r of a plain LoRA (its A read single inputs; A' reads G-wide means, so
    each rank carries less), the r of a QA-LoRA. alpha / r is kept, so the scaling of the update
    does not change with the rank."""
    if init not in ("converted", "fresh"):
        raise AdapterError(f"init must be 'converted' or 'fresh', got {init!r}", "invalid_parameter")
    adapter = as_adapter(adapter)
    if qalora_group_size(adapter) is None:
        start, _ = to_qalora(adapter, group_size)
    elif qalora_group_size(adapter) != group_size or adapter.config.get("qalora_pooling") != "mean":
        raise IncompatibleAdapters(f"the QA-LoRA has group {qalora_group_size(adapter)} and pooling "
                                   f"{adapter.config.get('qalora_pooling')!r}; the student needs mean pooling "
                                   f"in groups of {group_size}", "group_mismatch")
    else:
        start = adapter
    if start.config.get("rank_pattern") or start.config.get("alpha_pattern"):
        raise AdapterError("adapters with rank_pattern / alpha_pattern are not supported here", "unsupported_adapter")
    r_old = int(start.config.get("r", 8))
    r = rank or (2 * r_old if start is not adapter else r_old)
    if init == "converted" and r < r_old:
        raise AdapterError(f"rank {r} is below the adapter's {r_old}: the converted update would not fit",
                           "invalid_parameter")
    gen = torch.Generator().manual_seed(seed)
    tensors = dict(start.tensors)
    for module, (a, b) in start.pairs():
        n_pooled = a.shape[1]
        bound = 1 / math.sqrt(n_pooled)  # kaiming_uniform(a=sqrt(5)) as nn.Linear and PEFT use
        a_new = (torch.rand(r, n_pooled, generator=gen) * 2 - 1) * bound
        b_new = torch.zeros(b.shape[0], r)
        if init == "converted":
            a_new[:r_old], b_new[:, :r_old] = a.float(), b.float()
        tensors[start.key(module, "A")] = a_new.to(a.dtype)
        tensors[start.key(module, "B")] = b_new.to(b.dtype)
    alpha = float(start.config.get("lora_alpha", r_old)) * r / r_old
    config = dict(start.config, r=r, lora_alpha=int(alpha) if alpha.is_integer() else alpha)
    return Adapter(config=config, tensors=tensors)


def synthetic_examples(base_dir: str | os.PathLike, adapter: AdapterLike, seeds: Iterable[dict], *, n: int = 1024,
                       generator: str = "auto", filter_inputs: bool = True, seed: int = 0,
                       progress: Progress = None) -> tuple[list[dict], dict]:
    """Task inputs written from the seeds and answered by the teacher, the fp base + the original
    adapter (in plain LoRA form): `translora.teacher_examples`. Returns [{"prompt", "completion"}]
    and the stages' reports."""
    from .. import translora

    return translora.teacher_examples(base_dir, to_dense_lora(adapter, weight_shapes(base_dir)), seeds, n=n, generator=generator,
                                      filter_inputs=filter_inputs, seed=seed, progress=progress)


def _distill_loss(model, teacher, batch, cfg: RecoveryConfig) -> torch.Tensor:
    ids, att, lab = batch
    logits = model(input_ids=ids, attention_mask=att).logits[:, :-1].float()
    loss = logits.new_zeros(())
    if cfg.ce_weight:
        tgt = lab[:, 1:]
        loss = loss + cfg.ce_weight * torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), ignore_index=-100)
    if teacher is not None and cfg.kl_weight:
        with torch.no_grad():
            t_logp = teacher(input_ids=ids, attention_mask=att).logits[:, :-1].float().log_softmax(-1)
        s_logp = logits.log_softmax(-1)
        real = att[:, 1:].bool()
        kl = (t_logp.exp() * (t_logp - s_logp)).sum(-1)[real].mean()
        loss = loss + cfg.kl_weight * kl
    return loss


def recover(qmodel: QuantizedModel, adapter: AdapterLike, examples: Iterable[dict], *, steps: int | None = None,
            lr: float | None = None, batch_size: int | None = None, seed: int | None = None,
            teacher: torch.nn.Module | None = None, tokenizer=None, progress: Progress = None,
            config: RecoveryConfig | None = None, eval_examples: Iterable[dict] | None = None,
            ) -> tuple[Adapter, dict]:
    """QA-LoRA fine-tune on the frozen quantized base: only A' and B train (a distillation when
    `teacher` is given and `examples` hold the teacher's answers, e.g. from `synthetic_examples`).

    `adapter` must be in QA-LoRA form (see `student_adapter`). Loss: `config.ce_weight` x
    cross-entropy on the completion tokens + `config.kl_weight` x KL(teacher || student) over every
    real position. With `eval_examples` (the seeds), they are scored every `eval_every` steps
    (`config.select`: completion loss, or greedy exact match with ties to the later state; see
    `SeedSelection`): the best state is returned and training stops after `patience` checks without
    improvement. steps/lr/batch_size/seed override the config's. Deterministic for a given seed."""
    from ..evaluate import load_tokenizer, read_examples

    adapter = as_adapter(adapter)
    cfg = config or RecoveryConfig()
    overrides = {k: v for k, v in (("steps", steps), ("lr", lr), ("batch_size", batch_size), ("seed", seed))
                 if v is not None}
    cfg = dataclasses.replace(cfg, **overrides)
    examples = read_examples(examples)
    checks = read_examples(eval_examples) if eval_examples is not None else None
    if tokenizer is None:
        if qmodel.source_dir is None:
            raise AdapterError("no tokenizer: pass tokenizer= or a model built from a folder", "missing_tokenizer")
        tokenizer = load_tokenizer(qmodel.source_dir)
    torch.manual_seed(cfg.seed)
    model = qmodel.to_model()
    for p in model.parameters():
        p.requires_grad_(False)
    wrappers = attach_qalora(model, adapter)
    params = [p for w in wrappers.values() for p in (w.lora_A, w.lora_B)]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 0.5 * (1 + math.cos(math.pi * i / max(cfg.steps, 1))))
    gen = torch.Generator().manual_seed(cfg.seed)
    bs = min(cfg.batch_size, len(examples))

    def check() -> tuple[float, float | None]:
        return seed_check(model, tokenizer, checks, cfg.select)

    selection = SeedSelection(cfg.select, cfg.patience)
    history, acc_history = [], []

    def record(step: int, loss: float, acc: float | None) -> bool:
        history.append((step, round(loss, 5)))
        if acc is not None:
            acc_history.append((step, acc))
        return selection.offer(step, loss, acc)

    if checks:
        record(0, *check())
    best_params = [p.detach().clone() for p in params]
    losses: list[float] = []
    model.train()
    t0 = time.perf_counter()
    step = 0
    for step in range(1, cfg.steps + 1):
        idx = torch.randperm(len(examples), generator=gen)[:bs].tolist()
        loss = _distill_loss(model, teacher, _sft_batch(tokenizer, [examples[i] for i in idx]), cfg)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        _report(progress, step / cfg.steps, f"recovery step {step}/{cfg.steps}, loss {losses[-1]:.4f}")
        if checks and (step % cfg.eval_every == 0 or step == cfg.steps):
            if record(step, *check()):
                best_params = [p.detach().clone() for p in params]
            elif selection.stop:
                break
    if checks:  # the best state on the seeds (cfg.select), possibly the starting one
        with torch.no_grad():
            for p, b in zip(params, best_params, strict=True):
                p.copy_(b)
    out = _collect(adapter, wrappers)
    report = {"steps": cfg.steps, "steps_run": step, "first_loss": losses[0] if losses else None,
              "final_loss": losses[-1] if losses else None, "seconds": round(time.perf_counter() - t0, 2),
              "train_examples": len(examples), "config": dataclasses.asdict(cfg)}
    if checks:
        report.update(best_step=selection.best_step, best_seed_loss=round(selection.best_loss, 5),
                      seed_loss_history=history, select=cfg.select)
        if cfg.select == "accuracy":
            report.update(best_seed_accuracy=selection.best_accuracy, seed_accuracy_history=acc_history)
    return out, report
