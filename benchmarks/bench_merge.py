"""Time every merge method of adapters_ops.merge against PEFT's
`add_weighted_adapter` on the same adapters, in one run.

Builds a random Llama-shaped base (default hidden 1024, intermediate 2816,
4 layers, GQA 16/4 heads) and N LoRA adapters on all linear layers with random
nonzero A and B, saves them, then runs each (implementation, method) in its own
subprocess so timings and memory do not leak between runs. Reported per run:
wall time of the merge call only (loading excluded), and the peak extra RSS
during the call (a sampler thread reads /proc/self/statm every 2 ms).

PEFT's `linear`, `ties`, `dare_*` and `magnitude_prune` mix the A and B factors
separately (cheap, but not the method's definition: see docs/merge.md); ours
build each module's dense update. Their same-work anchor is PEFT's `<name>_svd`,
printed in the last column.

    python benchmarks/bench_merge.py                        # the default shapes
    python benchmarks/bench_merge.py --layers 2 --methods cat svd ties
    python benchmarks/bench_merge.py --energy-check         # truncated SVD vs the optimum
    python benchmarks/bench_merge.py --device cuda --hidden 4096 --intermediate 14336 --heads 32 --kv-heads 8 \
        --layers 2                                          # 8B shapes on a GPU (both sides on CUDA)
    python benchmarks/bench_merge.py --from-json run.json   # reprint a saved run's table
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ALL = ["cat", "linear", "svd", "ties", "ties_svd", "dare_linear", "dare_linear_svd", "dare_ties", "dare_ties_svd",
       "magnitude_prune", "magnitude_prune_svd"]
DENSITY_METHODS = {m for m in ALL if m not in ("cat", "linear", "svd")}


def rss_kb() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


class PeakRSS:
    """Peak resident set size while the block runs, sampled by a thread."""

    def __enter__(self):
        self.start = self.peak = rss_kb()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.wait(0.002):
            self.peak = max(self.peak, rss_kb())

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_kb())

    @property
    def extra_mib(self) -> float:
        return (self.peak - self.start) / 1024


def build(workdir: Path, args) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=args.heads,
                      num_key_value_heads=args.kv_heads, max_position_embeddings=128, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(workdir / "base")
    for i in range(args.adapters):
        torch.manual_seed(100 + i)
        model = LlamaForCausalLM.from_pretrained(workdir / "base")
        lcfg = LoraConfig(r=args.rank, lora_alpha=2 * args.rank, target_modules="all-linear", init_lora_weights=False)
        get_peft_model(model, lcfg).save_pretrained(workdir / f"adapter{i}")


def warm_up(device: str = "cpu") -> None:
    """First calls into LAPACK/cuSOLVER and the thread pool cost time for either side: pay it untimed."""
    import torch

    m = torch.randn(96, 64, device=device)
    torch.linalg.svd(m, full_matrices=True)
    torch.linalg.svd(m.double(), full_matrices=False)
    torch.linalg.qr(m.double())
    torch.linalg.eigvalsh(m.double().T @ m.double())
    torch.kthvalue(m.flatten(), 10)
    torch.topk(m.flatten(), 10)
    torch.bincount(torch.arange(64, device=device))
    torch.rand(8, device=device, generator=torch.Generator(device=device))


class PeakCuda:
    """Peak extra CUDA memory allocated by torch while the block runs."""

    def __enter__(self):
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.start = torch.cuda.memory_allocated()
        return self

    def __exit__(self, *exc):
        import torch

        torch.cuda.synchronize()
        self.extra_mib = (torch.cuda.max_memory_allocated() - self.start) / 2**20


def worker(impl: str, method: str, workdir: Path, args) -> dict:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    warm_up(args.device)
    dirs = [workdir / f"adapter{i}" for i in range(args.adapters)]
    weights = [round(1.0 / args.adapters + 0.1 * i, 3) for i in range(args.adapters)]
    density = args.density if method in DENSITY_METHODS else None
    if impl == "ours":
        from adapters_ops import merge
        from adapters_ops.adapter import Adapter

        adapters = [Adapter.load(d) for d in dirs]

        def call(i):
            merge.merge(adapters, weights, method=method, density=density, seed=i, device=args.device)
    else:
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(workdir / "base"), dirs[0],
                                          adapter_name="in0")
        for i, d in enumerate(dirs[1:], start=1):
            model.load_adapter(d, adapter_name=f"in{i}")
        model.to(args.device)
        kwargs = {"density": density} if density is not None else {}

        def call(i):
            model.add_weighted_adapter([f"in{i}" for i in range(len(dirs))], weights, f"merged{i}",
                                       combination_type=method, **kwargs)
            model.delete_adapter(f"merged{i}")  # a new name each time: PEFT skips existing names

    cuda = args.device.startswith("cuda")
    times, extra = [], 0.0
    for i in range(args.repeat):
        if sum(times) > args.min_time:  # slow methods: one or two calls are enough
            break
        # On CUDA the memory that matters is the device's; the call ends when the device is done.
        with PeakCuda() if cuda else PeakRSS() as mem:
            t0 = time.perf_counter()
            call(i)
            if cuda:
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        extra = max(extra, mem.extra_mib)
    out = {"seconds": min(times), "times": times, "extra_mib": extra}
    if cuda:
        out["device"] = torch.cuda.get_device_name()
    else:
        out["peak_mib"] = mem.peak / 1024
    return out


def run_one(impl: str, method: str, workdir: Path, argv: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, *argv, "--worker", impl, method, str(workdir)],
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        return {"error": out.stderr.strip().splitlines()[-1] if out.stderr.strip() else f"rc {out.returncode}"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--intermediate", type=int, default=2816)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=4)
    p.add_argument("--adapters", type=int, default=3)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--density", type=float, default=0.5)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads for both sides (default 1: stable on a shared machine; 0: torch's default)")
    p.add_argument("--repeat", type=int, default=5, help="at most this many calls per run; the table shows the fastest")
    p.add_argument("--min-time", type=float, default=3.0, help="stop repeating once the calls took this long (s)")
    p.add_argument("--methods", nargs="+", default=ALL, choices=ALL)
    p.add_argument("--no-peft", action="store_true", help="time only our implementation")
    p.add_argument("--device", default="cpu",
                   help="where both sides merge: cpu, or cuda (ours: merge(device=); PEFT: the model moved there); "
                        "extra memory is then the device's")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument("--from-json", type=Path, help="print the table of an earlier run's --json file and exit")
    p.add_argument("--energy-check", action="store_true",
                   help="instead of timing: compare the energy our dense methods keep with the optimum (full SVD)")
    p.add_argument("--worker", nargs=3, metavar=("IMPL", "METHOD", "DIR"), help=argparse.SUPPRESS)
    args = p.parse_args()

    if args.worker:
        impl, method, workdir = args.worker
        print(json.dumps(worker(impl, method, Path(workdir), args)))
        return
    if args.from_json:
        print_table(json.loads(args.from_json.read_text()))
        return

    # The workers rebuild nothing: they only need the shape flags to name inputs.
    argv = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in
            ("hidden", "intermediate", "layers", "heads", "kv_heads", "adapters", "rank", "density", "threads",
             "repeat", "min_time", "device")]
    with tempfile.TemporaryDirectory(prefix="bench-merge-") as tmp:
        workdir = Path(tmp)
        t0 = time.perf_counter()
        build(workdir, args)
        print(f"# base: hidden {args.hidden}, intermediate {args.intermediate}, {args.layers} layers, "
              f"heads {args.heads}/{args.kv_heads}; {args.adapters} adapters rank {args.rank} on all linear "
              f"layers; density {args.density}; device {args.device}; torch threads {args.threads or 'default'}; "
              f"best of <= {args.repeat} calls "
              f"(built in {time.perf_counter() - t0:.1f}s)", flush=True)
        if args.energy_check:
            energy_check(workdir, args)
            return
        load_before = os.getloadavg()[0]
        results = {}
        for method in args.methods:
            results[method] = {"ours": run_one("ours", method, workdir, argv)}
            if not args.no_peft:
                results[method]["peft"] = run_one("peft", method, workdir, argv)
            print(f"# {method}: {json.dumps(results[method])}", file=sys.stderr, flush=True)
    # Other jobs on the machine inflate every time here: say how busy it was.
    print(f"# load average (1 min): {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end")
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


def energy_check(workdir: Path, args) -> None:
    """Per dense method: the energy our factors keep (truncated SVD) against the
    best rank-r approximation of the same merged update (full SVD), per module."""
    import torch

    from adapters_ops import merge
    from adapters_ops.adapter import Adapter

    if args.threads:
        torch.set_num_threads(args.threads)
    adapters = [Adapter.load(workdir / f"adapter{i}") for i in range(args.adapters)]
    weights = [round(1.0 / args.adapters + 0.1 * i, 3) for i in range(args.adapters)]
    print("| method | density | modules (sketch / full SVD) | rank | kept / optimal: min | mean | energy kept (mean) "
          "| optimal (mean) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for method in [m for m in args.methods if m in DENSITY_METHODS]:
        ours = merge.merge_with_report(adapters, weights, method=method, density=args.density)
        # rank above min(out, in): the exact SVD path, so B @ A is the merged update itself
        exact = merge.merge(adapters, weights, method=method, density=args.density, rank=1 << 20)
        ratios, kept, best = [], [], []
        for module, info in ours.report.modules.items():
            s = torch.linalg.svdvals(exact.delta(module).double())
            optimal = float((s[:info["rank"]] ** 2).sum() / (s ** 2).sum())
            ratios.append(info["energy"] / optimal)
            kept.append(info["energy"])
            best.append(optimal)
        n = len(ratios)
        ranks = sorted({info["rank"] for info in ours.report.modules.values()})
        sketched = sum(info["solver"] == "sketch" for info in ours.report.modules.values())
        print(f"| {method} | {args.density} | {n} ({sketched} / {n - sketched}) | {'/'.join(map(str, ranks))} "
              f"| {min(ratios):.6f} "
              f"| {sum(ratios) / n:.6f} | {sum(kept) / n:.4f} | {sum(best) / n:.4f} |", flush=True)


def print_table(results: dict) -> None:
    def cell(r, key, fmt):
        return "error" if r is None or "error" in r else format(r[key], fmt)

    def speedup(theirs, ours):  # > 1: ours is faster
        ratio = theirs["seconds"] / ours["seconds"]
        return f"{ratio:.1f}x" if ratio >= 1 else f"{ratio:.3f}x"

    head = ("| method | ours s | PEFT s | PEFT/ours | ours extra MiB | PEFT extra MiB | PEFT `_svd` s (same work) "
            "| PEFT_svd/ours |")
    print(head)
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for method, r in results.items():
        ours, peft = r["ours"], r.get("peft")
        ratio = speedup(peft, ours) if peft and "error" not in peft and "error" not in ours else "-"
        same = results.get(method + "_svd", {}).get("peft") if method in DENSITY_METHODS else None
        same_s = cell(same, "seconds", ".2f") if same else "-"
        same_ratio = speedup(same, ours) if same and "error" not in same and "error" not in ours else "-"
        print(f"| {method} | {cell(ours, 'seconds', '.3f')} | {cell(peft, 'seconds', '.3f') if peft else '-'} "
              f"| {ratio} | {cell(ours, 'extra_mib', '.0f')} | {cell(peft, 'extra_mib', '.0f') if peft else '-'} "
              f"| {same_s} | {same_ratio} |")
    errors = {f"{m}/{k}": v["error"] for m, r in results.items() for k, v in r.items() if "error" in v}
    for name, err in errors.items():
        print(f"# {name} failed: {err}")


if __name__ == "__main__":
    main()
