"""Resumable staged uploads: a `PUT /api/v1/uploads/{sha256}` that carries
`Content-Range: bytes START-END/TOTAL` writes its body into a partial file
kept per user and sha256, byte by byte as it arrives. A transfer cut off
halfway (a lost connection, Ctrl-C) keeps what arrived; `HEAD` tells the
client where it stopped (`Upload-Offset`) and the next PUT sends only the
rest. When the file is whole its sha256 is checked and it is staged like any
other upload (a hard link into the store on the filesystem backend).

The hash is taken as the bytes arrive; a resumed request first hashes the
prefix already on disk, so an upload that was never cut off reads its bytes
once, like the plain PUT. `Content-Range: bytes */TOTAL` with an empty body
finishes a partial whose last byte arrived but whose request died before the
commit. One request at a time writes a partial (an exclusive flock; a second
gets 409 `upload_in_progress`); `collect_garbage` removes partials left
untouched past its grace period.
"""

from __future__ import annotations

import fcntl
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from django.conf import settings

from hub.errors import HubError
from hub.registry.uploads import BackgroundHash, PathNamedFile, UploadTooLarge
from hub.registry.validation import ValidationError
from hub.storage import BIG_CHUNK, hash_open_file, partial_upload_dir

PIECE = 4 * 1024 * 1024  # bytes per read from the request body: flat memory, few Python round trips
_RANGE = re.compile(r"^bytes (?:(\d+)-(\d+)|\*)/(\d+)$")


class UploadConflict(HubError):
    """409: the part does not start where the partial ends (`received` says
    where it does), or another request is writing this partial."""

    status = 409

    def __init__(self, code: str, detail: str, received: int | None = None):
        super().__init__(detail, code=code)
        self.received = received


@dataclass(frozen=True)
class ContentRange:
    start: int | None  # None: `bytes */TOTAL`, no bytes in this request
    end: int | None
    total: int

    @property
    def length(self) -> int:
        return 0 if self.start is None else self.end - self.start + 1


def parse_content_range(value: str) -> ContentRange:
    """`bytes START-END/TOTAL` (END inclusive, as in RFC 9110) or `bytes */TOTAL`;
    anything else is a 400 `bad_content_range`."""
    m = _RANGE.match(value.strip())
    if m is None:
        raise ValidationError("bad_content_range", f"Content-Range {value!r} is not 'bytes START-END/TOTAL' "
                              "or 'bytes */TOTAL'.")
    total = int(m.group(3))
    if m.group(1) is None:
        return ContentRange(None, None, total)
    start, end = int(m.group(1)), int(m.group(2))
    if not start <= end < total:
        raise ValidationError("bad_content_range", f"Content-Range {value!r}: START <= END < TOTAL is needed.")
    return ContentRange(start, end, total)


def partial_path(user_id: int, sha256: str) -> Path:
    return partial_upload_dir() / f"{user_id}-{sha256}"


def received_bytes(user_id: int, sha256: str) -> int | None:
    """How many bytes of this user's upload of sha256 the hub holds; None if none."""
    try:
        return partial_path(user_id, sha256).stat().st_size
    except FileNotFoundError:
        return None


@contextmanager
def locked_partial(user_id: int, sha256: str) -> Iterator[tuple[BinaryIO, Path]]:
    """The partial file (created empty if missing), opened for reading and
    writing and held with an exclusive lock for the request."""
    path = partial_path(user_id, sha256)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UploadConflict("upload_in_progress", "Another request is sending this file right now; "
                                 "wait for it, or stop it and send again.") from None
        try:  # the name may have gone (a request that finished it) between open and lock
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    f = os.fdopen(fd, "r+b")
    try:
        yield f, path
    finally:
        f.close()  # and the lock with it


def _hash_prefix(f: BinaryIO, size: int) -> BackgroundHash:
    """The sha256 state after the first `size` bytes of f (a resumed upload)."""
    h = BackgroundHash()
    f.seek(0)
    left = size
    while left:
        chunk = f.read(min(BIG_CHUNK, left))
        if not chunk:
            break
        h.update(chunk)
        left -= len(chunk)
    return h


def _copy_body(body, f: BinaryIO, length: int, h: BackgroundHash) -> int:
    """Up to `length` bytes of the request body (`readinto`, hub/registry/request_body.py)
    appended to f and hashed; the count that arrived. Two buffers take turns:
    the hash of one piece runs in the background while the next is received.
    A client that goes away mid-body ends the copy early: what arrived is
    kept for the next request to continue from."""
    buffers = [memoryview(bytearray(PIECE)), memoryview(bytearray(PIECE))]
    got = 0
    while got < length:
        view = buffers[0][:min(PIECE, length - got)]
        try:
            n = body.readinto(view)
        except OSError:  # the connection broke (a timeout, a reset)
            break
        if not n:
            break
        f.write(view[:n])
        h.update(view[:n])  # waits for the previous piece's hash: the other buffer is free again
        got += n
        buffers.reverse()
    f.flush()
    h.hexdigest()  # no hash of a buffer may outlive this call
    return got


def _copy_file(src: BinaryIO, f: BinaryIO, length: int) -> int:
    """A front server's stored body appended to f in the kernel (copy_file_range)."""
    f.flush()
    copied = 0
    while copied < length:
        n = os.copy_file_range(src.fileno(), f.fileno(), length - copied)
        if n == 0:
            break
        copied += n
    f.seek(0, os.SEEK_END)
    return copied


def _drop_if_empty(f: BinaryIO, path: Path) -> None:
    """No byte held (a refused or empty request): no partial to report or to
    collect. Only while the name is still this file's: a request may have
    begun a new one under it since ours was finished."""
    try:
        ours = os.path.samestat(os.fstat(f.fileno()), os.stat(path))
    except FileNotFoundError:
        return
    if ours and not os.fstat(f.fileno()).st_size:
        path.unlink(missing_ok=True)


@dataclass
class Received:
    """What one ranged PUT left: the bytes held so far, and the whole file's
    (sha256, open file) once it is complete and checked."""

    received: int
    total: int
    complete: PathNamedFile | None = None
    sha256: str | None = None


@contextmanager
def receive_range(user_id: int, sha256: str, rng: ContentRange, body=None,
                  front_file: BinaryIO | None = None) -> Iterator[Received]:
    """Write one ranged PUT into the user's partial of sha256 and yield what it
    holds; while the context is open a complete file stays locked, for the
    caller to stage. A complete partial's name goes when the caller's block
    ends without an error (its bytes live on in the store) or when its sha256
    is wrong; after any other error it stays, whole, for `bytes */TOTAL`."""
    if rng.total > settings.MAX_UPLOAD_BYTES:
        raise UploadTooLarge(f"The upload is {rng.total} bytes; the limit is {settings.MAX_UPLOAD_BYTES} bytes.")
    with locked_partial(user_id, sha256) as (f, path):
        try:
            have = os.fstat(f.fileno()).st_size
            if have > rng.total:  # bytes of a different file under this name: they cannot be a prefix
                f.truncate(0)
                have = 0
            if rng.start is not None:
                if rng.start == 0 and have:
                    f.truncate(0)  # the client starts over on purpose
                    have = 0
                elif rng.start != have:
                    raise UploadConflict("upload_offset_mismatch", f"The hub holds {have} bytes of this file; send "
                                         f"from byte {have} (Content-Range: bytes {have}-{rng.total - 1}/{rng.total}).",
                                         received=have)
                h = _hash_prefix(f, have) if have else BackgroundHash()
                f.seek(have)
                if front_file is not None:
                    got = _copy_file(front_file, f, rng.length)
                    h = None  # the kernel copied it: hashed whole below
                else:
                    got = _copy_body(body, f, rng.length, h)
                have += got
                if got < rng.length:
                    raise ValidationError("incomplete_body", f"The body ended after {got} of {rng.length} bytes; the "
                                          f"hub keeps {have} bytes of this file: resume from byte {have}.")
            else:
                h = None
            if have < rng.total:
                yield Received(have, rng.total)
                return
            digest = h.hexdigest() if h is not None else hash_open_file(f)[0]
            if digest != sha256:
                path.unlink(missing_ok=True)
                raise ValidationError("sha256_mismatch", f"The file's sha256 is {digest}, not {sha256} as the URL "
                                      "says; nothing was kept.", field="sha256")
            f.seek(0)
            yield Received(have, rng.total, complete=PathNamedFile(f, str(path)), sha256=digest)
            path.unlink(missing_ok=True)
        finally:
            _drop_if_empty(f, path)
