"""Routes that speak the Hugging Face Hub protocol, so `huggingface_hub`,
`peft` and adapter servers (LoRAX) pull from and push to this hub unmodified
with `HF_ENDPOINT` pointing here (see docs/hf-compat.md and
/work/shared/HF_PROTOCOL.md).

Repo ids: `owner/name` is an adapter; a single segment is a base model slug
(read-only, one revision whose commit id is `BaseModel.sha`, ref `main`).

Plain Django views: the clients need exact status codes and headers
(`X-Error-Code`, `X-Repo-Commit`, ETag), and errors carry the readable text in
`error`, which huggingface_hub prints. Visibility comes from
`selectors.adapter_get` (`Adapter.objects.visible_to`): a repo the caller may
not see answers 404 RepoNotFound, exactly like one that does not exist.
Writes take a bearer token only (never the session cookie), which is why the
POST routes can be CSRF-exempt.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import json
import re
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass, field
from urllib.parse import urlencode

from django.conf import settings
from django.contrib.auth.models import AnonymousUser
from django.core.cache import cache
from django.db.models import Q
from django.http import HttpResponse, JsonResponse
from django.views.decorators.csrf import csrf_exempt

from hub.api.auth import user_for_token
from hub.api.downloads import blob_response, parse_range
from hub.registry import selectors, services
from hub.registry.models import NAME_RE, Adapter, ApiToken, BaseModel, Blob, Revision
from hub.registry.querysets import owner_names
from hub.registry.services import Conflict, Forbidden, IncomingFile
from hub.registry.validation import ValidationError, check_filename, content_disposition
from hub.storage import open_blob, upload_temp_dir

from . import card

README = "README.md"
ADAPTER_CONFIG = services.ADAPTER_CONFIG
TREE_PAGE_SIZE = 1000  # the Hub's page size for /tree without expand
PENDING_SECONDS = 7 * 24 * 3600
NAME = re.compile(NAME_RE)
B64_STEP = 4 * 256 * 1024  # base64 characters decoded at a time (a multiple of 4)

NOT_FOUND_CODES = {
    "repo_not_found": "RepoNotFound",
    "base_model_not_found": "RepoNotFound",
    "revision_not_found": "RevisionNotFound",
    "entry_not_found": "EntryNotFound",
}


# --- errors -------------------------------------------------------------------------


class HfError(Exception):
    """An answer other than 2xx, in the shape the HF clients understand."""

    def __init__(self, status: int, message: str, error_code: str | None = None, headers: dict | None = None,
                 extra: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_code = error_code
        self.headers = headers or {}
        self.extra = extra or {}


def repo_not_found(repo_id: str) -> HfError:
    return HfError(404, f"Repository {repo_id} not found (or not visible with this token).", "RepoNotFound")


def _header_text(text: str) -> str:
    # HTTP header values: one line of latin-1; keep it short.
    one_line = " ".join(str(text).split())
    return one_line.encode("ascii", "replace").decode()[:500]


def error_response(err: HfError) -> JsonResponse:
    body = {"error": err.message, **err.extra}
    if err.error_code:
        body["code"] = err.error_code
    resp = JsonResponse(body, status=err.status)
    if err.error_code:
        resp["X-Error-Code"] = err.error_code
    resp["X-Error-Message"] = _header_text(err.message)
    for k, v in err.headers.items():
        resp[k] = v
    return resp


def hf_route(view):
    """Turn registry exceptions into HF-style answers (status, X-Error-Code, `error` text)."""

    @functools.wraps(view)
    def wrapped(request, *args, **kwargs):
        try:
            return view(request, *args, **kwargs)
        except HfError as err:
            return error_response(err)
        except selectors.NotFound as exc:
            return error_response(HfError(404, exc.detail, NOT_FOUND_CODES.get(exc.code)))
        except ValidationError as exc:
            status = 413 if exc.code == "upload_too_large" else 400
            extra = {"field": exc.field} if getattr(exc, "field", None) else {}
            return error_response(HfError(status, exc.detail, extra={"reason": exc.code, **extra}))
        except card.CardError as exc:
            return error_response(HfError(400, str(exc), extra={"reason": "invalid_card"}))
        except Conflict as exc:
            return error_response(HfError(409, exc.detail))
        except Forbidden as exc:
            return error_response(HfError(403, exc.detail))

    return wrapped


# --- who is asking -------------------------------------------------------------------


def _bearer(request) -> str | None:
    header = request.headers.get("Authorization", "")
    if not header:
        return None
    parts = header.split()
    if len(parts) != 2 or parts[0].lower() != "bearer":
        raise HfError(401, "Invalid credentials in Authorization header: send 'Authorization: Bearer <token>'.")
    return parts[1]


def token_user(request):
    """The user of the bearer token; AnonymousUser without one; 401 for a bad one
    (a stale HF_TOKEN should say so, not look like a missing repo)."""
    raw = _bearer(request)
    if raw is None:
        return AnonymousUser()
    user = user_for_token(raw)
    if user is None:
        raise HfError(401, "Invalid credentials in Authorization header: the token is unknown, expired or revoked.")
    return user


def read_user(request):
    """Readers may also use the browser session (download links in the UI)."""
    user = token_user(request)
    if not user.is_authenticated and getattr(request, "user", None) is not None and request.user.is_authenticated:
        return request.user
    return user


def _json_body(request) -> dict:
    try:
        data = json.loads(request.body or b"{}")
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise HfError(400, "The request body is not valid JSON.") from None
    if not isinstance(data, dict):
        raise HfError(400, "The request body must be a JSON object.")
    return data


def _method(request, *allowed):
    if request.method not in allowed:
        resp = error_response(HfError(405, f"Use {' or '.join(allowed)} on this route."))
        resp["Allow"] = ", ".join(allowed)
        return resp
    return None


# --- snapshots: one revision's files, for adapters and base models alike -----------------


@dataclass
class Entry:
    path: str
    size: int
    sha256: str
    blob: Blob | None = None  # stored file
    content: bytes | None = None  # generated file (the model card)


@dataclass
class Snapshot:
    repo_id: str
    sha: str
    files: dict[str, Entry]
    adapter: Adapter | None = None
    base: BaseModel | None = None
    revision: Revision | None = None
    card_data: dict | None = None
    created_at: object = None
    refs: list[str] = field(default_factory=list)


def repo_get(user, repo_id: str) -> Adapter | BaseModel:
    """The adapter (`owner/name`, visible to `user`) or base model (`slug`)."""
    try:
        if "/" in repo_id:
            owner, name = repo_id.split("/", 1)
            return selectors.adapter_get(user, owner, name)
        return selectors.base_model_get(repo_id)
    except selectors.NotFound:
        raise repo_not_found(repo_id) from None


def _base_sha(base: BaseModel) -> str:
    if base.sha:
        return base.sha
    return services.files_commit_sha([(f.path, f.blob_id) for f in base.files.all()])


def _same_audience(this: Adapter, other: Adapter) -> bool:
    """May a card of `this` name `other`? Only if everyone who sees `this` sees `other`."""
    return other.visibility == "public" or (this.visibility == "private" and other.owner == this.owner)


def successor_of(adapter: Adapter) -> str | None:
    """The adapter carried over to the successor of this adapter's base (a
    transfer or Trans-LoRA child on that base), when there is one to name."""
    succ = adapter.base_model.successor_id
    if not succ:
        return None
    children = (
        Revision.objects.filter(parents__adapter=adapter, kind__in=("transfer", "translora"))
        .filter(Q(base_model_id=succ) | Q(adapter__base_model_id=succ))
        .exclude(adapter=adapter)
        .select_related("adapter")
        .order_by("-created_at")
    )
    for child in children:
        if _same_audience(adapter, child.adapter):
            return child.adapter.repo_id
    return None


def adapter_card(adapter: Adapter, revision: Revision) -> tuple[dict, bytes]:
    """The generated README.md of a revision: (front-matter dict, bytes)."""
    merged_from: list[str] = []
    if revision.kind == "merge":
        for parent in revision.parents.select_related("adapter").order_by("id"):
            rid = parent.adapter.repo_id
            if rid not in merged_from and _same_audience(adapter, parent.adapter):
                merged_from.append(rid)
    slug = revision.base_model.slug
    data = card.card_data(
        slug=slug, kind=revision.kind, tags=sorted(adapter.tags.values_list("name", flat=True)),
        merged_from=merged_from, new_version=successor_of(adapter),
    )
    facts = [
        ("commit", f"`{revision.sha}`"),
        ("kind", revision.kind),
        ("base model", f"`{slug}`"),
        ("rank (r)", revision.r if revision.r is not None else "-"),
        ("lora_alpha", revision.lora_alpha if revision.lora_alpha is not None else "-"),
        ("target modules", ", ".join(f"`{m}`" for m in revision.target_modules) or "-"),
        ("dtype", revision.dtype or "-"),
        ("size", f"{revision.size} bytes"),
    ]
    facts += card.metric_facts(revision.kind, revision.metrics)  # e.g. a merge's kept energy
    text = card.render_card(
        data, title=adapter.repo_id, description=adapter.description, facts=facts,
        usage=card.usage_snippet(adapter.repo_id, slug),
    )
    return data, text.encode()


def _read_small(blob: Blob) -> bytes | None:
    if blob.size > card.MAX_CARD_BYTES:
        return None
    with open_blob(blob) as f:
        return f.read()


def _stored_card_data(blob: Blob) -> dict | None:
    raw = _read_small(blob)
    if raw is None:
        return None
    try:
        data, _ = card.parse_card(raw.decode("utf-8", "replace"))
    except card.CardError:
        return None
    return data or None


def snapshot(user, repo_id: str, rev: str | None, *, with_card: bool = False) -> Snapshot:
    """Resolve repo + revision into the file listing clients see (README.md included)."""
    target = repo_get(user, repo_id)
    rev = rev or "main"
    if isinstance(target, BaseModel):
        sha = _base_sha(target)
        if not (rev == "main" or (selectors.HEX_PREFIX.match(rev) and sha.startswith(rev))):
            raise HfError(404, f"Revision '{rev}' does not exist for {repo_id}.", "RevisionNotFound")
        files = {
            f.path: Entry(f.path, f.blob.size, f.blob.sha256, blob=f.blob)
            for f in target.files.select_related("blob")
        }
        snap = Snapshot(repo_id, sha, files, base=target, created_at=target.created_at, refs=["main"])
        if with_card and README in files:
            snap.card_data = _stored_card_data(files[README].blob)
        return snap
    revision = selectors.revision_resolve(target, rev)
    files = {p: Entry(p, b.size, b.sha256, blob=b) for p, b in selectors.revision_files(revision).items()}
    snap = Snapshot(repo_id, revision.sha, files, adapter=target, revision=revision,
                    created_at=revision.created_at, refs=selectors.refs_of(revision))
    if README in files:
        if with_card:
            snap.card_data = _stored_card_data(files[README].blob)
    else:
        data, content = adapter_card(target, revision)
        files[README] = Entry(README, len(content), hashlib.sha256(content).hexdigest(), content=content)
        snap.card_data = data
    return snap


# --- listing shapes ------------------------------------------------------------------


def _pointer_size(entry: Entry) -> int:
    return len(_lfs_pointer(entry))


def _lfs_pointer(entry: Entry) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{entry.sha256}\nsize {entry.size}\n".encode()


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()  # git's object id


def blob_id(entry: Entry) -> str:
    """Every file is listed as an LFS file: its blob id is the git id of its LFS
    pointer, and clients check it by sha256 (no need to read bytes to list)."""
    return _git_blob_id(_lfs_pointer(entry))


def _hf_date(dt) -> str | None:
    if dt is None:
        return None
    return dt.strftime("%Y-%m-%dT%H:%M:%S.") + f"{dt.microsecond // 1000:03d}Z"


def _tree_file(entry: Entry) -> dict:
    return {
        "type": "file", "oid": blob_id(entry), "size": entry.size, "path": entry.path,
        "lfs": {"oid": entry.sha256, "size": entry.size, "pointerSize": _pointer_size(entry)},
    }


def _tree_dir(sha: str, path: str) -> dict:
    oid = hashlib.sha1(f"{sha}:{path}/".encode(), usedforsecurity=False).hexdigest()  # a stable id
    return {"type": "directory", "oid": oid, "size": 0, "path": path}


def tree_entries(snap: Snapshot, path: str, recursive: bool) -> list[dict]:
    prefix = path.strip("/")
    if prefix and prefix in snap.files:
        return [_tree_file(snap.files[prefix])]
    base = prefix + "/" if prefix else ""
    files, dirs = [], set()
    for p in sorted(snap.files):
        if not p.startswith(base):
            continue
        rest = p[len(base):]
        parts = rest.split("/")
        if recursive:
            files.append(_tree_file(snap.files[p]))
            for i in range(1, len(parts)):
                dirs.add(base + "/".join(parts[:i]))
        elif len(parts) == 1:
            files.append(_tree_file(snap.files[p]))
        else:
            dirs.add(base + parts[0])
    if prefix and not files and not dirs:
        raise HfError(404, f"{prefix} does not exist in {snap.repo_id} at {snap.sha}.", "EntryNotFound",
                      headers={"X-Repo-Commit": snap.sha})
    entries = [_tree_dir(snap.sha, d) for d in sorted(dirs)] + files
    return sorted(entries, key=lambda e: e["path"])


def model_info_payload(request, snap: Snapshot, blobs: bool) -> dict:
    siblings = []
    for p in sorted(snap.files):
        e = snap.files[p]
        s = {"rfilename": p}
        if blobs:
            s.update(size=e.size, blobId=blob_id(e),
                     lfs={"size": e.size, "sha256": e.sha256, "pointerSize": _pointer_size(e)})
        siblings.append(s)
    data = {
        "_id": snap.repo_id,
        "id": snap.repo_id,
        "modelId": snap.repo_id,
        "sha": snap.sha,
        "lastModified": _hf_date(snap.created_at),
        "disabled": False,
        "gated": False,
        "likes": 0,
        "cardData": snap.card_data,
        "siblings": siblings,
        "usedStorage": sum(e.size for e in snap.files.values() if e.blob is not None),
        "refs": snap.refs,
    }
    if snap.adapter is not None:
        a, r = snap.adapter, snap.revision
        relation = card.RELATION.get(r.kind, "adapter")
        tags = ["peft", "safetensors", "lora", f"base_model:{r.base_model.slug}",
                f"base_model:{relation}:{r.base_model.slug}"]
        tags += [t for t in sorted(a.tags.values_list("name", flat=True)) if t not in tags]
        data.update(
            author=a.owner, private=a.visibility == "private", downloads=a.downloads,
            createdAt=_hf_date(a.created_at), library_name="peft", tags=tags,
            baseModels={"relation": relation, "models": [{"id": r.base_model.slug}]},
            # what serving systems check before loading (vLLM max rank, LoRAX base)
            adapter={"base_model": r.base_model.slug, "kind": r.kind, "r": r.r, "lora_alpha": r.lora_alpha,
                     "target_modules": r.target_modules, "dtype": r.dtype, "size": r.size},
        )
    else:
        b = snap.base
        cfg = b.config or {}
        archs = cfg.get("architectures") or []
        data.update(
            author=None, private=False, downloads=0, createdAt=_hf_date(b.created_at),
            library_name="transformers", tags=["transformers", "safetensors"] + ([b.family] if b.family else []),
            config={"architectures": archs, "model_type": cfg.get("model_type")},
            status=b.status, successor=b.successor.slug if b.successor_id else None,
        )
        if any(str(x).endswith("ForCausalLM") for x in archs):
            data["pipeline_tag"] = "text-generation"
    return data


# --- downloads -------------------------------------------------------------------------


@hf_route
def model_info(request, repo, rev=None):
    if (bad := _method(request, "GET", "HEAD")) is not None:
        return bad
    snap = snapshot(read_user(request), repo, rev, with_card=True)
    blobs = request.GET.get("blobs", "").lower() in ("1", "true")
    return JsonResponse(model_info_payload(request, snap, blobs))


@hf_route
def tree(request, repo, rev, path=""):
    if (bad := _method(request, "GET", "HEAD")) is not None:
        return bad
    snap = snapshot(read_user(request), repo, rev)
    recursive = request.GET.get("recursive", "").lower() in ("1", "true")
    entries = tree_entries(snap, path or "", recursive)
    try:
        start = int(request.GET.get("cursor") or 0)
    except ValueError:
        raise HfError(400, "Invalid cursor.") from None
    if start < 0:
        raise HfError(400, "Invalid cursor.")
    page = entries[start:start + TREE_PAGE_SIZE]
    resp = JsonResponse(page, safe=False)
    if start + TREE_PAGE_SIZE < len(entries):
        params = {k: v for k, v in request.GET.items() if k != "cursor"}
        params["cursor"] = str(start + TREE_PAGE_SIZE)
        resp["Link"] = f'<{request.build_absolute_uri(request.path)}?{urlencode(params)}>; rel="next"'
    return resp


def _bytes_response(request, content: bytes, path: str, headers: dict) -> HttpResponse:
    size = len(content)
    rng = parse_range(request.headers.get("Range", ""), size) if request.method == "GET" else None
    if rng == "unsatisfiable":
        resp = HttpResponse(status=416)
        resp["Content-Range"] = f"bytes */{size}"
        return resp
    start, end = (0, size - 1) if rng is None else rng
    body = b"" if request.method == "HEAD" else content[start:end + 1]
    resp = HttpResponse(body, status=200 if rng is None else 206, content_type="application/octet-stream")
    resp["Content-Length"] = str(end - start + 1 if size else 0)
    resp["Accept-Ranges"] = "bytes"
    resp["Content-Disposition"] = content_disposition(path, "inline")
    if rng is not None:
        resp["Content-Range"] = f"bytes {start}-{end}/{size}"
    for k, v in headers.items():
        resp[k] = v
    return resp


@hf_route
def resolve(request, repo, rev, path):
    if (bad := _method(request, "GET", "HEAD")) is not None:
        return bad
    snap = snapshot(read_user(request), repo, rev)
    entry = snap.files.get(path)
    if entry is None:
        raise HfError(404, f"{path} does not exist in {repo} at {snap.sha}.", "EntryNotFound",
                      headers={"X-Repo-Commit": snap.sha})
    etag = f'"{entry.sha256}"'
    headers = {"X-Repo-Commit": snap.sha, "ETag": etag, "X-Linked-Etag": etag, "X-Linked-Size": str(entry.size)}
    if entry.content is not None:
        return _bytes_response(request, entry.content, path, headers)
    if snap.adapter is not None:
        services.count_download(snap.adapter, request)
    return blob_response(request, entry.blob, path, headers)


@hf_route
def refs(request, repo):
    if (bad := _method(request, "GET")) is not None:
        return bad
    target = repo_get(read_user(request), repo)
    if isinstance(target, BaseModel):
        branches = [{"name": "main", "ref": "refs/heads/main", "targetCommit": _base_sha(target)}]
    else:
        branches = [
            {"name": r.name, "ref": f"refs/heads/{r.name}", "targetCommit": r.revision.sha}
            for r in target.refs.select_related("revision").order_by("name")
        ]
    return JsonResponse({"branches": branches, "converts": [], "tags": []})


# --- account -------------------------------------------------------------------------------


@hf_route
def whoami(request):
    raw = _bearer(request)
    user = user_for_token(raw) if raw else None
    if user is None:
        raise HfError(401, "Invalid credentials in Authorization header.")
    token = ApiToken.objects.filter(key_hash=ApiToken.hash(raw)).first()
    orgs = [
        {"type": "org", "name": m.org.name, "fullname": m.org.name, "roleInOrg": m.role}
        for m in user.memberships.select_related("org").order_by("org__name")
    ]
    return JsonResponse({
        "type": "user",
        "id": str(user.pk),
        "name": user.username,
        "fullname": user.get_full_name() or user.username,
        "email": user.email or None,
        "isPro": False,
        "orgs": orgs,
        "auth": {"type": "access_token",
                 "accessToken": {"displayName": token.name if token else "", "role": "write"}},
    })


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
