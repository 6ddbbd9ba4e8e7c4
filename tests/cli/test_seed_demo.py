"""`manage.py seed_demo ZOO_DIR` on a small zoo laid out like `adapters_ops.zoo`
builds it (the real build is too slow here): bases, the 3.0 -> 3.1
deprecation, demo/<skill> adapters with seeds and a card; run twice, no change."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from datetime import timedelta

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from hub.registry.models import Adapter, BaseModel, Org, Revision
from hub.storage import open_blob


@pytest.fixture
def zoo(tmp_path, tiny_base_dir, cli_adapter_dir):
    root = tmp_path / "zoo"
    for slug in ("tiny-llama-3.0", "tiny-llama-3.1"):
        shutil.copytree(tiny_base_dir, root / "bases" / slug)
    lora = cli_adapter_dir
    for skill in ("arith", "reverse"):
        shutil.copytree(lora, root / "adapters" / skill)
    (root / "tasks" / "arith").mkdir(parents=True)
    rows = [{"prompt": f"{i}+1=", "completion": str(i + 1)} for i in range(3)]
    (root / "tasks" / "arith" / "seed.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (root / "manifest.json").write_text(json.dumps({  # the parts of adapters_ops.zoo's manifest it reads
        "bases": [{"slug": "tiny-llama-3.1", "family": "tiny-llama", "version": "3.1.0"}],
        "skills": [{"name": "arith", "description": "add one to a number"}],
        "adapters": [{"skill": "arith", "base": "tiny-llama-3.0"}, {"skill": "reverse", "base": "tiny-llama-3.0"}],
    }))
    return root


def seed(zoo) -> str:
    buf = io.StringIO()
    call_command("seed_demo", str(zoo), stdout=buf)
    return buf.getvalue()


@pytest.mark.django_db
def test_seed_demo_registers_the_zoo_once(zoo, tiny_base_dir):
    out = seed(zoo)
    assert "base tiny-llama-3.0: registered" in out and "adapter demo/arith: uploaded" in out

    old, new = BaseModel.objects.get(slug="tiny-llama-3.0"), BaseModel.objects.get(slug="tiny-llama-3.1")
    assert (old.family, old.version, new.version) == ("tiny-llama", "3.0", "3.1.0")  # guessed / from the manifest
    assert (old.status, old.successor, new.status) == ("deprecated", new, "active")
    due = timezone.now() + timedelta(days=30)
    assert abs((old.deprecate_at - due).total_seconds()) < 60
    assert set(old.manifest) == set(new.manifest) and old.manifest

    arith = Adapter.objects.get(owner="demo", name="arith")
    assert arith.base_model == old and arith.visibility == "public" and arith.r == 4
    assert sorted(arith.tags.values_list("name", flat=True)) == ["arith", "demo"]
    with open_blob(arith.seeds) as f:
        assert f.read() == (zoo / "tasks" / "arith" / "seed.jsonl").read_bytes()
    card = arith.description
    assert card.startswith("# demo/arith\n") and "The task: add one to a number." in card and "rank r=4" in card
    assert "3 prompt/completion pairs" in card and "0+1=1" in card
    rev = arith.revisions.get()
    local = {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
             for p in (zoo / "adapters" / "arith").iterdir() if p.name != "README.md"}
    assert {rf.path: rf.blob.sha256 for rf in rev.files.select_related("blob")} == local
    assert (rev.kind, list(rev.refs.values_list("name", flat=True))) == ("upload", ["main"])

    reverse = Adapter.objects.get(owner="demo", name="reverse")
    assert reverse.seeds is None and "seed examples" not in reverse.description
    assert Org.objects.get(name="demo").members.filter(username="admin", is_staff=True).exists()

    counts = (BaseModel.objects.count(), Adapter.objects.count(), Revision.objects.count())
    again = seed(zoo)
    assert "adapter demo/arith: present" in again and "already deprecated" in again
    assert (BaseModel.objects.count(), Adapter.objects.count(), Revision.objects.count()) == counts == (2, 2, 2)
    assert BaseModel.objects.get(slug="tiny-llama-3.0").deprecate_at == old.deprecate_at


@pytest.mark.django_db
def test_seed_demo_refuses_a_folder_without_bases(tmp_path):
    with pytest.raises(CommandError, match="has no bases/ folder"):
        call_command("seed_demo", str(tmp_path), stdout=io.StringIO())
