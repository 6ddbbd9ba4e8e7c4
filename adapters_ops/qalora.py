"""QA-LoRA: group-wise quantization of a base and LoRA adapters that merge into
it exactly, so the merged model stays INT4/INT3/INT2.

Quantization (round to nearest, asymmetric, groups of G along the input
dimension of every linear projection): per (output row o, group g)

    W[o, j] ~ s[o, g] * (q[o, j] - z[o, g])        q in 0 .. 2**bits - 1

with fp16 scales s and fp16 zero points z (fractional by default).

A QA-LoRA adapter acts on group-averaged inputs: pool(x)[g] = mean of x over
group g, and A' has shape r x (in / G). Its dense update is therefore

    D[o, j] = scaling * (B @ A')[o, g(j)] / G          (one value per (o, g))

so W + D keeps the same codes and scales and only moves the zero point:

    s * (q - z) + c = s * (q - (z - c / s)),   c = scaling * (B @ A') / G
    z' = z - scaling * (B @ A') / (G * s)

Plain LoRA -> QA-LoRA (`to_qalora`): the group-constant matrix closest to
D = scaling * B @ A in Frobenius norm takes the mean of D's columns inside
each group (the least-squares constant of a set of numbers is their mean).
mean_g(D) = scaling * B @ mean_g(A), and the QA-LoRA update is
scaling * B @ A' / G, hence A' = G * mean_g(A) = the sum of A's columns in
each group; B, r and alpha are kept. `recover` then fine-tunes A' and B on the
frozen quantized base (a short QA-LoRA training run on seed examples).

The adapter is stored the PEFT way (adapter_config.json + safetensors, PEFT
key names) with `"qalora_group_size": G` and `"qalora_pooling": "mean"` in
its config (the qa-lora repository trains the same thing but writes a plain
LoRA config: declare those two keys when importing one). PEFT's own
`use_qalora` (GPTQ layers only) multiplies the pooled input by in / G, a
different scale: such adapters are read too (that factor applied), but ours
keep `use_qalora` false. `to_dense_lora` gives the equivalent ordinary LoRA
(A = A' repeated / G) that plain PEFT loads. Where a base is at hand the
shapes are checked against it (`check_base_shapes`): lora_A with in / G
columns under a plain LoRA config, or a declared group size the shapes do not
have, is an AdapterError (`qalora_undeclared`, `qalora_declaration_mismatch`).

Storage (`QuantizedModel.save`): `quantized.safetensors` holding, for each
quantized weight W, `W.qweight` (packed codes: 2/4/8 bits in uint8, least
significant first along the input dimension; 3 bits ten to an int32),
`W.scales` and `W.zeros` (fp16, out x in/G); every other tensor as is;
metadata: format, version, bits, group_size, the quantized names and shapes,
and a sha256 over all tensors (name, dtype, shape, bytes) checked on load.
`export_gguf_q4_1` writes 4-bit models as GGUF Q4_1 (d = s, m = -s * z per 32
weights), which transformers loads with `gguf_file=`.

The worker entry point is `quantize_merged(base_dir, adapter, bits,
group_size, out_dir, finetune_steps=0, examples=None, progress=None)`; with
`finetune_steps` it first recovers the adapter by distillation: Trans-LoRA's
synthetic inputs answered by the fp base + the original adapter (the teacher),
learnt by a QA-LoRA on the frozen quantized base (`synthetic_examples`,
`student_adapter`, `recover`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from . import qalora_declaration as declaration
from .adapter import PEFT_PREFIX, Adapter, AdapterLike, as_adapter
from .errors import AdapterError, CorruptFile, IncompatibleAdapters
from .evaluate import SELECTIONS, SeedSelection, seed_check
from .evaluate import sft_batch as _sft_batch

Progress = Callable[[float, str], None] | None

BITS = (2, 3, 4, 8)
# 4..16 are there for the tiny model family (hidden 128 -> 32/16/8 groups per row: more pooled inputs for a
# QA-LoRA, at 8/4/2 extra bits a weight for fp16 scales and zeros); 32..128 are the usual sizes.
GROUP_SIZES = (4, 8, 16, 32, 64, 128)
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FORMAT = "adapter-hub-qint"
FORMAT_VERSION = "1"
QUANT_FILE = "quantized.safetensors"
_HF_SIDE_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                  "special_tokens_map.json")


def _report(progress: Progress, fraction: float, message: str) -> None:
    if progress is not None:
        progress(min(1.0, max(0.0, fraction)), message)


@dataclass(frozen=True)
class QuantSpec:
    bits: int = 4
    group_size: int = 64
    zero_point: str = "float"  # "float": fp16 zero points (exact group minimum); "int": GPTQ-style integers

    def __post_init__(self):
        if self.bits not in BITS:
            raise AdapterError(f"bits must be one of {BITS}, got {self.bits!r}", "invalid_parameter")
        if self.group_size not in GROUP_SIZES:
            raise AdapterError(f"group_size must be one of {GROUP_SIZES}, got {self.group_size!r}",
                               "invalid_parameter")
        if self.zero_point not in ("float", "int"):
            raise AdapterError(f"zero_point must be 'float' or 'int', got {self.zero_point!r}", "invalid_parameter")

    @property
    def qmax(self) -> int:
        return 2 ** self.bits - 1


# --- packing ---------------------------------------------------------------------------


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes (out x in, values 0 .. 2**bits - 1) along the input dimension.

    2/4/8 bits: uint8, 8 // bits codes a byte, code j of a byte at bits j*bits (least significant
    first); in must be a multiple of 8 // bits. 3 bits: int32, ten codes a word (bits 0..29), the
    row padded with zeros to a multiple of ten.
    """
    if codes.ndim != 2:
        raise AdapterError(f"codes must be 2-D, got shape {tuple(codes.shape)}", "invalid_parameter")
    if bits not in BITS:
        raise AdapterError(f"bits must be one of {BITS}, got {bits!r}", "invalid_parameter")
    out, n = codes.shape
    if bits == 3:
        pad = (-n) % 10
        q = torch.nn.functional.pad(codes.to(torch.int32), (0, pad)).view(out, -1, 10)
        shifts = torch.arange(0, 30, 3, dtype=torch.int32)
        return (q << shifts).sum(-1, dtype=torch.int32)
    per = 8 // bits
    if n % per:
        raise AdapterError(f"{n} columns do not fill whole bytes at {bits} bits", "invalid_parameter")
    q = codes.to(torch.int32).view(out, n // per, per)
    shifts = torch.arange(0, 8, bits, dtype=torch.int32)
    return (q << shifts).sum(-1).to(torch.uint8)


def unpack_codes(packed: torch.Tensor, bits: int, in_features: int) -> torch.Tensor:
    """uint8 codes (out x in_features) from `pack_codes`' layout."""
    mask = 2 ** bits - 1
    if bits == 3:
        shifts = torch.arange(0, 30, 3, dtype=torch.int32)
        q = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & mask
    else:
        shifts = torch.arange(0, 8, bits, dtype=torch.int32)
        q = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & mask
    return q.reshape(packed.shape[0], -1)[:, :in_features].to(torch.uint8)


# --- one quantized weight ---------------------------------------------------------------


@dataclass
class QuantizedWeight:
    """codes (uint8, out x in), scales and zeros (float32 holding fp16 values unless merged, out x in/G)."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    bits: int
    group_size: int

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        out, n = self.codes.shape
        q = self.codes.float().view(out, n // self.group_size, self.group_size)
        w = self.scales.float().unsqueeze(-1) * (q - self.zeros.float().unsqueeze(-1))
        return w.view(out, n).to(dtype)

    def shift(self, c: torch.Tensor) -> QuantizedWeight:
        """The weight + c (one value per (row, group)) as moved zero points: z' = z - c / s; codes unchanged."""
        if tuple(c.shape) != tuple(self.scales.shape):
            raise IncompatibleAdapters(
                f"a group update of shape {tuple(c.shape)} does not fit groups {tuple(self.scales.shape)}",
                "shape_mismatch")
        zeros = self.zeros.double() - c.double() / self.scales.double()
        return dataclasses.replace(self, zeros=zeros.float())

    def packed(self) -> torch.Tensor:
        return pack_codes(self.codes, self.bits)

    def storage_bytes(self) -> int:
        """Bytes of the stored form: packed codes + fp16 scales + fp16 zeros."""
        p = self.packed()
        return p.numel() * p.element_size() + 2 * 2 * self.scales.numel()


def quantize_weight(w: torch.Tensor, bits: int = 4, group_size: int = 64, zero_point: str = "float") -> QuantizedWeight:
    """Round-to-nearest asymmetric group-wise quantization of a 2-D weight (groups along dim 1)."""
    spec = QuantSpec(bits, group_size, zero_point)
    if w.ndim != 2:
        raise AdapterError(f"can only quantize 2-D weights, got shape {tuple(w.shape)}", "invalid_parameter")
    out, n = w.shape
    if n % group_size:
        raise AdapterError(f"input dimension {n} is not a multiple of group_size {group_size}", "invalid_parameter")
    wg = w.detach().float().reshape(out, n // group_size, group_size)
    lo, hi = wg.amin(-1), wg.amax(-1)
    if zero_point == "int":  # as GPTQ: the range holds 0, so the integer zero point lies in 0..qmax
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    # A (near-)constant group would need a tiny scale and a huge zero point (inf in fp16); a floor of
    # max|w| / 256 keeps |z| <= 256, where fp16 still resolves z to 1/8, at an error <= max|w| / 512.
    s = torch.maximum((hi - lo) / spec.qmax, torch.maximum(lo.abs(), hi.abs()) / 256).clamp(min=2.0 ** -24)
    # Scales and zero points are rounded to fp16 before the codes are chosen, so what is stored is what was used.
    s = s.half().float().clamp(min=2.0 ** -24)
    if zero_point == "int":
        z = torch.round(-lo / s).clamp(0, spec.qmax)
    else:
        z = (-lo / s).half().float()
    q = torch.round(wg / s.unsqueeze(-1) + z.unsqueeze(-1)).clamp(0, spec.qmax)
    return QuantizedWeight(q.to(torch.uint8).view(out, n), s, z, bits, group_size)


def _weight_error(w: torch.Tensor, what: torch.Tensor) -> dict:
    d = (w.float() - what.float())
    return {"rel_error": float(d.norm() / w.float().norm().clamp(min=1e-30)), "max_abs_error": float(d.abs().max())}


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
        missing = [k for k in missing if not k.endswith("rotary_emb.inv_freq")]
        if missing or unexpected:
            raise CorruptFile(f"quantized model does not match its config: missing {missing[:3]}, "
                              f"unexpected {unexpected[:3]}", "state_mismatch")
        if getattr(cfg, "tie_word_embeddings", False):
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
    from . import translora

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
    from .evaluate import load_tokenizer, read_examples

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


# --- GGUF Q4_1 ---------------------------------------------------------------------------

_GGUF_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}
Q4_1_BLOCK = 32


def _gguf_name(name: str) -> str:
    if name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if name == "model.norm.weight":
        return "output_norm.weight"
    if name == "lm_head.weight":
        return "output.weight"
    parts = name.split(".")
    if parts[:2] == ["model", "layers"]:
        mod = ".".join(parts[3:-1])
        if mod in _GGUF_NAMES:
            return f"blk.{parts[2]}.{_GGUF_NAMES[mod]}.{parts[-1]}"
    raise AdapterError(f"no GGUF name for tensor {name!r}", "unsupported_tensor")


def _llama_permute(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's row order for q/k (rotary pairs interleaved); transformers' loader undoes it."""
    return t.reshape(n_head, 2, t.shape[0] // n_head // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


def q4_1_blocks(qw: QuantizedWeight) -> torch.Tensor:
    """ggml Q4_1 bytes (out x in/32*20): per 32 weights fp16 d, fp16 m, 16 bytes of nibbles
    (byte j: weight j low, weight j+16 high), w = d * q + m with d = s, m = -s * z."""
    if qw.bits != 4 or qw.group_size % Q4_1_BLOCK:
        raise AdapterError(f"Q4_1 needs 4 bits and a group size multiple of 32, got {qw.bits} bits, "
                           f"group {qw.group_size}", "unsupported_format")
    out, n = qw.shape
    rep = qw.group_size // Q4_1_BLOCK
    d = qw.scales.repeat_interleave(rep, dim=1)
    m = (-(qw.scales.double() * qw.zeros.double())).float().repeat_interleave(rep, dim=1)
    q = qw.codes.view(out, n // Q4_1_BLOCK, Q4_1_BLOCK)
    nib = (q[..., :16] | (q[..., 16:] << 4)).to(torch.uint8)
    dm = torch.stack([d.half(), m.half()], dim=-1).view(torch.uint8)  # out x blocks x 4 bytes
    return torch.cat([dm, nib], dim=-1).reshape(out, -1)


def export_gguf_q4_1(qmodel: QuantizedModel, path: str | os.PathLike, name: str = "qalora") -> dict:
    """Write a 4-bit model (group 32/64/128) as GGUF: projections in Q4_1, the rest in F32.

    The tokenizer is not embedded (transformers takes it from the folder's tokenizer files);
    returns the largest |our dequantized weight - Q4_1 weight| (fp16 rounding of m = -s * z)."""
    try:
        import gguf
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise AdapterError("GGUF export needs the `gguf` package (pip install gguf)", "missing_dependency") from exc
    import numpy as np

    cfg = qmodel.config
    if cfg.get("model_type") != "llama":
        raise AdapterError(f"GGUF export supports llama models, got {cfg.get('model_type')!r}", "unsupported_format")
    n_head, n_kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_name(name)
    w.add_context_length(cfg.get("max_position_embeddings", 2048))
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    w.add_vocab_size(cfg["vocab_size"])
    for key, setter in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id),
                        ("pad_token_id", w.add_pad_token_id)):
        if isinstance(cfg.get(key), int):
            setter(cfg[key])
    worst = 0.0
    for hf_name in sorted(set(qmodel.weights) | set(qmodel.others)):
        gname = _gguf_name(hf_name)
        if hf_name in qmodel.weights:
            qw = qmodel.weights[hf_name]
            if ".attn_q." in gname or ".attn_k." in gname:
                heads = n_head if ".attn_q." in gname else n_kv
                qw = QuantizedWeight(_llama_permute(qw.codes, heads), _llama_permute(qw.scales, heads),
                                     _llama_permute(qw.zeros, heads), qw.bits, qw.group_size)
            blocks = q4_1_blocks(qw)
            back = gguf.dequantize(blocks.numpy(), gguf.GGMLQuantizationType.Q4_1)
            worst = max(worst, float(np.abs(back - qw.dequantize().numpy()).max()))
            w.add_tensor(gname, blocks.numpy(), raw_shape=blocks.shape, raw_dtype=gguf.GGMLQuantizationType.Q4_1)
        else:
            w.add_tensor(gname, qmodel.others[hf_name].float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, path)
    return {"path": str(path), "bytes": path.stat().st_size, "max_abs_error_vs_ours": worst}


def read_gguf_q4_1(path: str | os.PathLike) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """GGUF name -> (codes out x in, d out x in/32, m out x in/32) for every Q4_1 tensor (read with gguf)."""
    import gguf
    import numpy as np

    out = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        if t.tensor_type != gguf.GGMLQuantizationType.Q4_1:
            continue
        raw = torch.from_numpy(np.array(t.data, dtype=np.uint8))
        rows = raw.shape[0]
        blocks = raw.view(rows, -1, 20)
        dm = blocks[..., :4].contiguous().view(torch.float16).float()
        nib = blocks[..., 4:].to(torch.int32)
        codes = torch.cat([nib & 15, nib >> 4], dim=-1).reshape(rows, -1).to(torch.uint8)
        out[t.name] = (codes, dm[..., 0], dm[..., 1])
    return out


# --- the worker's entry point ------------------------------------------------------------


@torch.inference_mode()
def max_logit_difference(model_a, model_b, ids: torch.Tensor) -> float:
    return float((model_a(input_ids=ids).logits.float() - model_b(input_ids=ids).logits.float()).abs().max())


def quantize_merged(base_dir: str | os.PathLike, adapter: AdapterLike, bits: int = 4,
                    group_size: int = 64, out_dir: str | os.PathLike = "quantized", finetune_steps: int = 0,
                    examples: Iterable[dict] | str | os.PathLike | None = None, progress: Progress = None, *,
                    seed: int = 0, export_gguf: bool | None = None, recovery: RecoveryConfig | None = None,
                    synthetic: int = 1024) -> dict:
    """Quantize a base, bring the adapter into QA-LoRA form (converting a plain LoRA), optionally
    recover it, merge it into the zero points, and write

        out_dir/quantized.safetensors (+ config, tokenizer)   the merged model, packed
        out_dir/qalora/                                      the QA-LoRA adapter (PEFT-like)
        out_dir/model-q4_1.gguf                              4 bits, group multiple of 32 (default on)

    Recovery (`finetune_steps` > 0, `examples` = the adapter's seed examples): `synthetic` task
    inputs from Trans-LoRA's generate/filter stages are answered by the teacher (fp base + the
    original adapter); a QA-LoRA student (`recovery.init`, `recovery.rank`) on the frozen quantized
    base learns them with cross-entropy + KL to the teacher, early-stopped on the seeds
    (`recover`). `synthetic=0` trains on the seeds alone.

    Returns a JSON-able report (errors, exactness check, sizes, timings)."""
    t0 = time.perf_counter()
    base_dir, out = Path(base_dir), Path(out_dir)
    adapter = as_adapter(adapter)
    QuantSpec(bits, group_size)  # validate before any work
    shapes = weight_shapes(base_dir)
    g = check_base_shapes(adapter, shapes)  # a QA-LoRA with a plain LoRA config stops here, not after quantizing
    if finetune_steps and examples is None:
        raise AdapterError("finetune_steps > 0 needs seed examples", "missing_examples")
    if not isinstance(synthetic, int) or isinstance(synthetic, bool) or synthetic < 0:
        raise AdapterError(f"synthetic must be an integer >= 0, got {synthetic!r}", "invalid_parameter")
    cfg = dataclasses.replace(recovery or RecoveryConfig(), steps=finetune_steps, seed=seed) if finetune_steps else None
    # codes + an fp16 scale and an fp16 zero point per group
    report: dict = {"bits": bits, "group_size": group_size, "bits_per_weight": bits + 32 / group_size}

    def stage(lo, hi):
        return None if progress is None else (lambda f, m: progress(lo + (hi - lo) * f, m))

    qmodel = quantize_base(base_dir, bits, group_size, progress=stage(0.0, 0.15))
    report["base_quantization"] = dict(qmodel.summary(), per_layer=qmodel.errors)
    if g is None:
        qa, conv = to_qalora(adapter, group_size)
        report["conversion_rel_error"] = conv["rel_error"]
    else:
        qa = adapter
        report["conversion_rel_error"] = 0.0
    if cfg is not None:
        from .evaluate import load_model, read_examples

        seeds = read_examples(examples)
        data = seeds
        if synthetic:
            syn, report["synthetic"] = synthetic_examples(base_dir, adapter, seeds, n=synthetic, seed=seed,
                                                          progress=stage(0.15, 0.3))
            data = syn + seeds
        teacher = load_model(base_dir, to_dense_lora(adapter, shapes))
        student = student_adapter(adapter, g or group_size, init=cfg.init, rank=cfg.rank, seed=seed)
        qa, report["recovery"] = recover(qmodel, student, data, teacher=teacher, config=cfg, eval_examples=seeds,
                                         progress=stage(0.3, 0.8))
    _report(progress, 0.8, "merging into zero points")
    merged = qmodel.merge(qa)
    # exactness: merged (codes unchanged, zero points moved) against quantized base + QA-LoRA unmerged
    ids = torch.arange(min(32, int(qmodel.config.get("vocab_size", 32)))).unsqueeze(0)
    unmerged = qmodel.to_model()
    attach_qalora(unmerged, qa)
    report["merge_max_logit_diff"] = max_logit_difference(merged.to_model(), unmerged.eval(), ids)
    merged.save(out)
    stored = load_quantized(out)
    report["stored_max_logit_diff"] = max_logit_difference(stored.to_model(), unmerged.eval(), ids)
    report["codes_unchanged"] = all(torch.equal(merged.weights[k].codes, qmodel.weights[k].codes)
                                    for k in qmodel.weights)
    report["integer_zero_point_error"] = merged.integer_zero_error()
    qa.save(out / "qalora")
    report["bytes"] = {"quantized": (out / QUANT_FILE).stat().st_size,
                       "bf16": sum(t.numel() * 2 for t in qmodel.state_dict().values())}
    if export_gguf is None:
        export_gguf = bits == 4 and group_size % Q4_1_BLOCK == 0
    if export_gguf:
        _report(progress, 0.9, "writing GGUF Q4_1")
        report["gguf"] = export_gguf_q4_1(merged, out / "model-q4_1.gguf")
    report["seconds"] = round(time.perf_counter() - t0, 2)
    _report(progress, 1.0, "done")
    return report


def naive_merge_quantize(base_dir: str | os.PathLike, adapter: AdapterLike, bits: int,
                         group_size: int) -> QuantizedModel:
    """The baseline QA-LoRA improves on: add the dense LoRA update, then quantize W + D."""
    return quantize_base(base_dir, bits, group_size, adapter=to_dense_lora(adapter, weight_shapes(base_dir)))

