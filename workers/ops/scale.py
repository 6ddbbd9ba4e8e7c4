"""`scale`: a `scale` revision whose update is `factor` times the source's
(adapters_ops.scale)."""

from __future__ import annotations

from workers import inputs, runner
from workers.app import app


def scale(ctx: runner.JobContext) -> runner.RevisionOutput:
    from adapters_ops.scale import scale as scale_adapter

    p = ctx.params
    adapter = ctx.adapter
    source = ctx.revision(adapter, p.get("revision"))
    ctx.progress(0.1, f"Loading {adapter.repo_id}@{source.sha[:8]}")
    scaled = scale_adapter(inputs.load_adapter(ctx, source), p["factor"])
    out = scaled.save(ctx.workdir / "scaled")
    return runner.RevisionOutput(
        adapter=adapter, kind="scale", parents=[source],
        files={f.name: f for f in sorted(out.iterdir()) if f.is_file()},
        metrics={"factor": p["factor"]},
        message=f"Update scaled by {p['factor']:g}",
        done_message=f"Scaled the update by {p['factor']:g}.",
    )


@app.task(name="ops.scale", bind=True)
def scale_task(self, job_id: str) -> str:
    return runner.run(job_id, scale, task=self)
