"""Drawing a plan: the matmul dataflow graph as DOT, SVG (Graphviz) and one self-contained HTML page.

The idea: of the thousands of ATen nodes only three kinds matter to a reader: the ops that consume a
weight (matmuls, embeddings: one box per weight, colored by style), the collectives (red octagons), and
the model's inputs and outputs. Everything between them is contracted: an edge ``A -> B`` means a value
flows from A to B through ops that move no data between ranks, labelled with the placement A emits
(``S(-1)`` sharded on the last dim, ``P`` partial sums, ``R`` replicated). Only floating-point values
are followed (plus graph inputs), so position ids, masks and rotary tables do not clutter the picture.
Residual adds where two flows meet are kept as small ``+`` nodes; without them every layer would seem to
feed every later one through the residual stream.

Nodes are named by their folded module (``model.layers.*.mlp.up_proj``), so the 80 copies of a decoder
layer collapse into one cluster labelled ``model.layers.* ×80``; edges that leave a layer's end and enter
the next layer's start become edges inside the cluster, which is exactly the loop the layers form.
"""

from __future__ import annotations

import html
import shutil
import subprocess
from typing import TYPE_CHECKING, Any

import networkx as nx
import torch

from tpfx.report import (
    build_report,
    describe_placement,
    edge_collective,
    fmt_bytes,
    fold,
    layer_of,
    module_of,
    relative,
    totals_lines,
    weight_module,
    weight_params,
)

if TYPE_CHECKING:
    import torch.fx as fx

    from tpfx.passes import Propagation
    from tpfx.report import PlanView

Source = tuple[str, str, "int | None"]  # (graph id, placement label, layer index of the source)
STYLE_COLORS = {"colwise": "#4e79a7", "rowwise": "#f28e2b", "vocab": "#59a14f", "shard": "#b07aa1",
                "replicate": "#d9d4cf"}
COLLECTIVE_COLOR = "#e15759"
aten_add = torch.ops.aten.add.Tensor
DOT_MISSING = ("tpfx: rendering needs the Graphviz `dot` program, which is not installed. Install it with "
               "`apt-get install graphviz` (Debian/Ubuntu), `brew install graphviz` (macOS) or "
               "`conda install graphviz`; or use plan.to_dot() for the DOT text, or plan.to_html(), which "
               "falls back to showing the DOT text when `dot` is missing.")


# ------------------------------------------------------------------------------------ the graph


def _need_graph(plan: PlanView) -> None:
    if plan.derivation is None:
        raise ValueError("tpfx: drawing needs a plan derived in this process (tpfx.plan), not one loaded from "
                         "JSON: the dataflow graph is not saved")


def _is_float(node: fx.Node) -> bool:
    val = node.meta.get("val")
    vals = val if isinstance(val, (list, tuple)) else (val,)
    return any(getattr(v, "dtype", None) is not None and v.dtype.is_floating_point for v in vals)


class _Builder:
    """Contracts the planned ATen graph to weights, collectives, inputs and outputs."""

    def __init__(self, plan: PlanView) -> None:
        from tpfx.report import analyze

        assert plan.derivation is not None
        self.plan, self.gm = plan, plan.derivation.gm
        self.prop: Propagation = plan.derivation.prop
        self.g = nx.DiGraph()
        ctx = analyze(plan) or {}
        self.layers: dict[str, int] = ctx.get("layers", {})
        self.infos = {(i["kind"], i["after"]): i for i in ctx.get("collectives", []) if i["pass"] == "forward"}
        self.weights = {n for n in self.gm.graph.nodes if n.op == "call_function" and weight_params(self.prop, n)}
        self.carried: dict[fx.Node, set[Source]] = {}
        self.junctions: dict[str, int] = {}  # module -> residual adds seen in it (their ordinal names them)

    # -- node ids and attributes
    def weight_node(self, node: fx.Node) -> str:
        fqn = weight_params(self.prop, node)[0]
        module = module_of(node) or weight_module(fqn)
        nid = "w:" + fold(module) + ":" + fold(fqn)
        if nid not in self.g:
            p = self.plan.placements[fqn]
            scope = layer_of(module)
            owner = weight_module(fqn)
            name = fold(owner) if owner == module or owner.startswith(module + ".") else f"{fold(module)} ({fold(fqn)})"
            self.g.add_node(nid, kind="weight", style=p.style, scope=fold(scope[0]) if scope else "", name=name,
                            detail=f"{p.style} {p.placement}\\n{list(p.shape)} → {list(p.local_shape())}",
                            count=0)
        self.g.nodes[nid]["count"] += 1
        return nid

    def collective_node(self, kind: str, after: fx.Node) -> str:
        info = self.infos.get((kind, after.name), {})
        scope = info.get("scope", "")
        sources = ",".join(sorted({fold(s) for s in info.get("sources", [])}))
        nid = f"c:{kind}:{scope}:{sources or fold(module_of(after))}"
        if nid not in self.g:
            self.g.add_node(nid, kind="collective", scope=fold(scope), name=kind, style="",
                            detail=fmt_bytes(info.get("bytes", 0)), count=0)
        return nid

    def _pl(self, node: fx.Node, pl: Any) -> str:
        val = node.meta.get("val")
        return describe_placement(pl, getattr(val, "ndim", None), self.plan.world_size)

    # -- contraction
    def arriving(self, a: fx.Node, user: fx.Node) -> set[Source]:
        """The sources a value brings to ``user``."""
        kind = edge_collective(self.prop, a, user)
        if kind is None:
            return self.carried.get(a, set())
        want = self.prop.wants.get((user, a))
        label = "R" if kind == "all_reduce" or want is None else self._pl(a, want)
        return {(self.collective_node(kind, a), label, self.infos.get((kind, a.name), {}).get("index"))}

    def per_input(self, node: fx.Node) -> list[set[Source]]:
        """What each data input brings (floating-point values and graph inputs; no weights, masks, ids)."""
        return [self.arriving(a, node) for a in node.all_input_nodes
                if a.op != "get_attr" and (_is_float(a) or a.op == "placeholder")]

    def inputs(self, node: fx.Node) -> set[Source]:
        return set().union(*self.per_input(node))

    def junction(self, node: fx.Node, parts: list[set[Source]]) -> set[Source]:
        """A residual ``add`` where two dataflows meet becomes a ``+`` node (otherwise every earlier layer
        would seem to feed every later one through the residual stream)."""
        module = module_of(node)
        ordinal = self.junctions.setdefault(module, 0)
        self.junctions[module] = ordinal + 1
        scope = layer_of(module)
        nid = f"j:{fold(module)}:{ordinal}"
        if nid not in self.g:
            self.g.add_node(nid, kind="junction", style="", scope=fold(scope[0]) if scope else "", name="+",
                            detail="", count=0)
        self.g.nodes[nid]["count"] += 1
        index = scope[1] if scope else None
        for src in set().union(*parts):
            self.edge(src, nid, index)
        return {(nid, self._pl(node, self.prop.placements.get(node)), index)}

    def edge(self, src: Source, dst: str, dst_index: int | None) -> None:
        """``loop``: the edge joins consecutive copies of a layer (it closes the folded cluster's cycle)."""
        nid, label, index = src
        loop = index is not None and dst_index is not None and index != dst_index
        if self.g.has_edge(nid, dst):
            self.g.edges[nid, dst]["labels"].add(label)
            self.g.edges[nid, dst]["loop"] |= loop
        else:
            self.g.add_edge(nid, dst, labels={label}, loop=loop)

    def build(self) -> nx.DiGraph:
        for node in self.gm.graph.nodes:
            if node.op == "placeholder" and node.meta.get("val") is not None and hasattr(node.meta["val"], "shape"):
                self.carried[node] = {("in:" + node.name, "R", None)}
            elif node.op == "output":
                for src in self.inputs(node):
                    self.edge(src, "out", None)
            elif node in self.weights:
                nid = self.weight_node(node)
                layer = layer_of(module_of(node))
                index = layer[1] if layer else None
                for src in self.inputs(node):
                    self.edge(src, nid, index)
                self.carried[node] = {(nid, self._pl(node, self.prop.placements.get(node)), index)}
            elif node.op == "call_function":
                parts = [p for p in self.per_input(node) if p]
                merging = node.target is aten_add and len(parts) > 1 and len(set().union(*parts)) > 1
                self.carried[node] = self.junction(node, parts) if merging else set().union(*parts)
            if node.op == "call_function":
                self._collectives_after(node)
        self._add_io()
        return self.g

    def _collectives_after(self, node: fx.Node) -> None:
        """Edges into the collectives that follow ``node``, from what ``node``'s value carries."""
        for kind in sorted({k for (k, after) in self.infos if after == node.name}):
            nid = self.collective_node(kind, node)
            self.g.nodes[nid]["count"] += 1
            index = self.infos[(kind, node.name)].get("index")
            for src in self.carried.get(node, set()):
                if src[0] != nid:
                    self.edge(src, nid, index)

    def _add_io(self) -> None:
        for nid in list(self.g.nodes):
            if nid.startswith("in:") and "kind" not in self.g.nodes[nid]:
                self.g.nodes[nid].update(kind="input", name=nid[3:], scope="", style="", detail="", count=1)
        if "out" in self.g and "kind" not in self.g.nodes["out"]:
            self.g.nodes["out"].update(kind="output", name="output", scope="", style="", detail="", count=1)


def dataflow(plan: PlanView) -> nx.DiGraph:
    """The contracted graph. Node attrs: ``kind`` (weight | collective | junction | input | output),
    ``name``, ``style``, ``scope`` (folded layer container or ""), ``detail``; edge attrs: ``labels`` (the
    placements sent) and ``loop`` (the edge enters the next copy of a repeated layer)."""
    _need_graph(plan)
    g = _Builder(plan).build()
    for u, v in list(g.edges):  # a collective's own self-loop (residual carried across it) says nothing
        if u == v:
            g.remove_edge(u, v)
    return g


# -------------------------------------------------------------------------------------- DOT / SVG


def _node_attrs(data: dict[str, Any], scope_name: str) -> dict[str, str]:
    kind = data["kind"]
    if kind == "weight":
        fill = STYLE_COLORS.get(data["style"], "#ffffff")
        font = "white" if data["style"] in ("colwise", "rowwise", "vocab", "shard") else "black"
        return {"label": f"{relative(data['name'], scope_name)}\\n{data['detail']}", "shape": "box",
                "style": "filled,rounded", "fillcolor": fill, "fontcolor": font, "color": fill}
    if kind == "junction":
        return {"label": "+", "shape": "circle", "width": "0.3", "fixedsize": "true", "style": "solid"}
    if kind == "collective":
        return {"label": f"{data['name']}\\n{data['detail']}", "shape": "octagon", "style": "filled",
                "fillcolor": COLLECTIVE_COLOR, "fontcolor": "white", "color": COLLECTIVE_COLOR}
    return {"label": data["name"], "shape": "ellipse", "style": "solid"}


def to_dot(plan: PlanView) -> str:
    """Graphviz DOT text of ``dataflow(plan)``: one cluster per repeated-layer container (``×N``)."""
    import graphviz

    g = dataflow(plan)
    layers = (build_report(plan).layers if g.number_of_nodes() else {})
    ids = {nid: f"n{i}" for i, nid in enumerate(g.nodes)}
    dot = graphviz.Digraph("tpfx_plan", graph_attr={
        "rankdir": "TB", "fontname": "Helvetica", "labelloc": "t", "nodesep": "0.25", "ranksep": "0.35",
        "label": f"tpfx sharding plan, world size {plan.world_size}"},
        node_attr={"fontname": "Helvetica", "fontsize": "10"}, edge_attr={"fontname": "Helvetica", "fontsize": "9"})
    scopes = sorted({d["scope"] for _, d in g.nodes(data=True) if d["scope"]})
    for nid, data in g.nodes(data=True):
        if not data["scope"]:
            dot.node(ids[nid], **_node_attrs(data, ""))
    for i, scope in enumerate(scopes):
        with dot.subgraph(name=f"cluster_{i}") as c:
            c.attr(label=f"{scope}.* ×{layers.get(scope, '?')}", style="rounded,dashed", color="#777777")
            for nid, data in g.nodes(data=True):
                if data["scope"] == scope:
                    c.node(ids[nid], **_node_attrs(data, scope))
    for u, v, data in g.edges(data=True):
        label = " " + "/".join(sorted(data["labels"]))
        if data["loop"]:  # to the next layer: drawn dashed, and not allowed to rank the layer upside down
            dot.edge(ids[u], ids[v], label=label, style="dashed", constraint="false",
                     color="#666666")
        else:
            dot.edge(ids[u], ids[v], label=label)
    _legend(dot, {d["style"] for _, d in g.nodes(data=True) if d["kind"] == "weight"})
    return dot.source


def _legend(dot: Any, styles: set[str]) -> None:
    with dot.subgraph(name="cluster_legend") as c, c.subgraph() as row:
        c.attr(label="legend", style="rounded", color="#bbbbbb", fontsize="9")
        row.attr(rank="same")
        for style in [s for s in STYLE_COLORS if s in styles]:
            color = STYLE_COLORS[style]
            row.node(f"legend_{style}", label=style, shape="box", style="filled,rounded", fillcolor=color,
                     color=color, fontcolor="white" if style != "replicate" else "black", fontsize="9")
        row.node("legend_collective", label="collective", shape="octagon", style="filled",
                 fillcolor=COLLECTIVE_COLOR, color=COLLECTIVE_COLOR, fontcolor="white", fontsize="9")
        row.node("legend_edges", shape="plaintext", fontsize="9",
                 label="edge labels: placement sent\\nS(d) sharded on dim d, P partial sum, R replicated\\n"
                       "+: residual add, dashed: into the next copy of the layer")
        names = [f"legend_{s}" for s in STYLE_COLORS if s in styles] + ["legend_collective", "legend_edges"]
        for a, b in zip(names, names[1:]):
            row.edge(a, b, style="invis")  # keeps the legend in reading order


def has_dot() -> bool:
    return shutil.which("dot") is not None


def _run_dot(text: str, fmt: str, out: str | None = None) -> bytes:
    exe = shutil.which("dot")
    if exe is None:
        raise RuntimeError(DOT_MISSING)
    cmd = [exe, f"-T{fmt}"] + (["-o", out] if out else [])
    res = subprocess.run(cmd, input=text.encode(), capture_output=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"tpfx: `dot -T{fmt}` failed: {res.stderr.decode(errors='replace').strip()}")
    return res.stdout


def render(plan: PlanView, path: str) -> str:
    """Write the drawing to ``path``; the format is the suffix (svg, png, pdf, ...). Needs Graphviz."""
    fmt = path.rsplit(".", 1)[-1].lower() if "." in path else "svg"
    text = to_dot(plan)
    _run_dot(text, fmt, path)
    return path


def to_svg(plan: PlanView) -> str:
    """The drawing as inline SVG markup (no XML prolog). Needs Graphviz."""
    svg = _run_dot(to_dot(plan), "svg").decode()
    return svg[svg.index("<svg"):]


# ------------------------------------------------------------------------------------------ HTML

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#222;max-width:1600px}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:13px} th,td{padding:3px 9px;border-bottom:1px solid #eee;text-align:left}
th{background:#f5f5f5} td.num{text-align:right;font-variant-numeric:tabular-nums}
.badge{display:inline-block;padding:1px 7px;border-radius:8px;color:#fff;font-size:12px}
.graph{overflow:auto;border:1px solid #ddd;padding:8px} .graph svg{max-width:100%;height:auto}
pre{background:#f7f7f7;padding:10px;overflow:auto;font-size:12px} ul{font-size:14px}
details{margin:4px 0;font-size:13px} summary{cursor:pointer} .muted{color:#777}
"""


def _badge(style: str) -> str:
    color = STYLE_COLORS.get(style, "#999")
    fg = "#222" if style == "replicate" else "#fff"
    return f'<span class="badge" style="background:{color};color:{fg}">{html.escape(style)}</span>'


def _table(head: list[str], rows: list[list[str]], numeric: set[int]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f'<td class="num">{c}</td>' if i in numeric else f"<td>{c}</td>"
                                    for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _graph_section(plan: PlanView) -> str:
    if plan.derivation is None:
        return '<p class="muted">No drawing: this plan was loaded without its graph (re-plan to draw it).</p>'
    if has_dot():
        return f'<div class="graph">{to_svg(plan)}</div>'
    return ('<p class="muted">Graphviz <code>dot</code> is not installed, so the drawing is shown as DOT text '
            '(install graphviz and re-run, or paste it into any Graphviz viewer).</p>'
            f"<pre>{html.escape(to_dot(plan))}</pre>")


def _explanations(plan: PlanView, rep: Any) -> str:
    from tpfx.explain import explain

    items = []
    for grp in rep.params:
        if len(grp.shape) < 2:
            continue
        ex = explain(plan, grp.members[0])
        title = f"{html.escape(grp.label)} {_badge(grp.style)}"
        items.append(f"<details><summary>{title}</summary><pre>{html.escape(str(ex))}</pre></details>")
    return "".join(items) or '<p class="muted">no matrices</p>'


def html_page(plan: PlanView) -> str:
    """The self-contained page: drawing, parameter and collective tables, totals, fallbacks, explanations."""
    rep = build_report(plan)
    e = html.escape
    params = [[e(g.label), str(g.count), e(str(list(g.shape))), _badge(g.style), e(g.placement),
               e(str(list(g.local_shape))), fmt_bytes(g.bytes_local)] for g in rep.params]
    colls = []
    for c in rep.collectives:
        count = str(c.count) + (f" ({c.count / rep.layers[c.scope]:g}/layer)" if rep.layers.get(c.scope) else "")
        colls.append([c.pass_, e(c.kind), e(f"{c.scope}.* ×{rep.layers.get(c.scope, 0)}" if c.scope else "—"),
                      e(", ".join(relative(s, c.scope) for s in c.sources) or "—"), e(c.where()),
                      fmt_bytes(c.bytes), count, fmt_bytes(c.total)])
    fallbacks = "".join(f"<li><b>{e(w)}</b>: {e(why)}</li>" for w, why in rep.replicated) or \
        "<li>none: every matrix is split</li>"
    totals = "".join(f"<li>{e(t)}</li>" for t in totals_lines(rep))
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>tpfx sharding plan (world size {plan.world_size})</title>
<style>{_CSS}</style></head><body>
<h1>tpfx sharding plan · world size {plan.world_size}</h1>
<p class="muted">{sum(g.count for g in rep.params)} parameters in {len(rep.params)} groups;
repeated layers folded to <code>*</code>.</p>
<h2>Totals</h2><ul>{totals}</ul>
<h2>Dataflow</h2>{_graph_section(plan)}
<h2>Parameters</h2>{_table(["parameter", "×", "shape", "style", "placement", "local shape / rank",
                            "bytes / rank"], params, {1, 6})}
<h2>Collectives per step</h2>{_table(["pass", "kind", "scope", "for weights", "after op", "bytes", "× / step",
                                      "bytes / step"], colls, {5, 6, 7})}
<p class="muted">Bytes are the full tensor per call for the example shapes. Backward collectives are derived as
emission inserts them.</p>
<h2>Replicated regions and fallbacks</h2><ul>{fallbacks}</ul>
<h2>Why each matrix is placed as it is</h2>{_explanations(plan, rep)}
</body></html>
"""


def to_html(plan: PlanView, path: str | None = None) -> str:
    """The page as text; also written to ``path`` when given. No network: everything is inline."""
    page = html_page(plan)
    if path is not None:
        with open(path, "w", encoding="utf-8") as f:
            f.write(page)
    return page


__all__ = ["dataflow", "to_dot", "render", "to_svg", "to_html", "html_page", "has_dot", "STYLE_COLORS",
           "DOT_MISSING"]
