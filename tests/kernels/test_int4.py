"""adapter_kernels.int4: the W4A16 reference against a plain dequantize-and-multiply, and the Triton
kernel against the reference.

The Triton comparison runs in a subprocess with TRITON_INTERPRET=1 (the flag is read when a
kernel is decorated, so it must be set before adapter_kernels.int4 is imported; this pytest process
may already have imported it without the flag)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from adapter_kernels import int4
from adapter_kernels.int4 import pack_int4, unpack_int4, w4a16_matmul, w4a16_matmul_reference

ROOT = Path(__file__).resolve().parents[2]
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# max |got - ref| / max |ref|: fp32 differs only in summation order; fp16/bf16 round the weight
# tile to the activation dtype before the dot and the output once
TOL = {"float32": 1e-5, "float16": 4e-3, "bfloat16": 2e-2}


def make_weight(n, k, g, seed, zero_dtype=torch.float16):
    gen = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (n, k), generator=gen)
    scales = (torch.rand(n, k // g, generator=gen) * 0.02 + 0.001).to(zero_dtype)
    zeros = (torch.rand(n, k // g, generator=gen) * 15).to(zero_dtype)  # fractional, as after a QA-LoRA merge
    return codes, pack_int4(codes), scales, zeros


def test_pack_round_trip_and_layout():
    codes = torch.randint(0, 16, (7, 64), generator=torch.Generator().manual_seed(0))
    assert torch.equal(unpack_int4(pack_int4(codes)), codes.to(torch.uint8))
    assert pack_int4(torch.tensor([[1, 2, 15, 0]])).tolist() == [[0x21, 0x0F]]


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("m,n,k,g", [(1, 48, 64, 32), (3, 100, 128, 16), (16, 48, 256, 64), (5, 7, 128, 128)])
def test_reference_is_dequantize_then_matmul(m, n, k, g, dtype):
    codes, packed, scales, zeros = make_weight(n, k, g, seed=m + n)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1)).to(DTYPES[dtype])
    w = (codes.float() - zeros.float().repeat_interleave(g, 1)) * scales.float().repeat_interleave(g, 1)
    out = w4a16_matmul_reference(x, packed, scales, zeros, g)
    assert out.dtype == x.dtype and out.shape == (m, n)
    assert torch.equal(out, (x.float() @ w.T).to(x.dtype))


def test_reference_keeps_leading_dims_and_matches_qalora_dequantize():
    from adapters_ops.qalora import quantize_weight

    w = torch.randn(40, 128, generator=torch.Generator().manual_seed(2))
    qw = quantize_weight(w, 4, 32)
    x = torch.randn(2, 3, 128)
    out = w4a16_matmul_reference(x, qw.packed(), qw.scales.half(), qw.zeros.half(), 32)
    assert out.shape == (2, 3, 40)
    assert torch.allclose(out, x @ qw.dequantize().T, atol=1e-5)


@pytest.mark.parametrize("args,err,match", [
    (dict(k=100), ValueError, "multiple of group_size"),
    (dict(x_features=63), ValueError, "features"),
    (dict(packed_dtype=torch.int32), TypeError, "uint8"),
    (dict(scales_shape=(5, 3)), ValueError, "scales must be"),
    (dict(x_dtype=torch.int64), TypeError, "fp32/fp16/bf16"),
])
def test_reference_validates(args, err, match):
    k = args.get("k", 64)
    packed = torch.zeros(5, k // 2, dtype=args.get("packed_dtype", torch.uint8))
    scales = torch.ones(args.get("scales_shape", (5, max(k // 32, 1))))
    zeros = torch.zeros(5, max(k // 32, 1))
    x = torch.zeros(2, args.get("x_features", k), dtype=args.get("x_dtype", torch.float32))
    with pytest.raises(err, match=match):
        w4a16_matmul_reference(x, packed, scales, zeros, 32)


def test_dispatch_uses_the_reference_off_cuda(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("Triton must not run on CPU tensors")

    monkeypatch.setattr(int4, "w4a16_matmul_triton", boom)
    _, packed, scales, zeros = make_weight(8, 64, 32, seed=0)
    x = torch.randn(2, 64)
    assert torch.equal(w4a16_matmul(x, packed, scales, zeros, 32),
                       w4a16_matmul_reference(x, packed, scales, zeros, 32))


# ------------------------------------------------------------------------------------------
# Triton vs reference, interpreted on the CPU
# ------------------------------------------------------------------------------------------
# (m, n, k, group, dtype, block_n, block_k): batches 1/3/16 and odd N; blocks smaller than the
# problem exercise several programs, the N tail mask and (block_k 64 > group 16) several groups a tile
INTERPRET_CASES = [
    (1, 48, 64, 32, "float32", 32, 32),
    (3, 100, 128, 16, "float32", 64, 64),
    (16, 48, 256, 64, "float32", 32, 64),
    (1, 100, 128, 32, "float16", 64, 32),
    (3, 48, 256, 64, "float16", 32, 128),
    (16, 100, 64, 16, "float16", 64, 64),
    (1, 48, 128, 16, "bfloat16", 32, 64),
    (3, 100, 64, 32, "bfloat16", 64, 32),
    (16, 48, 128, 128, "bfloat16", 32, 64),
    (20, 7, 64, 32, "float32", 16, 32),  # M > 16: two row tiles of 16, N smaller than a tile
]

_SCRIPT = r"""
import json, sys, torch
try:
    import triton  # noqa: F401
except Exception as exc:
    print("SKIP triton does not import: %s: %s" % (type(exc).__name__, exc)); sys.exit(0)
from adapter_kernels.int4 import pack_int4, w4a16_matmul_reference, w4a16_matmul_triton
cases = json.loads(sys.argv[1])
out = []
for i, (m, n, k, g, dtype, bn, bk) in enumerate(cases):
    dt = getattr(torch, dtype)
    gen = torch.Generator().manual_seed(i)
    packed = pack_int4(torch.randint(0, 16, (n, k), generator=gen))
    scales = (torch.rand(n, k // g, generator=gen) * 0.02 + 0.001).half()
    zeros = (torch.rand(n, k // g, generator=gen) * 15).half()
    x = torch.randn(m, k, generator=gen).to(dt)
    ref = w4a16_matmul_reference(x, packed, scales, zeros, g)
    try:
        got = w4a16_matmul_triton(x, packed, scales, zeros, g, block_m=16, block_n=bn, block_k=bk)
    except Exception as exc:
        out.append({"error": "%s: %s" % (type(exc).__name__, exc)}); continue
    out.append({"rel": float((ref.float() - got.float()).abs().max() / ref.float().abs().max()),
                "dtype": str(got.dtype), "shape": list(got.shape)})
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def interpreted():
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_WAIT_POLICY="PASSIVE",
               PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, json.dumps(INTERPRET_CASES)], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=300)
    for line in proc.stdout.splitlines():
        if line.startswith("SKIP "):
            pytest.skip(line[5:])
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    pytest.fail(f"interpreter run failed (rc={proc.returncode}):\n{proc.stderr[-3000:]}")


@pytest.mark.parametrize("case", range(len(INTERPRET_CASES)),
                         ids=[f"{m}x{n}x{k}-g{g}-{d}" for m, n, k, g, d, _, _ in INTERPRET_CASES])
def test_triton_matches_reference_interpreted(interpreted, case):
    m, n, _, _, dtype, _, _ = INTERPRET_CASES[case]
    res = interpreted[case]
    assert "error" not in res, res.get("error")
    assert res["dtype"] == str(DTYPES[dtype]) and res["shape"] == [m, n]
    assert res["rel"] <= TOL[dtype], f"relative max difference {res['rel']}"


# ------------------------------------------------------------------------------------------
# on a GPU
# ------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("m,n,k,g", [(1, 48, 64, 32), (3, 100, 128, 16), (16, 4096, 4096, 64),
                                     (1, 14336, 4096, 64), (33, 4096, 14336, 128)])
def test_triton_matches_reference_on_gpu(m, n, k, g, dtype):
    if not int4.HAS_TRITON:
        pytest.skip("triton is not installed")
    _, packed, scales, zeros = make_weight(n, k, g, seed=m)
    x = torch.randn(m, k).to(DTYPES[dtype])
    packed, scales, zeros, x = packed.cuda(), scales.cuda(), zeros.cuda(), x.cuda()
    ref = w4a16_matmul_reference(x, packed, scales, zeros, g)
    got = w4a16_matmul(x, packed, scales, zeros, g)  # dispatches to Triton on CUDA
    assert got.dtype == x.dtype and got.shape == (m, n)
    rel = float((ref.float() - got.float()).abs().max() / ref.float().abs().max())
    assert rel <= TOL[dtype], rel
