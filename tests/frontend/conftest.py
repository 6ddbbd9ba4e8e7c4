"""Fixtures of the page tests: a small registry built with the ORM (no files
on disk, no torch), so the pages can be checked in milliseconds."""

from __future__ import annotations

import hashlib

import pytest

SHAPES = {
    "model.layers.0.self_attn.q_proj.weight": [64, 64],
    "model.layers.0.self_attn.v_proj.weight": [32, 64],
    "model.layers.0.mlp.up_proj.weight": [128, 64],
}


def blob(content: bytes):
    from hub.registry.models import Blob

    sha = hashlib.sha256(content).hexdigest()
    return Blob.objects.get_or_create(sha256=sha, defaults={"size": len(content), "key": f"sha256/{sha}"})[0]


def make_base(slug, manifest=None, **kw):
    from hub.registry.models import BaseModel

    manifest = manifest if manifest is not None else {k: {"shape": v, "dtype": "F32"} for k, v in SHAPES.items()}
    return BaseModel.objects.create(slug=slug, family="tiny", manifest=manifest, **kw)


def make_adapter(owner, name, base, *, visibility="public", parents=(), kind="upload", tags=(), description="",
                 user=None, metrics=None, targets=("q_proj", "v_proj"), downloads=0, size=100, rev_base=None):
    from hub.registry.models import Adapter, Ref, Tag

    adapter = Adapter.objects.create(owner=owner, name=name, base_model=base, visibility=visibility,
                                     description=description, created_by=user, r=4, lora_alpha=8,
                                     target_modules=list(targets), dtype="F32", size=size, downloads=downloads)
    adapter.tags.set([Tag.objects.get_or_create(name=t)[0] for t in tags])
    rev = add_revision(adapter, kind=kind, parents=parents, metrics=metrics, base=rev_base)
    Ref.objects.create(adapter=adapter, name="main", revision=rev)
    return adapter, rev


def add_revision(adapter, *, kind="upload", parents=(), metrics=None, base=None, files=None):
    from hub.registry.models import Ref, Revision, RevisionFile
    from hub.registry.services import new_commit_sha

    rev = Revision.objects.create(adapter=adapter, sha=new_commit_sha(), kind=kind, base_model=base or adapter.base_model,
                                  metrics=metrics or {}, message=f"{kind} of {adapter.name}", size=100)
    for path, content in (files or {"adapter_config.json": f'{{"name": "{adapter.name}"}}'.encode()}).items():
        RevisionFile.objects.create(revision=rev, path=path, blob=blob(content))
    rev.parents.set(parents)
    if kind != "upload":
        Ref.objects.update_or_create(adapter=adapter, name=kind, defaults={"revision": rev})
    return rev


@pytest.fixture
def world(db, user, other_user):
    """alice's private adapter (its name, tag, card and sha must never reach
    mallory), a public child of it, and mallory's own public adapter."""
    b1 = make_base("tiny-1")
    b2 = make_base("tiny-2")
    b1.status, b1.successor = "deprecated", b2
    b1.save()
    secret, secret_rev = make_adapter("alice", "zebra-secret", b1, visibility="private", tags=["hush-tag"],
                                      description="The quagga card.", user=user)
    child, child_rev = make_adapter("alice", "public-child", b1, kind="merge", parents=[secret_rev], user=user,
                                    tags=["shared"], metrics={"accuracy": 0.75})
    theirs, _ = make_adapter("mallory", "open-one", b1, user=other_user, tags=["shared"], downloads=5)
    return {"b1": b1, "b2": b2, "secret": secret, "secret_rev": secret_rev, "child": child, "child_rev": child_rev,
            "theirs": theirs}


@pytest.fixture
def web(client):
    """Django's test client signed in as a user (None: anonymous)."""
    def sign_in(user=None):
        client.logout()
        if user is not None:
            client.force_login(user)
        return client

    return sign_in
