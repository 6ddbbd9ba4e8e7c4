"""`hubctl diff extract|apply` on full checkpoints: local folders and a base
registered on the hub; a fine-tune's diff moved onto another base version."""

import pytest
import torch
from safetensors.torch import load_file, save_file


def _finetune(base_dir, dest, seed=3):
    """base + a rank-2 update on every attention projection (a known fine-tune)."""
    import shutil

    shutil.copytree(base_dir, dest)
    tensors = load_file(dest / "model.safetensors")
    g = torch.Generator().manual_seed(seed)
    for name, t in tensors.items():
        if "self_attn" in name and name.endswith("proj.weight"):
            b, a = torch.randn(t.shape[0], 2, generator=g), torch.randn(2, t.shape[1], generator=g)
            tensors[name] = t + 0.01 * (b @ a)
    save_file(tensors, dest / "model.safetensors", metadata={"format": "pt"})
    return dest


@pytest.mark.django_db(transaction=True)
def test_extract_from_a_registered_base_and_apply_locally(hub, hubctl, token_for, staff_user, tiny_base,
                                                          tiny_base_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the base cache goes under ~/.cache/hubctl
    ft = _finetune(tiny_base_dir, tmp_path / "ft")
    token = token_for(staff_user)
    r = hubctl("diff", "extract", ft, "tiny-base", "-o", tmp_path / "diff", "--rank", "2", token=token)
    assert r.code == 0, r.err
    assert (tmp_path / "diff" / "adapter_model.safetensors").exists()
    # apply onto the same base gives the fine-tune back (rank 2 captures the rank-2 update)
    r = hubctl("diff", "apply", tmp_path / "diff", tiny_base_dir, "-o", tmp_path / "out", token=token)
    assert r.code == 0, r.err
    got, want = load_file(tmp_path / "out" / "model.safetensors"), load_file(ft / "model.safetensors")
    assert got.keys() == want.keys()
    for k in want:
        assert torch.allclose(got[k], want[k], atol=1e-5), k
    assert (tmp_path / "out" / "config.json").exists()


def test_dense_extract_and_errors(hubctl, tiny_base_dir, tmp_path):
    ft = _finetune(tiny_base_dir, tmp_path / "ft")
    r = hubctl("diff", "extract", ft, tiny_base_dir, "-o", tmp_path / "d", "--dense")
    assert r.code == 0, r.err
    diff = load_file(tmp_path / "d" / "diff.safetensors")
    base, tuned = load_file(tiny_base_dir / "model.safetensors"), load_file(ft / "model.safetensors")
    k = "model.layers.0.self_attn.q_proj.weight"
    assert torch.allclose(diff[k], tuned[k] - base[k], atol=1e-6)
    r = hubctl("diff", "apply", tmp_path / "missing", tiny_base_dir, "-o", tmp_path / "o")
    assert r.code == 1 and "does not exist" in r.err and "Traceback" not in r.err
    r = hubctl("diff", "apply", tmp_path / "d" / "diff.safetensors", tiny_base_dir, "-o", tiny_base_dir)
    assert r.code == 1 and "Traceback" not in r.err
