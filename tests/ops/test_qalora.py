"""adapters_ops.qalora: group quantization, packing, QA-LoRA conversion, exact merges into
zero points, the packed file format, GGUF Q4_1 export and the recovery fine-tune.

Everything runs on a random tiny Llama (hidden 128, so 8 groups of 16 per row) with the zoo's
character tokenizer written beside it; no trained zoo is needed."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch

from adapters_ops import qalora as Q
from adapters_ops.adapter import Adapter
from adapters_ops.errors import AdapterError, CorruptFile, IncompatibleAdapters

HIDDEN, INTER, LAYERS = 128, 256, 2


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny matmuls: a second thread only adds contention on a shared 2-core machine
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    from adapters_ops import _zoo_data as D

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(D.VOCAB), hidden_size=HIDDEN, intermediate_size=INTER,
                      num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64, tie_word_embeddings=False, bos_token_id=D.BOS_ID,
                      eos_token_id=D.EOS_ID, pad_token_id=D.PAD_ID)
    d = tmp_path_factory.mktemp("qalora-base")
    LlamaForCausalLM(cfg).save_pretrained(d)
    D.save_tokenizer(d)
    return d


def modules():
    for layer in range(LAYERS):
        for proj, (out, n) in {"self_attn.q_proj": (HIDDEN, HIDDEN), "self_attn.k_proj": (64, HIDDEN),
                               "self_attn.v_proj": (64, HIDDEN), "self_attn.o_proj": (HIDDEN, HIDDEN),
                               "mlp.gate_proj": (INTER, HIDDEN), "mlp.up_proj": (INTER, HIDDEN),
                               "mlp.down_proj": (HIDDEN, INTER)}.items():
            yield f"base_model.model.model.layers.{layer}.{proj}", out, n


def random_lora(r=4, alpha=8, seed=1, scale=0.05, qalora_group=None, extra=None) -> Adapter:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for mod, out, n in modules():
        a_in = n // qalora_group if qalora_group else n
        tensors[f"{mod}.lora_A.weight"] = torch.randn(r, a_in, generator=g) * scale
        tensors[f"{mod}.lora_B.weight"] = torch.randn(out, r, generator=g) * scale
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": list(Q.TARGETS),
           **(extra or {})}
    if qalora_group:
        cfg.update(qalora_group_size=qalora_group, qalora_pooling="mean")
    return Adapter(cfg, tensors)


def logits(model, seed=0):
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        return model(input_ids=ids).logits.float()


# --- packing -------------------------------------------------------------------------------

@pytest.mark.parametrize("bits,width", [(2, 4), (2, 36), (3, 1), (3, 10), (3, 37), (4, 2), (4, 130), (8, 5)])
def test_pack_unpack_round_trip(bits, width):
    codes = torch.randint(0, 2 ** bits, (7, width), generator=torch.Generator().manual_seed(bits * width))
    packed = Q.pack_codes(codes, bits)
    assert packed.dtype == (torch.int32 if bits == 3 else torch.uint8)
    assert packed.shape == (7, math.ceil(width / 10) if bits == 3 else width * bits // 8)
    assert torch.equal(Q.unpack_codes(packed, bits, width), codes.to(torch.uint8))


def test_pack_layout_is_least_significant_first():
    assert Q.pack_codes(torch.tensor([[1, 2, 3, 0]]), 2).tolist() == [[0b00_11_10_01]]
    assert Q.pack_codes(torch.tensor([[0xA, 0x3]]), 4).tolist() == [[0x3A]]
    assert Q.pack_codes(torch.tensor([[7, 1, 5]]), 3).tolist() == [[7 | 1 << 3 | 5 << 6]]
    with pytest.raises(AdapterError, match="whole bytes"):
        Q.pack_codes(torch.zeros(2, 3), 4)


def test_int4_layout_matches_the_kernel():
    from adapter_kernels.int4 import pack_int4

    codes = torch.randint(0, 16, (5, 64), generator=torch.Generator().manual_seed(3))
    assert torch.equal(Q.pack_codes(codes, 4), pack_int4(codes))


# --- quantization ------------------------------------------------------------------------------

@pytest.mark.parametrize("bits,group,zero_point", [(2, 16, "float"), (3, 32, "float"), (4, 64, "float"),
                                                   (8, 128, "float"), (4, 32, "int"), (3, 16, "int")])
def test_round_to_nearest_bounds(bits, group, zero_point):
    w = torch.randn(24, 256, generator=torch.Generator().manual_seed(bits)) * 0.02
    qw = Q.quantize_weight(w, bits, group, zero_point)
    assert qw.codes.dtype == torch.uint8 and int(qw.codes.max()) <= 2 ** bits - 1
    assert qw.scales.shape == qw.zeros.shape == (24, 256 // group)
    assert torch.equal(qw.scales, qw.scales.half().float())  # stored exactly in fp16
    assert torch.equal(qw.zeros, qw.zeros.half().float())
    if zero_point == "int":
        assert torch.equal(qw.zeros, torch.round(qw.zeros))
    err = (qw.dequantize() - w).abs().view(24, -1, group)
    # float zero points: half a step, plus the fp16 rounding of z; integer ones also miss the range ends
    slack = 0.51 if zero_point == "float" else 1.01
    assert bool((err <= slack * qw.scales.unsqueeze(-1) + 1e-7).all())
    if bits < 8:  # one more bit, less error
        more = Q.quantize_weight(w, Q.BITS[Q.BITS.index(bits) + 1], group, zero_point)
        assert (more.dequantize() - w).norm() < (qw.dequantize() - w).norm()


def test_constant_and_two_valued_groups_are_exact():
    w = torch.tensor([[0.5] * 16 + [-1.0, 2.0] * 8])
    qw = Q.quantize_weight(w, 2, 16)
    assert torch.allclose(qw.dequantize(), w, atol=1e-3)


@pytest.mark.parametrize("kwargs,match", [
    (dict(bits=5), "bits must be"), (dict(group_size=48), "group_size must be"),
    (dict(zero_point="half"), "zero_point"),
])
def test_bad_spec_raises(kwargs, match):
    with pytest.raises(AdapterError, match=match):
        Q.QuantSpec(**kwargs)


def test_quantize_base_reports_every_layer(base_dir):
    qm = Q.quantize_base(base_dir, 4, 16)
    assert len(qm.weights) == 7 * LAYERS and set(qm.errors) == set(qm.weights)
    assert "model.embed_tokens.weight" in qm.others and "lm_head.weight" in qm.others
    assert all(0 < e["rel_error"] < 0.15 for e in qm.errors.values())
    s2 = Q.quantize_base(base_dir, 2, 16).summary()
    assert s2["mean_rel_error"] > qm.summary()["mean_rel_error"]
    with pytest.raises(AdapterError, match="multiple of group_size"):
        Q.quantize_weight(torch.zeros(4, 40), 4, 16)


# --- QA-LoRA merge ------------------------------------------------------------------------------

@pytest.mark.parametrize("bits,qgroup,agroup", [(4, 16, 16), (3, 16, 32), (2, 32, 32), (8, 64, 64), (4, 32, 64)])
def test_merge_into_zero_points_is_exact(base_dir, bits, qgroup, agroup):
    qm = Q.quantize_base(base_dir, bits, qgroup)
    ad = random_lora(qalora_group=agroup, scale=0.3, seed=bits)
    merged = qm.merge(ad)
    for name, qw in qm.weights.items():  # the integers and the scales do not move
        assert torch.equal(merged.weights[name].codes, qw.codes)
        assert torch.equal(merged.weights[name].scales, qw.scales)
    unmerged = qm.to_model()
    Q.attach_qalora(unmerged, ad)
    ref = logits(unmerged.eval())
    got = logits(merged.to_model())
    assert (got - ref).abs().max() < 1e-4
    assert (ref - logits(qm.to_model())).abs().max() > 1e-2  # the adapter does change the output


def test_dense_form_is_the_same_update(base_dir):
    from adapters_ops.evaluate import apply_adapter

    qm = Q.quantize_base(base_dir, 4, 16)
    ad = random_lora(qalora_group=16, scale=0.3)
    dense = Q.to_dense_lora(ad)
    assert Q.qalora_group_size(dense) is None and "qalora_pooling" not in dense.config
    assert dense.tensors[next(k for k in dense.tensors if "lora_A" in k)].shape[1] == HIDDEN
    wrapped = qm.to_model()
    Q.attach_qalora(wrapped, ad)
    plain = apply_adapter(qm.to_model(), dense)
    assert (logits(wrapped.eval()) - logits(plain)).abs().max() < 1e-4


@pytest.mark.parametrize("convention", ["ours", "peft"])
def test_dense_update_follows_the_pooling_definition(convention):
    """D = scaling * B @ A' @ P * k, P the mean-pooling matrix (in/G x in); k = 1 (ours) or in/G (PEFT)."""
    g = 16
    extra = {} if convention == "ours" else {"use_qalora": True}
    ad = random_lora(qalora_group=g, extra=extra)
    if convention == "peft":
        del ad.config["qalora_pooling"]
    dense = Q.dense_updates(ad)
    for mod, (a, b) in ad.pairs():
        n = a.shape[1] * g
        pool = torch.zeros(n // g, n)
        for i in range(n // g):
            pool[i, i * g:(i + 1) * g] = 1.0 / g
        k = 1 if convention == "ours" else n // g
        want = ad.scaling(mod) * k * b @ a @ pool
        assert torch.allclose(dense[Q._weight_name(mod)], want, atol=1e-6)
        x = torch.randn(3, n)
        layer = Q.QALoRALinear(torch.nn.Linear(n, b.shape[0], bias=False), a, b,
                               ad.scaling(mod) * Q._pool_factor(ad, mod), g)
        assert torch.allclose(layer(x) - layer.base(x), x @ want.T, atol=1e-5)


def test_plain_peft_configs_are_not_qalora():
    # peft writes qalora_group_size (default 16) into every LoraConfig, with use_qalora false
    ad = random_lora(extra={"qalora_group_size": 16, "use_qalora": False})
    assert Q.qalora_group_size(ad) is None
    qa, _ = Q.to_qalora(ad, 16)
    assert Q.qalora_group_size(qa) == 16 and qa.config["use_qalora"] is False
    assert Q.qalora_group_size(Q.to_dense_lora(qa)) is None
    with pytest.raises(AdapterError, match="positive integer"):
        Q.qalora_group_size(random_lora(extra={"qalora_pooling": "mean", "qalora_group_size": "16"}))


def test_merge_rejections(base_dir):
    qm = Q.quantize_base(base_dir, 4, 32)
    with pytest.raises(AdapterError, match="convert a plain LoRA") as e:
        qm.merge(random_lora())
    assert e.value.code == "not_qalora"
    with pytest.raises(IncompatibleAdapters, match="not a multiple of the quantization group"):
        qm.merge(random_lora(qalora_group=16))
    bad = random_lora(qalora_group=32)
    bad.tensors["base_model.model.model.layers.9.mlp.up_proj.lora_A.weight"] = torch.zeros(4, 4)
    bad.tensors["base_model.model.model.layers.9.mlp.up_proj.lora_B.weight"] = torch.zeros(256, 4)
    with pytest.raises(IncompatibleAdapters, match="no quantized weight"):
        qm.merge(bad)


def test_integer_zero_points_lose_what_the_merge_added(base_dir):
    qm = Q.quantize_base(base_dir, 4, 16, zero_point="int")
    assert qm.integer_zero_error()["max_abs_error"] == 0.0
    rep = qm.merge(random_lora(qalora_group=16, scale=0.3)).integer_zero_error()
    assert rep["max_abs_error"] > 0 and 0 < rep["max_zero_fraction"] <= 0.5


# --- conversion of a plain LoRA ---------------------------------------------------------------------

def test_conversion_of_a_group_constant_lora_is_lossless():
    g = 16
    ad = random_lora()
    for k in list(ad.tensors):  # make every A constant inside each group of 16 columns
        if "lora_A" in k:
            a = ad.tensors[k]
            ad.tensors[k] = a.view(a.shape[0], -1, g)[..., :1].expand(-1, -1, g).reshape(a.shape).clone()
    qa, rep = Q.to_qalora(ad, g)
    assert rep["rel_error"] < 1e-6
    dense = Q.dense_updates(qa)
    for mod, _ in ad.pairs():
        assert torch.allclose(dense[Q._weight_name(mod)], ad.delta(mod), atol=1e-7)


@pytest.mark.parametrize("group", [16, 32, 64])
def test_conversion_is_the_least_squares_projection(group):
    ad = random_lora(extra={"use_rslora": True})
    qa, rep = Q.to_qalora(ad, group)
    assert qa.config["qalora_group_size"] == group and qa.config["r"] == ad.config["r"]
    dense = Q.dense_updates(qa)
    num = den = 0.0
    gen = torch.Generator().manual_seed(5)
    for mod, (a, _b) in ad.pairs():
        d, dg = ad.delta(mod), dense[Q._weight_name(mod)]
        out, n = d.shape
        assert torch.allclose(qa.tensors[ad.key(mod, "A")], a.view(a.shape[0], -1, group).sum(-1), atol=1e-6)
        # each (row, group) holds the mean of D over that group
        assert torch.allclose(dg.view(out, -1, group)[..., 0], d.view(out, -1, group).mean(-1), atol=1e-6)
        # optimality: the residual is orthogonal to every group-constant matrix
        other = torch.randn(out, n // group, generator=gen).repeat_interleave(group, dim=1)
        assert abs(float(((d - dg) * other).sum())) < 1e-4 * float(d.norm() * other.norm())
        num += float((d - dg).pow(2).sum())
        den += float(d.pow(2).sum())
    assert rep["rel_error"] == pytest.approx(math.sqrt(num / den), rel=1e-5)
    assert 0 < rep["rel_error"] < 1 and set(rep["per_module"]) == set(ad.modules())


def test_conversion_rejections():
    with pytest.raises(AdapterError, match="already in QA-LoRA form"):
        Q.to_qalora(random_lora(qalora_group=16), 16)
    with pytest.raises(IncompatibleAdapters, match="not a multiple of group 48"):
        Q.to_qalora(random_lora(), 48)


# --- storage ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits,group", [(2, 16), (3, 32), (4, 64), (8, 16)])
def test_save_load_round_trip(base_dir, tmp_path, bits, group):
    qm = Q.quantize_base(base_dir, bits, group)
    merged = qm.merge(random_lora(qalora_group=group))
    merged.save(tmp_path)
    back = Q.load_quantized(tmp_path)
    assert back.spec == qm.spec and set(back.weights) == set(qm.weights)
    for name, qw in merged.weights.items():
        assert torch.equal(back.weights[name].codes, qw.codes)
        assert torch.equal(back.weights[name].scales, qw.scales)
        assert torch.equal(back.weights[name].zeros, qw.zeros.half().float())  # fp16 zero points
    for name, t in merged.others.items():
        assert torch.equal(back.others[name], t)
    assert (tmp_path / "tokenizer.json").is_file() and json.loads((tmp_path / "config.json").read_text())
    # fp16 zero points cost a little, far below the quantization step
    assert (logits(back.to_model()) - logits(merged.to_model())).abs().max() < 5e-3


def test_checksum_and_format_are_checked(base_dir, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    Q.quantize_base(base_dir, 4, 16).save(tmp_path)
    f = tmp_path / Q.QUANT_FILE
    with safe_open(str(f), framework="pt") as fh:
        meta, tensors = fh.metadata(), {k: fh.get_tensor(k) for k in fh.keys()}
    name = next(k for k in tensors if k.endswith(".qweight"))
    tensors[name][0, 0] ^= 1
    save_file(tensors, str(f), metadata=meta)
    with pytest.raises(CorruptFile, match="sha256") as e:
        Q.load_quantized(tmp_path)
    assert e.value.code == "checksum_mismatch"
    save_file(tensors, str(f), metadata=dict(meta, format="other"))
    with pytest.raises(CorruptFile, match="not an adapter-hub-qint file"):
        Q.load_quantized(tmp_path)
    f.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00{bad}")
    with pytest.raises(CorruptFile):
        Q.load_quantized(tmp_path)


def test_4bit_g64_is_3_5x_smaller_than_bf16(tmp_path):
    from safetensors.torch import save_file

    w = torch.randn(512, 1792, generator=torch.Generator().manual_seed(0)) * 0.02
    qm = Q.QuantizedModel.from_state_dict({"model.layers.0.mlp.down_proj.weight": w}, {}, Q.QuantSpec(4, 64))
    qm.save(tmp_path / "q")
    save_file({"w": w.bfloat16()}, str(tmp_path / "bf16.safetensors"))
    ratio = (tmp_path / "bf16.safetensors").stat().st_size / (tmp_path / "q" / Q.QUANT_FILE).stat().st_size
    assert 3.5 < ratio < 16 / 4.5 + 0.01  # 4 bits + two fp16 per 64 weights = 4.5 bits a weight


# --- GGUF Q4_1 --------------------------------------------------------------------------------------

def test_gguf_q4_1_keeps_codes_and_loads_in_transformers(base_dir, tmp_path):
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM

    qm = Q.quantize_base(base_dir, 4, 32)
    merged = qm.merge(random_lora(qalora_group=64, scale=0.3))  # a G=64 update is constant on each 32-half
    out = tmp_path / "export"
    merged.save(out)
    rep = Q.export_gguf_q4_1(merged, out / "model.gguf")
    assert rep["max_abs_error_vs_ours"] < 1e-3  # fp16 rounding of m = -s * z only
    back = Q.read_gguf_q4_1(out / "model.gguf")
    assert len(back) == len(merged.weights)
    for layer in range(LAYERS):
        codes, d, m = back[f"blk.{layer}.ffn_down.weight"]
        qw = merged.weights[f"model.layers.{layer}.mlp.down_proj.weight"]
        assert torch.equal(codes, qw.codes) and torch.equal(codes, qm.weights[
            f"model.layers.{layer}.mlp.down_proj.weight"].codes)
        assert torch.equal(d, qw.scales)
        assert torch.equal(m, (-(qw.scales.double() * qw.zeros.double())).half().float())
        # q rows are permuted for llama.cpp's rotary layout: same codes, other row order
        qcodes = back[f"blk.{layer}.attn_q.weight"][0]
        ours = merged.weights[f"model.layers.{layer}.self_attn.q_proj.weight"].codes
        assert not torch.equal(qcodes, ours) and torch.equal(qcodes, Q._llama_permute(ours, 4))
    model = AutoModelForCausalLM.from_pretrained(str(out), gguf_file=str(out / "model.gguf"))
    assert (logits(model) - logits(merged.to_model())).abs().max() < 5e-3
    with pytest.raises(AdapterError, match="Q4_1 needs 4 bits"):
        Q.export_gguf_q4_1(Q.quantize_base(base_dir, 4, 16), tmp_path / "x.gguf")


# --- recovery fine-tune and the worker entry point ---------------------------------------------------

EXAMPLES = [{"prompt": f"rev {w}:", "completion": w[::-1]} for w in
            ("abc", "hello", "quant", "lora", "merge", "zero", "point", "group", "tiny", "model", "bits", "scale")]


def test_recovery_is_deterministic_and_learns(base_dir):
    qm = Q.quantize_base(base_dir, 3, 16)
    qa, _ = Q.to_qalora(random_lora(), 16)
    seen = []
    a1, rep1 = Q.recover(qm, qa, EXAMPLES, steps=6, batch_size=6, lr=1e-2, seed=3,
                         progress=lambda f, m: seen.append(f))
    a2, rep2 = Q.recover(qm, qa, EXAMPLES, steps=6, batch_size=6, lr=1e-2, seed=3)
    assert all(torch.equal(a1.tensors[k], a2.tensors[k]) for k in a1.tensors)
    assert rep1["final_loss"] == rep2["final_loss"] and rep1["final_loss"] < rep1["first_loss"]
    assert seen == sorted(seen) and seen[-1] == 1.0 and len(seen) == 6
    assert a1.config == qa.config and any(not torch.equal(a1.tensors[k], qa.tensors[k]) for k in qa.tensors)
    a3, _ = Q.recover(qm, qa, EXAMPLES, steps=6, batch_size=6, lr=1e-2, seed=4)
    assert any(not torch.equal(a1.tensors[k], a3.tensors[k]) for k in qa.tensors)


def test_quantize_merged_end_to_end(base_dir, tmp_path):
    lora = random_lora(scale=0.1)
    lora_dir = lora.save(tmp_path / "lora")
    seen = []
    rep = Q.quantize_merged(base_dir, lora_dir, bits=4, group_size=32, out_dir=tmp_path / "out",
                            finetune_steps=2, examples=EXAMPLES, progress=lambda f, m: seen.append((f, m)),
                            synthetic=16, recovery=Q.RecoveryConfig(batch_size=8, eval_every=1))
    assert rep["merge_max_logit_diff"] < 1e-4 and rep["codes_unchanged"]
    assert rep["stored_max_logit_diff"] < 5e-3
    assert 0 < rep["conversion_rel_error"] < 1 and rep["recovery"]["steps"] == 2
    # distilled on the teacher's answers to synthetic inputs + the seeds, checked on the seeds
    syn = rep["synthetic"]["examples"]
    assert 0 < syn <= 16 and rep["recovery"]["train_examples"] == syn + len(EXAMPLES)
    assert [s for s, _ in rep["recovery"]["seed_loss_history"]] == [0, 1, 2]
    assert rep["bits_per_weight"] == 5.0
    assert rep["integer_zero_point_error"]["max_zero_fraction"] > 0
    assert (tmp_path / "out" / "model-q4_1.gguf").is_file() and rep["gguf"]["bytes"] > 0
    back = Adapter.load(tmp_path / "out" / "qalora")
    assert back.config["qalora_group_size"] == 32 and back.config["r"] == 8  # twice the LoRA's r by default
    assert Q.load_quantized(tmp_path / "out").spec == Q.QuantSpec(4, 32)
    assert [f for f, _ in seen] == sorted(f for f, _ in seen) and seen[-1] == (1.0, "done")
    json.dumps(rep)  # JSON-able for the Job row
    rep3 = Q.quantize_merged(base_dir, lora_dir, bits=3, group_size=16, out_dir=tmp_path / "out3")
    assert "gguf" not in rep3 and rep3["merge_max_logit_diff"] < 1e-4
    with pytest.raises(AdapterError, match="needs seed examples"):
        Q.quantize_merged(base_dir, lora_dir, 4, 32, tmp_path / "x", finetune_steps=3)


def test_tied_output_head_quantizes_and_loads(tmp_path):
    """A base whose output head is its embedding (SmolLM2, Llama 3.2): its checkpoint has no
    lm_head.weight; quantize_merged and the dequantized model must tie it back, not refuse."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from adapters_ops import _zoo_data as D

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(D.VOCAB), hidden_size=HIDDEN, intermediate_size=INTER,
                      num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64, tie_word_embeddings=True, bos_token_id=D.BOS_ID,
                      eos_token_id=D.EOS_ID, pad_token_id=D.PAD_ID)
    LlamaForCausalLM(cfg).save_pretrained(tmp_path / "tied")
    from safetensors import safe_open

    with safe_open(str(tmp_path / "tied" / "model.safetensors"), "pt") as f:
        assert "lm_head.weight" not in f.keys()
    rep = Q.quantize_merged(tmp_path / "tied", random_lora(scale=0.1), bits=4, group_size=32,
                            out_dir=tmp_path / "out")
    assert rep["merge_max_logit_diff"] < 1e-4
    model = Q.load_quantized(tmp_path / "out").to_model()
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    naive = Q.naive_merge_quantize(tmp_path / "tied", random_lora(scale=0.1), 4, 32).to_model()
    assert naive.lm_head.weight.data_ptr() == naive.model.embed_tokens.weight.data_ptr()


def test_naive_baseline_quantizes_the_merged_weight(base_dir):
    lora = random_lora(scale=0.1)
    naive = Q.naive_merge_quantize(base_dir, lora, 4, 16)
    qm = Q.quantize_base(base_dir, 4, 16)
    name = "model.layers.0.mlp.up_proj.weight"
    w = qm.others.get(name)
    assert w is None  # quantized, not kept
    from safetensors.torch import load_file

    state = load_file(str(base_dir / "model.safetensors"))
    want = Q.quantize_weight(state[name].float() + lora.delta("base_model.model." + name[:-7]), 4, 16)
    assert torch.equal(naive.weights[name].codes, want.codes)
    assert dataclasses.asdict(naive.spec) == dataclasses.asdict(qm.spec)


# --- distillation recovery (synthetic inputs, teacher labels, QA-LoRA student) -----------------------


def teacher_labelled(base_dir, lora, prompts, tokens=4):
    """The fp base + LoRA's greedy answers (`tokens` tokens, no EOS needed): what the student must learn."""
    from adapters_ops.evaluate import greedy_completions, load_model, load_tokenizer

    answers = greedy_completions(load_model(base_dir, lora), load_tokenizer(base_dir), prompts, tokens)
    return [{"prompt": p, "completion": a} for p, a in zip(prompts, answers, strict=True)]


@pytest.mark.parametrize("init,rank", [("converted", 4), ("converted", 8), ("fresh", 8)])
def test_student_adapter_starts_from_the_conversion_or_from_zero(init, rank):
    lora = random_lora(r=4, alpha=8)
    qa, _ = Q.to_qalora(lora, 16)
    st = Q.student_adapter(lora, 16, init=init, rank=rank, seed=1)
    assert st.config["r"] == rank and st.config["lora_alpha"] == 2 * rank  # alpha / r kept
    assert Q.qalora_group_size(st) == 16
    want = Q.dense_updates(qa)
    for name, d in Q.dense_updates(st).items():
        if init == "converted":  # extra rank is random A' rows times zero B columns: same update
            assert torch.allclose(d, want[name], atol=1e-6)
        else:
            assert not d.any()
    assert Q.student_adapter(qa, 16, rank=rank).config["r"] == rank  # a QA-LoRA starts from itself


def test_student_adapter_rejections():
    lora = random_lora(r=4)
    with pytest.raises(AdapterError, match="below the adapter's"):
        Q.student_adapter(lora, 16, rank=2)
    with pytest.raises(AdapterError, match="init must be"):
        Q.student_adapter(lora, 16, init="zeros")
    qa, _ = Q.to_qalora(lora, 32)
    with pytest.raises(IncompatibleAdapters, match="groups of 16"):
        Q.student_adapter(qa, 16)


@pytest.mark.parametrize("kwargs,match", [
    ({"steps": -1}, "steps must be"), ({"lr": 0}, "lr must be > 0"), ({"init": "x"}, "init must be"),
    ({"ce_weight": 0, "kl_weight": 0}, "cannot both be 0"), ({"rank": 0}, "rank must be"),
    ({"kl_weight": float("nan")}, "kl_weight must be"), ({"select": "bleu"}, "select must be one of"),
])
def test_recovery_config_is_validated(kwargs, match):
    with pytest.raises(AdapterError, match=match):
        Q.RecoveryConfig(**kwargs)


def test_synthetic_examples_are_the_teachers_answers(base_dir):
    lora = random_lora(scale=0.1)
    rows, info = Q.synthetic_examples(base_dir, lora, EXAMPLES, n=24, generator="mutation", seed=2)
    assert rows and info["examples"] == len(rows) and info["generate"]["by_generator"] == {"mutation": 24}
    seed_prompts = {e["prompt"] for e in EXAMPLES}
    assert all(r["prompt"].startswith("rev ") and r["prompt"] not in seed_prompts for r in rows)
    from adapters_ops.evaluate import greedy_completions, load_model, load_tokenizer

    answers = greedy_completions(load_model(base_dir, lora), load_tokenizer(base_dir), [r["prompt"] for r in rows], 12)
    base_answers = greedy_completions(load_model(base_dir), load_tokenizer(base_dir), [r["prompt"] for r in rows], 12)
    # A random teacher has near-ties that another batch (padding) can flip, mostly near the end of an
    # answer: compare the first characters, against the teacher and against the base without the LoRA.
    def agree(xs):
        return sum(r["completion"][:4] == x[:4] for r, x in zip(rows, xs, strict=True)) / len(rows)

    assert agree(answers) >= 0.8 and agree(base_answers) <= 0.2


def test_distilled_recovery_beats_the_conversion_and_merges_exactly(base_dir):
    from adapters_ops.evaluate import completion_loss, load_model, load_tokenizer

    lora = random_lora(scale=0.1)
    words = ["".join(chr(97 + (7 * i + 3 * j) % 26) for j in range(3 + i % 3)) for i in range(48)]
    data = teacher_labelled(base_dir, lora, [f"rev {w}:" for w in words])
    train, held_out = data[:40], data[40:]
    qm = Q.quantize_base(base_dir, 2, 16)
    tok = load_tokenizer(base_dir)
    student = Q.student_adapter(lora, 16, rank=8)
    cfg = Q.RecoveryConfig(steps=40, lr=1e-2, batch_size=16, eval_every=10, patience=2)
    rec, rep = Q.recover(qm, student, train, teacher=load_model(base_dir, lora), config=cfg,
                         eval_examples=held_out)

    def loss(qa):
        m = qm.to_model()
        Q.attach_qalora(m, qa)
        return completion_loss(m.eval(), tok, held_out)

    assert loss(rec) < loss(student) - 0.5  # learnt the teacher's answers on prompts it never saw (4.4 -> 3.0)
    assert rep["best_step"] > 0 and rep["best_seed_loss"] == pytest.approx(loss(rec), abs=1e-4)
    assert rep["seed_loss_history"][0][0] == 0 and rep["train_examples"] == 40
    merged = qm.merge(rec)
    ids = torch.arange(32).unsqueeze(0)
    unmerged = qm.to_model()
    Q.attach_qalora(unmerged, rec)
    assert Q.max_logit_difference(merged.to_model(), unmerged.eval(), ids) < 1e-4
    assert all(torch.equal(merged.weights[k].codes, qm.weights[k].codes) for k in qm.weights)


# (loss, exact match) per check at steps 0, 50, 100, ...: which step is kept, and how many checks run
SELECTION_CASES = [
    # the seed loss rises while the answers improve: exact match keeps the late state, loss the start
    ("accuracy", 40, [(1.0, 0.5), (1.2, 0.75), (1.3, 0.75), (1.5, 0.75), (1.4, 0.5)], 150, 5),
    ("loss", 40, [(1.0, 0.5), (1.2, 0.75), (1.3, 0.75), (1.5, 0.75), (1.4, 0.5)], 0, 5),
    # equal accuracy goes to the later state; equal loss stays with the earlier one
    ("accuracy", 40, [(2.0, 0.25), (1.0, 0.5), (0.9, 0.5), (0.8, 0.5)], 150, 4),
    ("loss", 40, [(2.0, 0.25), (1.0, 0.5), (1.0, 0.5), (1.0, 0.5)], 50, 4),
    # patience: two checks in a row without a win stop the training (a tie counts as a win by accuracy)
    ("accuracy", 2, [(1.0, 0.5), (1.0, 0.25), (1.0, 0.5), (1.0, 0.25), (1.0, 0.25), (1.0, 1.0)], 100, 5),
    ("loss", 2, [(1.0, 0.5), (0.5, 0.5), (0.6, 0.5), (0.4, 0.5), (0.5, 0.5), (0.45, 0.5), (0.1, 1.0)], 150, 6),
]


@pytest.mark.parametrize("select,patience,scores,kept,checks", SELECTION_CASES)
def test_seed_selection_keeps_the_right_state(select, patience, scores, kept, checks):
    sel = Q.SeedSelection(select, patience)
    run = 0
    for i, (loss, acc) in enumerate(scores):
        sel.offer(50 * i, loss, acc)
        run += 1
        if sel.stop:
            break
    assert (sel.best_step, run) == (kept, checks)


def test_seed_selection_rejections():
    with pytest.raises(AdapterError, match="select must be one of"):
        Q.SeedSelection("bleu", 3)
    with pytest.raises(AdapterError, match="needs the seed accuracy"):
        Q.SeedSelection("accuracy", 3).offer(0, 1.0)


def test_recovery_by_accuracy_returns_the_latest_best_state(base_dir):
    from adapters_ops.evaluate import evaluate_model, load_model, load_tokenizer

    lora = random_lora(scale=0.1)
    words = ["".join(chr(97 + (5 * i + 3 * j) % 26) for j in range(2 + i % 2)) for i in range(40)]
    # one-character answers: exact match moves within a few dozen steps (0 -> ~0.9 over 8 seeds)
    data = teacher_labelled(base_dir, lora, [f"rev {w}:" for w in words], tokens=1)
    train, seeds = data[:32], data[32:]
    qm = Q.quantize_base(base_dir, 2, 16)
    cfg = Q.RecoveryConfig(steps=40, lr=1e-2, batch_size=16, eval_every=5, patience=40, select="accuracy")
    rec, rep = Q.recover(qm, Q.student_adapter(lora, 16, rank=8), train, teacher=load_model(base_dir, lora),
                         config=cfg, eval_examples=seeds)
    accs = rep["seed_accuracy_history"]
    assert [s for s, _ in accs] == list(range(0, 45, 5)) and rep["select"] == "accuracy"
    best = max(a for _, a in accs)
    assert rep["best_seed_accuracy"] == best > accs[0][1]  # the student learnt some of the answers
    assert rep["best_step"] == max(s for s, a in accs if a == best)
    m = qm.to_model()
    Q.attach_qalora(m, rec)  # the returned adapter is the kept state: it scores what the report says
    scored = evaluate_model(m.eval(), load_tokenizer(base_dir), seeds)
    assert scored.accuracy == best and scored.loss == pytest.approx(rep["best_seed_loss"], abs=1e-4)
