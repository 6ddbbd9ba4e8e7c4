"""Shared by benchmarks/real_*.py: where the real lane is, one loaded base that scores many
adapters, timing and peak RSS of an op, and the machine conditions for the tables.

The lane is never built here (that takes ~30 min): a missing lane is a clear exit message.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from adapters_ops import _zoo_train  # noqa: E402  (first: it pins MKL's reproducibility mode)

SOURCE = "smollm2-135m-1.0"
TARGET = "smollm2-135m-1.1"
EVAL_BATCH = 50  # the lane's scores.json batch: same batches, same greedy answers
QUICK_N = 20  # --quick scores the first N test examples


def cached_lane() -> Path | None:
    """The cached real lane of this code's recipe hash, else the newest complete lane in the
    same cache (its stamp names its own folder): the hash covers _zoo_train.py, so an edit that
    changes no weights (a progress callback) moves the path while the built lane is still there."""
    from adapters_ops import zoo_real
    from adapters_ops.zoo import STAMP

    exact = zoo_real.default_dir()
    if (exact / STAMP).is_file():
        return exact
    found = [d for d in exact.parent.glob("*") if (d / STAMP).is_file() and (d / STAMP).read_text().strip() == d.name]
    if not found:
        return None
    other = max(found, key=lambda d: (d / STAMP).stat().st_mtime)
    print(f"note: no real lane for this code's recipe hash ({exact.name}); using the built lane {other} "
          "(an older hash of the same recipe)", file=sys.stderr)
    return other


def lane_dir(path: str | os.PathLike | None) -> Path:
    """The given lane folder, else the cached real lane; SystemExit with a message when absent."""
    root = Path(path) if path else cached_lane()
    if root is None or not (root / "manifest.json").is_file():
        raise SystemExit(f"no real lane at {root or 'the cache'}: build it with `python -m adapters_ops.zoo build DIR "
                         "--lane real` (~30 min) or pass --lane DIR")
    return root


def manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def skills_of(root: Path) -> list[str]:
    return [a["skill"] for a in manifest(root)["adapters"]]


def examples(root: Path, skill: str, split: str, limit: int | None = None) -> list[dict]:
    from adapters_ops.evaluate import read_examples

    return read_examples(root / "tasks" / skill / f"{split}.jsonl")[:limit]


def peak_rss_mb() -> float:
    """Peak resident set of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@dataclass
class Timed:
    value: object
    seconds: float
    peak_rss_mb: float  # the process's peak so far, loaded model included


def timed(fn: Callable, *args, **kwargs) -> Timed:
    t0 = time.perf_counter()
    value = fn(*args, **kwargs)
    return Timed(value, round(time.perf_counter() - t0, 3), round(peak_rss_mb(), 1))


class Scorer:
    """One base loaded once; `accuracy(adapter, examples)` restores the pristine weights, merges
    the adapter's dense deltas in (adapters_ops.evaluate.apply_adapter) and scores exact match of
    batched greedy decoding, as the lane's own scores.json does."""

    def __init__(self, base_dir: Path, batch_size: int = EVAL_BATCH):
        from adapters_ops.evaluate import load_model, load_tokenizer

        self.base_dir = Path(base_dir)
        self.tok = load_tokenizer(base_dir)
        self.model = load_model(base_dir)
        self.pristine = {k: v.clone() for k, v in self.model.state_dict().items()}
        self.batch_size = batch_size
        self.examples_scored = 0
        self.seconds = 0.0

    def accuracy(self, adapter, items: Sequence[dict]) -> float:
        from adapters_ops.evaluate import apply_adapter, evaluate_model

        t0 = time.perf_counter()
        self.model.load_state_dict(self.pristine)
        model = apply_adapter(self.model, adapter) if adapter is not None else self.model
        r = evaluate_model(model, self.tok, items, batch_size=self.batch_size, with_loss=False)
        self.examples_scored += len(items)
        self.seconds += time.perf_counter() - t0
        return r.accuracy


def same_tensors(a, b) -> bool:
    """Two adapters with bit-identical tensors (one merge method's result reused for another)."""
    import torch

    return a.tensors.keys() == b.tensors.keys() and all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)


def lane_score(root: Path, skill: str, setting: str, n: int) -> float | None:
    """The lane's own score (scores.json) when it covers exactly these n test examples."""
    path = root / "scores.json"
    if not path.is_file():
        return None
    cell = json.loads(path.read_text()).get("scores", {}).get(skill, {}).get(setting)
    return cell["accuracy"] if cell and cell.get("n") == n else None


def machine() -> dict:
    import torch

    try:
        up = subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        up = "uptime unavailable"
    return {"date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"), "uptime": up, "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}


def ratio(after: float, before: float) -> float | None:
    return None if not before else round(after / before, 3)


def fmt(x, digits: int = 3) -> str:
    return "n/m" if x is None else f"{x:.{digits}f}"


def write_json(path: Path | None, result: dict) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
    print(f"\nresults: {path}", file=sys.stderr)


def report(args, run_fn: Callable[[Callable[[str], None]], dict], table_fn: Callable[[dict], str]) -> int:
    """A script's main after its arguments: `run_fn(log)` in the lane's deterministic mode
    (args.threads), the machine before and after and the peak RSS added to its result, the
    table printed, the JSON written (args.json). Progress lines go to stderr."""
    with _zoo_train.deterministic(threads=args.threads):
        env = machine()
        result = run_fn(lambda m: print(m, file=sys.stderr, flush=True))
    result["machine"], result["machine_end"] = env, machine()
    result["peak_rss_mb"] = peak_rss_mb()
    print(table_fn(result))
    write_json(args.json, result)
    return 0


def add_common_args(ap) -> None:
    ap.add_argument("--lane", default=None, help="lane folder (default: the cached real lane; never built here)")
    ap.add_argument("--skills", nargs="+", default=None, help="skills to measure (default: all of the lane's)")
    ap.add_argument("--quick", action="store_true", help=f"score only the first {QUICK_N} test examples")
    ap.add_argument("--limit", type=int, default=None, help="score only the first N test examples")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None, help="write the results here (default: none)")


def limit_of(args) -> int | None:
    return args.limit if args.limit is not None else (QUICK_N if args.quick else None)
