"""QA-LoRA adapters: the group-size declaration and its check against a base, plain LoRA ->
QA-LoRA (`to_qalora`), back to an ordinary LoRA (`to_dense_lora`), and their dense updates."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

from .. import qalora_declaration as declaration
from ..adapter import PEFT_PREFIX, Adapter, AdapterLike, as_adapter
from ..errors import AdapterError, IncompatibleAdapters

# --- QA-LoRA adapters -------------------------------------------------------------------


def _weight_name(module: str) -> str:
    return module.removeprefix(PEFT_PREFIX) + ".weight"


def qalora_group_size(adapter: AdapterLike, base_shapes: Mapping[str, Sequence[int]] | None = None) -> int | None:
    """G for a QA-LoRA adapter, None for a plain LoRA, as its config declares it.

    QA-LoRA: ours and the qa-lora repository's (`"qalora_pooling": "mean"`: A' reads the group
    means) or PEFT's GPTQ variant (`"use_qalora": true`: the means times in/G), with
    `"qalora_group_size": G`. Plain PEFT configs also carry `qalora_group_size` (a default), so
    that key alone decides nothing. With `base_shapes` the declaration is checked against the
    shapes of lora_A (`check_base_shapes`)."""
    adapter = as_adapter(adapter)
    if base_shapes is not None:
        return check_base_shapes(adapter, base_shapes)
    return _declared_group(adapter)


def _declared_group(adapter: Adapter) -> int | None:
    try:
        return declaration.declared_group(adapter.config)
    except declaration.DeclarationError as exc:
        raise AdapterError(exc.detail, exc.code) from None


def check_base_shapes(adapter: AdapterLike, base_shapes: Mapping[str, Sequence[int]]) -> int | None:
    """Read every LoRA pair against its base weight and return the QA-LoRA group size (None: a LoRA).

    `base_shapes`: weight name -> shape, HF names (``model.layers.0.self_attn.q_proj.weight``), e.g.
    `weight_shapes(base_dir)` or `QuantizedModel.shapes()`. A LoRA's lora_A has in_features columns,
    a QA-LoRA's in_features / G. The shapes are not allowed to decide alone: a lora_A with in/G
    columns in every module is recognised as QA-LoRA-shaped, and unless the config declares that
    group size (see `qalora_group_size`) it is an error naming both readings:

    * ``qalora_undeclared``: QA-LoRA shapes, a plain LoRA config (the qa-lora repository writes
      one; its group size lives in its code);
    * ``qalora_declaration_mismatch``: the config declares a QA-LoRA whose group size the shapes
      do not have (another G, or the in_features columns of a plain LoRA);
    * ``shape_mismatch`` (IncompatibleAdapters): shapes that fit neither reading, or a lora_B whose
      rows are not the base's outputs; ``missing_module``: no such base weight.
    """
    adapter = as_adapter(adapter)
    declared = _declared_group(adapter)
    swap = bool(adapter.config.get("fan_in_fan_out"))  # Conv1D bases store [in, out]; lora_A is still r x in
    rows = []  # (module, in_features, columns of lora_A)
    for module, (a, b) in adapter.pairs():
        name = _weight_name(module)
        label = module.removeprefix(PEFT_PREFIX)
        shape = base_shapes.get(name)
        if shape is None:
            raise IncompatibleAdapters(f"the base has no weight {name!r}", "missing_module")
        if len(shape) != 2:
            raise IncompatibleAdapters(f"{label}: the base weight {tuple(shape)} is not a linear weight",
                                       "shape_mismatch")
        out_f, in_f = (shape[1], shape[0]) if swap else (shape[0], shape[1])
        if b.shape[0] != out_f:
            raise IncompatibleAdapters(f"lora_B of {label} has {b.shape[0]} rows but the base weight "
                                       f"{tuple(shape)} has {out_f} outputs", "shape_mismatch")
        rows.append((label, int(in_f), int(a.shape[1])))
    implied = declaration.implied_group(rows)
    want = declared or 1
    if implied == want or not rows:
        return declared
    if implied is None:  # no one reading fits every module: name the first that misfits the config's
        label, in_f, cols = next(r for r in rows if r[2] * want != r[1])
        what = f"a QA-LoRA with group size {want}" if declared else "a LoRA"
        need = str(in_f // want) if in_f % want == 0 else f"an in_features divisible by {want}"
        raise IncompatibleAdapters(f"lora_A of {label} has {cols} columns but over in_features {in_f} {what} "
                                   f"needs {need}", "shape_mismatch")
    try:
        declaration.check_reading(rows, declared)
    except declaration.DeclarationError as exc:
        raise AdapterError(exc.detail, exc.code) from None
    return declared


def _pool_factor(adapter: Adapter, module: str) -> float:
    """What multiplies the group means before A': 1 for ours, in/G for PEFT's use_qalora (it scales the
    pooled input by the number of groups)."""
    if adapter.config.get("qalora_pooling") == "mean":
        return 1.0
    return float(adapter.tensors[adapter.key(module, "A")].shape[1])


def qalora_group_update(adapter: AdapterLike, module: str) -> torch.Tensor:
    """c = scaling * k * B @ A' / G (k: `_pool_factor`): the value added to every weight of each (row, group)."""
    adapter = as_adapter(adapter)
    g = qalora_group_size(adapter)
    if g is None:
        raise AdapterError("not a QA-LoRA adapter (no qalora_pooling / use_qalora in its config)", "not_qalora")
    a = adapter.tensors[adapter.key(module, "A")].double()
    b = adapter.tensors[adapter.key(module, "B")].double()
    return (b @ a * (adapter.scaling(module) * _pool_factor(adapter, module) / g)).float()


def dense_updates(adapter: AdapterLike, base_shapes: Mapping[str, Sequence[int]] | None = None,
                  ) -> dict[str, torch.Tensor]:
    """weight name -> the dense update (out x in) of a plain LoRA or a QA-LoRA.

    Pass `base_shapes` (weight name -> shape): the LoRA's shapes are then checked against the base
    (`check_base_shapes`), so a QA-LoRA with a plain LoRA config is refused instead of giving
    out x in/G updates. Without them the config alone says which kind the adapter is."""
    adapter = as_adapter(adapter)
    g = qalora_group_size(adapter, base_shapes)
    if adapter.config.get("fan_in_fan_out"):
        raise AdapterError("fan_in_fan_out adapters are not supported here", "unsupported_adapter")
    out = {}
    for module, _ in adapter.pairs():
        if g is None:
            out[_weight_name(module)] = adapter.delta(module)
        else:
            out[_weight_name(module)] = qalora_group_update(adapter, module).repeat_interleave(g, dim=1)
    return out


def to_dense_lora(adapter: AdapterLike, base_shapes: Mapping[str, Sequence[int]] | None = None) -> Adapter:
    """The ordinary LoRA with the same update (A = A' with each column repeated G times, / G):
    plain PEFT, evaluate.load_model and apply_adapter read it. With `base_shapes` the adapter's
    shapes are checked against the base first (see `dense_updates`)."""
    adapter = as_adapter(adapter)
    g = qalora_group_size(adapter, base_shapes)
    if g is None:
        return adapter
    tensors = dict(adapter.tensors)
    for module, (a, _b) in adapter.pairs():
        k = _pool_factor(adapter, module)
        tensors[adapter.key(module, "A")] = (a.float().repeat_interleave(g, dim=1) * (k / g)).to(a.dtype)
    config = {k: v for k, v in adapter.config.items() if k not in ("qalora_pooling", "use_qalora")}
    return Adapter(config=config, tensors=tensors)


def to_qalora(adapter: AdapterLike, group_size: int) -> tuple[Adapter, dict]:
    """Best group-constant (least-squares) QA-LoRA form of a plain LoRA: A' = sum of A's columns per group.

    Returns the adapter and a report: per-module and overall relative Frobenius error of the update.
    """
    adapter = as_adapter(adapter)
    if qalora_group_size(adapter) is not None:
        raise AdapterError("the adapter is already in QA-LoRA form", "already_qalora")
    if group_size < 1:
        raise AdapterError("group_size must be >= 1", "invalid_parameter")
    if adapter.config.get("fan_in_fan_out"):
        raise AdapterError("fan_in_fan_out adapters are not supported here", "unsupported_adapter")
    tensors = dict(adapter.tensors)
    per, num, den = {}, 0.0, 0.0
    for module, (a, _b) in adapter.pairs():
        r, n = a.shape
        if n % group_size:
            raise IncompatibleAdapters(f"{module}: input dimension {n} is not a multiple of group {group_size}",
                                       "group_mismatch")
        a2 = a.double().view(r, n // group_size, group_size).sum(-1)
        d = adapter.delta(module).double()
        dg = d.view(d.shape[0], n // group_size, group_size).mean(-1, keepdim=True).expand_as(
            d.view(d.shape[0], n // group_size, group_size)).reshape(d.shape)
        e2, d2 = float((d - dg).pow(2).sum()), float(d.pow(2).sum())
        per[module] = math.sqrt(e2 / max(d2, 1e-30))
        num, den = num + e2, den + d2
        tensors[adapter.key(module, "A")] = a2.to(a.dtype)
    # use_qalora stays false: PEFT's flag means its own pooling scale (see the module docstring)
    config = dict(adapter.config, qalora_group_size=group_size, qalora_pooling="mean", use_qalora=False)
    return Adapter(config=config, tensors=tensors), {
        "rel_error": math.sqrt(num / max(den, 1e-30)), "per_module": per}
