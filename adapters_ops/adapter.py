"""Adapter = a PEFT LoRA config + its tensors, under PEFT's key names.

`Adapter.load(dir)` reads `adapter_config.json` and `adapter_model.safetensors`
(the layout `peft` writes and reads); `save(dir)` writes the same layout
atomically (temporary names, then `os.replace`).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import peft_patterns
from .errors import AdapterError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PEFT's wrapper around the base model's module names

# base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight
_LORA_KEY = re.compile(r"^(?P<module>.+)\.lora_(?P<factor>[AB])(?:\.[^.]+)?\.weight$")


@dataclass
class Adapter:
    config: dict
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)

    # --- io -----------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike, device: str = "cpu") -> Adapter:
        path = Path(path)
        cfg_path = path / CONFIG_NAME
        if not cfg_path.is_file():
            raise AdapterError(f"{path} has no {CONFIG_NAME}", "missing_config")
        try:
            config = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as exc:
            raise AdapterError(f"{CONFIG_NAME} is not valid JSON: {exc}", "invalid_config") from exc
        weights = path / WEIGHTS_NAME
        if not weights.is_file():
            raise AdapterError(f"{path} has no {WEIGHTS_NAME}", "missing_weights")
        tensors = {}
        with safe_open(str(weights), framework="pt", device=device) as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
        adapter = cls(config=config, tensors=tensors)
        adapter.validate()
        return adapter

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        tmp_w = path / (WEIGHTS_NAME + ".tmp")
        save_file({k: v.contiguous() for k, v in self.tensors.items()}, str(tmp_w), metadata={"format": "pt"})
        os.replace(tmp_w, path / WEIGHTS_NAME)
        tmp_c = path / (CONFIG_NAME + ".tmp")
        tmp_c.write_text(json.dumps(self.config, indent=2, sort_keys=True))
        os.replace(tmp_c, path / CONFIG_NAME)
        return path

    # --- structure ------------------------------------------------------------
    def validate(self) -> None:
        if str(self.config.get("peft_type", "")).upper() != "LORA":
            raise AdapterError(f"peft_type must be LORA, got {self.config.get('peft_type')!r}", "not_lora")
        for module, (a, b) in self.pairs():
            if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
                raise AdapterError(
                    f"{module}: lora_A {tuple(a.shape)} and lora_B {tuple(b.shape)} do not form a low-rank pair",
                    "shape_mismatch",
                )

    def modules(self) -> list[str]:
        """Module prefixes that carry a LoRA pair, in a stable order."""
        seen = {}
        for key in self.tensors:
            m = _LORA_KEY.match(key)
            if m:
                seen.setdefault(m["module"], None)
        return sorted(seen)

    def pairs(self) -> Iterator[tuple[str, tuple[torch.Tensor, torch.Tensor]]]:
        """(module, (A, B)) for each module; A is r x in, B is out x r."""
        a_keys, b_keys = {}, {}
        for key in self.tensors:
            m = _LORA_KEY.match(key)
            if m:
                (a_keys if m["factor"] == "A" else b_keys)[m["module"]] = key
        for module in sorted(a_keys):
            if module not in b_keys:
                raise AdapterError(f"{module} has lora_A but no lora_B", "missing_tensor")
            yield module, (self.tensors[a_keys[module]], self.tensors[b_keys[module]])
        for module in b_keys:
            if module not in a_keys:
                raise AdapterError(f"{module} has lora_B but no lora_A", "missing_tensor")

    def key(self, module: str, factor: str) -> str:
        return f"{module}.lora_{factor}.weight"

    def rank(self, module: str) -> int:
        return int(self.tensors[self.key(module, "A")].shape[0])

    def scaling(self, module: str) -> float:
        """The factor PEFT multiplies B @ A by: alpha / r, or alpha / sqrt(r) with rslora.

        `rank_pattern` / `alpha_pattern` override r and alpha for modules whose
        name ends with (or matches) the pattern key, as PEFT does.
        """
        r = self._pattern_value("rank_pattern", module, self.config.get("r", 8))
        alpha = self._pattern_value("alpha_pattern", module, self.config.get("lora_alpha", r))
        if self.config.get("use_rslora"):
            return float(alpha) / float(r) ** 0.5
        return float(alpha) / float(r)

    def _pattern_value(self, field_name: str, module: str, default):
        # PEFT's rule, in the implementation upload validation shares (adapters_ops.peft_patterns).
        name = module.removeprefix(PEFT_PREFIX).removesuffix(".weight")
        return peft_patterns.pattern_value(self.config.get(field_name), name, default, allow_regex=True)

    def delta(self, module: str) -> torch.Tensor:
        """The dense update this module adds to its base weight: scaling * B @ A."""
        a = self.tensors[self.key(module, "A")].float()
        b = self.tensors[self.key(module, "B")].float()
        return (b @ a) * self.scaling(module)

    @property
    def target_modules(self) -> list[str]:
        tm = self.config.get("target_modules") or []
        return sorted(tm) if isinstance(tm, list) else [tm]

    @property
    def base_model_name(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    def num_parameters(self) -> int:
        return sum(t.numel() for t in self.tensors.values())


AdapterLike = Adapter | str | os.PathLike
"""What every library entry point takes: a loaded Adapter, or a PEFT adapter folder."""


def as_adapter(adapter: AdapterLike) -> Adapter:
    """The one rule for entry points: an Adapter is used as is, a path is loaded (and validated)."""
    if isinstance(adapter, Adapter):
        return adapter
    if isinstance(adapter, str | os.PathLike):
        return Adapter.load(adapter)
    raise AdapterError(f"expected an Adapter or a PEFT adapter folder, got {type(adapter).__name__}",
                       "invalid_adapter")
