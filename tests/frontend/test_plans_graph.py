"""The retransfer plan (hub/registry/plans.py) and the lineage layout (frontend/graph.py)."""

from __future__ import annotations

import pytest

from tests.frontend.conftest import SHAPES, add_revision, make_adapter, make_base


def manifest(**changes):
    m = {k: {"shape": list(v), "dtype": "F32"} for k, v in SHAPES.items()}
    for key, shape in changes.items():
        name = next(k for k in m if k.endswith(f".{key}.weight"))
        if shape is None:
            del m[name]
        else:
            m[name]["shape"] = shape
    return m


@pytest.mark.parametrize("targets, successor, method, why", [
    (["q_proj", "v_proj"], manifest(), "diff", "same shapes for q_proj, v_proj (2 weights)"),
    (["q_proj"], manifest(v_proj=[48, 96]), "diff", "same shapes for q_proj (1 weight)"),  # v_proj not adapted
    (["q_proj", "v_proj"], manifest(v_proj=[48, 96]), "translora", "changes shape [32, 64] → [48, 96]"),
    (["up_proj"], manifest(up_proj=None), "translora", "is missing from succ"),
    (["lm_head"], manifest(), "translora", "not found in the base's manifest"),
    ([], manifest(), "translora", "not found"),
])
def test_planned_method(db, targets, successor, method, why):
    from hub.registry.plans import planned_method

    base = make_base("base")
    succ = make_base("succ", manifest=successor)
    adapter, _ = make_adapter("alice", "a", base, targets=targets)
    got, reason = planned_method(adapter, base, succ)
    assert got == method and why in reason


def test_plan_rows_states_and_visibility(db, user, other_user):
    from hub.registry.models import Job
    from hub.registry.plans import retransfer_plan

    succ = make_base("succ", manifest=manifest(v_proj=[48, 96]))
    base = make_base("base", status="deprecated", successor=succ)
    planned, _ = make_adapter("alice", "planned", base, targets=["q_proj"])
    moving, _ = make_adapter("alice", "moving", base)
    moved, moved_rev = make_adapter("alice", "moved", base)
    hidden, _ = make_adapter("mallory", "hidden", base, visibility="private")
    Job.objects.create(op="transfer", owner=user, adapter=moving, status="running", progress=0.5,
                       params={"adapter": "alice/moving", "target": "succ", "method": "translora"})
    Job.objects.create(op="transfer", owner=user, adapter=planned, status="running",
                       params={"adapter": "alice/planned", "target": "elsewhere"})  # another target: ignored
    out, _ = make_adapter("alice", "moved-on-succ", succ)
    add_revision(out, kind="translora", parents=[moved_rev], base=succ)

    rows = {r.adapter.name: r for r in retransfer_plan(user, base)}
    assert set(rows) == {"planned", "moving", "moved"}  # mallory's private one is not listed
    assert (rows["planned"].method, rows["planned"].state) == ("diff", "planned")
    assert (rows["moving"].method, rows["moving"].state) == ("translora", "in progress")
    assert rows["moving"].active_job.progress == 0.5
    assert rows["moved"].state == "transferred" and rows["moved"].done.adapter == out
    assert {r.adapter.name for r in retransfer_plan(other_user, base)} == {"planned", "moving", "moved", "hidden"}
    assert retransfer_plan(user, succ) == []  # no successor, no plan


def test_plan_is_shown_and_refreshes_while_jobs_run(db, web, user):
    from hub.registry.models import Job

    succ = make_base("succ")
    base = make_base("base", status="deprecated", successor=succ)
    a, _ = make_adapter("alice", "moving", base)
    html = web(user).get("/bases/base/").content.decode()
    assert "Retransfer plan to succ" in html and "method-diff" in html and "every 2s" not in html
    Job.objects.create(op="transfer", owner=user, adapter=a, status="running", progress=0.25,
                       params={"adapter": "alice/moving", "target": "succ"})
    part = web(user).get("/bases/base/?part=plan", HTTP_HX_REQUEST="true").content.decode()
    assert part.startswith('<div id="plan"') and 'hx-trigger="every 2s"' in part and 'value="0.25"' in part


def node(nid, adapter="o/a", kind="upload", t=0):
    return {"id": nid * 40 if len(nid) == 1 else nid, "adapter": adapter, "kind": kind, "base_model": "b",
            "created_at": f"2025-01-01T00:00:{t:02d}", "message": "", "metrics": {}, "job": None, "refs": []}


def test_layout_layers_and_edges():
    from frontend import graph

    # a -> b -> d ; c -> d (a merge of b and c), e unrelated child of a
    nodes = [node("a", t=0), node("c", adapter="o/c", t=1), node("b", kind="compeft", t=2),
             node("d", adapter="o/m", kind="merge", t=3), node("e", adapter="o/e", kind="transfer", t=4)]
    edges = [{"parent": "a" * 40, "child": "b" * 40}, {"parent": "b" * 40, "child": "d" * 40},
             {"parent": "c" * 40, "child": "d" * 40}, {"parent": "a" * 40, "child": "e" * 40}]
    lay = graph.layout({"nodes": nodes, "edges": edges}, current="o/a")
    by = {n.id[0]: n for n in lay.nodes}
    assert {k: n.layer for k, n in by.items()} == {"a": 0, "c": 0, "b": 1, "e": 1, "d": 2}
    assert by["a"].current and by["b"].current and not by["d"].current
    assert len(lay.edges) == 4
    for e in lay.edges:  # every edge goes down from the parent's bottom to the child's top
        assert e.child.y > e.parent.y + e.parent.h
        assert e.path.startswith(f"M{e.parent.cx:.1f},{e.parent.y + e.parent.h:.1f} ")
    # no node overlaps another; all fit in the canvas
    boxes = [(n.x, n.y, n.x + n.w, n.y + n.h) for n in lay.nodes]
    for i, p in enumerate(boxes):
        assert 0 <= p[0] and p[2] <= lay.width and 0 <= p[1] and p[3] <= lay.height
        for q in boxes[i + 1:]:
            assert p[2] <= q[0] or q[2] <= p[0] or p[3] <= q[1] or q[3] <= p[1]
    assert lay.width == 2 * graph.PAD + 2 * graph.NODE_W + graph.GAP_X
    assert lay.height == 2 * graph.PAD + 3 * graph.NODE_H + 2 * graph.GAP_Y


def test_layout_of_nothing_and_of_one_node():
    from frontend import graph

    empty = graph.layout({"nodes": [], "edges": []}, current="o/a")
    assert (empty.nodes, empty.width, empty.height) == ([], 2 * graph.PAD, 2 * graph.PAD)
    one = graph.layout({"nodes": [node("a")], "edges": []}, current="o/a")
    assert one.nodes[0].x == graph.PAD and one.width == 2 * graph.PAD + graph.NODE_W


@pytest.mark.parametrize("metrics, acc", [
    ({"accuracy": 0.5}, 0.5), ({"eval_accuracy": 1}, 1), ({"accuracy": True}, None), ({"loss": 0.1}, None),
    (None, None),
])
def test_accuracy_of(metrics, acc):
    from frontend.graph import accuracy_of

    assert accuracy_of(metrics) == acc


def test_start_transfer_from_the_plan(db, web, user):
    from adapters_ops import opspecs
    from hub.registry.models import Job

    succ = make_base("succ")
    base = make_base("base", status="deprecated", successor=succ)
    make_adapter("alice", "moving", base)
    page = web(user).get("/bases/base/").content.decode()
    assert "Start transfer" in page
    adapter_page = web(user).get("/adapters/alice/moving/").content.decode()
    panel = adapter_page.split('id="op-transfer"', 1)[1].split("</details>", 1)[0]
    assert '<option value="succ" selected>' in panel

    r = web(user).post("/adapters/alice/moving/jobs", {
        "op": "transfer", "transfer-target": "succ", "transfer-method": "diff", "transfer-finetune_steps": "0"})
    assert r.status_code == 302
    job = Job.objects.get()
    # the blank fields were left out, so the declaration's defaults apply
    expected = opspecs.OPS["transfer"].clean(
        {"adapter": "alice/moving", "target": "succ", "method": "diff", "finetune_steps": 0})
    assert job.params == expected and job.op == "transfer" and job.params["scale"] == 1.0
    html = web(user).get("/bases/base/?part=plan", HTTP_HX_REQUEST="true").content.decode()
    assert "status-queued" in html and 'hx-trigger="every 2s"' in html
