"""merge.merge against PEFT's add_weighted_adapter (cat, svd, and the *_svd
methods where PEFT computes the same thing) and against dense reference
implementations of the papers' definitions written here, independently of the
library; plus rslora, rank_pattern, negative weights, seeded DARE, module
union/intersection, PEFT round trips of the output, errors and search_weights;
and the fast dense path (radix-select trim, in-place TIES steps, the truncated
SVD) against topk, the reference TIES steps and the full SVD's optimum."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from adapters_ops import merge as M
from adapters_ops.adapter import Adapter
from adapters_ops.errors import AdapterError, IncompatibleAdapters

ALL_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FULL = 128  # >= min(out, in) of every tiny layer: a "full rank" re-factor

# name -> (r, targets, seed, extra LoraConfig kwargs); lora_alpha = 2r (conftest)
SPECS = {
    "a": (4, ALL_LINEAR, 1, {}),
    "b": (8, ALL_LINEAR, 2, {}),
    "c": (2, ALL_LINEAR, 3, {}),
    "a2": (4, ALL_LINEAR, 8, {}),
    "rs4": (4, ALL_LINEAR, 4, {"use_rslora": True}),
    "rs8": (8, ALL_LINEAR, 5, {"use_rslora": True}),
    "pat": (4, ALL_LINEAR, 6, {"rank_pattern": {"q_proj": 6}, "alpha_pattern": {"v_proj": 3}}),
    "qv": (4, ("q_proj", "v_proj"), 7, {}),
}


@pytest.fixture(scope="module")
def dirs(make_peft_adapter):
    return {name: make_peft_adapter(name=name, r=r, targets=t, seed=s, **extra)
            for name, (r, t, s, extra) in SPECS.items()}


@pytest.fixture(scope="module")
def ad(dirs):
    return {name: Adapter.load(d) for name, d in dirs.items()}


# --- references written from the definitions (no library code) --------------------------


def ref_scaling(cfg: dict, module: str) -> float:
    """PEFT's scaling for one module, from the config, by suffix match on the pattern keys."""
    def pick(pattern, default):
        for key, val in (pattern or {}).items():
            if module.endswith("." + key):
                return val
        return default
    r = pick(cfg.get("rank_pattern"), cfg["r"])
    alpha = pick(cfg.get("alpha_pattern"), cfg["lora_alpha"])
    return alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r


def ref_delta(adapter: Adapter, module: str) -> torch.Tensor:
    a = adapter.tensors[f"{module}.lora_A.weight"].double()
    b = adapter.tensors[f"{module}.lora_B.weight"].double()
    return ref_scaling(adapter.config, module) * (b @ a)


def out_delta(adapter: Adapter, module: str) -> torch.Tensor:
    """The merged adapter's update as PEFT would apply it: from its own config."""
    return ref_delta(adapter, module)


def ref_trim(t: torch.Tensor, density: float) -> torch.Tensor:
    k = int(density * t.numel())
    mask = torch.zeros(t.numel(), dtype=torch.bool)
    mask[torch.topk(t.abs().flatten(), k).indices] = True
    return t * mask.view(t.shape)


def ref_ties_merge(ts: list[torch.Tensor], sign_method: str) -> torch.Tensor:
    """TIES steps 2-3 entry by entry: elected sign, mean of the agreeing nonzero entries."""
    stack = torch.stack(ts)
    mass = stack.sum(0) if sign_method == "total" else torch.sign(stack).sum(0)
    sign = torch.where(mass >= 0, 1.0, -1.0).double()
    out = torch.zeros_like(ts[0])
    count = torch.zeros_like(ts[0])
    for t in ts:
        agree = (t != 0) & (torch.sign(t) == sign)
        out += torch.where(agree, t, 0.0)
        count += agree.double()
    return out / count.clamp(min=1)


def ref_dense(method: str, taus: list[torch.Tensor], density: float, masks, sign_method: str):
    base = method.removesuffix("_svd")
    if base == "ties":
        return ref_ties_merge([ref_trim(t, density) for t in taus], sign_method)
    if base == "magnitude_prune":
        return sum(ref_trim(t, density) for t in taus)
    dropped = [t * m / density for t, m in zip(taus, masks, strict=True)]
    if base == "dare_linear":
        return sum(dropped)
    if base == "dare_ties":
        return ref_ties_merge(dropped, sign_method)
    raise AssertionError(method)


def rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return float((x.double() - y.double()).norm() / y.double().norm().clamp(min=1e-30))


# --- PEFT harness -------------------------------------------------------------------------


def peft_merge(base_dir, dirs: list, weights, combination_type, **kwargs) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), dirs[0], adapter_name="in0")
    for i, d in enumerate(dirs[1:], start=1):
        model.load_adapter(d, adapter_name=f"in{i}")
    model.add_weighted_adapter([f"in{i}" for i in range(len(dirs))], list(weights), "merged",
                               combination_type=combination_type, **kwargs)
    return {name: layer.get_delta_weight("merged").detach()
            for name, layer in model.named_modules() if isinstance(layer, LoraLayer) and "merged" in layer.lora_A}


def peft_load_deltas(base_dir, adapter_dir) -> dict[str, torch.Tensor]:
    from peft import PeftModel
    from peft.tuners.lora import LoraLayer
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), adapter_dir)
    return {name: layer.get_delta_weight("default").detach()
            for name, layer in model.named_modules() if isinstance(layer, LoraLayer) and "default" in layer.lora_A}


# --- parity with PEFT -----------------------------------------------------------------------

PEFT_CASES = [
    # id, adapters, weights, method, our kwargs, PEFT kwargs
    ("cat-2", ["a", "b"], [0.7, 0.4], "cat", {}, {}),
    ("cat-3-negative", ["a", "b", "c"], [1.0, -0.5, 0.3], "cat", {}, {}),
    ("cat-rank-pattern", ["a", "pat"], [0.6, 0.9], "cat", {}, {}),
    ("svd-full-rank", ["a", "b", "c"], [1.0, -0.5, 0.3], "svd", {"rank": 14}, {"svd_rank": 14}),
    ("svd-default-rank", ["a", "b"], [0.7, 0.4], "svd", {}, {}),
    ("svd-rank-3", ["a", "b", "c"], [0.5, 0.5, 1.0], "svd", {"rank": 3}, {"svd_rank": 3}),
    ("svd-rank-pattern", ["a", "pat"], [0.6, -0.9], "svd", {"rank": 10}, {"svd_rank": 10}),
    # PEFT elects TIES signs on unweighted updates: equal positive weights make it
    # the same definition as ours, so the *_svd variants must agree at full rank.
    ("ties_svd", ["a", "b", "c"], [0.6, 0.6, 0.6], "ties_svd", {"density": 0.3, "rank": FULL},
     {"density": 0.3, "svd_rank": FULL, "svd_full_matrices": False}),
    ("magnitude_prune_svd", ["a", "b"], [0.8, -0.3], "magnitude_prune_svd", {"density": 0.4, "rank": FULL},
     {"density": 0.4, "svd_rank": FULL, "svd_full_matrices": False}),
]


@pytest.mark.parametrize("names,weights,method,ours,theirs", [c[1:] for c in PEFT_CASES], ids=[c[0] for c in PEFT_CASES])
def test_matches_peft_add_weighted_adapter(tiny_base_dir, dirs, ad, names, weights, method, ours, theirs):
    merged = M.merge([ad[n] for n in names], weights, method=method, **ours)
    expected = peft_merge(tiny_base_dir, [dirs[n] for n in names], weights, method, **theirs)
    assert sorted(expected) == merged.modules()
    for module, want in expected.items():
        assert rel(out_delta(merged, module), want) < 1e-4, module


def test_exact_methods_equal_the_weighted_sum(ad):
    names, weights = ["a", "b", "pat", "c"], [0.3, -1.2, 0.8, 2.0]
    inputs = [ad[n] for n in names]
    for method, kwargs in [("cat", {}), ("linear", {}), ("svd", {"rank": 20}), ("linear", {"rank": 20})]:
        merged = M.merge(inputs, weights, method=method, **kwargs)
        for module in merged.modules():
            want = sum(w * ref_delta(a, module) for w, a in zip(weights, inputs, strict=True))
            assert rel(out_delta(merged, module), want) < 1e-6, (method, module)


def test_peft_linear_has_cross_terms_ours_does_not(tiny_base_dir, dirs, ad):
    weights = [0.5, 0.5]
    theirs = peft_merge(tiny_base_dir, [dirs["a"], dirs["a2"]], weights, "linear")
    ours = M.merge([ad["a"], ad["a2"]], weights, method="linear")
    peft_errors = []
    for module, got in theirs.items():
        want = sum(w * ref_delta(ad[n], module) for w, n in zip(weights, ["a", "a2"], strict=True))
        assert rel(out_delta(ours, module), want) < 1e-6
        peft_errors.append(rel(got, want))
    # A_mix = sum sqrt(w s) A_i, B_mix = sum sqrt(w s) B_i: B_mix A_mix adds B_i A_j terms.
    assert min(peft_errors) > 0.5, peft_errors


def test_rslora_is_exact_and_peft_is_off_by_sqrt_r(tiny_base_dir, dirs, ad):
    weights = [0.9, -0.4]
    for method, kwargs, new_r in [("cat", {}, 12), ("svd", {"svd_rank": 12}, 12)]:
        ours = M.merge([ad["rs4"], ad["rs8"]], weights, method=method, **({"rank": 12} if method == "svd" else {}))
        assert ours.config["use_rslora"] is False and ours.config["lora_alpha"] == ours.config["r"]
        theirs = peft_merge(tiny_base_dir, [dirs["rs4"], dirs["rs8"]], weights, method, **kwargs)
        for module, got in theirs.items():
            # alpha / sqrt(r): 8/2 and 16/sqrt(8)
            want = 0.9 * (8 / 2) * ref_delta_unscaled(ad["rs4"], module) - 0.4 * (16 / math.sqrt(8)) * \
                ref_delta_unscaled(ad["rs8"], module)
            assert rel(out_delta(ours, module), want) < 1e-6
            # PEFT keeps use_rslora with lora_alpha = r on the merged adapter, so
            # its scaling is sqrt(r) instead of 1 (update docs/merge.md if this fails).
            assert rel(got, math.sqrt(new_r) * want) < 1e-4


def ref_delta_unscaled(adapter, module):
    return adapter.tensors[f"{module}.lora_B.weight"].double() @ adapter.tensors[f"{module}.lora_A.weight"].double()


def test_rank_pattern_output_round_trips_through_peft(tiny_base_dir, ad, tmp_path):
    """Modules of different output ranks get rank_pattern/alpha_pattern entries;
    PEFT loading the saved merge applies exactly our updates."""
    merged = M.merge([ad["a"], ad["pat"]], [0.6, 0.9], method="cat")
    q = "base_model.model.model.layers.0.self_attn.q_proj"
    assert merged.rank(q) == 10 and merged.rank(q.replace("q_proj", "k_proj")) == 8
    assert merged.config["r"] == 10
    assert merged.config["rank_pattern"]["model.layers.0.self_attn.k_proj"] == 8
    assert merged.config["alpha_pattern"] == merged.config["rank_pattern"]
    merged.save(tmp_path / "m")
    loaded = peft_load_deltas(tiny_base_dir, tmp_path / "m")
    assert sorted(loaded) == merged.modules()
    for module, got in loaded.items():
        want = 0.6 * ref_delta(ad["a"], module) + 0.9 * ref_delta(ad["pat"], module)
        assert rel(got, want) < 1e-6, module
        assert rel(Adapter.load(tmp_path / "m").delta(module), want) < 1e-6


@pytest.mark.parametrize("method,kwargs", [("svd", {"rank": 3}), ("ties", {"density": 0.5}),
                                            ("dare_ties_svd", {"density": 0.5})])
def test_output_is_a_valid_peft_lora(tiny_base_dir, ad, tmp_path, method, kwargs):
    merged = M.merge([ad["a"], ad["b"]], [1.0, 0.5], method=method, **kwargs)
    merged.save(tmp_path / method)
    loaded = peft_load_deltas(tiny_base_dir, tmp_path / method)
    for module, got in loaded.items():
        assert rel(got, merged.delta(module)) < 1e-6


# --- dense methods against the papers' definitions --------------------------------------------

DENSE_CASES = [
    ("ties", ["a", "b", "c"], [1.0, 0.5, 0.8], 0.3, "total"),
    ("ties", ["a", "b"], [1.0, -0.7], 0.5, "total"),
    ("ties_svd", ["a", "b", "c"], [0.4, 1.0, 0.6], 0.2, "frequency"),
    ("magnitude_prune", ["a", "b"], [0.7, -0.4], 0.25, "total"),
    ("magnitude_prune_svd", ["a", "pat", "c"], [1.0, 1.0, 1.0], 0.5, "total"),
    ("dare_linear", ["a", "b"], [0.7, 0.4], 0.5, "total"),
    ("dare_linear_svd", ["a", "b", "c"], [1.0, -1.0, 0.5], 0.3, "total"),
    ("dare_ties", ["a", "b", "c"], [1.0, 0.5, 0.8], 0.4, "total"),
    ("dare_ties_svd", ["a", "rs8"], [0.5, -0.9], 0.6, "frequency"),
]


@pytest.mark.parametrize("method,names,weights,density,sign", DENSE_CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(DENSE_CASES)])
def test_dense_methods_match_reference(ad, method, names, weights, density, sign):
    inputs = [ad[n] for n in names]
    merged, report = M.merge_with_report(inputs, weights, method=method, density=density, rank=FULL, seed=11,
                                         majority_sign=sign)
    for module in merged.modules():
        taus = [w * ref_delta(a, module) for w, a in zip(weights, inputs, strict=True)]
        # The documented DARE seeding: one generator per (seed, module), one
        # uniform draw per adapter in order, keep where u < density.
        gen = M._module_generator(11, module)
        masks = [(torch.rand(t.shape, generator=gen) < density).double() for t in taus]
        want = ref_dense(method, taus, density, masks, sign)
        assert rel(out_delta(merged, module), want) < 1e-4, module
        assert report.modules[module]["energy"] == pytest.approx(1.0)


def test_dense_default_ranks_and_energy_report(ad):
    inputs, weights = [ad["a"], ad["b"]], [1.0, 0.5]
    for method, want_rank in [("ties", 12), ("ties_svd", 8)]:
        merged, report = M.merge_with_report(inputs, weights, method=method, density=0.5)
        for module in merged.modules():
            assert merged.rank(module) == want_rank
            taus = [w * ref_delta(a, module) for w, a in zip(weights, inputs, strict=True)]
            dense = ref_ties_merge([ref_trim(t, 0.5) for t in taus], "total")
            s = torch.linalg.svdvals(dense)
            assert report.modules[module]["energy"] == pytest.approx(float((s[:want_rank] ** 2).sum() / (s ** 2).sum()),
                                                                     rel=1e-4)
            # Eckart-Young: the re-factor is the best rank-r approximation.
            err = float((out_delta(merged, module) - dense).norm() ** 2)
            assert err == pytest.approx(float((s[want_rank:] ** 2).sum()), rel=1e-3, abs=1e-10)
    assert 0 < report.min_energy <= report.mean_energy < 1
    assert report.as_dict()["modules"]


def test_svd_report_energy(ad):
    merged, report = M.merge_with_report([ad["a"], ad["b"]], [1.0, 1.0], method="svd", rank=5)
    module = merged.modules()[0]
    s = torch.linalg.svdvals(ref_delta(ad["a"], module) + ref_delta(ad["b"], module))
    assert report.modules[module] == {"rank": 5, "energy": pytest.approx(float((s[:5] ** 2).sum() / (s ** 2).sum())),
                                      "solver": "qr"}
    assert M.merge_with_report([ad["a"], ad["b"]], [1, 1], method="cat").report.min_energy == 1.0


# --- the fast dense path: radix trim, in-place TIES steps, truncated SVD ------------------------

TRIM_CASES = [
    # id, tensor factory (generator -> tensor), densities
    ("normal", lambda g: torch.randn(97, 53, generator=g), (0.01, 0.3, 0.5, 0.99)),
    ("low-rank", lambda g: torch.randn(120, 4, generator=g) @ torch.randn(4, 77, generator=g), (0.2, 0.7)),
    ("wide-exponents", lambda g: torch.randn(64, 64, generator=g) * 10.0 ** (torch.rand(64, 64, generator=g) * 60 - 30),
     (0.1, 0.5)),
    ("subnormal-and-zero", lambda g: torch.cat([torch.zeros(500), torch.randn(300, generator=g) * 1e-41,
                                                torch.randn(200, generator=g)]), (0.1, 0.3, 0.6)),
    ("odd-1d", lambda g: torch.randn(1001, generator=g), (0.001, 0.999)),
]


@pytest.mark.parametrize("make,densities", [c[1:] for c in TRIM_CASES], ids=[c[0] for c in TRIM_CASES])
def test_trim_radix_select_keeps_the_top_k(make, densities):
    t = make(torch.Generator().manual_seed(5))
    before = t.clone()
    for density in densities:
        got = M.trim(t, density)
        # the nonzero magnitudes are distinct (zeros stay zero either way):
        # exactly the top k survive, unchanged, as with topk
        assert torch.equal(got, ref_trim(t.double(), density).float()), density
        # float64 takes the kthvalue path: same entries kept
        assert torch.equal(M.trim(t.double(), density), ref_trim(t.double(), density)), density
    assert torch.equal(t, before)  # the public function does not modify its input


def test_trim_ties_at_the_threshold_keep_every_equal_entry():
    # 6 entries of magnitude 2 compete for the last 2 places: the threshold
    # rule keeps all of them (as before: |x| >= k-th largest magnitude).
    t = torch.tensor([5.0, -4.0, 2.0, -2.0, 2.0, 2.0, -2.0, 2.0, 1.0, 0.0])
    got = M.trim(t, 0.4)
    assert torch.equal(got, torch.where(t.abs() >= 2, t, 0.0))
    assert torch.equal(M.trim(t, 1.0), t) and not M.trim(t, 0.05).any()


def test_elect_sign_and_disjoint_mean_match_reference():
    g = torch.Generator().manual_seed(3)
    taus = [torch.randn(40, 30, generator=g, dtype=torch.float64) * (torch.rand(40, 30, generator=g) < 0.6)
            for _ in range(3)]
    stacked = torch.stack(taus)
    for method in ("total", "frequency"):
        sign = M.elect_sign(stacked, method)
        assert torch.equal(M.disjoint_mean(stacked, sign), ref_ties_merge(taus, method))
    # a zero mass, +0.0 or -0.0, elects +1; inputs are left alone
    zeros = torch.tensor([[0.0, -0.0, 1.0], [-0.0, -0.0, -1.0]])
    assert torch.equal(M.elect_sign(zeros, "total"), torch.ones(3))
    assert torch.equal(M.elect_sign(zeros, "frequency"), torch.tensor([1.0, 1.0, 1.0]))
    assert torch.equal(zeros, torch.tensor([[0.0, -0.0, 1.0], [-0.0, -0.0, -1.0]]))
    assert torch.equal(stacked, torch.stack(taus))


def _optimal_energy(matrix: torch.Tensor, r: int) -> float:
    s = torch.linalg.svdvals(matrix.double())
    return float((s[:r] ** 2).sum() / (s ** 2).sum())


def _low_rank_inputs(kind: str, m: int, n: int, g: torch.Generator):
    """(dense update, row hint) like those _merge_dense re-factors: three rank-8 updates."""
    bs = [torch.randn(m, 8, generator=g) * 0.05 for _ in range(3)]
    as_ = [torch.randn(8, n, generator=g) * (1 + 0.4 * i) for i in range(3)]
    taus = [b @ a for b, a in zip(bs, as_, strict=True)]
    hint = torch.cat(as_)
    if kind == "lowrank+noise":
        return sum(taus) + 0.02 * float(taus[0].norm()) / (m * n) ** 0.5 * torch.randn(m, n, generator=g), hint
    if kind == "ties":
        trimmed = torch.stack([M.trim(t, 0.3) for t in taus])
        return M.disjoint_mean(trimmed, M.elect_sign(trimmed)), hint
    if kind == "magnitude_prune":
        return sum(M.trim(t, 0.2) for t in taus), hint
    if kind == "dare":
        return sum(M.drop(t, 0.5, g) for t in taus), hint
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["lowrank+noise", "ties", "magnitude_prune", "dare"])
@pytest.mark.parametrize("shape,rank", [((700, 300), 8), ((300, 700), 24), ((500, 500), 12)])
def test_low_rank_truncated_svd_is_near_optimal_and_reports_exact_energy(kind, shape, rank):
    matrix, hint = _low_rank_inputs(kind, *shape, torch.Generator().manual_seed(sum(shape) + rank))
    b, a, energy, solver = M.low_rank(matrix, rank, torch.Generator().manual_seed(0), hint)
    # these shapes take the sketch, and it converges there (no full-SVD fallback)
    assert solver == "sketch"
    assert b.shape == (shape[0], rank) and a.shape == (rank, shape[1])
    approx = (b @ a).double()
    total = float(matrix.double().norm() ** 2)
    # the energy is what the factors keep, measured here directly
    assert energy == pytest.approx(float(approx.norm() ** 2) / total, rel=1e-5)
    # b @ a is an orthogonal projection of the matrix: the residual holds the rest
    assert float((matrix.double() - approx).norm() ** 2) / total == pytest.approx(1 - energy, rel=1e-4, abs=1e-6)
    # within 0.1% of the best rank-r approximation's energy (Eckart-Young)
    assert energy >= 0.999 * _optimal_energy(matrix, rank)
    again = M.low_rank(matrix, rank, torch.Generator().manual_seed(0), hint)
    assert torch.equal(again.b, b) and torch.equal(again.a, a) and again.energy == energy


def test_low_rank_falls_back_to_the_exact_svd_when_the_sketch_stalls():
    # Pure noise has a nearly flat spectrum: the subspace iteration gains a
    # little every step and does not converge, so low_rank takes the full SVD,
    # which is optimal. The same call on a low-rank-plus-noise update converges.
    noise = torch.randn(700, 300, generator=torch.Generator().manual_seed(7))
    flat = M.low_rank(noise, 8, torch.Generator().manual_seed(0))
    assert flat.solver == "svd"
    assert flat.energy == pytest.approx(_optimal_energy(noise, 8), rel=1e-5)
    matrix, hint = _low_rank_inputs("lowrank+noise", 700, 300, torch.Generator().manual_seed(7))
    assert M.low_rank(matrix, 8, torch.Generator().manual_seed(0), hint).solver == "sketch"


def test_low_rank_is_exact_at_full_rank_and_on_zero():
    g = torch.Generator().manual_seed(2)
    matrix = torch.randn(90, 40, generator=g)
    b, a, energy, solver = M.low_rank(matrix, 40, g)
    assert rel(b @ a, matrix) < 1e-5 and energy == pytest.approx(1.0) and solver == "svd"
    b, a, energy, solver = M.low_rank(matrix, 500, g)  # clamped to min(out, in)
    assert b.shape == (90, 40) and rel(b @ a, matrix) < 1e-5
    # exact low rank: the sketch captures it exactly on the truncated path too
    low = torch.randn(600, 5, generator=g) @ torch.randn(5, 400, generator=g)
    b, a, energy, solver = M.low_rank(low, 5, g)
    assert rel(b @ a, low) < 1e-5 and energy == pytest.approx(1.0) and solver == "sketch"
    b, a, energy, solver = M.low_rank(torch.zeros(600, 400), 8, g)
    assert energy == 1.0 and not (b @ a).any()


def _big_adapter(seed: int, r: int, out_dim: int = 384, in_dim: int = 320) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    module = "base_model.model.model.layers.0.mlp.up_proj"
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": ["up_proj"],
           "base_model_name_or_path": "big-base"}
    return Adapter(config=cfg, tensors={f"{module}.lora_A.weight": torch.randn(r, in_dim, generator=g) / in_dim ** 0.5,
                                        f"{module}.lora_B.weight": torch.randn(out_dim, r, generator=g) * 0.05})


@pytest.mark.parametrize("method,density", [("ties", 0.3), ("ties_svd", 0.5), ("dare_linear", 0.5),
                                            ("dare_ties_svd", 0.7), ("magnitude_prune", 0.2)])
def test_dense_merge_on_the_truncated_path_is_near_optimal(method, density):
    # 384 x 320 with three rank-8 inputs: rank 24 (or 8) plus oversampling is
    # small against 320, so the merge takes the subspace iteration, not the full SVD.
    inputs, weights = [_big_adapter(s, 8) for s in (1, 2, 3)], [0.8, -0.5, 1.1]
    merged, report = M.merge_with_report(inputs, weights, method=method, density=density, seed=4)
    module = merged.modules()[0]
    taus = [w * ref_delta(a, module) for w, a in zip(weights, inputs, strict=True)]
    gen = M._module_generator(4, module)
    masks = [(torch.rand(t.shape, generator=gen) < density).double() for t in taus]
    want = ref_dense(method, taus, density, masks, "total")
    r = merged.rank(module)
    assert r == (8 if method.endswith("_svd") else 24)
    got = out_delta(merged, module)
    energy = report.modules[module]["energy"]
    assert report.modules[module]["solver"] == "sketch"
    assert energy == pytest.approx(float(got.norm() ** 2 / want.norm() ** 2), rel=1e-4)
    assert energy >= 0.999 * _optimal_energy(want, r)
    s = torch.linalg.svdvals(want)
    assert float((got - want).norm() ** 2) <= 1.001 * float((s[r:] ** 2).sum()) + 1e-3 * float((s ** 2).sum())
    again = M.merge(inputs, weights, method=method, density=density, seed=4)
    assert all(torch.equal(t, again.tensors[k]) for k, t in merged.tensors.items())


# --- weights, seeds, modules --------------------------------------------------------------------


@pytest.mark.parametrize("method,kwargs", [("cat", {}), ("svd", {}), ("magnitude_prune", {"density": 0.5})])
def test_opposite_weights_cancel(ad, method, kwargs):
    merged = M.merge([ad["a"], ad["a"]], [0.7, -0.7], method=method, **kwargs)
    for module in merged.modules():
        assert float(out_delta(merged, module).abs().max()) < 1e-6


def test_ties_with_opposite_weights_keeps_the_elected_sign(ad):
    # +t and -t: the summed mass is 0, elected +1 (ties to +), so only the
    # positive entries of each survive: the result is |trim(t)|.
    merged = M.merge([ad["a"], ad["a"]], [0.7, -0.7], method="ties", density=0.5, rank=FULL)
    for module in merged.modules():
        want = ref_trim(0.7 * ref_delta(ad["a"], module), 0.5).abs()
        assert rel(out_delta(merged, module), want) < 1e-5


def test_dare_is_deterministic_per_seed(ad):
    args = ([ad["a"], ad["b"]], [1.0, 0.5])
    one = M.merge(*args, method="dare_ties", density=0.5, seed=3)
    two = M.merge(*args, method="dare_ties", density=0.5, seed=3)
    other = M.merge(*args, method="dare_ties", density=0.5, seed=4)
    for key, t in one.tensors.items():
        assert torch.equal(t, two.tensors[key])
    assert any(not torch.allclose(t, other.tensors[key]) for key, t in one.tensors.items())
    # density 1 keeps everything: dare_linear is then plain task arithmetic
    full = M.merge(*args, method="dare_linear", density=1.0, rank=FULL)
    exact = M.merge(*args, method="linear")
    for module in full.modules():
        assert rel(out_delta(full, module), out_delta(exact, module)) < 1e-5


def test_explicit_cpu_device_is_the_default(ad):
    args = ([ad["a"], ad["b"]], [1.0, -0.5])
    for method in ("ties", "dare_ties"):
        default = M.merge(*args, method=method, density=0.5, seed=2)
        cpu = M.merge(*args, method=method, density=0.5, seed=2, device=torch.device("cpu"))
        assert default.tensors.keys() == cpu.tensors.keys()
        assert all(torch.equal(t, cpu.tensors[k]) for k, t in default.tensors.items())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method,names,weights,density,sign", DENSE_CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(DENSE_CASES)])
def test_cuda_merge_matches_reference_and_returns_cpu_tensors(ad, method, names, weights, density, sign):
    inputs = [ad[n] for n in names]
    merged = M.merge(inputs, weights, method=method, density=density, rank=FULL, seed=11, majority_sign=sign,
                     device="cuda")
    assert all(t.device.type == "cpu" for t in merged.tensors.values())
    for module in merged.modules():
        taus = [w * ref_delta(a, module) for w, a in zip(weights, inputs, strict=True)]
        # Same seeding rule, drawn by the CUDA generator (other numbers than the CPU's).
        gen = M._module_generator(11, module, device=torch.device("cuda"))
        masks = [(torch.rand(t.shape, generator=gen, device="cuda") < density).double().cpu() for t in taus]
        assert rel(out_delta(merged, module), ref_dense(method, taus, density, masks, sign)) < 1e-4, module


def test_dare_seed_does_not_depend_on_module_set(ad):
    # union vs strict on the same module gives the same masks (one generator per module)
    module = "base_model.model.model.layers.1.self_attn.v_proj"
    strict = M.merge([ad["a"], ad["b"]], [1.0, 1.0], method="dare_linear", density=0.5, rank=FULL, seed=9)
    only = copy.deepcopy(ad["a"])
    only.tensors = {k: v for k, v in only.tensors.items() if k.startswith(module + ".")}
    b_only = copy.deepcopy(ad["b"])
    b_only.tensors = {k: v for k, v in b_only.tensors.items() if k.startswith(module + ".")}
    one = M.merge([only, b_only], [1.0, 1.0], method="dare_linear", density=0.5, rank=FULL, seed=9)
    assert rel(out_delta(one, module), out_delta(strict, module)) < 1e-5


def test_union_and_intersection_of_modules(ad):
    inputs, weights = [ad["a"], ad["qv"]], [0.5, 2.0]
    union = M.merge(inputs, weights, method="cat", modules="union")
    assert union.modules() == ad["a"].modules()
    for module in union.modules():
        want = 0.5 * ref_delta(ad["a"], module)
        if module in ad["qv"].modules():
            want = want + 2.0 * ref_delta(ad["qv"], module)
        assert rel(out_delta(union, module), want) < 1e-6
    assert union.config["target_modules"] == sorted(ALL_LINEAR)
    inter = M.merge(inputs, weights, method="svd", modules="intersection")
    assert inter.modules() == ad["qv"].modules()
    assert inter.config["target_modules"] == ["q_proj", "v_proj"]


def test_accepts_directories_and_keeps_base(dirs):
    merged = M.merge([dirs["a"], dirs["b"]], [1.0, 1.0], method="cat")
    assert merged.base_model_name == "tiny-base"
    assert merged.config["peft_type"] == "LORA" and merged.config["init_lora_weights"] is True


def test_dtype_numpy_weights_and_inputs_untouched(ad):
    import numpy as np

    bf = [copy.deepcopy(ad["a"]), copy.deepcopy(ad["b"])]
    for a in bf:
        a.tensors = {k: v.to(torch.bfloat16) for k, v in a.tensors.items()}
    before = {k: v.clone() for k, v in bf[0].tensors.items()}
    merged, report = M.merge_with_report(bf, np.array([0.5, 0.25], dtype=np.float32), method="svd",
                                         rank=np.int64(12))
    assert all(t.dtype == torch.bfloat16 for t in merged.tensors.values())
    assert all(torch.equal(v, bf[0].tensors[k]) for k, v in before.items())
    assert report.rank == 12 and type(report.rank) is int
    for module in merged.modules():
        want = 0.5 * ref_delta(bf[0], module) + 0.25 * ref_delta(bf[1], module)
        assert rel(out_delta(merged, module), want) < 2e-2


# --- errors ------------------------------------------------------------------------------------------


def _other_base(a):
    x = copy.deepcopy(a)
    x.config["base_model_name_or_path"] = "another-base"
    return x


def _wider(a):
    x = copy.deepcopy(a)
    key = next(k for k in x.tensors if k.endswith("lora_B.weight"))
    x.tensors[key] = torch.zeros(x.tensors[key].shape[0] + 1, x.tensors[key].shape[1])
    return x


def _with_extra(a):
    x = copy.deepcopy(a)
    x.tensors["base_model.model.lm_head.weight"] = torch.zeros(2, 2)
    return x


ERROR_CASES = [
    # id, adapters (names or callables), kwargs, exception, code
    ("unknown-method", ["a", "b"], {"weights": [1, 1], "method": "average"}, AdapterError, "invalid_method"),
    ("weights-length", ["a", "b"], {"weights": [1], "method": "cat"}, AdapterError, "invalid_weights"),
    ("weights-nan", ["a", "b"], {"weights": [1, float("nan")], "method": "cat"}, AdapterError, "invalid_weights"),
    ("weights-str", ["a", "b"], {"weights": [1, "x"], "method": "cat"}, AdapterError, "invalid_weights"),
    ("weights-not-list", ["a"], {"weights": 1.0, "method": "cat"}, AdapterError, "invalid_weights"),
    ("no-adapters", [], {"weights": [], "method": "cat"}, AdapterError, "invalid_weights"),
    ("density-missing", ["a", "b"], {"weights": [1, 1], "method": "ties"}, AdapterError, "invalid_density"),
    ("density-zero", ["a", "b"], {"weights": [1, 1], "method": "dare_ties", "density": 0.0}, AdapterError,
     "invalid_density"),
    ("density-above-1", ["a", "b"], {"weights": [1, 1], "method": "ties", "density": 1.5}, AdapterError,
     "invalid_density"),
    ("density-unused", ["a", "b"], {"weights": [1, 1], "method": "svd", "density": 0.5}, AdapterError,
     "invalid_density"),
    ("rank-for-cat", ["a", "b"], {"weights": [1, 1], "method": "cat", "rank": 4}, AdapterError, "invalid_rank"),
    ("rank-zero", ["a", "b"], {"weights": [1, 1], "method": "svd", "rank": 0}, AdapterError, "invalid_rank"),
    ("rank-float", ["a", "b"], {"weights": [1, 1], "method": "svd", "rank": 2.5}, AdapterError, "invalid_rank"),
    ("modules-mode", ["a", "b"], {"weights": [1, 1], "method": "cat", "modules": "all"}, AdapterError,
     "invalid_param"),
    ("sign-method", ["a", "b"], {"weights": [1, 1], "method": "ties", "density": 0.5, "majority_sign": "max"},
     AdapterError, "invalid_param"),
    ("different-bases", ["a", _other_base], {"weights": [1, 1], "method": "cat"}, IncompatibleAdapters,
     "different_bases"),
    ("different-modules", ["a", "qv"], {"weights": [1, 1], "method": "cat"}, IncompatibleAdapters,
     "different_modules"),
    ("shape-mismatch", ["a", _wider], {"weights": [1, 1], "method": "svd"}, AdapterError, "shape_mismatch"),
    ("extra-tensors", ["a", _with_extra], {"weights": [1, 1], "method": "cat"}, AdapterError, "unsupported_adapter"),
    ("device-unknown", ["a", "b"], {"weights": [1, 1], "method": "ties", "density": 0.5, "device": "gpu0"},
     AdapterError, "invalid_param"),
    ("device-unsupported", ["a", "b"], {"weights": [1, 1], "method": "ties", "density": 0.5, "device": "meta"},
     AdapterError, "invalid_param"),
    ("device-absent", ["a", "b"], {"weights": [1, 1], "method": "ties", "density": 0.5,
                                   "device": f"cuda:{torch.cuda.device_count()}"}, AdapterError, "invalid_param"),
]


@pytest.mark.parametrize("names,kwargs,exc,code", [c[1:] for c in ERROR_CASES], ids=[c[0] for c in ERROR_CASES])
def test_errors(ad, names, kwargs, exc, code):
    inputs = [n(ad["a"]) if callable(n) else ad[n] for n in names]
    with pytest.raises(exc) as info:
        M.merge(inputs, **kwargs)
    assert info.value.code == code
    assert str(info.value)


def test_registry_names_match_peft():
    from typing import get_args

    from peft import LoraModel

    hint = LoraModel.add_weighted_adapter.__annotations__["combination_type"]
    peft_names = set(get_args(eval(hint, vars(__import__("typing"))) if isinstance(hint, str) else hint))
    assert set(M.METHODS) == peft_names


# --- search_weights ----------------------------------------------------------------------------------


def test_search_weights_finds_target_mix(ad):
    inputs = [ad["a"], ad["b"], ad["c"]]
    target_w = [0.9, 0.0, -0.6]
    targets = {m: sum(w * ref_delta(a, m) for w, a in zip(target_w, inputs, strict=True)) for m in ad["a"].modules()}
    norm = sum(float(t.norm() ** 2) for t in targets.values())

    def score(merged):  # 1 - relative squared error to the target mix
        return 1 - sum(float((out_delta(merged, m) - t).norm() ** 2) for m, t in targets.items()) / norm

    weights, best, history = M.search_weights(inputs, score, "linear", budget=40, seed=1, l1=0.0)
    assert len(history) == 40
    assert best == max(h["score"] for h in history) == score(M.merge(inputs, weights, method="linear"))
    assert best > history[0]["score"] + 0.3 and best > 0.9
    assert all(-1.5 <= w <= 1.5 for h in history for w in h["weights"])
    again = M.search_weights(inputs, score, "linear", budget=40, seed=1, l1=0.0)
    assert again.weights == weights and again.history == history


def test_search_weights_l1_and_errors(ad):
    inputs = [ad["a"], ad["b"]]
    res = M.search_weights(inputs, lambda m: 0.0, "svd", budget=15, seed=0, l1=0.1)
    # a flat score: only the L1 penalty moves the search, towards smaller weights
    assert sum(map(abs, res.weights)) <= 1.0
    assert all(h["objective"] == pytest.approx(-0.1 * sum(map(abs, h["weights"]))) for h in res.history)
    nan = M.search_weights(inputs, lambda m: float("nan"), "cat", budget=3)
    assert nan.weights == [0.5, 0.5] and all(h["objective"] == -math.inf for h in nan.history)
    with pytest.raises(AdapterError, match="budget"):
        M.search_weights(inputs, lambda m: 0.0, budget=0)
    with pytest.raises(AdapterError, match="density"):
        M.search_weights(inputs, lambda m: 0.0, "ties", budget=2)
    with pytest.raises(AdapterError, match="bounds"):
        M.search_weights(inputs, lambda m: 0.0, budget=2, bounds=(1, -1))
    with pytest.raises(IncompatibleAdapters):
        M.search_weights([ad["a"], ad["qv"]], lambda m: 0.0, budget=2)
