"""ComPEFT: exact top-k selection, ternary round trip, the file format and its integrity checks."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.numpy import load as st_load_bytes
from safetensors.numpy import save as st_save_bytes

from adapters_ops import compeft
from adapters_ops.adapter import Adapter
from adapters_ops.errors import AdapterError, CorruptFile
from kernels.ternary import ternary_add_reference

LLAMA3_8B = [  # (module, in, out) of Llama-3-8B's linear layers
    ("self_attn.q_proj", 4096, 4096),
    ("self_attn.k_proj", 4096, 1024),
    ("self_attn.v_proj", 4096, 1024),
    ("self_attn.o_proj", 4096, 4096),
    ("mlp.gate_proj", 4096, 14336),
    ("mlp.up_proj", 4096, 14336),
    ("mlp.down_proj", 14336, 4096),
]
SMALL = [("self_attn.q_proj", 24, 24), ("self_attn.v_proj", 24, 8), ("mlp.down_proj", 40, 24)]


def make_adapter(shapes=SMALL, layers=2, rank=4, dtype=torch.float32, seed=0, quantize=None, config=None):
    """A LoRA adapter; `quantize=q` rounds values to multiples of q so that many magnitudes tie."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(layers):
        for mod, fin, fout in shapes:
            p = f"base_model.model.model.layers.{layer}.{mod}"
            a = torch.randn(rank, fin, generator=g) / math.sqrt(fin)
            b = torch.randn(fout, rank, generator=g) * 0.02
            if quantize:
                a, b = (torch.round(x / quantize) * quantize for x in (a, b))
            tensors[f"{p}.lora_A.weight"] = a.to(dtype)
            tensors[f"{p}.lora_B.weight"] = b.to(dtype)
    cfg = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": ["q_proj", "v_proj", "down_proj"]}
    cfg.update(config or {})
    return Adapter(config=cfg, tensors=tensors)


def expected_selection(tensors: dict[str, torch.Tensor], density: float):
    """Oracle: a full stable sort (largest magnitude first, ties by position), zeros never kept."""
    names = sorted(tensors)
    flat = torch.cat([tensors[n].float().reshape(-1) for n in names])
    k = compeft.keep_count(density, flat.numel())
    order = torch.sort(-flat.abs(), stable=True).indices
    keep = order[:k]
    keep = keep[flat[keep] != 0]
    mask = torch.zeros(flat.numel(), dtype=torch.bool)
    mask[keep] = True
    return names, flat, mask


def flat_of(adapter: Adapter, names):
    return torch.cat([adapter.tensors[n].float().reshape(-1) for n in names])


# ------------------------------------------------------------------------------------------
# selection, signs, scale
# ------------------------------------------------------------------------------------------
CASES = [
    # (id, dtype, quantize, density)
    ("fp32-d0.01", torch.float32, None, 0.01),
    ("fp32-d0.1", torch.float32, None, 0.1),
    ("fp32-d0.3", torch.float32, None, 0.3),
    ("fp32-d1", torch.float32, None, 1.0),
    ("bf16-d0.1", torch.bfloat16, None, 0.1),
    ("fp16-d0.2", torch.float16, None, 0.2),
    ("fp32-ties-d0.1", torch.float32, 0.01, 0.1),  # thousands of equal magnitudes at the threshold
    ("bf16-ties-d0.25", torch.bfloat16, 0.02, 0.25),
    ("fp16-ties-d0.05", torch.float16, 0.005, 0.05),
]


@pytest.mark.parametrize("dtype,quantize,density", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_global_keeps_exact_topk_signs_and_one_magnitude(dtype, quantize, density):
    adapter = make_adapter(dtype=dtype, quantize=quantize)
    comp = compeft.compress(adapter, density=density)
    names, flat, mask = expected_selection(adapter.tensors, density)
    k = compeft.keep_count(density, flat.numel())

    assert comp.count == int(mask.sum()) == min(k, int((flat != 0).sum()))
    out = compeft.loads(comp.to_bytes()).decompress()
    got = flat_of(out, names)
    assert torch.equal(got != 0, mask)  # exactly the oracle's positions, ties included
    assert torch.equal(torch.sign(got[mask]), torch.sign(flat[mask]))
    magnitudes = got[mask].abs().unique()
    assert magnitudes.numel() == 1  # one magnitude overall
    std = float(flat.double().std())
    expect = torch.tensor(np.float32(std), dtype=torch.float32).to(dtype).float()
    assert float(magnitudes[0]) == pytest.approx(float(expect), rel=1e-6)
    for name in names:
        assert out.tensors[name].dtype == dtype
        assert out.tensors[name].shape == adapter.tensors[name].shape


def test_ties_are_broken_by_position_in_sorted_name_order():
    # every entry has the same magnitude: the kept ones are the first k in (name, row-major) order
    t = {
        "base_model.model.b.lora_A.weight": torch.full((2, 5), -0.5),
        "base_model.model.a.lora_A.weight": torch.full((2, 5), 0.5),
        "base_model.model.a.lora_B.weight": torch.full((5, 2), 0.5),
        "base_model.model.b.lora_B.weight": torch.full((5, 2), 0.5),
    }
    adapter = Adapter({"peft_type": "LORA", "r": 2, "lora_alpha": 2}, t)
    comp = compeft.compress(adapter, density=0.3)  # k = 12 of 40
    counts = {n: ct.count for n, ct in comp.tensors.items()}
    assert counts == {
        "base_model.model.a.lora_A.weight": 10,
        "base_model.model.a.lora_B.weight": 2,
        "base_model.model.b.lora_A.weight": 0,
        "base_model.model.b.lora_B.weight": 0,
    }
    out = comp.decompress()
    assert torch.equal(out.tensors["base_model.model.a.lora_B.weight"].reshape(-1) != 0,
                       torch.tensor([True, True] + [False] * 8))


@pytest.mark.parametrize("density", [0.05, 0.1, 0.5])
@pytest.mark.parametrize("dtype,quantize", [(torch.float32, None), (torch.bfloat16, 0.02)])
def test_tensor_scope_selects_and_scales_per_tensor(density, dtype, quantize):
    adapter = make_adapter(dtype=dtype, quantize=quantize, seed=3)
    comp = compeft.compress(adapter, density=density, scope="tensor", replace_factor=2.0)
    out = comp.decompress()
    for name, t in adapter.tensors.items():
        _, flat, mask = expected_selection({name: t}, density)
        assert comp.tensors[name].count == int(mask.sum())
        got = out.tensors[name].float().reshape(-1)
        assert torch.equal(got != 0, mask)
        assert torch.equal(torch.sign(got[mask]), torch.sign(flat[mask]))
        expect = torch.tensor(np.float32(2.0 * float(flat.double().std())), dtype=torch.float32).to(dtype).float()
        assert got[mask].abs().unique().tolist() == [pytest.approx(float(expect), rel=1e-6)]


def test_fixed_alpha_and_replace_factor():
    adapter = make_adapter()
    a = compeft.compress(adapter, density=0.1, alpha=0.125)
    assert {t.scale for t in a.tensors.values()} == {0.125}
    r1 = compeft.compress(adapter, density=0.1)
    r3 = compeft.compress(adapter, density=0.1, replace_factor=3.0)
    s1 = {t.scale for t in r1.tensors.values()}
    s3 = {t.scale for t in r3.tensors.values()}
    assert len(s1) == len(s3) == 1
    assert s3.pop() == pytest.approx(3 * s1.pop(), rel=1e-6)
    with pytest.raises(AdapterError):
        a.with_replace_factor(2.0)  # no std to rescale from


def test_zeros_are_never_kept():
    adapter = make_adapter(seed=1)
    for name in adapter.tensors:
        if "lora_B" in name:
            adapter.tensors[name] = torch.zeros_like(adapter.tensors[name])  # a freshly initialised LoRA
    nonzero = sum(int((t != 0).sum()) for t in adapter.tensors.values())
    comp = compeft.compress(adapter, density=0.9)  # k is more than the non-zero entries
    assert comp.count == nonzero
    out = comp.decompress()
    for name, t in adapter.tensors.items():
        assert torch.equal(out.tensors[name] != 0, t != 0)
    per_tensor = compeft.compress(adapter, density=0.5, scope="tensor")
    assert all(per_tensor.tensors[n].count == 0 for n in adapter.tensors if "lora_B" in n)


# ------------------------------------------------------------------------------------------
# file format
# ------------------------------------------------------------------------------------------
CONFIGS = [
    {"use_rslora": True},
    {"rank_pattern": {"q_proj": 8}, "alpha_pattern": {"down_proj": 3}},
    {"use_rslora": True, "rank_pattern": {"layers.1.self_attn.v_proj": 2}, "task_type": "CAUSAL_LM"},
]


@pytest.mark.parametrize("extra", CONFIGS, ids=["rslora", "patterns", "rslora+patterns"])
def test_save_load_round_trip_keeps_config(tmp_path, extra):
    adapter = make_adapter(config=extra, dtype=torch.bfloat16)
    comp = compeft.compress(adapter, density=0.2, scope="tensor")
    path = comp.save(tmp_path / "x.compeft.safetensors")
    assert path.stat().st_size == comp.nbytes
    loaded = compeft.load(path)
    assert loaded.params == comp.params
    out = loaded.decompress()
    assert out.config == adapter.config
    for module in adapter.modules():
        assert out.scaling(module) == adapter.scaling(module)
    direct = comp.decompress()
    assert set(out.tensors) == set(adapter.tensors)
    for name in adapter.tensors:
        assert torch.equal(out.tensors[name], direct.tensors[name])
    # a directory gets the standard file name; load finds it
    comp.save(tmp_path)
    assert compeft.load(tmp_path).to_bytes() == comp.to_bytes()
    # the decompressed adapter is a normal PEFT adapter on disk
    out.save(tmp_path / "peft")
    again = Adapter.load(tmp_path / "peft")
    assert again.config == adapter.config


def tiny_file() -> bytes:
    return compeft.compress(make_adapter(shapes=[("q_proj", 6, 5)], layers=1, rank=2), density=0.3).to_bytes()


def test_every_flipped_byte_is_rejected():
    data = tiny_file()
    compeft.loads(data)  # intact
    for i in range(len(data)):
        for mask in (0x01, 0x80):
            bad = bytearray(data)
            bad[i] ^= mask
            with pytest.raises(CorruptFile):
                compeft.loads(bytes(bad))


@pytest.mark.parametrize("cut", [0, 7, 8, 20, "header-1", "half", "last"])
def test_truncated_file_is_rejected(tmp_path, cut):
    data = tiny_file()
    header = 8 + int.from_bytes(data[:8], "little")
    n = {"header-1": header - 1, "half": len(data) // 2, "last": len(data) - 1}.get(cut, cut)
    p = tmp_path / "t.safetensors"
    p.write_bytes(data[:n])
    with pytest.raises(CorruptFile, match="truncated|damaged|not a valid|checksum"):
        compeft.load(p)


def test_appended_bytes_are_rejected():
    with pytest.raises(CorruptFile):
        compeft.loads(tiny_file() + b"\0")


def _rewrite(data: bytes, edit) -> bytes:
    """Re-save with edited metadata and a valid checksum (a well-formed but wrong file)."""
    n = int.from_bytes(data[:8], "little")
    meta = json.loads(data[8 : 8 + n])["__metadata__"]
    payloads = st_load_bytes(data)
    edit(meta, payloads)
    meta["checksum"] = compeft._checksum(meta, payloads)
    return st_save_bytes(payloads, metadata=meta)


def test_wrong_format_version_and_foreign_files(tmp_path):
    data = tiny_file()
    with pytest.raises(CorruptFile, match="version '2'"):
        compeft.loads(_rewrite(data, lambda m, p: m.update(format_version="2")))
    with pytest.raises(CorruptFile, match="unsupported codec"):
        compeft.loads(_rewrite(data, lambda m, p: m.update(
            tensors=m["tensors"].replace('"codec":"rice"', '"codec":"zstd"'))))
    with pytest.raises(CorruptFile, match="not a compeft file"):
        compeft.loads(st_save_bytes({"x": np.zeros(3, np.float32)}, metadata={"format": "pt"}))
    with pytest.raises(CorruptFile, match="position stream|remainder|outside"):
        compeft.loads(_rewrite(data, lambda m, p: m.update(
            tensors=json.dumps({k: {**v, "count": v["count"] + 1} for k, v in json.loads(m["tensors"]).items()}))))
    with pytest.raises(CorruptFile, match="inconsistent"):  # would allocate 2^40 entries
        compeft.loads(_rewrite(data, lambda m, p: m.update(
            tensors=json.dumps({k: {**v, "shape": [1 << 20, 1 << 20]} for k, v in json.loads(m["tensors"]).items()}))))
    with pytest.raises(AdapterError, match="cannot read"):
        compeft.load(tmp_path / "missing.safetensors")


# ------------------------------------------------------------------------------------------
# size: near the entropy bound, 25x smaller than bf16 for a Llama-3-8B-shaped LoRA
# ------------------------------------------------------------------------------------------
def h2(p):
    return -(p * math.log2(p) + (1 - p) * math.log2(1 - p)) if 0 < p < 1 else 0.0


def test_llama3_8b_shaped_lora_is_25x_smaller_than_bf16(tmp_path):
    # 2 of Llama-3-8B's 32 layers: every tensor has its full shape, so ratios carry over
    adapter = make_adapter(shapes=LLAMA3_8B, layers=2, rank=16, dtype=torch.bfloat16)
    bf16_dir = adapter.save(tmp_path / "bf16")
    bf16_size = (bf16_dir / "adapter_model.safetensors").stat().st_size
    comp = compeft.compress(adapter, density=0.1)
    assert comp.count == compeft.keep_count(0.1, adapter.num_parameters())
    assert bf16_size / comp.nbytes >= 25
    for t in comp.tensors.values():
        n, d = t.numel, t.count / t.numel
        position_bits = (t.unary.size + t.rem.size) * 8
        assert position_bits <= 1.03 * n * h2(d) + 16  # Rice within 3% of the entropy of the positions
        assert t.signs.size == math.ceil(t.count / 8)  # one bit per kept entry
    # the entropy bound of a ternary tensor, H(d) + d bits per entry, at each tensor's own density
    bound = sum(t.numel * (h2(t.count / t.numel) + t.count / t.numel) for t in comp.tensors.values())
    payload_bits = sum(t.payload().size * 8 for t in comp.tensors.values())
    assert payload_bits <= 1.02 * bound
    assert comp.nbytes * 8 <= 1.10 * bound  # + the JSON header (~5% here: per-tensor names and fields)


# ------------------------------------------------------------------------------------------
# Rice code
# ------------------------------------------------------------------------------------------
RICE_CASES = [
    ("one-at-0", [0], 1),
    ("last", [99], 100),
    ("consecutive", list(range(10, 40)), 50),
    ("big-gaps", [5, 100_000, 2_000_000, 2_000_001], 3_000_000),
    ("mixed", [0, 1, 3, 7, 15, 31, 63, 64, 200], 201),
]


@pytest.mark.parametrize("positions,numel", [c[1:] for c in RICE_CASES], ids=[c[0] for c in RICE_CASES])
def test_rice_round_trip(positions, numel):
    pos = np.array(positions, dtype=np.int64)
    b, unary, rem = compeft.rice_encode(pos)
    got = compeft.rice_decode(b, np.frombuffer(unary, np.uint8), np.frombuffer(rem, np.uint8), pos.size, numel, "t")
    assert got.tolist() == positions


def test_rice_random_positions_round_trip():
    rng = np.random.default_rng(7)
    for density in (0.001, 0.05, 0.3, 0.9):
        mask = rng.random(20_000) < density
        pos = np.flatnonzero(mask)
        b, unary, rem = compeft.rice_encode(pos)
        got = compeft.rice_decode(b, np.frombuffer(unary, np.uint8), np.frombuffer(rem, np.uint8), pos.size, 20_000, "t")
        assert np.array_equal(got, pos)


def test_rice_decode_rejects_inconsistent_streams():
    pos = np.array([3, 9, 40])
    b, unary, rem = compeft.rice_encode(pos)
    u, r = np.frombuffer(unary, np.uint8), np.frombuffer(rem, np.uint8)
    with pytest.raises(CorruptFile, match="position"):
        compeft.rice_decode(b, u, r, 4, 100, "t")
    with pytest.raises(CorruptFile, match="outside"):
        compeft.rice_decode(b, u, r, 3, 40, "t")
    with pytest.raises(CorruptFile, match="remainder"):
        compeft.rice_decode(b, u, r[:-1] if r.size else np.zeros(1, np.uint8), 3, 100, "t")


# ------------------------------------------------------------------------------------------
# device form, choose_scale, bad input
# ------------------------------------------------------------------------------------------
def test_packed_device_form_matches_dense_decode():
    adapter = make_adapter(dtype=torch.bfloat16)
    comp = compeft.compress(adapter, density=0.2, scope="tensor")
    dense = comp.decompress()
    for name, t in comp.tensors.items():
        w = torch.zeros(t.shape, dtype=torch.bfloat16)
        ternary_add_reference(w, t.ternary_packed(name), t.scale)
        assert torch.equal(w, dense.tensors[name])


def test_choose_scale_picks_the_best_factor_by_score():
    adapter = make_adapter()
    target = 3 * float(flat_of(adapter, sorted(adapter.tensors)).double().std())
    seen = []

    def score(candidate: Adapter) -> float:
        mag = max(float(t.abs().max()) for t in candidate.tensors.values())
        seen.append(mag)
        return -abs(mag - target)

    choice = compeft.choose_scale(adapter, 0.1, score, candidates=[0.5, 1.0, 3.0, 5.0])
    assert choice.replace_factor == 3.0
    assert list(choice.scores) == [0.5, 1.0, 3.0, 5.0]
    assert len(seen) == 4
    ref = compeft.compress(adapter, density=0.1, replace_factor=3.0)
    assert choice.compressed.to_bytes() == ref.to_bytes()

    tie = compeft.choose_scale(adapter, 0.1, lambda a: 1.0, candidates=[2.0, 1.0])
    assert tie.replace_factor == 2.0  # ties go to the first candidate
    results = iter([float("nan"), -5.0])
    nan_first = compeft.choose_scale(adapter, 0.1, lambda a: next(results), candidates=[1.0, 2.0])
    assert nan_first.replace_factor == 2.0
    with pytest.raises(AdapterError, match="NaN"):
        compeft.choose_scale(adapter, 0.1, lambda a: float("nan"), candidates=[1.0])
    with pytest.raises(AdapterError):
        compeft.choose_scale(adapter, 0.1, lambda a: 0.0, candidates=[])


BAD = [
    ("density-0", {"density": 0}, "invalid_density"),
    ("density-1.5", {"density": 1.5}, "invalid_density"),
    ("density-str", {"density": "0.1"}, "invalid_density"),
    ("density-nan", {"density": float("nan")}, "invalid_density"),
    ("scope", {"scope": "layer"}, "invalid_scope"),
    ("alpha-neg", {"alpha": -1.0}, "invalid_alpha"),
    ("replace-factor-0", {"replace_factor": 0.0}, "invalid_replace_factor"),
]


@pytest.mark.parametrize("kwargs,code", [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_bad_parameters(kwargs, code):
    with pytest.raises(AdapterError) as exc:
        compeft.compress(make_adapter(), **kwargs)
    assert exc.value.code == code


@pytest.mark.parametrize("value,code", [(float("nan"), "non_finite"), (float("inf"), "non_finite")])
def test_non_finite_values_are_rejected(value, code):
    adapter = make_adapter()
    name = sorted(adapter.tensors)[1]
    adapter.tensors[name][0, 0] = value
    with pytest.raises(AdapterError) as exc:
        compeft.compress(adapter)
    assert exc.value.code == code and name in str(exc.value)


def test_non_float_and_empty_adapters_are_rejected():
    adapter = make_adapter()
    adapter.tensors[sorted(adapter.tensors)[0]] = torch.zeros(4, 24, dtype=torch.int8)
    with pytest.raises(AdapterError, match="floating point"):
        compeft.compress(adapter)
    with pytest.raises(AdapterError, match="no tensors"):
        compeft.compress(Adapter({"peft_type": "LORA"}, {}))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_decompress_on_cuda_matches_cpu(dtype):
    comp = compeft.compress(make_adapter(dtype=dtype), density=0.2, scope="tensor")
    cpu = comp.decompress()
    gpu = comp.decompress(device="cuda")  # 2-bit device form + the Triton kernel
    for name, t in cpu.tensors.items():
        assert gpu.tensors[name].is_cuda and gpu.tensors[name].dtype == dtype
        assert torch.equal(gpu.tensors[name].cpu(), t)
