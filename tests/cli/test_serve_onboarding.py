"""`hubctl serve` on a first start and a restart: a demo that fails leaves the
hub serving and says why on the home page; the restart reuses the admin token
(no new token per start) and leaves a token the user saved alone; the banner
says how to set admin's web password on every start until it has one. And
`hubctl demo path`, which reads what serve recorded."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from hub import demo_status

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="process groups")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Served:
    def __init__(self, tmp_path: Path, env: dict, *args: str):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tmp_path / f"serve-{self.port}.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "hub.cli.main", "serve", "--port", str(self.port), "--redis-port",
                 str(free_port()), "--web-workers", "1", "--workers", "0", *args],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
            )

    def text(self) -> str:
        return self.log.read_text()

    def wait_for(self, needle: str, timeout: float = 90) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.text():
            assert self.proc.poll() is None, self.text()[-3000:]
            assert time.monotonic() < deadline, self.text()[-3000:]
            time.sleep(0.2)

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise


def test_failed_demo_keeps_the_hub_up_and_restarts_reuse_the_token(tmp_path):
    home = tmp_path / "home"
    env = {k: v for k, v in os.environ.items()
           if k not in ("REDIS_URL", "DATABASE_URL", "DJANGO_SETTINGS_MODULE", "CELERY_BROKER_URL",
                        "CELERY_RESULT_BACKEND", "HUB_TOKEN", "S3_BUCKET")}
    saved = tmp_path / "hubctl-token"
    saved.write_text("hub_the-users-own-token\n")  # `hubctl login` for another hub: never overwritten
    # A zoo cache under a regular file cannot be made: the demo build fails.
    (tmp_path / "not-a-folder").write_text("")
    env.update(HUB_HOME=str(home), HUBCTL_CONFIG=str(saved), HUB_STOP_GRACE="5",
               ZOO_CACHE=str(tmp_path / "not-a-folder" / "zoo"))

    first = Served(tmp_path, env)
    try:
        first.wait_for("demo skipped:", timeout=120)
        time.sleep(1)
        assert first.proc.poll() is None, first.text()[-3000:]  # still serving
        assert httpx.get(f"{first.url}/api/v1/base-models/", timeout=5).status_code == 200
        status = demo_status.read(home)
        assert status["state"] == "failed" and "the zoo build exited with code 1" in status["detail"]
        assert any("NotADirectoryError" in line or "FileExistsError" in line for line in status["log"])
        home_page = httpx.get(f"{first.url}/", timeout=5).text
        assert 'id="demo-status" data-state="failed"' in home_page and "The demo could not be set up" in home_page
        assert "the zoo build exited with code 1" in home_page
        text = first.text()
        token = (home / "admin-token").read_text().strip()
        assert f"  {token}" in text and "Admin token (new," in text
        assert "admin has no password yet" in text and f"HUB_HOME={home} " in text and "changepassword admin" in text
    finally:
        assert first.stop() == 0, first.text()[-3000:]
    assert saved.read_text() == "hub_the-users-own-token\n"

    again = Served(tmp_path, env, "--no-demo")
    try:
        again.wait_for("export HUB_URL=")
        text = again.text()
        assert f"  {token}" in text and "Admin token (the same as last time," in text
        assert "admin has no password yet" in text  # on every start until it has one
        me = httpx.get(f"{again.url}/api/v1/me", headers={"Authorization": f"Bearer {token}"}, timeout=5)
        assert me.json()["username"] == "admin"
    finally:
        assert again.stop() == 0, again.text()[-3000:]
    assert (home / "admin-token").read_text().strip() == token
    assert saved.read_text() == "hub_the-users-own-token\n"
    count = subprocess.run(
        [sys.executable, "manage.py", "shell", "-c",
         "from hub.registry.models import ApiToken; print(ApiToken.objects.filter(user__username='admin').count())"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert count.stdout.strip().splitlines()[-1] == "1", count.stderr[-2000:]  # one admin token after two starts


@pytest.mark.parametrize("status, code, needle", [
    (("ready", "demo registered", "/zoo/x"), 0, "/zoo/x"),
    (("failed", "the zoo build exited with code 1", ""), 1, "The demo failed: the zoo build exited with code 1"),
    (("building", "building the demo zoo", ""), 1, "No demo registered in"),
    (None, 1, "start `hubctl serve`"),
])
def test_demo_path(tmp_path, monkeypatch, capsys, status, code, needle):
    from hub.cli.main import main

    monkeypatch.setenv("HUB_HOME", str(tmp_path))
    if status:
        demo_status.write(tmp_path, status[0], status[1], zoo=status[2])
    assert main(["demo", "path"]) == code
    captured = capsys.readouterr()
    assert needle in (captured.out if code == 0 else captured.err)
    if code == 0:
        assert captured.out == "/zoo/x\n"
