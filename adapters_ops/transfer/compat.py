"""Whether a diff taken on one base can be added to another: the tensors it touches
exist on both with the same shapes (`check_compatible`, `require_compatible`), by
the rule of adapters_ops.lineup that the hub's retransfer plan asks too."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from ..adapter import _LORA_KEY, PEFT_PREFIX, Adapter, AdapterLike, as_adapter
from ..errors import IncompatibleAdapters
from ..lineup import Mismatch, first_mismatch, shape
from ..lineup import natural_key as _natural_key

# --- compatibility -----------------------------------------------------------------------


@dataclass(frozen=True)
class Compatibility:
    compatible: bool
    checked: int  # tensors compared
    mismatch: Mismatch | None = None
    message: str = ""

    def __bool__(self) -> bool:
        return self.compatible


_TRANSLORA_HINT = ("the bases' weights do not line up, so a diff (a LoRA is one) cannot be added to the target; "
                   "use Trans-LoRA instead (`hubctl transfer --method translora`), which distills the adapter "
                   "onto any target through synthetic data")


def _adapter_tensor_names(adapter: Adapter) -> list[str]:
    """Base tensor names an adapter touches: each LoRA module's weight, and
    any other tensor it stores (modules_to_save) under its own name."""
    names = {m.removeprefix(PEFT_PREFIX) + ".weight" for m in adapter.modules()}
    for key in adapter.tensors:
        if not _LORA_KEY.match(key):
            names.add(re.sub(r"\.modules_to_save\.[^.]+", "", key.removeprefix(PEFT_PREFIX)))
    return sorted(names, key=_natural_key)


# the rule itself, shared with the hub's retransfer plan
_first_mismatch, _shape = first_mismatch, shape


def check_compatible(source_manifest: Mapping[str, dict], target_manifest: Mapping[str, dict],
                     adapter: AdapterLike | None = None) -> Compatibility:
    """Whether a diff taken on `source` can be added to `target`: every tensor the
    adapter targets (every tensor of either base when no adapter is given) exists
    on both with the same shape. Dtypes may differ: diffs are cast. The first
    mismatch (in reading order: layers.2 before layers.10) is named with both shapes."""
    src = {k: v for k, v in source_manifest.items() if k != "__metadata__"}
    tgt = {k: v for k, v in target_manifest.items() if k != "__metadata__"}
    names = (_adapter_tensor_names(as_adapter(adapter)) if adapter is not None
             else sorted(set(src) | set(tgt), key=_natural_key))
    checked, mm = _first_mismatch(src, tgt, names)
    if mm is None:
        return Compatibility(True, checked, None, f"{checked} tensors have the same shapes on both bases")
    name, a, b = mm.tensor, mm.source_shape, mm.target_shape
    if a is None and adapter is not None:
        why = f"{name} is not in the source base, so the adapter does not belong to it"
    elif a is None:
        why = f"{name} (shape {list(b)}) is in the target base but not in the source"
    elif b is None:
        why = f"{name} (shape {list(a)}) is missing from the target base"
    else:
        why = f"{name} has shape {list(a)} in the source base and {list(b)} in the target"
    return Compatibility(False, checked, mm, f"{why}: {_TRANSLORA_HINT}.")


def require_compatible(source_manifest: Mapping[str, dict], target_manifest: Mapping[str, dict],
                       adapter: AdapterLike | None = None) -> Compatibility:
    """check_compatible, raising IncompatibleAdapters (code shape_mismatch) when not."""
    result = check_compatible(source_manifest, target_manifest, adapter)
    if not result:
        raise IncompatibleAdapters(result.message, "shape_mismatch")
    return result
