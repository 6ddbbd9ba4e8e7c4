"""The merge library's rank choices and public building blocks: rank="full"
(the exact merged update), rank="auto" (the fewest components keeping a stated
energy, capped by max_rank), `dense_updates` (each module's merged update) and
`dare_masks` (the DARE keep masks, so a DARE merge can be redone by hand); the
merge job's, op declaration's, hubctl's and model card's handling of them.

Small synthetic adapters only (no base model, no PEFT): every test runs in well
under a second. The float64 references come from tests/ops/test_merge.py, which
writes them from the papers' definitions without library code."""

from __future__ import annotations

import math

import pytest
import torch

from adapters_ops import merge as M
from adapters_ops.adapter import Adapter
from adapters_ops.errors import AdapterError
from tests.ops.test_merge import ref_delta, ref_dense, ref_ties_merge, rel

Q = "base_model.model.model.layers.0.self_attn.q_proj"  # out > in
DOWN = "base_model.model.model.layers.0.mlp.down_proj"  # out < in
SHAPES = {Q: (48, 40), DOWN: (36, 60)}
WEIGHTS = [0.9, -0.6, 1.2]
DENSE = ["ties", "ties_svd", "dare_linear", "dare_linear_svd", "dare_ties", "dare_ties_svd", "magnitude_prune",
         "magnitude_prune_svd"]


def make(seed: int, r: int, shapes: dict = SHAPES, alpha: float | None = None, base: str = "tiny") -> Adapter:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for module, (out_dim, in_dim) in shapes.items():
        tensors[f"{module}.lora_A.weight"] = torch.randn(r, in_dim, generator=g) / in_dim ** 0.5
        tensors[f"{module}.lora_B.weight"] = torch.randn(out_dim, r, generator=g) * 0.05
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": alpha or 2 * r, "base_model_name_or_path": base,
           "target_modules": sorted({m.rsplit(".", 1)[-1] for m in shapes})}
    return Adapter(config=cfg, tensors=tensors)


@pytest.fixture(scope="module")
def ads() -> list[Adapter]:
    return [make(1, 4), make(2, 6, alpha=3), make(3, 2)]


def taus(adapters, weights, module) -> list[torch.Tensor]:
    return [w * ref_delta(a, module) for w, a in zip(weights, adapters, strict=True)]


def reference(method, adapters, weights, module, density, seed=0) -> torch.Tensor:
    """The method's merged update in float64 (DARE: with the masks the documented draw gives)."""
    ts = taus(adapters, weights, module)
    if method in ("linear", "svd", "cat"):
        return sum(ts)
    gen = M._module_generator(seed, module)
    masks = [(torch.rand(t.shape, generator=gen) < density).double() for t in ts]
    return ref_dense(method, ts, density, masks, "total")


def product(merged: Adapter, module: str) -> torch.Tensor:
    """B @ A of the merged adapter (its scaling is 1: lora_alpha == r)."""
    assert merged.scaling(module) == 1.0
    return merged.tensors[f"{module}.lora_B.weight"].double() @ merged.tensors[f"{module}.lora_A.weight"].double()


def density_for(method: str) -> float | None:
    return None if method in ("cat", "linear", "svd") else 0.5


# --- rank="full" -----------------------------------------------------------------------------


@pytest.mark.parametrize("method", DENSE + ["linear", "svd", "cat"])
def test_rank_full_is_the_exact_merged_update(ads, method):
    density = density_for(method)
    merged, report = M.merge_with_report(ads, WEIGHTS, method, density=density, rank="full", seed=5)
    for module, (out_dim, in_dim) in SHAPES.items():
        want = reference(method, ads, WEIGHTS, module, density, seed=5)
        assert rel(product(merged, module), want) < 1e-5, module
        assert report.modules[module]["energy"] == pytest.approx(1.0)
        if method in DENSE:  # a dense method's update has full rank
            assert merged.rank(module) == min(out_dim, in_dim)
        else:  # the sum of the inputs has rank <= sum r_i
            assert merged.rank(module) == 12
    assert report.rank == "full" and report.as_dict()["rank"] == "full"


def test_rank_full_equals_dense_updates_and_default_rank_is_lossy_and_says_so(ads):
    updates = M.dense_updates(ads, WEIGHTS, "dare_linear", density=0.5, seed=2)
    full = M.merge(ads, WEIGHTS, "dare_linear", density=0.5, rank="full", seed=2)
    default, report = M.merge_with_report(ads, WEIGHTS, "dare_linear", density=0.5, seed=2)
    for module, dense in updates.items():
        assert rel(product(full, module), dense) < 1e-6
        # The default rank (sum of input ranks) truncates, and the report says by how much.
        got = product(default, module)
        kept = float(got.norm() ** 2 / dense.double().norm() ** 2)
        assert report.modules[module]["energy"] == pytest.approx(kept, rel=1e-4)
        assert kept < 0.95 and default.rank(module) == 12
    assert report.min_energy < 0.95 and report.rank is None


# --- rank="auto" -----------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["ties", "dare_linear", "dare_ties_svd", "magnitude_prune"])
@pytest.mark.parametrize("energy", [0.9, 0.99])
def test_rank_auto_keeps_the_energy_with_the_fewest_components(ads, method, energy):
    merged, report = M.merge_with_report(ads, WEIGHTS, method, density=0.5, rank="auto", energy=energy, seed=1)
    assert report.energy_target == energy and report.max_rank is None and report.rank == "auto"
    for module, (out_dim, in_dim) in SHAPES.items():
        want = reference(method, ads, WEIGHTS, module, 0.5, seed=1)
        r = merged.rank(module)
        assert r < min(out_dim, in_dim)  # smaller than rank="full"
        kept = float(product(merged, module).norm() ** 2 / want.norm() ** 2)
        assert kept >= energy - 1e-5
        assert report.modules[module]["energy"] == pytest.approx(kept, rel=1e-4)
        assert report.modules[module]["rank"] == r
        s2 = torch.linalg.svdvals(want) ** 2
        assert float(s2[:r - 1].sum() / s2.sum()) < energy + 1e-5  # one component fewer would not do
    # A higher target never needs fewer components.
    more = M.merge(ads, WEIGHTS, method, density=0.5, rank="auto", energy=min(1.0, energy + 0.005), seed=1)
    assert all(more.rank(m) >= merged.rank(m) for m in SHAPES)


def test_rank_auto_default_energy_and_max_rank_cap(ads):
    merged, report = M.merge_with_report(ads, WEIGHTS, "dare_ties", density=0.5, rank="auto", seed=1)
    assert report.energy_target == M.DEFAULT_ENERGY == 0.99
    assert report.min_energy >= 0.99 - 1e-6
    capped, capped_report = M.merge_with_report(ads, WEIGHTS, "dare_ties", density=0.5, rank="auto",
                                                energy=0.999, max_rank=3, seed=1)
    assert capped_report.max_rank == 3 and capped_report.as_dict()["max_rank"] == 3
    for module in SHAPES:
        assert capped.rank(module) == 3
        want = reference("dare_ties", ads, WEIGHTS, module, 0.5, seed=1)
        s2 = torch.linalg.svdvals(want) ** 2
        optimum = float(s2[:3].sum() / s2.sum())
        assert capped_report.modules[module]["energy"] == pytest.approx(optimum, rel=1e-4)
        assert capped_report.modules[module]["energy"] < 0.999  # the cap won: the report shows the shortfall


def test_rank_auto_on_the_truncated_svd_path_is_near_optimal():
    # 200 x 160 with a cap of 6: the sketch (width max(6, 12) + 10) is small against 160.
    shapes = {Q: (200, 160)}
    inputs = [make(s, 4, shapes) for s in (11, 12, 13)]
    merged, report = M.merge_with_report(inputs, WEIGHTS, "ties", density=0.3, rank="auto", energy=0.9999,
                                         max_rank=6)
    assert report.modules[Q]["solver"] == "sketch" and merged.rank(Q) == 6
    want = reference("ties", inputs, WEIGHTS, Q, 0.3)
    s2 = torch.linalg.svdvals(want) ** 2
    assert report.modules[Q]["energy"] >= 0.999 * float(s2[:6].sum() / s2.sum())
    assert report.modules[Q]["energy"] == pytest.approx(float(product(merged, Q).norm() ** 2 / want.norm() ** 2),
                                                        rel=1e-4)


def test_rank_auto_and_full_on_the_factor_methods(ads):
    exact = sum(taus(ads, WEIGHTS, Q))
    s2 = torch.linalg.svdvals(exact) ** 2
    need = int((s2.cumsum(0) / s2.sum() < 0.95).sum()) + 1
    for method in ("svd", "linear"):
        merged, report = M.merge_with_report(ads, WEIGHTS, method, rank="auto", energy=0.95)
        assert merged.rank(Q) == need < 12
        assert report.modules[Q]["energy"] >= 0.95
    svd_full = M.merge(ads, WEIGHTS, "svd", rank="full")
    assert rel(product(svd_full, Q), exact) < 1e-6 and svd_full.rank(Q) == 12
    assert M.merge(ads, WEIGHTS, "svd", rank="auto", energy=1.0, max_rank=2).rank(Q) == 2


# --- dare_masks ---------------------------------------------------------------------------


def test_dare_masks_are_reproducible_and_follow_the_documented_draw(ads):
    one = M.dare_masks(ads, 0.4, seed=9)
    two = M.dare_masks(ads, 0.4, seed=9)
    other = M.dare_masks(ads, 0.4, seed=10)
    assert isinstance(one, M.ModuleMap) and list(one) == sorted(SHAPES) and len(one) == 2
    for module, masks in one.items():
        assert len(masks) == len(ads)
        gen = M._module_generator(9, module)  # the draw docs/merge.md documents
        for mask, again, different in zip(masks, two[module], other[module], strict=True):
            assert mask.dtype == torch.bool and mask.shape == SHAPES[module]
            assert torch.equal(mask, again)
            assert not torch.equal(mask, different)
            assert torch.equal(mask, torch.rand(mask.shape, generator=gen) < 0.4)
            assert abs(mask.float().mean().item() - 0.4) < 0.08
    single = M.dare_masks(ads, 0.4, seed=9, module=DOWN)
    assert list(single) == [DOWN]
    assert all(torch.equal(x, y) for x, y in zip(single[DOWN], one[DOWN], strict=True))
    assert all(bool(m.all()) for m in M.dare_masks(ads, 1.0, seed=9)[Q])  # density 1 keeps everything
    with pytest.raises(KeyError):
        one["model.layers.9.mlp.up_proj"]


def test_dare_linear_merge_equals_the_hand_computation_with_dare_masks(ads):
    density, seed = 0.3, 4
    merged = M.merge(ads, WEIGHTS, "dare_linear", density=density, rank="full", seed=seed)
    ties = M.merge(ads, WEIGHTS, "dare_ties", density=density, rank="full", seed=seed)
    for module, masks in M.dare_masks(ads, density, seed).items():
        # sum_i w_i * (mask_i * delta_i) / density, delta_i = s_i B_i A_i
        hand = sum(w * (m.double() * ref_delta(a, module)) / density
                   for w, m, a in zip(WEIGHTS, masks, ads, strict=True))
        assert rel(product(merged, module), hand) < 1e-5
        dropped = [w * m.double() * ref_delta(a, module) / density for w, m, a in zip(WEIGHTS, masks, ads, strict=True)]
        assert rel(product(ties, module), ref_ties_merge(dropped, "total")) < 1e-5


def test_dare_masks_with_module_union_mark_absent_adapters(ads):
    partial = make(4, 3, {Q: SHAPES[Q]})
    masks = M.dare_masks([ads[0], partial, ads[1]], 0.5, seed=3, modules="union")
    assert masks[DOWN][1] is None and masks[Q][1] is not None
    # The merge draws for the adapters present, in order: the same masks.
    merged = M.merge([ads[0], partial, ads[1]], [1.0, 1.0, 0.5], "dare_linear", density=0.5, seed=3, rank="full",
                     modules="union")
    hand = (masks[DOWN][0].double() * ref_delta(ads[0], DOWN) + 0.5 * masks[DOWN][2].double()
            * ref_delta(ads[1], DOWN)) / 0.5
    assert rel(product(merged, DOWN), hand) < 1e-5


# --- dense_updates ------------------------------------------------------------------------


@pytest.mark.parametrize("method", DENSE + ["linear", "svd"])
def test_dense_updates_are_the_methods_merged_updates(ads, method):
    density = density_for(method)
    updates = M.dense_updates(ads, WEIGHTS, method, density=density, seed=6)
    assert isinstance(updates, M.ModuleMap) and sorted(updates) == sorted(SHAPES)
    for module, dense in updates.items():
        assert dense.dtype == torch.float32 and tuple(dense.shape) == SHAPES[module]
        assert rel(dense, reference(method, ads, WEIGHTS, module, density, seed=6)) < 1e-5
    as_dict = dict(updates)  # materialised on request; values are recomputed identically
    assert torch.equal(as_dict[Q], updates[Q])


# --- invalid values -------------------------------------------------------------------------


ERRORS = [
    ("rank-bogus", {"method": "ties", "density": 0.5, "rank": "bogus"}, "invalid_rank"),
    ("rank-bool", {"method": "svd", "rank": True}, "invalid_rank"),
    ("energy-zero", {"method": "ties", "density": 0.5, "rank": "auto", "energy": 0.0}, "invalid_energy"),
    ("energy-above-1", {"method": "ties", "density": 0.5, "rank": "auto", "energy": 1.5}, "invalid_energy"),
    ("energy-nan", {"method": "svd", "rank": "auto", "energy": math.nan}, "invalid_energy"),
    ("energy-str", {"method": "svd", "rank": "auto", "energy": "high"}, "invalid_energy"),
    ("energy-without-auto", {"method": "svd", "rank": 4, "energy": 0.9}, "invalid_energy"),
    ("max-rank-zero", {"method": "ties", "density": 0.5, "rank": "auto", "max_rank": 0}, "invalid_rank"),
    ("max-rank-float", {"method": "ties", "density": 0.5, "rank": "auto", "max_rank": 2.5}, "invalid_rank"),
    ("max-rank-without-auto", {"method": "ties", "density": 0.5, "rank": "full", "max_rank": 4}, "invalid_rank"),
    ("auto-for-cat", {"method": "cat", "rank": "auto"}, "invalid_rank"),
]


@pytest.mark.parametrize("kwargs,code", [c[1:] for c in ERRORS], ids=[c[0] for c in ERRORS])
def test_invalid_rank_settings(ads, kwargs, code):
    with pytest.raises(AdapterError) as info:
        M.merge(ads, WEIGHTS, **kwargs)
    assert info.value.code == code and str(info.value)
    if kwargs.get("rank") == "bogus":  # the message names what is accepted
        assert "'auto'" in str(info.value) and "'full'" in str(info.value)


def test_invalid_dare_masks_and_dense_updates_arguments(ads):
    for density in (0.0, 1.5, None):
        with pytest.raises(AdapterError) as info:
            M.dare_masks(ads, density, seed=0)
        assert info.value.code == "invalid_density"
    with pytest.raises(AdapterError) as info:
        M.dare_masks(ads, 0.5, seed=0, module="model.layers.0.mlp.gate_proj")
    assert info.value.code == "unknown_module"
    with pytest.raises(AdapterError) as info:
        M.dense_updates(ads, WEIGHTS, "average")
    assert info.value.code == "invalid_method"
    with pytest.raises(AdapterError) as info:
        M.dense_updates(ads, WEIGHTS[:2], "linear")
    assert info.value.code == "invalid_weights"


# --- the job, its validation, hubctl and the model card -----------------------------------------


def _job(**params) -> dict:
    return {"adapters": ["alice/a", "alice/b"], "name": "alice/m", **params}


def test_merge_declaration_accepts_rank_auto_full_and_integers():
    from adapters_ops import opspecs

    assert opspecs.DEFAULT_MERGE_ENERGY == M.DEFAULT_ENERGY
    clean = opspecs.OPS["merge"].clean
    auto = clean(_job(method="dare_ties", rank="auto"))
    assert auto["rank"] == "auto" and auto["energy"] == 0.99 and "max_rank" not in auto
    auto = clean(_job(method="ties", rank="auto", energy=0.95, max_rank=32))
    assert (auto["energy"], auto["max_rank"]) == (0.95, 32)
    assert clean(_job(method="ties", rank="full"))["rank"] == "full"
    assert clean(_job(method="cat", rank="full"))["rank"] == "full"
    assert clean(_job(method="ties", rank=16))["rank"] == 16
    assert "energy" not in clean(_job(method="ties", rank=16))


@pytest.mark.parametrize("params,field", [
    ({"method": "ties", "rank": "bogus"}, "params.rank"),
    ({"method": "ties", "rank": 0}, "params.rank"),
    ({"method": "ties", "rank": "auto", "energy": 0}, "params.energy"),
    ({"method": "ties", "rank": "auto", "energy": 1.01}, "params.energy"),
    ({"method": "ties", "rank": "auto", "energy": "x"}, "params.energy"),
    ({"method": "ties", "rank": "auto", "max_rank": 0}, "params.max_rank"),
    ({"method": "ties", "rank": 8, "energy": 0.9}, "params.energy"),
    ({"method": "ties", "max_rank": 8}, "params.max_rank"),
    ({"method": "cat", "rank": "auto"}, "params.rank"),
    ({"method": "distill", "rank": "auto"}, "params.rank"),
])
def test_merge_declaration_refuses_bad_rank_settings(params, field):
    from adapters_ops import opspecs

    with pytest.raises(opspecs.ParamError) as info:
        opspecs.OPS["merge"].clean(_job(**params))
    assert info.value.code == "invalid_params" and f"params.{info.value.field}" == field


def test_merge_job_passes_rank_settings_and_records_the_kept_energy(ads):
    from workers.ops import merge as job

    assert job.rank_kwargs({"rank": "auto", "energy": 0.95, "max_rank": 8}) == {
        "rank": "auto", "energy": 0.95, "max_rank": 8}
    assert job.rank_kwargs({"rank": "full"}) == {"rank": "full"}
    assert job.rank_kwargs({}) == {"rank": None}
    report = M.merge_with_report(ads, WEIGHTS, "ties", density=0.5, seed=0,
                                 **job.rank_kwargs({"rank": "auto", "energy": 0.95, "max_rank": 8})).report
    metrics = job.rank_metrics(report)
    assert metrics["requested_rank"] == "auto" and metrics["energy_target"] == 0.95 and metrics["max_rank"] == 8
    assert metrics["min_captured_energy"] == round(report.min_energy, 6)
    assert metrics["mean_captured_energy"] == round(report.mean_energy, 6)
    default = job.rank_metrics(M.merge_with_report(ads, WEIGHTS, "dare_linear", density=0.5).report)
    assert default["requested_rank"] == "default" and default["output_rank"] == 12
    assert default["min_captured_energy"] < 0.95


def test_hubctl_merge_rank_flags(monkeypatch):
    from hub.cli import main as cli

    sent = []
    monkeypatch.setattr(cli.jobs, "submit", lambda op, params, wait, require_pass=False: sent.append((op, params)) or 0)
    base = ["merge", "alice/a", "alice/b", "--method", "ties", "--name", "alice/m"]
    for extra, want in [(["--rank", "auto", "--energy", "0.95", "--max-rank", "16"],
                         {"rank": "auto", "energy": 0.95, "max_rank": 16}),
                        (["--rank", "full"], {"rank": "full", "energy": None, "max_rank": None}),
                        (["--rank", "8"], {"rank": 8, "energy": None, "max_rank": None})]:
        args = cli.build_parser().parse_args(base + extra)
        assert args.func(args) == 0
        assert {k: sent[-1][1].get(k) for k in want} == want
    for bad in (["--rank", "bogus"], ["--rank", "0"]):
        with pytest.raises(SystemExit) as info:
            cli.build_parser().parse_args(base + bad)
        assert info.value.code == 1


def test_model_card_facts_show_the_captured_energy():
    from hub.hfcompat import card

    metrics = {"method": "dare_ties", "requested_rank": "auto", "energy_target": 0.99, "max_rank": 64,
               "min_captured_energy": 0.991234, "mean_captured_energy": 0.995}
    rows = dict(card.metric_facts("merge", metrics))
    assert rows["requested rank"] == "auto (energy >= 0.99, max rank 64)"
    assert rows["captured energy (min / mean over modules)"].startswith("0.9912 / 0.9950 (lossy")
    exact = dict(card.metric_facts("merge", {"min_captured_energy": 1.0, "mean_captured_energy": 1.0}))
    assert exact["captured energy (min / mean over modules)"] == "1.0000 / 1.0000"
    assert card.metric_facts("upload", metrics) == [] and card.metric_facts("merge", None) == []
    text = card.render_card({"library_name": "peft"}, title="alice/m", description="", facts=list(rows.items()),
                            usage="")
    assert "| captured energy (min / mean over modules) | 0.9912 / 0.9950" in text


# --- on a GPU ----------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", ["ties", "dare_linear", "dare_ties", "magnitude_prune"])
def test_full_auto_masks_and_dense_updates_on_cuda(ads, method):
    """The same contracts on device='cuda': rank='full' stores the dense update exactly, rank='auto'
    keeps its energy, and the public DARE masks are the ones the merge drew (CUDA's generator)."""
    updates = M.dense_updates(ads, WEIGHTS, method, density=0.5, seed=4, device="cuda")
    full = M.merge(ads, WEIGHTS, method, density=0.5, rank="full", seed=4, device="cuda")
    auto = M.merge_with_report(ads, WEIGHTS, method, density=0.5, rank="auto", energy=0.95, seed=4, device="cuda")
    assert all(t.device.type == "cpu" for t in full.tensors.values())
    assert auto.report.min_energy >= 0.95 - 1e-6
    masks = M.dare_masks(ads, 0.5, seed=4, device="cuda")
    for module in SHAPES:
        dense = updates[module]
        assert dense.is_cuda
        assert rel(product(full, module), dense.double().cpu()) < 1e-5, module
        if method == "dare_linear":
            by_hand = sum(m.double().cpu() * t for m, t in zip(masks[module], taus(ads, WEIGHTS, module), strict=True))
            assert rel(dense.double().cpu(), by_hand / 0.5) < 1e-5, module
