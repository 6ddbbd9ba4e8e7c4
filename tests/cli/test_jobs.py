"""The job commands (compress, merge, transfer, quantize, jobs) against a fake
hub speaking the jobs contract (httpx.MockTransport): exact request bodies,
watching until a job finishes, failures and refusals mapped to exit codes.
The real jobs API and workers are exercised by the integration tests."""

from __future__ import annotations

import json
import re
import uuid

import httpx
import pytest

SHA = "ab" * 20


class FakeHub:
    """Jobs advance one step per GET: queued -> running 50% -> finished.
    A job whose adapter contains "bad" fails; "transfer" results carry metrics."""

    def __init__(self):
        self.posts: list[dict] = []
        self.jobs: dict[str, dict] = {}
        self.gets: dict[str, int] = {}
        self.cancelled: list[str] = []
        self.fanouts: list[dict] = []
        self.adapters = [
            {"id": "alice/a", "owner": "alice"}, {"id": "alice/bad", "owner": "alice"},
            {"id": "acme/c", "owner": "acme"}, {"id": "bob/d", "owner": "bob"},
        ]

    def reply(self, status, body):
        return httpx.Response(status, json=body)

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path, method = request.url.path, request.method
        if request.headers.get("authorization") != "Bearer hub_ok":
            return self.reply(401, {"error": "authentication_failed", "detail": "Invalid or revoked token."})
        if path == "/api/v1/me":
            return self.reply(200, {"username": "alice", "orgs": ["acme"], "is_staff": False})
        if path == "/api/v1/adapters/" and method == "GET":
            assert request.url.params["base_model"] == "llama3.0"
            return self.reply(200, {"count": 4, "next": None, "previous": None, "results": self.adapters})
        if m := re.fullmatch(r"/api/v1/adapters/([^/]+)/([^/]+)/revisions/", path):
            return self.reply(200, {"count": 1, "next": None, "results": [
                {"sha": SHA, "kind": "transfer", "metrics": {"score_before": 0.41, "score_after": 0.87}}]})
        if path == "/api/v1/base-models/llama3.0/transfer" and method == "POST":
            # the hub's fan-out: one job per adapter on the base that alice (and acme) may write
            body = json.loads(request.content)
            self.fanouts.append(body)
            jobs = []
            for a in self.adapters:
                if a["owner"] in ("alice", "acme"):
                    job = self.new_job("transfer", {"adapter": a["id"], "target": body["target"], **body["params"]})
                    jobs.append({**job, "adapter": a["id"]})
            return self.reply(201, {"jobs": jobs, "refused": []})
        if path == "/api/v1/jobs/" and method == "POST":
            body = json.loads(request.content)
            self.posts.append(body)
            if body["op"] == "bogus":
                return self.reply(400, {"error": "unknown_op", "detail": "Unknown op 'bogus'; known ops: compress."})
            if body["op"] == "explode":
                return self.reply(500, {"error": "server_error", "detail": "A server error occurred."})
            return self.reply(201, self.new_job(body["op"], body["params"]))
        if path == "/api/v1/jobs/" and method == "GET":
            return self.reply(200, {"count": len(self.jobs), "next": None, "results": list(self.jobs.values())})
        if m := re.fullmatch(r"/api/v1/jobs/([^/]+)/cancel", path):
            self.cancelled.append(m[1])
            return self.reply(200, {**self.jobs[m[1]], "status": "cancelled"})
        if m := re.fullmatch(r"/api/v1/jobs/([^/]+)/", path):
            job = self.jobs.get(m[1])
            if job is None:
                return self.reply(404, {"error": "not_found", "detail": "No such job."})
            self.step(job)
            return self.reply(200, job)
        return self.reply(404, {"error": "not_found", "detail": f"No route {method} {path}."})

    def new_job(self, op, params):
        job = {"id": str(uuid.uuid4()), "op": op, "params": params, "status": "queued",
               "progress": 0.0, "message": "", "error": "", "result": None, "attempts": 0}
        self.jobs[job["id"]] = job
        return job

    def step(self, job):
        n = self.gets[job["id"]] = self.gets.get(job["id"], 0) + 1
        if n == 1:
            job.update(status="running", progress=0.5, message="working")
        elif n >= 2 and job["status"] == "running":
            adapter = job["params"].get("adapter") or job["params"].get("name") or ""
            if "bad" in adapter:
                job.update(status="failed", error="Traceback (most recent call last):\n...\n"
                           "IncompatibleAdapters: q_proj shapes differ (64 vs 128)")
            else:
                kind = {"compress": "compeft", "quantize": "qalora"}.get(job["op"], job["op"])
                job.update(status="succeeded", progress=1.0, message="done",
                           result={"adapter": job["params"].get("name") or adapter, "sha": SHA, "kind": kind})


@pytest.fixture
def fake(monkeypatch, cli_env):
    hub = FakeHub()
    real = httpx.Client

    def client(*args, **kwargs):
        return real(*args, transport=httpx.MockTransport(hub), **kwargs)

    monkeypatch.setattr("hub.cli.client.httpx.Client", client)
    cli_env.setenv("HUB_URL", "http://hub.test")
    return hub


def ok(hubctl, *argv):
    r = hubctl(*argv, token="hub_ok")
    assert r.code == 0, (r.out, r.err)
    return r


def test_submit_prints_only_the_job_id(fake, hubctl):
    r = ok(hubctl, "compress", "alice/a")
    (job_id,) = fake.jobs
    assert r.out == job_id + "\n"
    assert f"hubctl jobs {job_id} --watch" in r.err
    assert fake.posts == [{"op": "compress", "params": {"adapter": "alice/a"}}]  # unset options stay server defaults


@pytest.mark.parametrize("argv, body", [
    (["compress", "alice/a", "--density", "0.2", "--scope", "tensor", "--revision", "main"],
     {"op": "compress", "params": {"adapter": "alice/a", "revision": "main", "density": 0.2, "scope": "tensor"}}),
    (["compress", "alice/a", "--magnitude-bits", "2", "--factorization", "balanced"],
     {"op": "compress", "params": {"adapter": "alice/a", "magnitude_bits": 2, "factorization": "balanced"}}),
    (["merge", "alice/a", "acme/c", "alice/x", "--method", "ties", "--weights", "0.5,0.3,0.2", "--density", "0.5",
      "--rank", "8", "--seed", "3", "--name", "alice/merged"],
     {"op": "merge", "params": {"adapters": ["alice/a", "acme/c", "alice/x"], "weights": [0.5, 0.3, 0.2],
                                "method": "ties", "density": 0.5, "rank": 8, "seed": 3, "name": "alice/merged"}}),
    (["merge", "alice/a", "acme/c", "--method", "linear", "--name", "alice/m2"],
     {"op": "merge", "params": {"adapters": ["alice/a", "acme/c"], "method": "linear", "name": "alice/m2"}}),
    (["transfer", "--from", "llama3.0", "--to", "llama3.1", "--adapter", "alice/a", "--method", "translora",
      "--finetune-steps", "20", "--name", "alice/a-31"],
     {"op": "transfer", "params": {"adapter": "alice/a", "target": "llama3.1", "method": "translora",
                                   "finetune_steps": 20, "name": "alice/a-31"}}),
    (["quantize", "alice/a", "--bits", "4", "--group-size", "32", "--qalora-finetune-steps", "10"],
     {"op": "quantize", "params": {"adapter": "alice/a", "bits": 4, "group_size": 32, "qalora_finetune_steps": 10}}),
    (["quantize", "alice/a"], {"op": "quantize", "params": {"adapter": "alice/a"}}),  # the hub fills the defaults
])
def test_request_bodies(fake, hubctl, argv, body):
    ok(hubctl, *argv)
    assert fake.posts == [body]


@pytest.mark.parametrize("argv, result", [
    (["compress", "alice/a", "--wait"], f"succeeded: alice/a@{SHA[:12]} (compeft)"),
    (["merge", "alice/a", "acme/c", "--method", "ties", "--name", "alice/m", "--watch"],
     f"succeeded: alice/m@{SHA[:12]} (merge)"),
    (["quantize", "alice/a", "--wait"], f"succeeded: alice/a@{SHA[:12]} (qalora)"),
])
def test_wait_follows_the_job_to_its_result(fake, hubctl, argv, result):
    r = ok(hubctl, *argv)
    assert result in r.out
    (job_id,) = fake.jobs
    assert fake.gets[job_id] == 2
    assert "running 50% working" in r.err  # without a terminal, each change is one line


def test_failed_job_exits_1_with_its_error(fake, hubctl):
    r = hubctl("compress", "alice/bad", "--wait", token="hub_ok")
    assert r.code == 1
    assert r.err.strip().endswith("failed: IncompatibleAdapters: q_proj shapes differ (64 vs 128)")
    assert "Traceback" not in r.err.splitlines()[-1]


def test_refusals_and_server_errors(fake, hubctl, monkeypatch):
    from hub.cli import main as cli

    r = hubctl("merge", "alice/a", "acme/c", "--method", "ties", "--weights", "a,b", "--name", "alice/m", token="hub_ok")
    assert r.code == 1 and "comma-separated numbers" in r.err
    assert hubctl("compress", "alice/a", token="hub_nope").code == 1

    # A 400 prints the server's detail (exit 1); a 500 is a server error (exit 2).
    monkeypatch.setattr(cli.jobs, "cmd_op", lambda args: cli.jobs.submit("bogus", {"adapter": args.adapter}, False))
    r = hubctl("compress", "alice/a", token="hub_ok")
    assert (r.code, r.err.strip()) == (1, "hubctl: error: Unknown op 'bogus'; known ops: compress.")
    monkeypatch.setattr(cli.jobs, "cmd_op", lambda args: cli.jobs.submit("explode", {"adapter": args.adapter}, False))
    r = hubctl("compress", "alice/a", token="hub_ok")
    assert (r.code, r.err.strip()) == (2, "hubctl: error: The hub failed (500): A server error occurred.")


def test_jobs_list_show_watch_cancel(fake, hubctl):
    job_id = ok(hubctl, "compress", "alice/a").out.strip()
    r = ok(hubctl, "jobs")
    assert job_id in r.out and "compress" in r.out and "queued" in r.out
    r = ok(hubctl, "jobs", job_id)
    assert f"id:          {job_id}" in r.out and "status:      running" in r.out
    r = ok(hubctl, "jobs", job_id, "--watch")
    assert f"alice/a@{SHA[:12]} (compeft)" in r.out
    r = ok(hubctl, "jobs", "cancel", job_id)
    assert fake.cancelled == [job_id] and "cancelled" in r.out
    r = hubctl("jobs", "0000", token="hub_ok")
    assert (r.code, r.err.strip()) == (1, "hubctl: error: No such job.")
    assert hubctl("jobs", "cancel", token="hub_ok").code == 1


def test_transfer_every_writable_adapter_with_a_table(fake, hubctl):
    r = hubctl("transfer", "--from", "llama3.0", "--to", "llama3.1", "--method", "diff", token="hub_ok")
    # one request: the hub made the jobs (bob/d is not alice's to write: three, one of which fails)
    assert fake.fanouts == [{"target": "llama3.1", "params": {"method": "diff"}}] and fake.posts == []
    assert [j["params"]["adapter"] for j in fake.jobs.values()] == ["alice/a", "alice/bad", "acme/c"]
    assert r.code == 1 and "1 of 3 transfers did not succeed: alice/bad" in r.err
    cells = [[c.strip() for c in line.split("│")[1:-1]] for line in r.out.splitlines() if line.startswith("│")]
    assert cells == [
        ["alice/a", "diff", "succeeded", "100%", "score_before=0.41", "score_after=0.87"],
        ["alice/bad", "diff", "failed", "50%", "", "IncompatibleAdapters: q_proj shapes differ (64 vs 128)"],
        ["acme/c", "diff", "succeeded", "100%", "score_before=0.41", "score_after=0.87"],
    ]


def test_transfer_needs_an_adapter_for_name(fake, hubctl):
    r = hubctl("transfer", "--from", "llama3.0", "--to", "llama3.1", "--name", "alice/x", token="hub_ok")
    assert r.code == 1 and "--name names one new adapter" in r.err and fake.posts == []


@pytest.mark.parametrize("metrics, before, after", [
    ({"source_with_adapter": 0.9, "target_base": 0.1, "target_with_transferred": 0.8, "recovered": 0.875},
     "0.9", "0.8 (bare 0.1), recovered 0.875"),
    ({"metrics": {"source_with_adapter": 0.5, "target_with_transferred": 0.25}, "verified": True}, "0.5", "0.25"),
    ({"score_before": 0.41, "score_after": 0.87, "curve": [1, 2]}, "score_before=0.41", "score_after=0.87"),
    ({"loss": 1.5, "steps": 20, "eval": {"a": 1}}, "", "loss=1.5, steps=20"),
    ({}, "", ""),
    (None, "", ""),
])
def test_transfer_metrics_before_after(metrics, before, after):
    from hub.cli.jobs import split_metrics

    assert split_metrics(metrics) == (before, after)
