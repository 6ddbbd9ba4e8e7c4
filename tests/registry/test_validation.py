"""Upload validation from headers only: tables of well-formed and malformed
files, names, configs and seed files, each asserting the exact error code.

Pure unit tests: no database and no Django settings. Test files are written
with safetensors' numpy writer or crafted byte by byte with struct.
"""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from safetensors import SafetensorError
from safetensors import deserialize as st_deserialize  # the format's own (Rust) validator
from safetensors.numpy import save as st_save

from hub.registry import validation as v
from hub.registry.validation import ValidationError

ROOT = Path(__file__).resolve().parents[2]


# --- helpers -------------------------------------------------------------------------


def read(data: bytes) -> dict:
    return v.read_safetensors_header(io.BytesIO(data), len(data))


def craft(header, data: bytes | int = 0, *, length: int | None = None) -> bytes:
    """A safetensors file by hand: 8-byte length (or a lie), header, buffer."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    buf = bytes(data) if isinstance(data, int) else data
    return struct.pack("<Q", len(raw) if length is None else length) + raw + buf


def f32(shape, begin):
    n = int(np.prod(shape)) * 4
    return {"dtype": "F32", "shape": list(shape), "data_offsets": [begin, begin + n]}


def raises(code, fn, *args, **kwargs) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        fn(*args, **kwargs)
    assert info.value.code == code, f"expected {code}, got {info.value.code}: {info.value.detail}"
    assert info.value.detail  # always a sentence for people
    return info.value


VALID = st_save(
    {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.zeros((4,), dtype=np.float16)},
    metadata={"format": "pt"},
)


# --- safetensors headers -----------------------------------------------------------------


def test_valid_file_returns_header_and_metadata():
    header = read(VALID)
    assert header["__metadata__"] == {"format": "pt"}
    assert header["a"] == {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]}
    assert header["b"] == {"dtype": "F16", "shape": [4], "data_offsets": [24, 32]}
    assert v.manifest_from_header(header) == {
        "a": {"shape": [2, 3], "dtype": "F32"},
        "b": {"shape": [4], "dtype": "F16"},
    }


def test_size_defaults_to_stream_length_and_reads_from_start():
    stream = io.BytesIO(VALID)
    stream.seek(5)
    assert set(v.read_safetensors_header(stream)) == {"__metadata__", "a", "b"}


def test_only_the_header_is_read():
    """The tensor bytes are never read: a stream that fails past the header still validates."""

    class HeaderOnly(io.BytesIO):
        def read(self, n=-1):
            end = self.tell() + (len(self.getvalue()) if n is None or n < 0 else n)
            assert end <= 8 + struct.unpack("<Q", VALID[:8])[0], "read past the header"
            return super().read(n)

    assert "a" in v.read_safetensors_header(HeaderOnly(VALID), len(VALID))


ODD_VALID = [
    ("zero-size tensor", craft({"e": {"dtype": "F32", "shape": [0, 5], "data_offsets": [0, 0]}, "x": f32([2], 0)}, 8)),
    ("sub-byte dtype F4 on a byte boundary", craft({"q": {"dtype": "F4", "shape": [4], "data_offsets": [0, 2]}}, 2)),
    ("tensors listed out of offset order", craft({"z": f32([2], 8), "a": f32([2], 0)}, 16)),
    ("no tensors at all", craft({}, 0)),
]


@pytest.mark.parametrize("name,data", ODD_VALID, ids=[c[0] for c in ODD_VALID])
def test_unusual_but_valid_files(name, data):
    read(data)
    st_deserialize(data)  # safetensors agrees


OVERSIZE = v.MAX_HEADER_BYTES + 1

# (id, bytes, expected code, whether safetensors' own loader must refuse it too)
MALFORMED = [
    ("0-byte file", b"", "empty_file", True),
    ("shorter than the length prefix", b"\x05\x00\x00", "truncated_safetensors", True),
    ("truncated in the buffer", VALID[:-4], "truncated_safetensors", True),
    ("truncated in the header", VALID[:20], "truncated_safetensors", True),
    ("header length past the end", craft({"a": f32([2], 0)}, 8, length=5000), "truncated_safetensors", True),
    ("oversized header length", struct.pack("<Q", OVERSIZE) + b"{}", "header_too_large", True),
    ("header not JSON", craft(b"{not json", 0), "invalid_header", True),
    ("header not UTF-8", craft(b'{"\xff": 1}', 0), "invalid_header", True),
    ("header is a list", craft([1, 2], 0), "invalid_header", True),
    ("header is a string", craft("x", 0), "invalid_header", True),
    ("deeply nested header", craft(b"[" * 100000 + b"]" * 100000, 0), "invalid_header", True),
    ("duplicate tensor name", craft(b'{"a": %s, "a": %s}' % (json.dumps(f32([2], 0)).encode(),
                                                             json.dumps(f32([2], 8)).encode()), 16),
     "invalid_header", None),
    ("metadata value not a string", craft({"__metadata__": {"k": 1}, "a": f32([2], 0)}, 8), "invalid_header", True),
    ("entry not an object", craft({"a": [1, 2]}, 0), "invalid_header", True),
    ("unknown dtype", craft({"a": {"dtype": "F128", "shape": [2], "data_offsets": [0, 32]}}, 32), "unknown_dtype", True),
    ("lowercase dtype", craft({"a": {"dtype": "float32", "shape": [2], "data_offsets": [0, 8]}}, 8), "unknown_dtype",
     True),
    ("negative dimension", craft({"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, 8), "invalid_header",
     True),
    ("shape not a list", craft({"a": {"dtype": "F32", "shape": 2, "data_offsets": [0, 8]}}, 8), "invalid_header", True),
    ("offsets not integers", craft({"a": {"dtype": "F32", "shape": [2], "data_offsets": ["0", 8]}}, 8), "bad_offsets",
     True),
    ("offsets of one number", craft({"a": {"dtype": "F32", "shape": [2], "data_offsets": [8]}}, 8), "bad_offsets", True),
    ("wrong size for dtype x shape", craft({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, 8),
     "bad_offsets", True),
    ("sub-byte dtype off a byte boundary", craft({"a": {"dtype": "F4", "shape": [3], "data_offsets": [0, 2]}}, 2),
     "bad_offsets", True),
    ("gap between tensors", craft({"a": f32([4], 0), "b": f32([4], 20)}, 36), "bad_offsets", True),
    ("overlapping tensors", craft({"a": f32([4], 0), "b": f32([4], 8)}, 24), "bad_offsets", True),
    ("buffer not starting at 0", craft({"a": f32([4], 4)}, 20), "bad_offsets", True),
    ("end before begin", craft({"a": {"dtype": "F32", "shape": [0], "data_offsets": [8, 0]}}, 8), "bad_offsets", True),
    ("offsets beyond the end of the file", craft({"a": f32([4], 0)}, 8), "truncated_safetensors", True),
    ("trailing garbage bytes", VALID + b"garbage", "bad_offsets", True),
]


@pytest.mark.parametrize("name,data,code,st_refuses", MALFORMED, ids=[c[0] for c in MALFORMED])
def test_malformed_files(name, data, code, st_refuses):
    raises(code, read, data)
    if st_refuses and code != "empty_file":
        # The same bytes must be refused by safetensors itself: we are not stricter
        # by accident, and not laxer either.
        with pytest.raises(SafetensorError):
            st_deserialize(data)


def test_errors_name_the_tensor_and_the_sizes():
    err = raises("bad_offsets", read, craft({"a": f32([4], 0), "w": f32([4], 20)}, 36))
    assert "w" in err.detail and "20" in err.detail and "16" in err.detail and "gap" in err.detail
    err = raises("bad_offsets", read, craft({"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, 8))
    assert "needs 12 bytes" in err.detail and "span 8" in err.detail
    err = raises("unknown_dtype", read, craft({"t": {"dtype": "F128", "shape": [2], "data_offsets": [0, 32]}}, 32))
    assert "t" in err.detail and "F128" in err.detail


# --- file names --------------------------------------------------------------------------

GOOD_NAMES = [
    ("adapter_model.safetensors", "adapter_model.safetensors"),
    ("adapter_config.json", "adapter_config.json"),
    ("sub/dir/README.md", "sub/dir/README.md"),
    (".gitattributes", ".gitattributes"),
    ("e\u0301t\u00e9.txt", "\u00e9t\u00e9.txt"),  # NFC: a combining accent becomes one code point
    ("x" * 255, "x" * 255),
]


@pytest.mark.parametrize("path,expected", GOOD_NAMES)
def test_good_filenames(path, expected):
    assert v.check_filename(path) == expected


BAD_NAMES = [
    "../x", "/etc/passwd", "a\\b", "a/../b", "./a", "a/.", ".hidden", "dir/.env", ".git/config",
    "a//b", "a/", "", "a\x00b", "a\nb", "tab\there", "del\x7f", "C:evil", "c:/windows/x",
    "x" * 256, "/".join(["ab"] * 400),
]


@pytest.mark.parametrize("path", BAD_NAMES)
def test_bad_filenames(path):
    err = raises("bad_filename", v.check_filename, path)
    assert err.field == "files"


@pytest.mark.parametrize(
    "path", ["pytorch_model.bin", "adapter_model.bin", "model.pt", "a/b.pth", "x.pkl", "x.pickle", "last.ckpt",
             "UPPER.BIN"],
)
def test_pickle_files_refused(path):
    err = raises("pickle_refused", v.check_filename, path)
    assert "run code" in err.detail and "safetensors" in err.detail and path in err.detail


# --- PEFT config ---------------------------------------------------------------------------

GOOD_CONFIG = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}


def cfg(**changes) -> bytes:
    c = {**GOOD_CONFIG, **changes}
    return json.dumps({k: val for k, val in c.items() if val is not ...}).encode()


def test_valid_config_is_returned_parsed():
    data = cfg(rank_pattern={"q_proj": 4, r"layers\.1\..*v_proj": 2}, alpha_pattern={"q_proj": 8.5},
               use_rslora=True)
    config = v.validate_peft_config(data)
    assert config == json.loads(data)
    assert v.validate_peft_config(cfg(target_modules=r".*\.(q|v)_proj"))["target_modules"] == r".*\.(q|v)_proj"
    assert v.validate_peft_config(cfg(lora_alpha=8.0, use_dora=None))["lora_alpha"] == 8.0


BAD_CONFIGS = [
    ("not JSON", b"{peft_type: LORA", "invalid_config"),
    ("not UTF-8", b'{"peft_type": "\xff"}', "invalid_config"),
    ("a list", b"[1]", "invalid_config"),
    ("another PEFT type", cfg(peft_type="IA3"), "not_lora"),
    ("lowercase lora", cfg(peft_type="lora"), "not_lora"),
    ("no peft_type", cfg(peft_type=...), "not_lora"),
    ("r zero", cfg(r=0), "invalid_config"),
    ("r negative", cfg(r=-4), "invalid_config"),
    ("r a string", cfg(r="8"), "invalid_config"),
    ("r a float", cfg(r=2.5), "invalid_config"),
    ("r a bool", cfg(r=True), "invalid_config"),
    ("alpha a string", cfg(lora_alpha="16"), "invalid_config"),
    ("no target_modules", cfg(target_modules=...), "invalid_config"),
    ("empty target_modules", cfg(target_modules=[]), "invalid_config"),
    ("target_modules of ints", cfg(target_modules=[1]), "invalid_config"),
    ("target_modules bad regex", cfg(target_modules="(q_proj"), "invalid_config"),
    ("target_modules nested quantifiers", cfg(target_modules="(a+)+$"), "invalid_config"),
    ("rank_pattern not a dict", cfg(rank_pattern=["q_proj"]), "invalid_config"),
    ("rank_pattern zero", cfg(rank_pattern={"q_proj": 0}), "invalid_config"),
    ("rank_pattern bad regex", cfg(rank_pattern={"[": 4}), "invalid_config"),
    ("alpha_pattern a string", cfg(alpha_pattern={"q_proj": "8"}), "invalid_config"),
    ("use_rslora a string", cfg(use_rslora="yes"), "invalid_config"),
]


@pytest.mark.parametrize("name,data,code", BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_bad_configs(name, data, code):
    assert raises(code, v.validate_peft_config, data).field == "adapter_config.json"


# --- LoRA shapes against a base manifest --------------------------------------------------

HIDDEN, KV, VOCAB = 128, 32, 100
P = "base_model.model."


def base_manifest(layers=2) -> dict:
    m = {"model.embed_tokens.weight": [VOCAB, HIDDEN], "lm_head.weight": [VOCAB, HIDDEN]}
    for i in range(layers):
        pre = f"model.layers.{i}.self_attn."
        m |= {pre + "q_proj.weight": [HIDDEN, HIDDEN], pre + "k_proj.weight": [KV, HIDDEN],
              pre + "v_proj.weight": [KV, HIDDEN], pre + "o_proj.weight": [HIDDEN, HIDDEN]}
    return {k: {"shape": s, "dtype": "BF16"} for k, s in m.items()}


def adapter_header(shapes: dict, dtype=np.float32) -> dict:
    """Write a real safetensors file with these shapes and read its header back."""
    data = st_save({k: np.zeros(s, dtype=dtype) for k, s in shapes.items()})
    return read(data)


def lora(module, a, b, adapter_name=""):
    mid = f".{adapter_name}" if adapter_name else ""
    return {f"{P}{module}.lora_A{mid}.weight": a, f"{P}{module}.lora_B{mid}.weight": b}


def qv(r=8, layers=2) -> dict:
    shapes = {}
    for i in range(layers):
        shapes |= lora(f"model.layers.{i}.self_attn.q_proj", [r, HIDDEN], [HIDDEN, r])
        shapes |= lora(f"model.layers.{i}.self_attn.v_proj", [r, HIDDEN], [KV, r])
    return shapes


CONFIG = json.loads(cfg())


def test_valid_adapter_summary():
    header = adapter_header(qv())
    s = v.check_lora_shapes(header, CONFIG, base_manifest())
    assert s == v.AdapterSummary(
        r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], dtype="F32",
        n_params=2 * (8 * HIDDEN + HIDDEN * 8 + 8 * HIDDEN + KV * 8), modules=4,
    )


def test_dominant_dtype_and_default_adapter_name():
    shapes = lora("model.layers.0.self_attn.q_proj", [8, HIDDEN], [HIDDEN, 8], adapter_name="default")
    f16 = st_save({k: np.zeros(s, dtype=np.float16) for k, s in shapes.items()}
                  | {P + "model.layers.0.self_attn.v_proj.lora_A.weight": np.zeros((8, HIDDEN), np.float32),
                     P + "model.layers.0.self_attn.v_proj.lora_B.weight": np.zeros((KV, 8), np.float32)})
    s = v.check_lora_shapes(read(f16), CONFIG, base_manifest())
    assert s.dtype == "F16" and s.modules == 2 and s.target_modules == ["q_proj", "v_proj"]


def test_embedding_and_saved_base_tensors():
    shapes = qv(layers=1) | {
        P + "model.embed_tokens.lora_embedding_A": [8, VOCAB],
        P + "model.embed_tokens.lora_embedding_B": [HIDDEN, 8],
        P + "model.embed_tokens.base_layer.weight": [VOCAB, HIDDEN],  # PEFT saves resized embeddings
        P + "lm_head.weight": [VOCAB, HIDDEN],  # modules_to_save
        P + "lm_head.modules_to_save.default.weight": [VOCAB, HIDDEN],
        P + "some.extra.buffer": [3],  # names no base tensor: left alone
    }
    s = v.check_lora_shapes(adapter_header(shapes), CONFIG, base_manifest(layers=1))
    assert s.target_modules == ["embed_tokens", "q_proj", "v_proj"] and s.modules == 3


def test_fan_in_fan_out_conv1d_base():
    manifest = {"transformer.h.0.attn.c_attn.weight": {"shape": [64, 192], "dtype": "F32"}}  # [in, out]
    header = adapter_header(lora("transformer.h.0.attn.c_attn", [4, 64], [192, 4]))
    config = {**CONFIG, "r": 4, "fan_in_fan_out": True}
    assert v.check_lora_shapes(header, config, manifest).target_modules == ["c_attn"]
    raises("shape_mismatch", v.check_lora_shapes, header, {**config, "fan_in_fan_out": False}, manifest)


def test_rank_pattern_is_honoured():
    shapes = qv()
    shapes |= lora("model.layers.0.self_attn.v_proj", [4, HIDDEN], [KV, 4])  # v_proj of layer 0: r=4
    shapes |= lora("model.layers.1.self_attn.q_proj", [2, HIDDEN], [HIDDEN, 2])  # layer 1's q_proj: r=2
    header = adapter_header(shapes)
    patterns = {"layers.0.self_attn.v_proj": 4, r"layers\.1\.self_attn\.q_proj": 2}
    s = v.check_lora_shapes(header, {**CONFIG, "rank_pattern": patterns}, base_manifest())
    assert s.modules == 4 and s.r == 8
    # Without the pattern the same file is wrong, and says which module.
    err = raises("shape_mismatch", v.check_lora_shapes, header, CONFIG, base_manifest())
    assert "model.layers.0.self_attn.v_proj" in err.detail and "[4, 128]" in err.detail
    # A key matches whole dotted suffixes only: "proj" is not "q_proj", so q_proj keeps r=8.
    suffix_only = {**patterns, "proj": 2}
    assert v.check_lora_shapes(header, {**CONFIG, "rank_pattern": suffix_only}, base_manifest()).modules == 4


def replace(shapes, key_end, shape):
    out = dict(shapes)
    (key,) = [k for k in out if k.endswith(key_end)]
    out[key] = shape
    return out


BAD_SHAPES = [
    ("A wrong in_features", replace(qv(), "layers.0.self_attn.q_proj.lora_A.weight", [8, 64]), "shape_mismatch",
     ["model.layers.0.self_attn.q_proj", "lora_A", "[8, 64]", "[128, 128]", "needs [8, 128]"]),
    ("B wrong out_features", replace(qv(), "layers.1.self_attn.v_proj.lora_B.weight", [HIDDEN, 8]), "shape_mismatch",
     ["model.layers.1.self_attn.v_proj", "lora_B", "[128, 8]", "[32, 128]", "needs [32, 8]"]),
    ("A rank differs from config", replace(qv(), "layers.0.self_attn.q_proj.lora_A.weight", [4, HIDDEN]),
     "shape_mismatch", ["lora_A", "[4, 128]", "needs [8, 128]"]),
    ("A with three dimensions", replace(qv(), "layers.0.self_attn.q_proj.lora_A.weight", [8, HIDDEN, 1]),
     "shape_mismatch", ["[8, 128, 1]"]),
    ("unknown module", qv() | lora("model.layers.0.mlp.gate_proj", [8, HIDDEN], [256, 8]), "unknown_module",
     ["model.layers.0.mlp.gate_proj", "another base"]),
    ("layer beyond the base", qv() | lora("model.layers.7.self_attn.q_proj", [8, HIDDEN], [HIDDEN, 8]),
     "unknown_module", ["model.layers.7.self_attn.q_proj"]),
    ("B missing", {k: s for k, s in qv().items() if not k.endswith("layers.1.self_attn.q_proj.lora_B.weight")},
     "missing_tensor", ["model.layers.1.self_attn.q_proj", "no lora_B"]),
    ("A missing", {k: s for k, s in qv().items() if not k.endswith("layers.0.self_attn.v_proj.lora_A.weight")},
     "missing_tensor", ["model.layers.0.self_attn.v_proj", "no lora_A"]),
    ("embedding A and B swapped", {P + "model.embed_tokens.lora_embedding_A": [8, HIDDEN],
                                   P + "model.embed_tokens.lora_embedding_B": [VOCAB, 8]},
     "shape_mismatch", ["model.embed_tokens", "lora_A", "needs [8, 100]"]),
    ("modules_to_save of the wrong shape", qv() | {P + "lm_head.weight": [VOCAB + 1, HIDDEN]}, "shape_mismatch",
     ["lm_head.weight", "[101, 128]", "[100, 128]"]),
    ("no LoRA tensor at all", {P + "lm_head.weight": [VOCAB, HIDDEN]}, "not_lora", []),
]


@pytest.mark.parametrize("name,shapes,code,mentions", BAD_SHAPES, ids=[c[0] for c in BAD_SHAPES])
def test_bad_lora_shapes(name, shapes, code, mentions):
    err = raises(code, v.check_lora_shapes, adapter_header(shapes), CONFIG, base_manifest())
    for text in mentions:
        assert text in err.detail, f"{text!r} not in {err.detail!r}"


def test_real_peft_adapter_passes(tmp_path):
    """Keys and shapes exactly as PEFT writes them (embedding, rank_pattern,
    modules_to_save), checked against a manifest of a real HF checkpoint."""
    torch = pytest.importorskip("torch")
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=48, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=False,
    ))
    model.save_pretrained(tmp_path / "base")
    with open(tmp_path / "base" / "model.safetensors", "rb") as f:
        manifest = v.manifest_from_header(v.read_safetensors_header(f))
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "embed_tokens", "down_proj"],
                             rank_pattern={"v_proj": 2}, modules_to_save=["lm_head"])
    peft.get_peft_model(model, config).save_pretrained(tmp_path / "lora")
    parsed = v.validate_peft_config((tmp_path / "lora" / "adapter_config.json").read_bytes())
    with open(tmp_path / "lora" / "adapter_model.safetensors", "rb") as f:
        header = v.read_safetensors_header(f)
    s = v.check_lora_shapes(header, parsed, manifest)
    assert (s.r, s.lora_alpha, s.modules) == (4, 8, 7)
    assert s.target_modules == ["down_proj", "embed_tokens", "q_proj", "v_proj"]
    # The same adapter against a base with a narrower MLP is refused.
    other = dict(manifest)
    other["model.layers.0.mlp.down_proj.weight"] = {"shape": [32, 48], "dtype": "F32"}
    raises("shape_mismatch", v.check_lora_shapes, header, parsed, other)


# --- seed examples --------------------------------------------------------------------------


def jsonl(*rows) -> bytes:
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows).encode()


def test_seeds_ok():
    row = {"prompt": "2+2=", "completion": "4"}
    assert v.validate_seeds(jsonl(row, row, row)) == 3
    assert v.validate_seeds(jsonl(row, "", "  ", {**row, "extra": 1})) == 2  # blank lines skipped
    assert v.validate_seeds(b'{"prompt": "a", "completion": "b"}') == 1  # no final newline
    assert v.validate_seeds(b'{"prompt": "a", "completion": "b"}\r\n') == 1  # Windows line ends
    # A raw U+2028 inside a JSON string is not a line break.
    assert v.validate_seeds(jsonl('{"prompt": "a\u2028b", "completion": "c"}')) == 1


BAD_SEEDS = [
    ("bad JSON on line 2", jsonl({"prompt": "a", "completion": "b"}, "{oops"), "Line 2"),
    ("not an object", jsonl(["prompt", "completion"]), "Line 1"),
    ("missing completion", jsonl({"prompt": "a", "completion": "b"}, {"prompt": "a"}), "Line 2"),
    ("completion not a string", jsonl({"prompt": "a", "completion": 4}), "Line 1"),
    ("line number counts blank lines", jsonl({"prompt": "a", "completion": "b"}, "", {"prompt": 1}), "Line 3"),
    ("not UTF-8", b'{"prompt": "\xff"}\n', "UTF-8"),
    ("empty", b"\n\n", "no example"),
]


@pytest.mark.parametrize("name,data,mention", BAD_SEEDS, ids=[c[0] for c in BAD_SEEDS])
def test_bad_seeds(name, data, mention):
    err = raises("invalid_seeds", v.validate_seeds, data)
    assert mention in err.detail and err.field == "seeds"


def test_seeds_line_cap():
    row = {"prompt": "a", "completion": "b"}
    assert v.validate_seeds(jsonl(*[row] * 5), max_lines=5) == 5
    raises("invalid_seeds", v.validate_seeds, jsonl(*[row] * 6), max_lines=5)


# --- the web process stays free of torch ------------------------------------------------------


def test_import_loads_no_tensor_library_and_no_django():
    from tests.web_process import forbidden_modules_after

    assert forbidden_modules_after("import hub.registry.validation", django_setup=False, also=("django",)) == []
