"""The real, unmodified `huggingface_hub` and `peft` clients against a live hub.

Each test runs client code in a fresh interpreter with HF_ENDPOINT pointing at
pytest-django's live server (see conftest.hf_client)."""

from __future__ import annotations

import hashlib
import json

import pytest

pytestmark = pytest.mark.django_db(transaction=True)


def sha256_of(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_huggingface_hub_downloads(hf_client, published, peft_dir, tiny_base_dir, tiny_base):
    """snapshot_download, hf_hub_download, model_info, list_repo_files, a
    pinned commit, file_exists, the three error classes, a resumed download,
    and a base model by its slug."""
    out = hf_client(
        """
        import hashlib, json, os
        from pathlib import Path
        import huggingface_hub as hh
        from huggingface_hub import HfApi, constants, errors, hf_hub_url
        from huggingface_hub.file_download import http_get

        sha = lambda p: hashlib.sha256(Path(p).read_bytes()).hexdigest()
        api = HfApi()
        res = {"endpoint": constants.ENDPOINT}
        snap = hh.snapshot_download("alice/x")
        res["snapshot"] = {p.name: sha(p) for p in Path(snap).iterdir()}
        res["snapshot_dir"] = Path(snap).name
        info = api.model_info("alice/x", files_metadata=True)
        res["info"] = {"id": info.id, "sha": info.sha, "private": info.private, "library": info.library_name,
                       "siblings": sorted(s.rfilename for s in info.siblings),
                       "sizes": {s.rfilename: s.size for s in info.siblings},
                       "lfs": {s.rfilename: s.lfs.sha256 for s in info.siblings},
                       "card_base": info.card_data.base_model, "tags": info.tags}
        res["files"] = sorted(api.list_repo_files("alice/x"))
        pinned = hh.hf_hub_download("alice/x", "adapter_model.safetensors", revision=info.sha)
        res["pinned"] = sha(pinned)
        res["pinned_in_snapshot"] = info.sha in pinned
        res["one"] = sha(hh.hf_hub_download("alice/x", "adapter_config.json"))
        res["exists"] = [hh.file_exists("alice/x", "adapter_config.json"), hh.file_exists("alice/x", "nope.bin")]
        errs = {}
        for key, call in {
            "repo": lambda: hh.hf_hub_download("alice/missing", "adapter_config.json"),
            "revision": lambda: hh.hf_hub_download("alice/x", "adapter_config.json", revision="nobranch"),
            "quoted_revision": lambda: api.model_info("alice/x", revision="refs/pr/1"),
            "entry": lambda: hh.hf_hub_download("alice/x", "missing.safetensors"),
            "base_repo": lambda: api.model_info("no-such-base"),
        }.items():
            try:
                call()
                errs[key] = None
            except Exception as exc:
                errs[key] = type(exc).__name__
        res["errors"] = errs
        # Resume: a partial file holding N *wrong* bytes. Honouring Range (206)
        # keeps them and appends the tail; a 200 would make the client restart.
        url = hf_hub_url("alice/x", "adapter_model.safetensors", revision=info.sha)
        part = Path(os.environ["HF_HOME"]) / "part.bin"
        with open(part, "wb") as f:
            f.write(b"\\0" * 1000)
            http_get(url, f, resume_size=1000, expected_size=res["info"]["sizes"]["adapter_model.safetensors"])
        res["resumed"] = sha(part)
        base = hh.snapshot_download("tiny-base")
        res["base"] = {p.name: sha(p) for p in Path(base).iterdir()}
        res["base_sha"] = api.model_info("tiny-base").sha
        print(json.dumps(res))
        """
    )
    local = {p.name: sha256_of(p) for p in peft_dir.iterdir() if p.name != "README.md"}
    assert out["endpoint"].startswith("http://localhost")
    assert {k: v for k, v in out["snapshot"].items() if k != "README.md"} == local
    assert set(out["snapshot"]) == {"README.md", "adapter_config.json", "adapter_model.safetensors"}
    assert out["snapshot_dir"] == published.sha
    info = out["info"]
    assert info["id"] == "alice/x" and info["sha"] == published.sha and info["private"] is False
    assert info["library"] == "peft" and info["card_base"] == "tiny-base"
    assert info["siblings"] == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert info["sizes"]["adapter_model.safetensors"] == (peft_dir / "adapter_model.safetensors").stat().st_size
    assert info["lfs"]["adapter_model.safetensors"] == local["adapter_model.safetensors"]
    assert "demo" in info["tags"]
    assert out["files"] == info["siblings"]
    assert out["pinned"] == local["adapter_model.safetensors"] and out["pinned_in_snapshot"]
    assert out["one"] == local["adapter_config.json"]
    assert out["exists"] == [True, False]
    assert out["errors"] == {
        "repo": "RepositoryNotFoundError",
        "revision": "RevisionNotFoundError",
        "quoted_revision": "RevisionNotFoundError",
        "entry": "RemoteEntryNotFoundError",
        "base_repo": "RepositoryNotFoundError",
    }
    weights = (peft_dir / "adapter_model.safetensors").read_bytes()
    assert out["resumed"] == hashlib.sha256(b"\0" * 1000 + weights[1000:]).hexdigest()
    assert out["base"] == {p.name: sha256_of(p) for p in tiny_base_dir.iterdir() if p.is_file()}
    assert out["base_sha"] == tiny_base.sha


def test_peft_and_transformers_load_from_hub(hf_client, published, peft_dir, tiny_base_dir, user, token_for):
    """PeftModel.from_pretrained(base, "alice/x") gives the same logits as the
    local adapter folder; AutoModelForCausalLM loads the base from the hub."""
    from hub.registry.models import Adapter

    Adapter.objects.filter(pk=published.adapter_id).update(visibility="private")  # and with a token
    out = hf_client(
        f"""
        import json, torch
        from huggingface_hub import snapshot_download
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        torch.manual_seed(0)
        ids = torch.randint(0, 64, (2, 7))
        local_base = r"{tiny_base_dir}"
        with torch.no_grad():
            hub_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(local_base), "alice/x").eval()
            ref_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(local_base),
                                                  r"{peft_dir}").eval()
            plain = AutoModelForCausalLM.from_pretrained(local_base).eval()
            hub_base = AutoModelForCausalLM.from_pretrained(snapshot_download("tiny-base")).eval()
            a, b = hub_model(ids).logits, ref_model(ids).logits
            c, d = plain(ids).logits, hub_base(ids).logits
        print(json.dumps({{"same": torch.equal(a, b), "adapter_changes_output": not torch.equal(a, c),
                          "base_same": torch.equal(c, d)}}))
        """,
        token=token_for(user),
    )
    assert out == {"same": True, "adapter_changes_output": True, "base_same": True}
    assert Adapter.objects.get(pk=published.adapter_id).downloads >= 2  # config + weights


def test_create_repo_and_upload_folder(hf_client, user, token_for, tiny_base, peft_dir, make_peft_adapter):
    """create_repo + upload_folder push a PEFT folder as a validated revision;
    a second upload_folder (the legacy create_commit path: no Xet) adds a
    revision whose parent is the first."""
    from hub.registry.models import Adapter

    second_dir = make_peft_adapter("hf-lora-2", r=4, seed=2)
    token = token_for(user)
    code = """
        import json, sys
        from huggingface_hub import HfApi
        api = HfApi()
        res = {{"who": api.whoami()["name"]}}
        url = api.create_repo("alice/pushed", private={private}, exist_ok={exist_ok})
        res["url"] = str(url)
        res["repo_id"] = url.repo_id
        info = api.upload_folder(folder_path=r"{folder}", repo_id="alice/pushed", commit_message="{msg}")
        res["oid"] = info.oid
        res["again"] = str(api.create_repo("alice/pushed", exist_ok=True))
        res["remote"] = sorted(api.list_repo_files("alice/pushed"))
        print(json.dumps(res))
    """
    first = hf_client(code.format(private=True, exist_ok=False, folder=peft_dir, msg="first push"), token=token)
    assert first["who"] == "alice" and first["repo_id"] == "alice/pushed"
    assert first["url"].endswith("/alice/pushed")
    adapter = Adapter.objects.get(owner="alice", name="pushed")
    assert adapter.base_model.slug == "tiny-base"  # from adapter_config (PEFT's card names a temp path)
    assert adapter.visibility == "private" and adapter.r == 4
    rev1 = adapter.revisions.get()
    assert rev1.sha == first["oid"] and rev1.message == "first push" and rev1.kind == "upload"
    assert first["remote"] == ["README.md", "adapter_config.json", "adapter_model.safetensors"]
    assert "lora" in list(adapter.tags.values_list("name", flat=True))  # plain tags of the uploaded card
    hidden = hf_client(
        """
        import json
        import huggingface_hub as hh
        out = {}
        for key, call in {"info": lambda: hh.HfApi().model_info("alice/pushed"),
                          "file": lambda: hh.hf_hub_download("alice/pushed", "adapter_config.json"),
                          "exists": lambda: hh.file_exists("alice/pushed", "adapter_config.json")}.items():
            try:
                out[key] = repr(call())[:40]
            except Exception as exc:
                out[key] = type(exc).__name__
        print(json.dumps(out))
        """
    )  # no token: a private repo does not exist
    assert hidden == {"info": "RepositoryNotFoundError", "file": "RepositoryNotFoundError", "exists": "False"}

    second = hf_client(code.format(private=True, exist_ok=True, folder=second_dir, msg="second push"), token=token,
                       HF_HUB_DISABLE_XET="1")
    rev2 = adapter.revisions.get(sha=second["oid"])
    assert [p.sha for p in rev2.parents.all()] == [rev1.sha]
    assert adapter.refs.get(name="main").revision_id == rev2.id
    stored = {rf.path: rf.blob.sha256 for rf in rev2.files.select_related("blob")}
    assert stored["adapter_model.safetensors"] == sha256_of(second_dir / "adapter_model.safetensors")
    assert stored["adapter_model.safetensors"] != sha256_of(peft_dir / "adapter_model.safetensors")


def test_upload_folder_of_wrong_shape_adapter_fails_and_stores_nothing(
    hf_client, user, token_for, tiny_base, peft_dir, tmp_path
):
    import shutil

    from safetensors.numpy import load_file, save_file

    from hub.registry.models import Adapter, Blob

    bad = tmp_path / "bad"
    shutil.copytree(peft_dir, bad)
    tensors = load_file(bad / "adapter_model.safetensors")
    key = next(k for k in sorted(tensors) if k.endswith("lora_A.weight"))
    tensors[key] = tensors[key][:, :32].copy()  # in_features 32 on a base whose q_proj takes 64
    save_file(tensors, bad / "adapter_model.safetensors")
    blobs_before = Blob.objects.count()
    out = hf_client(
        f"""
        import json
        from huggingface_hub import HfApi
        api = HfApi()
        api.create_repo("alice/bad")
        try:
            api.upload_folder(folder_path=r"{bad}", repo_id="alice/bad")
            print(json.dumps({{"error": None}}))
        except Exception as exc:
            print(json.dumps({{"error": type(exc).__name__, "message": str(exc),
                              "status": getattr(getattr(exc, "response", None), "status_code", None)}}))
        """,
        token=token_for(user),
    )
    assert out["error"] == "BadRequestError" and out["status"] == 400
    module = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
    assert f"{module}: lora_A has shape [4, 32]" in out["message"] and "needs [4, 64]" in out["message"]
    assert not Adapter.objects.filter(name="bad").exists()
    assert Blob.objects.count() == blobs_before


def test_upload_with_unknown_base_names_the_registered_ones(hf_client, user, token_for, tiny_base, peft_dir, tmp_path):
    import shutil

    folder = tmp_path / "other-base"
    shutil.copytree(peft_dir, folder)
    (folder / "README.md").unlink()
    conf = json.loads((folder / "adapter_config.json").read_text())
    conf["base_model_name_or_path"] = "meta-llama/Llama-3.1-8B"
    (folder / "adapter_config.json").write_text(json.dumps(conf))
    out = hf_client(
        f"""
        import json
        from huggingface_hub import HfApi
        try:
            HfApi().upload_folder(folder_path=r"{folder}", repo_id="alice/unknown-base")
            print(json.dumps({{"error": None}}))
        except Exception as exc:
            print(json.dumps({{"error": type(exc).__name__, "message": str(exc)}}))
        """,
        token=token_for(user),
    )
    assert out["error"] == "BadRequestError"
    assert "meta-llama/Llama-3.1-8B" in out["message"] and "tiny-base" in out["message"]


def test_repo_management_calls(hf_client, published, user, token_for):
    """upload_file (a card), list_repo_refs, update_repo_settings, delete_repo."""
    from hub.registry.models import Adapter

    out = hf_client(
        """
        import json
        from huggingface_hub import HfApi
        api = HfApi()
        res = {"refs": [(b.name, b.target_commit) for b in api.list_repo_refs("alice/x").branches]}
        card = b"---\\nbase_model: tiny-base\\ntags: [chat]\\n---\\n# Card\\n"
        res["oid"] = api.upload_file(path_or_fileobj=card, path_in_repo="README.md", repo_id="alice/x").oid
        api.update_repo_settings("alice/x", private=True)
        res["private"] = api.model_info("alice/x").private
        api.delete_repo("alice/x")
        print(json.dumps(res))
        """,
        token=token_for(user),
    )
    assert out["refs"] == [["main", published.sha]]
    assert len(out["oid"]) == 40 and out["oid"] != published.sha  # the card commit made a new revision
    assert out["private"] is True
    assert not Adapter.objects.filter(owner="alice", name="x").exists()
