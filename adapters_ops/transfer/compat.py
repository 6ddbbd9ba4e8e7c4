"""Whether a diff taken on one base can be added to another: the tensors it touches
exist on both with the same shapes (`check_compatible`, `require_compatible`)."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..adapter import _LORA_KEY, PEFT_PREFIX, Adapter, AdapterLike, as_adapter
from ..errors import AdapterError, IncompatibleAdapters
from .checkpoint_io import _natural_key

# --- compatibility -----------------------------------------------------------------------


@dataclass(frozen=True)
class Mismatch:
    tensor: str
    source_shape: tuple[int, ...] | None  # None: the source has no such tensor
    target_shape: tuple[int, ...] | None  # None: the target has no such tensor


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


def _shape(manifest: Mapping[str, dict], name: str) -> tuple[int, ...] | None:
    info = manifest.get(name)
    if info is None:
        return None
    try:
        return tuple(int(d) for d in info["shape"])
    except (TypeError, KeyError, ValueError) as exc:
        raise AdapterError(f"manifest entry {name!r} has no valid shape", "invalid_manifest") from exc


def _adapter_tensor_names(adapter: Adapter) -> list[str]:
    """Base tensor names an adapter touches: each LoRA module's weight, and
    any other tensor it stores (modules_to_save) under its own name."""
    names = {m.removeprefix(PEFT_PREFIX) + ".weight" for m in adapter.modules()}
    for key in adapter.tensors:
        if not _LORA_KEY.match(key):
            names.add(re.sub(r"\.modules_to_save\.[^.]+", "", key.removeprefix(PEFT_PREFIX)))
    return sorted(names, key=_natural_key)


def _first_mismatch(src: Mapping[str, dict], tgt: Mapping[str, dict],
                    names: Sequence[str]) -> tuple[int, Mismatch | None]:
    for i, name in enumerate(names):
        a, b = _shape(src, name), _shape(tgt, name)
        if a is None or a != b:
            return i + 1, Mismatch(name, a, b)
    return len(names), None


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
