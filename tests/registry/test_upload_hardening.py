"""Upload hardening from the security review: rank_pattern / alpha_pattern keys
are matched without running them as regexes (and as PEFT matches them),
safetensors headers are capped in bytes and tensors before they become Python
objects, and file names cannot hide characters or break Content-Disposition."""

from __future__ import annotations

import io
import json
import struct
import time
import tracemalloc
import unicodedata
from email.message import EmailMessage

import pytest
from django.core.files.uploadedfile import SimpleUploadedFile
from django.utils.http import parse_header_parameters

from hub.registry import validation as v
from hub.registry.validation import ValidationError

MB = 1 << 20


def raises(code, fn, *args, **kwargs) -> ValidationError:
    with pytest.raises(ValidationError) as info:
        fn(*args, **kwargs)
    assert info.value.code == code, f"expected {code}, got {info.value.code}: {info.value.detail}"
    return info.value


def config(**changes) -> bytes:
    return json.dumps({"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj"], **changes}).encode()


# --- rank_pattern / alpha_pattern keys: PEFT's answer, without a regex ------------------------

MODULES = [f"model.layers.{i}.{m}" for i in (0, 1, 11)
           for m in ("self_attn.q_proj", "self_attn.v_proj", "mlp.down_proj", "mlp.up_proj")]
MODULES += ["model.embed_tokens", "lm_head", "model.layers.\u0663.mlp.down_proj", "model.layersX0.self_attn.q_proj"]

ACCEPTED_KEYS = [
    "q_proj", "self_attn.q_proj", "model.layers.0.self_attn.q_proj", r"layers\.1\.self_attn\.q_proj",
    "layers.0.self_attn.q_proj", "q_proj|v_proj", "mlp.down_proj|^lm_head", "^model.layers.0.mlp.down_proj",
    "^layers.0.mlp.down_proj", "v_proj$", r"layers\.[0-9]+\.mlp\.down_proj", r"layers\.\d+\.mlp\.down_proj",
    r"layers\.1\..*v_proj", ".*_proj", "layers.1.*", "layers.1+.mlp.up_proj", "proj", "embed_tokens", ".*",
]


@pytest.mark.parametrize("key", ACCEPTED_KEYS)
def test_accepted_keys_match_like_peft(key):
    """Upload validation, the library and PEFT's own get_pattern_key agree on every module."""
    from peft.utils.other import get_pattern_key

    from adapters_ops.adapter import Adapter

    assert v.validate_peft_config(config(rank_pattern={key: 4}))["rank_pattern"] == {key: 4}
    adapter = Adapter(config={"peft_type": "LORA", "r": 8, "rank_pattern": {key: 4}})
    for module in MODULES:
        peft = 4 if get_pattern_key([key], module) == key else 8
        assert v.pattern_value({key: 4}, module, 8) == peft, (key, module)
        assert adapter._pattern_value("rank_pattern", v.PEFT_PREFIX + module, 8) == peft, (key, module)


@pytest.mark.parametrize("pattern,module,want", [
    ({"q_proj|v_proj": 4}, "model.layers.0.self_attn.v_proj", 4),  # the library answered r=8 here
    ({"q_proj|v_proj": 4, "v_proj": 2}, "model.layers.0.self_attn.v_proj", 4),  # the first key wins
    ({"v_proj": 2, "q_proj|v_proj": 4}, "model.layers.0.self_attn.v_proj", 2),
    ({"^model.layers.0.self_attn.q_proj": 4}, "model.layers.0.self_attn.q_proj", 4),  # without PEFT's prefix
])
def test_key_order_and_names_follow_peft(pattern, module, want):
    from peft.utils.other import get_pattern_key

    from adapters_ops.adapter import Adapter

    assert pattern[get_pattern_key(pattern.keys(), module)] == want
    assert v.pattern_value(pattern, module, 8) == want
    adapter = Adapter(config={"peft_type": "LORA", "r": 8, "rank_pattern": pattern})
    assert adapter._pattern_value("rank_pattern", v.PEFT_PREFIX + module, 8) == want


def test_an_adapter_peft_built_with_an_alternation_key(make_peft_adapter, tiny_base_dir):
    """PEFT gives v_proj the rank of the first matching key; the hub accepts the shapes and the
    library scales by the rank PEFT used."""
    from adapters_ops.adapter import Adapter

    out = make_peft_adapter("alternation", r=4, rank_pattern={"q_proj|v_proj": 2, "v_proj": 6},
                            alpha_pattern={"q_proj|v_proj": 3, "v_proj": 5})
    with open(tiny_base_dir / "model.safetensors", "rb") as b, open(out / "adapter_model.safetensors", "rb") as a:
        base, header = v.read_safetensors_header(b), v.read_safetensors_header(a)
    cfg = v.validate_peft_config((out / "adapter_config.json").read_bytes())
    assert v.check_lora_shapes(header, cfg, v.manifest_from_header(base)).modules == 4
    adapter = Adapter.load(out)
    for module in adapter.modules():
        assert adapter.rank(module) == 2, module
        assert adapter.scaling(module) == 3 / 2, module


REFUSED_KEYS = [
    "(.|.){0,25}z", "(a+)+$", "(q|v)_proj", "q_proj|", "|q_proj", r"layers\.[0-9]+\..*v_proj", ".*.*.*.*x",
    "q_proj{2}", "q_proj?", "(?=q)q_proj", "[a-z]+_proj", r"\w+_proj", r"(q)\1", "q proj", "^", "a^b",
]


@pytest.mark.parametrize("key", REFUSED_KEYS)
@pytest.mark.parametrize("field", ["rank_pattern", "alpha_pattern"])
def test_other_keys_are_refused_and_told_why(key, field):
    err = raises("unsupported_pattern", v.validate_peft_config, config(**{field: {key: 4}}))
    assert err.field == "adapter_config.json" and repr(key) in err.detail
    assert "regex" in err.detail and "q_proj|v_proj" in err.detail and "[0-9]" in err.detail


def test_broken_regexes_and_bad_key_types_stay_invalid_config():
    raises("invalid_config", v.validate_peft_config, config(rank_pattern={"[": 4}))
    raises("invalid_config", v.validate_peft_config, config(rank_pattern={"a" * 257: 4}))
    raises("invalid_config", v.validate_peft_config, config(rank_pattern={"": 4}))


def test_pattern_work_is_bounded(monkeypatch):
    many = {f"model.layers.{i}.self_attn.q_proj": 4 for i in range(v.MAX_PATTERN_KEYS + 1)}
    raises("unsupported_pattern", v.validate_peft_config, config(rank_pattern=many))
    raises("config_too_large", v.validate_peft_config, config(description="x" * v.MAX_CONFIG_BYTES))
    # keys x modules past the budget: refused before any module is tried
    header = {}
    for m in ("q_proj", "v_proj"):
        name = f"base_model.model.model.layers.0.self_attn.{m}"
        header[f"{name}.lora_A.weight"] = {"dtype": "F32", "shape": [8, 64], "data_offsets": [0, 0]}
        header[f"{name}.lora_B.weight"] = {"dtype": "F32", "shape": [64, 8], "data_offsets": [0, 0]}
    cfg = json.loads(config(rank_pattern={"k_proj": 2, "o_proj": 2}))
    monkeypatch.setattr(v, "MAX_PATTERN_CHECKS", 3)
    raises("unsupported_pattern", v.check_lora_shapes, header, cfg, {})


def test_matching_a_long_key_on_a_long_name_is_linear():
    key = "|".join(["a.*"] * 60)  # 60 quantified alternatives, 239 characters
    started = time.perf_counter()
    assert v.pattern_value({key: 4}, "." * 5000, 8) == 8
    assert time.perf_counter() - started < 1


@pytest.mark.django_db
def test_the_evil_pattern_upload_is_a_fast_400(api, tiny_base, make_peft_adapter):
    """The key of the report took 25 s of CPU per module in the web process, then was accepted."""
    folder = make_peft_adapter("evil", r=4)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["rank_pattern"] = {"(.|.){0,25}z": 8}
    files = [SimpleUploadedFile("adapter_config.json", json.dumps(cfg).encode()),
             SimpleUploadedFile("adapter_model.safetensors", (folder / "adapter_model.safetensors").read_bytes())]
    started = time.perf_counter()
    r = api.post("/api/v1/adapters/", {"name": "alice/evil", "base_model": "tiny-base", "files": files},
                 format="multipart")
    elapsed = time.perf_counter() - started
    assert r.status_code == 400 and r.json()["error"] == "unsupported_pattern", r.content
    assert elapsed < 1, f"{elapsed:.2f} s"


def test_an_oversized_config_is_refused_before_it_is_read(api, tiny_base, make_peft_adapter):
    folder = make_peft_adapter("big-config", r=4)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["description_padding"] = "x" * (v.MAX_CONFIG_BYTES + 1)
    files = [SimpleUploadedFile("adapter_config.json", json.dumps(cfg).encode()),
             SimpleUploadedFile("adapter_model.safetensors", (folder / "adapter_model.safetensors").read_bytes())]
    r = api.post("/api/v1/adapters/", {"name": "alice/big", "base_model": "tiny-base", "files": files},
                 format="multipart")
    assert r.status_code == 400 and r.json()["error"] == "config_too_large", r.content


# --- safetensors header caps ------------------------------------------------------------------


def entry(i: int) -> bytes:
    return b'"t%d":{"dtype":"U8","shape":[0],"data_offsets":[0,0]}' % i


def measured(fn, *args, **kwargs):
    """(exception or result, seconds, peak MB of Python allocations during the call): timed
    once without tracemalloc, which slows allocation, then traced once."""
    def call():
        try:
            return fn(*args, **kwargs)
        except ValidationError as exc:
            return exc
        finally:
            for a in args:
                if hasattr(a, "seek"):
                    a.seek(0)

    started = time.perf_counter()
    call()
    seconds = time.perf_counter() - started
    tracemalloc.start()
    out = call()
    peak = tracemalloc.get_traced_memory()[1] / MB
    tracemalloc.stop()
    return out, seconds, peak


def test_a_90_mb_header_is_refused_before_it_is_read(tmp_path):
    path = tmp_path / "huge.safetensors"
    body = b'{"__metadata__":{"pad":"' + b"x" * (90 * MB) + b'"},' + entry(0) + b"}"
    path.write_bytes(struct.pack("<Q", len(body)) + body)
    del body
    with open(path, "rb") as f:
        err, seconds, peak = measured(v.read_safetensors_header, f)
    assert isinstance(err, ValidationError) and err.code == "header_too_large", err
    assert seconds < 2 and peak < 100, (seconds, peak)


def test_tensor_count_is_capped_while_parsing():
    """1.56 M tensors in 95 MB took 52.7 s and 1.7 GB; under the byte cap, the count stops the parse."""
    n = 140_000
    body = b"{" + b",".join(entry(i) for i in range(n)) + b"}"
    assert len(body) < v.MAX_HEADER_BYTES
    data = struct.pack("<Q", len(body)) + body
    err, seconds, peak = measured(v.read_safetensors_header, io.BytesIO(data), len(data))
    assert isinstance(err, ValidationError) and err.code == "too_many_tensors", err
    assert str(v.MAX_HEADER_TENSORS) in err.detail
    assert seconds < 2 and peak < 100, (seconds, peak)


def expert_lora_header(n_tensors: int) -> tuple[bytes, int]:
    """A LoRA on every expert of an MoE (long names, real shapes and offsets): the file's first
    bytes and the length of its tensor data, which the header check never reads."""
    header, offset = {}, 0
    for i in range(n_tensors // 2):
        layer, expert = divmod(i, 128)
        for f, shape in (("A", [16, 768]), ("B", [2048, 16])):
            size = 2 * shape[0] * shape[1]
            key = f"base_model.model.model.layers.{layer}.mlp.experts.{expert}.down_proj.lora_{f}.weight"
            header[key] = {"dtype": "BF16", "shape": shape, "data_offsets": [offset, offset + size]}
            offset += size
    body = json.dumps(header).encode()
    return struct.pack("<Q", len(body)) + body, offset


def test_realistic_headers_still_pass():
    # 48 layers x 128 experts x down_proj, A and B: ~12,000 tensors (all three projections: ~37,000).
    data, payload = expert_lora_header(48 * 128 * 2)
    header = v.read_safetensors_header(io.BytesIO(data), len(data) + payload)
    assert len(header) == 48 * 128 * 2
    # Past the adapter's count but a base model's shard: the base caps take it.
    data, payload = expert_lora_header(v.MAX_HEADER_TENSORS + 2)
    assert len(data) < v.BASE_MAX_HEADER_BYTES
    raises("too_many_tensors", v.read_safetensors_header, io.BytesIO(data), len(data) + payload)
    header = v.read_safetensors_header(io.BytesIO(data), len(data) + payload, max_bytes=v.BASE_MAX_HEADER_BYTES,
                                       max_tensors=v.BASE_MAX_HEADER_TENSORS)
    assert len(header) == v.MAX_HEADER_TENSORS + 2


# --- file names and Content-Disposition -----------------------------------------------------

HIDDEN_NAMES = [
    "evil\u202egnp.safetensors",  # right-to-left override: shows as evilsafetensors.png
    "adapter_model\u200b.safetensors",  # zero-width space
    "a\u2066b.json",  # bidi isolate
    "\ufeffadapter_config.json",  # byte-order mark
    "notes\u2028.txt", "notes\u2029.txt",  # line and paragraph separators
    "x\u0085.txt",  # next line (C1 control)
    "\uff0e\uff0e/x.json",  # fullwidth dots: "../x.json" once NFKC-normalised
    "dir\uff0fx.json",  # fullwidth solidus
    "\ufb01le.json",  # the "fi" ligature
    "a\u00a0b.json",  # no-break space
    "\ue000.json",  # private use
]


@pytest.mark.parametrize("path", HIDDEN_NAMES)
def test_invisible_and_compatibility_characters_are_refused(path):
    err = raises("bad_filename", v.check_filename, path)
    assert err.field == "files"
    assert not any(unicodedata.category(c) in ("Cf", "Zl", "Zp") for c in err.detail)  # shown escaped


@pytest.mark.parametrize("path", ["adapter_model.safetensors", "r\u00e9sum\u00e9.md", "\u6a21\u578b/\u8bf4\u660e.md",
                                  "we\"ird name;.txt"])
def test_ordinary_names_still_pass(path):
    assert v.check_filename(path) == path


@pytest.mark.django_db
def test_uploads_refuse_hidden_and_fullwidth_names(api, user, tiny_base, make_peft_adapter):
    from hub.registry.models import Adapter
    from hub.registry.services import IncomingFile, adapter_create_from_upload

    folder = make_peft_adapter("names", r=4)
    names = ("adapter_config.json", "adapter_model.safetensors")
    for bad, code_point in (("evil\u202egnp.safetensors", "U+202E"), ("adapter_model\u200b.safetensors", "U+200B")):
        files = [IncomingFile(n, io.BytesIO((folder / n).read_bytes())) for n in names]
        files.append(IncomingFile(bad, io.BytesIO((folder / names[1]).read_bytes())))
        err = raises("bad_filename", adapter_create_from_upload, owner="alice", name="t", base=tiny_base,
                     files=files, user=user)
        assert code_point in err.detail
    # Django's multipart parser drops non-printable characters itself; fullwidth ones get through.
    files = [SimpleUploadedFile(n, (folder / n).read_bytes()) for n in names]
    files.append(SimpleUploadedFile("adapter_model\uff0esafetensors", b"x"))
    r = api.post("/api/v1/adapters/", {"name": "alice/names", "base_model": "tiny-base", "files": files},
                 format="multipart")
    assert r.status_code == 400 and r.json()["error"] == "bad_filename", r.content
    assert not Adapter.objects.exists()


@pytest.mark.parametrize("path,fallback", [
    ("adapter_model.safetensors", "adapter_model.safetensors"),
    ('sub/we"ird.txt', "we_ird.txt"),
    ("back\\slash%41.txt", "back_slash_41.txt"),
    ("r\u00e9sum\u00e9; x.md", "r_sum_; x.md"),
    ("\u6a21\u578b.json", "__.json"),
])
@pytest.mark.parametrize("disposition", ["attachment", "inline"])
def test_content_disposition_round_trips(path, fallback, disposition):
    value = v.content_disposition(path, disposition)
    assert value.isascii() and value.startswith(f'{disposition}; filename="{fallback}"; filename*=UTF-8\'\'')
    # A reader of filename alone gets the whole fallback (no quote ends it early) ...
    msg = EmailMessage()
    msg["Content-Disposition"] = value
    assert msg.get_content_disposition() == disposition and msg.get_filename() == fallback
    # ... and one that knows filename* (RFC 6266: it wins) the exact name.
    kind, params = parse_header_parameters(value)
    assert kind == disposition and params["filename"] == path.rsplit("/", 1)[-1]


# --- target_modules as a regex -----------------------------------------------------------------


def llama_manifest(layers: int = 30) -> dict:
    return {f"model.layers.{i}.self_attn.{p}.weight": {"shape": [64, 64], "dtype": "F32"}
            for i in range(layers) for p in ("q_proj", "k_proj", "v_proj", "o_proj")}


@pytest.mark.parametrize("pattern", [r".*\.(q_proj|v_proj)", "q_proj", r"model\.layers\.\d+\.self_attn\.(q|v)_proj",
                                     r"(?:.*?(?:self_attn|mlp).*?(?:q_proj|v_proj).*?)"])
def test_a_realistic_target_modules_regex_passes(pattern):
    started = time.perf_counter()
    v.check_target_modules_regex(pattern, llama_manifest())
    assert time.perf_counter() - started < 1


@pytest.mark.parametrize("pattern", ["(.|.|.)*z", "(.|.){0,25}z"])
def test_a_catastrophic_target_modules_regex_is_refused_in_bounded_time(pattern):
    """PEFT full-matches target_modules with `re` on every module name at load; these never finish."""
    started = time.perf_counter()
    with pytest.raises(ValidationError) as info:
        v.check_target_modules_regex(pattern, llama_manifest())
    assert info.value.code == "unsupported_pattern" and "module names" in info.value.detail
    assert time.perf_counter() - started < v.TARGET_REGEX_BUDGET_S + 1


def test_an_invalid_target_modules_regex_is_a_config_error():
    with pytest.raises(ValidationError) as info:
        v.check_target_modules_regex("(q_proj", llama_manifest(1))
    assert info.value.code == "invalid_config"


def test_the_evil_target_modules_upload_is_a_400(api, tiny_base, make_peft_adapter):
    folder = make_peft_adapter("evil-targets", r=4)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg["target_modules"] = "(.|.|.)*z"
    files = [SimpleUploadedFile("adapter_config.json", json.dumps(cfg).encode()),
             SimpleUploadedFile("adapter_model.safetensors", (folder / "adapter_model.safetensors").read_bytes())]
    started = time.perf_counter()
    r = api.post("/api/v1/adapters/", {"name": "alice/evil-targets", "base_model": "tiny-base", "files": files},
                 format="multipart")
    assert r.status_code == 400 and r.json()["error"] == "unsupported_pattern", r.content
    assert time.perf_counter() - started < v.TARGET_REGEX_BUDGET_S + 2


@pytest.mark.parametrize("key", [r"(q|v)_proj", r"layers\.[01]\.self_attn\.(q|k)_proj"])
def test_the_library_runs_other_keys_as_peft_does(key):
    """One implementation (adapters_ops.peft_patterns): the hub refuses a key outside its forms,
    while the library, which also reads adapters made elsewhere, runs it as PEFT's regex."""
    from peft.utils.other import get_pattern_key

    from adapters_ops.adapter import Adapter

    with pytest.raises(v.ValidationError) as info:
        v.pattern_value({key: 4}, "model.layers.0.self_attn.q_proj", 8)
    assert info.value.code == "unsupported_pattern"
    adapter = Adapter(config={"peft_type": "LORA", "r": 8, "rank_pattern": {key: 4}})
    for module in MODULES:
        peft = 4 if get_pattern_key([key], module) == key else 8
        assert adapter._pattern_value("rank_pattern", v.PEFT_PREFIX + module, 8) == peft, (key, module)
