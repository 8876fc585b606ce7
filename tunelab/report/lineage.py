"""The lineage graph: which run came from which model, run, data, merge or prune, as an SVG.

Nodes are the directories that hold a lineage.json (runs, merge outputs, exports), the parents that
have none (a preset, a hub id, a plain model directory), the training data (by content hash) and a
pipeline's eval stages. Edges go from parent to child, labelled with the role the child's
lineage.json gives the parent and the hash it recorded for it. The walk follows parents beyond the
runs in the report (runs.lineage_records), so a continued run shows where it started; those
ancestors are drawn dashed.

Layout: columns by depth (a model one column right of its deepest parent; data one column left of
the runs that train on it, repeated per column), rows ordered by the mean row of their neighbours,
a few sweeps. Small graphs
(a lifecycle has a handful of nodes) read well this way without a layout library.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from html import escape
from pathlib import Path

from tunelab import lineage
from tunelab.runs import lineage_dir, lineage_records

NODE_W, NODE_H = 168, 54
GAP = 124  # between columns: room for two lines of edge label
PITCH = 72  # between rows
PAD = 14
LINE = 13  # edge label line height (11 px text: its glyph box is ~12.8 px tall)


@dataclass
class Node:
    id: str
    label: str
    kind: str  # run | model | preset | hub | dir | data | eval
    lines: list[str] = field(default_factory=list)
    title: str = ""
    entry: object = None  # the report's Entry when the node is one of the report's runs
    col: int = 0
    row: float = 0.0
    x: float = 0.0
    y: float = 0.0


@dataclass
class Edge:
    src: str
    dst: str
    label: list[str]  # one or two lines
    kind: str = "model"  # model | dropped (a merge input left out) | data | eval


def short(value) -> str:
    return str(value)[:8] if value else ""


def _key(path: Path) -> str:
    return str(Path(path).expanduser().resolve())


class Graph:
    def __init__(self):
        self.nodes: dict[str, Node] = {}
        self.edges: list[Edge] = []

    def node(self, node: Node) -> Node:
        return self.nodes.setdefault(node.id, node)

    def edge(self, src: str, dst: str, label: list[str], kind: str = "model") -> None:
        if not any(e.src == src and e.dst == dst and e.label == label for e in self.edges):
            self.edges.append(Edge(src, dst, [part for part in label if part], kind))


def _record_node(where: Path, record: dict, entry=None) -> Node:
    name = where.parent.name if where.name == "final" else where.name
    kind_line = " · ".join(str(p) for p in (record.get("stage"), _method(record)) if p)
    lines = [kind_line] if kind_line else []
    tokenizer = (record.get("tokenizer") or {}).get("fingerprint")
    if tokenizer:
        lines.append(f"tokenizer {short(tokenizer)}")
    return Node(_key(where), entry.label if entry is not None else name, "run" if entry is not None else "model",
                lines, title=str(where), entry=entry)


def _method(record: dict) -> str | None:
    method = record.get("method")
    return method.get("name") if isinstance(method, dict) else method if isinstance(method, str) else None


def _parent_node(parent: dict) -> Node:
    """The node a lineage parent entry points at (created if the walk has not reached it)."""
    where = parent.get("run") or parent.get("path")
    if where:
        found = lineage_dir(where) if Path(where).exists() else None
        if found is not None:
            name = found.parent.name if found.name == "final" else found.name
            return Node(_key(found), name, "model", [], title=str(found))
        digest = parent.get("weights_sha256")
        return Node(f"dir:{where}", Path(where).name or str(where), "dir",
                    ["model directory"] + ([f"weights {short(digest)}"] if digest else []), title=str(where))
    kind = parent.get("kind")
    if kind == "preset":
        overrides = parent.get("overrides") or {}
        suffix = ""
        if overrides:
            suffix = "+" + hashlib.sha256(json.dumps(overrides, sort_keys=True).encode()).hexdigest()[:6]
        return Node(f"preset:{parent.get('preset')}{suffix}", str(parent.get("preset")), "preset",
                    ["preset" + (" (overrides)" if overrides else "")],
                    title=json.dumps(overrides) if overrides else "a fresh model from a preset")
    ident = parent.get("id") or json.dumps(parent, sort_keys=True)[:60]
    return Node(f"{kind}:{ident}", str(ident), "hub", [str(kind or "model")], title=str(ident))


def _edge_label(parent: dict) -> list[str]:
    role = str(parent.get("role") or "parent")
    extras = []
    if parent.get("checkpoint_step") is not None:
        extras.append(f"@step {parent['checkpoint_step']}")
    if parent.get("kept") is False:  # a greedy soup left this input out (weight 0)
        extras.append("dropped")
    elif isinstance(parent.get("weight"), (int, float)):
        extras.append(f"w={parent['weight']:.2g}")
    return [" ".join([role, *extras]), short(lineage.digest(parent))]


def build_graph(entries: list, eval_stages: list = ()) -> Graph:
    """Every report entry, its ancestors, their training data, and the eval stages that scored them."""
    graph = Graph()
    by_key = {_key(e.path): e for e in entries}
    done: set[str] = set()
    for entry in entries:
        if entry.lineage is None:
            graph.node(Node(_key(entry.path), entry.label, "run", ["no lineage.json"], title=str(entry.path),
                            entry=entry))
            continue
        for where, record in lineage_records(entry.path):
            key = _key(where)
            if key in done:
                continue
            done.add(key)
            node = _record_node(where, record, by_key.get(key))
            existing = graph.nodes.get(key)
            if existing is not None and existing.entry is None:  # a placeholder from a child's parent entry
                graph.nodes[key] = node
            else:
                graph.node(node)
            for parent in record["parents"]:
                graph.edge(graph.node(_parent_node(parent)).id, key, _edge_label(parent),
                           kind="dropped" if parent.get("kept") is False else "model")
            for data in record.get("data", []):
                ident = data.get("content_hash") or data.get("source")
                source = str(data.get("source") or "data")
                name = source if source.startswith("builtin:") or len(source) <= 22 else "…" + source[-21:]
                graph.node(Node(f"data:{ident}", name, "data",
                                [f"{data.get('domain', 'data')} · {short(data.get('content_hash'))}"], title=source))
                role = str(data.get("role") or "train")  # the edge's style says "trained on"; other roles are named
                graph.edge(f"data:{ident}", key, [] if role == "train" else [role], kind="data")
    for stage in eval_stages:
        node = graph.node(Node(f"eval:{stage.name}", stage.name, "eval",
                               ["eval · " + ", ".join(list(stage.results)[:3])], title="eval stage"))
        if stage.model:  # the model its eval.json records (or the pipeline passed): drawn even outside the report
            found = lineage_dir(stage.model)
            src = _key(found) if found is not None else None
            if src not in graph.nodes:
                src = graph.node(_parent_node({"path": stage.model, "weights_sha256": stage.model_sha256})).id
            graph.edge(src, node.id, ["scored", short(stage.model_sha256)], kind="eval")
    return graph


# ---------------------------------------------------------------- layout


def _split_data(graph: Graph, layer: dict[str, int]) -> None:
    """A data source used by runs in several columns gets one node beside each (same label and hash): one
    node far to the left would send long edges through the columns between."""
    for key in [k for k, n in graph.nodes.items() if n.kind == "data"]:
        out = [e for e in graph.edges if e.src == key]
        cols = sorted({layer[e.dst] for e in out if e.dst in layer})
        for col in cols[1:]:
            copy = f"{key}#{col}"
            graph.nodes[copy] = Node(copy, graph.nodes[key].label, "data", list(graph.nodes[key].lines),
                                     title=graph.nodes[key].title)
            for e in out:
                if layer.get(e.dst) == col:
                    e.src = copy


def _layout(graph: Graph) -> tuple[float, float]:
    nodes, edges = graph.nodes, graph.edges
    # Columns: models by longest path from a root (data ignored); a cycle cannot occur, but is capped.
    layer = {k: 0 for k in nodes if nodes[k].kind != "data"}
    for _ in range(len(nodes) + 1):
        changed = False
        for e in edges:
            if nodes[e.src].kind != "data" and e.dst in layer and layer[e.dst] < layer[e.src] + 1:
                layer[e.dst] = layer[e.src] + 1
                changed = True
        if not changed:
            break
    _split_data(graph, layer)
    preds: dict[str, list[str]] = {k: [] for k in nodes}
    succs: dict[str, list[str]] = {k: [] for k in nodes}
    for e in edges:
        preds[e.dst].append(e.src)
        succs[e.src].append(e.dst)
    for k, node in nodes.items():
        if node.kind == "data":
            layer[k] = min((layer[s] for s in succs[k] if s in layer), default=1) - 1
    low = min(layer.values(), default=0)
    columns: dict[int, list[str]] = {}
    for k in nodes:  # insertion order: the report's runs first, as given
        nodes[k].col = layer[k] - low
        columns.setdefault(nodes[k].col, []).append(k)
    for col in columns.values():
        for i, k in enumerate(col):
            nodes[k].row = i
    # Rows: each node towards the mean row of its neighbours, sweeping both ways.
    order = sorted(columns)
    for sweep in range(6):
        for c in (order if sweep % 2 == 0 else order[::-1]):
            near = preds if sweep % 2 == 0 else succs

            def centre(k: str) -> float:
                rows = [nodes[n].row for n in near[k]]
                return sum(rows) / len(rows) if rows else nodes[k].row

            columns[c].sort(key=lambda k: (centre(k), nodes[k].row))
            for i, k in enumerate(columns[c]):
                nodes[k].row = i
    tallest = max((len(v) for v in columns.values()), default=1)
    for c, keys in columns.items():
        offset = (tallest - len(keys)) / 2
        for i, k in enumerate(keys):
            nodes[k].x = PAD + c * (NODE_W + GAP)
            nodes[k].y = PAD + 18 + (i + offset) * PITCH
    width = PAD * 2 + (max(columns, default=0) + 1) * (NODE_W + GAP) - GAP
    height = PAD * 2 + 18 + tallest * PITCH - (PITCH - NODE_H)
    return width, height


def _bezier(p0, p1, p2, p3, t):
    u = 1 - t
    return tuple(u ** 3 * a + 3 * u * u * t * b + 3 * u * t * t * c + t ** 3 * d for a, b, c, d in zip(p0, p1, p2, p3))


def _at_x(p0, p1, p2, p3, x: float) -> tuple[float, float]:
    lo, hi = 0.0, 1.0  # x(t) grows with t: the control points are ordered left to right
    for _ in range(40):
        mid = (lo + hi) / 2
        if _bezier(p0, p1, p2, p3, mid)[0] < x:
            lo = mid
        else:
            hi = mid
    return _bezier(p0, p1, p2, p3, lo)


def _label_width(line: str, is_hash: bool) -> float:
    """A generous width of an edge label's line: the role at 11 px sans, the hash at 10.5 px monospace."""
    return len(line) * (6.5 if is_hash else 6.4) + 4


def _wrap(text: str, width: float) -> list[str]:
    """An edge label's role line in lines that fit the gap between columns (a word too long is cut)."""
    lines: list[str] = []
    for word in text.split():
        word = _truncate(word, int((width - 4) / 6.4))
        if lines and _label_width(f"{lines[-1]} {word}", False) <= width:
            lines[-1] += f" {word}"
        else:
            lines.append(word)
    return lines


def _overlaps(a, b) -> bool:
    return min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])


def _truncate(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit - 1] + "…"


def _fitted(text: str, x: float, y: float, cls: str, width: float, char_width: float) -> str:
    """A line of text kept inside `width`: a slightly long one is squeezed by the browser (textLength), a much
    longer one is cut (the node's tooltip has it whole). char_width: a generous average for the font."""
    text = _truncate(text, int(width * 1.3 / char_width))
    fit = f' textLength="{width:.0f}" lengthAdjust="spacingAndGlyphs"' if len(text) * char_width > width else ""
    return f'<text class="{cls}" x="{x:.1f}" y="{y:.1f}"{fit}>{escape(text)}</text>'


def render_svg(graph: Graph) -> str:
    """The graph as an SVG (nodes link to their run's details)."""
    from tunelab.report.svg import style_of

    width, height = _layout(graph)
    nodes = graph.nodes
    out = ['<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="7" markerHeight="7" '
           'orient="auto-start-reverse"><path d="M0,0 L10,5 L0,10 z" fill="#666"/></marker></defs>']
    # Ports: edges leave a node's right side and enter the left side spread out, ordered by the other end.
    outgoing: dict[str, list[Edge]] = {}
    incoming: dict[str, list[Edge]] = {}
    for e in graph.edges:
        outgoing.setdefault(e.src, []).append(e)
        incoming.setdefault(e.dst, []).append(e)

    def port(edge: Edge, side: str) -> float:
        group = outgoing[edge.src] if side == "out" else incoming[edge.dst]
        group = sorted(group, key=lambda e: nodes[e.dst if side == "out" else e.src].y)
        node = nodes[edge.src if side == "out" else edge.dst]
        return node.y + NODE_H * (group.index(edge) + 1) / (len(group) + 1)

    labels = []
    for e in graph.edges:
        s, d = nodes[e.src], nodes[e.dst]
        p0, p3 = (s.x + NODE_W, port(e, "out")), (d.x - 2, port(e, "in"))
        bend = max(40.0, (p3[0] - p0[0]) / 2)
        p1, p2 = (p0[0] + bend, p0[1]), (p3[0] - bend, p3[1])
        cls = f"edge edge-{e.kind}"
        out.append(f'<path class="{cls}" data-src="{escape(e.src)}" data-dst="{escape(e.dst)}" '
                   f'd="M{p0[0]:.1f},{p0[1]:.1f} C{p1[0]:.1f},{p1[1]:.1f} {p2[0]:.1f},{p2[1]:.1f} {p3[0]:.1f},{p3[1]:.1f}" '
                   f'marker-end="url(#arrow)"><title>{escape(s.label)} → {escape(d.label)}: '
                   f'{escape(" ".join(e.label))}</title></path>')
        if e.label:
            labels.append((e, (p0, p1, p2, p3), d.x))
    # Each label goes where it covers no other: the middle of the gap before its child, else nearer one end of
    # the gap (still on its edge), else the middle moved down below the labels in the way.
    placed: list[tuple[float, float, float, float]] = []
    for e, curve, child_x in sorted(labels, key=lambda item: (item[2], _at_x(*item[1], item[2] - GAP / 2)[1])):
        roles = _wrap(e.label[0], GAP - 8)
        lines = roles + [_truncate(line, 18) for line in e.label[1:]]
        w = max(_label_width(line, i >= len(roles)) for i, line in enumerate(lines))
        h = LINE * len(lines) + 2
        left, right = child_x - GAP + 2 + w / 2, child_x - 4 - w / 2
        spots = [child_x - GAP / 2] + ([left, right] if left < right else [])
        boxes = [(lx - w / 2, ly - h / 2, lx + w / 2, ly + h / 2) for lx in spots for ly in [_at_x(*curve, lx)[1]]]
        box = next((b for b in boxes if not any(_overlaps(b, other) for other in placed)), boxes[0])
        while any(_overlaps(box, other) for other in placed):
            top = max(other[3] for other in placed if _overlaps(box, other)) + 1
            box = (box[0], top, box[2], top + h)
        placed.append(box)
        tspans = "".join(f'<tspan x="{(box[0] + box[2]) / 2:.1f}" y="{box[1] + 1 + LINE * i + 9.5:.1f}" '
                         f'class="{"hash" if i >= len(roles) else "role"}">{escape(line)}</tspan>'
                         for i, line in enumerate(lines))
        out.append(f'<text class="edge-label" text-anchor="middle">{tspans}</text>')
    height = max([height] + [box[3] + PAD for box in placed])
    for n in nodes.values():
        cls = f"node node-{n.kind}" + ("" if n.entry is not None or n.kind in ("data", "eval") else " outside")
        rx = 16 if n.kind == "data" else 6
        body = [f'<g class="{cls}" data-id="{escape(n.id)}"><title>{escape(n.title or n.label)}</title>',
                f'<rect x="{n.x:.1f}" y="{n.y:.1f}" width="{NODE_W}" height="{NODE_H}" rx="{rx}"/>']
        if n.entry is not None:
            color, _ = style_of(n.entry.index)
            body.append(f'<rect class="stripe" x="{n.x:.1f}" y="{n.y:.1f}" width="6" height="{NODE_H}" '
                        f'style="fill:{color}"/>')
        text_x = n.x + (14 if n.entry is not None else 10)
        room = n.x + NODE_W - 8 - text_x
        body.append(_fitted(n.label, text_x, n.y + 18, "node-name", room, 7.6))
        for i, line in enumerate(n.lines[:2]):
            body.append(_fitted(line, text_x, n.y + 33 + 13 * i, "node-line", room, 6.3))
        body.append("</g>")
        if n.entry is not None:
            body = [f'<a href="#{n.entry.anchor}">', *body, "</a>"]
        out.extend(body)
    # Shrinks to fit a narrower window down to 70% (text stays readable), then scrolls sideways.
    head = (f'<svg class="lineage" viewBox="0 0 {width:.0f} {height:.0f}" '
            f'style="width:100%;max-width:{width:.0f}px;min-width:{0.7 * width:.0f}px;height:auto" '
            'xmlns="http://www.w3.org/2000/svg" role="img" aria-label="lineage graph">')
    return head + "".join(out) + "</svg>"
