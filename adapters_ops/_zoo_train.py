"""Training loops of the tiny model family: pretraining / continued training
of the bases and LoRA fine-tuning of the skills (real `peft`). Deterministic:
seeded init and batch order, fixed thread count, deterministic algorithms."""

from __future__ import annotations

import contextlib
import ctypes
import math
import os
import random
from collections.abc import Iterator
from pathlib import Path

import torch

from ._zoo_data import BOS_ID, EOS_ID, PAD_ID, encode
from .errors import AdapterError

LINEAR_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


# Why builds differed with the thread count: MKL splits the reduction dimension of a GEMM
# across threads when it is long, and the weight gradients (grad_out^T @ input, summed over
# every token of the batch) are such GEMMs; forward passes matched bit for bit, gradients
# did not (1 vs 2 threads, by ~1e-9), and training amplified that. MKL's conditional numerical
# reproducibility in strict mode fixes the summation order whatever the thread count. It can
# only be chosen before MKL's first call, so it is asked for when this module is imported.
_MKL_CBWR_AUTO, _MKL_CBWR_STRICT, _MKL_CBWR_ALL = 2, 0x10000, -1


def _mkl():
    lib = Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"
    try:
        mkl = ctypes.CDLL(str(lib))
        mkl.mkl_serv_cbwr_get, mkl.mkl_serv_cbwr_set  # noqa: B018 - both symbols or none
        return mkl
    except (OSError, AttributeError):
        return None  # not a Linux MKL build of torch


def _ask_strict_mkl() -> None:
    if torch.backends.mkl.is_available() and (mkl := _mkl()) is not None:
        mkl.mkl_serv_cbwr_set(_MKL_CBWR_AUTO | _MKL_CBWR_STRICT)  # refused once MKL is initialised


_ask_strict_mkl()


def blas_reproducibility() -> str:
    """'mkl-strict' (GEMMs independent of the thread count), 'mkl-off' (MKL was initialised
    before this module was imported) or 'no-mkl' (another BLAS: builds use one thread)."""
    mkl = _mkl() if torch.backends.mkl.is_available() else None
    if mkl is None:
        return "no-mkl"
    return "mkl-strict" if mkl.mkl_serv_cbwr_get(_MKL_CBWR_ALL) & _MKL_CBWR_STRICT else "mkl-off"


def default_threads() -> int:
    """min(2, cores), or 1 on a machine already busier than its cores (or $ZOO_THREADS).

    OpenMP workers spin while they wait: with other jobs on both cores, 2 threads
    trained 10x slower than 1 here. Under MKL's strict mode the thread count does not
    change the bytes (tests build with 1 and 2 threads and compare), so the choice by
    load cannot break determinism.
    """
    if os.environ.get("ZOO_THREADS"):
        return max(1, int(os.environ["ZOO_THREADS"]))
    cores = os.cpu_count() or 1
    try:
        if os.getloadavg()[0] >= cores:
            return 1
    except OSError:
        pass
    return min(2, cores)


@contextlib.contextmanager
def deterministic(threads: int | None = None) -> Iterator[None]:
    """Fixed thread count + deterministic algorithms for the block, restored after.

    Raises AdapterError when MKL runs without strict reproducibility (it was initialised
    before this module was imported): the bytes would then depend on the thread count.
    Without MKL the block runs on one thread, the only count whose sums are known fixed.
    """
    mode = blas_reproducibility()
    if mode == "mkl-off":
        raise AdapterError(
            "MKL was initialised before adapters_ops._zoo_train was imported, without strict "
            "reproducibility, so the weights would depend on the thread count; set "
            "MKL_CBWR=AUTO,STRICT or import adapters_ops._zoo_train first", "nondeterministic_blas")
    old_threads = torch.get_num_threads()
    old_det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(1 if mode == "no-mkl" else threads or default_threads())
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old_det)
        torch.set_num_threads(old_threads)


def llama_config(vocab_size: int, hidden: int, intermediate: int, layers: int, heads: int, kv_heads: int,
                 max_positions: int = 128):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=max_positions,
        tie_word_embeddings=False, bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID,
        rope_theta=10000.0, attn_implementation="sdpa",
    )


def _batch(seqs: list[list[int]], masks: list[list[bool]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded input_ids, attention_mask and labels (-100 where not trained)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), PAD_ID, dtype=torch.long)
    att = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), -100, dtype=torch.long)
    for i, (s, m) in enumerate(zip(seqs, masks, strict=True)):
        ids[i, :len(s)] = torch.tensor(s)
        att[i, :len(s)] = 1
        labels[i, :len(s)] = torch.where(torch.tensor(m), torch.tensor(s), torch.tensor(-100))
    return ids, att, labels


def lm_examples(docs: list[str]) -> tuple[list[list[int]], list[list[bool]]]:
    """Plain LM documents: <s> text </s>, loss on every token after <s>."""
    seqs = [[BOS_ID] + encode(d) + [EOS_ID] for d in docs]
    return seqs, [[False] + [True] * (len(s) - 1) for s in seqs]


def sft_examples(items: list[dict]) -> tuple[list[list[int]], list[list[bool]]]:
    """Prompt/completion pairs: <s> prompt completion </s>, loss on the completion and </s> only."""
    seqs, masks = [], []
    for it in items:
        p, c = [BOS_ID] + encode(it["prompt"]), encode(it["completion"]) + [EOS_ID]
        seqs.append(p + c)
        masks.append([False] * len(p) + [True] * len(c))
    return seqs, masks


def train(model, seqs, masks, *, steps: int, batch_size: int, lr: float, seed: int,
          warmup: int = 20, weight_decay: float = 0.0, on_step=None) -> float:
    """AdamW with linear warmup and cosine decay over seeded random batches.
    Returns the mean loss of the last 20 steps. `on_step(done, loss)`, if given,
    is called after each step (progress output; it must not touch the model)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    rng = random.Random(seed)  # batch order; torch.randint with a generator is oddly slow on CPU
    model.train()
    tail = []
    for step in range(steps):
        idx = [rng.randrange(len(seqs)) for _ in range(batch_size)]
        ids, att, labels = _batch([seqs[i] for i in idx], [masks[i] for i in idx])
        loss = model(input_ids=ids, attention_mask=att, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        if step >= steps - 20:
            tail.append(loss.item())
        if on_step is not None:
            on_step(step + 1, loss.detach())
    model.eval()
    return sum(tail) / max(1, len(tail))


def new_model(config, seed: int):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(config)


def lora_model(base, r: int, alpha: int, seed: int):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    cfg = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(LINEAR_TARGETS),
                     bias="none", task_type="CAUSAL_LM")
    return get_peft_model(base, cfg)


def relative_drift(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """||b - a|| / ||a|| over all parameters taken as one vector."""
    num = sum(float((b[k].double() - a[k].double()).pow(2).sum()) for k in a)
    den = sum(float(a[k].double().pow(2).sum()) for k in a)
    return math.sqrt(num / den)
