"""Time the W4A16 matmul (adapter_kernels.int4) on a 4096 x 14336 weight (Llama-3-8B's up_proj).

    python benchmarks/bench_int4.py                # GPU part when CUDA exists, the CPU reference always
    python benchmarks/bench_int4.py --group 128 --batches 1 16 64

On a GPU, per batch size: bf16 torch.matmul on the dense weight, torch._weight_int4pack_mm
(tinygemm, group-wise bf16 scales and zeros) and our Triton kernel, in microseconds and the
GB/s that time implies for the bytes each one must read (weight + scales/zeros + activations)
and write. Anchors measured on an H100 at batch 1: bf16 44 us, int4pack 19 us; the 4-bit weight
(29 MB) read at ~3 TB/s bounds any W4A16 kernel near 10 us.

On the CPU it times the plain-torch reference (dequantize, then matmul) and says the GPU part
was skipped.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from adapter_kernels import int4  # noqa: E402
from adapter_kernels.int4 import pack_int4, w4a16_matmul, w4a16_matmul_reference  # noqa: E402


def make(n: int, k: int, group: int, device: str):
    gen = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (n, k), generator=gen, dtype=torch.uint8)
    scales = (torch.rand(n, k // group, generator=gen) * 0.01 + 1e-3).half()
    zeros = (torch.rand(n, k // group, generator=gen) * 15).half()
    return codes.to(device), pack_int4(codes).to(device), scales.to(device), zeros.to(device)


def cpu_time(fn, repeat: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def gpu_time(fn) -> float:
    """Median seconds (triton.testing.do_bench when triton imports, CUDA events otherwise)."""
    if int4.HAS_TRITON:
        import triton.testing

        return triton.testing.do_bench(fn, warmup=50, rep=300, return_mode="median") / 1e3
    for _ in range(20):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(100):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return sorted(times)[len(times) // 2]


def row(name: str, batch: int, seconds: float | None, nbytes: int, note: str = "") -> None:
    if seconds is None:
        print(f"{name:<26} {batch:>5} {'-':>10} {'-':>8}  {note}")
        return
    print(f"{name:<26} {batch:>5} {seconds * 1e6:>10.1f} {nbytes / seconds / 1e9:>8.0f}  {note}")


def int4pack_fn(codes, scales, zeros, group, x):
    """torch's tinygemm W4A16 (w = (q - 8) * scale + zero per group); None if this build lacks it."""
    n, k = codes.shape
    try:
        packed = torch._convert_weight_to_int4pack(pack_int4(codes), 8)
        sz = torch.stack([scales.T.bfloat16(), (-(scales.float() * (zeros.float() - 8))).T.bfloat16()], dim=-1)
        sz = sz.contiguous()
        fn = lambda: torch._weight_int4pack_mm(x, packed, group, sz)  # noqa: E731
        fn()
        return fn
    except Exception as exc:  # the op's signature moved between torch releases
        print(f"# torch._weight_int4pack_mm unavailable: {type(exc).__name__}: {str(exc)[:120]}")
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=14336, help="output features (rows of W)")
    ap.add_argument("--k", type=int, default=4096, help="input features")
    ap.add_argument("--group", type=int, default=64)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--cpu-repeat", type=int, default=3)
    args = ap.parse_args()
    n, k, g = args.n, args.k, args.group
    w_bytes = n * k // 2 + 2 * 2 * n * (k // g)
    print(f"# W4A16 matmul, weight {n} x {k}, group {g}: 4-bit weight {w_bytes / 1e6:.1f} MB "
          f"(bf16 {n * k * 2 / 1e6:.1f} MB)")
    print(f"{'method':<26} {'batch':>5} {'us':>10} {'GB/s':>8}")

    if torch.cuda.is_available():
        dev = torch.cuda.get_device_name()
        print(f"# device: {dev}, triton: {int4.HAS_TRITON}")
        codes, packed, scales, zeros = make(n, k, g, "cuda")
        dense = ((codes.float() - zeros.float().repeat_interleave(g, 1)) * scales.float().repeat_interleave(g, 1))
        dense = dense.bfloat16()
        for m in args.batches:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            io = 2 * m * (k + n)
            row("bf16 torch.matmul", m, gpu_time(lambda: x @ dense.T), n * k * 2 + io)  # noqa: B023
            fn = int4pack_fn(codes, scales, zeros, g, x)
            row("torch._weight_int4pack_mm", m, gpu_time(fn) if fn else None, w_bytes + io)
            if int4.HAS_TRITON:
                got = w4a16_matmul(x, packed, scales, zeros, g)
                ref = w4a16_matmul_reference(x, packed, scales, zeros, g)
                rel = float((got.float() - ref.float()).abs().max() / ref.float().abs().max())
                row("ours (triton)", m, gpu_time(lambda: w4a16_matmul(x, packed, scales, zeros, g)),  # noqa: B023
                    w_bytes + io, f"max rel diff vs reference {rel:.1e}")
            else:
                row("ours (triton)", m, None, 0, "triton not installed")
    else:
        print("# no CUDA device: the GPU part (bf16 matmul, int4pack, Triton) was skipped")
    codes, packed, scales, zeros = make(n, k, g, "cpu")
    for m in args.batches:
        x = torch.randn(m, k, dtype=torch.bfloat16)
        secs = cpu_time(lambda: w4a16_matmul_reference(x, packed, scales, zeros, g), args.cpu_repeat)  # noqa: B023
        row("reference (cpu torch)", m, secs, w_bytes + 2 * m * (k + n),
            f"{torch.get_num_threads()} threads, dequantize + fp32 matmul")


if __name__ == "__main__":
    main()
