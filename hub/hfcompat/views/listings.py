"""Listings: `model_info`, the paged `tree` and `refs`, in the shapes the HF clients parse."""

from __future__ import annotations

import hashlib
from urllib.parse import urlencode

from django.http import JsonResponse

from hub.registry.models import BaseModel

from .. import card
from .auth import _method, read_user
from .errors import HfError, hf_route
from .snapshots import Entry, Snapshot, _base_sha, repo_get, snapshot

TREE_PAGE_SIZE = 1000  # the Hub's page size for /tree without expand


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



# --- routes -------------------------------------------------------------------------------


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

