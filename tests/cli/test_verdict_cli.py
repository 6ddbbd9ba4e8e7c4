"""`hubctl ... --wait` prints the result's quality verdict, and `--require-pass`
exits 1 unless it passed (hub/cli/verdicts.py), against the fake jobs hub."""

from __future__ import annotations

import pytest

from tests.cli.test_jobs import SHA, fake, ok  # noqa: F401  (fixture)

FAILED = {"status": "failed", "before": 1.0, "after": 0.0, "ratio": 0.0, "base": 0.0,
          "reason": "keeps 0% of the source's accuracy (below 50%)",
          "examples": {"source": "held_out_seeds", "n": 8, "of": 16, "indices": [0, 2]}}
PASSED = {"status": "passed", "before": 1.0, "after": 1.0, "ratio": 1.0,
          "examples": {"source": "all_seeds", "n": 16, "of": 16}}


@pytest.fixture
def with_verdict(fake, monkeypatch):  # noqa: F811
    """The fake hub's results carry `verdict` (the job's params name which)."""
    step = fake.step

    def stepped(job):
        step(job)
        if job.get("result"):
            job["result"]["verdict"] = {"fail": FAILED, "pass": PASSED}.get(job["params"]["adapter"].split("/")[1])

    monkeypatch.setattr(fake, "step", stepped)
    return fake


def test_wait_prints_the_verdict_and_require_pass_fails_on_it(with_verdict, hubctl):
    r = ok(hubctl, "compress", "alice/fail", "--wait")
    assert f"succeeded: alice/fail@{SHA[:12]} (compeft)" in r.out
    assert ("Verdict: FAILED: seed accuracy 1.00 -> 0.00 (0%) on 8 held-out seeds of 16, bare base 0.00; "
            "keeps 0% of the source's accuracy (below 50%).") in r.out
    r = hubctl("compress", "alice/fail", "--wait", "--require-pass", token="hub_ok")
    assert r.code == 1 and "verdict is failed, not passed (--require-pass)" in r.err


def test_require_pass_accepts_a_passed_verdict_and_refuses_a_missing_one(with_verdict, hubctl):
    r = ok(hubctl, "quantize", "alice/pass", "--wait", "--require-pass")
    assert "Verdict: PASSED: seed accuracy 1.00 -> 1.00 (100%) on 16 seeds of 16." in r.out
    r = hubctl("compress", "alice/a", "--wait", "--require-pass", token="hub_ok")  # no verdict at all
    assert r.code == 1 and "verdict is none" in r.err
    assert "Verdict: none" in r.out


def test_require_pass_needs_wait(with_verdict, hubctl):
    r = hubctl("compress", "alice/pass", "--require-pass", token="hub_ok")
    assert r.code == 1 and "--require-pass goes with --wait" in r.err and with_verdict.posts == []


def test_verdict_lines():
    from hub.cli import verdicts

    assert verdicts.short(FAILED) == "failed 0%" and verdicts.short(None) == "-"
    assert verdicts.short({"status": "unverified", "ratio": None}) == "unverified"
    merged = {"status": "degraded", "before": 1.0, "after": 0.75, "ratio": 0.75,
              "skills": {"a/x": PASSED, "a/y": {"status": "degraded", "ratio": 0.5}}}
    assert verdicts.line(merged).splitlines() == ["Verdict: DEGRADED: seed accuracy 1.00 -> 0.75 (75%).",
                                                   "  a/x: passed 100%", "  a/y: degraded 50%"]


def test_bulk_transfer_shows_verdicts_and_require_pass_counts_a_failed_one(with_verdict, hubctl):
    with_verdict.adapters = [{"id": "alice/pass", "owner": "alice"}, {"id": "alice/fail", "owner": "alice"}]
    r = hubctl("transfer", "--from", "llama3.0", "--to", "llama3.1", token="hub_ok")
    assert r.code == 0 and "All 2 transfers from llama3.0 to llama3.1 succeeded." in r.out
    cells = [[c.strip() for c in line.split("│")[1:-1]] for line in r.out.splitlines() if line.startswith("│")]
    assert [row[-1] for row in cells] == ["score_after=0.87 · verdict passed 100%", "score_after=0.87 · verdict failed 0%"]
    r = hubctl("transfer", "--from", "llama3.0", "--to", "llama3.1", "--require-pass", token="hub_ok")
    assert r.code == 1 and "1 of 2 transfers did not succeed or pass their verdict: alice/fail" in r.err
