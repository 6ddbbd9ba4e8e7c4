"""Which reading of a LoRA's shapes its config declares: a LoRA, or a QA-LoRA of group size G.

A LoRA's lora_A has in_features columns, a QA-LoRA's in_features / G. Shapes alone must not
decide (the qa-lora repository writes a plain LoRA config and keeps G in its code), so a lora_A
with in/G columns is a QA-LoRA only when the config says so. One rule, in the standard library
alone: upload validation in the web process (which never imports torch) and `adapters_ops.qalora`
both apply it, each raising its own error type from the (code, detail) it returns.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

DECLARATION = ('"qalora_group_size": {g} with "qalora_pooling": "mean" (lora_A reads the group means, as '
               'the qa-lora repository trains it) or with "use_qalora": true (PEFT\'s QA-LoRA: the means '
               'times in/G)')

Row = tuple[str, int, int]  # (module, in_features of its base weight, columns of its lora_A)


class DeclarationError(ValueError):
    """An adapter config or shape reading the rule refuses; `code` names why."""

    def __init__(self, code: str, detail: str):
        super().__init__(detail)
        self.code, self.detail = code, detail


def declared_group(config: Mapping) -> int | None:
    """The group size G the config declares, None for a plain LoRA.

    Declared by `"qalora_pooling": "mean"` (the qa-lora repository's pooling) or PEFT's
    `"use_qalora": true`, each with `"qalora_group_size": G`. PEFT writes qalora_group_size
    (default 16) into every LoraConfig, so that key alone declares nothing."""
    if config.get("qalora_pooling") != "mean" and config.get("use_qalora") is not True:
        return None
    g = config.get("qalora_group_size")
    if not isinstance(g, int) or isinstance(g, bool) or g < 1:
        raise DeclarationError("invalid_config", "a QA-LoRA (qalora_pooling / use_qalora) needs qalora_group_size, "
                                                 f"a positive integer; got {g!r}")
    return g


def implied_group(rows: Sequence[Row]) -> int | None:
    """The one G with columns * G == in_features in every module (1: a LoRA), or None."""
    groups = {in_f // cols if cols and in_f % cols == 0 else None for _, in_f, cols in rows}
    return groups.pop() if len(groups) == 1 else None


def check_reading(rows: Sequence[Row], declared: int | None) -> None:
    """Refuse a single reading of the shapes that is not the declared one, naming both:
    `qalora_undeclared` (QA-LoRA shapes, a plain LoRA config) or `qalora_declaration_mismatch`
    (another G declared, or a QA-LoRA declared on a LoRA's shapes). Shapes that read as no single
    G are left to the caller's own shape checks."""
    implied = implied_group(rows)
    if implied is None or implied == (declared or 1):
        return
    module, in_f, cols = rows[0]
    if declared is None:
        raise DeclarationError(
            "qalora_undeclared",
            f"lora_A of {module} has {cols} columns: a QA-LoRA with group size {implied} over in_features {in_f}, "
            f"not a LoRA ({in_f} columns); declare it in adapter_config.json: {DECLARATION.format(g=implied)}")
    cols_declared = f"{in_f // declared} columns" if in_f % declared == 0 else f"in_features {in_f} is no multiple"
    if implied == 1:
        seen, fix = f"a LoRA over in_features {in_f}", 'remove "qalora_pooling" / "use_qalora" from adapter_config.json'
    else:
        seen, fix = f"a QA-LoRA with group size {implied} over in_features {in_f}", f'declare "qalora_group_size": {implied}'
    raise DeclarationError(
        "qalora_declaration_mismatch",
        f"lora_A of {module} has {cols} columns: {seen}, not a QA-LoRA with the declared qalora_group_size "
        f"{declared} ({cols_declared}); {fix}")
