"""ComPEFT's algorithm: the exact top-k threshold on fp32 bit patterns, sparsify + ternary
(or 2^k-level) quantization per tensor, and `compress`."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np
import torch

from ..adapter import Adapter, AdapterLike, as_adapter
from ..errors import AdapterError
from .fileformat import CompressedAdapter, CompressedTensor, _f32
from .packing import _pack_fixed, rice_encode
from .params import _DTYPE_NAMES, _MAG_INF, _SIGN, CompressParams, keep_count


# --------------------------------------------------------------------------------------------
# bit patterns and the exact top-k threshold
# --------------------------------------------------------------------------------------------
def _bits(t: torch.Tensor) -> np.ndarray:
    """fp32 bit pattern (int32, flat) of a tensor; bf16/fp16 widen exactly, fp64 rounds to fp32.

    Widening happens in numpy: torch's multi-threaded casts stall badly on a busy CPU.
    """
    f = t.detach().reshape(-1).cpu()
    if f.dtype == torch.float32:
        return f.numpy().view(np.int32)
    if f.dtype == torch.bfloat16:  # bf16 is the top half of an fp32
        return f.view(torch.int16).numpy().astype(np.int32) << 16
    return f.numpy().astype(np.float32).view(np.int32)


def _float_tensors(adapter: Adapter) -> list[str]:
    names = sorted(adapter.tensors)
    for name in names:
        t = adapter.tensors[name]
        if t.dtype not in _DTYPE_NAMES:
            raise AdapterError(f"{name}: dtype {t.dtype} cannot be compressed (floating point only)", "invalid_dtype")
        if t.numel() == 0:
            raise AdapterError(f"{name} is empty", "invalid_adapter")
    if not names:
        raise AdapterError("the adapter has no tensors", "invalid_adapter")
    return names


@dataclass
class _Threshold:
    """Keep entries with magnitude bits > `bits`, plus the first `ties` entries equal to it."""

    bits: int
    ties: int  # entries equal to `bits` to keep, in scan order
    tie_total: int  # entries equal to `bits` in all
    k: int  # entries kept in all


def _select(hist_hi: np.ndarray, k: int, low_hist: Callable[[int], np.ndarray]) -> _Threshold:
    """Exact k-th largest magnitude from a histogram of the high 16 bits, refined on the low 16.

    `low_hist(bin)` returns the histogram of the low 16 bits of the entries whose
    high bits equal `bin` (a second pass, but only the chosen bin is counted).
    Zeros (bits == 0) are never selected.
    """
    hist_hi = hist_hi.copy()
    # cumulative count from the largest magnitudes downwards
    above = np.cumsum(hist_hi[::-1])[::-1]  # above[b] = entries with high bits >= b
    nonzero_possible = int(above[0])
    if k == 0 or nonzero_possible == 0:
        return _Threshold(bits=_MAG_INF, ties=0, tie_total=0, k=0)
    # first bin b (from the top) where the count reaches k
    b = int(np.nonzero(above >= k)[0][-1]) if above[0] >= k else 0
    count_above_bin = int(above[b + 1]) if b + 1 < above.size else 0
    low = low_hist(b).astype(np.int64)
    if b == 0:
        low[0] = 0  # the value 0.0 itself is never kept
    low_above = np.cumsum(low[::-1])[::-1]
    need = k - count_above_bin
    if low_above[0] < need:  # fewer non-zero entries than k: keep them all
        nz = np.nonzero(low)[0]
        lo = int(nz[0]) if nz.size else 0
        kept = count_above_bin + int(low_above[0])
        if not nz.size:  # nothing non-zero in this bin at all
            return _Threshold(bits=(b << 16) | 0xFFFF, ties=0, tie_total=0, k=kept)
        return _Threshold(bits=(b << 16) | lo, ties=int(low[lo]), tie_total=int(low[lo]), k=kept)
    j = int(np.nonzero(low_above >= need)[0][-1])
    count_above = count_above_bin + (int(low_above[j + 1]) if j + 1 < low_above.size else 0)
    return _Threshold(bits=(b << 16) | j, ties=k - count_above, tie_total=int(low[j]), k=k)


@dataclass
class _Stats:
    n: int
    sum: float
    sumsq: float
    hist: np.ndarray  # high-16-bit histogram of magnitudes

    @property
    def std(self) -> float:
        if self.n < 2:
            return 0.0
        var = (self.sumsq - self.sum * self.sum / self.n) / (self.n - 1)
        return math.sqrt(max(var, 0.0))


def _stats(name: str, bits: np.ndarray) -> _Stats:
    hist = np.bincount((bits & _SIGN) >> 16, minlength=1 << 15)
    if hist.size > (_MAG_INF >> 16) and hist[_MAG_INF >> 16 :].any():
        raise AdapterError(f"{name} holds inf or NaN values", "non_finite")
    # numpy (single-threaded, steady on a shared CPU); squares in fp32, sums in fp64
    x = bits.view(np.float32)
    s = float(np.add.reduce(x, dtype=np.float64))
    s2 = float(np.add.reduce(np.square(x), dtype=np.float64))
    return _Stats(n=int(bits.size), sum=s, sumsq=s2, hist=hist)


def _low_hist(bits_iter: Callable[[], Iterable[np.ndarray]], b: int) -> np.ndarray:
    out = np.zeros(1 << 16, dtype=np.int64)
    for bits in bits_iter():
        mag = bits & _SIGN
        sel = mag[(mag >> 16) == b] & 0xFFFF
        if sel.size:
            out += np.bincount(sel, minlength=1 << 16)
    return out


# --------------------------------------------------------------------------------------------
# compress
# --------------------------------------------------------------------------------------------
def fit_levels(magnitudes: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """`count` magnitudes that minimise the squared error of these values, and each value's code.

    1-D k-means (Lloyd-Max) started from the quantiles. In one dimension the
    clusters are intervals between midpoints, so after one sort each iteration
    only needs a binary search per midpoint and prefix sums.
    """
    x = magnitudes.astype(np.float64)
    if x.size == 0:
        return np.zeros(count), np.zeros(0, dtype=np.int64)
    xs = np.sort(x)
    prefix = np.concatenate([[0.0], np.cumsum(xs)])
    centers = np.quantile(xs, (np.arange(count) + 0.5) / count)
    for _ in range(100):
        # cluster j holds the values in (midpoint j-1, midpoint j], as searchsorted assigns them below
        bounds = np.concatenate([[0], np.searchsorted(xs, (centers[1:] + centers[:-1]) / 2, "right"), [xs.size]])
        sizes = np.diff(bounds)
        sums = prefix[bounds[1:]] - prefix[bounds[:-1]]
        new = np.sort(np.where(sizes > 0, sums / np.maximum(sizes, 1), centers))  # an empty cluster stays put
        if np.array_equal(new, centers):
            break
        centers = new
    return centers, np.searchsorted((centers[1:] + centers[:-1]) / 2, x)


def _encode(name: str, t: torch.Tensor, bits: np.ndarray, thr_bits: int, ties: int | None, scale: float, std: float,
            magnitude_bits: int = 0):
    """Encode one tensor: keep magnitudes > thr_bits, plus entries equal to it.

    `ties=None` keeps every entry equal to the threshold; an int keeps only the
    first `ties` of them (row-major). With magnitude_bits, the kept magnitudes
    are fitted by 2^m levels, stored as multiples of `std` (so the scale
    replace_factor * std rescales them all). Returns (CompressedTensor, ties used).
    """
    mag = bits & _SIGN
    if ties is None:
        keep = mag >= thr_bits
        used = 0
    else:
        keep = mag > thr_bits
        if ties > 0:
            eq = np.flatnonzero(mag == thr_bits)[:ties]
            keep[eq] = True
            used = int(eq.size)
        else:
            used = 0
    pos = np.flatnonzero(keep)
    b, unary, rem = rice_encode(pos)
    levels, mags = (), np.zeros(0, dtype=np.uint8)
    if magnitude_bits:
        centers, codes = fit_levels(np.abs(bits[pos].view(np.float32)), 1 << magnitude_bits)
        levels = tuple(_f32(c / std) if std > 0 else 0.0 for c in centers)
        mags = _pack_fixed(codes, magnitude_bits)
    ct = CompressedTensor(
        shape=tuple(int(s) for s in t.shape),
        dtype=_DTYPE_NAMES[t.dtype],
        count=int(pos.size),
        scale=scale,
        std=std,
        rice_bits=b,
        unary=np.frombuffer(unary, dtype=np.uint8),
        rem=np.frombuffer(rem, dtype=np.uint8),
        signs=np.packbits(bits[pos] < 0),  # the fp32 sign bit: 1 = negative
        magnitude_bits=magnitude_bits,
        levels=levels,
        mags=mags,
    )
    return ct, used


def balanced_pair(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A', B') with B' @ A' = B @ A: B' = U sqrt(S), A' = sqrt(S) V^T from the SVD of B @ A.

    The SVD of the rank-r product comes from two thin QRs and an r x r SVD, in
    fp64. Trained LoRA factors mix rank components of very different sizes;
    here component i has norm sqrt(s_i) in both factors. Shapes and dtypes
    stay those of A and B (zero rows/columns pad a rank above min(in, out)).
    """
    qb, rb = torch.linalg.qr(b.double())  # out x k1, k1 x r
    qa, ra = torch.linalg.qr(a.double().T)  # in x k2, k2 x r
    u, s, vh = torch.linalg.svd(rb @ ra.T, full_matrices=False)
    root = s.sqrt()
    a2 = torch.zeros(a.shape, dtype=torch.float64)
    b2 = torch.zeros(b.shape, dtype=torch.float64)
    a2[: root.numel()] = root[:, None] * (vh @ qa.T)
    b2[:, : root.numel()] = (qb @ u) * root
    return a2.to(a.dtype), b2.to(b.dtype)


def _balanced(adapter: Adapter) -> Adapter:
    """A copy of `adapter` with every LoRA pair rewritten by `balanced_pair` (other tensors as they are)."""
    tensors = dict(adapter.tensors)
    for module, (a, b) in adapter.pairs():
        for key, t in ((adapter.key(module, "A"), a), (adapter.key(module, "B"), b)):
            if not torch.isfinite(t).all():
                raise AdapterError(f"{key} holds inf or NaN values", "non_finite")
        tensors[adapter.key(module, "A")], tensors[adapter.key(module, "B")] = balanced_pair(a, b)
    return Adapter(config=adapter.config, tensors=tensors)


def compress(
    adapter: AdapterLike,
    density: float = 0.1,
    alpha: float | None = None,
    scope: str = "global",
    replace_factor: float = 1.0,
    magnitude_bits: int = 0,
    factorization: str = "as_is",
    keep: str = "exact",
) -> CompressedAdapter:
    """Sparsify every tensor of `adapter` (an Adapter or a PEFT adapter folder) to `density`
    and ternarise it (see module docstring).

    scope="global": one top-k threshold and one std over all tensors (the paper).
    scope="tensor": k and std per tensor. `alpha` fixes the scale instead of replace_factor * std.
    magnitude_bits=m: 2^m magnitudes per tensor instead of one. factorization="balanced":
    re-factor each LoRA pair through the SVD of its product first (a copy of the adapter).
    keep="exact": exactly round(density * n) entries, ties broken by position; keep="paper":
    every entry at least as large as the (int(density * n) + 1)-th largest, as the paper's code.
    Memory stays near one tensor plus the output: a statistics pass tensor by
    tensor, a refinement pass restricted to one histogram bin (skipped when all
    tensors are bf16: the high 16 bits are then the whole value), an encode pass.
    """
    params = CompressParams(density=density, alpha=alpha, scope=scope, replace_factor=replace_factor,
                            magnitude_bits=magnitude_bits, factorization=factorization, keep=keep)
    adapter = as_adapter(adapter)
    names = _float_tensors(adapter)
    if params.factorization == "balanced":
        adapter = _balanced(adapter)

    def bits_of(name):
        return _bits(adapter.tensors[name])

    def low_hist(hist, group):
        if all(adapter.tensors[nm].dtype == torch.bfloat16 for nm in group):
            # bf16 widened to fp32 has zero low bits: the bin is one value, no second pass
            def one_value(b):
                h = np.zeros(1 << 16, dtype=np.int64)
                h[0] = hist[b]
                return h

            return one_value
        return lambda b: _low_hist(lambda: (bits_of(nm) for nm in group), b)

    def scale_of(std):
        return _f32(params.alpha if params.alpha is not None else params.replace_factor * std)

    groups = [names] if params.scope == "global" else [[name] for name in names]
    out: dict[str, CompressedTensor] = {}
    for group in groups:
        total = _Stats(n=0, sum=0.0, sumsq=0.0, hist=np.zeros(1 << 15, dtype=np.int64))
        for name in group:  # one tensor at a time: only the running totals stay
            s = _stats(name, bits_of(name))
            total.n += s.n
            total.sum += s.sum
            total.sumsq += s.sumsq
            total.hist += s.hist[: 1 << 15]
        thr = _select(total.hist, keep_count(params.density, total.n, params.keep), low_hist(total.hist, group))
        std = total.std
        scale = scale_of(std)
        # "paper" keeps every entry tied with the threshold; "exact" only the first thr.ties of them
        ties = None if params.keep == "paper" or thr.ties == thr.tie_total else thr.ties
        expected = thr.k + (thr.tie_total - thr.ties if params.keep == "paper" else 0)
        kept = 0
        for name in group:
            ct, used = _encode(name, adapter.tensors[name], bits_of(name), thr.bits, ties, scale,
                               std if params.alpha is None else 0.0, params.magnitude_bits)
            if ties is not None:
                ties -= used
            kept += ct.count
            out[name] = ct
        if kept != expected:  # an internal invariant, not bad input
            raise AssertionError(f"kept {kept} entries, the selection said {expected}")
    return CompressedAdapter(config=json.loads(json.dumps(adapter.config)), tensors=out, params=params)
