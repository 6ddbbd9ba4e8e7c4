"""Layered layout of a lineage DAG (selectors.lineage's {nodes, edges}) for an
inline SVG drawn by templates/frontend/_lineage.html.

Layers run top to bottom (a node sits one layer below its deepest parent), so
a long chain grows downwards and stays narrow enough for a phone screen.
Within a layer nodes keep their creation order, with a barycentre pass that
puts children under their parents to cut crossings.
"""

from __future__ import annotations

from dataclasses import dataclass, field

NODE_W, NODE_H = 204, 62  # room for 24 characters at 13 px: the SVG is never scaled down
GAP_X, GAP_Y = 24, 44
PAD = 8


@dataclass
class Node:
    id: str
    adapter: str
    kind: str
    base_model: str
    refs: list[str]
    metrics: dict
    message: str
    current: bool  # a revision of the adapter whose page this is
    verdict: dict | None = None  # the revision's quality verdict (derived revisions)
    layer: int = 0
    x: int = 0
    y: int = 0
    w: int = NODE_W
    h: int = NODE_H

    @property
    def short(self) -> str:
        return self.id[:7]

    @property
    def label(self) -> str:
        refs = f" [{', '.join(self.refs)}]" if self.refs else ""
        verdict = f", verdict {self.verdict['status']}" if self.verdict else ""
        return f"{self.adapter} @ {self.short} ({self.kind}{verdict}){refs}"

    @property
    def accuracy(self):
        return accuracy_of(self.metrics)

    @property
    def owner(self) -> str:
        return self.adapter.split("/", 1)[0]

    @property
    def name(self) -> str:
        return self.adapter.split("/", 1)[1]

    # text baselines inside the node box
    @property
    def tx(self) -> int:
        return self.x + 10

    @property
    def ty1(self) -> int:
        return self.y + 20

    @property
    def ty2(self) -> int:
        return self.y + 39

    @property
    def ty3(self) -> int:
        return self.y + 55

    @property
    def cx(self) -> float:
        return self.x + self.w / 2


@dataclass
class Edge:
    parent: Node
    child: Node

    @property
    def path(self) -> str:
        x1, y1 = self.parent.cx, self.parent.y + self.parent.h
        x2, y2 = self.child.cx, self.child.y
        mid = (y1 + y2) / 2
        return f"M{x1:.1f},{y1:.1f} C{x1:.1f},{mid:.1f} {x2:.1f},{mid:.1f} {x2:.1f},{y2 - 4:.1f}"


@dataclass
class Layout:
    nodes: list[Node] = field(default_factory=list)
    edges: list[Edge] = field(default_factory=list)
    width: int = 0
    height: int = 0


def accuracy_of(metrics: dict | None):
    """The evaluation accuracy a revision records, if any (0..1)."""
    for key in ("accuracy", "eval_accuracy", "exact_match"):
        value = (metrics or {}).get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return value
    return None


def layout(lineage: dict, current: str) -> Layout:
    nodes = {
        n["id"]: Node(
            id=n["id"], adapter=n["adapter"], kind=n["kind"], base_model=n["base_model"], refs=n.get("refs") or [],
            metrics=n.get("metrics") or {}, message=n.get("message") or "", current=n["adapter"] == current,
            verdict=n.get("verdict"),
        )
        for n in lineage.get("nodes", [])
    }
    order = {nid: i for i, nid in enumerate(nodes)}  # lineage() sorts nodes by creation time
    parents: dict[str, list[str]] = {nid: [] for nid in nodes}
    edges = []
    for e in lineage.get("edges", []):
        if e["parent"] in nodes and e["child"] in nodes:
            parents[e["child"]].append(e["parent"])
            edges.append((e["parent"], e["child"]))

    # Longest-path layering in creation order: a parent is always older than its child.
    for nid in sorted(nodes, key=order.get):
        node = nodes[nid]
        node.layer = max((nodes[p].layer + 1 for p in parents[nid]), default=0)
    layers: dict[int, list[Node]] = {}
    for nid in sorted(nodes, key=order.get):
        layers.setdefault(nodes[nid].layer, []).append(nodes[nid])
    pos: dict[str, float] = {}
    for depth in sorted(layers):
        row = layers[depth]
        if depth > 0:
            def centre(n, row=row):
                ps = [pos[p] for p in parents[n.id] if p in pos]
                return sum(ps) / len(ps) if ps else row.index(n)
            row.sort(key=lambda n: (centre(n), order[n.id]))
        for i, n in enumerate(row):
            pos[n.id] = i

    widest = max((len(r) for r in layers.values()), default=0)
    width = PAD * 2 + widest * NODE_W + max(widest - 1, 0) * GAP_X
    for depth, row in layers.items():
        row_w = len(row) * NODE_W + (len(row) - 1) * GAP_X
        x0 = (width - row_w) / 2
        for i, n in enumerate(row):
            n.x = round(x0 + i * (NODE_W + GAP_X))
            n.y = PAD + depth * (NODE_H + GAP_Y)
    height = PAD * 2 + len(layers) * NODE_H + max(len(layers) - 1, 0) * GAP_Y
    ordered = [n for d in sorted(layers) for n in layers[d]]
    return Layout(
        nodes=ordered, edges=[Edge(nodes[p], nodes[c]) for p, c in edges], width=int(width), height=int(height),
    )
