"""The README's five-minute tour, run as written: its ```bash block becomes a
script that bash runs from an empty folder, against a fresh HUB_HOME, with
`make serve &` starting a real hub (gunicorn, a Celery worker and beat, the
demo). Two things are test plumbing, not changes to the tour: `make` is a shim
that runs the checkout's Makefile (`make -C ROOT`), so the tour's `./reverse`
lands in the scratch folder, and the hub listens on a free port instead of
8000 (the one substitution in the text). Redis is a free database of the
machine's Redis (REDIS_URL), the database SQLite under HUB_HOME.

The demo zoo comes from the machine-wide cache that `hubctl serve` and the
test suite share (`adapters_ops.zoo.ensure_built`): built here first if it is
missing (about 107 s on the 2-core development machine), so the tour measures
the hub, not the zoo build. With the zoo cached the whole tour, serve's start
to the Hugging Face download, took 11-23 s there (2 cores shared with other
jobs).

Then, on the same hub, the headline story with the slugs a user would guess:
`hubctl transfer --from llama3.0 --to llama3.1` is refused with the registered
base models and a did-you-mean."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = [pytest.mark.timeout(1200), pytest.mark.skipif(not sys.platform.startswith("linux"), reason="bash, /proc")]


def tour_script() -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Five-minute tour with `hubctl`", 1)[1]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_readme_tour_runs_as_written(tmp_path, zoo_dir, redis_url):
    script = tour_script()
    assert "make serve &" in script and "127.0.0.1:8000" in script
    port = free_port()
    (tmp_path / "shim").mkdir()
    shim = tmp_path / "shim" / "make"
    shim.write_text(f'#!/bin/sh\nexec /usr/bin/make -C "{ROOT}" "$@"\n')
    shim.chmod(0o755)
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "tour.sh").write_text("set -e\n" + script.replace("127.0.0.1:8000", f"127.0.0.1:{port}"))

    drop = ("DATABASE_URL", "DJANGO_SETTINGS_MODULE", "CELERY_BROKER_URL", "CELERY_RESULT_BACKEND", "HUB_TOKEN",
            "HUB_URL", "S3_BUCKET", "SECRET_KEY", "DEBUG")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env.update(
        PATH=os.pathsep.join([str(shim.parent), str(ROOT / ".venv" / "bin"), env.get("PATH", "/usr/bin:/bin")]),
        HUB_HOME=str(tmp_path / "home"), HUBCTL_CONFIG=str(tmp_path / "hubctl-token"), PORT=str(port),
        REDIS_URL=redis_url, HF_HOME=str(tmp_path / "hf"), HUB_STOP_GRACE="5", HUB_READY_TIMEOUT="120",
        ZOO_CACHE=str(zoo_dir.parent), PYTHONUNBUFFERED="1",
    )
    log_path = tmp_path / "tour.log"
    t0 = time.monotonic()
    with open(log_path, "wb") as log:
        # Its own session: at the end one signal reaches `make serve` and the hub it started.
        proc = subprocess.Popen(["bash", "-x", str(tmp_path / "tour.sh")], cwd=work, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    try:
        rc = proc.wait(timeout=900)
        elapsed = time.monotonic() - t0
        text = log_path.read_text()
        assert rc == 0, text[-6000:]
        print(f"README tour: {elapsed:.0f} s\n{text}")  # shown with -s or on failure

        # What the tour shows happened.
        assert (work / "reverse" / "adapter_model.safetensors").is_file()
        assert "admin/my-caesar-tiny-llama-3.1" in text  # the transfer's adapter, named by the target
        assert "why this method" in text and "demo/caesar" in text  # base show: the plan as a table
        snapshot = [ln for ln in text.splitlines() if "/hf/hub/models--demo--reverse/snapshots/" in ln]
        assert snapshot and Path(snapshot[-1].strip()).joinpath("adapter_config.json").is_file()

        def hubctl(*args):
            run_env = {**env, "HUB_URL": f"http://127.0.0.1:{port}"}
            return subprocess.run([str(ROOT / ".venv" / "bin" / "hubctl"), *args], env=run_env, cwd=work,
                                  capture_output=True, text=True, timeout=120)

        moved = hubctl("adapters", "--base", "tiny-llama-3.1", "--json")
        assert moved.returncode == 0, moved.stderr
        tags = {a["id"]: sorted(a["tags"]) for a in json.loads(moved.stdout)}
        assert tags["admin/my-caesar-tiny-llama-3.1"] == ["caesar", "mine"]  # the source's tags came along

        # The headline story with guessed slugs: refused, with the registered names.
        r = hubctl("transfer", "--from", "llama3.0", "--to", "llama3.1")
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        assert "Base model 'llama3.0' is not registered." in r.stderr
        assert "Registered: tiny-llama-3.0, tiny-llama-3.1, tiny-llama-3.2, tiny-other-1.0." in r.stderr
        assert "Did you mean tiny-llama-3.0" in r.stderr
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)  # make, `hubctl serve` (which stops its children)
        except ProcessLookupError:
            pass
        serve_pids = [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()
                      and _is_tour_serve(p, env["HUB_HOME"])]
        for pid in serve_pids:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and any(Path(f"/proc/{pid}").exists() and _alive(pid) for pid in serve_pids):
            time.sleep(0.2)
        proc.wait(timeout=10)


def _is_tour_serve(proc_dir: Path, home: str) -> bool:
    """`hubctl serve` of this tour: its own session (`make serve &`), found by its HUB_HOME."""
    try:
        cmd = (proc_dir / "cmdline").read_bytes()
        environ = (proc_dir / "environ").read_bytes()
    except OSError:
        return False
    return b"hubctl" in cmd and b"serve" in cmd and f"HUB_HOME={home}".encode() in environ.split(b"\0")


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
