"""Fine-tuning transfer: move a fine-tune from one base version to the next.

A fine-tune is a *diff vector* ``finetuned - base``; when two versions of a
base are linearly connected (the newer one continued training from the
older), adding the diff to the newer base recovers most of the fine-tune
without training, and a short fine-tune from there ("recycling then
fine-tuning") beats training from scratch (Lin et al., "Efficient Model
Development through Fine-tuning Transfer", 2025). A LoRA already is a
low-rank diff vector, so for adapters the transfer is a re-labelling plus an
optional short fine-tune; full fine-tunes are turned into a diff first.

Adapters (small, in memory):
    check_compatible / require_compatible   do the two bases line up?
    rebase(adapter, target_slug, scale)       the same LoRA, now on the target
    recycle_finetune(adapter, target_dir, examples, steps=..)
    transfer(adapter, source_dir, target_dir, target_slug, ..)  all three, for a worker
    quality_gate(...)                          did the transfer help on the target?

Full checkpoints (streamed, memory bounded by a chunk, never a checkpoint):
    manifest_of(dir)                           tensor name -> shape/dtype from headers
    extract_dense(finetuned_dir, base_dir, out_path)   the exact diff, one file
    extract(finetuned_dir, base_dir, rank)     the diff as a LoRA (randomized SVD)
    apply(diff, target_dir, out_dir, scale)    target + diff as a sharded checkpoint
    apply_to_state_dict(state_dict, diff, scale) / apply_to_model(model, diff, scale)
                                               the same in memory, in place

Entry points that take an adapter take an Adapter or a PEFT adapter folder (as_adapter).

Checkpoints are read with our own header parser and positioned reads into
buffers we own, not with ``safe_open``: safe_open memory-maps the file, and
every page it touches stays resident (and counted in RSS) until the file is
closed, so a tensor-by-tensor loop over one safe_open handle still ends with
the whole checkpoint resident (see docs/transfer.md). Large tensors are
processed in row chunks, so peak memory is a few chunks whatever the size of
the checkpoint or of its largest tensor.
"""

from __future__ import annotations

from .applying import apply, apply_to_model, apply_to_state_dict
from .checkpoint_io import (
    DEFAULT_CHUNK_BYTES,
    DEFAULT_HOLD_BYTES,
    DEFAULT_SHARD_BYTES,
    EXTRA_NAME,
    INDEX_NAME,
    MAX_HEADER_BYTES,
    REPORT_NAME,
    SINGLE_NAME,
    STREAM_CHUNK_BYTES,
    VOCAB_GROWTH_KEY,
    Progress,
    _natural_key,
    manifest_of,
    write_checkpoint,
)
from .compat import Compatibility, Mismatch, check_compatible, require_compatible
from .dense import extract_dense
from .gate import quality_gate
from .lora import rebase, recycle_finetune, transfer
from .lowrank import ExtractReport, extract

__all__ = ['Compatibility', 'DEFAULT_CHUNK_BYTES', 'DEFAULT_HOLD_BYTES', 'DEFAULT_SHARD_BYTES', 'EXTRA_NAME', 'ExtractReport', 'INDEX_NAME', 'MAX_HEADER_BYTES', 'Mismatch', 'Progress', 'REPORT_NAME', 'SINGLE_NAME', 'STREAM_CHUNK_BYTES', 'VOCAB_GROWTH_KEY', 'apply', 'apply_to_model', 'apply_to_state_dict', 'check_compatible', 'extract', 'extract_dense', 'manifest_of', 'quality_gate', 'rebase', 'recycle_finetune', 'require_compatible', 'transfer', 'write_checkpoint', '_natural_key']
