"""File transfers of `hubctl pull`, `push` and `base add`: several files at
once under one byte bar with MB/s. A download resumes from its `.incomplete`
with a Range request and is checked against the listed sha256; an upload is
staged on its own (`PUT /api/v1/uploads/{sha256}`, streamed from disk) unless
the hub says it has it already (HEAD), and resumes from the byte the hub
holds (HEAD's Upload-Offset, a PUT with Content-Range), so a push cut off
halfway through a multi-GB file continues where it stopped. The caller then
commits all the files by sha256 in one request."""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

import httpx

from hub.cli import progress
from hub.cli.client import API, Client, ServerError, UserError, adapter_path, file_path, raise_for_status

# Uploads and downloads may take long; only connecting must be quick.
TRANSFER_TIMEOUT = httpx.Timeout(connect=10.0, read=1800.0, write=600.0, pool=10.0)
PARALLEL_FILES = int(os.environ.get("HUBCTL_PARALLEL_FILES", "4"))
PIECE = 4 * 1024 * 1024  # bytes per read from the response: few Python round trips per GB
UPLOAD_TRIES = int(os.environ.get("HUBCTL_UPLOAD_TRIES", "3"))  # resumes of a cut-off upload in one run


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(PIECE):
            h.update(chunk)
    return h.hexdigest()


def safe_relpath(path: str) -> PurePosixPath:
    """A file path from the server, refused if it could escape the target folder."""
    p = PurePosixPath(path)
    if p.is_absolute() or not p.parts or any(part in ("..", "") for part in p.parts) or "\\" in path:
        raise ServerError(f"The hub listed an unsafe file path: {path!r}.")
    return p


def download_file(c: Client, repo: str, sha: str, entry: dict, dest: Path, bar: progress.TransferBar) -> str:
    """Download one file of a revision to dest, resuming a partial `.incomplete`
    with a Range request and checking the sha256 against the listing and the ETag."""
    rel = safe_relpath(entry["path"])
    final = dest.joinpath(*rel.parts)
    final.parent.mkdir(parents=True, exist_ok=True)
    expected, size = entry["sha256"], int(entry["size"])
    if final.is_file() and final.stat().st_size == size and sha256_file(final) == expected:
        bar.advance(size)
        return "present"
    part = final.with_name(final.name + ".incomplete")
    url = f"{adapter_path(repo)}/files/{file_path(entry['path'])}"
    for _attempt in range(2):
        have = part.stat().st_size if part.exists() else 0
        if have > size:
            part.unlink()
            have = 0
        h = hashlib.sha256()
        if have:
            with open(part, "rb") as f:
                while chunk := f.read(PIECE):
                    h.update(chunk)
        etag = ""
        if have < size:
            headers = {"Range": f"bytes={have}-"} if have else {}
            with c.stream("GET", url, params={"revision": sha}, headers=headers, timeout=TRANSFER_TIMEOUT) as r:
                etag = r.headers.get("etag", "").removeprefix("W/").strip('"')
                if r.status_code == 416:  # the partial file is not a prefix any more: start over
                    part.unlink(missing_ok=True)
                    continue
                if r.status_code != 206 and have:  # the server sent the whole file
                    h, have = hashlib.sha256(), 0
                bar.advance(have)
                with open(part, "ab" if have else "wb") as f:
                    for chunk in r.iter_bytes(PIECE):
                        f.write(chunk)
                        h.update(chunk)
                        bar.advance(len(chunk))
        else:
            bar.advance(have)
        digest = h.hexdigest()
        if etag and etag != expected:
            raise ServerError(f"{entry['path']}: the hub's ETag {etag[:12]} differs from the listed sha256 {expected[:12]}.")
        if digest == expected:
            os.replace(part, final)
            return "downloaded"
        part.unlink(missing_ok=True)  # a damaged partial: one more try from zero
        bar.advance(-size)
    raise ServerError(f"{entry['path']}: sha256 mismatch after download (expected {expected[:12]}).")


def pull_files(c: Client, repo: str, rev: dict, dest: Path) -> list[str]:
    """Each file's state ("present" | "downloaded"), in listing order. Up to
    PARALLEL_FILES files travel at once (httpx's client is shared between
    threads; reads, writes and hashing let go of the GIL), the largest first
    so that one big file does not start last."""
    dest.mkdir(parents=True, exist_ok=True)
    files = rev.get("files") or []
    total = sum(int(f["size"]) for f in files)
    order = sorted(range(len(files)), key=lambda i: -int(files[i]["size"]))
    states: list[str] = [""] * len(files)
    with progress.TransferBar(total, f"pull {repo}@{rev['sha'][:8]}") as bar, \
            ThreadPoolExecutor(max(1, min(PARALLEL_FILES, len(files)))) as pool:
        futures = {i: pool.submit(download_file, c, repo, rev["sha"], files[i], dest, bar) for i in order}
        for i, fut in futures.items():
            states[i] = fut.result()  # the first failure is raised; the others finish or fail on their own
    return states


# --- uploads --------------------------------------------------------------------------------

Source = Path | bytes  # a file on disk, or a few bytes made here (a declared config)


def _size(source: Source) -> int:
    return len(source) if isinstance(source, bytes) else source.stat().st_size


def _pieces(path: Path, offset: int, bar: progress.TransferBar, sent: list[int]):
    """The file from `offset` in PIECE-sized reads, each moving the bar and
    counted in sent[0]: httpx sends them as they come, so memory holds one
    piece whatever the file's size."""
    with open(path, "rb") as f:
        f.seek(offset)
        while chunk := f.read(PIECE):
            bar.advance(len(chunk))
            sent[0] += len(chunk)
            yield chunk


def _old_hub(c: Client) -> UserError:
    return UserError(f"The hub at {c.url} does not take staged uploads (PUT {API}/uploads/...): "
                     "it is older than this hubctl. Upgrade the hub, or push with the hubctl of its version.")


def stage_file(c: Client, source: Source, bar: progress.TransferBar) -> tuple[str, str]:
    """(sha256, "present" | "uploaded"): the file staged on the hub for a commit.

    A file on disk goes as a resumable PUT (`Content-Range: bytes N-END/SIZE`)
    from the byte the hub says it holds (HEAD's Upload-Offset): a transfer cut
    off is resumed from where it stopped, up to UPLOAD_TRIES times in this run,
    and by the next run after that."""
    if isinstance(source, bytes):
        sha = hashlib.sha256(source).hexdigest()
        if c.found(f"{API}/uploads/{sha}"):
            bar.advance(len(source))
            return sha, "present"
        response = c._send("PUT", f"{API}/uploads/{sha}", content=source, timeout=TRANSFER_TIMEOUT,
                           headers={"Content-Type": "application/octet-stream"})
        if response.status_code in (404, 405):
            raise _old_hub(c)
        raise_for_status(response)
        bar.advance(len(source))
        return sha, "uploaded"
    sha, size = sha256_file(source), source.stat().st_size
    url = f"{API}/uploads/{sha}"
    counted, cut = 0, None  # bytes of this file the bar shows; the last transfer error
    for attempt in range(UPLOAD_TRIES):
        head = c._send("HEAD", url)
        if head.status_code == 200:
            bar.advance(size - counted)
            return sha, "uploaded" if attempt else "present"
        if head.status_code != 404:
            raise_for_status(head)
        offset = int(head.headers.get("Upload-Offset") or 0)
        offset = offset if offset <= size else 0
        bar.advance(offset - counted)
        counted, sent = offset, [0]
        if offset == size:  # every byte arrived, the commit did not: finish it
            body, rng = b"", f"bytes */{size}"
        else:
            body, rng = _pieces(source, offset, bar, sent), f"bytes {offset}-{size - 1}/{size}"
        try:
            response = c.http.request("PUT", url, content=body, timeout=TRANSFER_TIMEOUT, headers={
                "Content-Type": "application/octet-stream", "Content-Length": str(size - offset),
                "Content-Range": rng})
        except httpx.TransportError as exc:  # cut off: the hub keeps what arrived
            counted += sent[0]
            cut = exc
            continue
        counted += sent[0]
        if response.status_code in (404, 405):
            raise _old_hub(c)
        if response.status_code == 409 and response.headers.get("Upload-Offset") is not None:
            continue  # the hub holds another count of bytes than HEAD said: ask again
        raise_for_status(response)
        if response.status_code == 202:  # not whole yet (bytes lost on the way): send the rest
            continue
        bar.advance(size - counted)
        return sha, "uploaded"
    held = int(c._send("HEAD", url).headers.get("Upload-Offset") or 0)
    raise ServerError(f"{source.name}: the upload was cut off {UPLOAD_TRIES} times (last: {cut or 'incomplete'}); "
                      f"the hub keeps {held} of {size} bytes: run the same command again to send the rest.")


def push_files(c: Client, sources: list[Source], description: str) -> tuple[list[str], list[str]]:
    """(sha256s, states) of the sources, in their order, each staged on the hub:
    up to PARALLEL_FILES at once, the largest first, under one bar. The first
    failure is raised once the files already travelling have finished; files
    not started yet are not sent (a re-run sends them, and skips the rest)."""
    order = sorted(range(len(sources)), key=lambda i: -_size(sources[i]))
    shas, states = [""] * len(sources), [""] * len(sources)
    with progress.TransferBar(sum(_size(s) for s in sources), description) as bar, \
            ThreadPoolExecutor(max(1, min(PARALLEL_FILES, len(sources)))) as pool:
        futures = {i: pool.submit(stage_file, c, sources[i], bar) for i in order}
        try:
            for i, fut in futures.items():
                shas[i], states[i] = fut.result()
        except BaseException:
            for fut in futures.values():
                fut.cancel()
            raise
    return shas, states
