"""adapters_ops.transfer as a library: exact fp64 diffs, applying a diff in memory
(to a state dict or a module), fine-tunes that added tokens, and adapters given
as folders. Checkpoints are tiny synthetic Llama-shaped files (helpers shared
with test_transfer.py); every expected value is computed here with plain torch."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from adapters_ops import transfer as T
from adapters_ops.errors import AdapterError, IncompatibleAdapters
from tests.ops.test_transfer import finetune_of, llama_shapes, lora_adapter, one_thread, random_model, write

_ = one_thread  # its autouse fixture, used here as well: tiny tensors, one torch thread

INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}
VOCAB = ("model.embed_tokens.weight", "lm_head.weight")


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.view(INT_VIEW[a.dtype]), b.view(INT_VIEW[b.dtype])))


# --- exact fp64 diffs ----------------------------------------------------------------------

# (base, fine-tune) values whose difference fp32 cannot hold: their magnitudes are far apart
FAR_APART = {torch.float32: [(1.0, 2.0**-40), (3.0, -(2.0**-30))],
             torch.bfloat16: [(1.0, 2.0**-30), (-512.0, 2.0**-20)],
             torch.float16: [(-1024.0, 2.0**-14), (2048.0, -(2.0**-13))]}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("chunk_bytes", [T.DEFAULT_CHUNK_BYTES, 300])
def test_extract_dense_f64_is_exact(tmp_path, dtype, chunk_bytes):
    base = random_model(llama_shapes(), dtype=dtype)
    ft, _ = finetune_of(base)
    for i, (b, f) in enumerate(FAR_APART[dtype]):
        base["model.norm.weight"][i], ft["model.norm.weight"][i] = b, f
    b_dir, f_dir = write(tmp_path / "b", base), write(tmp_path / "f", ft)
    T.extract_dense(f_dir, b_dir, tmp_path / "diff.safetensors", dtype="F64", chunk_bytes=chunk_bytes)
    diff = load_file(str(tmp_path / "diff.safetensors"))
    assert set(diff) == set(base)
    for n in base:
        assert diff[n].dtype == torch.float64
        assert torch.equal(diff[n], ft[n].double() - base[n].double()), n
        assert same_bits((base[n].double() + diff[n]).to(dtype), ft[n]), n
    # apply() adds the fp64 diff in fp64 too, so the fine-tune comes back bit for bit
    T.apply(tmp_path / "diff.safetensors", b_dir, tmp_path / "out")
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert all(same_bits(out[n], ft[n]) for n in base)


# --- applying in memory ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def diffs(tmp_path_factory):
    """A bf16 base, its fine-tune, and the fine-tune's diff in every form apply() takes."""
    tmp = tmp_path_factory.mktemp("diffs")
    base = random_model(llama_shapes(), dtype=torch.bfloat16)
    ft, _ = finetune_of(base)
    b_dir, f_dir = write(tmp / "base", base), write(tmp / "ft", ft)
    T.extract_dense(f_dir, b_dir, tmp / "diff.safetensors")
    T.extract(f_dir, b_dir, rank=2, out_dir=tmp / "lowrank")
    return {"base": base, "ft": ft, "base_dir": b_dir, "tmp": tmp,
            "file": tmp / "diff.safetensors", "dict": load_file(str(tmp / "diff.safetensors")),
            "folder": tmp / "lowrank", "adapter": lora_adapter(llama_shapes(), ("q_proj", "down_proj"))}


def module_of(state: dict[str, torch.Tensor], tie: tuple[str, str] | None = None) -> torch.nn.Module:
    """A module whose state_dict() is `state` (parameters that require grad), with
    `tie` = (name, alias) sharing one parameter the way tied embeddings do."""
    root = torch.nn.Module()

    def register(name: str, param: torch.nn.Parameter) -> None:
        *path, leaf = name.split(".")
        m = root
        for p in path:
            if not hasattr(m, p):
                m.add_module(p, torch.nn.Module())
            m = getattr(m, p)
        m.register_parameter(leaf, param)

    for name, t in state.items():
        register(name, torch.nn.Parameter(t.clone()))
    if tie is not None:
        register(tie[1], root.get_parameter(tie[0]))
    return root


@pytest.mark.parametrize("form", ["file", "dict", "folder", "adapter"])
@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_in_memory_apply_equals_folder_apply(diffs, tmp_path, form, scale):
    diff = diffs[form]
    folder_rep = T.apply(diff, diffs["base_dir"], tmp_path / "out", scale=scale)
    expected = load_file(str(tmp_path / "out" / "model.safetensors"))
    state = {n: t.clone() for n, t in diffs["base"].items()}
    rep = T.apply_to_state_dict(state, diff, scale=scale, chunk_bytes=256)
    assert rep["changed"] == folder_rep["changed"] > 0
    model = module_of(diffs["base"])
    T.apply_to_model(model, diff, scale=scale)
    got = model.state_dict()
    for n, t in expected.items():
        assert same_bits(state[n], t), n
        assert same_bits(got[n], t), n
    if scale == 1.0 and form in ("file", "dict"):  # an exact dense diff gives the fine-tune back
        assert all(same_bits(state[n], diffs["ft"][n]) for n in state)


def test_in_memory_apply_adds_tied_weights_once(diffs):
    state = {n: t for n, t in diffs["base"].items() if n != "lm_head.weight"}
    emb = "model.embed_tokens.weight"
    model = module_of(state, tie=(emb, "lm_head.weight"))
    both = {emb: diffs["dict"][emb], "lm_head.weight": diffs["dict"][emb]}
    T.apply_to_model(model, both)
    assert same_bits(model.lm_head.weight.data, diffs["ft"][emb])
    assert model.lm_head.weight is model.model.embed_tokens.weight
    with pytest.raises(AdapterError) as err:
        T.apply_to_model(model, {emb: diffs["dict"][emb], "lm_head.weight": diffs["dict"]["lm_head.weight"]})
    assert err.value.code == "unsupported_tensor"
    assert same_bits(model.lm_head.weight.data, diffs["ft"][emb])  # refused before any change


REFUSED = [
    ("unknown-name", {"model.layers.9.mlp.up_proj.weight": torch.ones(48, 32)}, "shape_mismatch"),
    ("wrong-shape", {"model.norm.weight": torch.ones(31)}, "shape_mismatch"),
    ("non-vocab-growth", {"model.layers.0.mlp.up_proj.weight": torch.ones(49, 32)}, "shape_mismatch"),
    ("integer-target", {"model.layers.0.steps": torch.ones(3)}, "unsupported_tensor"),
]


@pytest.mark.parametrize("case", REFUSED, ids=[c[0] for c in REFUSED])
def test_in_memory_apply_refuses_mismatches_untouched(diffs, case):
    _, bad, code = case
    diff = {"model.layers.0.self_attn.q_proj.weight": torch.ones(32, 32), **bad}
    state = {n: t.clone() for n, t in diffs["base"].items()} | {"model.layers.0.steps": torch.arange(3)}
    before = {n: t.clone() for n, t in state.items()}
    with pytest.raises(IncompatibleAdapters) as err:
        T.apply_to_state_dict(state, diff)
    assert err.value.code == code
    assert all(torch.equal(state[n], before[n]) for n in state)


# --- fine-tunes that added tokens -------------------------------------------------------------


def grown_pair(tmp, extra_rows=3, dtype=torch.bfloat16):
    base = random_model(llama_shapes(), dtype=dtype)
    ft, _ = finetune_of(base)
    g = torch.Generator().manual_seed(7)
    for n in VOCAB:
        ft[n] = torch.cat([ft[n], torch.randn(extra_rows, 32, generator=g).to(dtype)])
    b_dir, f_dir = write(tmp / "b", base), write(tmp / "f", ft)
    (b_dir / "config.json").write_text(json.dumps({"model_type": "llama", "vocab_size": 50}))
    return base, ft, b_dir, f_dir


def test_extract_dense_and_apply_grow_the_vocabulary(tmp_path):
    base, ft, b_dir, f_dir = grown_pair(tmp_path)
    rep = T.extract_dense(f_dir, b_dir, tmp_path / "diff.safetensors", chunk_bytes=300)
    assert rep["vocab_growth"] == {n: [50, 53] for n in VOCAB}
    with safe_open(str(tmp_path / "diff.safetensors"), "pt") as f:
        assert json.loads(f.metadata()["vocab_growth"]) == {n: [50, 53] for n in VOCAB}
    diff = load_file(str(tmp_path / "diff.safetensors"))
    for n in VOCAB:
        padded = torch.cat([base[n].float(), torch.zeros(3, 32)])
        assert diff[n].shape == (53, 32) and torch.equal(diff[n], ft[n].float() - padded)
    rep = T.apply(tmp_path / "diff.safetensors", b_dir, tmp_path / "out", chunk_bytes=300)
    assert rep["vocab_growth"] == {n: [50, 53] for n in VOCAB}
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert all(same_bits(out[n], ft[n]) for n in ft)  # base padded with zeros + diff = the fine-tune
    assert json.loads((tmp_path / "out" / "config.json").read_text())["vocab_size"] == 53
    # in memory: a state dict's tensors are replaced by grown ones; a module is refused
    state = {n: t.clone() for n, t in base.items()}
    T.apply_to_state_dict(state, diff)
    assert all(same_bits(state[n], ft[n]) for n in ft)
    model = module_of(base)
    with pytest.raises(IncompatibleAdapters, match="53 rows") as err:
        T.apply_to_model(model, diff)
    assert err.value.code == "shape_mismatch"
    assert all(same_bits(t.data, base[n]) for n, t in model.state_dict().items())


def test_apply_refuses_growth_from_another_vocabulary(tmp_path):
    """The diff records the base's row count; a target with a different one is refused."""
    base, _, b_dir, f_dir = grown_pair(tmp_path)
    T.extract_dense(f_dir, b_dir, tmp_path / "diff.safetensors")
    other = dict(base)
    for n in VOCAB:
        other[n] = base[n][:49]
    with pytest.raises(IncompatibleAdapters, match="from 50 to 53 rows") as err:
        T.apply(tmp_path / "diff.safetensors", write(tmp_path / "other", other), tmp_path / "out")
    assert err.value.code == "shape_mismatch"


SHAPE_CHANGES = [  # (tensor, its fine-tuned shape): none of these is a vocabulary growth
    ("model.embed_tokens.weight", (48, 32)),  # fewer rows
    ("lm_head.weight", (50, 33)),  # wider, not longer
    ("model.layers.0.mlp.up_proj.weight", (50, 32)),  # not a vocabulary tensor
]


@pytest.mark.parametrize("name,shape", SHAPE_CHANGES)
def test_other_shape_changes_stay_errors(tmp_path, name, shape):
    base = random_model(llama_shapes())
    ft = dict(base) | {name: torch.zeros(shape)}
    with pytest.raises(IncompatibleAdapters, match="does not match its base") as err:
        T.extract_dense(write(tmp_path / "f", ft), write(tmp_path / "b", base), tmp_path / "d.safetensors")
    assert err.value.code == "shape_mismatch"


def test_lowrank_extract_refuses_added_tokens_and_names_extract_dense(tmp_path):
    _, _, b_dir, f_dir = grown_pair(tmp_path)
    with pytest.raises(IncompatibleAdapters, match="extract_dense") as err:
        T.extract(f_dir, b_dir, rank=2)
    assert err.value.code == "shape_mismatch"


# --- adapters given as folders --------------------------------------------------------------


def test_entry_points_take_an_adapter_folder(tmp_path):
    shapes = llama_shapes()
    adapter = lora_adapter(shapes)
    folder = adapter.save(tmp_path / "adapter")
    src = write(tmp_path / "src", random_model(shapes))
    assert T.check_compatible(T.manifest_of(src), T.manifest_of(src), folder).compatible
    rebased = T.rebase(str(folder), "next", scale=0.5)
    moved, info = T.transfer(folder, src, src, "next", scale=0.5)
    for m in adapter.modules():
        torch.testing.assert_close(rebased.delta(m), 0.5 * adapter.delta(m))
        assert torch.equal(moved.delta(m), rebased.delta(m))
    assert info["source_base"] == "src" and moved.config["base_model_name_or_path"] == "next"
    with pytest.raises(AdapterError) as err:
        T.rebase(tmp_path / "nowhere", "next")
    assert err.value.code == "missing_config"
