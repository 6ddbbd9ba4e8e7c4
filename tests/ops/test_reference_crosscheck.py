"""Cross-checks of adapters_ops.merge against the references a library user would reach for:
PEFT's `peft.utils.merge_utils` (installed with peft) and mergekit's generalized task arithmetic
(re-stated below from its published algorithm: mergekit's pins do not fit ours). Where the
definitions differ (docs/merge.md's comparison table), the test states the exact relation
instead of a tolerance that would hide it.

Our side is `merge.dense_updates` (each module's merged update, dense) on real Adapter objects;
the references get the same per-adapter updates tau_i = scaling_i * B_i @ A_i.
"""

from __future__ import annotations

import pytest
import torch
from peft.utils import merge_utils as peft_merge

from adapters_ops import merge
from adapters_ops.adapter import Adapter

DENSITY = 0.5  # density * numel is integral for every module: both sides keep the same count


def random_lora(seed: int, r: int = 4, hidden: int = 48) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(2):
        for target in ("q_proj", "v_proj"):
            key = f"base_model.model.model.layers.{layer}.self_attn.{target}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(r, hidden, generator=g, dtype=torch.float64).float()
            tensors[f"{key}.lora_B.weight"] = torch.randn(hidden, r, generator=g, dtype=torch.float64).float()
    return Adapter({"peft_type": "LORA", "r": r, "lora_alpha": 2 * r, "target_modules": ["q_proj", "v_proj"]},
                   tensors)


@pytest.fixture(scope="module")
def adapters() -> list[Adapter]:
    return [random_lora(1), random_lora(2), random_lora(3)]


def taus(adapters, module) -> list[torch.Tensor]:
    return [a.delta(module).double() for a in adapters]


def close(ours: torch.Tensor, theirs: torch.Tensor) -> bool:
    return torch.allclose(ours.double(), theirs.double(), rtol=1e-5, atol=1e-6 * float(theirs.abs().max()))


# --- mergekit's generalized task arithmetic, re-stated -----------------------------------------
def mergekit_magnitude_sparsify(tau: torch.Tensor, density: float) -> torch.Tensor:
    k = int(density * tau.numel())
    keep = torch.zeros(tau.numel(), dtype=torch.bool)
    keep[tau.abs().flatten().topk(k).indices] = True
    return tau * keep.view_as(tau)


def mergekit_ties(deltas: list[torch.Tensor], weights: list[float], density: float) -> torch.Tensor:
    """Sparsify each delta by magnitude, weight, elect the sign of the weighted sum, sum the agreeing
    weighted entries and divide by the sum of the agreeing weights (mergekit's normalize=True)."""
    stacked = torch.stack([mergekit_magnitude_sparsify(d, density) for d in deltas])
    w = torch.tensor(weights, dtype=stacked.dtype).view(-1, 1, 1)
    weighted = stacked * w
    sign = torch.where(weighted.sum(0) >= 0, 1.0, -1.0).to(stacked.dtype)
    agree = (weighted.sign() == sign) & (weighted != 0)
    divisor = (w * agree).sum(0)
    divisor[divisor == 0] = 1
    return (weighted * agree).sum(0) / divisor


# --- PEFT merge_utils ----------------------------------------------------------------------------
@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], [0.7, 0.7, 0.7]])
def test_ties_matches_peft_for_equal_weights(adapters, weights):
    updates = merge.dense_updates(adapters, weights, method="ties", density=DENSITY)
    for module, ours in updates.items():
        theirs = peft_merge.ties(taus(adapters, module), torch.tensor(weights, dtype=torch.float64), DENSITY)
        assert close(ours, theirs), module


def test_ties_sign_election_differs_from_peft_for_unequal_weights(adapters):
    """PEFT elects the sign on the unweighted trimmed updates, we on the weighted ones (like mergekit):
    with unequal weights some entries get another sign, so the two results differ (docs/merge.md)."""
    weights = [3.0, 0.2, 0.2]
    module = adapters[0].modules()[0]
    ours = merge.dense_updates(adapters, weights, method="ties", density=DENSITY)[module]
    theirs = peft_merge.ties(taus(adapters, module), torch.tensor(weights, dtype=torch.float64), DENSITY)
    assert not close(ours, theirs)
    # ...and equal to the definition we document: weighted election, mean over agreeing entries
    stacked = torch.stack([w * peft_merge.magnitude_based_pruning(t, DENSITY)
                           for w, t in zip(weights, taus(adapters, module), strict=True)])
    assert close(ours, peft_merge.disjoint_merge(stacked, peft_merge.calculate_majority_sign_mask(stacked)))


@pytest.mark.parametrize("weights", [[1.0, 1.0, 1.0], [0.5, 2.0, -1.0]])
def test_magnitude_prune_matches_peft(adapters, weights):
    updates = merge.dense_updates(adapters, weights, method="magnitude_prune", density=DENSITY)
    for module, ours in updates.items():
        theirs = peft_merge.magnitude_prune(taus(adapters, module), torch.tensor(weights, dtype=torch.float64),
                                            DENSITY)
        assert close(ours, theirs), module


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_matches_peft_with_the_same_masks(adapters, method):
    """PEFT draws DARE masks from torch's global generator; with our public masks fed to PEFT's own
    primitives (its rescale by 1/density, its sign election and disjoint merge) the results agree."""
    weights = [1.0, 1.0, 1.0]
    updates = merge.dense_updates(adapters, weights, method=method, density=DENSITY, seed=5)
    masks = merge.dare_masks(adapters, density=DENSITY, seed=5)
    w = torch.tensor(weights, dtype=torch.float64)
    for module, ours in updates.items():
        pruned = [m.double() * t / DENSITY for m, t in zip(masks[module], taus(adapters, module), strict=True)]
        if method == "dare_linear":
            theirs = peft_merge.task_arithmetic(pruned, w)
        else:
            stacked = torch.stack(pruned)
            sign = peft_merge.calculate_majority_sign_mask(stacked)
            theirs = peft_merge.disjoint_merge(stacked * w.view(-1, 1, 1), sign)
        assert close(ours, theirs), (method, module)


# --- mergekit --------------------------------------------------------------------------------------
def test_ties_matches_mergekit_at_unit_weights(adapters):
    updates = merge.dense_updates(adapters, [1.0, 1.0, 1.0], method="ties", density=DENSITY)
    for module, ours in updates.items():
        assert close(ours, mergekit_ties(taus(adapters, module), [1.0, 1.0, 1.0], DENSITY)), module


def test_ties_is_mergekit_times_the_weight_for_equal_weights(adapters):
    """mergekit divides by the sum of the agreeing weights, we (and PEFT) by their count: for equal
    weights w ours is exactly w times mergekit's (docs/merge.md)."""
    w = 0.4
    module = adapters[0].modules()[1]
    ours = merge.dense_updates(adapters, [w] * 3, method="ties", density=DENSITY)[module]
    theirs = mergekit_ties(taus(adapters, module), [w] * 3, DENSITY)
    assert close(ours, w * theirs) and not close(ours, theirs)


def test_merged_adapter_at_full_rank_stores_the_reference_update(adapters):
    """The stored factors, not only the dense update: rank='full' keeps PEFT's ties result exactly."""
    merged = merge.merge(adapters, [1.0, 1.0, 1.0], method="ties", density=DENSITY, rank="full")
    for module in merged.modules():
        theirs = peft_merge.ties(taus(adapters, module), torch.ones(3, dtype=torch.float64), DENSITY)
        assert close(merged.delta(module), theirs), module
