"""Do two bases line up for some weights? Every named tensor exists on both with
the same shape: then a diff (a LoRA is one) taken on one can be added to the
other; otherwise only Trans-LoRA can move the adapter.

The one rule behind "diff or Trans-LoRA?": the library's `check_compatible`
asks it for an adapter's tensors (adapters_ops.transfer, adapters_ops.moving),
the hub's retransfer plan for the weights of an adapter's target modules
(hub/registry/plans.py). Standard library only: the web process imports it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .errors import AdapterError


def natural_key(name: str) -> list:
    """layers.2 before layers.10: the order a person reads a model in."""
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name)]


@dataclass(frozen=True)
class Mismatch:
    tensor: str
    source_shape: tuple[int, ...] | None  # None: the source has no such tensor
    target_shape: tuple[int, ...] | None  # None: the target has no such tensor


def shape(manifest: Mapping[str, dict], name: str) -> tuple[int, ...] | None:
    info = manifest.get(name)
    if info is None:
        return None
    try:
        return tuple(int(d) for d in info["shape"])
    except (TypeError, KeyError, ValueError) as exc:
        raise AdapterError(f"manifest entry {name!r} has no valid shape", "invalid_manifest") from exc


def first_mismatch(source: Mapping[str, dict], target: Mapping[str, dict],
                   names: Sequence[str]) -> tuple[int, Mismatch | None]:
    """(tensors compared, the first that is missing or differs, in the given order)."""
    for i, name in enumerate(names):
        a, b = shape(source, name), shape(target, name)
        if a is None or a != b:
            return i + 1, Mismatch(name, a, b)
    return len(names), None


def module_weights(manifest: Mapping[str, dict], modules: Sequence[str]) -> list[str]:
    """Manifest keys of the weights adapted by these target modules (short names such as
    `q_proj`, matched as a dotted suffix), in reading order."""
    suffixes = tuple(f".{m}.weight" for m in modules)
    exact = {f"{m}.weight" for m in modules}
    return sorted((k for k in manifest if k in exact or k.endswith(suffixes)), key=natural_key)
