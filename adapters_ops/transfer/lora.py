"""Moving a LoRA by its diff: `rebase` (exact, the adapter is the diff), `recycle_finetune`
on the target, and `transfer` (both, after the compatibility check)."""

from __future__ import annotations

import copy
import math
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch

from ..adapter import _LORA_KEY, PEFT_PREFIX, Adapter, AdapterLike, as_adapter
from ..errors import AdapterError, IncompatibleAdapters
from ..evaluate import read_examples
from ..evaluate import sft_batch as _sft_batch
from .checkpoint_io import Progress, _report, manifest_of
from .compat import _shape, require_compatible

# --- adapters: rebase, recycle, transfer --------------------------------------------------


def _check_scale(scale: float) -> float:
    try:
        scale = float(scale)
    except (TypeError, ValueError) as exc:
        raise AdapterError(f"scale must be a number, got {scale!r}", "invalid_parameter") from exc
    if not math.isfinite(scale):
        raise AdapterError(f"scale must be finite, got {scale}", "invalid_parameter")
    return scale


def rebase(adapter: AdapterLike, target_slug: str, scale: float = 1.0) -> Adapter:
    """The same LoRA labelled for the target base: `base_model_name_or_path` set
    to `target_slug`, and `scale` (the paper's diff-vector coefficient) folded
    into every lora_B, so each module's update becomes scale * delta. The input
    is not modified."""
    scale = _check_scale(scale)
    if not isinstance(target_slug, str) or not target_slug:
        raise AdapterError("target_slug must be a non-empty string", "invalid_parameter")
    adapter = as_adapter(adapter)
    adapter.validate()
    tensors = {}
    for key, t in adapter.tensors.items():
        m = _LORA_KEY.match(key)
        tensors[key] = (t * scale).to(t.dtype) if (m and m["factor"] == "B" and scale != 1.0) else t.clone()
    config = copy.deepcopy(adapter.config)
    config["base_model_name_or_path"] = target_slug
    return Adapter(config=config, tensors=tensors)


def _require_fits(adapter: Adapter, manifest: Mapping[str, dict]) -> None:
    """Every LoRA module of the adapter has a weight of the matching shape in the base."""
    fifo = bool(adapter.config.get("fan_in_fan_out"))
    for module, (a, b) in adapter.pairs():
        name = module.removeprefix(PEFT_PREFIX) + ".weight"
        want = (a.shape[1], b.shape[0]) if fifo else (b.shape[0], a.shape[1])
        got = _shape(manifest, name)
        if got != tuple(want):
            have = "has no such tensor" if got is None else f"has {list(got)}"
            raise IncompatibleAdapters(f"{name}: the adapter's update is {list(want)}, the base {have}",
                                       "shape_mismatch")


def recycle_finetune(adapter: AdapterLike, target_base_dir: str | os.PathLike, examples, *, steps: int = 50,
                     lr: float = 1e-3, batch_size: int = 8, seed: int = 0, weight_decay: float = 0.0,
                     target_slug: str | None = None, progress: Progress = None) -> Adapter:
    """Short fine-tune of a transferred LoRA on the target base ("recycling then
    fine-tuning"): the target loaded with AutoModelForCausalLM (fp32), the adapter
    attached with real `peft` (trainable), AdamW on the LoRA factors only over
    seeded random batches of {"prompt", "completion"} examples, loss on the
    completion tokens. Same seed, same inputs, same threads -> same result.
    Returns a new Adapter with the config of the input (base set to
    `target_slug` when given) and its tensors' dtypes."""
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict
    from transformers import AutoModelForCausalLM, AutoTokenizer

    items = read_examples(examples)  # the library's one seed-examples reader
    if not isinstance(steps, int) or steps < 1:
        raise AdapterError(f"steps must be a positive integer, got {steps!r}", "invalid_parameter")
    if not (isinstance(lr, int | float) and lr > 0 and math.isfinite(lr)):
        raise AdapterError(f"lr must be a positive number, got {lr!r}", "invalid_parameter")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise AdapterError(f"batch_size must be a positive integer, got {batch_size!r}", "invalid_parameter")
    target_base_dir = Path(target_base_dir)
    if not (target_base_dir / "config.json").is_file():
        raise AdapterError(f"{target_base_dir} is not a model directory (no config.json)", "missing_base")
    adapter = as_adapter(adapter)
    adapter.validate()
    _require_fits(adapter, manifest_of(target_base_dir))

    torch.manual_seed(seed)  # dropout, if the adapter config asks for it
    tok = AutoTokenizer.from_pretrained(str(target_base_dir))
    model = AutoModelForCausalLM.from_pretrained(str(target_base_dir), dtype=torch.float32)
    with tempfile.TemporaryDirectory(prefix="recycle-") as tmp:
        adapter.save(tmp)
        model = PeftModel.from_pretrained(model, tmp, is_trainable=True)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    bs = min(batch_size, len(items))
    model.train()
    for step in range(steps):
        idx = torch.randperm(len(items), generator=gen)[:bs].tolist()
        ids, att, labels = _sft_batch(tok, [items[i] for i in idx])
        loss = model(input_ids=ids, attention_mask=att, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        _report(progress, (step + 1) / steps, f"recycle step {step + 1}/{steps}, loss {loss.item():.4f}")
    model.eval()
    state = get_peft_model_state_dict(model)
    tensors = {}
    for key, t in adapter.tensors.items():
        if key not in state:
            raise AdapterError(f"peft did not return {key} after training", "missing_tensor")
        tensors[key] = state[key].detach().to(t.dtype).clone()
    config = copy.deepcopy(adapter.config)
    if target_slug:
        config["base_model_name_or_path"] = target_slug
    return Adapter(config=config, tensors=tensors)


def transfer(adapter: AdapterLike, source_base_dir: str | os.PathLike, target_base_dir: str | os.PathLike,
             target_slug: str, *, scale: float = 1.0, examples=None, steps: int = 0, lr: float = 1e-3,
             seed: int = 0, progress: Progress = None) -> tuple[Adapter, dict]:
    """The diff path of a move, for library users: check that the bases line up for this adapter
    (IncompatibleAdapters with the first mismatch otherwise), rebase, and when
    `examples` and `steps` are given recycle-fine-tune on the target.
    Returns the new adapter and JSON-able params/metrics. A transfer job runs
    adapters_ops.moving.move, which adds the gate, Trans-LoRA and the verdict."""
    adapter = as_adapter(adapter)
    _report(progress, 0.0, "checking base compatibility")
    compat = require_compatible(manifest_of(source_base_dir), manifest_of(target_base_dir), adapter)
    out = rebase(adapter, target_slug, scale)
    info = {"method": "diff", "scale": _check_scale(scale), "checked_tensors": compat.checked,
            "source_base": adapter.base_model_name, "target_base": target_slug, "recycle_steps": 0}
    if examples is not None and steps:
        def sub(f, msg):
            _report(progress, 0.05 + 0.95 * f, msg)
        out = recycle_finetune(out, target_base_dir, examples, steps=steps, lr=lr, seed=seed,
                               target_slug=target_slug, progress=sub)
        info.update(recycle_steps=steps, lr=lr, seed=seed)
    _report(progress, 1.0, "transferred")
    return out, info
