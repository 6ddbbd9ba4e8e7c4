"""ComPEFT: exact top-k selection, ternary round trip, the file format and its integrity checks."""

from __future__ import annotations

import base64
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.numpy import load as st_load_bytes
from safetensors.numpy import save as st_save_bytes

from adapter_kernels.ternary import ternary_add_reference
from adapters_ops import compeft
from adapters_ops.adapter import Adapter
from adapters_ops.errors import AdapterError, CorruptFile

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


def _signed(blob: bytes, version: str = "2", extra: dict | None = None) -> bytes:
    """A container around `blob` with a valid checksum: a crafted file, not a damaged one."""
    payloads = {compeft.BLOB_NAME: np.frombuffer(blob, np.uint8), **(extra or {})}
    meta = {"format": "compeft", "format_version": version}
    meta["checksum"] = compeft._checksum(meta, payloads)
    return st_save_bytes(payloads, metadata=meta)


def _crafted(changes) -> bytes:
    """The tiny file re-written with `changes(tensor)` applied to every tensor (the writer trusts its input)."""
    comp = compeft.loads(tiny_file())
    tensors = {n: replace(t, **changes(t)) for n, t in comp.tensors.items()}
    return compeft.CompressedAdapter(config=comp.config, tensors=tensors, params=comp.params).to_bytes()


def _blob(data: bytes) -> bytes:
    return st_load_bytes(data)[compeft.BLOB_NAME].tobytes()


CRAFTED = [
    ("count+1", lambda: _crafted(lambda t: {"count": t.count + 1}), "position stream|remainder|ends early"),
    ("2^40 entries", lambda: _crafted(lambda t: {"shape": (1 << 20, 1 << 20)}), "inconsistent"),
    ("7 magnitude bits", lambda: _crafted(lambda t: {"magnitude_bits": 7, "levels": (1.0,) * 128}), "magnitude bits"),
    ("nan scale", lambda: _crafted(lambda t: {"scale": float("nan")}), "not finite"),
    ("trailing bytes", lambda: _signed(_blob(tiny_file()) + b"\0"), "after the last payload"),
    ("v2 body labelled v1", lambda: _signed(_blob(tiny_file()), version="1"), "malformed"),
    ("second tensor", lambda: _signed(_blob(tiny_file()), extra={"x": np.zeros(2, np.uint8)}), "expected one"),
    ("not zlib", lambda: _signed(b"\x05hello"), "malformed|ends early"),
    ("version 3", lambda: _signed(_blob(tiny_file()), version="3"), "version '3'"),
]


@pytest.mark.parametrize("make,match", [c[1:] for c in CRAFTED], ids=[c[0] for c in CRAFTED])
def test_crafted_files_with_valid_checksums_are_rejected(make, match):
    with pytest.raises(CorruptFile, match=match):
        compeft.loads(make())


def test_foreign_and_missing_files(tmp_path):
    with pytest.raises(CorruptFile, match="not a compeft file"):
        compeft.loads(st_save_bytes({"x": np.zeros(3, np.float32)}, metadata={"format": "pt"}))
    with pytest.raises(AdapterError, match="cannot read"):
        compeft.load(tmp_path / "missing.safetensors")


# A version 1 file (JSON metadata per tensor) written by the previous release: A = [[.5, -.25, .125],
# [0, 1, -2]], B = [[.75, -.5], [0, 3]], density 0.5; five entries kept at std = 1.2671736.
V1_FILE = base64.b64decode(
    "WAMAAAAAAAB7Il9fbWV0YWRhdGFfXyI6eyJhZGFwdGVyX2NvbmZpZyI6IntcImxvcmFfYWxwaGFcIjogNCwgXCJwZWZ0X3R5cGVc"
    "IjogXCJMT1JBXCIsIFwiclwiOiAyfSIsImNoZWNrc3VtIjoic2hhMjU2OjkwNDhlNWUyNmRmZjA1NjU3N2Y1YzBjZjlhNDg0ZTZi"
    "YTlmYjk5ZDIwMTNhZmZmY2I2MTQyZTZhZDg1NmNmNjQiLCJjb21wcmVzc2lvbiI6IntcImFscGhhXCI6IG51bGwsIFwiZGVuc2l0"
    "eVwiOiAwLjUsIFwia1wiOiA1LCBcIm5cIjogMTAsIFwicmVwbGFjZV9mYWN0b3JcIjogMS4wLCBcInNjb3BlXCI6IFwiZ2xvYmFs"
    "XCJ9IiwiZm9ybWF0IjoiY29tcGVmdCIsImZvcm1hdF92ZXJzaW9uIjoiMSIsInRlbnNvcnMiOiJ7XCJiYXNlX21vZGVsLm1vZGVs"
    "LnEubG9yYV9BLndlaWdodFwiOntcImJcIjowLFwiY29kZWNcIjpcInJpY2VcIixcImNvdW50XCI6MyxcImR0eXBlXCI6XCJmbG9h"
    "dDMyXCIsXCJzY2FsZVwiOlwiMS4yNjcxNzM2XCIsXCJzaGFwZVwiOlsyLDNdLFwic3RkXCI6MS4yNjcxNzM2OTIzODI2NDV9LFwi"
    "YmFzZV9tb2RlbC5tb2RlbC5xLmxvcmFfQi53ZWlnaHRcIjp7XCJiXCI6MCxcImNvZGVjXCI6XCJyaWNlXCIsXCJjb3VudFwiOjIs"
    "XCJkdHlwZVwiOlwiZmxvYXQzMlwiLFwic2NhbGVcIjpcIjEuMjY3MTczNlwiLFwic2hhcGVcIjpbMiwyXSxcInN0ZFwiOjEuMjY3"
    "MTczNjkyMzgyNjQ1fX0ifSwiYmFzZV9tb2RlbC5tb2RlbC5xLmxvcmFfQS53ZWlnaHQiOnsiZHR5cGUiOiJVOCIsInNoYXBlIjpb"
    "Ml0sImRhdGFfb2Zmc2V0cyI6WzAsMl19LCJiYXNlX21vZGVsLm1vZGVsLnEubG9yYV9CLndlaWdodCI6eyJkdHlwZSI6IlU4Iiwi"
    "c2hhcGUiOlsyXSwiZGF0YV9vZmZzZXRzIjpbMiw0XX19ICAgICAgIIwAkA=="
)


def test_version_1_files_are_still_read():
    comp = compeft.loads(V1_FILE)
    s = float(np.float32(1.2671736))
    out = comp.decompress()
    assert out.tensors["base_model.model.q.lora_A.weight"].tolist() == [[s, 0, 0], [0, s, -s]]
    assert out.tensors["base_model.model.q.lora_B.weight"].tolist() == [[s, 0], [0, s]]
    assert comp.params == compeft.CompressParams(density=0.5)
    assert out.config == {"peft_type": "LORA", "r": 2, "lora_alpha": 4}
    for i in range(len(V1_FILE)):  # its integrity checks still hold
        bad = bytearray(V1_FILE)
        bad[i] ^= 0x01
        with pytest.raises(CorruptFile):
            compeft.loads(bytes(bad))


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
    assert comp.nbytes * 8 <= 1.03 * bound  # + the head: config, parameters and ~8 bytes a tensor


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


# ------------------------------------------------------------------------------------------
# beyond the paper's rule: magnitude levels and the balanced factorisation
# ------------------------------------------------------------------------------------------
def product_error(adapter: Adapter, restored: Adapter) -> float:
    """||B^ A^ - B A||_F / ||B A||_F over all modules together."""
    num = sum(float(torch.linalg.norm(restored.delta(m) - adapter.delta(m)) ** 2) for m in adapter.modules())
    return math.sqrt(num / sum(float(torch.linalg.norm(adapter.delta(m)) ** 2) for m in adapter.modules()))


def trained_like_adapter(seed=0, layers=2, rank=8):
    """Like an adapter trained from PEFT's init: A keeps its large random start, B grows small and low-rank."""
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(layers):
        for mod, fin, fout in [("q_proj", 128, 128), ("up_proj", 128, 256), ("down_proj", 256, 128)]:
            p = f"base_model.model.model.layers.{layer}.mlp.{mod}"
            a = (torch.rand(rank, fin, generator=g) * 2 - 1) / math.sqrt(fin)
            b = torch.randn(fout, 2, generator=g) @ torch.randn(2, rank, generator=g) * 0.01
            b += 0.002 * torch.randn(fout, rank, generator=g)
            tensors[f"{p}.lora_A.weight"], tensors[f"{p}.lora_B.weight"] = a, b
    return Adapter({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank}, tensors)


@pytest.mark.parametrize("density", [0.1, 0.3])
@pytest.mark.parametrize("seed", [0, 1])
def test_levels_and_balanced_factors_cut_the_product_error(density, seed):
    adapter = trained_like_adapter(seed)
    paper = min(  # the paper's rule at its best replace_factor, as choose_scale would find it
        product_error(adapter, compeft.compress(adapter, density=density, replace_factor=f).decompress())
        for f in compeft.DEFAULT_CANDIDATES + (1.5, 4.0)
    )
    errors = {}
    for bits in (0, 2, 3):
        for fac in ("as_is", "balanced"):
            comp = compeft.compress(adapter, density=density, scope="tensor", magnitude_bits=bits, factorization=fac)
            errors[bits, fac] = product_error(adapter, comp.decompress())
    assert errors[2, "balanced"] < 0.8 * paper
    assert errors[3, "balanced"] < errors[2, "balanced"] < errors[0, "balanced"]
    assert errors[2, "balanced"] < errors[2, "as_is"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_magnitude_levels_keep_the_selection_and_round_trip_exactly(dtype):
    adapter = make_adapter(dtype=dtype, seed=5)
    ternary = compeft.compress(adapter, density=0.2, scope="tensor").decompress()
    comp = compeft.compress(adapter, density=0.2, scope="tensor", magnitude_bits=2)
    out = comp.decompress()
    loaded = compeft.loads(comp.to_bytes())
    assert loaded.params == comp.params and loaded.params.magnitude_bits == 2
    for name, t in adapter.tensors.items():
        got = out.tensors[name]
        assert got.dtype == dtype
        assert torch.equal(got != 0, ternary.tensors[name] != 0)  # same positions as the paper's rule
        assert torch.equal(torch.sign(got), torch.sign(ternary.tensors[name]))  # same signs
        assert got[got != 0].abs().unique().numel() <= 4
        ct, back = comp.tensors[name], loaded.tensors[name]
        assert (back.scale, back.std, back.levels) == (ct.scale, ct.std, ct.levels)
        assert np.array_equal(back.level_codes(), ct.level_codes())
        assert torch.equal(loaded.decompress().tensors[name], got)
        if dtype == torch.float32:  # each kept entry decodes to the level nearest its magnitude
            kept = t[got != 0].abs()
            mags = torch.tensor([ct.scale * lv for lv in ct.levels])
            nearest = mags[(kept[:, None] - mags[None]).abs().argmin(1)]
            assert torch.equal(got[got != 0].abs(), nearest)
    doubled = comp.with_replace_factor(2.0).decompress()
    for name in adapter.tensors:
        expect = (out.tensors[name].float() * 2).to(dtype).float()
        assert torch.allclose(doubled.tensors[name].float(), expect, rtol=1e-2)
    with pytest.raises(AdapterError) as exc:
        comp.tensors[name].ternary_packed(name)
    assert exc.value.code == "not_ternary"


def test_fit_levels_finds_clusters():
    x = np.array([1.0, 1.0, 1.1, 5.0, 5.2, 9.0, 9.0, 9.0, 20.0])
    centers, codes = compeft.fit_levels(x, 4)
    assert centers.tolist() == pytest.approx([31 / 30, 5.1, 9.0, 20.0])
    assert codes.tolist() == [0, 0, 0, 1, 1, 2, 2, 2, 3]
    centers, codes = compeft.fit_levels(np.array([2.0, 2.0]), 4)  # fewer values than levels
    assert codes.tolist() == [codes[0]] * 2 and centers[codes[0]] == 2.0


@pytest.mark.parametrize("rank,fin,fout", [(4, 24, 40), (8, 5, 30), (3, 2, 2)])
def test_balanced_pair_keeps_the_product_and_balances_the_factors(rank, fin, fout):
    g = torch.Generator().manual_seed(rank)
    a = torch.randn(rank, fin, generator=g) * 3
    b = torch.randn(fout, rank, generator=g) * 0.01
    a2, b2 = compeft.balanced_pair(a, b)
    assert a2.shape == a.shape and b2.shape == b.shape and a2.dtype == a.dtype
    assert torch.allclose(b2 @ a2, b @ a, atol=1e-6 * float((b @ a).abs().max()))
    row_norms, col_norms = torch.linalg.norm(a2, dim=1), torch.linalg.norm(b2, dim=0)
    assert torch.allclose(row_norms, col_norms, rtol=1e-4, atol=1e-7)  # component i: sqrt(s_i) in both
    assert torch.all(row_norms[:-1] >= row_norms[1:] - 1e-6)  # leading components first
    s = torch.linalg.svdvals(b.double() @ a.double())[: min(rank, fin, fout)]
    assert torch.allclose(row_norms[: s.numel()].double() ** 2, s, rtol=1e-4)


def test_balanced_compression_stores_the_rewritten_factors():
    adapter = trained_like_adapter(layers=1)
    comp = compeft.compress(adapter, density=0.3, scope="tensor", magnitude_bits=2, factorization="balanced")
    out = compeft.loads(comp.to_bytes()).decompress()
    assert out.config == adapter.config and set(out.tensors) == set(adapter.tensors)
    rewritten = Adapter(adapter.config, dict(adapter.tensors))
    for module, (a, b) in adapter.pairs():
        rewritten.tensors[adapter.key(module, "A")], rewritten.tensors[adapter.key(module, "B")] = (
            compeft.balanced_pair(a, b))
    same = compeft.compress(rewritten, density=0.3, scope="tensor", magnitude_bits=2).decompress()
    for name, t in same.tensors.items():
        assert torch.equal(out.tensors[name], t)
    bad = dict(adapter.tensors)
    bad[sorted(bad)[0]] = bad[sorted(bad)[0]].clone().fill_(float("nan"))
    with pytest.raises(AdapterError) as exc:
        compeft.compress(Adapter(adapter.config, bad), factorization="balanced")
    assert exc.value.code == "non_finite"


def test_every_flipped_byte_of_a_levels_file_is_rejected():
    adapter = make_adapter(shapes=[("q_proj", 6, 5)], layers=1, rank=2)
    data = compeft.compress(adapter, density=0.5, magnitude_bits=2, factorization="balanced").to_bytes()
    compeft.loads(data)
    for i in range(len(data)):
        bad = bytearray(data)
        bad[i] ^= 0x10
        with pytest.raises(CorruptFile):
            compeft.loads(bytes(bad))
    for n in (len(data) - 1, len(data) // 2, 9):
        with pytest.raises(CorruptFile):
            compeft.loads(data[:n])


def test_per_tensor_overhead_is_a_few_bytes():
    """A toy adapter (1k-entry tensors) is coded close to its payload: the head grows ~5 bytes a tensor."""
    def head_bytes(layers):
        comp = compeft.compress(make_adapter(shapes=LLAMA3_8B[:1], layers=layers, rank=8), density=0.1)
        return comp.nbytes - sum(t.payload().size for t in comp.tensors.values()), len(comp.tensors)

    small, n_small = head_bytes(2)
    large, n_large = head_bytes(16)
    assert (large - small) / (n_large - n_small) <= 8
    assert small <= 500  # safetensors header, checksum, PEFT config and the table of 4 tensors


BAD_OPTIONS = [
    ("bits-neg", {"magnitude_bits": -1}, "invalid_magnitude_bits"),
    ("bits-5", {"magnitude_bits": 5}, "invalid_magnitude_bits"),
    ("bits-float", {"magnitude_bits": 1.5}, "invalid_magnitude_bits"),
    ("bits-bool", {"magnitude_bits": True}, "invalid_magnitude_bits"),
    ("bits+alpha", {"magnitude_bits": 2, "alpha": 0.1}, "invalid_alpha"),
    ("factorization", {"factorization": "svd"}, "invalid_factorization"),
]


@pytest.mark.parametrize("kwargs,code", [c[1:] for c in BAD_OPTIONS], ids=[c[0] for c in BAD_OPTIONS])
def test_bad_options(kwargs, code):
    with pytest.raises(AdapterError) as exc:
        compeft.compress(make_adapter(), **kwargs)
    assert exc.value.code == code
