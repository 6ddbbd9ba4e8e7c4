"""`hubctl serve` keeps the hub up when a supervised child dies: the embedded
Redis (SIGKILLed) comes back on its append-only file with the queued messages,
the Celery worker comes back, and the web answers throughout. One hub, started
with DEBUG=0 (its per-install SECRET_KEY must suffice) over a token file that the
user saved before, which serve must leave alone."""

from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import redis

from tests.cli.test_serve import ROOT, descendants, free_port, running

pytestmark = [
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc"),
    pytest.mark.timeout(120),
]

USER_TOKEN = b"hub_the-users-own-token-for-another-hub\n"


@dataclass
class Hub:
    proc: subprocess.Popen
    url: str
    redis_port: int
    home: Path
    token_file: Path
    log: Path

    def log_tail(self) -> str:
        return self.log.read_text()[-4000:]

    def pids(self, *words: str) -> list[int]:
        """Live children of serve (not their pool processes) whose command line has every word."""
        return [pid for pid, cmd in descendants(self.proc.pid).items()
                if all(w in cmd for w in words) and running(pid) and parent(pid) == self.proc.pid]


def parent(pid: int) -> int | None:
    try:
        return int((Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[1])
    except OSError:
        return None


def wait_for(what, timeout: float, hub: Hub, step: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        assert hub.proc.poll() is None, hub.log_tail()
        value = what()
        if value:
            return value
        assert time.monotonic() < deadline, hub.log_tail()
        time.sleep(step)


def web_ok(url: str) -> bool:
    try:
        return httpx.get(f"{url}/api/v1/base-models/", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("supervised")
    token_file = tmp / "token"
    token_file.write_bytes(USER_TOKEN)
    token_file.chmod(0o600)
    port, redis_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items()
           if k not in ("REDIS_URL", "DATABASE_URL", "DJANGO_SETTINGS_MODULE", "CELERY_BROKER_URL",
                        "CELERY_RESULT_BACKEND", "HUB_TOKEN", "S3_BUCKET", "SECRET_KEY")}
    env.update(HUB_HOME=str(tmp / "home"), HUBCTL_CONFIG=str(token_file), HUB_STOP_GRACE="5", DEBUG="0")
    log = tmp / "serve.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "hub.cli.main", "serve", "--no-demo", "--port", str(port),
             "--redis-port", str(redis_port), "--web-workers", "1", "--workers", "1"],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
        )
    h = Hub(proc, f"http://127.0.0.1:{port}", redis_port, tmp / "home", token_file, log)
    try:
        wait_for(lambda: web_ok(h.url) and "export HUB_URL=" in log.read_text(), 60, h, step=0.2)
        yield h
    finally:
        started = descendants(proc.pid)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        for pid in started:  # whatever serve left behind, so a failure leaks no process
            if running(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
    assert proc.returncode == 0, h.log_tail()


def test_saved_token_file_is_left_alone(hub):
    assert hub.token_file.read_bytes() == USER_TOKEN
    admin = hub.home / "admin-token"
    assert stat.S_IMODE(admin.stat().st_mode) == 0o600
    assert stat.S_IMODE((hub.home / "secret-key").stat().st_mode) == 0o600
    token = admin.read_text().strip()
    assert f"hubctl login < {admin}" in hub.log.read_text()
    me = httpx.get(f"{hub.url}/api/v1/me", headers={"Authorization": f"Bearer {token}"}, timeout=5).json()
    assert me["username"] == "admin"


def test_redis_sigkill_restarts_it_with_its_data_and_the_web_stays_up(hub):
    r = redis.Redis(port=hub.redis_port, socket_timeout=2)
    assert r.config_get("appendonly") == {"appendonly": "yes"}
    assert r.config_get("appendfsync") == {"appendfsync": "everysec"}
    # A message as a Celery queue holds it, pushed just before the crash: nobody consumes this list.
    r.lpush("test-supervision", b"job-message")
    [old] = hub.pids("redis-server")
    os.kill(old, signal.SIGKILL)

    down = []  # web answers that were not 200 while Redis was away

    def redis_back():
        if not web_ok(hub.url):
            down.append(time.monotonic())
        pids = [p for p in hub.pids("redis-server") if p != old]
        try:
            return pids and r.ping()
        except redis.RedisError:
            return False

    wait_for(redis_back, 20, hub)
    for _ in range(5):
        redis_back()
        time.sleep(0.2)
    assert down == [], hub.log_tail()
    assert r.lrange("test-supervision", 0, -1) == [b"job-message"]
    assert r.config_get("appendonly") == {"appendonly": "yes"}
    assert "redis was killed by SIGKILL: restarting it in 0.5s" in hub.log.read_text()


def test_worker_is_restarted(hub):
    [old] = wait_for(lambda: hub.pids("celery", " worker "), 30, hub)
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: [p for p in hub.pids("celery", " worker ") if p != old], 20, hub)
    assert web_ok(hub.url)
    assert "worker was killed by SIGKILL: restarting it in" in hub.log.read_text()
