"""`hubctl push` and `base add` stage files several at once (`PUT
/api/v1/uploads/{sha256}`, streamed from disk), skip those the hub has
(`HEAD`), then commit once: the revision is the one a single multipart
upload made, and a push interrupted before its commit resumes, sending
only the files that had not arrived, and of a file cut off halfway only
the bytes the hub does not hold (a resumable PUT with Content-Range)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import threading
import time

import httpx
import pytest

from tests.cli.test_cli import (  # noqa: F401 - fixtures
    adapter_dir,
    assert_clean_failure,
    live,
    registered,
    tokens,
)

REAL_CLIENT = httpx.Client  # the recorders patch httpx.Client itself: each subclasses the real one


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def big_folder(adapter_dir, tmp_path):  # noqa: F811
    """The PEFT folder plus a few more files, so several travel at once."""
    folder = tmp_path / "several"
    folder.mkdir()
    for p in adapter_dir.iterdir():
        if p.is_file():
            shutil.copy(p, folder / p.name)
    (folder / "training_args.json").write_text(json.dumps({"lr": 1e-4, "steps": 10}))
    (folder / "notes.txt").write_bytes(b"notes " * 50_000)
    (folder / "tokenizer.json").write_bytes(b'{"model": "x"}' * 20_000)
    return folder


class Recorder:
    """Patches hubctl's httpx client: records (method, path, status, content type) of each
    request, keeps PUTs in flight for a while (to see them overlap), and fails chosen PUTs."""

    def __init__(self, monkeypatch, delay: float = 0.0, fail_shas: frozenset[str] = frozenset(),
                 fail_once: frozenset[str] = frozenset()):
        self.lock = threading.Lock()
        self.sent: list[tuple[str, str, int, str]] = []
        self.ranges: list[tuple[str, str]] = []  # (sha256, Content-Range) of each PUT
        failed_once: set[str] = set()
        self.now = self.most = 0
        recorder = self

        class Recording(REAL_CLIENT):
            def send(self, request, **kwargs):
                is_put = request.method == "PUT"
                sha = request.url.path.rsplit("/", 1)[-1]
                if is_put:
                    with recorder.lock:
                        recorder.ranges.append((sha, request.headers.get("content-range", "")))
                if is_put and (sha in fail_shas or (sha in fail_once and sha not in failed_once)):
                    failed_once.add(sha)
                    raise httpx.WriteError("connection lost (test)")
                if is_put:
                    with recorder.lock:
                        recorder.now += 1
                        recorder.most = max(recorder.most, recorder.now)
                try:
                    if is_put and delay:
                        time.sleep(delay)
                    response = super().send(request, **kwargs)
                finally:
                    if is_put:
                        with recorder.lock:
                            recorder.now -= 1
                with recorder.lock:
                    recorder.sent.append((request.method, request.url.path, response.status_code,
                                          request.headers.get("content-type", "")))
                return response

        monkeypatch.setattr("hub.cli.client.httpx.Client", Recording)

    def puts(self, status: int | None = None) -> set[str]:
        return {path.rsplit("/", 1)[-1] for method, path, code, _ in self.sent
                if method == "PUT" and (status is None or code == status)}

    def commits(self, path: str) -> list[str]:
        return [ctype for method, p, _, ctype in self.sent if method == "POST" and p == path]


def local_shas(folder) -> dict[str, str]:
    return {p.name: sha256(p.read_bytes()) for p in folder.iterdir() if p.is_file()}


def revision_files(repo: str, token: str) -> dict[str, str]:
    from hub.cli.client import Client

    with Client(token=token) as c:
        (rev,) = c.get(f"/api/v1/adapters/{repo}/revisions/")["results"]
    return {f["path"]: f["sha256"] for f in rev["files"]}


@live
def test_push_sends_files_in_parallel_then_commits_once(registered, hubctl, tokens, big_folder, monkeypatch,  # noqa: F811
                                                         tmp_path):
    rec = Recorder(monkeypatch, delay=0.3)
    r = hubctl("push", big_folder, "--base", "tiny-base", "--name", "alice/many", token=tokens["alice"])
    assert r.code == 0, r.err
    local = local_shas(big_folder)
    assert rec.puts(201) == set(local.values())  # each file once, each staged
    assert rec.most >= 2  # several at once
    assert rec.commits("/api/v1/adapters/") == ["application/json"]  # one commit, no multipart body
    assert revision_files("alice/many", tokens["alice"]) == local
    out = tmp_path / "pulled"
    assert hubctl("pull", "alice/many", "-o", out, token=tokens["alice"]).code == 0
    assert local_shas(out) == local


@live
def test_push_one_file_at_a_time_when_asked(registered, hubctl, tokens, big_folder, monkeypatch):  # noqa: F811
    monkeypatch.setattr("hub.cli.files.PARALLEL_FILES", 1)
    rec = Recorder(monkeypatch, delay=0.05)
    r = hubctl("push", big_folder, "--base", "tiny-base", "--name", "alice/serial", token=tokens["alice"])
    assert r.code == 0, r.err
    assert rec.most == 1
    assert revision_files("alice/serial", tokens["alice"]) == local_shas(big_folder)


@live
def test_an_interrupted_push_resumes_with_the_missing_files_only(registered, hubctl, tokens, big_folder,  # noqa: F811
                                                                 monkeypatch):
    from hub.cli.client import Client

    local = local_shas(big_folder)
    weights = local["adapter_model.safetensors"]

    # 1. The weights' upload breaks: the other files arrive, no revision is made.
    first = Recorder(monkeypatch, fail_shas=frozenset({weights}))
    r = hubctl("push", big_folder, "--base", "tiny-base", "--name", "alice/resumed", token=tokens["alice"])
    assert_clean_failure(r, 2, "adapter_model.safetensors: the upload was cut off 3 times",
                         "run the same command again")
    arrived = first.puts(201)
    assert arrived and weights not in arrived and arrived < set(local.values())
    assert first.commits("/api/v1/adapters/") == []
    with Client(token=tokens["alice"]) as c:
        assert c.http.get("/api/v1/adapters/alice/resumed/").status_code == 404

    # 2. The re-run sends only what did not arrive, then commits.
    second = Recorder(monkeypatch)
    r = hubctl("push", big_folder, "--base", "tiny-base", "--name", "alice/resumed", token=tokens["alice"])
    assert r.code == 0, r.err
    assert second.puts() == set(local.values()) - arrived
    assert weights in second.puts()
    assert f"{len(arrived)} of {len(local)} files were on the hub already" in r.err
    assert revision_files("alice/resumed", tokens["alice"]) == local

    # 3. Killed after staging everything, before the commit: the next run sends no file at all.
    (big_folder / "notes.txt").write_bytes(b"new notes")
    monkeypatch.setattr("hub.cli.adapters.exists", lambda c, path: False)

    real_json = Client.json

    def no_commit(self, method, path, **kwargs):
        if method == "POST":
            raise KeyboardInterrupt  # Ctrl-C between the last upload and the commit
        return real_json(self, method, path, **kwargs)

    monkeypatch.setattr(Client, "json", no_commit)
    third = Recorder(monkeypatch)
    r = hubctl("push", big_folder, "--base", "tiny-base", "--name", "alice/again", token=tokens["alice"])
    assert r.code == 130 and "interrupted" in r.err
    assert third.puts(201) == {sha256(b"new notes")}  # the rest is already the user's (alice/resumed)
    monkeypatch.setattr(Client, "json", real_json)
    fourth = Recorder(monkeypatch)
    r = hubctl("push", big_folder, "--base", "tiny-base", "--name", "alice/again", token=tokens["alice"])
    assert r.code == 0, r.err
    assert fourth.puts() == set()
    assert revision_files("alice/again", tokens["alice"]) == local_shas(big_folder)


def cut_off_put(url: str, token: str, data: bytes, sent: int) -> bytes:
    """A resumable PUT of `data` whose client goes away after `sent` bytes of
    the body (a real socket, half closed): the hub's answer."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as s:
        s.sendall((f"PUT /api/v1/uploads/{sha256(data)} HTTP/1.1\r\nHost: {host}\r\n"
                   f"Authorization: Bearer {token}\r\nContent-Type: application/octet-stream\r\n"
                   f"Content-Length: {len(data)}\r\nContent-Range: bytes 0-{len(data) - 1}/{len(data)}\r\n"
                   "Connection: close\r\n\r\n").encode() + data[:sent])
        s.shutdown(socket.SHUT_WR)
        answer = b""
        while chunk := s.recv(65536):
            answer += chunk
    return answer


@live
def test_a_file_cut_off_halfway_resumes_from_the_byte_it_reached(registered, hub, hubctl, tokens, big_folder,  # noqa: F811
                                                                 monkeypatch):
    from hub.cli.client import Client

    big = os.urandom(5 * 1024 * 1024 + 11)
    (big_folder / "corpus.txt").write_bytes(big)
    sent = 2 * 1024 * 1024 + 3
    answer = cut_off_put(hub, tokens["alice"], big, sent)
    assert b" 400 " in answer.split(b"\r\n", 1)[0] and b"incomplete_body" in answer
    with Client(token=tokens["alice"]) as c:
        h = c.http.head(f"/api/v1/uploads/{sha256(big)}")
    assert h.status_code == 404 and h.headers["Upload-Offset"] == str(sent)

    rec = Recorder(monkeypatch)
    r = hubctl("push", big_folder, "--base", "tiny-base", "--name", "alice/cut", token=tokens["alice"])
    assert r.code == 0, r.err
    assert (sha256(big), f"bytes {sent}-{len(big) - 1}/{len(big)}") in rec.ranges  # only the rest travelled
    assert [rng for sha, rng in rec.ranges if sha == sha256(big)] == [f"bytes {sent}-{len(big) - 1}/{len(big)}"]
    assert revision_files("alice/cut", tokens["alice"]) == local_shas(big_folder)


@live
def test_a_transfer_error_is_resumed_within_the_same_run(registered, hubctl, tokens, big_folder,  # noqa: F811
                                                         monkeypatch):
    weights = local_shas(big_folder)["adapter_model.safetensors"]
    rec = Recorder(monkeypatch, fail_once=frozenset({weights}))
    r = hubctl("push", big_folder, "--base", "tiny-base", "--name", "alice/retried", token=tokens["alice"])
    assert r.code == 0, r.err
    assert [sha for sha, _ in rec.ranges].count(weights) == 2  # the failed try, then the resumed one
    assert revision_files("alice/retried", tokens["alice"]) == local_shas(big_folder)


@live
def test_a_file_that_changes_while_it_travels_is_refused(registered, hubctl, tokens, big_folder, monkeypatch):  # noqa: F811
    import hub.cli.files as files

    real = files.sha256_file
    monkeypatch.setattr(files, "sha256_file", lambda path: "0" * 64 if path.name == "notes.txt" else real(path))
    r = hubctl("push", big_folder, "--base", "tiny-base", "--name", "alice/changed", token=tokens["alice"])
    assert_clean_failure(r, 1, "sha256")


@live
def test_base_add_stages_its_files_and_resumes(hub, hubctl, tokens, tiny_base_dir, monkeypatch):  # noqa: F811
    local = local_shas(tiny_base_dir)
    rec = Recorder(monkeypatch)
    r = hubctl("base", "add", "staged-base", "--weights", tiny_base_dir, token=tokens["staff"])
    assert r.code == 0, r.err
    assert rec.puts(201) == set(local.values())
    assert rec.commits("/api/v1/base-models/") == ["application/json"]
    # Another slug with the same files: every file is the staff user's to read already.
    rec = Recorder(monkeypatch)
    r = hubctl("base", "add", "staged-base-2", "--weights", tiny_base_dir, token=tokens["staff"])
    assert r.code == 0, r.err
    assert rec.puts() == set()
    assert_clean_failure(hubctl("base", "add", "staged-base", "--weights", tiny_base_dir, token=tokens["staff"]),
                         1, "already registered")
    assert_clean_failure(hubctl("base", "add", "by-alice", "--weights", tiny_base_dir, token=tokens["alice"]),
                         1, "Only staff")


@live
def test_a_hub_without_staged_uploads_is_named_as_too_old(registered, hubctl, tokens, adapter_dir,  # noqa: F811
                                                          monkeypatch):
    class OldHub(REAL_CLIENT):
        def send(self, request, **kwargs):
            if "/api/v1/uploads/" in request.url.path:  # what a hub before staged uploads answers
                return httpx.Response(404, json={"error": "not_found", "detail": "Not found."}, request=request)
            return super().send(request, **kwargs)

    monkeypatch.setattr("hub.cli.client.httpx.Client", OldHub)
    r = hubctl("push", adapter_dir, "--base", "tiny-base", "--name", "alice/old", token=tokens["alice"])
    assert_clean_failure(r, 1, "does not take staged uploads", "older than this hubctl")


@live
def test_push_reads_files_in_pieces_never_whole(registered, hubctl, tokens, big_folder, monkeypatch):  # noqa: F811
    """Memory stays flat: every read of a pushed file, to hash it or to send it, asks for one piece."""
    import builtins

    import hub.cli.files as files

    big = big_folder / "big.txt"
    big.write_bytes(os.urandom(3 * files.PIECE + 123))  # several pieces
    asked: list[int] = []
    real_open = builtins.open

    class Spy:
        def __init__(self, f):
            self._f = f

        def read(self, n=-1):
            asked.append(n)
            return self._f.read(n)

        def __getattr__(self, name):
            return getattr(self._f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._f.close()

    def spying_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return Spy(f) if str(path) == str(big) and "b" in mode else f

    monkeypatch.setattr(builtins, "open", spying_open)
    r = hubctl("push", big_folder, "--base", "tiny-base", "--name", "alice/big", token=tokens["alice"])
    monkeypatch.setattr(builtins, "open", real_open)
    assert r.code == 0, r.err
    assert len(asked) >= 2 * 4  # hashed and sent, piece by piece
    assert all(0 < n <= files.PIECE for n in asked), sorted(set(asked))
    assert revision_files("alice/big", tokens["alice"])["big.txt"] == sha256(big.read_bytes())
