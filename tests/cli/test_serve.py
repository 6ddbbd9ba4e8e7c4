"""`hubctl serve` smoke test: a fresh HUB_HOME with no DATABASE_URL or
REDIS_URL starts an embedded Redis, migrates SQLite, serves the API with an
admin token, and on SIGTERM stops every process it started. And the
SECRET_KEY rules that keep serve and the tests working while a deployment
cannot run on the built-in key. (Restarts: test_serve_supervision.py.)"""

from __future__ import annotations

import importlib.util
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import redis

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def descendants(pid: int) -> dict[int, str]:
    """pid -> command line of every process below pid, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    found, todo = {}, [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            try:
                found[child] = (Path("/proc") / str(child) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            todo.append(child)
    return found


def running(pid: int) -> bool:
    try:
        state = (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_serve_starts_everything_and_stops_it(tmp_path):
    port, redis_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items()
           if k not in ("REDIS_URL", "DATABASE_URL", "DJANGO_SETTINGS_MODULE", "CELERY_BROKER_URL",
                        "CELERY_RESULT_BACKEND", "HUB_TOKEN", "S3_BUCKET")}
    env.update(HUB_HOME=str(tmp_path / "home"), HUBCTL_CONFIG=str(tmp_path / "token"), HUB_STOP_GRACE="8")
    log_path = tmp_path / "serve.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "hub.cli.main", "serve", "--no-demo", "--port", str(port),
             "--redis-port", str(redis_port), "--web-workers", "1"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            try:
                if httpx.get(f"{url}/api/v1/base-models/", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.2)

        assert redis.Redis(port=redis_port, socket_timeout=2).ping()
        assert (tmp_path / "home" / "hub.sqlite3").is_file()
        # The admin token is written where `hubctl login` keeps tokens, and works.
        deadline = time.monotonic() + 10
        while "export HUB_URL=" not in log_path.read_text() and time.monotonic() < deadline:
            time.sleep(0.1)
        token = (tmp_path / "token").read_text().strip()
        assert f"export HUB_URL={url} HUB_TOKEN={token}" in log_path.read_text()
        # ... as there was none yet; and beside the data, with this install's SECRET_KEY, owner-only.
        home = tmp_path / "home"
        assert (home / "admin-token").read_text().strip() == token
        assert {stat.S_IMODE((home / name).stat().st_mode) for name in ("admin-token", "secret-key")} == {0o600}
        me = httpx.get(f"{url}/api/v1/me", headers={"Authorization": f"Bearer {token}"}, timeout=5).json()
        assert (me["username"], me["is_staff"]) == ("admin", True)

        if importlib.util.find_spec("workers.app") is not None:  # the worker and beat start with the hub
            deadline = time.monotonic() + 20
            while not any("celery" in c and " beat" in c for c in descendants(proc.pid).values()):
                assert time.monotonic() < deadline, descendants(proc.pid)
                time.sleep(0.2)
            assert any("celery" in c and " worker" in c for c in descendants(proc.pid).values())
        started = descendants(proc.pid)
        assert any("redis-server" in c for c in started.values()) and any("gunicorn" in c for c in started.values())
    finally:
        started = descendants(proc.pid) if proc.poll() is None else {}
        proc.send_signal(signal.SIGTERM)
        try:
            rc = proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            for pid in started:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            raise
    assert rc == 0, log_path.read_text()[-3000:]
    assert [pid for pid in started if running(pid)] == []
    assert "serve | stopped" in log_path.read_text()
    with pytest.raises(redis.ConnectionError):
        redis.Redis(port=redis_port, socket_timeout=1).ping()


# --- SECRET_KEY ---------------------------------------------------------------------------------


def django(args: list[str], home: Path, **env: str) -> subprocess.CompletedProcess:
    """Run Python in a clean environment (no SECRET_KEY, DEBUG, DATABASE_URL...) on a fresh HUB_HOME."""
    clean = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HUB_HOME": str(home), **env}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=clean, capture_output=True, text=True, timeout=120)


def test_settings_refuse_the_builtin_key_when_debug_is_off(tmp_path):
    run = django(["-c", "import hub.settings"], tmp_path, DEBUG="0")
    assert run.returncode != 0
    assert "ImproperlyConfigured: SECRET_KEY is not set and DEBUG is off" in run.stderr
    assert "export SECRET_KEY=" in run.stderr


@pytest.mark.parametrize("env, key_file, expected", [
    ({}, None, "builtin"),  # how the tests and a laptop's manage.py run
    ({"DEBUG": "1"}, None, "builtin"),
    ({"DEBUG": "0"}, "serve-made-key", "serve-made-key"),  # `hubctl serve` with DEBUG=0
    ({"DEBUG": "0", "SECRET_KEY": "from-env"}, "serve-made-key", "from-env"),
])
def test_settings_secret_key_sources(tmp_path, env, key_file, expected):
    if key_file:
        (tmp_path / "secret-key").write_text(key_file + "\n")
    code = "import hub.settings as s; print('builtin' if s.SECRET_KEY == s._EMBEDDED_SECRET_KEY else s.SECRET_KEY)"
    run = django(["-c", code], tmp_path, **env)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == expected


def test_check_deploy_flags_the_builtin_key(tmp_path):
    run = django(["manage.py", "check", "--deploy"], tmp_path)
    assert run.returncode == 1 and "(hub.E001) SECRET_KEY is the built-in default" in run.stderr, run.stderr
    run = django(["manage.py", "check", "--deploy"], tmp_path, SECRET_KEY="x" * 60)
    assert "hub.E001" not in run.stdout + run.stderr
