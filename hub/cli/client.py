"""The HTTP side of `hubctl`: configuration (HUB_URL, HUB_TOKEN, the stored
token), one httpx client, and the mapping of failures to exit codes.

Nothing here imports Django, torch or the tensor library: `hubctl` is a plain
client of the REST API and runs wherever httpx does.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote

import httpx

# httpcore reads a response 64 KiB at a time, and each read is a trip through
# h11's parser in Python: a multi-GB pull spent more time there than writing
# to disk. 1 MiB reads (a class attribute httpcore reads per call; hubctl is
# its own process) cut those trips 16x (docs/deploy.md, "Client side").
try:
    from httpcore._sync.http11 import HTTP11Connection

    HTTP11Connection.READ_NUM_BYTES = max(getattr(HTTP11Connection, "READ_NUM_BYTES", 0), 1 << 20)
except ImportError:  # another httpcore layout: its own read size stands
    pass

DEFAULT_URL = "http://127.0.0.1:8000"
API = "/api/v1"
REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
SLUG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


class CliError(Exception):
    """A failure reported as one line on stderr, with an exit code."""

    exit_code = 1

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message


class UserError(CliError):
    """Bad input, a refused request (4xx): exit 1."""

    exit_code = 1


class ServerError(CliError):
    """The hub failed (5xx) or cannot be reached: exit 2."""

    exit_code = 2


# --- configuration ------------------------------------------------------------------------


def hub_url() -> str:
    return (os.environ.get("HUB_URL") or DEFAULT_URL).rstrip("/")


def token_path() -> Path:
    """Where `hubctl login` keeps the token: $HUBCTL_CONFIG, else ~/.config/hubctl/token."""
    custom = os.environ.get("HUBCTL_CONFIG")
    if custom:
        return Path(custom).expanduser()
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    return base / "hubctl" / "token"


def stored_token() -> str | None:
    try:
        return token_path().read_text().strip() or None
    except OSError:
        return None


def write_private(path: Path, text: str) -> None:
    """Write a file readable by its owner only (0600), atomically."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text.strip() + "\n")
    os.chmod(tmp, 0o600)  # in case the file existed with looser bits
    os.replace(tmp, path)


def store_token(token: str) -> Path:
    """Write the token where `login` keeps it, readable by its owner only."""
    path = token_path()
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    write_private(path, token)
    return path


def hub_token() -> str | None:
    return os.environ.get("HUB_TOKEN") or stored_token()


def repo_id(value: str) -> tuple[str, str]:
    """Split and check `owner/name`."""
    if not REPO_ID.match(value or ""):
        raise UserError(f"Name adapters as owner/name (letters, digits, '-', '_', '.'), got {value!r}.")
    owner, name = value.split("/", 1)
    return owner, name


def slug(value: str) -> str:
    if not SLUG.match(value or ""):
        raise UserError(f"Base model slugs use letters, digits, '-', '_' and '.', got {value!r}.")
    return value


def adapter_path(repo: str) -> str:
    owner, name = repo_id(repo)
    return f"{API}/adapters/{owner}/{name}"


def file_path(path: str) -> str:
    return quote(path, safe="/")


# --- errors -------------------------------------------------------------------------------


def _error_body(response: httpx.Response) -> tuple[str, str]:
    """(code, detail) from `{"error", "detail"}`; the status text otherwise."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        detail = body.get("detail")
        code = body.get("error") or ""
        if isinstance(detail, (dict, list)):
            detail = str(detail)
        if detail:
            return str(code), str(detail).strip()
    text = (response.text or "").strip().splitlines()
    first = text[0][:200] if text and not text[0].lstrip().startswith("<") else ""
    return "", first or response.reason_phrase or f"HTTP {response.status_code}"


def raise_for_status(response: httpx.Response) -> None:
    status = response.status_code
    if status < 400:
        return
    if response.is_stream_consumed is False:
        response.read()
    code, detail = _error_body(response)
    try:
        sent_token = "authorization" in response.request.headers
    except RuntimeError:  # a response built without a request
        sent_token = False
    if status == 401 or (status == 403 and code == "not_authenticated"):
        if sent_token:
            raise UserError(
                f"The hub refused the token: {detail} Set HUB_TOKEN or run `hubctl login` with a valid token."
            )
        raise UserError(f"This needs a token: {detail} Set HUB_TOKEN or run `hubctl login`.")
    if status < 500:
        raise UserError(detail if detail.endswith((".", "?", "!")) else detail + ".")
    raise ServerError(f"The hub failed ({status}): {detail}")


# --- the client ---------------------------------------------------------------------------


class Client:
    """One httpx client for a command: base URL, bearer token, error mapping."""

    def __init__(self, url: str | None = None, token: str | None = None, timeout: float = 60.0):
        self.url = (url or hub_url()).rstrip("/")
        self.token = token if token is not None else hub_token()
        headers = {"User-Agent": "hubctl/0.1", "Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        self.http = httpx.Client(base_url=self.url, headers=headers, timeout=httpx.Timeout(timeout, connect=10.0))

    def close(self):
        self.http.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _unreachable(self, exc: Exception) -> ServerError:
        reason = str(exc) or type(exc).__name__
        return ServerError(
            f"Cannot reach the hub at {self.url} ({reason}). Is `hubctl serve` running? Set HUB_URL to its address."
        )

    def _send(self, method: str, path: str, *, timeout=None, **kwargs) -> httpx.Response:
        if timeout is not None:
            kwargs["timeout"] = timeout
        try:
            return self.http.request(method, path, **kwargs)
        except httpx.TimeoutException as exc:
            raise ServerError(f"The hub at {self.url} did not answer in time ({type(exc).__name__}).") from None
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from None

    def request(self, method: str, path: str, *, timeout=None, **kwargs) -> httpx.Response:
        response = self._send(method, path, timeout=timeout, **kwargs)
        raise_for_status(response)
        return response

    def found(self, path: str) -> bool:
        """HEAD `path`: True on 2xx, False on 404; other answers raise like `request`."""
        response = self._send("HEAD", path)
        if response.status_code == 404:
            return False
        raise_for_status(response)
        return True

    def json(self, method: str, path: str, **kwargs):
        response = self.request(method, path, **kwargs)
        if response.status_code == 204 or not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            raise ServerError(f"The hub answered {method} {path} with something that is not JSON.") from None

    def get(self, path: str, **params):
        return self.json("GET", path, params={k: v for k, v in params.items() if v is not None})

    def post(self, path: str, body: dict | None = None, **kwargs):
        return self.json("POST", path, json=body, **kwargs)

    def paginate(self, path: str, **params) -> Iterator[dict]:
        """Every item of a list route, following DRF's `next` links; a plain list works too."""
        page = self.get(path, **params)
        while True:
            if isinstance(page, list):
                yield from page
                return
            yield from page.get("results", [])
            nxt = page.get("next")
            if not nxt:
                return
            page = self.json("GET", nxt)

    def stream(self, method: str, path: str, **kwargs):
        """A streamed response (a context manager); errors mapped like `request`."""
        return _Stream(self, method, path, kwargs)


class _Stream:
    def __init__(self, client: Client, method: str, path: str, kwargs: dict):
        self.client, self.method, self.path, self.kwargs = client, method, path, kwargs
        self._cm = None

    def __enter__(self) -> httpx.Response:
        try:
            self._cm = self.client.http.stream(self.method, self.path, **self.kwargs)
            response = self._cm.__enter__()
        except httpx.TimeoutException as exc:
            raise ServerError(f"The hub at {self.client.url} did not answer in time ({type(exc).__name__}).") from None
        except httpx.TransportError as exc:
            raise self.client._unreachable(exc) from None
        if response.status_code >= 400 and response.status_code != 416:
            try:
                response.read()
                raise_for_status(response)
            finally:
                self._cm.__exit__(None, None, None)
        return response

    def __exit__(self, *exc):
        return self._cm.__exit__(*exc)
