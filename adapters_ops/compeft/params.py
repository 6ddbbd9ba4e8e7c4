"""ComPEFT's vocabulary: the file format's names and version, the compression parameters
(`CompressParams`) and the keep rule (`keep_count`)."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import AdapterError

FORMAT_NAME = "compeft"
FORMAT_VERSION = 2
READABLE_VERSIONS = ("1", "2")
CODEC_RICE = "rice"
SCOPES = ("global", "tensor")
FACTORIZATIONS = ("as_is", "balanced")
KEEP_RULES = ("exact", "paper")
MAX_MAGNITUDE_BITS = 4
BLOB_NAME = "compeft"  # the one payload tensor of a version 2 file
FILE_NAME = "adapter_model.compeft.safetensors"

_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
_DTYPE_NAMES = {v: k for k, v in _DTYPES.items()}
_DTYPE_CODES = ("float32", "float16", "bfloat16", "float64")  # their byte in a version 2 table
_INT_OF_WIDTH = {2: torch.int16, 4: torch.int32, 8: torch.int64}
_SIGN = np.int32(0x7FFFFFFF)
_MAX_NUMEL = 1 << 34  # per tensor; far above any LoRA factor
_MAG_INF = 0x7F800000  # fp32 bit pattern of +inf; anything >= is inf or NaN


# --------------------------------------------------------------------------------------------
# parameters
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CompressParams:
    density: float = 0.1
    alpha: float | None = None
    scope: str = "global"
    replace_factor: float = 1.0
    magnitude_bits: int = 0
    factorization: str = "as_is"
    keep: str = "exact"

    def __post_init__(self):
        def number(x):
            return isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x)

        if not (number(self.density) and 0.0 < self.density <= 1.0):
            raise AdapterError(f"density must be in (0, 1], got {self.density!r}", "invalid_density")
        if self.scope not in SCOPES:
            raise AdapterError(f"scope must be one of {SCOPES}, got {self.scope!r}", "invalid_scope")
        if self.alpha is not None and not (number(self.alpha) and self.alpha > 0):
            raise AdapterError(f"alpha must be a positive finite number, got {self.alpha!r}", "invalid_alpha")
        if not (number(self.replace_factor) and self.replace_factor > 0):
            raise AdapterError(
                f"replace_factor must be a positive finite number, got {self.replace_factor!r}",
                "invalid_replace_factor",
            )
        m = self.magnitude_bits
        if not (isinstance(m, numbers.Integral) and not isinstance(m, bool) and 0 <= m <= MAX_MAGNITUDE_BITS):
            raise AdapterError(
                f"magnitude_bits must be an integer in 0..{MAX_MAGNITUDE_BITS}, got {m!r}", "invalid_magnitude_bits"
            )
        if m and self.alpha is not None:
            raise AdapterError("alpha fixes one magnitude for all entries; it cannot be combined with "
                               "magnitude_bits", "invalid_alpha")
        if self.factorization not in FACTORIZATIONS:
            raise AdapterError(
                f"factorization must be one of {FACTORIZATIONS}, got {self.factorization!r}", "invalid_factorization"
            )
        if self.keep not in KEEP_RULES:
            raise AdapterError(f"keep must be one of {KEEP_RULES}, got {self.keep!r}", "invalid_keep")


def keep_count(density: float, n: int, keep: str = "exact") -> int:
    """k for n entries. "exact": density * n rounded half up (0.1 * 25 -> 3), the number kept.
    "paper": int(n * density) + 1 (0.1 * 25 -> 3, 0.1 * 30 -> 4), the rank of the threshold
    magnitude (ties with it are kept too). Never more than n."""
    if keep == "paper":
        return min(n, int(n * density) + 1)
    return min(n, int(math.floor(density * n + 0.5)))
