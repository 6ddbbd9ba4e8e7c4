"""QA-LoRA: group-wise quantization of a base and LoRA adapters that merge into
it exactly, so the merged model stays INT4/INT3/INT2.

Quantization (round to nearest, asymmetric, groups of G along the input
dimension of every linear projection): per (output row o, group g)

    W[o, j] ~ s[o, g] * (q[o, j] - z[o, g])        q in 0 .. 2**bits - 1

with fp16 scales s and fp16 zero points z (fractional by default).

A QA-LoRA adapter acts on group-averaged inputs: pool(x)[g] = mean of x over
group g, and A' has shape r x (in / G). Its dense update is therefore

    D[o, j] = scaling * (B @ A')[o, g(j)] / G          (one value per (o, g))

so W + D keeps the same codes and scales and only moves the zero point:

    s * (q - z) + c = s * (q - (z - c / s)),   c = scaling * (B @ A') / G
    z' = z - scaling * (B @ A') / (G * s)

Plain LoRA -> QA-LoRA (`to_qalora`): the group-constant matrix closest to
D = scaling * B @ A in Frobenius norm takes the mean of D's columns inside
each group (the least-squares constant of a set of numbers is their mean).
mean_g(D) = scaling * B @ mean_g(A), and the QA-LoRA update is
scaling * B @ A' / G, hence A' = G * mean_g(A) = the sum of A's columns in
each group; B, r and alpha are kept. `recover` then fine-tunes A' and B on the
frozen quantized base (a short QA-LoRA training run on seed examples).

The adapter is stored the PEFT way (adapter_config.json + safetensors, PEFT
key names) with `"qalora_group_size": G` and `"qalora_pooling": "mean"` in
its config (the qa-lora repository trains the same thing but writes a plain
LoRA config: declare those two keys when importing one). PEFT's own
`use_qalora` (GPTQ layers only) multiplies the pooled input by in / G, a
different scale: such adapters are read too (that factor applied), but ours
keep `use_qalora` false. `to_dense_lora` gives the equivalent ordinary LoRA
(A = A' repeated / G) that plain PEFT loads. Where a base is at hand the
shapes are checked against it (`check_base_shapes`): lora_A with in / G
columns under a plain LoRA config, or a declared group size the shapes do not
have, is an AdapterError (`qalora_undeclared`, `qalora_declaration_mismatch`).

Storage (`QuantizedModel.save`): `quantized.safetensors` holding, for each
quantized weight W, `W.qweight` (packed codes: 2/4/8 bits in uint8, least
significant first along the input dimension; 3 bits ten to an int32),
`W.scales` and `W.zeros` (fp16, out x in/G); every other tensor as is;
metadata: format, version, bits, group_size, the quantized names and shapes,
and a sha256 over all tensors (name, dtype, shape, bytes) checked on load.
`export_gguf_q4_1` writes 4-bit models as GGUF Q4_1 (d = s, m = -s * z per 32
weights), which transformers loads with `gguf_file=`.

The worker entry point is `quantize_merged(base_dir, adapter, bits,
group_size, out_dir, finetune_steps=0, examples=None, progress=None)`; with
`finetune_steps` it first recovers the adapter by distillation: Trans-LoRA's
synthetic inputs answered by the fp base + the original adapter (the teacher),
learnt by a QA-LoRA on the frozen quantized base (`synthetic_examples`,
`student_adapter`, `recover`).
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Iterable
from pathlib import Path

import torch

from ..adapter import AdapterLike, as_adapter
from ..errors import AdapterError
from ..evaluate import SELECTIONS, SeedSelection
from .codec import (
    BITS,
    FORMAT,
    FORMAT_VERSION,
    GROUP_SIZES,
    QUANT_FILE,
    TARGETS,
    Progress,
    QuantizedWeight,
    QuantSpec,
    _report,
    pack_codes,
    quantize_weight,
    unpack_codes,
)
from .conversion import (
    _pool_factor,
    _weight_name,
    check_base_shapes,
    dense_updates,
    qalora_group_size,
    qalora_group_update,
    to_dense_lora,
    to_qalora,
)
from .gguf import Q4_1_BLOCK, _llama_permute, export_gguf_q4_1, q4_1_blocks, read_gguf_q4_1
from .model import QuantizedModel, load_quantized, quantize_base, weight_shapes
from .recovery import (
    QALoRALinear,
    RecoveryConfig,
    attach_qalora,
    recover,
    student_adapter,
    synthetic_examples,
)

# --- the worker's entry point ------------------------------------------------------------


@torch.inference_mode()
def max_logit_difference(model_a, model_b, ids: torch.Tensor) -> float:
    return float((model_a(input_ids=ids).logits.float() - model_b(input_ids=ids).logits.float()).abs().max())


def quantize_merged(base_dir: str | os.PathLike, adapter: AdapterLike, bits: int = 4,
                    group_size: int = 64, out_dir: str | os.PathLike = "quantized", finetune_steps: int = 0,
                    examples: Iterable[dict] | str | os.PathLike | None = None, progress: Progress = None, *,
                    seed: int = 0, export_gguf: bool | None = None, recovery: RecoveryConfig | None = None,
                    synthetic: int = 1024) -> dict:
    """Quantize a base, bring the adapter into QA-LoRA form (converting a plain LoRA), optionally
    recover it, merge it into the zero points, and write

        out_dir/quantized.safetensors (+ config, tokenizer)   the merged model, packed
        out_dir/qalora/                                      the QA-LoRA adapter (PEFT-like)
        out_dir/model-q4_1.gguf                              4 bits, group multiple of 32 (default on)

    Recovery (`finetune_steps` > 0, `examples` = the adapter's seed examples): `synthetic` task
    inputs from Trans-LoRA's generate/filter stages are answered by the teacher (fp base + the
    original adapter); a QA-LoRA student (`recovery.init`, `recovery.rank`) on the frozen quantized
    base learns them with cross-entropy + KL to the teacher, early-stopped on the seeds
    (`recover`). `synthetic=0` trains on the seeds alone.

    Returns a JSON-able report (errors, exactness check, sizes, timings)."""
    t0 = time.perf_counter()
    base_dir, out = Path(base_dir), Path(out_dir)
    adapter = as_adapter(adapter)
    QuantSpec(bits, group_size)  # validate before any work
    shapes = weight_shapes(base_dir)
    g = check_base_shapes(adapter, shapes)  # a QA-LoRA with a plain LoRA config stops here, not after quantizing
    if finetune_steps and examples is None:
        raise AdapterError("finetune_steps > 0 needs seed examples", "missing_examples")
    if not isinstance(synthetic, int) or isinstance(synthetic, bool) or synthetic < 0:
        raise AdapterError(f"synthetic must be an integer >= 0, got {synthetic!r}", "invalid_parameter")
    cfg = dataclasses.replace(recovery or RecoveryConfig(), steps=finetune_steps, seed=seed) if finetune_steps else None
    # codes + an fp16 scale and an fp16 zero point per group
    report: dict = {"bits": bits, "group_size": group_size, "bits_per_weight": bits + 32 / group_size}

    def stage(lo, hi):
        return None if progress is None else (lambda f, m: progress(lo + (hi - lo) * f, m))

    qmodel = quantize_base(base_dir, bits, group_size, progress=stage(0.0, 0.15))
    report["base_quantization"] = dict(qmodel.summary(), per_layer=qmodel.errors)
    if g is None:
        qa, conv = to_qalora(adapter, group_size)
        report["conversion_rel_error"] = conv["rel_error"]
    else:
        qa = adapter
        report["conversion_rel_error"] = 0.0
    if cfg is not None:
        from ..evaluate import load_model, read_examples

        seeds = read_examples(examples)
        data = seeds
        if synthetic:
            syn, report["synthetic"] = synthetic_examples(base_dir, adapter, seeds, n=synthetic, seed=seed,
                                                          progress=stage(0.15, 0.3))
            data = syn + seeds
        teacher = load_model(base_dir, to_dense_lora(adapter, shapes))
        student = student_adapter(adapter, g or group_size, init=cfg.init, rank=cfg.rank, seed=seed)
        qa, report["recovery"] = recover(qmodel, student, data, teacher=teacher, config=cfg, eval_examples=seeds,
                                         progress=stage(0.3, 0.8))
    _report(progress, 0.8, "merging into zero points")
    merged = qmodel.merge(qa)
    # exactness: merged (codes unchanged, zero points moved) against quantized base + QA-LoRA unmerged
    ids = torch.arange(min(32, int(qmodel.config.get("vocab_size", 32)))).unsqueeze(0)
    unmerged = qmodel.to_model()
    attach_qalora(unmerged, qa)
    report["merge_max_logit_diff"] = max_logit_difference(merged.to_model(), unmerged.eval(), ids)
    merged.save(out)
    stored = load_quantized(out)
    report["stored_max_logit_diff"] = max_logit_difference(stored.to_model(), unmerged.eval(), ids)
    report["codes_unchanged"] = all(torch.equal(merged.weights[k].codes, qmodel.weights[k].codes)
                                    for k in qmodel.weights)
    report["integer_zero_point_error"] = merged.integer_zero_error()
    qa.save(out / "qalora")
    report["bytes"] = {"quantized": (out / QUANT_FILE).stat().st_size,
                       "bf16": sum(t.numel() * 2 for t in qmodel.state_dict().values())}
    if export_gguf is None:
        export_gguf = bits == 4 and group_size % Q4_1_BLOCK == 0
    if export_gguf:
        _report(progress, 0.9, "writing GGUF Q4_1")
        report["gguf"] = export_gguf_q4_1(merged, out / "model-q4_1.gguf")
    report["seconds"] = round(time.perf_counter() - t0, 2)
    _report(progress, 1.0, "done")
    return report


def naive_merge_quantize(base_dir: str | os.PathLike, adapter: AdapterLike, bits: int,
                         group_size: int) -> QuantizedModel:
    """The baseline QA-LoRA improves on: add the dense LoRA update, then quantize W + D."""
    return quantize_base(base_dir, bits, group_size, adapter=to_dense_lora(adapter, weight_shapes(base_dir)))


__all__ = ['BITS', 'FORMAT', 'FORMAT_VERSION', 'GROUP_SIZES', 'Progress', 'Q4_1_BLOCK', 'QALoRALinear', 'QUANT_FILE', 'QuantSpec', 'QuantizedModel', 'QuantizedWeight', 'RecoveryConfig', 'TARGETS', 'attach_qalora', 'check_base_shapes', 'dense_updates', 'export_gguf_q4_1', 'load_quantized', 'pack_codes', 'q4_1_blocks', 'qalora_group_size', 'qalora_group_update', 'quantize_base', 'quantize_weight', 'read_gguf_q4_1', 'recover', 'student_adapter', 'synthetic_examples', 'to_dense_lora', 'to_qalora', 'unpack_codes', 'weight_shapes', '_llama_permute', '_pool_factor', '_weight_name', 'max_logit_difference', 'quantize_merged', 'naive_merge_quantize', 'SeedSelection', 'SELECTIONS']
