"""Triton is optional: CPU-only installs run every kernel's torch reference.
The kernels import `triton`, `tl` and `HAS_TRITON` from here."""

import torch

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # pragma: no cover - depends on the install
    triton = None
    tl = None
    HAS_TRITON = False

FLOATS = (torch.float32, torch.float16, torch.bfloat16)
