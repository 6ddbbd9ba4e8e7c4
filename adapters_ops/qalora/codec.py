"""QA-LoRA's number formats: the quantization spec, code packing (2/3/4/8 bits) and one
group-wise quantized weight (round to nearest, asymmetric, fp16 scales and zeros)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import AdapterError, IncompatibleAdapters

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
