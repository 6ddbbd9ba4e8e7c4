"""Live-worker fixtures (a pytest plugin loaded by tests/conftest.py, so every
folder shares ONE session Redis database):  a private Redis database per test session, real
`celery worker` / `celery beat` subprocesses on the test database and blob
store, and helpers to wait on job rows.

Worker subprocesses run with short heartbeat / reaper / re-send intervals
(environment knobs, see docs/jobs.md) so failure recovery shows in seconds.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

import pytest

os.environ["HUB_TEST_OPS"] = "1"  # the test process validates test ops too

REPO = Path(__file__).resolve().parents[1]
REDIS_HOST = "127.0.0.1"
LOCK_KEY = "hub-test:session-lock"

FAST_ENV = {
    "JOB_HEARTBEAT_TIMEOUT": "2",
    "JOB_REAPER_INTERVAL": "0.5",
    "JOB_REQUEUE_AFTER": "1.5",
    "JOB_RETRY_BACKOFF": "0.2",
    "JOB_RETRY_BACKOFF_MAX": "1",
    "JOB_PROGRESS_INTERVAL": "0.05",
    "JOB_MAX_ATTEMPTS": "3",
    "WEBHOOK_ALLOW_PRIVATE": "1",  # test receivers listen on 127.0.0.1
    "WEBHOOK_RETRY_DELAYS": "0.5,0.5",
}


@pytest.fixture(scope="session", autouse=True)
def _test_ops():
    from adapters_ops import opspecs

    opspecs.register_test_ops()


# --- redis -----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind((REDIS_HOST, 0))
        return s.getsockname()[1]


def redis_server_binary() -> str:
    for cand in (REPO / ".venv/bin/redis-server", Path("/usr/bin/redis-server")):
        if cand.exists():
            return str(cand)
    pytest.skip("no redis-server binary")


class RedisServer:
    """A private, non-persistent redis-server that a test may kill and restart."""

    def __init__(self, workdir: Path):
        self.port = free_port()
        self.workdir = workdir
        self.proc = None

    @property
    def url(self) -> str:
        return f"redis://{REDIS_HOST}:{self.port}/0"

    def start(self):
        self.proc = subprocess.Popen(
            [redis_server_binary(), "--port", str(self.port), "--bind", REDIS_HOST, "--save", "",
             "--appendonly", "no", "--dir", str(self.workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        import redis

        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                if redis.Redis(host=REDIS_HOST, port=self.port).ping():
                    return self
            except redis.exceptions.ConnectionError:
                time.sleep(0.05)
        raise RuntimeError("private redis-server did not start")

    def kill(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    """A Redis database of our own: a free DB number on the machine's Redis
    (claimed with SET NX, so parallel runs never share one), or a private server."""
    import redis

    try:
        for db in range(15, 0, -1):
            r = redis.Redis(host=REDIS_HOST, port=6379, db=db, socket_connect_timeout=2)
            if r.set(LOCK_KEY, str(os.getpid()), nx=True, ex=3 * 3600):
                break
        else:
            raise RuntimeError("no free Redis database")
        url = f"redis://{REDIS_HOST}:6379/{db}"
        server = None
    except (redis.exceptions.ConnectionError, RuntimeError):
        server = RedisServer(tmp_path_factory.mktemp("redis")).start()
        r, url = redis.Redis.from_url(server.url), server.url
        r.set(LOCK_KEY, str(os.getpid()))
    point_app_at(url)
    yield url
    r.flushdb()  # also drops the lock
    if server:
        server.kill()


def point_app_at(url: str) -> None:
    """Make this (test) process send to `url`: conf and cached connection pools."""
    from workers.app import app

    app.conf.broker_url = url
    app.conf.result_backend = url
    # kombu keeps one pool per broker URL; dropping our references is enough.
    app._pool = None
    app.amqp._producer_pool = None


@pytest.fixture
def broker(redis_url):
    """A clean broker database for one test (keeps the session lock)."""
    import redis

    r = redis.Redis.from_url(redis_url)
    for key in r.scan_iter():
        if key != LOCK_KEY.encode():
            r.delete(key)
    return r


# --- worker processes -----------------------------------------------------------------------------


def database_url(sd: dict) -> str:
    if sd["ENGINE"] == "django.db.backends.sqlite3":
        return f"sqlite:///{sd['NAME']}"
    if sd["ENGINE"] == "django.db.backends.postgresql":
        auth = quote(sd.get("USER") or "postgres", safe="")
        if sd.get("PASSWORD"):
            auth += ":" + quote(sd["PASSWORD"], safe="")
        host = sd.get("HOST") or "127.0.0.1"
        port = f":{sd['PORT']}" if sd.get("PORT") else ""
        return f"postgres://{auth}@{host}{port}/{quote(sd['NAME'], safe='')}"
    raise RuntimeError(f"no DATABASE_URL form for {sd['ENGINE']}")


class Proc:
    def __init__(self, argv, env, log: Path, name: str):
        self.name = name
        self.log = log
        self._fh = open(log, "wb")
        self.popen = subprocess.Popen(argv, env=env, cwd=REPO, stdout=self._fh, stderr=subprocess.STDOUT,
                                      start_new_session=True)

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, needle: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in self.text():
                return
            if self.popen.poll() is not None:
                raise RuntimeError(f"{self.name} exited ({self.popen.returncode}):\n{self.text()[-3000:]}")
            time.sleep(0.05)
        raise TimeoutError(f"{self.name}: no {needle!r} after {timeout} s:\n{self.text()[-3000:]}")

    def killpg(self, sig=signal.SIGKILL) -> None:
        """Signal the whole process group: the worker and its pool children, as
        when a machine or container dies."""
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, sig)
            except ProcessLookupError:
                pass
        if sig == signal.SIGKILL:
            self.popen.wait(10)

    def stop(self) -> None:
        # No warm shutdown: tests end with the broker flushed and the rows gone.
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.popen.wait(10)
        self._fh.close()


@pytest.fixture
def celery_procs(transactional_db, broker, redis_url, tmp_path, settings):
    """Start real workers and beat on this test's database, blobs and broker.

    `start_worker(name, queues=..., concurrency=1, env={...})`,
    `start_beat(env={...})`; all are stopped (process groups killed) at teardown,
    before the database is flushed.
    """
    from django.db import connection

    from hub.queue import beat_argv, worker_argv

    base_env = dict(os.environ)
    base_env.update(FAST_ENV)
    base_env.update({
        "DJANGO_SETTINGS_MODULE": "hub.settings",
        "HUB_HOME": str(settings.HUB_HOME),
        "BLOB_ROOT": str(settings.BLOB_ROOT),
        "DATABASE_URL": database_url(connection.settings_dict),
        "REDIS_URL": redis_url,
        "CELERY_BROKER_URL": redis_url,
        "CELERY_RESULT_BACKEND": redis_url,
        "HUB_TEST_OPS": "1",
        "LOG_LEVEL": "INFO",
        "PYTHONPATH": str(REPO),
        "JOB_WORK_DIR": str(tmp_path),
    })
    procs: list[Proc] = []

    class Starter:
        env = base_env

        def worker(self, name="w1", queues=("cpu", "gpu"), concurrency=1, env=None, wait=True) -> Proc:
            e = {**base_env, **(env or {})}
            p = Proc(worker_argv(queues=queues, concurrency=concurrency, name=f"{name}@%h", loglevel="INFO"),
                     e, tmp_path / f"{name}.log", name)
            procs.append(p)
            if wait:
                p.wait_for(" ready.", 60)
            return p

        def beat(self, env=None) -> Proc:
            e = {**base_env, **(env or {})}
            p = Proc(beat_argv(schedule=str(tmp_path / "beat-schedule"), loglevel="INFO"), e,
                     tmp_path / "beat.log", "beat")
            procs.append(p)
            p.wait_for("beat: Starting", 60)
            return p

    yield Starter()
    for p in procs:
        p.stop()


# --- job helpers ----------------------------------------------------------------------------------


def wait_jobs(ids, statuses=("succeeded", "failed", "cancelled"), timeout=30.0, on_poll=None):
    """Poll until every job is in one of `statuses`; returns {id: Job}."""
    from hub.registry.models import Job

    ids = [str(i) for i in ids]
    deadline = time.monotonic() + timeout
    while True:
        rows = {str(j.pk): j for j in Job.objects.filter(pk__in=ids)}
        if on_poll:
            on_poll(rows)
        if len(rows) == len(ids) and all(j.status in statuses for j in rows.values()):
            return rows
        if time.monotonic() > deadline:
            state = {k: (v.status, v.attempts, v.message) for k, v in rows.items()}
            raise TimeoutError(f"jobs not {statuses} after {timeout} s: {state}")
        time.sleep(0.05)


def wait_until(predicate, timeout=60.0, what="condition"):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture(scope="session")
def peft_adapter_dir(make_peft_adapter):
    return make_peft_adapter("jobs-lora")


@pytest.fixture
def peft_adapter(db, tiny_base, user, peft_adapter_dir):
    """alice/lora: a real PEFT adapter on tiny-base, uploaded through the service."""
    from hub.registry.services import IncomingFile, adapter_create_from_upload

    d = peft_adapter_dir
    files = [IncomingFile(p.name, open(p, "rb")) for p in sorted(d.iterdir()) if p.is_file()]
    try:
        rev = adapter_create_from_upload(owner="alice", name="lora", base=tiny_base, files=files, user=user)
    finally:
        for f in files:
            f.fileobj.close()
    return rev.adapter


def stored_blob_files() -> set[str]:
    from django.conf import settings

    root = Path(settings.BLOB_ROOT) / "sha256"
    return {p.name for p in root.rglob("*") if p.is_file()} if root.exists() else set()


@pytest.fixture
def orphans(db):
    """A callable: Blob rows nothing refers to, and blob files (written during
    this test: the blob store outlives each test's database) without a row."""
    from hub.registry.models import Adapter, BaseModelFile, Blob, Job, RevisionFile

    before = stored_blob_files()

    def check() -> dict:
        held = set(RevisionFile.objects.values_list("blob_id", flat=True))
        held |= set(BaseModelFile.objects.values_list("blob_id", flat=True))
        held |= set(Adapter.objects.exclude(seeds=None).values_list("seeds_id", flat=True))
        for cps in Job.objects.values_list("checkpoints", flat=True):
            held |= set((cps or {}).values())
        rows = set(Blob.objects.values_list("sha256", flat=True))
        return {"unreferenced_rows": rows - held, "files_without_row": stored_blob_files() - before - rows}

    return check
