"""adapter_kernels.ternary: the 2-bit device form, the torch reference, and the Triton kernel against it.

The Triton comparison runs in a subprocess with TRITON_INTERPRET=1 (the flag is read
when a kernel is decorated, so it must be set before adapter_kernels.ternary is imported;
this pytest process may already have imported it without the flag).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adapter_kernels import ternary
from adapter_kernels.ternary import (
    pack_codes,
    ternary_add,
    ternary_add_reference,
    ternary_pack,
    ternary_unpack,
)

ROOT = Path(__file__).resolve().parents[2]
SHAPES = [(1, 1), (5, 123), (64, 33), (3,), (4,), (7, 1), (2, 3, 5)]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# one rounding of an fp32 sum to the weight's dtype: at most one ulp apart if a backend rounds differently
TOL = {"float32": dict(atol=1e-6, rtol=1e-6), "float16": dict(atol=1e-3, rtol=1e-3), "bfloat16": dict(atol=1e-2, rtol=1e-2)}


def random_ternary(shape, seed, density=0.4):
    g = torch.Generator().manual_seed(seed)
    r = torch.rand(shape, generator=g)
    return torch.where(r < density / 2, -1, torch.where(r < density, 1, 0)).to(torch.int8)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_pack_unpack_round_trip(shape):
    t = random_ternary(shape, seed=sum(shape))
    packed = ternary_pack(t)
    n = t.numel()
    assert packed.dtype == torch.uint8 and packed.numel() == math.ceil(n / 4)
    assert torch.equal(ternary_unpack(packed, n), t.reshape(-1))


def test_code_layout_is_least_significant_pair_first():
    t = torch.tensor([1, 0, -1, 1, -1], dtype=torch.int8)
    # entries 0..3 -> byte 0: 01 | 00<<2 | 11<<4 | 01<<6 ; entry 4 -> byte 1: 11
    assert ternary_pack(t).tolist() == [0b01_11_00_01, 0b11]
    assert pack_codes(torch.tensor([2, 2, 2, 2])).tolist() == [0b10101010]
    assert ternary_unpack(torch.tensor([0b10101010], dtype=torch.uint8), 4).tolist() == [0, 0, 0, 0]  # 10 is unused


def test_pack_rejects_non_ternary_values():
    with pytest.raises(ValueError, match="-1, 0 or \\+1"):
        ternary_pack(torch.tensor([0, 2, -1]))


@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_reference_adds_scaled_ternary(shape, dtype):
    dt = DTYPES[dtype]
    t = random_ternary(shape, seed=1)
    w = torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(dt)
    expect = (w.float() + 0.375 * t.float()).to(dt)
    out = ternary_add_reference(w.clone(), ternary_pack(t), 0.375)
    assert out.dtype == dt and out.shape == w.shape
    assert torch.equal(out, expect)


def test_reference_is_in_place_and_validates():
    w = torch.zeros(3, 5)
    packed = ternary_pack(torch.ones(3, 5, dtype=torch.int8))
    assert ternary_add_reference(w, packed, 2.0) is w and torch.equal(w, torch.full((3, 5), 2.0))
    with pytest.raises(ValueError, match="need 4 packed bytes"):
        ternary_add_reference(torch.zeros(3, 5), packed[:-1], 1.0)
    with pytest.raises(TypeError, match="uint8"):
        ternary_add_reference(torch.zeros(3, 5), packed.to(torch.int32), 1.0)
    with pytest.raises(TypeError, match="fp32/fp16/bf16"):
        ternary_add_reference(torch.zeros(3, 5, dtype=torch.int32), packed, 1.0)
    with pytest.raises(ValueError, match="contiguous"):
        ternary_add_reference(torch.zeros(5, 3).t(), packed, 1.0)


def test_dispatch_uses_the_reference_off_cuda(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("Triton must not run on CPU tensors")

    monkeypatch.setattr(ternary, "ternary_add_triton", boom)
    w = torch.zeros(2, 3)
    ternary_add(w, ternary_pack(torch.tensor([[1, -1, 0], [0, 0, 1]])), 0.5)
    assert w.tolist() == [[0.5, -0.5, 0.0], [0.0, 0.0, 0.5]]


# ------------------------------------------------------------------------------------------
# Triton vs reference, interpreted on the CPU
# ------------------------------------------------------------------------------------------
# (shape, dtype, scale, block): blocks smaller than the tensor exercise several programs and the tail mask
INTERPRET_CASES = [
    ((1, 1), "float32", 0.5, 16),
    ((5, 123), "float32", 0.0123, 64),
    ((64, 33), "float32", -1.75, 256),
    ((5, 123), "float16", 0.0123, 128),
    ((64, 33), "float16", 3.0, 64),
    ((1, 1), "float16", -0.25, 16),
    ((5, 123), "bfloat16", 0.0123, 32),
    ((64, 33), "bfloat16", 0.7, 1024),
    ((7,), "bfloat16", 2.5, 16),
]

_SCRIPT = r"""
import json, sys, torch
try:
    import triton  # noqa: F401
except Exception as exc:
    print("SKIP triton does not import: %s: %s" % (type(exc).__name__, exc)); sys.exit(0)
from adapter_kernels.ternary import ternary_add_reference, ternary_add_triton, ternary_pack
cases = json.loads(sys.argv[1])
out = []
for i, (shape, dtype, scale, block) in enumerate(cases):
    dt = getattr(torch, dtype)
    g = torch.Generator().manual_seed(i)
    r = torch.rand(shape, generator=g)
    t = torch.where(r < 0.2, -1, torch.where(r < 0.4, 1, 0)).to(torch.int8)
    w = torch.randn(shape, generator=g).to(dt)
    packed = ternary_pack(t)
    ref = ternary_add_reference(w.clone(), packed, scale)
    try:
        got = ternary_add_triton(w.clone(), packed, scale, block=block)
    except Exception as exc:
        out.append({"error": "%s: %s" % (type(exc).__name__, exc)}); continue
    zero = (t == 0)
    out.append({
        "max_abs": float((ref.float() - got.float()).abs().max()),
        "close": bool(torch.allclose(ref.float(), got.float(), **TOL[dtype])),
        "untouched_exact": bool(torch.equal(got[zero], w[zero])),
        "dtype": str(got.dtype), "shape": list(got.shape),
    })
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def interpreted():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    script = "TOL = " + repr(TOL) + "\n" + _SCRIPT
    cases = json.dumps([[list(s), d, sc, b] for s, d, sc, b in INTERPRET_CASES])
    proc = subprocess.run([sys.executable, "-c", script, cases], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)
    for line in proc.stdout.splitlines():
        if line.startswith("SKIP "):
            pytest.skip(line[5:])
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    pytest.fail(f"interpreter run failed (rc={proc.returncode}):\n{proc.stderr[-3000:]}")


@pytest.mark.parametrize("case", range(len(INTERPRET_CASES)),
                         ids=[f"{'x'.join(map(str, s))}-{d}-block{b}" for s, d, _, b in INTERPRET_CASES])
def test_triton_matches_reference_interpreted(interpreted, case):
    shape, dtype, _, _ = INTERPRET_CASES[case]
    res = interpreted[case]
    assert "error" not in res, res.get("error")
    assert res["dtype"] == str(DTYPES[dtype]) and res["shape"] == list(shape)
    assert res["untouched_exact"]
    assert res["close"], f"max abs difference {res['max_abs']}"
    if dtype == "float32":
        assert res["max_abs"] == 0.0  # same fp32 arithmetic, no rounding to a narrower type


# ------------------------------------------------------------------------------------------
# on a GPU
# ------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", list(DTYPES), ids=list(DTYPES))
@pytest.mark.parametrize("shape", SHAPES + [(4096, 16), (14336, 4096)], ids=lambda s: "x".join(map(str, s)))
def test_triton_matches_reference_on_gpu(shape, dtype):
    if not ternary.HAS_TRITON:
        pytest.skip("triton is not installed")
    dt = DTYPES[dtype]
    t = random_ternary(shape, seed=3).cuda()
    w = torch.randn(shape, device="cuda").to(dt)
    packed = ternary_pack(t)
    ref = ternary_add_reference(w.clone(), packed, 0.01)
    got = ternary_add(w.clone(), packed, 0.01)  # dispatches to Triton on CUDA
    torch.testing.assert_close(got.float(), ref.float(), **TOL[dtype])
    zero = t == 0
    assert torch.equal(got[zero], w[zero])
