"""Content-addressed blob store on django-storages (filesystem or S3).

A blob lives under `sha256/<aa>/<bb>/<sha256>` and has one `Blob` row. A
file is written or deleted only by a transaction that holds its row: a row
locked with SELECT ... FOR UPDATE, or one it has just inserted (an insert
makes a concurrent insert of the same sha256 wait). So a delete and an upload
of the same bytes serialize on that row, whatever their timing (docs/registry.md).
`BlobBatch` deletes what it wrote if the row's transaction does not commit,
so a rejected upload leaves nothing behind; `collect_garbage` removes files
left without a row by a crash.
"""

from __future__ import annotations

import errno
import hashlib
import io
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import BinaryIO

from django.conf import settings
from django.core.files import File
from django.core.files.storage import storages
from django.db import IntegrityError, transaction
from django.utils import timezone

from hub.errors import HubError
from hub.registry.models import Blob
from hub.registry.validation import content_disposition

log = logging.getLogger(__name__)

CHUNK = 1024 * 1024
# Reads from S3 and copies between files go in pieces this large: few Python
# round trips per GB, while a response still holds only one piece in memory.
BIG_CHUNK = 8 * 1024 * 1024
# Uploads to S3: boto3's managed transfer, parts of this size, several in flight.
S3_PART = 16 * 1024 * 1024
S3_PARTS_IN_FLIGHT = 4
UPLOAD_DIR = ".uploads"  # under the blob root: spooled uploads, hard-linked into place
PARTIAL_DIR = ".partial"  # under the blob root: resumable uploads cut off halfway (hub/registry/partial_uploads.py)
# Files without a row younger than this are kept: an upload writes its file
# before its row commits, and a large one may take a while.
GC_GRACE_SECONDS = 3600


class StorageFailed(HubError):
    """The blob store did not take a blob's bytes (a full disk, an S3 server
    that fails or refuses): 507 when it is full, else 503. The request's
    transaction rolls back, so nothing refers to the missing bytes; a
    resumable upload keeps its whole partial for `Content-Range: bytes */TOTAL`."""

    def __init__(self, blob: Blob, reason: str, full: bool = False):
        verb = "is full" if full else "failed"
        super().__init__(f"The hub's blob store {verb} while storing {blob.sha256[:12]} ({reason[:300]}); "
                         "nothing was kept. Try again later.",
                         code="insufficient_storage" if full else "storage_unavailable", status=507 if full else 503)


def blob_key(sha256: str) -> str:
    return f"sha256/{sha256[:2]}/{sha256[2:4]}/{sha256}"


def hash_file(fileobj: BinaryIO) -> tuple[str, int]:
    """sha256 and size of a file object, read in chunks from its start."""
    fileobj.seek(0)
    h, size = hashlib.sha256(), 0
    while chunk := fileobj.read(CHUNK):
        h.update(chunk)
        size += len(chunk)
    fileobj.seek(0)
    return h.hexdigest(), size


def hash_open_file(fileobj: BinaryIO, chunk: int = BIG_CHUNK) -> tuple[str, int]:
    """sha256 and size of an open regular file, from its start, in large reads
    into one reused buffer (no allocation per piece; hashlib lets go of the GIL
    on them): about sha256's own speed when the file is in the page cache."""
    fileobj.seek(0)
    h, size = hashlib.sha256(), 0
    buf = bytearray(chunk)
    view = memoryview(buf)
    while n := fileobj.readinto(buf):
        h.update(view[:n])
        size += n
    fileobj.seek(0)
    return h.hexdigest(), size


def _storage():
    return storages["default"]


def is_s3() -> bool:
    return bool(settings.S3_BUCKET)


def local_path(blob: Blob) -> str | None:
    """The blob's file on this machine (filesystem backend), else None."""
    if is_s3():
        return None
    return _storage().path(blob.key)


def upload_temp_dir() -> str | None:
    """Where uploads are spooled. FILE_UPLOAD_TEMP_DIR when set; else, on the
    filesystem backend, a folder inside the blob root, so that committing an
    upload is a link on the same disk instead of a second copy of its bytes."""
    if settings.FILE_UPLOAD_TEMP_DIR:
        return settings.FILE_UPLOAD_TEMP_DIR
    if is_s3():
        return None
    path = Path(_storage().location) / UPLOAD_DIR
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def partial_upload_dir() -> Path:
    """Where a resumable upload keeps the bytes that arrived until the rest
    does. PARTIAL_UPLOAD_DIR when set; else a folder inside the blob root on
    the filesystem backend (the finished file is committed by a link), or
    under HUB_HOME with S3 (the finished file is sent from there)."""
    if settings.PARTIAL_UPLOAD_DIR:
        path = Path(settings.PARTIAL_UPLOAD_DIR)
    elif is_s3():
        path = Path(settings.HUB_HOME) / "partial-uploads"
    else:
        path = Path(_storage().location) / PARTIAL_DIR
    path.mkdir(parents=True, exist_ok=True)
    return path


def _source_path(fileobj) -> str | None:
    """The path of a file object's bytes on disk when it is an open regular file
    (an upload spooled by Django, a named temporary file, an open() file), else
    None. Only the object's own descriptor counts: a name alone may be a storage
    key, and touching `.file` of a storage's file object may download it."""
    if hasattr(fileobj, "temporary_file_path"):
        return fileobj.temporary_file_path()
    name = getattr(fileobj, "name", None)
    if not isinstance(name, str) or not os.path.isabs(name):
        return None
    try:
        return name if os.path.samestat(os.fstat(fileobj.fileno()), os.stat(name)) else None
    except (OSError, AttributeError, ValueError, io.UnsupportedOperation):
        return None


def _spooled_path(fileobj) -> str | None:
    """The path of an upload the hub spooled itself (never a caller's own file:
    a link to that would change with it)."""
    if hasattr(fileobj, "temporary_file_path"):
        return fileobj.temporary_file_path()
    src = _source_path(fileobj)
    spool = upload_temp_dir()
    if src is not None and spool is not None and os.path.dirname(os.path.abspath(src)) == os.path.abspath(spool):
        return src
    return None


def _link_into_store(src: str, key: str, size: int) -> bool:
    """Commit a spooled file as blob `key` with a hard link (no byte copied);
    False when it cannot (another disk, a size that does not match)."""
    try:
        if os.path.getsize(src) != size:
            return False
        dest = Path(_storage().path(key))
        dest.parent.mkdir(parents=True, exist_ok=True)
        os.link(src, dest)  # fails if dest exists: the row lock makes that a leftover, handled by put()
    except OSError:
        return False
    if settings.FILE_UPLOAD_PERMISSIONS is not None:
        os.chmod(dest, settings.FILE_UPLOAD_PERMISSIONS)
    return True


def _s3_key(key: str) -> str:
    storage = _storage()
    return f"{storage.location.strip('/')}/{key}" if storage.location else key


def _transfer_config():
    from boto3.s3.transfer import TransferConfig

    return TransferConfig(multipart_threshold=S3_PART, multipart_chunksize=S3_PART,
                          max_concurrency=S3_PARTS_IN_FLIGHT, use_threads=True)


def _s3_upload(fileobj, key: str) -> None:
    """boto3's managed transfer: a multipart upload with parts in flight in
    parallel, each part read from the file where it lies (from a path) so
    memory stays at a few parts."""
    storage = _storage()
    extra = dict(storage.get_object_parameters(key))
    extra.setdefault("ContentType", "application/octet-stream")
    obj = storage.bucket.Object(_s3_key(key))
    src = _source_path(fileobj)
    if src is not None:
        obj.upload_file(src, ExtraArgs=extra, Config=_transfer_config())
    else:
        fileobj.seek(0)
        obj.upload_fileobj(fileobj, ExtraArgs=extra, Config=_transfer_config())


class BlobBatch:
    """Writes blobs for one logical change; undoes the new ones on failure.

    Use inside `transaction.atomic()`: each blob's row stays locked until that
    transaction ends, and objects written by this batch are deleted if it
    rolls back.
    """

    def __init__(self):
        self.written: list[str] = []

    def put(self, fileobj: BinaryIO, sha256: str | None = None, size: int | None = None) -> Blob:
        """The blob's row, locked, with its file in the store. A row whose file
        is missing or of the wrong size (a crash, a lost disk) gets it written
        again: the row alone never proves the bytes are there."""
        if sha256 is None or size is None:
            sha256, size = hash_file(fileobj)
        blob = _hold_row(sha256, size)
        storage = _storage()
        stored = storage.exists(blob.key)
        if stored and storage.size(blob.key) == blob.size:
            return blob
        if stored:
            storage.delete(blob.key)  # a truncated leftover: save() would pick another name
        self._write(fileobj, blob)
        self.written.append(blob.key)
        if transaction.get_connection().in_atomic_block:
            transaction.on_commit(lambda k=blob.key: self.written.remove(k) if k in self.written else None)
        return blob

    @staticmethod
    def _write(fileobj: BinaryIO, blob: Blob) -> None:
        """Store the bytes under blob.key; a store that fails the write is a
        StorageFailed (503, or 507 when it is full), never a 500."""
        try:
            BlobBatch._write_to_store(fileobj, blob)
        except StorageFailed:
            raise
        except OSError as e:
            full = e.errno in (errno.ENOSPC, errno.EDQUOT)
            log.exception("blob %s: the filesystem store failed the write", blob.sha256)
            raise StorageFailed(blob, str(e), full=full) from e
        except Exception as e:  # boto3/botocore: any failure of the S3 client is the store's
            if not is_s3():
                raise
            log.exception("blob %s: the S3 store failed the write", blob.sha256)
            raise StorageFailed(blob, f"{type(e).__name__}: {e}") from e

    @staticmethod
    def _write_to_store(fileobj: BinaryIO, blob: Blob) -> None:
        """A link to a spooled file on the same disk, a managed multipart upload
        on S3, else a copy through the storage."""
        if callable(flush := getattr(fileobj, "flush", None)):
            flush()  # the link and upload_file read the file by its path, not through this object
        if is_s3():
            _s3_upload(fileobj, blob.key)
            return
        src = _spooled_path(fileobj)
        if src is not None and _link_into_store(src, blob.key, blob.size):
            return
        fileobj.seek(0)
        saved = _storage().save(blob.key, File(fileobj, name=blob.key))
        if saved != blob.key:  # only a writer outside the row lock can get here
            _storage().delete(saved)
            raise OSError(f"blob {blob.sha256}: another writer created {blob.key} while its row was held")

    def put_bytes(self, data: bytes) -> Blob:
        return self.put(io.BytesIO(data), hashlib.sha256(data).hexdigest(), len(data))

    def put_path(self, path: str | os.PathLike) -> Blob:
        with open(path, "rb") as f:
            return self.put(f)

    def rollback(self) -> None:
        for key in self.written:
            _delete_unless_held(key.rsplit("/", 1)[-1], key)
        self.written.clear()


def _hold_row(sha256: str, size: int) -> Blob:
    """The blob's row, locked until the transaction ends; inserted if missing."""
    while True:
        blob = Blob.objects.select_for_update().filter(sha256=sha256).first()
        if blob is not None:
            return blob
        try:
            with transaction.atomic():
                return Blob.objects.create(sha256=sha256, size=size, key=blob_key(sha256))
        except IntegrityError:
            continue  # a concurrent put committed the row first: lock that one


def _delete_unless_held(sha256: str, key: str) -> bool:
    """Delete a stored file that no Blob row holds; False if one does.

    Inserting a placeholder row claims the name like a put would: a put of
    the same bytes running now makes this wait and then keeps the file, one
    starting now waits for this and then writes the file again."""
    try:
        with transaction.atomic():
            placeholder = Blob.objects.create(sha256=sha256, size=0, key=key)
            _storage().delete(key)
            placeholder.delete()
    except IntegrityError:
        return False
    return True


@contextmanager
def blob_batch() -> Iterator[BlobBatch]:
    """`with blob_batch() as batch, transaction.atomic(): ...` — atomic bytes + rows."""
    batch = BlobBatch()
    try:
        yield batch
    except BaseException:
        batch.rollback()
        raise


def open_blob(blob: Blob) -> BinaryIO:
    """A seekable binary file object over the blob's bytes. On S3, reads are
    ranged GETs of what is asked (the storage's own file object would first
    copy the whole object into memory: a 16 GB base on a commit's header check)."""
    if is_s3():
        return io.BufferedReader(_S3RangeReader(blob), buffer_size=CHUNK)
    return _storage().open(blob.key, "rb")


class _S3RangeReader(io.RawIOBase):
    """A read-only, seekable view of one S3 object: each read is one ranged GET."""

    def __init__(self, blob: Blob):
        storage = _storage()
        self._client, self._bucket = storage.bucket.meta.client, storage.bucket.name
        self._key, self._size, self._pos = _s3_key(blob.key), blob.size, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._pos = base + offset
        return self._pos

    def readinto(self, buffer) -> int:
        n = min(len(buffer), self._size - self._pos)
        if n <= 0:
            return 0
        body = self._client.get_object(Bucket=self._bucket, Key=self._key,
                                       Range=f"bytes={self._pos}-{self._pos + n - 1}")["Body"]
        view, got = memoryview(buffer), 0
        try:
            for chunk in body.iter_chunks(CHUNK):
                view[got:got + len(chunk)] = chunk
                got += len(chunk)
        finally:
            body.close()
        self._pos += got
        return got


def iter_blob(blob: Blob, start: int = 0, length: int | None = None, chunk: int = BIG_CHUNK) -> Iterator[bytes]:
    """The blob's bytes [start, start + length) in pieces of `chunk`: on S3 one
    ranged GET streamed as it arrives (the storage's own file object would
    first copy the whole object to a temporary file)."""
    if length is None:
        length = blob.size - start
    if length <= 0:
        return
    if is_s3():
        storage = _storage()
        body = storage.bucket.meta.client.get_object(
            Bucket=storage.bucket.name, Key=_s3_key(blob.key), Range=f"bytes={start}-{start + length - 1}")["Body"]
        try:
            yield from body.iter_chunks(chunk)
        finally:
            body.close()
        return
    with open(_storage().path(blob.key), "rb", buffering=0) as f:
        f.seek(start)
        left = length
        while left > 0:
            data = f.read(min(chunk, left))
            if not data:
                break
            left -= len(data)
            yield data


def presigned_url(blob: Blob, filename: str | None = None) -> str | None:
    """A short-lived direct URL (S3 only), or None on the filesystem backend."""
    if not is_s3():
        return None
    params = {}
    if filename:
        params["ResponseContentDisposition"] = content_disposition(filename)
    return _storage().url(blob.key, parameters=params or None, expire=settings.S3_PRESIGN_SECONDS)


def copy_to_path(blob: Blob, dest: str | os.PathLike) -> Path:
    """Stream a blob into a local file (workers materialise inputs this way)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".part-")
    os.close(fd)
    try:
        if is_s3():  # managed transfer: ranged GETs in parallel
            storage = _storage()
            storage.bucket.download_file(_s3_key(blob.key), tmp, Config=_transfer_config())
        else:  # copy_file_range / sendfile in the kernel
            shutil.copyfile(_storage().path(blob.key), tmp)
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return dest


def _referenced(blob: Blob, staged_since: datetime | None = None) -> bool:
    """Whether anything keeps the blob: a revision, a base model, an adapter's
    seeds, an unfinished job's checkpoint, or a staged upload (with
    `staged_since`, only one touched since then)."""
    from hub.registry.models import Adapter, BaseModelFile, Job, RevisionFile, StagedUpload

    staged = StagedUpload.objects.filter(blob=blob)
    if staged_since is not None:
        staged = staged.filter(touched_at__gte=staged_since)
    if (
        RevisionFile.objects.filter(blob=blob).exists()
        or BaseModelFile.objects.filter(blob=blob).exists()
        or Adapter.objects.filter(seeds=blob).exists()
        or staged.exists()
    ):
        return True
    unfinished = Job.objects.exclude(status__in=Job.FINISHED).exclude(checkpoints={})
    return any(blob.sha256 in (cps or {}).values() for cps in unfinished.values_list("checkpoints", flat=True))


def delete_unreferenced(blobs: list[Blob]) -> int:
    """Delete the blobs that no revision, base model, adapter's seeds,
    unfinished job's checkpoint or staged upload refers to; returns the count.

    One transaction per blob, whose first statement locks the row: a put of
    the same bytes holds that lock until its reference commits, so the check
    sees the reference, or the put waits, finds no row and writes the file
    again. The file goes after the row, while the lock is held; if the commit
    then fails, the row is back without its file, unreferenced, and the next
    put of those bytes writes it again."""
    n = 0
    for blob in blobs:
        with transaction.atomic():
            row = Blob.objects.select_for_update().filter(sha256=blob.sha256).first()
            if row is None or _referenced(row):
                continue
            row.delete()
            _storage().delete(row.key)
        n += 1
    return n


def _stored_files() -> Iterator[tuple[str, datetime]]:
    """(key, last modified) of every file under `sha256/`, one listing pass."""
    storage = _storage()
    if is_s3():
        prefix = f"{storage.location.strip('/')}/" if storage.location else ""
        for obj in storage.bucket.objects.filter(Prefix=f"{prefix}sha256/"):
            yield obj.key[len(prefix):], obj.last_modified
        return
    root = Path(storage.path("sha256"))
    for dirpath, _, names in os.walk(root):
        for name in names:
            path = Path(dirpath) / name
            try:
                modified = datetime.fromtimestamp(path.stat().st_mtime, tz=UTC)
            except FileNotFoundError:  # deleted since the listing
                continue
            yield path.relative_to(root.parent).as_posix(), modified


def expire_staged(cutoff: datetime, dry_run: bool = False) -> list[str]:
    """Drop staged uploads untouched since `cutoff` (a push never committed),
    then each one's blob if nothing else keeps it; returns the deleted blobs' keys.

    A staged row goes only if it is still untouched when its DELETE runs: a
    commit or HEAD that touches it first keeps it (PostgreSQL re-checks the
    WHERE on the row it waited for), and one that comes after finds no row."""
    from hub.registry.models import StagedUpload

    removed = []
    expired = StagedUpload.objects.filter(touched_at__lt=cutoff).select_related("blob").order_by("pk")
    for staged in list(expired):
        blob = staged.blob
        if dry_run:
            if not _referenced(blob, staged_since=cutoff) and blob.key not in removed:
                removed.append(blob.key)
            continue
        gone, _ = StagedUpload.objects.filter(pk=staged.pk, touched_at__lt=cutoff).delete()
        if gone and delete_unreferenced([blob]):
            removed.append(blob.key)
    return removed


def collect_garbage(grace_seconds: float, dry_run: bool = False) -> list[str]:
    """Delete stored blob files that have no Blob row and were written more
    than `grace_seconds` ago (a crashed upload's bytes, a delete whose commit
    failed), staged uploads untouched for as long with their blobs when
    nothing else keeps them (a push never committed), and partial uploads
    (a resumable PUT cut off) as old; returns their keys. The
    grace spares files of uploads in flight; the placeholder row of
    `_delete_unless_held` spares a put that starts now."""
    cutoff = timezone.now() - timedelta(seconds=grace_seconds)
    removed = expire_staged(cutoff, dry_run=dry_run)
    # A spooled upload whose process died (no request holds it any more), and a
    # resumable upload cut off and not resumed within the grace: its last write set its mtime.
    spool = None if is_s3() else Path(_storage().location) / UPLOAD_DIR
    for folder, label in ((spool, UPLOAD_DIR), (partial_upload_dir(), PARTIAL_DIR)):
        for path in folder.iterdir() if folder is not None and folder.is_dir() else ():
            try:
                if datetime.fromtimestamp(path.stat().st_mtime, tz=UTC) < cutoff:
                    if not dry_run:
                        path.unlink()
                    removed.append(f"{label}/{path.name}")
            except FileNotFoundError:
                continue
    for key, modified in _stored_files():
        sha256 = key.rsplit("/", 1)[-1]
        if key != blob_key(sha256) or modified > cutoff:
            continue  # not a name this store writes, or too young to judge
        if Blob.objects.filter(sha256=sha256).exists():
            continue
        if dry_run or _delete_unless_held(sha256, key):
            removed.append(key)
    return removed
