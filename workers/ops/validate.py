"""`validate`: re-check a stored revision without loading a tensor.

Every blob is re-hashed (streamed) and compared with its Blob row; the PEFT
config and safetensors header are re-read and the LoRA shapes checked against
the base model's manifest (hub.registry.validation, the upload checks). The
job succeeds with a summary message and creates no revision.
"""

from __future__ import annotations

import hashlib

from hub.registry import selectors, services, validation
from hub.registry.validation import ValidationError
from hub.storage import CHUNK, open_blob
from workers import runner
from workers.app import app


def validate(ctx: runner.JobContext) -> runner.Done:
    adapter = ctx.adapter or ctx.adapter_get(ctx.params["adapter"])
    rev = ctx.revision(adapter, ctx.params.get("revision"))
    files = selectors.revision_files(rev)
    total = sum(b.size for b in files.values()) or 1
    done = 0
    for i, (path, blob) in enumerate(sorted(files.items()), start=1):
        h, n = hashlib.sha256(), 0
        ctx.progress(0.9 * done / total, f"Hashing {path} ({i}/{len(files)})")
        with open_blob(blob) as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
                n += len(chunk)
                ctx.progress(0.9 * (done + n) / total, f"Hashing {path} ({i}/{len(files)})")
        done += blob.size
        if n != blob.size:
            raise runner.OpError(f"{path}: the store holds {n} bytes but the registry records {blob.size}.",
                                 "size_mismatch")
        if h.hexdigest() != blob.sha256:
            raise runner.OpError(
                f"{path}: the stored bytes hash to {h.hexdigest()[:12]}… but the registry records "
                f"{blob.sha256[:12]}… (the blob is corrupt).", "checksum_mismatch")

    ctx.progress(0.95, "Checking headers and LoRA shapes")
    for path, blob in sorted(files.items()):
        if path.endswith(".safetensors") and path != services.ADAPTER_WEIGHTS:
            _header(path, blob)  # any other safetensors must at least be well-formed
    cfg, weights = files.get(services.ADAPTER_CONFIG), files.get(services.ADAPTER_WEIGHTS)
    base = rev.base_model
    what = f"{len(files)} files ({total if files else 0} bytes) match their sha256"
    if cfg is None or weights is None:
        return runner.Done(f"OK: {what}; no PEFT adapter files to check.", {"files": len(files)})
    with open_blob(cfg) as f:
        try:
            config = validation.validate_peft_config(f.read())
        except ValidationError as exc:
            exc.detail = f"{services.ADAPTER_CONFIG}: {exc.detail}"
            raise
    try:
        summary = validation.check_lora_shapes(_header(services.ADAPTER_WEIGHTS, weights), config, base.manifest)
    except ValidationError as exc:
        exc.detail = f"{services.ADAPTER_WEIGHTS}: {exc.detail}"
        raise
    return runner.Done(
        f"OK: {what}; {summary.modules} LoRA modules (r={summary.r}, {summary.dtype}) fit {base.slug}.",
        {"files": len(files), "bytes": total, "modules": summary.modules, "r": summary.r},
    )


def _header(path, blob):
    with open_blob(blob) as f:
        try:
            return validation.read_safetensors_header(f, blob.size)
        except ValidationError as exc:
            exc.detail = f"{path}: {exc.detail}"
            raise


@app.task(name="ops.validate", bind=True)
def validate_task(self, job_id: str) -> str:
    return runner.run(job_id, validate, task=self)
