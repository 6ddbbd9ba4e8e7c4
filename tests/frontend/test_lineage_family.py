"""selectors.lineage shows an adapter's own family: its revisions, their
ancestors, their descendants and the other inputs of those (a merge's other
parent), not that parent's children, which have nothing to do with it (the page's graph, GET .../lineage and `hubctl lineage`
share it)."""

from __future__ import annotations

from tests.frontend.conftest import add_revision, make_adapter, make_base


def names(graph) -> set[str]:
    return {f"{n['adapter']}:{n['kind']}" for n in graph["nodes"]}


def test_lineage_is_the_adapters_family(db, user):
    from hub.registry.selectors import lineage

    base = make_base("b")
    a, a1 = make_adapter("alice", "a", base)
    b, b1 = make_adapter("alice", "b", base)
    add_revision(b, kind="compeft", parents=[b1])  # b's own business
    make_adapter("alice", "b-moved", base, kind="transfer", parents=[b1])  # b's child, a stranger to a
    m, m1 = make_adapter("alice", "m", base, kind="merge", parents=[a1, b1])
    make_adapter("alice", "d", base, kind="compeft", parents=[m1])

    # the merge's other input is shown (what a was merged with), not b's other children
    assert names(lineage(user, a)) == {"alice/a:upload", "alice/m:merge", "alice/d:compeft", "alice/b:upload"}
    assert names(lineage(user, m)) == {"alice/a:upload", "alice/b:upload", "alice/m:merge", "alice/d:compeft"}
    assert names(lineage(user, b)) == {"alice/b:upload", "alice/b:compeft", "alice/b-moved:transfer",
                                       "alice/m:merge", "alice/d:compeft", "alice/a:upload"}
    stranger, _ = make_adapter("alice", "a-only", base, kind="compeft", parents=[a1])
    assert "alice/a-only:compeft" not in names(lineage(user, b))  # a's other child: not b's family
    graph = lineage(user, m)
    shas = {n["id"]: f"{n['adapter']}:{n['kind']}" for n in graph["nodes"]}
    assert sorted((shas[e["parent"]], shas[e["child"]]) for e in graph["edges"]) == [
        ("alice/a:upload", "alice/m:merge"), ("alice/b:upload", "alice/m:merge"), ("alice/m:merge", "alice/d:compeft")]


def test_a_node_above_one_revision_and_below_another_keeps_its_children(db, user):
    from hub.registry.selectors import lineage

    base = make_base("b")
    a, a1 = make_adapter("alice", "a", base)
    x, x1 = make_adapter("alice", "x", base, kind="transfer", parents=[a1])  # below a1 ...
    add_revision(a, kind="merge", parents=[a1, x1])  # ... and above a's merge
    make_adapter("alice", "y", base, kind="compeft", parents=[x1])  # a descendant of a1 through x
    assert "alice/y:compeft" in names(lineage(user, a))
