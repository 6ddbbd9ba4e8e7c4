"""ComPEFT as a library: entry points take an Adapter or a PEFT folder; keep="paper" is the
paper's top-k rule (ties with the threshold kept), keep="exact" keeps exactly round(density * n)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from adapters_ops import compeft
from adapters_ops.adapter import Adapter
from adapters_ops.errors import AdapterError

SHAPES = [("self_attn.q_proj", 32, 32), ("self_attn.v_proj", 32, 8), ("mlp.down_proj", 48, 32)]


def tied_adapter(dtype=torch.bfloat16, seed=0, step=0.25, layers=2, rank=4) -> Adapter:
    """Values on a coarse grid (multiples of `step` of a unit), so that many magnitudes tie."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(layers):
        for mod, fin, fout in SHAPES:
            p = f"base_model.model.model.layers.{layer}.{mod}"
            a = torch.round(torch.randn(rank, fin, generator=g) / step) * step / math.sqrt(fin)
            b = torch.round(torch.randn(fout, rank, generator=g) / step) * step * 0.02
            tensors[f"{p}.lora_A.weight"] = a.to(dtype)
            tensors[f"{p}.lora_B.weight"] = b.to(dtype)
    cfg = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": ["q_proj", "v_proj", "down_proj"]}
    return Adapter(config=cfg, tensors=tensors)


def paper_mask(flat: torch.Tensor, density: float) -> torch.Tensor:
    """The paper's rule, written from its description: with n entries, t = the (n - int(n * density))-th
    smallest magnitude (= the (int(n * density) + 1)-th largest), keep every entry with |x| >= t."""
    n = flat.numel()
    t = flat.abs().kthvalue(n - int(n * density)).values
    return flat.abs() >= t


def kept_mask(comp: compeft.CompressedAdapter, names) -> torch.Tensor:
    dec = comp.decompress()
    return torch.cat([dec.tensors[n].reshape(-1) for n in names]) != 0


def flat_of(adapter: Adapter, names) -> torch.Tensor:
    return torch.cat([adapter.tensors[n].reshape(-1) for n in names])


# --- an Adapter or a folder ------------------------------------------------------------------


@pytest.mark.parametrize("as_path", [str, Path])
def test_compress_accepts_a_peft_folder(tmp_path, as_path):
    ad = tied_adapter(dtype=torch.float32, step=0.01)
    ad.save(tmp_path / "lora")
    from_dir = compeft.compress(as_path(tmp_path / "lora"), density=0.1)
    assert from_dir.to_bytes() == compeft.compress(ad, density=0.1).to_bytes()
    choice = compeft.choose_scale(as_path(tmp_path / "lora"), 0.1, lambda a: 0.0, candidates=(1.0, 2.0))
    assert choice.replace_factor == 1.0 and choice.compressed.count == from_dir.count


def test_compress_of_a_missing_folder_is_an_adapter_error(tmp_path):
    with pytest.raises(AdapterError) as e:
        compeft.compress(str(tmp_path / "nothing-here"))
    assert e.value.code == "missing_config"


# --- which entries are kept -----------------------------------------------------------------


@pytest.mark.parametrize("density", [0.05, 0.1, 0.25, 0.3])
def test_keep_paper_is_the_papers_rule_on_bf16_ties(density):
    ad = tied_adapter()
    names = sorted(ad.tensors)
    flat = flat_of(ad, names)
    want = paper_mask(flat, density) & (flat != 0)  # a kept zero decodes to 0 * scale in the paper too
    comp = compeft.compress(ad, density=density, keep="paper")
    got = kept_mask(comp, names)
    assert torch.equal(got, want)
    assert comp.count == int(want.sum())
    dec = torch.cat([comp.decompress().tensors[n].reshape(-1) for n in names])
    assert torch.equal(dec[got].sign(), flat[got].sign())
    # the case the reviewer measured: ties make the paper keep clearly more than round(d * n)
    exact = compeft.compress(ad, density=density)
    assert exact.count == compeft.keep_count(density, flat.numel()) == math.floor(density * flat.numel() + 0.5)
    assert comp.count > exact.count


def test_keep_paper_per_tensor_scope():
    ad = tied_adapter(seed=3)
    comp = compeft.compress(ad, density=0.1, scope="tensor", keep="paper")
    dec = comp.decompress()
    for name, t in ad.tensors.items():
        want = paper_mask(t.reshape(-1), 0.1) & (t.reshape(-1) != 0)
        assert torch.equal(dec.tensors[name].reshape(-1) != 0, want), name


def test_keep_exact_keeps_round_d_n_with_ties_by_position():
    ad = tied_adapter(seed=1)
    names = sorted(ad.tensors)
    n = flat_of(ad, names).numel()
    for density in (0.05, 0.1, 0.25):
        comp = compeft.compress(ad, density=density, keep="exact")
        assert comp.count == math.floor(density * n + 0.5)
        assert comp.params.keep == "exact"


def test_keep_counts():
    assert compeft.keep_count(0.1, 25) == 3 and compeft.keep_count(0.1, 25, "paper") == 3
    assert compeft.keep_count(0.1, 30) == 3 and compeft.keep_count(0.1, 30, "paper") == 4
    assert compeft.keep_count(1.0, 7, "paper") == 7  # never above n


def test_the_rule_is_recorded_in_the_file(tmp_path):
    ad = tied_adapter()
    paper = compeft.compress(ad, density=0.1, keep="paper")
    assert paper.params.keep == "paper"
    loaded = compeft.load(paper.save(tmp_path / "paper.safetensors"))
    assert loaded.params.keep == "paper" and loaded.count == paper.count
    assert loaded.with_replace_factor(2.0).params.keep == "paper"
    exact = compeft.loads(compeft.compress(ad, density=0.1).to_bytes())
    assert exact.params.keep == "exact"


def test_choose_scale_passes_keep_on():
    ad = tied_adapter()
    choice = compeft.choose_scale(ad, 0.1, lambda a: 0.0, candidates=(1.0,), keep="paper")
    assert choice.compressed.params.keep == "paper"
    assert choice.compressed.count == compeft.compress(ad, density=0.1, keep="paper").count


def test_unknown_keep_rule_is_refused():
    with pytest.raises(AdapterError) as e:
        compeft.compress(tied_adapter(), keep="most")
    assert e.value.code == "invalid_keep"


def _kept_share(a: Adapter) -> float:
    flat = torch.cat([t.float().reshape(-1) for t in a.tensors.values()])
    return float((flat != 0).float().mean())


def test_choose_density_takes_the_cheapest_passing_density_with_its_scale():
    """A score that rewards a kept share >= 15 % and the factor 2: the search stops at d=0.2
    (0.05 and 0.1 tried first and failed), with the scale chosen at that density."""
    ad = tied_adapter(dtype=torch.float32, step=1e-3)
    calls = []

    def score(a):
        calls.append(_kept_share(a))
        return 1.0 if _kept_share(a) >= 0.15 else 0.0

    got = compeft.choose_density(ad, score, 1.0, (0.05, 0.1, 0.2, 0.5), pass_ratio=0.9)
    assert got.density == 0.2 and got.passed and got.scale is not None
    assert [t["density"] for t in got.tried] == [0.05, 0.1, 0.2] and [t["ratio"] for t in got.tried] == [0, 0, 1]
    assert got.compressed.to_bytes() == got.scale.compressed.to_bytes()
    assert len(calls) == 3 * len(compeft.DEFAULT_CANDIDATES)  # 0.5 never tried


def test_choose_density_without_a_pass_keeps_the_best_and_says_so():
    ad = tied_adapter(dtype=torch.float32, step=1e-3)
    got = compeft.choose_density(ad, lambda a: 0.5 * _kept_share(a), 1.0, (0.1, 0.3), pass_ratio=0.9,
                                 tune_scale=False)
    assert not got.passed and got.density == 0.3 and got.scale is None
    assert [t["density"] for t in got.tried] == [0.1, 0.3]
