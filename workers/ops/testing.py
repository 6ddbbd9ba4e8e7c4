"""Test-only ops (registered when HUB_TEST_OPS=1, see adapters_ops/opspecs.py):
they drive the runner through its paths without any tensor work.

- `sleep`: sleeps in `steps`, reporting progress each step; honours cancel.
- `fail`: after `seconds`, raises a user error, a transient fault or a bug.
- `touch`: copies the adapter's main revision into a new `merge` revision
  (plus a file naming the job), after `seconds` of progress steps.
"""

from __future__ import annotations

import time

from django.db import OperationalError

from hub.registry import selectors
from workers import runner
from workers.app import app


def _steps(ctx: runner.JobContext, seconds: float, steps: int, upto: float = 1.0) -> None:
    for i in range(steps):
        time.sleep(seconds / steps)
        ctx.progress(upto * (i + 1) / steps, f"step {i + 1}/{steps}")


def sleep(ctx: runner.JobContext) -> runner.Done:
    seconds, steps = ctx.params["seconds"], ctx.params["steps"]
    _steps(ctx, seconds, steps)
    return runner.Done(f"Slept {seconds:g} s in {steps} steps (attempt {ctx.attempt}).")


def fail(ctx: runner.JobContext):
    _steps(ctx, ctx.params["seconds"], 2, upto=0.5)
    kind = ctx.params["kind"]
    if kind == "user":
        raise runner.OpError("The test op failed on purpose.", "test_failure")
    if kind == "transient":
        raise OperationalError("simulated transient database fault")
    return {}["bug"]  # a KeyError: an op bug


def touch(ctx: runner.JobContext) -> runner.RevisionOutput:
    adapter = ctx.adapter
    main = selectors.revision_resolve(adapter, "main")
    _steps(ctx, ctx.params["seconds"], ctx.params["steps"], upto=0.9)
    files = dict(selectors.revision_files(main))
    files["TOUCHED.txt"] = f"touched by job {ctx.id}\n".encode()
    return runner.RevisionOutput(adapter=adapter, files=files, kind="merge", parents=[main], message="test: touch")


@app.task(name="ops.sleep", bind=True)
def sleep_task(self, job_id: str) -> str:
    return runner.run(job_id, sleep, task=self)


@app.task(name="ops.fail", bind=True)
def fail_task(self, job_id: str) -> str:
    return runner.run(job_id, fail, task=self)


@app.task(name="ops.touch", bind=True)
def touch_task(self, job_id: str) -> str:
    return runner.run(job_id, touch, task=self)
