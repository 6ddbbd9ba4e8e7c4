"""Upload handling: every uploaded file is spooled to a temporary file while
its bytes are counted and hashed, so validation and blob keys need no second
read, memory stays flat, and an upload past the cap stops with a 413.

The spool lies in the blob store's own folder (`hub.storage.upload_temp_dir`),
so committing a filesystem blob is a link, not a copy: the bytes are written
once and read once (to hash them, as they arrive). Validation then reads only
the safetensors header.

Behind nginx with `UPLOAD_ACCEL=nginx`, a staged upload's body never reaches
the web process: nginx stores it in a file of its own and names it in
`X-Upload-File`; `open_front_server_upload` opens that file, refusing any
other than a regular file under `UPLOAD_ACCEL_ROOT`, and it is then committed
like a spool of ours (a hard link)."""

import hashlib
import logging
import os
import stat
import tempfile
from concurrent.futures import Future, ThreadPoolExecutor

from django.conf import settings
from django.core.files import File
from django.core.files.uploadedfile import TemporaryUploadedFile, UploadedFile
from django.core.files.uploadhandler import TemporaryFileUploadHandler
from rest_framework.exceptions import APIException

from hub.registry.validation import ValidationError
from hub.storage import upload_temp_dir

log = logging.getLogger(__name__)


class UploadTooLarge(APIException):
    status_code = 413
    default_code = "upload_too_large"
    default_detail = "The upload is larger than the hub accepts."


class SpooledUpload(TemporaryUploadedFile):
    """Django's temporary uploaded file, created in the blob store's spool folder."""

    def __init__(self, name, content_type, size, charset, content_type_extra=None):
        _, ext = os.path.splitext(name)
        file = tempfile.NamedTemporaryFile(suffix=".upload" + ext[:16], dir=upload_temp_dir())  # noqa: SIM115
        UploadedFile.__init__(self, file, name, content_type, size, charset, content_type_extra)


# Shared by all uploads of a process; each upload has at most one piece in it.
_HASHERS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="upload-sha256")


class BackgroundHash:
    """sha256 of an upload, one piece behind: hashlib lets go of the GIL on
    large buffers, so hashing piece N overlaps receiving and writing piece
    N+1. Only one piece waits at a time: memory stays flat, order is kept,
    and an upload abandoned halfway leaves nothing running."""

    def __init__(self):
        self.sha = hashlib.sha256()
        self._pending: Future | None = None

    def _wait(self) -> None:
        if self._pending is not None:
            self._pending.result()
            self._pending = None

    def update(self, chunk: bytes) -> None:
        self._wait()
        self._pending = _HASHERS.submit(self.sha.update, chunk)

    def hexdigest(self) -> str:
        self._wait()
        return self.sha.hexdigest()


class HashingUploadHandler(TemporaryFileUploadHandler):
    # The multipart parser reads the body in pieces of the smallest handler
    # chunk: Django's 64 KiB costs a Python round trip (and buffer copies) per
    # piece; 4 MiB keeps the parse near memcpy speed with flat memory.
    chunk_size = 4 * 1024 * 1024

    def handle_raw_input(self, input_data, META, content_length, boundary, encoding=None):
        if content_length and content_length > settings.MAX_UPLOAD_BYTES:
            raise UploadTooLarge(
                f"The upload is {content_length} bytes; the limit is {settings.MAX_UPLOAD_BYTES} bytes."
            )
        self.total = 0
        return super().handle_raw_input(input_data, META, content_length, boundary, encoding)

    def new_file(self, *args, **kwargs):
        super(TemporaryFileUploadHandler, self).new_file(*args, **kwargs)
        self.file = SpooledUpload(self.file_name, self.content_type, 0, self.charset, self.content_type_extra)
        self.sha = BackgroundHash()
        self.size = 0

    def receive_data_chunk(self, raw_data, start):
        self.sha.update(raw_data)
        self.size += len(raw_data)
        self.total = getattr(self, "total", 0) + len(raw_data)
        if self.total > settings.MAX_UPLOAD_BYTES:
            raise UploadTooLarge(f"The upload passed the limit of {settings.MAX_UPLOAD_BYTES} bytes.")
        return super().receive_data_chunk(raw_data, start)

    def file_complete(self, file_size):
        f = super().file_complete(file_size)
        f.sha256 = self.sha.hexdigest()
        return f


class PathNamedFile(File):
    """An open file that names its path (`temporary_file_path`), like a
    SpooledUpload, so the blob store commits it the same way: a hard link on
    the filesystem, a managed upload from the path on S3. Used for a body the
    front server stored itself (nginx's `client_body_in_file_only`; nginx
    removes its own name after the request, the link keeps the bytes) and for
    a finished resumable upload's partial file."""

    def __init__(self, file, path: str):
        super().__init__(file, name=path)
        self._path = path

    def temporary_file_path(self) -> str:
        return self._path


def open_front_server_upload(path: str) -> PathNamedFile:
    """The file the front server named in X-Upload-File (only trusted with
    UPLOAD_ACCEL on): a regular file under UPLOAD_ACCEL_ROOT once every
    symbolic link and `..` in its path is resolved, else a 400 `bad_upload_file`."""
    root = os.path.realpath(settings.UPLOAD_ACCEL_ROOT)
    real = os.path.realpath(path) if os.path.isabs(path) else None
    if real is None or real == root or os.path.commonpath([root, real]) != root:
        log.warning("X-Upload-File %r is not under UPLOAD_ACCEL_ROOT %s: refused", path, root)
        raise ValidationError("bad_upload_file", "The front server named a file outside UPLOAD_ACCEL_ROOT; "
                              "nothing was kept.")
    try:  # O_NOFOLLOW: no link swapped in since realpath; O_NONBLOCK: a FIFO does not hang the request
        fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        log.error("X-Upload-File %s cannot be opened (%s): nginx's worker user must be the hub's", real, e)
        raise ValidationError("bad_upload_file", "The front server's file of this upload cannot be read; "
                              "nothing was kept.") from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ValidationError("bad_upload_file", "The front server named something other than a regular file; "
                              "nothing was kept.")
    os.set_blocking(fd, True)
    return PathNamedFile(os.fdopen(fd, "rb"), real)
