"""Fine-tune diffs of full checkpoints: adapters_ops.transfer (streamed) against
the naive way (safetensors.torch.load_file both, subtract, save_file), in one run.

    .venv/bin/python benchmarks/bench_diff.py [--size-gb 2] [--rank 16] [--dtype float32]

Writes a synthetic Llama-shaped pair (hidden 2048, intermediate 5632, GQA k/v
256, vocab 32000; as many layers as --size-gb needs) into a temporary folder:
base = random weights, fine-tune = base + a rank-4 update on every Linear +
small noise on norms and embeddings. Every phase runs in a fresh subprocess
and reports its wall time, read throughput and peak RSS (VmHWM of that
process: ru_maxrss would carry this parent's RSS over fork+exec). The
folder is deleted at the end unless --keep.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

HIDDEN, INTER, KV, VOCAB = 2048, 5632, 256, 32000
OUTPUTS = {"extract_lowrank": "lora", "naive_apply": "naive-out", "apply_dense": "out-dense",
           "apply_lowrank": "out-lowrank"}
PHASES = ("naive_extract", "extract_dense", "extract_lowrank", "naive_apply", "apply_dense", "apply_lowrank")


def shapes(size_gb: float, itemsize: int) -> list[tuple[str, tuple[int, ...]]]:
    per_layer = 2 * HIDDEN * HIDDEN + 2 * KV * HIDDEN + 3 * HIDDEN * INTER + 2 * HIDDEN
    fixed = 2 * VOCAB * HIDDEN + HIDDEN
    layers = max(1, math.ceil((size_gb * 2**30 / itemsize - fixed) / per_layer))
    out = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(layers):
        p = f"model.layers.{i}."
        out += [(p + "self_attn.q_proj.weight", (HIDDEN, HIDDEN)), (p + "self_attn.k_proj.weight", (KV, HIDDEN)),
                (p + "self_attn.v_proj.weight", (KV, HIDDEN)), (p + "self_attn.o_proj.weight", (HIDDEN, HIDDEN)),
                (p + "mlp.gate_proj.weight", (INTER, HIDDEN)), (p + "mlp.up_proj.weight", (INTER, HIDDEN)),
                (p + "mlp.down_proj.weight", (HIDDEN, INTER)),
                (p + "input_layernorm.weight", (HIDDEN,)), (p + "post_attention_layernorm.weight", (HIDDEN,))]
    return out + [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]


def make_pair(d: Path, size_gb: float, dtype_name: str) -> dict:
    import torch

    from adapters_ops.transfer import write_checkpoint

    dtype = getattr(torch, dtype_name)
    specs = shapes(size_gb, torch.empty((), dtype=dtype).element_size())

    def tensor(i: int, shape, finetuned: bool):
        g = torch.Generator().manual_seed(i)
        w = torch.randn(shape, generator=g).mul_(0.02)
        if finetuned:
            if len(shape) == 2 and "embed" not in specs[i][0]:
                u = torch.randn(shape[0], 4, generator=g).mul_(0.01)
                w.addmm_(u, torch.randn(4, shape[1], generator=g))
            else:
                w.add_(torch.randn(shape, generator=g), alpha=1e-3)
        return w.to(dtype)

    index = {n: i for i, (n, _) in enumerate(specs)}
    for name, ft in (("base", False), ("ft", True)):
        write_checkpoint(d / name, [(n, dtype, s) for n, s in specs],
                         lambda n, ft=ft: [tensor(index[n], dict(specs)[n], ft)])
        (d / name / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": HIDDEN}))
    nbytes = sum(f.stat().st_size for f in (d / "base").glob("*.safetensors"))
    return {"tensors": len(specs), "bytes": nbytes, "layers": (len(specs) - 3) // 9}


# --- phases (each in its own process) ----------------------------------------------------


def _status(key: str) -> int:
    with open("/proc/self/status") as fh:
        return next(int(line.split()[1]) * 1024 for line in fh if line.startswith(key + ":"))


def _load_all(d: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def phase(name: str, d: Path, rank: int) -> dict:
    import torch
    from safetensors.torch import save_file

    from adapters_ops import transfer as T

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    # a repeated round writes afresh: remove this phase's own output (never another phase's input)
    shutil.rmtree(d / OUTPUTS.get(name, "-"), ignore_errors=True)
    base_rss = _status("VmRSS")
    t0 = time.perf_counter()
    ckpt = sum(f.stat().st_size for f in (d / "base").glob("*.safetensors"))
    extra: dict = {}
    if name == "naive_extract":
        ft, base = _load_all(d / "ft"), _load_all(d / "base")
        save_file({k: ft[k].float() - base[k].float() for k in ft}, str(d / "naive-diff.safetensors"))
        read = 2 * ckpt
    elif name == "extract_dense":
        T.extract_dense(d / "ft", d / "base", d / "diff.safetensors")
        read = 2 * ckpt
    elif name == "extract_lowrank":
        lora, rep = T.extract(d / "ft", d / "base", rank=rank, out_dir=d / "lora")
        read = 2 * ckpt
        extra = {"energy": round(rep.energy, 6), "overall_energy": round(rep.overall_energy, 6),
                 "adapter_mb": round(sum(t.numel() * 4 for t in lora.tensors.values()) / 2**20, 1)}
    elif name == "naive_apply":
        base, diff = _load_all(d / "base"), _load_file(d / "naive-diff.safetensors")
        (d / "naive-out").mkdir(exist_ok=True)
        save_file({k: (base[k].float() + diff[k]).to(base[k].dtype) for k in base},
                  str(d / "naive-out" / "model.safetensors"))
        read = ckpt + (d / "naive-diff.safetensors").stat().st_size
    elif name == "apply_dense":
        rep = T.apply(d / "diff.safetensors", d / "base", d / "out-dense")
        read = ckpt + (d / "diff.safetensors").stat().st_size
        extra = {"files": len(rep["files"]), "check": lambda: {"max_abs_err_vs_ft": _check(d / "out-dense", d / "ft")}}
    elif name == "apply_lowrank":
        rep = T.apply(d / "lora", d / "base", d / "out-lowrank")
        read = ckpt
        extra = {"files": len(rep["files"])}
    else:
        raise SystemExit(f"unknown phase {name}")
    secs = time.perf_counter() - t0
    out = {"phase": name, "seconds": secs, "read_mb_s": read / 2**20 / secs, "peak_rss_mb": _status("VmHWM") / 2**20,
           "import_rss_mb": base_rss / 2**20, **extra}
    if "check" in out:  # after the peak is taken: the check loads whole tensors
        out.update(out.pop("check")())
    return out


def _load_file(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def _check(out: Path, ft: Path) -> float:
    """Largest |applied - fine-tuned| over a few tensors, read with our streaming reader."""
    from adapters_ops.transfer.checkpoint_io import _Checkpoint

    worst = 0.0
    with _Checkpoint(out) as a, _Checkpoint(ft) as b:
        names = a.names()
        for n in (names[0], names[len(names) // 2], names[-1]):
            worst = max(worst, float((a.read(n).float() - b.read(n).float()).abs().max()))
    return worst


def run_phase(name: str, d: Path, rank: int) -> dict:
    # Flush the previous phase's dirty pages first (untimed): otherwise each phase
    # pays for the writeback of the one before it, and the order decides the winner.
    os.sync()
    res = subprocess.run([sys.executable, __file__, "--phase", name, "--dir", str(d), "--rank", str(rank)],
                         capture_output=True, text=True, cwd=ROOT)
    if res.returncode != 0:
        raise SystemExit(f"phase {name} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gb", type=float, default=2.0, help="size of each checkpoint (GiB)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--dir", help="work folder (default: a temporary one, deleted after)")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--phases", nargs="+", default=list(PHASES), choices=list(PHASES),
                    help="which phases to run (naive_extract before apply: naive_apply reads its diff)")
    ap.add_argument("--repeat", type=int, default=1, help="rounds of the phases; the table shows medians")
    ap.add_argument("--phase", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase:
        print(json.dumps(phase(args.phase, Path(args.dir), args.rank)))
        return

    d = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench-diff-"))
    try:
        t0 = time.perf_counter()
        info = make_pair(d, args.size_gb, args.dtype)
        print(f"pair: {info['layers']} layers, {info['tensors']} tensors, {info['bytes'] / 2**30:.2f} GiB each "
              f"({args.dtype}), written in {time.perf_counter() - t0:.0f} s; {os.cpu_count()} CPUs")
        print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        rounds = [[run_phase(p, d, args.rank) for p in PHASES if p in args.phases] for _ in range(args.repeat)]
        rows = []
        for i, first in enumerate(rounds[0]):
            runs = [r[i] for r in rounds]
            row = dict(first)
            row["seconds"] = statistics.median(r["seconds"] for r in runs)
            row["read_mb_s"] = first["read_mb_s"] * first["seconds"] / row["seconds"]
            row["peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
            if args.repeat > 1:
                row["rounds_s"] = [round(r["seconds"], 1) for r in runs]
            rows.append(row)
        print(f"\n{'phase':<16} {'seconds':>8} {'read MB/s':>10} {'peak RSS MB':>12} {'(import)':>9}  notes")
        for r in rows:
            notes = {k: v for k, v in r.items()
                     if k not in ("phase", "seconds", "read_mb_s", "peak_rss_mb", "import_rss_mb")}
            print(f"{r['phase']:<16} {r['seconds']:8.1f} {r['read_mb_s']:10.0f} {r['peak_rss_mb']:12.0f} "
                  f"{r['import_rss_mb']:9.0f}  {json.dumps(notes) if notes else ''}")
        by = {r["phase"]: r for r in rows}
        for ours, naive in (("extract_dense", "naive_extract"), ("apply_dense", "naive_apply")):
            if ours not in by or naive not in by:
                continue
            o, n = by[ours], by[naive]
            print(f"{ours} vs {naive}: time x{o['seconds'] / n['seconds']:.2f}, "
                  f"peak RSS x{o['peak_rss_mb'] / n['peak_rss_mb']:.3f} "
                  f"({o['peak_rss_mb'] - o['import_rss_mb']:.0f} MB vs "
                  f"{n['peak_rss_mb'] - n['import_rss_mb']:.0f} MB above the import baseline)")
        print(f"total {time.perf_counter() - t0:.0f} s; load average after: "
              f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    finally:
        if not args.keep:
            shutil.rmtree(d, ignore_errors=True)


if __name__ == "__main__":
    main()
