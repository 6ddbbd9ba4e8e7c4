"""Writes through the HF protocol: repo create/delete/settings, validate-yaml,
preupload, and the NDJSON commit parsed into a new Revision."""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass, field

from django.conf import settings
from django.core.cache import cache
from django.http import HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from hub.registry import selectors, services
from hub.registry.models import NAME_RE, Adapter, BaseModel, Revision
from hub.registry.querysets import owner_names
from hub.registry.services import IncomingFile
from hub.registry.validation import ValidationError, check_filename
from hub.storage import upload_temp_dir

from .. import card
from .auth import _json_body, _method, token_user
from .errors import HfError, hf_route, repo_not_found
from .snapshots import ADAPTER_CONFIG, README, repo_get

PENDING_SECONDS = 7 * 24 * 3600
NAME = re.compile(NAME_RE)
B64_STEP = 4 * 256 * 1024  # base64 characters decoded at a time (a multiple of 4)


# --- uploads -------------------------------------------------------------------------------


def _pending_key(owner: str, name: str) -> str:
    return f"hfcompat:pending:{owner}/{name}"


def _check_name(owner: str, name: str) -> None:
    for part, what in ((owner, "namespace"), (name, "repo name")):
        if not NAME.match(part or ""):
            raise HfError(400, f"Invalid {what} '{part}': use letters, digits, '-', '_' or '.', "
                               "starting with a letter or digit (at most 96 characters).")


def _writer(request):
    user = token_user(request)
    if not user.is_authenticated:
        raise HfError(401, "Writing needs a token: send 'Authorization: Bearer <token>' (HF_TOKEN).")
    return user


def _visibility(body: dict) -> str:
    vis = body.get("visibility")
    if vis in ("public", "private"):
        return vis
    if vis is not None:
        raise HfError(400, f"Unsupported visibility '{vis}': use 'public' or 'private'.")
    return "private" if body.get("private") else "public"


def _repo_url(request, repo_id: str) -> str:
    return request.build_absolute_uri(f"/{repo_id}")


@csrf_exempt
@hf_route
def repo_create(request):
    """Validate the name and the right to write the namespace. No row yet: an
    adapter needs its base, which the first commit's files name. The wanted
    visibility is remembered until that commit."""
    if (bad := _method(request, "POST")) is not None:
        return bad
    user = _writer(request)
    body = _json_body(request)
    if (body.get("type") or "model") != "model":
        raise HfError(400, f"This hub hosts model repos only, not '{body.get('type')}' repos.")
    name = str(body.get("name") or "")
    owner = str(body.get("organization") or user.username)
    _check_name(owner, name)
    services.check_can_write(user, owner)
    visibility = _visibility(body)
    repo_id = f"{owner}/{name}"
    if Adapter.objects.filter(owner=owner, name=name).exists():
        raise HfError(409, "You already created this model repo.", extra={"url": _repo_url(request, repo_id)})
    cache.set(_pending_key(owner, name), {"visibility": visibility, "user": user.pk}, PENDING_SECONDS)
    return JsonResponse({"url": _repo_url(request, repo_id), "name": repo_id, "id": repo_id})


@csrf_exempt
@hf_route
def repo_delete(request):
    if (bad := _method(request, "DELETE")) is not None:
        return bad
    user = _writer(request)
    body = _json_body(request)
    name = str(body.get("name") or "")
    owner = str(body.get("organization") or user.username)
    adapter = repo_get(user, f"{owner}/{name}")
    if isinstance(adapter, BaseModel):
        raise HfError(403, "Base models cannot be deleted through this route.")
    services.check_can_write(user, adapter.owner)
    services.adapter_delete(adapter=adapter)
    cache.delete(_pending_key(owner, name))
    return HttpResponse(status=200)


@csrf_exempt
@hf_route
def repo_settings(request, repo):
    """`HfApi().update_repo_settings(repo, private=...)`: visibility only."""
    if (bad := _method(request, "PUT")) is not None:
        return bad
    user = token_user(request)
    target = repo_get(user, repo)  # 404 first: existence stays secret
    if isinstance(target, BaseModel):
        raise HfError(403, "Base models are read-only here.")
    if not user.is_authenticated:
        raise HfError(401, "Writing needs a token: send 'Authorization: Bearer <token>' (HF_TOKEN).")
    services.check_can_write(user, target.owner)
    body = _json_body(request)
    if "visibility" in body or "private" in body:
        target.visibility = _visibility(body)
        target.save(update_fields=["visibility", "updated_at"])
    return JsonResponse({"private": target.visibility == "private"})


@csrf_exempt
@hf_route
def validate_yaml(request):
    if (bad := _method(request, "POST")) is not None:
        return bad
    body = _json_body(request)
    content = body.get("content")
    if not isinstance(content, str):
        raise HfError(400, "Send {'content': <README.md text>, 'repoType': 'model'}.")
    try:
        data, _ = card.parse_card(content)
    except card.CardError as exc:
        return JsonResponse({"error": str(exc), "errors": [{"message": str(exc)}], "warnings": []}, status=400)
    warnings = [] if data else [{"message": "Empty or missing yaml metadata in repo card"}]
    return JsonResponse({"errors": [], "warnings": warnings})


@dataclass
class WriteTarget:
    owner: str
    name: str
    adapter: Adapter | None  # None: the first commit creates it
    head: Revision | None


def write_target(user, repo_id: str, rev: str) -> WriteTarget:
    """The repo a preupload/commit writes to. What the caller may not see, or
    a namespace it may not write, answers 404 RepoNotFound (HF's behaviour for a
    missing repo), so existence stays secret."""
    if "/" not in repo_id:
        repo_get(user, repo_id)  # 404 for an unknown slug
        raise HfError(403, f"{repo_id} is a base model; base models are registered with POST /api/v1/base-models/ "
                           "(staff), not pushed here.")
    owner, name = repo_id.split("/", 1)
    adapter = Adapter.objects.visible_to(user).filter(owner=owner, name=name).select_related("base_model").first()
    if adapter is None:
        may_create = user.is_authenticated and (user.is_superuser or owner in owner_names(user))
        if not may_create or Adapter.objects.filter(owner=owner, name=name).exists():
            raise repo_not_found(repo_id)
        _check_name(owner, name)
        if rev != "main":
            raise HfError(404, f"Revision '{rev}' does not exist for {repo_id}: the first commit goes to 'main'.",
                          "RevisionNotFound")
        return WriteTarget(owner, name, None, None)
    if not user.is_authenticated:
        raise HfError(401, "Writing needs a token: send 'Authorization: Bearer <token>' (HF_TOKEN).")
    services.check_can_write(user, adapter.owner)
    if rev != "main":
        selectors.revision_resolve(adapter, rev)  # 404 RevisionNotFound for an unknown one
        raise HfError(400, f"Commits go to 'main'; '{rev}' is maintained by the hub's jobs.")
    return WriteTarget(owner, name, adapter, selectors.revision_resolve(adapter, "main"))


def _line_limit() -> int:
    """The longest commit line read into memory (one file, base64-encoded)."""
    return min(settings.DATA_UPLOAD_MAX_MEMORY_SIZE or settings.MAX_UPLOAD_BYTES, settings.MAX_UPLOAD_BYTES)


def _max_file_bytes() -> int:
    # A file travels base64-encoded on one ndjson line, read whole: 4/3 of its size.
    return max(_line_limit() - 4096, 0) * 3 // 4


@csrf_exempt
@hf_route
def preupload(request, repo, rev):
    """Every file goes "regular" (base64 inside the commit): answering "lfs"
    would make current clients ask for a Xet write token."""
    if (bad := _method(request, "POST")) is not None:
        return bad
    user = token_user(request)
    write_target(user, repo, rev)
    if request.GET.get("create_pr"):
        raise HfError(400, "Pull requests are not supported by this hub; commit to 'main'.")
    body = _json_body(request)
    files = body.get("files")
    if not isinstance(files, list):
        raise HfError(400, "Send {'files': [{'path', 'sample', 'size'}, ...]}.")
    out = []
    for f in files:
        if not isinstance(f, dict) or not isinstance(f.get("path"), str):
            raise HfError(400, "Each file needs a 'path'.")
        path = check_filename(f["path"])
        size = f.get("size")
        if isinstance(size, int) and size > _max_file_bytes():
            raise ValidationError(
                "upload_too_large",
                f"{path} is {size} bytes; commits through the HF route take files up to {_max_file_bytes()} bytes. "
                "Use `hubctl push` (the REST upload) for larger files.", field=path)
        out.append({"path": f["path"], "uploadMode": "regular", "shouldIgnore": False})
    return JsonResponse({"files": out, "commitOid": None})


@dataclass
class ParsedCommit:
    summary: str = "Upload"
    description: str = ""
    parent: str | None = None
    files: dict[str, IncomingFile] = field(default_factory=dict)
    deleted_files: list[str] = field(default_factory=list)
    deleted_folders: list[str] = field(default_factory=list)


def _decode_into(b64: str, fh, path: str) -> tuple[str, int]:
    h, size = hashlib.sha256(), 0
    for i in range(0, len(b64), B64_STEP):
        try:
            chunk = base64.b64decode(b64[i:i + B64_STEP], validate=True)
        except (binascii.Error, ValueError):
            raise ValidationError("invalid_commit", f"{path}: the content is not valid base64.", field=path) from None
        h.update(chunk)
        size += len(chunk)
        fh.write(chunk)
    fh.flush()
    fh.seek(0)
    return h.hexdigest(), size


def read_commit(request, stack: ExitStack) -> ParsedCommit:
    """Read the ndjson commit line by line from the request stream: each file
    is decoded into its own temporary file (hashed on the way), so at most one
    line is in memory at a time."""
    limit = _line_limit()
    commit = ParsedCommit()
    seen_header = False
    n = 0
    while True:
        line = request.readline(limit + 1)
        if not line:
            break
        n += 1
        if len(line) > limit:
            raise ValidationError("upload_too_large", f"Line {n} of the commit is over {limit} bytes; commits through "
                                  f"the HF route take files up to {_max_file_bytes()} bytes.")
        line = line.strip()
        if not line:
            continue
        try:
            item = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValidationError("invalid_commit", f"Line {n} of the commit is not JSON.") from None
        if not isinstance(item, dict) or not isinstance(item.get("value"), dict):
            raise ValidationError("invalid_commit", f"Line {n} of the commit is not a {{key, value}} object.")
        key, value = item.get("key"), item["value"]
        del item, line
        if key == "header":
            seen_header = True
            commit.summary = str(value.get("summary") or "Upload")
            commit.description = str(value.get("description") or "")
            commit.parent = value.get("parentCommit")
        elif key == "file":
            path = value.get("path")
            if not isinstance(path, str) or not isinstance(value.get("content"), str):
                raise ValidationError("invalid_commit", f"Line {n}: a file needs 'path' and 'content'.")
            if value.get("encoding", "base64") != "base64":
                raise ValidationError("invalid_commit", f"{path}: only base64 file contents are accepted.")
            path = check_filename(path)
            fh = stack.enter_context(tempfile.NamedTemporaryFile(dir=upload_temp_dir(), prefix="hfcommit-"))
            sha, size = _decode_into(value.pop("content"), fh, path)
            if size > _max_file_bytes():
                raise ValidationError("upload_too_large", f"{path} is over {_max_file_bytes()} bytes.", field=path)
            commit.files[path] = IncomingFile(path=path, fileobj=fh, sha256=sha, size=size)
        elif key == "deletedFile":
            commit.deleted_files.append(str(value.get("path", "")))
        elif key == "deletedFolder":
            commit.deleted_folders.append(str(value.get("path", "")).rstrip("/"))
        elif key in ("lfsFile", "xetFile"):
            raise ValidationError(
                "invalid_commit", "LFS/Xet uploads are not supported: this hub's preupload answers 'regular', "
                "so files travel inside the commit. Upgrade or reconfigure the client.")
        elif key == "copyFile":
            raise ValidationError("invalid_commit", "Copy operations are not supported by this hub.")
        else:
            raise ValidationError("invalid_commit", f"Line {n}: unknown operation '{key}'.")
    if not seen_header:
        raise ValidationError("invalid_commit", "The commit has no header line.")
    return commit


def match_base(candidates: list[str]) -> BaseModel:
    """The registered base a new adapter names: exact slug, or the last path
    segment (`org/tiny-base`, `/models/tiny-base`); first candidate that matches wins."""
    bases = {b.slug: b for b in BaseModel.objects.all()}
    for value in candidates:
        v = str(value).strip().rstrip("/")
        if v in bases:
            return bases[v]
        last = v.rsplit("/", 1)[-1]
        if last in bases:
            return bases[last]
    known = ", ".join(sorted(bases)) or "(none)"
    if not candidates:
        raise ValidationError(
            "unknown_base_model",
            "The first commit must say which registered base model the adapter is for: set `base_model: <slug>` "
            f"in README.md's YAML or `base_model_name_or_path` in {ADAPTER_CONFIG}. Registered base models: {known}.",
            field="base_model")
    named = ", ".join(repr(str(c)) for c in candidates)
    raise ValidationError(
        "unknown_base_model",
        f"Unknown base model {named}: it matches no registered base model (by slug or last path segment). "
        f"Registered base models: {known}. Set `base_model: <slug>` in README.md or `base_model_name_or_path` "
        f"in {ADAPTER_CONFIG}.", field="base_model")


def _uploaded_card(commit: ParsedCommit) -> tuple[dict, str] | None:
    f = commit.files.get(README)
    if f is None:
        return None
    if f.size > card.MAX_CARD_BYTES:
        raise ValidationError("invalid_card", f"README.md is over {card.MAX_CARD_BYTES} bytes.", field=README)
    raw = f.fileobj.read()
    f.fileobj.seek(0)
    return card.parse_card(raw.decode("utf-8", "replace"))


def _base_candidates(commit: ParsedCommit, meta: dict) -> list[str]:
    out = card.base_model_candidates(meta)
    cfg = commit.files.get(ADAPTER_CONFIG)
    if cfg is not None:
        try:
            conf = json.loads(cfg.fileobj.read().decode())
        except (json.JSONDecodeError, UnicodeDecodeError):
            conf = {}  # the service reports a broken config properly
        finally:
            cfg.fileobj.seek(0)
        value = conf.get("base_model_name_or_path") if isinstance(conf, dict) else None
        if isinstance(value, str) and value:
            out.append(value)
    return out


@csrf_exempt
@hf_route
def commit(request, repo, rev):
    """An ndjson commit becomes one new validated Revision (the first one
    creates the adapter); a refused commit stores nothing."""
    if (bad := _method(request, "POST")) is not None:
        return bad
    user = token_user(request)
    target = write_target(user, repo, rev)
    if request.GET.get("create_pr"):
        raise HfError(400, "Pull requests are not supported by this hub; commit to 'main'.")
    try:
        length = int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        raise HfError(400, "Invalid Content-Length.") from None
    if length > settings.MAX_UPLOAD_BYTES:
        raise ValidationError("upload_too_large", f"The commit is {length} bytes; the limit is "
                                                  f"{settings.MAX_UPLOAD_BYTES} bytes.")
    with ExitStack() as stack:
        parsed = read_commit(request, stack)
        uploaded_card = _uploaded_card(parsed)
        meta, body = uploaded_card if uploaded_card is not None else ({}, "")
        message = parsed.summary if not parsed.description else f"{parsed.summary}\n\n{parsed.description}"
        if target.adapter is None:
            base = match_base(_base_candidates(parsed, meta))
            pending = cache.get(_pending_key(target.owner, target.name)) or {}
            revision = services.adapter_create_from_upload(
                owner=target.owner, name=target.name, base=base, files=list(parsed.files.values()), user=user,
                # Without a create_repo on record (e.g. a restarted hub), stay on the safe side.
                visibility=pending.get("visibility", "private"),
                tags=card.card_tags(meta), description=body.strip(), message=message,
            )
            cache.delete(_pending_key(target.owner, target.name))
        else:
            head = target.head
            if parsed.parent and parsed.parent != head.sha:
                raise HfError(412, f"The parent commit {parsed.parent} is not the head of main ({head.sha}): "
                                   "someone committed since; refresh and try again.")
            existing = set(selectors.revision_files(head))
            for p in parsed.deleted_files:
                if p not in existing and p not in parsed.files:
                    raise HfError(404, f"A file with this name doesn't exist: {p}", "EntryNotFound",
                                  headers={"X-Repo-Commit": head.sha})
            revision = services.revision_create_from_upload(
                adapter=target.adapter, files=list(parsed.files.values()), user=user, message=message,
                keep_from=head, deleted=parsed.deleted_files + parsed.deleted_folders,
            )
            if uploaded_card is not None:
                # The uploaded card is the adapter's card from now on (REST and UI show it).
                target.adapter.description = body.strip()
                target.adapter.save(update_fields=["description", "updated_at"])
                if "tags" in meta:
                    services.set_tags(target.adapter, card.card_tags(meta))
    repo_id = f"{target.owner}/{target.name}"
    return JsonResponse({
        "success": True,
        "commitOid": revision.sha,
        "commitUrl": request.build_absolute_uri(f"/{repo_id}/commit/{revision.sha}"),
        "hookOutput": "",
    })
