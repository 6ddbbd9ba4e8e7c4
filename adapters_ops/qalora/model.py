"""A quantized model: every target projection of a base quantized group-wise, its exact
merge of a QA-LoRA into the zero points, and the `quantized.safetensors` file."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..adapter import AdapterLike, as_adapter
from ..errors import AdapterError, CorruptFile, IncompatibleAdapters
from .codec import (
    _HF_SIDE_FILES,
    FORMAT,
    FORMAT_VERSION,
    QUANT_FILE,
    TARGETS,
    Progress,
    QuantizedWeight,
    QuantSpec,
    _report,
    _weight_error,
    quantize_weight,
    unpack_codes,
)
from .conversion import _weight_name, check_base_shapes, dense_updates, qalora_group_update

# --- a quantized model ------------------------------------------------------------------


def _is_target(name: str, targets: Sequence[str]) -> bool:
    parts = name.split(".")
    return len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in targets


@dataclass
class QuantizedModel:
    """A base whose target projections are group-quantized; every other tensor kept as is."""

    config: dict  # the HF config.json
    spec: QuantSpec
    weights: dict[str, QuantizedWeight]
    others: dict[str, torch.Tensor]
    errors: dict[str, dict] = dataclasses.field(default_factory=dict)  # per layer: rel_error, max_abs_error
    source_dir: Path | None = None  # where tokenizer files come from

    # -- build ----------------------------------------------------------------------------
    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], config: dict, spec: QuantSpec,
                        targets: Sequence[str] = TARGETS, deltas: dict[str, torch.Tensor] | None = None,
                        ) -> QuantizedModel:
        """Quantize the `targets` projections of an in-memory state dict (HF names, e.g.
        ``model.layers.0.self_attn.q_proj.weight``); every other tensor is kept as is.

        `config` is the model's HF config as a dict (``to_model`` builds the model from it).
        `deltas` (weight name -> dense update of the same shape, e.g. ``dense_updates(adapter,
        base_shapes=...)``) are added before quantizing: the naive merge-then-quantize baseline."""
        deltas = dict(deltas or {})
        weights, others, errors = {}, {}, {}
        for name, t in state.items():
            if _is_target(name, targets):
                w = t.float()
                if name in deltas:
                    d = deltas.pop(name)
                    if tuple(d.shape) != tuple(t.shape):
                        raise IncompatibleAdapters(f"{name}: an update of shape {tuple(d.shape)} does not fit the "
                                                   f"weight {tuple(t.shape)}", "shape_mismatch")
                    w = w + d.float()
                qw = quantize_weight(w, spec.bits, spec.group_size, spec.zero_point)
                weights[name] = qw
                errors[name] = _weight_error(w, qw.dequantize())
            else:
                others[name] = t
        if deltas:
            raise IncompatibleAdapters(f"an update for {next(iter(deltas))!r}, which is not a quantized projection "
                                       "of this state dict", "missing_module")
        if not weights:
            raise AdapterError(f"no weights named like {', '.join(targets)} to quantize", "nothing_to_quantize")
        return cls(config=config, spec=spec, weights=weights, others=others, errors=errors)

    def summary(self) -> dict:
        rel = [e["rel_error"] for e in self.errors.values()]
        return {
            "layers": len(self.weights), "mean_rel_error": sum(rel) / len(rel) if rel else None,
            "max_rel_error": max(rel) if rel else None,
            "max_abs_error": max((e["max_abs_error"] for e in self.errors.values()), default=None),
        }

    # -- use ------------------------------------------------------------------------------
    def state_dict(self, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in self.others.items()}
        sd.update({k: qw.dequantize(dtype) for k, qw in self.weights.items()})
        return sd

    def to_model(self, dtype: torch.dtype = torch.float32):
        """A transformers model holding the dequantized weights (eval mode)."""
        from transformers import AutoConfig, AutoModelForCausalLM

        cfg = AutoConfig.for_model(**{k: v for k, v in self.config.items() if k != "transformers_version"})
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        missing, unexpected = model.load_state_dict(self.state_dict(dtype), strict=False)
        tied = set()
        if getattr(cfg, "tie_word_embeddings", False):
            # the output head is the input embedding (SmolLM2, Llama 3.2): checkpoints leave it out
            head = model.get_output_embeddings()
            tied = {f"{n}.weight" for n, m in model.named_modules() if head is not None and m is head}
        missing = [k for k in missing if not k.endswith("rotary_emb.inv_freq") and k not in tied]
        if missing or unexpected:
            raise CorruptFile(f"quantized model does not match its config: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}", "state_mismatch")
        if tied:
            model.tie_weights()
        return model.eval()

    def shapes(self) -> dict[str, tuple[int, ...]]:
        """weight name -> shape of every tensor of the (dequantized) model."""
        out = {k: tuple(t.shape) for k, t in self.others.items()}
        out.update({k: tuple(qw.shape) for k, qw in self.weights.items()})
        return out

    def merge(self, adapter: AdapterLike) -> QuantizedModel:
        """Fold a QA-LoRA adapter into the zero points (codes and scales untouched)."""
        adapter = as_adapter(adapter)
        for module, _ in adapter.pairs():
            if _weight_name(module) not in self.weights:
                raise IncompatibleAdapters(f"the quantized base has no quantized weight {_weight_name(module)!r}",
                                           "missing_module")
        g = check_base_shapes(adapter, self.shapes())
        if g is None:
            raise AdapterError("only QA-LoRA adapters merge exactly; convert a plain LoRA with to_qalora()",
                               "not_qalora")
        if g % self.spec.group_size:
            raise IncompatibleAdapters(
                f"QA-LoRA group {g} is not a multiple of the quantization group {self.spec.group_size}: "
                "its update is not constant inside each quantization group", "group_mismatch")
        merged = dict(self.weights)
        for module, _ in adapter.pairs():
            name = _weight_name(module)
            if name not in self.weights:
                raise IncompatibleAdapters(f"the quantized base has no quantized weight {name!r}", "missing_module")
            qw = self.weights[name]
            c = qalora_group_update(adapter, module)  # out x in/g
            if c.shape[0] != qw.shape[0] or c.shape[1] * g != qw.shape[1]:
                raise IncompatibleAdapters(f"{name}: QA-LoRA update {tuple(c.shape)} x group {g} does not fit "
                                           f"weight {qw.shape}", "shape_mismatch")
            merged[name] = qw.shift(c.repeat_interleave(g // self.spec.group_size, dim=1))
        return dataclasses.replace(self, weights=merged)

    def integer_zero_error(self) -> dict:
        """What a GPTQ/AWQ-style format (integer zero points in 0..2**bits-1) would lose: round z and compare."""
        num = den = 0.0
        worst = 0.0
        for qw in self.weights.values():
            w = qw.dequantize()
            zi = torch.round(qw.zeros).clamp(0, self.spec.qmax)
            d = w - dataclasses.replace(qw, zeros=zi).dequantize()
            num += float(d.pow(2).sum())
            den += float(w.pow(2).sum())
            worst = max(worst, float(d.abs().max()))
        frac = max(float((qw.zeros - torch.round(qw.zeros)).abs().max()) for qw in self.weights.values())
        return {"rel_error": math.sqrt(num / max(den, 1e-30)), "max_abs_error": worst, "max_zero_fraction": frac}

    def storage_bytes(self) -> int:
        return sum(qw.storage_bytes() for qw in self.weights.values()) + sum(
            t.numel() * t.element_size() for t in self.others.values())

    # -- io -------------------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, qw in self.weights.items():
            out[f"{name}.qweight"] = qw.packed()
            out[f"{name}.scales"] = qw.scales.half()
            out[f"{name}.zeros"] = qw.zeros.half()
        out.update(self.others)
        return {k: v.contiguous() for k, v in out.items()}

    def save(self, out_dir: str | os.PathLike) -> Path:
        """Write quantized.safetensors (+ config.json and tokenizer files) into out_dir."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        tensors = self.tensors()
        meta = {
            "format": FORMAT, "version": FORMAT_VERSION, "bits": str(self.spec.bits),
            "group_size": str(self.spec.group_size), "zero_point": self.spec.zero_point,
            "quantized": json.dumps({k: list(qw.shape) for k, qw in sorted(self.weights.items())}),
            "sha256": _tensors_sha256(tensors),
        }
        tmp = out / (QUANT_FILE + ".tmp")
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, out / QUANT_FILE)
        (out / "config.json").write_text(json.dumps(self.config, indent=2, sort_keys=True))
        if self.source_dir is not None:
            for f in _HF_SIDE_FILES[1:]:
                src = Path(self.source_dir) / f
                if src.is_file() and src.resolve() != (out / f).resolve():
                    shutil.copy2(src, out / f)
        return out

    def save_dequantized(self, out_dir: str | os.PathLike, dtype: torch.dtype = torch.float32) -> Path:
        """An ordinary HF folder (dequantized weights) that evaluate() and from_pretrained() read:
        how a quantized result is scored for its verdict."""
        out = Path(out_dir)
        self.to_model(dtype).save_pretrained(str(out))
        if self.source_dir is not None:
            for f in _HF_SIDE_FILES[2:]:
                if (Path(self.source_dir) / f).is_file():
                    shutil.copy2(Path(self.source_dir) / f, out / f)
        return out


def _tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}\0{t.dtype}\0{list(t.shape)}\0".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _read_config(base_dir: Path) -> dict:
    p = base_dir / "config.json"
    if not p.is_file():
        raise AdapterError(f"{base_dir} is not a model directory (no config.json)", "missing_base")
    return json.loads(p.read_text())


def _base_weights(base_dir: Path) -> list[Path]:
    files = sorted(base_dir.glob("*.safetensors"))
    files = [f for f in files if f.name != QUANT_FILE]
    if not files:
        raise AdapterError(f"{base_dir} has no safetensors weights", "missing_weights")
    return files


def weight_shapes(base_dir: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """tensor name -> shape for every tensor of a base folder, read from the safetensors headers only."""
    out = {}
    for f in _base_weights(Path(base_dir)):
        with safe_open(str(f), framework="pt") as fh:
            for name in fh.keys():
                out[name] = tuple(fh.get_slice(name).get_shape())
    return out


def quantize_base(base_dir: str | os.PathLike, bits: int = 4, group_size: int = 64, *, zero_point: str = "float",
                  targets: Sequence[str] = TARGETS, adapter: AdapterLike | None = None,
                  progress: Progress = None) -> QuantizedModel:
    """Quantize a base's linear projections, read tensor by tensor. With `adapter`, quantize
    W + its dense LoRA update instead (the naive merge-then-quantize baseline); its shapes are
    checked against the base first (`check_base_shapes`)."""
    spec = QuantSpec(bits, group_size, zero_point)
    base_dir = Path(base_dir)
    config = _read_config(base_dir)
    files = _base_weights(base_dir)
    deltas = dense_updates(as_adapter(adapter), base_shapes=weight_shapes(base_dir)) if adapter is not None else {}
    weights, others, errors = {}, {}, {}
    for fi, f in enumerate(files):
        with safe_open(str(f), framework="pt") as fh:
            keys = list(fh.keys())
            for ki, name in enumerate(keys):
                t = fh.get_tensor(name)
                if _is_target(name, targets):
                    w = t.float() + deltas.pop(name) if name in deltas else t.float()  # shapes checked above
                    qw = quantize_weight(w, spec.bits, spec.group_size, spec.zero_point)
                    weights[name] = qw
                    errors[name] = _weight_error(w, qw.dequantize())
                else:
                    others[name] = t
                _report(progress, (fi + (ki + 1) / len(keys)) / len(files), f"quantized {name}")
    if deltas:
        raise IncompatibleAdapters(f"the adapter updates {next(iter(deltas))!r}, which is not a quantized "
                                   "projection of this base", "missing_module")
    if not weights:
        raise AdapterError(f"no weights named like {', '.join(targets)} in {base_dir}", "nothing_to_quantize")
    return QuantizedModel(config=config, spec=spec, weights=weights, others=others, errors=errors,
                          source_dir=base_dir)


def load_quantized(path: str | os.PathLike) -> QuantizedModel:
    """Read a folder written by QuantizedModel.save; the checksum is verified."""
    path = Path(path)
    f = path / QUANT_FILE if path.is_dir() else path
    if not f.is_file():
        raise AdapterError(f"{path} has no {QUANT_FILE}", "missing_weights")
    try:
        fh_ctx = safe_open(str(f), framework="pt")
    except Exception as exc:  # safetensors raises its own error types for damaged headers
        raise CorruptFile(f"{f.name} is not a readable safetensors file: {exc}") from exc
    with fh_ctx as fh:
        meta = fh.metadata() or {}
        if meta.get("format") != FORMAT:
            raise CorruptFile(f"{f.name} is not an {FORMAT} file (format={meta.get('format')!r})", "wrong_format")
        if meta.get("version") != FORMAT_VERSION:
            raise CorruptFile(f"unsupported {FORMAT} version {meta.get('version')!r}", "wrong_format")
        spec = QuantSpec(int(meta["bits"]), int(meta["group_size"]), meta.get("zero_point", "float"))
        shapes = json.loads(meta["quantized"])
        tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    if _tensors_sha256(tensors) != meta.get("sha256"):
        raise CorruptFile(f"{f.name}: tensors do not match the stored sha256", "checksum_mismatch")
    weights = {}
    for name, (out, n) in shapes.items():
        try:
            codes = unpack_codes(tensors.pop(f"{name}.qweight"), spec.bits, n)
            scales = tensors.pop(f"{name}.scales").float()
            zeros = tensors.pop(f"{name}.zeros").float()
        except KeyError as exc:
            raise CorruptFile(f"{f.name} lacks {exc.args[0]}", "missing_tensor") from exc
        weights[name] = QuantizedWeight(codes.view(out, n), scales, zeros, spec.bits, spec.group_size)
    config = _read_config(path) if path.is_dir() else {}
    return QuantizedModel(config=config, spec=spec, weights=weights, others=tensors,
                          source_dir=path if path.is_dir() else None)
