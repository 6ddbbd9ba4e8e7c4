"""Smoke test of benchmarks/bench_registry_io.py: one small round on filesystem
blobs, every step measured and checked (it asserts the bytes that come back),
so the benchmark behind docs/deploy.md's tables keeps running."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_bench_registry_io_runs_every_step(tmp_path):
    out = tmp_path / "io.json"
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "S3_BUCKET")}
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_registry_io.py"), "--size-mb", "64",
                        "--repeat", "1", "--settle", "0", "--json", str(out)],
                       env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    (run,) = json.loads(out.read_text())
    assert set(run["steps"]) == {"upload", "download", "download to /dev/null", "range (middle half)",
                                 "hubctl base add", "hf_hub_download"}
    for name, step in run["steps"].items():
        assert step["mb_s"] > 0 and step["rss_growth_mb"] < 50, (name, step)
    assert run["copy_mb_s"] > 0 and run["rw_copy_mb_s"] > 0
    assert "hubctl base add" in r.stdout and "anchors: cp / rw copy" in r.stdout
