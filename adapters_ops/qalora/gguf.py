"""GGUF Q4_1 export of a 4-bit quantized model (d = s, m = -s * z per 32 weights), which
transformers and llama.cpp load, and a reader for checks."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import AdapterError
from .codec import QuantizedWeight
from .model import QuantizedModel

# --- GGUF Q4_1 ---------------------------------------------------------------------------

_GGUF_NAMES = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}
Q4_1_BLOCK = 32


def _gguf_name(name: str) -> str:
    if name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if name == "model.norm.weight":
        return "output_norm.weight"
    if name == "lm_head.weight":
        return "output.weight"
    parts = name.split(".")
    if parts[:2] == ["model", "layers"]:
        mod = ".".join(parts[3:-1])
        if mod in _GGUF_NAMES:
            return f"blk.{parts[2]}.{_GGUF_NAMES[mod]}.{parts[-1]}"
    raise AdapterError(f"no GGUF name for tensor {name!r}", "unsupported_tensor")


def _llama_permute(t: torch.Tensor, n_head: int) -> torch.Tensor:
    """llama.cpp's row order for q/k (rotary pairs interleaved); transformers' loader undoes it."""
    return t.reshape(n_head, 2, t.shape[0] // n_head // 2, *t.shape[1:]).swapaxes(1, 2).reshape(t.shape)


def q4_1_blocks(qw: QuantizedWeight) -> torch.Tensor:
    """ggml Q4_1 bytes (out x in/32*20): per 32 weights fp16 d, fp16 m, 16 bytes of nibbles
    (byte j: weight j low, weight j+16 high), w = d * q + m with d = s, m = -s * z."""
    if qw.bits != 4 or qw.group_size % Q4_1_BLOCK:
        raise AdapterError(f"Q4_1 needs 4 bits and a group size multiple of 32, got {qw.bits} bits, "
                           f"group {qw.group_size}", "unsupported_format")
    out, n = qw.shape
    rep = qw.group_size // Q4_1_BLOCK
    d = qw.scales.repeat_interleave(rep, dim=1)
    m = (-(qw.scales.double() * qw.zeros.double())).float().repeat_interleave(rep, dim=1)
    q = qw.codes.view(out, n // Q4_1_BLOCK, Q4_1_BLOCK)
    nib = (q[..., :16] | (q[..., 16:] << 4)).to(torch.uint8)
    dm = torch.stack([d.half(), m.half()], dim=-1).view(torch.uint8)  # out x blocks x 4 bytes
    return torch.cat([dm, nib], dim=-1).reshape(out, -1)


def export_gguf_q4_1(qmodel: QuantizedModel, path: str | os.PathLike, name: str = "qalora") -> dict:
    """Write a 4-bit model (group 32/64/128) as GGUF: projections in Q4_1, the rest in F32.

    The tokenizer is not embedded (transformers takes it from the folder's tokenizer files);
    returns the largest |our dequantized weight - Q4_1 weight| (fp16 rounding of m = -s * z)."""
    try:
        import gguf
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise AdapterError("GGUF export needs the `gguf` package (pip install gguf)", "missing_dependency") from exc
    import numpy as np

    cfg = qmodel.config
    if cfg.get("model_type") != "llama":
        raise AdapterError(f"GGUF export supports llama models, got {cfg.get('model_type')!r}", "unsupported_format")
    n_head, n_kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads", cfg["num_attention_heads"])
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // n_head
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_name(name)
    w.add_context_length(cfg.get("max_position_embeddings", 2048))
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(cfg.get("rope_theta") or (cfg.get("rope_parameters") or {}).get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
    w.add_vocab_size(cfg["vocab_size"])
    for key, setter in (("bos_token_id", w.add_bos_token_id), ("eos_token_id", w.add_eos_token_id),
                        ("pad_token_id", w.add_pad_token_id)):
        if isinstance(cfg.get(key), int):
            setter(cfg[key])
    worst = 0.0
    for hf_name in sorted(set(qmodel.weights) | set(qmodel.others)):
        gname = _gguf_name(hf_name)
        if hf_name in qmodel.weights:
            qw = qmodel.weights[hf_name]
            if ".attn_q." in gname or ".attn_k." in gname:
                heads = n_head if ".attn_q." in gname else n_kv
                qw = QuantizedWeight(_llama_permute(qw.codes, heads), _llama_permute(qw.scales, heads),
                                     _llama_permute(qw.zeros, heads), qw.bits, qw.group_size)
            blocks = q4_1_blocks(qw)
            back = gguf.dequantize(blocks.numpy(), gguf.GGMLQuantizationType.Q4_1)
            worst = max(worst, float(np.abs(back - qw.dequantize().numpy()).max()))
            w.add_tensor(gname, blocks.numpy(), raw_shape=blocks.shape, raw_dtype=gguf.GGMLQuantizationType.Q4_1)
        else:
            w.add_tensor(gname, qmodel.others[hf_name].float().numpy())
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, path)
    return {"path": str(path), "bytes": path.stat().st_size, "max_abs_error_vs_ours": worst}


def read_gguf_q4_1(path: str | os.PathLike) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """GGUF name -> (codes out x in, d out x in/32, m out x in/32) for every Q4_1 tensor (read with gguf)."""
    import gguf
    import numpy as np

    out = {}
    for t in gguf.GGUFReader(str(path)).tensors:
        if t.tensor_type != gguf.GGMLQuantizationType.Q4_1:
            continue
        raw = torch.from_numpy(np.array(t.data, dtype=np.uint8))
        rows = raw.shape[0]
        blocks = raw.view(rows, -1, 20)
        dm = blocks[..., :4].contiguous().view(torch.float16).float()
        nib = blocks[..., 4:].to(torch.int32)
        codes = torch.cat([nib & 15, nib >> 4], dim=-1).reshape(rows, -1).to(torch.uint8)
        out[t.name] = (codes, dm[..., 0], dm[..., 1])
    return out
