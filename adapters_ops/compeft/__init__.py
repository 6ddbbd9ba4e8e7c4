"""ComPEFT: compress a LoRA update to a sparse ternary tensor plus one scale.

Like the paper (Yadav et al., "ComPEFT", 2023), the LoRA factors A and B
themselves are the update: every entry whose magnitude is among the top
``density`` fraction is kept, and a kept entry becomes ``sign * scale`` with
``scale = replace_factor * std`` (std of the unpruned values, unbiased). By
default the threshold and the std are global over all tensors (the paper's
rule); ``scope="tensor"`` picks k and the std per tensor instead.

Two options go beyond the paper, for adapters that the one-magnitude rule
breaks (the tiny zoo loses every skill at density 0.1; docs/compeft.md):

* ``magnitude_bits=m`` gives each kept entry one of 2^m magnitudes per tensor
  (fitted to the kept values by 1-D k-means, data-free) for m more bits per
  kept entry; m = 0 is the paper's ternary tensor.
* ``factorization="balanced"`` first rewrites every LoRA pair as
  B' = U sqrt(S), A' = sqrt(S) V^T from the exact SVD of B @ A (same product,
  factors of equal scale, energy in the leading rank components).

What is new here, compared with the paper's code (which writes dense floats):

* an exact top-k threshold found with a two-level radix histogram over the
  float bit patterns, tensor by tensor (no flattening, no sort);
* a real file format near the entropy limit: positions as Golomb-Rice coded
  gaps, signs as packed bits, one fp32 scale per tensor, and a compact binary
  table of the tensors, in a safetensors container with a sha256 checksum
  (format version 2; version 1 files are still read; see docs/compeft.md).

How many entries are kept (``keep``):

* ``keep="exact"`` (the default): exactly ``k = floor(density * n + 1/2)``.
  Ties at the threshold are broken by position: entries are ordered by tensor
  name (sorted) and then row-major inside a tensor, and the first ones are kept.
* ``keep="paper"``: the rule of the paper's code, for files bit-compatible with
  it: t = the k-th largest magnitude with ``k = int(n * density) + 1`` (at most
  n), and every entry with magnitude >= t is kept, ties included. In bf16,
  where many magnitudes are equal, this keeps noticeably more than ``k``.

Exact zeros are never kept (a kept zero would have no sign; the paper's code
keeps them as 0 * scale, the same decoded value); if fewer than k entries are
non-zero, all non-zero entries are kept. The rule is recorded in the file
(``params.keep`` of a loaded file).
"""

from __future__ import annotations

from ..errors import AdapterError
from .algorithm import balanced_pair, compress, fit_levels
from .fileformat import CompressedAdapter, CompressedTensor, _checksum, load, loads
from .packing import rice_decode, rice_encode
from .params import (
    BLOB_NAME,
    CODEC_RICE,
    FACTORIZATIONS,
    FILE_NAME,
    FORMAT_NAME,
    FORMAT_VERSION,
    KEEP_RULES,
    MAX_MAGNITUDE_BITS,
    READABLE_VERSIONS,
    SCOPES,
    CompressParams,
    keep_count,
)
from .scale_search import (
    DEFAULT_CANDIDATES,
    LEVEL_CANDIDATES,
    DensityChoice,
    ScaleChoice,
    choose_density,
    choose_scale,
    compress_at,
)

__all__ = ['BLOB_NAME', 'CODEC_RICE', 'CompressParams', 'CompressedAdapter', 'CompressedTensor', 'DEFAULT_CANDIDATES', 'DensityChoice', 'FACTORIZATIONS', 'FILE_NAME', 'FORMAT_NAME', 'FORMAT_VERSION', 'KEEP_RULES', 'LEVEL_CANDIDATES', 'MAX_MAGNITUDE_BITS', 'READABLE_VERSIONS', 'SCOPES', 'ScaleChoice', 'balanced_pair', 'choose_density', 'choose_scale', 'compress_at', 'compress', 'fit_levels', 'keep_count', 'load', 'loads', 'rice_decode', 'rice_encode', '_checksum', 'AdapterError']
