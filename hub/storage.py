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

import hashlib
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

from hub.registry.models import Blob
from hub.registry.validation import content_disposition

CHUNK = 1024 * 1024
# Files without a row younger than this are kept: an upload writes its file
# before its row commits, and a large one may take a while.
GC_GRACE_SECONDS = 3600


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


def _storage():
    return storages["default"]


def is_s3() -> bool:
    return bool(settings.S3_BUCKET)


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
        fileobj.seek(0)
        saved = storage.save(blob.key, File(fileobj, name=blob.key))
        if saved != blob.key:  # only a writer outside the row lock can get here
            storage.delete(saved)
            raise OSError(f"blob {sha256}: another writer created {blob.key} while its row was held")
        self.written.append(blob.key)
        if transaction.get_connection().in_atomic_block:
            transaction.on_commit(lambda k=blob.key: self.written.remove(k) if k in self.written else None)
        return blob

    def put_bytes(self, data: bytes) -> Blob:
        import io

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
    """A seekable binary file object over the blob's bytes."""
    return _storage().open(blob.key, "rb")


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
    with os.fdopen(fd, "wb") as out, open_blob(blob) as src:
        shutil.copyfileobj(src, out, CHUNK)
    os.replace(tmp, dest)
    return dest


def _referenced(blob: Blob) -> bool:
    from hub.registry.models import Adapter, BaseModelFile, Job, RevisionFile

    if (
        RevisionFile.objects.filter(blob=blob).exists()
        or BaseModelFile.objects.filter(blob=blob).exists()
        or Adapter.objects.filter(seeds=blob).exists()
    ):
        return True
    unfinished = Job.objects.exclude(status__in=Job.FINISHED).exclude(checkpoints={})
    return any(blob.sha256 in (cps or {}).values() for cps in unfinished.values_list("checkpoints", flat=True))


def delete_unreferenced(blobs: list[Blob]) -> int:
    """Delete the blobs that no revision, base model, adapter's seeds or
    unfinished job's checkpoint refers to; returns the count.

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


def collect_garbage(grace_seconds: float, dry_run: bool = False) -> list[str]:
    """Delete stored blob files that have no Blob row and were written more
    than `grace_seconds` ago (a crashed upload's bytes, a delete whose commit
    failed); returns their keys. The grace spares files of uploads in flight;
    the placeholder row of `_delete_unless_held` spares a put that starts now."""
    cutoff = timezone.now() - timedelta(seconds=grace_seconds)
    removed = []
    for key, modified in _stored_files():
        sha256 = key.rsplit("/", 1)[-1]
        if key != blob_key(sha256) or modified > cutoff:
            continue  # not a name this store writes, or too young to judge
        if Blob.objects.filter(sha256=sha256).exists():
            continue
        if dry_run or _delete_unless_held(sha256, key):
            removed.append(key)
    return removed
