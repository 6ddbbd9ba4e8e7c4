"""Tiny models for tests, with no Django: a random Llama base in HF layout and real PEFT
adapters for it. A plugin of tests/conftest.py, and loaded alone (`-p tests.model_fixtures`)
where Django is not installed, as on the GPU machine (scripts/gpu_check.sh)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

TINY_CONFIG = dict(
    vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
)


@pytest.fixture(scope="session")
def tiny_base_dir(tmp_path_factory) -> Path:
    """A random LlamaForCausalLM (hidden 64, 2 layers) saved in HF layout."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from adapters_ops._zoo_data import save_tokenizer

    torch.manual_seed(0)
    d = tmp_path_factory.mktemp("tiny-base")
    LlamaForCausalLM(LlamaConfig(**TINY_CONFIG)).save_pretrained(d)
    save_tokenizer(d)  # the zoo's character tokenizer, so ops can evaluate on seeds
    return d


@pytest.fixture(scope="session")
def make_peft_adapter(tiny_base_dir, tmp_path_factory):
    """Train-free real PEFT adapters on the tiny base: random A and B (nonzero)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    def make(name="lora", r=4, targets=("q_proj", "v_proj"), seed=1, base_dir=None, **extra) -> Path:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(base_dir or tiny_base_dir)
        cfg = LoraConfig(r=r, lora_alpha=2 * r, target_modules=list(targets), init_lora_weights=False, **extra)
        peft_model = get_peft_model(model, cfg)
        out = tmp_path_factory.mktemp(name)
        peft_model.save_pretrained(out)
        conf = json.loads((out / "adapter_config.json").read_text())
        conf["base_model_name_or_path"] = "tiny-base"
        (out / "adapter_config.json").write_text(json.dumps(conf))
        return out

    return make


