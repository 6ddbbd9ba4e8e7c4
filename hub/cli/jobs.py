"""`hubctl` job commands: submit any declared op (`hubctl <op>`), `transfer`
(one adapter, or every one on a base in one request), `jobs` (list, show,
watch, cancel), and following a job to its end with its verdict."""

from __future__ import annotations

import json

from hub.cli import ops, progress, verdicts
from hub.cli.client import (
    API,
    Client,
    UserError,
    adapter_path,
    repo_id,
    slug,
)
from hub.cli.output import (
    dump_json,
    fmt_metric,
    last_line,
    listing,
    note,
    out,
    short_time,
)


def job_path(job_id: str) -> str:
    return f"{API}/jobs/{job_id}/"


def finish(job: dict, require_pass: bool = False) -> int:
    """Report a finished job: 0 when it succeeded (and, with require_pass, its verdict passed)."""
    status = job.get("status")
    if status == "succeeded":
        res = job.get("result")
        where = f": {res['adapter']}@{res['sha'][:12]} ({res['kind']})" if res else ""
        out(f"Job {job['id']} ({job.get('op')}) succeeded{where}.")
        if res:
            out(verdicts.line(res.get("verdict")))
        if require_pass:
            verdicts.require_pass(job)
        return 0
    if status == "cancelled":
        raise UserError(f"Job {job['id']} ({job.get('op')}) was cancelled.")
    error = last_line(job.get("error") or job.get("message")) or "no error text"
    raise UserError(f"Job {job['id']} ({job.get('op')}) failed: {error}")


def watch(c: Client, job: dict, require_pass: bool = False) -> int:
    final = progress.watch_job(lambda: c.get(job_path(job["id"])), first=job)
    return finish(final, require_pass)


def cmd_jobs(args) -> int:
    words = args.args
    with Client() as c:
        if words and words[0] == "cancel":
            if len(words) != 2:
                raise UserError("Usage: hubctl jobs cancel ID")
            job = c.post(f"{API}/jobs/{words[1]}/cancel")
            status = (job or {}).get("status", "cancel requested")
            out(f"Job {words[1]}: {status}.")
            return 0
        if len(words) > 1:
            raise UserError("Usage: hubctl jobs [ID] [--watch] | hubctl jobs cancel ID")
        if words:
            job = c.get(job_path(words[0]))
            if args.watch:
                return watch(c, job)
            if args.json:
                dump_json(job)
                return 0
            for key in ("id", "op", "status", "progress", "message", "attempts", "adapter", "owner", "created_at",
                        "started_at", "finished_at", "error"):
                if job.get(key) not in (None, ""):
                    out(f"{key + ':':12} {job[key]}")
            out(f"{'params:':12} {json.dumps(job.get('params') or {})}")
            if job.get("result"):
                r = job["result"]
                out(f"{'result:':12} {r['adapter']}@{r['sha']} ({r['kind']})")
                out(f"{'verdict:':12} {verdicts.line(r.get('verdict')).removeprefix('Verdict: ')}")
            return 0
        if args.watch:
            raise UserError("--watch needs a job id: hubctl jobs ID --watch")
        jobs = list(c.paginate(f"{API}/jobs/", status=args.status, op=args.op))
    return listing(jobs, args.json, "No jobs.", ["id", "op", "status", "progress", "adapter", "message", "created"],
                   lambda j: [j["id"], j.get("op"), j.get("status"), f"{100 * float(j.get('progress') or 0):.0f}%",
                              j.get("adapter") or "", last_line(j.get("error") or j.get("message")),
                              short_time(j.get("created_at"))])


def submit(op: str, params: dict, wait: bool, require_pass: bool = False) -> int:
    params = {k: v for k, v in params.items() if v is not None}
    if require_pass and not wait:
        raise UserError("--require-pass goes with --wait (it checks the finished job's verdict).")
    with Client() as c:
        job = c.post(f"{API}/jobs/", {"op": op, "params": params})
        if wait:
            return watch(c, job, require_pass)
    out(job["id"])
    note(f"Submitted {op} job {job['id']}. Follow it with: hubctl jobs {job['id']} --watch")
    return 0


def cmd_op(args) -> int:
    """Any op declared by the hub (hub/cli/ops.py built its flags): submit its params as a job."""
    try:
        params = ops.params_of(args, args.op)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    named = params.get(ops.subject(args.op))
    for repo in named if isinstance(named, list) else [named] if named else []:
        repo_id(repo)
    return submit(args.op["name"], params, args.wait, args.require_pass)


def split_metrics(metrics: dict | None) -> tuple[str, str]:
    """(before, after) from a transfer revision's metrics.

    The transfer op's own names first (adapters_ops.transfer's verification:
    source_with_adapter, target_base, target_with_transferred, recovered, maybe
    nested under "metrics"), then any key that says before/source or after/target."""
    flat = dict(metrics or {})
    if isinstance(flat.get("metrics"), dict):
        flat = {**flat.pop("metrics"), **flat}
    if "source_with_adapter" in flat or "target_with_transferred" in flat:
        before = fmt_metric(flat.get("source_with_adapter", ""))
        after = fmt_metric(flat.get("target_with_transferred", ""))
        if "target_base" in flat:
            after += f" (bare {fmt_metric(flat['target_base'])})"
        if isinstance(flat.get("recovered"), (int, float)):
            after += f", recovered {fmt_metric(flat['recovered'])}"
        return before, after
    before, after, rest = [], [], []
    for k, v in flat.items():
        lk = k.lower()
        if isinstance(v, (dict, list)):
            continue
        if "before" in lk or "source" in lk or "baseline" in lk:
            before.append(f"{k}={fmt_metric(v)}")
        elif "after" in lk or "target" in lk:
            after.append(f"{k}={fmt_metric(v)}")
        else:
            rest.append(f"{k}={fmt_metric(v)}")
    if not after:
        after = rest[:2]
    return ", ".join(before), ", ".join(after)


def cmd_transfer(args) -> int:
    source, target = slug(args.source), slug(args.target)
    common = {"target": target, "method": args.method, "finetune_steps": args.finetune_steps}
    if args.adapter:
        repo_id(args.adapter)
        return submit("transfer", {"adapter": args.adapter, **common, "name": args.name}, args.wait,
                      args.require_pass)
    if args.name:
        raise UserError("--name names one new adapter: use it with --adapter.")
    with Client() as c:
        # One request: the hub makes a job for every adapter on `source` you may write.
        shared = {k: v for k, v in common.items() if v is not None and k != "target"}
        answer = c.post(f"{API}/base-models/{source}/transfer", {"target": target, "params": shared})
        rows = [{"adapter": j["adapter"], "job": j} for j in answer["jobs"]]
        rows += [{"adapter": r["adapter"], "job": None, "refused": r["detail"]} for r in answer["refused"]]
        if not rows:
            raise UserError(f"No adapter on {source} that you may write.")
        if all(r["job"] is None for r in rows):
            raise UserError(f"The hub refused every transfer: {rows[0]['refused']}")
        note(f"Submitted {sum(1 for r in rows if r['job'])} transfer jobs from {source} to {target}.")

        revisions: dict[str, dict] = {}

        def refresh(row):
            row["job"] = c.get(job_path(row["job"]["id"]))
            res = row["job"].get("result")
            if res and res["sha"] not in revisions:
                for r in c.paginate(adapter_path(res["adapter"]) + "/revisions/"):
                    revisions[r["sha"]] = r

        def render(row):
            job = row["job"]
            if job is None:
                return [row["adapter"], "", "refused", "", "", row["refused"]]
            res = job.get("result") or {}
            before, after = split_metrics((revisions.get(res.get("sha")) or {}).get("metrics"))
            method = (job.get("params") or {}).get("method") or args.method or "auto"
            status = job.get("status", "")
            if status == "failed":
                after = last_line(job.get("error"))
            if res.get("verdict"):
                after = f"{after} · verdict {verdicts.short(res['verdict'])}".lstrip(" ·")
            return [row["adapter"], method, status, f"{100 * float(job.get('progress') or 0):.0f}%", before, after]

        for row in rows:
            if row["job"] is not None:
                refresh(row)
        progress.watch_jobs_table(rows, refresh, render, ["adapter", "method", "status", "progress", "before", "after"],
                                  title=f"transfer {source} -> {target}")
    failed = [r for r in rows if r["job"] is None or r["job"].get("status") != "succeeded"]
    if args.require_pass:  # a result that did not pass its verdict counts as not done
        failed += [r for r in rows if r not in failed
                   and ((r["job"].get("result") or {}).get("verdict") or {}).get("status") != "passed"]
    if failed:
        raise UserError(f"{len(failed)} of {len(rows)} transfers did not succeed"
                        + (" or pass their verdict" if args.require_pass else "") + ": "
                        + ", ".join(r["adapter"] for r in failed))
    out(f"All {len(rows)} transfers from {source} to {target} succeeded.")
    return 0
