"""How `hubctl` shows a derived revision's quality verdict (docs/jobs.md), and
`--require-pass`: a finished job whose result did not pass is a user error (exit 1).

The verdict is the `verdict` of a job's `result` (REST): status passed |
degraded | failed | unverified, seed accuracy before (the source) and after
(the result), their ratio, and which examples were scored."""

from __future__ import annotations

from hub.cli.client import UserError

EXAMPLES = {"held_out_seeds": "held-out seeds", "all_seeds": "seeds", "none": "no examples",
            "synthetic_labelled_by_source": "synthetic inputs labelled by the source, from seeds"}


def _num(value) -> str:
    return f"{float(value):.2f}" if isinstance(value, (int, float)) and not isinstance(value, bool) else "-"


def short(verdict: dict | None) -> str:
    """A table cell: `failed 0%`, `passed 100%`, `unverified`."""
    if not verdict:
        return "-"
    status = str(verdict.get("status", "unverified"))
    ratio = verdict.get("ratio")
    return f"{status} {float(ratio):.0%}" if isinstance(ratio, (int, float)) else status


def line(verdict: dict | None) -> str:
    """`Verdict: FAILED: seed accuracy 1.00 -> 0.00 (0%) on 8 held-out seeds of 16; keeps 0% ...`."""
    if not verdict:
        return "Verdict: none (this revision was not judged)."
    status = str(verdict.get("status", "unverified"))
    text = f"Verdict: {status.upper()}"
    if verdict.get("ratio") is not None:
        ex = verdict.get("examples") or {}
        where = ""
        if ex.get("n"):
            where = f" on {ex['n']} {EXAMPLES.get(ex.get('source'), 'examples')}"
            where += f" of {ex['of']}" if ex.get("of") else ""
        text += (f": seed accuracy {_num(verdict.get('before'))} -> {_num(verdict.get('after'))} "
                 f"({float(verdict['ratio']):.0%}){where}")
        if verdict.get("base") is not None:
            text += f", bare base {_num(verdict['base'])}"
    if verdict.get("reason"):
        text += f"; {verdict['reason']}"
    text += "" if text.endswith(".") else "."
    for name, part in (verdict.get("skills") or {}).items():
        text += f"\n  {name}: {short(part)}"
    return text


def require_pass(job: dict) -> None:
    """With --require-pass: a result that did not pass (or has no verdict) is a user error."""
    verdict = (job.get("result") or {}).get("verdict")
    status = (verdict or {}).get("status", "none")
    if status != "passed":
        raise UserError(f"Job {job['id']} ({job.get('op')}) succeeded but its verdict is {status}, "
                        "not passed (--require-pass).")
