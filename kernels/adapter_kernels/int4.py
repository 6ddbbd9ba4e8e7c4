"""W4A16 matmul: y = x @ W^T with W held as 4-bit group-quantized codes.

Layout (the 4-bit case of `adapters_ops.qalora`'s packed format):
- packed: uint8, N x K/2; code k of row n lives in byte k // 2, low nibble for
  even k, high nibble for odd k;
- scales, zeros: N x K/G (fp16, bf16 or fp32), W[n, k] = s[n, g] * (q[n, k] - z[n, g])
  with g = k // G; zeros may be fractional (QA-LoRA merges move them).

`w4a16_matmul_reference` dequantizes to fp32 and multiplies (plain torch);
`w4a16_matmul_triton` streams the codes and dequantizes inside the tile loop, so
the weight is read at half a byte per entry; `w4a16_matmul` dispatches (Triton
only for CUDA tensors when triton imports). x may be fp16, bf16 or fp32 of any
leading shape; the output has x's dtype. Accumulation is fp32 in both.
"""

from __future__ import annotations

import os

import torch

from adapter_kernels._triton import FLOATS as _FLOATS
from adapter_kernels._triton import HAS_TRITON, tl, triton


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """N x K codes (0..15) -> N x K/2 uint8 (even k in the low nibble)."""
    if codes.ndim != 2 or codes.shape[1] % 2:
        raise ValueError(f"pack_int4: need an N x K tensor with even K, got {tuple(codes.shape)}")
    c = codes.to(torch.uint8)
    return c[:, 0::2] | (c[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """N x K/2 uint8 -> N x K uint8 codes."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


def _check(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int):
    if x.dtype not in _FLOATS:
        raise TypeError(f"w4a16_matmul: x must be fp32/fp16/bf16, got {x.dtype}")
    if packed.dtype != torch.uint8 or packed.ndim != 2:
        raise TypeError(f"w4a16_matmul: packed must be a 2-D uint8 tensor, got {packed.dtype} {tuple(packed.shape)}")
    n, k = packed.shape[0], packed.shape[1] * 2
    if x.shape[-1] != k:
        raise ValueError(f"w4a16_matmul: x has {x.shape[-1]} features, the weight {k}")
    if group_size < 1 or k % group_size:
        raise ValueError(f"w4a16_matmul: K={k} is not a multiple of group_size {group_size}")
    for t, what in ((scales, "scales"), (zeros, "zeros")):
        if tuple(t.shape) != (n, k // group_size):
            raise ValueError(f"w4a16_matmul: {what} must be {(n, k // group_size)}, got {tuple(t.shape)}")
        if t.dtype not in _FLOATS:
            raise TypeError(f"w4a16_matmul: {what} must be floating point, got {t.dtype}")
        if t.device != packed.device:
            raise ValueError(f"w4a16_matmul: {what} on {t.device}, codes on {packed.device}")
    if x.device != packed.device:
        raise ValueError(f"w4a16_matmul: x on {x.device}, codes on {packed.device}")
    return n, k


def dequantize_int4(packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """The fp32 weight N x K."""
    q = unpack_int4(packed).float()
    n, k = q.shape
    w = (q.view(n, k // group_size, group_size) - zeros.float().unsqueeze(-1)) * scales.float().unsqueeze(-1)
    return w.view(n, k)


def w4a16_matmul_reference(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                           group_size: int) -> torch.Tensor:
    """x @ W^T, dequantized to fp32 then multiplied; result in x's dtype."""
    _check(x, packed, scales, zeros, group_size)
    w = dequantize_int4(packed, scales, zeros, group_size)
    return (x.float() @ w.T).to(x.dtype)


if HAS_TRITON:

    @triton.jit
    def _w4a16_kernel(x_ptr, p_ptr, s_ptr, z_ptr, y_ptr, M, N, K, G,
                      stride_xm, stride_pn, stride_sn, stride_zn, stride_ym,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      DOT_F32: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask = offs_m < M
        n_mask = offs_n < N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            x = tl.load(x_ptr + offs_m[:, None].to(tl.int64) * stride_xm + offs_k[None, :],
                        mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            wmask = k_mask[:, None] & n_mask[None, :]
            byte = tl.load(p_ptr + offs_n[None, :].to(tl.int64) * stride_pn + (offs_k[:, None] // 2),
                           mask=wmask, other=0).to(tl.int32)
            q = ((byte >> ((offs_k[:, None] % 2) * 4)) & 15).to(tl.float32)  # BLOCK_K x BLOCK_N
            g = offs_k[:, None] // G
            s = tl.load(s_ptr + offs_n[None, :].to(tl.int64) * stride_sn + g, mask=wmask, other=0.0).to(tl.float32)
            z = tl.load(z_ptr + offs_n[None, :].to(tl.int64) * stride_zn + g, mask=wmask, other=0.0).to(tl.float32)
            w = (q - z) * s
            if DOT_F32:  # fp32 activations: full-precision products (no TF32)
                acc += tl.dot(x.to(tl.float32), w, input_precision="ieee")
            else:  # fp16/bf16: the tensor-core path, weight rounded to the activation dtype
                acc += tl.dot(x, w.to(x.dtype))
        y = acc.to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + offs_m[:, None].to(tl.int64) * stride_ym + offs_n[None, :], y,
                 mask=m_mask[:, None] & n_mask[None, :])


def _dot_f32(dtype: torch.dtype) -> bool:
    # The interpreter (triton 3.x) mis-multiplies bf16 tiles in tl.dot: interpreted bf16 runs take the
    # fp32 path (the activations are still read as bf16); on a GPU bf16 uses the tensor-core path.
    interpreting = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    return dtype == torch.float32 or (interpreting and dtype == torch.bfloat16)


def w4a16_matmul_triton(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                        group_size: int, block_m: int | None = None, block_n: int = 64,
                        block_k: int = 64) -> torch.Tensor:
    """The Triton kernel: same contract as w4a16_matmul_reference.

    Runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (tests)."""
    if not HAS_TRITON:
        raise RuntimeError("w4a16_matmul_triton: triton is not installed")
    n, k = _check(x, packed, scales, zeros, group_size)
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k).contiguous()
    m = x2.shape[0]
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    if m == 0 or n == 0:
        return y.view(*lead, n)
    if block_m is None:  # tl.dot needs >= 16 rows; larger tiles once there are enough activations
        block_m = 16 if m <= 16 else 64
    packed, scales, zeros = packed.contiguous(), scales.contiguous(), zeros.contiguous()
    grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
    _w4a16_kernel[grid](x2, packed, scales, zeros, y, m, n, k, group_size,
                        x2.stride(0), packed.stride(0), scales.stride(0), zeros.stride(0), y.stride(0),
                        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, DOT_F32=_dot_f32(x.dtype))
    return y.view(*lead, n)


def w4a16_matmul(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 group_size: int) -> torch.Tensor:
    """x @ W^T for a 4-bit group-quantized W: Triton on CUDA when available, the reference elsewhere."""
    if HAS_TRITON and x.is_cuda:
        return w4a16_matmul_triton(x, packed, scales, zeros, group_size)
    return w4a16_matmul_reference(x, packed, scales, zeros, group_size)
