"""`translora`: the transfer op with Trans-LoRA forced (synthetic data from the
seeds, a discriminator filter, labels from the source, distillation on the
target). Resumable: each stage's output is a job checkpoint, so a worker
killed mid-distillation resumes from the last finished stage."""

from __future__ import annotations

from workers import runner
from workers.app import app
from workers.ops.transfer import transfer


def translora(ctx: runner.JobContext) -> runner.RevisionOutput:
    ctx.params["method"] = "translora"
    return transfer(ctx)


@app.task(name="ops.translora", bind=True)
def translora_task(self, job_id: str) -> str:
    return runner.run(job_id, translora, task=self)
