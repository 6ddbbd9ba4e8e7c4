"""Content-addressed blob store on django-storages (filesystem or S3).

A blob lives under `sha256/<aa>/<bb>/<sha256>` and has one `Blob` row. Bytes
are written before the row; `BlobBatch` deletes what it wrote if the row's
transaction does not commit, so a rejected upload leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from django.conf import settings
from django.core.files import File
from django.core.files.storage import storages
from django.db import transaction

from hub.registry.models import Blob

CHUNK = 1024 * 1024


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

    Use inside `transaction.atomic()`: objects written by this batch are
    deleted if the surrounding transaction rolls back.
    """

    def __init__(self):
        self.written: list[str] = []

    def put(self, fileobj: BinaryIO, sha256: str | None = None, size: int | None = None) -> Blob:
        if sha256 is None or size is None:
            sha256, size = hash_file(fileobj)
        existing = Blob.objects.filter(sha256=sha256).first()
        if existing is not None and _storage().exists(existing.key):
            return existing
        key = blob_key(sha256)
        fileobj.seek(0)
        storage = _storage()
        if not storage.exists(key):
            saved = storage.save(key, File(fileobj, name=key))
            if saved != key:  # a concurrent writer won the name; same content
                storage.delete(saved)
            else:
                self.written.append(key)
                if transaction.get_connection().in_atomic_block:
                    transaction.on_commit(lambda k=key: self.written.remove(k) if k in self.written else None)
        blob, _ = Blob.objects.get_or_create(sha256=sha256, defaults={"size": size, "key": key})
        return blob

    def put_bytes(self, data: bytes) -> Blob:
        import io

        return self.put(io.BytesIO(data), hashlib.sha256(data).hexdigest(), len(data))

    def put_path(self, path: str | os.PathLike) -> Blob:
        with open(path, "rb") as f:
            return self.put(f)

    def rollback(self) -> None:
        storage = _storage()
        for key in self.written:
            # Only delete if no committed row references the key.
            sha = key.rsplit("/", 1)[-1]
            if not Blob.objects.filter(sha256=sha).exists():
                storage.delete(key)
        self.written.clear()


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
        params["ResponseContentDisposition"] = f'attachment; filename="{Path(filename).name}"'
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


def delete_unreferenced(blobs: list[Blob]) -> int:
    """Delete blobs no revision, base model or adapter refers to; returns the count."""
    from hub.registry.models import Adapter, BaseModelFile, RevisionFile

    n = 0
    for blob in blobs:
        if (
            RevisionFile.objects.filter(blob=blob).exists()
            or BaseModelFile.objects.filter(blob=blob).exists()
            or Adapter.objects.filter(seeds=blob).exists()
        ):
            continue
        _storage().delete(blob.key)
        blob.delete()
        n += 1
    return n
