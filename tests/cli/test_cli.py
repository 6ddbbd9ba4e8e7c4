"""`hubctl` against a live hub: register a base, push a real PEFT adapter,
list, pull byte-identical files (also resuming a partial download), show the
lineage, and fail cleanly (one line, the right exit code, no traceback)."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path

import pytest

live = pytest.mark.django_db(transaction=True)  # the CLI talks to a live server thread

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def tokens(staff_user, user, token_for):
    return {"staff": token_for(staff_user), "alice": token_for(user)}


@pytest.fixture
def adapter_dir(cli_adapter_dir):
    return cli_adapter_dir


@pytest.fixture
def seeds_file(tmp_path):
    p = tmp_path / "seeds.jsonl"
    p.write_text("\n".join(json.dumps({"prompt": f"{i}+{i}=", "completion": str(2 * i)}) for i in range(5)) + "\n")
    return p


@pytest.fixture
def registered(hub, hubctl, tokens, tiny_base_dir):
    r = hubctl("base", "add", "tiny-base", "--weights", tiny_base_dir, token=tokens["staff"])
    assert r.code == 0, r.err
    return r


@pytest.fixture
def pushed(registered, hubctl, tokens, adapter_dir, seeds_file):
    r = hubctl("push", adapter_dir, "--base", "tiny-base", "--name", "alice/skill", "--seeds", seeds_file,
               "--tags", "math,demo", token=tokens["alice"])
    assert r.code == 0, r.err
    return r


def assert_clean_failure(r, code: int, *needles: str):
    assert r.code == code, (r.code, r.out, r.err)
    assert "Traceback" not in r.err and "Traceback" not in r.out
    lines = [ln for ln in r.err.splitlines() if ln.strip()]
    assert len(lines) == 1, r.err
    for needle in needles:
        assert needle in r.err, r.err


@live
def test_base_add_list_show(registered, hubctl, tokens, tiny_base_dir):
    assert "Registered base model tiny-base" in registered.out
    r = hubctl("base", "list", "--json")
    assert r.code == 0
    (base,) = json.loads(r.out)
    assert base["slug"] == "tiny-base"
    assert (base["family"], base["version"]) == ("tiny-base", "")
    local = {p.name: sha256(p) for p in tiny_base_dir.iterdir() if p.is_file()}
    assert {f["path"]: f["sha256"] for f in base["files"]} == local
    r = hubctl("base", "show", "tiny-base")
    assert r.code == 0
    assert "LlamaForCausalLM" in r.out and "model.safetensors" in r.out


@live
def test_push_adapters_pull_identical_lineage(pushed, hubctl, tokens, adapter_dir, tmp_path):
    assert "Pushed alice/skill on tiny-base: revision" in pushed.out
    sha = pushed.out.split("revision ")[1].split()[0]
    assert len(sha) == 40

    r = hubctl("adapters", "--json", token=tokens["alice"])
    assert r.code == 0
    (item,) = json.loads(r.out)
    assert (item["id"], item["base_model"], item["r"], item["has_seeds"]) == ("alice/skill", "tiny-base", 4, True)
    assert sorted(item["tags"]) == ["demo", "math"] and item["refs"] == {"main": sha}
    r = hubctl("adapters", "--base", "tiny-base")
    assert r.code == 0 and "alice/skill" in r.out
    r = hubctl("adapters", "--tag", "nothing-has-this")
    assert r.code == 0 and "alice/skill" not in r.out

    out = tmp_path / "pulled"
    r = hubctl("pull", "alice/skill", "-o", out)
    assert r.code == 0, r.err
    local = {p.name: sha256(p) for p in adapter_dir.iterdir() if p.is_file()}
    pulled = {p.name: sha256(p) for p in out.iterdir()}
    assert pulled == local  # README.md too: every file of the folder went up and came back
    assert set(ADAPTER_FILES) <= set(pulled)

    # By commit prefix, and a second pull keeps what is already there.
    r = hubctl("pull", "alice/skill", "--revision", sha[:10], "-o", out)
    assert r.code == 0 and "already present" in r.out

    r = hubctl("lineage", "alice/skill")
    assert r.code == 0
    assert f"alice/skill@{sha[:8]} upload [main] on tiny-base" in r.out
    r = hubctl("lineage", "alice/skill", "--json")
    graph = json.loads(r.out)
    assert [n["id"] for n in graph["nodes"]] == [sha] and graph["edges"] == []

    r = hubctl("revisions", "alice/skill")
    assert r.code == 0 and sha[:12] in r.out and "upload" in r.out


@live
def test_pull_resumes_and_repairs_partial_files(pushed, hubctl, adapter_dir, tmp_path, monkeypatch):
    import httpx

    seen = []  # (path, Range header, status) of each download

    class Recording(httpx.Client):
        def send(self, request, **kwargs):
            response = super().send(request, **kwargs)
            if "/files/" in request.url.path:
                seen.append((request.url.path.rsplit("/", 1)[1], request.headers.get("range"), response.status_code))
            return response

    monkeypatch.setattr("hub.cli.client.httpx.Client", Recording)
    out = tmp_path / "resume"
    out.mkdir()
    weights = (adapter_dir / "adapter_model.safetensors").read_bytes()
    config = (adapter_dir / "adapter_config.json").read_bytes()
    # A correct prefix (resumed with Range) and a damaged one (re-downloaded whole).
    (out / "adapter_model.safetensors.incomplete").write_bytes(weights[: len(weights) // 3])
    (out / "adapter_config.json.incomplete").write_bytes(b"X" * (len(config) // 2))
    r = hubctl("pull", "alice/skill", "-o", out)
    assert r.code == 0, r.err
    assert (out / "adapter_model.safetensors").read_bytes() == weights
    assert (out / "adapter_config.json").read_bytes() == config
    assert not list(out.glob("*.incomplete"))
    third = len(weights) // 3
    assert ("adapter_model.safetensors", f"bytes={third}-", 206) in seen
    # The damaged prefix was asked for its tail first, failed the sha256 check, then came whole.
    assert [s for s in seen if s[0] == "adapter_config.json"] == [
        ("adapter_config.json", f"bytes={len(config) // 2}-", 206), ("adapter_config.json", None, 200)]


@live
def test_push_with_card_and_private(registered, hubctl, tokens, adapter_dir, tmp_path, client_for, user):
    card = tmp_path / "CARD.md"
    card.write_text("# Secret skill\n\nDoes things.\n")
    r = hubctl("push", adapter_dir, "--base", "tiny-base", "--name", "alice/secret", "--private", "--card", card,
               token=tokens["alice"])
    assert r.code == 0, r.err
    detail = client_for(user).get("/api/v1/adapters/alice/secret/").json()
    assert detail["visibility"] == "private" and detail["description"] == card.read_text().strip()
    # Anonymous callers do not see it; the owner pulls the card as README.md.
    assert_clean_failure(hubctl("pull", "alice/secret", "-o", tmp_path / "anon"), 1, "does not exist or is not visible")
    r = hubctl("pull", "alice/secret", "-o", tmp_path / "mine", token=tokens["alice"])
    assert r.code == 0
    assert (tmp_path / "mine" / "README.md").read_text() == card.read_text()


@live
def test_base_deprecate(registered, hubctl, tokens, tiny_base_dir):
    r = hubctl("base", "add", "tiny-base-2", "--weights", tiny_base_dir, "--family", "tiny", "--version", "2",
               token=tokens["staff"])
    assert r.code == 0, r.err
    r = hubctl("base", "deprecate", "tiny-base", "--successor", "tiny-base-2", "--at", "2031-01-02",
               token=tokens["staff"])
    assert r.code == 0, r.err
    assert "tiny-base is deprecated in favour of tiny-base-2 (deprecate_at 2031-01-02 00:00)" in r.out
    base = json.loads(hubctl("base", "show", "tiny-base", "--json").out)
    assert (base["status"], base["successor"]) == ("deprecated", "tiny-base-2")
    # Only staff may deprecate; a bad date never reaches the server.
    assert_clean_failure(hubctl("base", "deprecate", "tiny-base-2", "--successor", "tiny-base", token=tokens["alice"]),
                         1, "Only staff may deprecate")
    assert_clean_failure(hubctl("base", "deprecate", "tiny-base", "--successor", "tiny-base-2", "--at", "soon",
                                token=tokens["staff"]), 1, "--at takes a date")


@live
def test_login_stores_token_and_whoami(hub, hubctl, tokens, monkeypatch, tmp_path):
    r = hubctl("login", "--token", tokens["alice"])
    assert r.code == 0 and "as alice" in r.out
    path = Path(os.environ["HUBCTL_CONFIG"])
    assert path.read_text().strip() == tokens["alice"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    r = hubctl("whoami")  # no HUB_TOKEN: the stored token is used
    assert r.code == 0 and r.out.startswith("alice on ")
    # A bad token is refused and does not replace the stored one.
    assert_clean_failure(hubctl("login", "--token", "hub_wrong"), 1, "refused the token")
    assert path.read_text().strip() == tokens["alice"]


@live
def test_login_with_expires_stores_a_new_expiring_token(hub, hubctl, tokens, user):
    from datetime import timedelta

    from django.utils import timezone

    from hub.registry.models import ApiToken

    r = hubctl("login", "--token", tokens["alice"], "--expires", "30d")
    assert r.code == 0 and "expires at" in r.out, r.err
    stored = Path(os.environ["HUBCTL_CONFIG"]).read_text().strip()
    assert stored != tokens["alice"]
    minted = ApiToken.objects.get(key_hash=ApiToken.hash(stored))
    assert minted.user == user and abs(minted.expires_at - (timezone.now() + timedelta(days=30))) < timedelta(minutes=2)
    assert hubctl("whoami").code == 0
    assert_clean_failure(hubctl("login", "--token", tokens["alice"], "--expires", "soon"), 1, "30d")
    assert Path(os.environ["HUBCTL_CONFIG"]).read_text().strip() == stored  # a refused login stores nothing


@live
def test_login_reads_the_token_from_stdin(hub, hubctl, tokens, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO(tokens["alice"] + "\n"))
    r = hubctl("login")
    assert r.code == 0 and "as alice" in r.out


@live
def test_push_errors_are_one_line(pushed, hubctl, tokens, adapter_dir, tmp_path):
    base = {"dir": adapter_dir, "base": "tiny-base", "name": "alice/other", "token": tokens["alice"]}
    cases = [  # (what changes, exit code, the message)
        ({"base": "nope"}, 1, "Base model 'nope' is not registered."),
        ({"name": "alice/skill"}, 1, "alice/skill already exists"),
        ({"token": "hub_not-a-real-token"}, 1, "The hub refused the token: Invalid, expired or revoked token."),
        ({"token": None}, 1, "needs a token"),
        ({"dir": tmp_path}, 1, "is not a PEFT adapter folder: adapter_config.json and adapter_model.safetensors missing"),
        ({"name": "no-slash"}, 1, "Name adapters as owner/name"),
        ({"name": "bob/x"}, 1, "You may not write in the namespace 'bob'."),
    ]
    for change, code, message in cases:
        a = {**base, **change}
        r = hubctl("push", a["dir"], "--base", a["base"], "--name", a["name"], token=a["token"])
        assert_clean_failure(r, code, message)


@live
def test_duplicate_push_refused_by_the_server_too(pushed, hubctl, tokens, adapter_dir, monkeypatch):
    # Skip the client's pre-check: the server's 409 maps to the same one-line error.
    monkeypatch.setattr("hub.cli.adapters.exists", lambda c, path: False)
    r = hubctl("push", adapter_dir, "--base", "tiny-base", "--name", "alice/skill", token=tokens["alice"])
    assert_clean_failure(r, 1, "alice/skill already exists")


@live
def test_other_errors(pushed, hubctl, tokens, tmp_path):
    assert_clean_failure(hubctl("pull", "alice/missing", "-o", tmp_path), 1, "does not exist or is not visible")
    assert_clean_failure(hubctl("pull", "alice/skill", "--revision", "nope", "-o", tmp_path), 1,
                         "Revision 'nope' does not exist for alice/skill (refs: main).")
    assert_clean_failure(hubctl("base", "show", "nope"), 1, "Base model 'nope' is not registered.")
    assert_clean_failure(hubctl("base", "add", "x", "--weights", tmp_path, token=tokens["staff"]), 1,
                         "has no .safetensors file")
    assert_clean_failure(hubctl("adapters", token="hub_bad"), 1, "refused the token")
    assert_clean_failure(hubctl("whoami"), 1, "needs a token")
    assert_clean_failure(hubctl("merge", "alice/skill", "--method", "ties", "--name", "alice/m"), 1,
                         "merge takes 2 to 16 adapters")
    r = hubctl("push")  # a usage error is a user error too
    assert r.code == 1 and "required" in r.err and "Traceback" not in r.err


@live
def test_merge_distill_needs_seeds_on_every_input(pushed, hubctl, tokens, adapter_dir):
    r = hubctl("push", adapter_dir, "--base", "tiny-base", "--name", "alice/plain", token=tokens["alice"])
    assert r.code == 0, r.err
    assert_clean_failure(hubctl("merge", "alice/skill", "alice/plain", "--method", "distill", "--steps", "10",
                                "--name", "alice/m", token=tokens["alice"]), 1, "alice/plain has no seed examples")
    assert_clean_failure(hubctl("merge", "alice/skill", "alice/plain", "--method", "distill", "--weights", "1,1",
                                "--name", "alice/m", token=tokens["alice"]), 1, "takes no weights")


@pytest.mark.parametrize("argv", [
    ["adapters"], ["base", "list"], ["pull", "alice/skill", "-o", "unused"], ["whoami"], ["jobs"],
    ["compress", "alice/skill"],
])
def test_unreachable_server_exits_2(argv, hubctl, monkeypatch):
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HUB_URL", f"http://127.0.0.1:{port}")
    r = hubctl(*argv, token="hub_whatever")
    assert_clean_failure(r, 2, f"Cannot reach the hub at http://127.0.0.1:{port}", "Connection refused")


@live
def test_pull_compressed_decodes_the_compeft_revision(pushed, hubctl, tokens, adapter_dir, tmp_path, user):
    """A compeft revision (made here as a worker would) comes back as a plain PEFT folder."""
    compeft = pytest.importorskip("adapters_ops.compeft")
    import torch
    from django.db import transaction

    from adapters_ops.adapter import Adapter as Lora
    from hub.registry import services
    from hub.registry.models import Adapter
    from hub.storage import blob_batch

    r = hubctl("pull", "alice/skill", "--compressed", "-o", tmp_path / "none")
    assert_clean_failure(r, 1, "Revision 'compeft' does not exist for alice/skill (refs: main).")

    packed = compeft.compress(Lora.load(adapter_dir), density=0.25).save(tmp_path / "packed")
    adapter = Adapter.objects.get(owner="alice", name="skill")
    main = adapter.revisions.get()
    with blob_batch() as batch, transaction.atomic(), open(packed, "rb") as f1, \
            open(adapter_dir / "adapter_config.json", "rb") as f2:
        rev = services.revision_create(
            adapter=adapter, kind="compeft", user=user, parents=[main], params={"density": 0.25},
            files={compeft.FILE_NAME: batch.put(f1), "adapter_config.json": batch.put(f2)},
        )

    out = tmp_path / "decoded"
    r = hubctl("pull", "alice/skill", "--compressed", "-o", out, token=tokens["alice"])
    assert r.code == 0, r.err
    assert f"alice/skill@{rev.sha[:12]} (compeft" in r.out
    expected = compeft.load(packed).decompress()
    got = Lora.load(out)
    assert set(got.tensors) == set(expected.tensors)
    for name, t in expected.tensors.items():
        assert torch.equal(got.tensors[name], t), name
    assert not list(out.glob(".hubctl-*")) and not (out / compeft.FILE_NAME).exists()

    graph = json.loads(hubctl("lineage", "alice/skill", "--json").out)
    assert graph["edges"] == [{"parent": main.sha, "child": rev.sha}]
    tree = hubctl("lineage", "alice/skill").out
    assert tree.index(f"@{main.sha[:8]} upload") < tree.index(f"@{rev.sha[:8]} compeft [compeft]")


def test_push_a_qa_lora_repository_adapter_needs_its_group_size(registered, hubctl, tokens, adapter_dir, tmp_path):
    """A QA-LoRA trained with the qa-lora repository has a plain LoRA config and lora_A with in/G columns:
    refused until declared, accepted with --qalora-group-size, and the declaration travels in the config."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "qa"
    folder.mkdir()
    (folder / "adapter_config.json").write_bytes((adapter_dir / "adapter_config.json").read_bytes())
    tensors = load_file(adapter_dir / "adapter_model.safetensors")
    group = 16
    pooled = {k: t.reshape(t.shape[0], -1, group).mean(-1) if ".lora_A." in k else t for k, t in tensors.items()}
    save_file({k: v.contiguous() for k, v in pooled.items()}, folder / "adapter_model.safetensors")
    assert any(t.shape[1] == 64 // group for k, t in pooled.items() if ".lora_A." in k)

    refused = hubctl("push", folder, "--base", "tiny-base", "--name", "alice/qa", token=tokens["alice"])
    assert_clean_failure(refused, 1, "qalora_group_size")
    r = hubctl("push", folder, "--base", "tiny-base", "--name", "alice/qa", "--qalora-group-size", "8",
               token=tokens["alice"])
    assert_clean_failure(r, 1, "group size 16")  # a wrong declaration names the real one
    r = hubctl("push", folder, "--base", "tiny-base", "--name", "alice/qa", "--qalora-group-size", group,
               token=tokens["alice"])
    assert r.code == 0, r.err
    out = tmp_path / "pulled"
    assert hubctl("pull", "alice/qa", "-o", out, token=tokens["alice"]).code == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert (config["qalora_group_size"], config["qalora_pooling"], config["use_qalora"]) == (group, "mean", False)
    assert json.loads((folder / "adapter_config.json").read_text()).get("qalora_pooling") is None  # local untouched
    assert_clean_failure(hubctl("push", folder, "--base", "tiny-base", "--name", "alice/qa2", "--qalora-group-size",
                                "0", token=tokens["alice"]), 1, "positive whole number")
