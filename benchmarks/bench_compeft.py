"""Time ComPEFT compression: ours vs a naive torch version vs the paper's code.

    python benchmarks/bench_compeft.py                 # Llama-3-8B shape, 32 layers (~42M params)
    python benchmarks/bench_compeft.py --layers 2      # quick run
    python benchmarks/bench_compeft.py --gpu           # + GB/s of the ternary kernel (CUDA only)
    python benchmarks/bench_compeft.py --magnitude-bits 2 --factorization balanced   # our variant

The adapter is a random rank-16 all-linear LoRA of Llama-3-8B's shapes
(q,o 4096x4096; k,v 4096->1024; gate,up 4096->14336; down 14336->4096), fp32
by default, built in memory from a fixed seed. Every method runs in a fresh
subprocess so its peak RSS (ru_maxrss; tracemalloc cannot see torch) is its own:
"extra" is the peak minus the RSS right after the input was built, as a
multiple of the input's size.

The paper's code (github.com/prateeky2806/ComPEFT, src/qlora/ties_utils.py)
is imported from --paper-src, unmodified. Its module imports matplotlib for
nothing these functions use; when matplotlib is absent a stub module stands in.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# (name, in_features, out_features) of Llama-3-8B's linear layers
LLAMA3_8B = [
    ("self_attn.q_proj", 4096, 4096),
    ("self_attn.k_proj", 4096, 1024),
    ("self_attn.v_proj", 4096, 1024),
    ("self_attn.o_proj", 4096, 4096),
    ("mlp.gate_proj", 4096, 14336),
    ("mlp.up_proj", 4096, 14336),
    ("mlp.down_proj", 14336, 4096),
]
DEFAULT_PAPER_SRC = "/tmp/ComPEFT/src/qlora"


def build_adapter(layers: int, rank: int = 16, dtype: str = "float32", seed: int = 0):
    """A random PEFT LoRA with Llama-3-8B shapes (A ~ N(0, 1/in), B ~ N(0, 0.01^2), like a trained one)."""
    import torch

    from adapters_ops.adapter import Adapter

    g = torch.Generator().manual_seed(seed)
    dt = getattr(torch, dtype)
    tensors = {}
    for layer in range(layers):
        for mod, fin, fout in LLAMA3_8B:
            prefix = f"base_model.model.model.layers.{layer}.{mod}"
            tensors[f"{prefix}.lora_A.weight"] = (torch.randn(rank, fin, generator=g) / math.sqrt(fin)).to(dt)
            tensors[f"{prefix}.lora_B.weight"] = (torch.randn(fout, rank, generator=g) * 0.01).to(dt)
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "r": rank,
        "lora_alpha": 2 * rank,
        "target_modules": sorted({m.split(".")[-1] for m, _, _ in LLAMA3_8B}),
        "base_model_name_or_path": "meta-llama/Meta-Llama-3-8B",
    }
    return Adapter(config=config, tensors=tensors)


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def _timed(fn, repeat):
    best, out = math.inf, None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


# ---------------------------------------------------------------------------------------------
# the methods (each runs in its own process)
# ---------------------------------------------------------------------------------------------
def run_ours(adapter, density, repeat, options=None):
    from adapters_ops import compeft

    base = _rss()
    comp_s, comp = _timed(lambda: compeft.compress(adapter, density=density, **(options or {})), repeat)
    with tempfile.TemporaryDirectory() as tmp:
        save_s, path = _timed(lambda: comp.save(Path(tmp) / "a.compeft.safetensors"), 1)
        size = path.stat().st_size
        peak_c = _maxrss() - base
        dec_s, _ = _timed(lambda: compeft.load(path).decompress(), repeat)
    return {"compress_s": comp_s, "save_s": save_s, "decompress_s": dec_s, "size": size, "extra_compress": peak_c}


def run_naive(adapter, density, repeat):
    """The obvious torch version: flatten, torch.topk, a dense int8 ternary tensor."""
    import torch

    names = sorted(adapter.tensors)

    def compress():
        flat = torch.cat([adapter.tensors[n].reshape(-1).float() for n in names])
        k = int(math.floor(density * flat.numel() + 0.5))
        idx = torch.topk(flat.abs(), k, sorted=False).indices
        tern = torch.zeros(flat.numel(), dtype=torch.int8)
        tern[idx] = flat[idx].sign().to(torch.int8)
        return tern, float(flat.std())

    def decompress(tern, scale):
        out, off = {}, 0
        for n in names:
            t = adapter.tensors[n]
            out[n] = (tern[off : off + t.numel()].float() * scale).to(t.dtype).view(t.shape)
            off += t.numel()
        return out

    base = _rss()
    comp_s, (tern, scale) = _timed(compress, repeat)
    peak_c = _maxrss() - base
    dec_s, _ = _timed(lambda: decompress(tern, scale), repeat)
    return {"compress_s": comp_s, "decompress_s": dec_s, "size": tern.numel(), "extra_compress": peak_c}


def run_paper(adapter, density, repeat, paper_src):
    src = Path(paper_src)
    if not (src / "ties_utils.py").is_file():
        return {"error": f"{src}/ties_utils.py not found (git clone https://github.com/prateeky2806/ComPEFT /tmp/ComPEFT)"}
    try:
        import matplotlib.pyplot  # noqa: F401
    except ImportError:  # unused by the functions we call; do not install a plotting stack for it
        import types

        mpl = types.ModuleType("matplotlib")
        mpl.pyplot = types.ModuleType("matplotlib.pyplot")
        sys.modules["matplotlib"] = mpl
        sys.modules["matplotlib.pyplot"] = mpl.pyplot
    sys.path.insert(0, str(src))
    try:
        import ties_utils
    except Exception as exc:  # report why, do not crash the benchmark
        return {"error": f"cannot import the paper's ties_utils: {type(exc).__name__}: {exc}"}
    base = _rss()
    # k is a percentage there; replace_factor=1 -> alpha = 1 * std (its default path)
    comp_s, _ = _timed(lambda: ties_utils.get_compressed_lora_weights(adapter.tensors, density * 100, 1.0), repeat)
    peak_c = _maxrss() - base
    return {"compress_s": comp_s, "decompress_s": None, "size": None, "extra_compress": peak_c}


def worker(args) -> None:
    import torch

    adapter = build_adapter(args.layers, dtype=args.dtype)
    n = adapter.num_parameters()
    input_bytes = sum(t.numel() * t.element_size() for t in adapter.tensors.values())
    if args.worker == "ours":
        options = {"magnitude_bits": args.magnitude_bits, "factorization": args.factorization}
        res = run_ours(adapter, args.density, args.repeat, options)
    elif args.worker == "naive":
        res = run_naive(adapter, args.density, args.repeat)
    else:
        res = run_paper(adapter, args.density, args.repeat, args.paper_src)
    res.update(params=n, input_bytes=input_bytes, threads=torch.get_num_threads())
    print("RESULT " + json.dumps(res))


# ---------------------------------------------------------------------------------------------
# the kernel on a GPU
# ---------------------------------------------------------------------------------------------
def bench_ternary_add_gpu(numel: int = 14336 * 4096, density: float = 0.1, dtype: str = "bfloat16") -> dict:
    """Achieved GB/s of adapter_kernels.ternary.ternary_add (Triton) on CUDA: weight read+write plus the codes."""
    import torch
    import triton.testing

    from adapter_kernels.ternary import ternary_add_reference, ternary_add_triton, ternary_pack

    dt = getattr(torch, dtype)
    g = torch.Generator(device="cuda").manual_seed(0)
    r = torch.rand(numel, device="cuda", generator=g)
    tern = torch.where(r < density / 2, -1, torch.where(r < density, 1, 0)).to(torch.int8)
    packed = ternary_pack(tern)
    w = torch.randn(numel, device="cuda", dtype=dt)
    ref = ternary_add_reference(w.clone(), packed, 0.01)
    got = ternary_add_triton(w.clone(), packed, 0.01)
    max_err = float((ref.float() - got.float()).abs().max())
    ms = triton.testing.do_bench(lambda: ternary_add_triton(w, packed, 0.01))
    ms_ref = triton.testing.do_bench(lambda: ternary_add_reference(w, packed, 0.01))
    moved = 2 * w.numel() * w.element_size() + packed.numel()
    return {
        "numel": numel,
        "dtype": dtype,
        "triton_ms": ms,
        "triton_GBps": moved / ms / 1e6,
        "reference_ms": ms_ref,
        "max_abs_err_vs_reference": max_err,
        "device": torch.cuda.get_device_name(),
    }


# ---------------------------------------------------------------------------------------------
# the driver
# ---------------------------------------------------------------------------------------------
def _h2(p: float) -> float:
    return -(p * math.log2(p) + (1 - p) * math.log2(1 - p)) if 0 < p < 1 else 0.0


def codec_study(layers: int, density: float, dtype: str) -> dict:
    """Bits per entry of the position codes we considered: Rice gaps (used) vs a zstd'd bitmap."""
    import numpy as np
    import zstandard

    from adapters_ops import compeft

    adapter = build_adapter(layers, dtype=dtype)
    comp = compeft.compress(adapter, density=density)
    n = comp.numel
    rice = sum(t.unary.size + t.rem.size for t in comp.tensors.values()) * 8 / n
    zbits = {lvl: 0 for lvl in (1, 3, 19)}
    zsec = {lvl: 0.0 for lvl in zbits}
    for name, t in comp.tensors.items():
        mask = np.zeros(t.numel, dtype=bool)
        mask[t.positions(name)] = True
        bitmap = np.packbits(mask).tobytes()
        for lvl in zbits:
            t0 = time.perf_counter()
            zbits[lvl] += len(zstandard.ZstdCompressor(level=lvl).compress(bitmap)) * 8
            zsec[lvl] += time.perf_counter() - t0
    # the bound for these positions: each tensor's binary entropy at its own density
    entropy = sum(t.numel * _h2(t.count / t.numel) for t in comp.tensors.values()) / n
    return {
        "entropy_bits_per_entry": entropy,
        "rice_bits_per_entry": rice,
        **{f"zstd{lvl}_bits_per_entry": zbits[lvl] / n for lvl in zbits},
        **{f"zstd{lvl}_s": zsec[lvl] for lvl in zbits},
        "signs_bits_per_entry": comp.count / n,
        "file_bits_per_entry": comp.nbytes * 8 / n,
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--repeat", type=int, default=3, help="best of N timings")
    ap.add_argument("--methods", default="ours,naive,paper")
    ap.add_argument("--paper-src", default=DEFAULT_PAPER_SRC)
    ap.add_argument("--gpu", action="store_true", help="also time the Triton kernel (needs CUDA)")
    ap.add_argument("--magnitude-bits", type=int, default=0, help="ours: 2^M magnitudes per tensor")
    ap.add_argument("--factorization", default="as_is", choices=["as_is", "balanced"], help="ours: see compeft")
    ap.add_argument("--worker", choices=["ours", "naive", "paper"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)

    results = {}
    for method in args.methods.split(","):
        cmd = [sys.executable, __file__, "--worker", method, "--layers", str(args.layers),
               "--density", str(args.density), "--dtype", args.dtype, "--repeat", str(args.repeat),
               "--paper-src", args.paper_src, "--magnitude-bits", str(args.magnitude_bits),
               "--factorization", args.factorization]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            results[method] = {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
        else:
            results[method] = json.loads(line[len("RESULT "):])

    any_res = next((r for r in results.values() if "params" in r), None)
    if any_res is None:
        print(json.dumps(results, indent=2))
        sys.exit(1)
    n, inp = any_res["params"], any_res["input_bytes"]
    bf16 = 2 * n
    print(f"adapter: {args.layers} layers, {n / 1e6:.1f}M params, {args.dtype} input {inp / 2**20:.0f} MiB, "
          f"density {args.density}, torch threads {any_res['threads']}, cores {os.cpu_count()}; "
          f"ours: magnitude_bits={args.magnitude_bits}, factorization={args.factorization}")
    print(f"{'method':8} {'compress s':>11} {'decompress s':>13} {'size MiB':>9} {'x vs bf16':>9} {'peak extra':>11}")
    for method, r in results.items():
        if "error" in r:
            print(f"{method:8} could not run: {r['error']}")
            continue
        dec = f"{r['decompress_s']:.3f}" if r.get("decompress_s") is not None else "n/a"
        size = f"{r['size'] / 2**20:.2f}" if r.get("size") else "dense"
        ratio = f"{bf16 / r['size']:.1f}" if r.get("size") else "1.0"
        extra = f"{r['extra_compress'] / inp:.2f}x in"
        print(f"{method:8} {r['compress_s']:11.3f} {dec:>13} {size:>9} {ratio:>9} {extra:>11}")
    ours = results.get("ours", {})
    for other in ("naive", "paper"):
        r = results.get(other, {})
        if "compress_s" in ours and "compress_s" in r:
            print(f"compress speed-up vs {other}: {r['compress_s'] / ours['compress_s']:.1f}x")
    if "size" in ours:
        print(f"ours: {ours['size'] * 8 / n:.4f} bits/entry, file {ours['size']} B, bf16 safetensors ~{bf16} B "
              f"-> {bf16 / ours['size']:.1f}x smaller; peak during compress = input + "
              f"{ours['extra_compress'] / inp:.2f}x input")
    study = codec_study(min(args.layers, 4), args.density, args.dtype)
    print(f"position codes (bits/entry, first {min(args.layers, 4)} layers): "
          + ", ".join(f"{k}={v:.4f}" for k, v in study.items()))
    if args.gpu:
        print("ternary_add on GPU: " + json.dumps(bench_ternary_add_gpu()))


if __name__ == "__main__":
    main()
