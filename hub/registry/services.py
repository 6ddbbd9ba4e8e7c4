"""Writes to the registry. Each service validates first, then stores blobs and
rows together (`blob_batch` + `transaction.atomic`), so a rejected request
leaves no row and no blob behind."""

from __future__ import annotations

import hashlib
import re
import uuid
from dataclasses import dataclass
from datetime import timedelta
from typing import BinaryIO

from django.db import IntegrityError, transaction
from django.db.models import Q
from django.utils import timezone

from hub.errors import HubError
from hub.storage import blob_batch, hash_file, open_blob

from . import validation
from .models import (
    Adapter,
    ApiToken,
    BaseModel,
    BaseModelFile,
    Blob,
    Org,
    Ref,
    Revision,
    RevisionFile,
    StagedUpload,
    Tag,
    repo_name_problem,
)
from .querysets import owner_names
from .validation import ValidationError

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MAX_FILES = 64


class Conflict(HubError):
    """The name is taken, or the state moved on (409)."""

    status = 409
    code = "already_exists"


class Forbidden(HubError):
    """The user may see the thing but not change it (403)."""

    status = 403
    code = "forbidden"


@dataclass
class IncomingFile:
    """One uploaded file: a seekable binary stream plus, when known, its hash."""

    path: str
    fileobj: BinaryIO
    sha256: str | None = None
    size: int | None = None

    def ensure_hashed(self):
        if self.sha256 is None or self.size is None:
            self.sha256, self.size = hash_file(self.fileobj)


def new_commit_sha() -> str:
    """A 40-hex id for a revision: unique like a git commit, never reused."""
    return hashlib.sha1(uuid.uuid4().bytes).hexdigest()


def files_commit_sha(entries: list[tuple[str, str]]) -> str:
    """A stable 40-hex id for a fixed file set (base models): same files, same id."""
    h = hashlib.sha1()
    for path, sha in sorted(entries):
        h.update(f"{path}\0{sha}\n".encode())
    return h.hexdigest()


# --- owners ----------------------------------------------------------------------


def can_write(user, owner: str) -> bool:
    """The one write rule: superusers anywhere, others in their own and their orgs' namespaces
    (AdapterQuerySet.writable_by is its queryset form)."""
    return user is not None and user.is_authenticated and (user.is_superuser or owner in owner_names(user))


def check_can_write(user, owner: str) -> None:
    if can_write(user, owner):
        return
    if user is None or not user.is_authenticated:
        raise Forbidden("Sign in (a token) to write.")
    raise Forbidden(f"You may not write in the namespace '{owner}'.")


def org_create(*, name: str, user) -> Org:
    from django.contrib.auth import get_user_model

    if get_user_model().objects.filter(username=name).exists():
        raise Conflict(f"'{name}' is a user name.")
    with transaction.atomic():
        org, created = Org.objects.get_or_create(name=name)
        if not created:
            raise Conflict(f"Organization '{name}' exists.")
        org.memberships.create(user=user, role="admin")
    return org


def token_lifetime(text: str | None):
    """'30d', '12h', '90m' -> a timedelta; None, '' or 'never' -> None (valid until revoked)."""
    text = (text or "").strip().lower()
    if text in ("", "never"):
        return None
    match = re.fullmatch(r"([0-9]{1,5})([dhm])", text)
    if not match or int(match[1]) == 0:
        raise ValidationError("invalid_expiry", f"Expiry '{text}': use a count and a unit, e.g. 30d, 12h or 90m, "
                                                "or 'never'.", field="expires")
    unit = {"d": "days", "h": "hours", "m": "minutes"}[match[2]]
    return timedelta(**{unit: int(match[1])})


def token_create(*, user, name: str = "default", expires: str | None = None) -> str:
    """A new token's raw value (shown once). `expires`: a lifetime such as '30d' (token_lifetime)."""
    lifetime = token_lifetime(expires)
    _, raw = ApiToken.issue(user, name=name, expires_at=None if lifetime is None else timezone.now() + lifetime)
    return raw


# --- staged uploads ---------------------------------------------------------------


def stage_upload(*, user, sha256: str, upload: IncomingFile) -> tuple[Blob, bool]:
    """Keep one file a user uploaded on its own (`PUT /api/v1/uploads/{sha256}`)
    for a commit to come: (its blob, whether this user had not staged it yet).

    The body's hash, taken while it was spooled, must be the sha256 the caller
    named: anything else is refused before a row or a blob is written. Bytes
    the store has already are not written again, but the caller had to send
    them: knowing a hash never grants a blob."""
    upload.ensure_hashed()
    if upload.sha256 != sha256:
        raise ValidationError("sha256_mismatch", f"The body's sha256 is {upload.sha256}, not {sha256} as the URL says; "
                              "nothing was kept.", field="sha256")
    with blob_batch() as batch, transaction.atomic():
        blob = batch.put(upload.fileobj, upload.sha256, upload.size)
        _, created = StagedUpload.objects.update_or_create(user=user, blob=blob,
                                                           defaults={"touched_at": timezone.now()})
    return blob, created


def usable_blobs(user, shas) -> dict[str, Blob]:
    """The blobs among `shas` that `user` may name in a commit: staged by that
    user (touched now, so `gc_blobs` keeps them a grace period longer), or
    already readable by that user (a file of a visible adapter's revision or of
    a base model). Another user's staged or private bytes are not among them."""
    shas = sorted(set(shas))
    if not shas or user is None or not user.is_authenticated:
        return {}
    StagedUpload.objects.filter(user=user, blob_id__in=shas).update(touched_at=timezone.now())
    readable = (Q(staged__user=user) | Q(base_files__isnull=False)
                | Q(revision_files__revision__adapter__in=Adapter.objects.visible_to(user)))
    return {b.sha256: b for b in Blob.objects.filter(sha256__in=shas).filter(readable).distinct()}


def staged_files(user, entries: list[tuple[str, str]], stack) -> list[IncomingFile]:
    """(path, sha256) pairs of a commit -> uploaded files whose streams read the
    stored blobs (closed by `stack`), for the same validation and storing as a
    multipart upload's. A sha256 the user may not use is a 400 `unknown_upload`."""
    from hub.storage import open_blob

    if len(entries) > MAX_FILES + 1:  # the files and the seeds
        raise ValidationError("too_many_files", f"At most {MAX_FILES} files per upload.", field="files")
    blobs = usable_blobs(user, [sha for _, sha in entries])
    files = []
    for path, sha in entries:
        blob = blobs.get(sha)
        if blob is None:
            raise ValidationError("unknown_upload", f"{path}: no upload {sha} of yours is waiting; upload it with "
                                  f"PUT /api/v1/uploads/{sha} first.", field=path)
        try:
            fh = stack.enter_context(open_blob(blob))
        except OSError:  # a row whose file was lost: the bytes must come again
            raise ValidationError("unknown_upload", f"{path}: the hub lost the bytes of {sha}; upload them again with "
                                  f"PUT /api/v1/uploads/{sha}.", field=path) from None
        files.append(IncomingFile(path=path, fileobj=fh, sha256=blob.sha256, size=blob.size))
    return files


def unstage(user, shas) -> None:
    """A commit took these blobs: their staging rows have done their job."""
    StagedUpload.objects.filter(user=user, blob_id__in=list(shas)).delete()


# --- base models -----------------------------------------------------------------


def _validate_files(files: list[IncomingFile]) -> dict[str, IncomingFile]:
    if not files:
        raise ValidationError("no_files", "No files were uploaded.", field="files")
    if len(files) > MAX_FILES:
        raise ValidationError("too_many_files", f"At most {MAX_FILES} files per upload.", field="files")
    by_path = {}
    for f in files:
        path = validation.check_filename(f.path)
        if path in by_path:
            raise ValidationError("bad_filename", f"{path} was uploaded twice.", field="files")
        f.path = path
        f.ensure_hashed()
        by_path[path] = f
    return by_path


def _read_header(f: IncomingFile, **caps) -> dict:
    """`caps`: read_safetensors_header's max_bytes / max_tensors (default: an adapter's)."""
    f.fileobj.seek(0)
    try:
        return validation.read_safetensors_header(f.fileobj, f.size, **caps)
    except ValidationError as exc:
        exc.detail = f"{f.path}: {exc.detail}"
        exc.field = exc.field or f.path
        raise
    finally:
        f.fileobj.seek(0)


def _store_files(batch, files: dict[str, IncomingFile]) -> dict[str, Blob]:
    # In sha256 order: each put locks its blob's row, and two uploads sharing
    # blobs must take those locks in the same order or they deadlock.
    by_sha = sorted(files.items(), key=lambda item: item[1].sha256)
    stored = {path: batch.put(f.fileobj, f.sha256, f.size) for path, f in by_sha}
    return {path: stored[path] for path in files}


def base_model_register(
    *, slug: str, files: list[IncomingFile], user, family: str = "", version: str = "",
    weights_uri: str = "", description: str = "",
) -> BaseModel:
    """Register a base from its HF-layout files: manifest from the safetensors headers."""
    import json

    if BaseModel.objects.filter(slug=slug).exists():
        raise Conflict(f"Base model '{slug}' is already registered.")
    by_path = _validate_files(files)
    weights = [f for p, f in by_path.items() if p.endswith(".safetensors")]
    if not weights:
        raise ValidationError("missing_weights", "A base model needs at least one .safetensors file.", field="files")
    manifest = {}
    for f in weights:
        manifest.update(validation.manifest_from_header(_read_header(
            f, max_bytes=validation.BASE_MAX_HEADER_BYTES, max_tensors=validation.BASE_MAX_HEADER_TENSORS)))
    config = {}
    if "config.json" in by_path:
        fobj = by_path["config.json"].fileobj
        try:
            config = json.loads(fobj.read().decode())
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValidationError("invalid_config", f"config.json is not valid JSON: {exc}", field="config.json") from None
        finally:
            fobj.seek(0)
        if not isinstance(config, dict):
            raise ValidationError("invalid_config", "config.json must be a JSON object.", field="config.json")
    with blob_batch() as batch, transaction.atomic():
        blobs = _store_files(batch, by_path)
        try:
            base = BaseModel.objects.create(
                slug=slug, family=family, version=version, weights_uri=weights_uri or f"hub://{slug}",
                manifest=manifest, config=config, description=description, created_by=user,
                sha=files_commit_sha([(p, b.sha256) for p, b in blobs.items()]),
            )
        except IntegrityError:
            raise Conflict(f"Base model '{slug}' is already registered.") from None
        BaseModelFile.objects.bulk_create([BaseModelFile(base_model=base, path=p, blob=b) for p, b in blobs.items()])
    return base


def base_model_deprecate(*, base: BaseModel, successor: BaseModel | None, at=None) -> BaseModel:
    if successor is not None and successor.pk == base.pk:
        raise ValidationError("invalid_successor", "A base model cannot succeed itself.", field="successor")
    base.status = "deprecated"
    base.successor = successor
    base.deprecate_at = at or timezone.now()
    base.save(update_fields=["status", "successor", "deprecate_at"])
    return base


# --- adapters and revisions ------------------------------------------------------------


@dataclass
class CheckedAdapterFiles:
    files: dict[str, IncomingFile]
    summary: validation.AdapterSummary
    config: dict


def check_adapter_files(files: list[IncomingFile], base: BaseModel) -> CheckedAdapterFiles:
    """Validate a PEFT folder against its base without loading any tensor."""
    by_path = _validate_files(files)
    if ADAPTER_CONFIG not in by_path:
        raise ValidationError("missing_config", f"The upload has no {ADAPTER_CONFIG}.", field=ADAPTER_CONFIG)
    if ADAPTER_WEIGHTS not in by_path:
        raise ValidationError("missing_weights", f"The upload has no {ADAPTER_WEIGHTS}.", field=ADAPTER_WEIGHTS)
    cfg = by_path[ADAPTER_CONFIG]
    if cfg.size > validation.MAX_CONFIG_BYTES:  # refused before it is read into memory
        raise ValidationError("config_too_large", f"{ADAPTER_CONFIG} is {cfg.size} bytes; at most "
                              f"{validation.MAX_CONFIG_BYTES} are accepted.", field=ADAPTER_CONFIG)
    config = validation.validate_peft_config(cfg.fileobj.read())
    cfg.fileobj.seek(0)
    for path, f in by_path.items():
        if path.endswith(".safetensors") and path != ADAPTER_WEIGHTS:
            _read_header(f)  # any other safetensors must at least be well-formed
    header = _read_header(by_path[ADAPTER_WEIGHTS])
    summary = validation.check_lora_shapes(header, config, base.manifest)
    return CheckedAdapterFiles(files=by_path, summary=summary, config=config)


def _summary_fields(summary, size: int) -> dict:
    return {
        "r": summary.r,
        "lora_alpha": summary.lora_alpha,
        "target_modules": summary.target_modules,
        "dtype": summary.dtype,
        "size": size,
    }


TAG_MAX = Tag._meta.get_field("name").max_length


def set_tags(adapter: Adapter, tags: list[str]) -> None:
    names = [t.strip().lower() for t in tags if t.strip()]
    too_long = [t for t in names if len(t) > TAG_MAX]
    if too_long:  # checked here, for every path: PostgreSQL's varchar would answer 500, SQLite store it
        raise ValidationError("invalid_tag", f"Tags are at most {TAG_MAX} characters: {too_long[0][:80]!r}.",
                              field="tags")
    adapter.tags.set([Tag.objects.get_or_create(name=t)[0] for t in names])


def adapter_create_from_upload(
    *, owner: str, name: str, base: BaseModel, files: list[IncomingFile], user,
    visibility: str = "public", tags: list[str] | None = None, description: str = "",
    seeds: IncomingFile | None = None, message: str = "Upload",
) -> Revision:
    check_can_write(user, owner)
    problem = repo_name_problem(name)
    if problem:
        raise ValidationError("invalid_name", f"Invalid repo name '{name}': {problem}.", field="name")
    existing = Adapter.objects.filter(owner__iexact=owner, name__iexact=name).first()
    if existing is not None:  # names that differ only by case are one repository, as on the Hub
        raise Conflict(f"{existing.repo_id} already exists.")
    checked = check_adapter_files(files, base)
    if seeds is not None:
        validation.validate_seeds(seeds.fileobj.read())
        seeds.ensure_hashed()
    with blob_batch() as batch, transaction.atomic():
        seeds_blob = batch.put(seeds.fileobj, seeds.sha256, seeds.size) if seeds is not None else None
        try:
            adapter = Adapter.objects.create(
                owner=owner, name=name, base_model=base, visibility=visibility, description=description,
                seeds=seeds_blob, created_by=user,
            )
        except IntegrityError:
            raise Conflict(f"{owner}/{name} already exists.") from None
        set_tags(adapter, tags or [])
        blobs = _store_files(batch, checked.files)
        return revision_create(
            adapter=adapter, files=blobs, kind="upload", user=user, message=message,
            summary=checked.summary, parents=[], ref="main",
        )


def revision_create_from_upload(
    *, adapter: Adapter, files: list[IncomingFile], user, message: str = "Upload",
    keep_from: Revision | None = None, deleted: list[str] | None = None,
) -> Revision:
    """A new `upload` revision on an existing adapter (an HF commit, a re-push).

    With `keep_from`, files not uploaded are carried over from that revision
    (a commit changes a tree; it does not replace it), minus `deleted`.
    """
    check_can_write(user, adapter.owner)
    carried: dict[str, Blob] = {}
    if keep_from is not None:
        gone = set(deleted or [])
        uploaded = {f.path for f in files}
        for rf in keep_from.files.select_related("blob"):
            if rf.path in uploaded or rf.path in gone or any(rf.path.startswith(d.rstrip("/") + "/") for d in gone):
                continue
            carried[rf.path] = rf.blob
    # Validate the resulting tree as a whole: carried files come back as streams.
    incoming = list(files)
    opened = []
    for path, blob in carried.items():
        if path in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
            fh = open_blob(blob)
            opened.append(fh)
            incoming.append(IncomingFile(path=path, fileobj=fh, sha256=blob.sha256, size=blob.size))
    try:
        checked = check_adapter_files(incoming, adapter.base_model)
        with blob_batch() as batch, transaction.atomic():
            blobs = dict(carried)
            blobs.update(_store_files(batch, {p: f for p, f in checked.files.items() if p not in carried}))
            parents = [keep_from] if keep_from is not None else list(_ref_revision(adapter, "main"))
            return revision_create(
                adapter=adapter, files=blobs, kind="upload", user=user, message=message,
                summary=checked.summary, parents=parents, ref="main",
            )
    finally:
        for fh in opened:
            fh.close()


def _ref_revision(adapter: Adapter, name: str):
    ref = Ref.objects.filter(adapter=adapter, name=name).select_related("revision").first()
    return [ref.revision] if ref else []


def revision_create(
    *, adapter: Adapter, files: dict[str, Blob], kind: str, user=None, message: str = "",
    summary=None, parents: list[Revision] = (), params: dict | None = None, metrics: dict | None = None,
    job=None, ref: str | None = None, base: BaseModel | None = None,
) -> Revision:
    """Create a revision with its files and lineage; move `ref` (default: the kind) to it.

    Called inside the caller's transaction; the `main` ref also refreshes the
    adapter's denormalised metadata.
    """
    size = sum(b.size for b in files.values())
    fields = _summary_fields(summary, size) if summary is not None else {"size": size}
    with transaction.atomic():
        rev = Revision.objects.create(
            adapter=adapter, sha=new_commit_sha(), kind=kind, message=message[:300], params=params or {},
            metrics=metrics or {}, base_model=base or adapter.base_model, job=job, created_by=user, **fields,
        )
        RevisionFile.objects.bulk_create([RevisionFile(revision=rev, path=p, blob=b) for p, b in files.items()])
        if parents:
            rev.parents.set(parents)
        ref_name = ref or kind
        Ref.objects.update_or_create(adapter=adapter, name=ref_name, defaults={"revision": rev})
        if ref_name == "main":
            for k, v in fields.items():
                setattr(adapter, k, v)
            adapter.save()
    return rev


def adapter_delete(*, adapter: Adapter) -> None:
    """Delete an adapter and the blobs only it referenced (each checked under
    its row lock: an upload of the same bytes racing this keeps them)."""
    from hub.storage import delete_unreferenced

    blobs = list(Blob.objects.filter(revision_files__revision__adapter=adapter).distinct())
    if adapter.seeds_id:
        blobs.append(adapter.seeds)
    with transaction.atomic():
        adapter.delete()
    delete_unreferenced(blobs)


def count_download(adapter: Adapter, request) -> None:
    """One download per full GET of a stored file (HEAD and Range requests of a
    resumed transfer do not count). Shared by the REST and HF file routes."""
    from django.db.models import F

    if request.method == "GET" and not request.headers.get("Range"):
        Adapter.objects.filter(pk=adapter.pk).update(downloads=F("downloads") + 1)
