"""W += scale * T for a ternary T in {-1, 0, +1}, stored as 2-bit codes.

Device form (what the ComPEFT file is decoded to before it goes to a GPU):
a flat uint8 tensor of ceil(numel / 4) bytes; entry i (row-major) lives in
byte i // 4 at bits 2 * (i % 4) .. 2 * (i % 4) + 1 (least significant first).
Code 0b00 = 0, 0b01 = +1, 0b11 = -1 (0b10 is unused and reads as 0): bit 0
says "kept", bit 1 says "negative". A quarter byte per entry keeps the kernel
a pure streaming add (no prefix sums over an entropy code on the GPU).

`ternary_add_reference` is plain torch; `ternary_add_triton` the Triton kernel;
`ternary_add` dispatches (Triton only for CUDA tensors when triton imports).
Both compute in fp32 and round once to the weight's dtype, in place.
"""

from __future__ import annotations

import math

import torch

from adapter_kernels._triton import FLOATS as _FLOATS
from adapter_kernels._triton import HAS_TRITON, tl, triton


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """Pack 2-bit codes (uint8 values 0..3, any shape) into the flat device form."""
    flat = codes.reshape(-1).to(torch.uint8)
    pad = (-flat.numel()) % 4
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    q = flat.view(-1, 4)
    return q[:, 0] | (q[:, 1] << 2) | (q[:, 2] << 4) | (q[:, 3] << 6)


def ternary_pack(t: torch.Tensor) -> torch.Tensor:
    """Device form of a tensor whose entries are -1, 0 or +1."""
    if not bool(((t == 0) | (t == 1) | (t == -1)).all()):
        raise ValueError("ternary_pack: entries must be -1, 0 or +1")
    codes = (t != 0).to(torch.uint8) | ((t < 0).to(torch.uint8) << 1)
    return pack_codes(codes)


def ternary_unpack(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """int8 tensor (flat, numel entries) of -1/0/+1 from the device form."""
    p = packed.reshape(-1).to(torch.int32)
    codes = torch.stack([(p >> s) & 3 for s in (0, 2, 4, 6)], dim=1).reshape(-1)[:numel]
    return torch.where(codes == 1, 1, torch.where(codes == 3, -1, 0)).to(torch.int8)


def _check(weight: torch.Tensor, packed: torch.Tensor) -> None:
    if weight.dtype not in _FLOATS:
        raise TypeError(f"ternary_add: weight must be fp32/fp16/bf16, got {weight.dtype}")
    if not weight.is_contiguous():
        raise ValueError("ternary_add: weight must be contiguous (it is updated in place)")
    if packed.dtype != torch.uint8:
        raise TypeError(f"ternary_add: packed codes must be uint8, got {packed.dtype}")
    need = math.ceil(weight.numel() / 4)
    if packed.numel() != need:
        raise ValueError(f"ternary_add: {weight.numel()} entries need {need} packed bytes, got {packed.numel()}")
    if packed.device != weight.device:
        raise ValueError(f"ternary_add: weight on {weight.device}, codes on {packed.device}")


def ternary_add_reference(weight: torch.Tensor, packed: torch.Tensor, scale: float) -> torch.Tensor:
    """weight += scale * T in place (fp32 math, one rounding); returns weight."""
    _check(weight, packed)
    t = ternary_unpack(packed, weight.numel()).view(weight.shape)
    upd = weight.float() + float(scale) * t.float()
    weight.copy_(upd.to(weight.dtype))
    return weight


if HAS_TRITON:

    @triton.jit
    def _ternary_add_kernel(w_ptr, p_ptr, scale, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        byte = tl.load(p_ptr + offs // 4, mask=mask, other=0).to(tl.int32)
        code = (byte >> ((offs % 4) * 2).to(tl.int32)) & 3
        t = tl.where(code == 1, 1.0, tl.where(code == 3, -1.0, 0.0))
        tl.store(w_ptr + offs, (w + scale * t).to(w_ptr.dtype.element_ty), mask=mask)


def ternary_add_triton(weight: torch.Tensor, packed: torch.Tensor, scale: float, block: int = 1024) -> torch.Tensor:
    """The Triton kernel: same contract as ternary_add_reference.

    Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (tests).
    """
    if not HAS_TRITON:
        raise RuntimeError("ternary_add_triton: triton is not installed")
    _check(weight, packed)
    n = weight.numel()
    if n:
        _ternary_add_kernel[(triton.cdiv(n, block),)](weight, packed, float(scale), n, BLOCK=block)
    return weight


def ternary_add(weight: torch.Tensor, packed: torch.Tensor, scale: float) -> torch.Tensor:
    """weight += scale * T in place: Triton on CUDA when available, the reference elsewhere."""
    if HAS_TRITON and weight.is_cuda:
        return ternary_add_triton(weight, packed, scale)
    return ternary_add_reference(weight, packed, scale)
