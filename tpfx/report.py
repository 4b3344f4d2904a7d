"""Plan report: what is split, what it costs, and where the compiler fell back.

The idea: a plan is keyed by parameter FQNs and graph node names, which repeat once per layer. The report
folds layer indices to ``*`` so an 80-layer model reads like a 1-layer one, and attributes every collective
to the weights whose partial sums or shards it resolves, found by walking the planned graph backwards
through non-replicated values (``o_proj``'s partial output is reduced at the next norm: the collective
belongs to ``o_proj``'s layer). Forward traffic is compared with Megatron-LM's reference of two all-reduces
of ``b·s·h`` per layer, with ``b·s`` and ``h`` read off the graph (the shape of the reduced activations).

Backward collectives are derived the way emission inserts them: a replicated floating-point value that
requires grad and enters sharded compute is all-reduced in the backward (Megatron's ``f``), and a weight
split into fewer chunks than ranks has its gradient summed over its replica group.

Everything the report needs from the graph is collected by :func:`analyze` into a JSON-able ``context``
that ``ShardingPlan.to_json`` stores, so a plan loaded from JSON reports the same as the one planned.
"""

from __future__ import annotations

import io
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import torch
from rich.console import Console
from rich.table import Table

from tpfx.passes import (
    INDEX,
    backward_collectives,
    fold,
    hint,
    is_seq_split,
    module_of,
    nbytes,
    tensor_inputs,
    trained,
)

if TYPE_CHECKING:
    import torch.fx as fx

    from tpfx.passes import Collective, Derivation, ParamPlacement, Propagation


class PlanView(Protocol):
    """What the views of a plan (this report, ``explain``, ``draw``) read: ``tpfx.plan.PlanView`` is one, and
    calls them (the views never import it)."""

    world_size: int
    placements: dict[str, ParamPlacement]
    collectives: list[Collective]
    fallbacks: list[dict[str, str]]
    unknown_ops: list[str]
    sequence_parallel: bool
    derivation: Derivation | None  # the graph state planned (None when loaded from JSON)
    context: dict[str, Any] | None  # what ``analyze`` found, stored with the plan

_NODE_SUFFIX = re.compile(r"\b([A-Za-z]\w*?)_\d+:")
_WEIGHT_STYLES = frozenset({"colwise", "rowwise", "vocab", "shard"})
CONTEXT_VERSION = 1


# ----------------------------------------------------------------------------------------- names


def layer_of(name: str) -> tuple[str, int] | None:
    """``model.layers.17.mlp`` -> ``("model.layers", 17)``: the first indexed container of a name."""
    m = INDEX.search(name)
    return (name[:m.start()], int(m.group(1))) if m else None


def op_name(node: fx.Node) -> str:
    """``aten.silu.default`` -> ``silu``; other callables by their name."""
    text = str(node.target)
    if text.startswith("aten."):
        return text.split(".")[1]
    return getattr(node.target, "__name__", text)


def weight_module(fqn: str) -> str:
    """The module a ``.weight`` / ``.bias`` belongs to; other parameters (fused expert tensors such as
    ``experts.gate_up_proj``) name themselves."""
    module, _, leaf = fqn.rpartition(".")
    return module if module and leaf in ("weight", "bias") else fqn


def relative(name: str, scope: str) -> str:
    """Drop a folded scope prefix: ``model.layers.*.mlp.up_proj`` in ``model.layers`` -> ``mlp.up_proj``."""
    prefix = scope + ".*"
    if scope and name == prefix:
        return "layer"
    return name[len(prefix) + 1:] if scope and name.startswith(prefix + ".") else name


def describe_placement(pl: Any, ndim: int | None = None, world: int | None = None) -> str:
    """``Shard(2, 2, (64,))`` on a 3-d value -> ``S(-1)``; groups and segments are spelled out."""
    from tpfx.passes import Partial, Shard

    if isinstance(pl, tuple):
        return "(" + ", ".join(describe_placement(p, None, world) for p in pl) + ")"
    if isinstance(pl, Partial):
        return "P"
    if not isinstance(pl, Shard):
        return "R"
    dim = pl.dim - ndim if ndim is not None and pl.dim == ndim - 1 else pl.dim
    extra = ""
    if world is not None and pl.groups != world:
        extra += f", {pl.groups} groups"
    if len(pl.segs) > 1:
        extra += f", segs {'+'.join(map(str, pl.segs))}"
    if pl.unit != 1:
        extra += f", whole parts of {pl.unit}"
    return f"S({dim}{extra})"


def numel(shape: Iterable[Any]) -> int:
    n = 1
    for s in shape:
        n *= hint(s, 1)
    return n


def fmt_bytes(n: int | float | None) -> str:
    if n is None:
        return "n/a"
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= scale:
            return f"{n / scale:,.2f} {unit}"
    return f"{int(n):,} B"


# ------------------------------------------------------------------------------- graph analysis


def edge_collective(prop: Propagation, producer: fx.Node, consumer: fx.Node) -> str | None:
    """The collective (if any) between a producer and one of its consumers, as emission inserts it."""
    from tpfx.passes import forward_collective

    if producer in prop.reduced_after:
        return "all_reduce"
    if producer in prop.scattered_after:
        return "reduce_scatter"
    want = prop.wants.get((consumer, producer))
    if want is None:
        return None
    return forward_collective(prop.placements.get(producer), want, prop.world)


def _is_nonrep(pl: Any) -> bool:
    from tpfx.passes import Replicate

    outs = pl if isinstance(pl, tuple) else (pl,)
    return any(p is not None and not isinstance(p, Replicate) for p in outs)


def param_behind(prop: Propagation, a: fx.Node, depth: int = 4) -> fx.Node | None:
    """The parameter node ``a`` is, or is a reshape of (``transpose(w)``, ``w.view(...)``: one input each)."""
    while a not in prop.param_nodes and depth and a.op == "call_function":
        ins = tensor_inputs(a)
        if len(ins) != 1:
            return None
        a, depth = ins[0], depth - 1
    return a if a in prop.param_nodes else None


def weight_params(prop: Propagation, node: fx.Node) -> list[str]:
    """FQNs of the matrix (>= 2-d) parameters a node combines with activations, in operand order; a weight
    reshaped on its own first (fused expert tensors) counts. Empty for ops on weights alone."""
    out, activations = [], False
    for a in tensor_inputs(node):
        p = param_behind(prop, a)
        if p is not None and p.meta["val"].ndim >= 2:
            out.append(prop.param_nodes[p])
        elif p is None:
            activations = True
    return out if activations else []


def sharded_weights(prop: Propagation, node: fx.Node) -> list[str]:
    return [f for f in weight_params(prop, node) if prop.decided.get(f, ("replicate",))[0] in _WEIGHT_STYLES]


def origin_map(gm: fx.GraphModule, prop: Propagation) -> dict[fx.Node, frozenset[str]]:
    """node -> modules of the split weights whose shard or partial sum reaches the node's (pre-collective)
    output, in one pass in graph order."""
    out: dict[fx.Node, frozenset[str]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        mine = sharded_weights(prop, node)
        if mine:
            out[node] = frozenset(weight_module(f) for f in mine)
            continue
        acc: set[str] = set()
        for a in node.all_input_nodes:  # not only tensors: split/chunk outputs are lists
            if a in out and a not in prop.reduced_after and _is_nonrep(prop.placements.get(a)) \
                    and not is_seq_split(prop.placements.get(a)):  # a sequence split is no weight's shard
                acc |= out[a]
        out[node] = frozenset(acc)
    return out


def _scope(sources: Iterable[str], fallback: str) -> tuple[str, int | None]:
    """The layer of the weights a collective serves; the layer it sits in if they span several."""
    layers = {layer_of(s) for s in sources}
    if len(layers) == 1:
        one = next(iter(layers))
        return (one[0], one[1]) if one else ("", None)
    own = layer_of(fallback)
    return (own[0], own[1]) if own else ("", None)


def _info(kind: str, after: fx.Node, before: str, nbytes: int, pass_: str, sources: Iterable[str],
          derived: bool = False) -> dict[str, Any]:
    srcs = sorted(set(sources))
    module = module_of(after)
    scope, index = _scope(srcs, module)
    val = after.meta.get("val")
    return {"kind": kind, "after": after.name, "before": before, "bytes": int(nbytes), "pass": pass_,
            "scope": scope, "index": index, "sources": srcs, "op": op_name(after), "module": module,
            "shape": [hint(s, 1) for s in val.shape] if isinstance(val, torch.Tensor) else [],
            "itemsize": val.element_size() if isinstance(val, torch.Tensor) else 0, "derived": derived}


def _forward_infos(plan: PlanView, nodes: dict[str, fx.Node],
                   origins: dict[fx.Node, frozenset[str]]) -> list[dict[str, Any]]:
    out = []
    for c in plan.collectives:
        node = nodes.get(c.after)
        if node is None:
            continue
        out.append(_info(c.kind, node, c.before, c.bytes, c.pass_, origins.get(node, frozenset())))
    return out


def _backward_infos(plan: PlanView, gm: fx.GraphModule, prop: Propagation,
                    nodes: dict[str, fx.Node]) -> list[dict[str, Any]]:
    """The backward collectives emission adds (``tpfx.passes.backward_collectives``) on values that carry
    gradients: Megatron's ``f`` and its sequence-parallel forms, and replica-group gradient reductions."""
    needs = trained(gm, prop.param_nodes, floating=True)
    out = []
    for c in backward_collectives(gm, prop):
        if c.via == "replicas":
            out.append(_replica_info(plan, c.value, prop.param_nodes[c.value]))
        elif c.via in ("scattered", "scatter"):  # the backward of a forward redistribution step
            if c.value in needs:
                before = c.consumers[0].name if c.consumers else "*"
                out.append(_info(c.kind, c.value, before, nbytes(c.value), "backward", [module_of(c.value)], True))
        elif c.value in needs:
            fqn = prop.param_nodes.get(c.value)
            srcs = [weight_module(f) for u in c.consumers for f in sharded_weights(prop, u)]
            info = _info(c.kind, c.value, c.consumers[0].name, nbytes(c.value), "backward",
                         srcs or [module_of(c.consumers[0])], True)
            if fqn is not None:
                info["module"], info["op"] = weight_module(fqn), "grad of " + fqn.rpartition(".")[2]
            out.append(info)
    return out


def _replica_info(plan: PlanView, node: fx.Node, fqn: str) -> dict[str, Any]:
    """A weight split into fewer chunks than ranks: its gradient summed over each replica group."""
    p = plan.placements[fqn]
    pl = p.as_placement()
    gs = pl.seg_groups
    local = numel(p.local_shape()) * node.meta["val"].element_size()
    if pl.sgroups is not None:  # only the rows of segments held by several ranks are reduced
        rows = pl.local_segs()
        local = local * sum(n for n, g in zip(rows, gs) if g < plan.world_size) // sum(rows)
    info = _info("all_reduce", node, f"grad:{fqn}", local, "backward", [weight_module(fqn)], True)
    info["module"], info["op"] = weight_module(fqn), f"grad in groups of {plan.world_size // min(gs)}"
    return info


def _hidden_and_tokens(gm: fx.GraphModule, infos: list[dict[str, Any]]) -> tuple[int | None, int | None, int]:
    """h and b·s from the forward all-reduced activations (their most common shape), b·s falling back to
    the first integer input (token ids)."""
    shapes = Counter(tuple(i["shape"]) for i in infos if i["pass"] == "forward"
                     and i["kind"] in ("all_reduce", "reduce_scatter") and len(i["shape"]) >= 2)
    itemsizes = [i["itemsize"] for i in infos if i["pass"] == "forward" and i["itemsize"]]
    itemsize = Counter(itemsizes).most_common(1)[0][0] if itemsizes else 4
    if shapes:
        shape = shapes.most_common(1)[0][0]
        return shape[-1], numel(shape[:-1]), itemsize
    for node in gm.graph.nodes:
        val = node.meta.get("val") if node.op == "placeholder" else None
        if isinstance(val, torch.Tensor) and not val.dtype.is_floating_point and val.ndim >= 1:
            return None, numel(val.shape), itemsize
    return None, None, itemsize


def _layers(names: Iterable[str]) -> dict[str, int]:
    seen: dict[str, set[int]] = {}
    for n in names:
        lo = layer_of(n)
        if lo:
            seen.setdefault(lo[0], set()).add(lo[1])
    return {k: len(v) for k, v in sorted(seen.items())}


def analyze(plan: PlanView) -> dict[str, Any] | None:
    """The JSON-able facts the report needs (stored by ``to_json``); None for a plan with no graph and no
    stored context."""
    if plan.derivation is None:
        return plan.context
    gm, prop = plan.derivation.gm, plan.derivation.prop
    nodes = {n.name: n for n in gm.graph.nodes}
    origins = origin_map(gm, prop)
    infos = _forward_infos(plan, nodes, origins)
    if not any(c.pass_ == "backward" for c in plan.collectives):
        infos += _backward_infos(plan, gm, prop, nodes)
    hidden, tokens, act_itemsize = _hidden_and_tokens(gm, infos)
    order: list[str] = []
    itemsize: dict[str, int] = {}
    for node, fqn in prop.param_nodes.items():
        if fold(fqn) not in itemsize:
            order.append(fold(fqn))
            itemsize[fold(fqn)] = node.meta["val"].element_size()
    modules = {f["node"]: module_of(nodes[f["node"]]) for f in plan.fallbacks
               if "node" in f and f["node"] in nodes}
    return {"version": CONTEXT_VERSION, "collectives": infos, "layers": _layers(plan.placements),
            "order": order, "itemsize": itemsize, "hidden": hidden, "tokens": tokens,
            "act_itemsize": act_itemsize, "fallback_modules": modules}


# ------------------------------------------------------------------------------------ the report


@dataclass(frozen=True)
class ParamGroup:
    """Parameters that differ only in their layer index and share style, placement and shape."""

    name: str
    members: tuple[str, ...]
    shape: tuple[int, ...]
    style: str
    placement: str
    local_shape: tuple[int, ...]
    itemsize: int
    label: str = ""  # what the table shows: ``name``, or the layers it covers when its layers differ

    @property
    def count(self) -> int:
        return len(self.members)

    @property
    def bytes_full(self) -> int:
        return numel(self.shape) * self.itemsize * self.count

    @property
    def bytes_local(self) -> int:
        return numel(self.local_shape) * self.itemsize * self.count


@dataclass(frozen=True)
class CollectiveGroup:
    """Collectives that differ only in their layer index."""

    pass_: str
    kind: str
    scope: str  # "model.layers" or "" (outside repeated layers)
    sources: tuple[str, ...]  # folded modules of the weights whose shard / partial sum it resolves
    at: tuple[str, ...]  # "op @ folded module" of the nodes it follows
    bytes: int  # per call
    count: int

    @property
    def total(self) -> int:
        return self.bytes * self.count

    def where(self) -> str:
        """Where it runs, relative to its scope: ``to @ input_layernorm, to @ model.norm``."""
        parts = []
        for a in self.at:
            op, _, module = a.partition(" @ ")
            parts.append(f"{op} @ {relative(module, self.scope)}" if module else op)
        return ", ".join(parts)


@dataclass
class Report:
    """Everything ``summary`` and ``to_html`` print, as data."""

    world_size: int
    params: list[ParamGroup]
    collectives: list[CollectiveGroup]
    layers: dict[str, int]
    hidden: int | None
    tokens: int | None
    act_itemsize: int
    replicated: list[tuple[str, str]]  # (what, why)
    has_graph: bool
    notes: list[str] = field(default_factory=list)
    sequence_parallel: bool = False

    # -- totals
    @property
    def param_local(self) -> int:
        return sum(g.bytes_local for g in self.params)

    @property
    def param_full(self) -> int:
        return sum(g.bytes_full for g in self.params)

    def bytes_per_step(self, pass_: str) -> int:
        return sum(c.total for c in self.collectives if c.pass_ == pass_)

    def counts(self, pass_: str) -> Counter:
        out: Counter = Counter()
        for c in self.collectives:
            if c.pass_ == pass_:
                out[c.kind] += c.count
        return out

    @property
    def main_scope(self) -> str:
        return max(self.layers, key=lambda k: (self.layers[k], k)) if self.layers else ""

    @property
    def n_layers(self) -> int:
        return self.layers.get(self.main_scope, 0)

    def in_layers(self, pass_: str = "forward") -> int:
        return sum(c.total for c in self.collectives if c.pass_ == pass_ and c.scope == self.main_scope
                   and self.main_scope)

    def per_layer(self, pass_: str = "forward") -> tuple[float, float]:
        """(collectives, bytes) per repeated layer."""
        n = max(self.n_layers, 1)
        calls = sum(c.count for c in self.collectives if c.pass_ == pass_ and c.scope == self.main_scope
                    and self.main_scope)
        return calls / n, self.in_layers(pass_) / n

    @property
    def megatron(self) -> int | None:
        """Megatron-LM's forward reference: 2 all-reduces of b·s·h per layer (with sequence parallelism 2
        reduce-scatters and 2 all-gathers, each counted, like every collective here, at its full tensor)."""
        if not self.hidden or not self.tokens or not self.n_layers:
            return None
        return (4 if self.sequence_parallel else 2) * self.n_layers * self.tokens * self.hidden * self.act_itemsize


def _param_groups(plan: PlanView, ctx: dict[str, Any] | None) -> list[ParamGroup]:
    order = {n: i for i, n in enumerate((ctx or {}).get("order", []))}
    sizes = (ctx or {}).get("itemsize", {})
    groups: dict[tuple, list[str]] = {}
    for fqn, p in plan.placements.items():
        groups.setdefault((fold(fqn), p.style, p.placement, p.shape, p.local_shape()), []).append(fqn)
    split = Counter(k[0] for k in groups)  # a folded name in several groups: its layers differ
    out = [ParamGroup(k[0], tuple(v), k[3], k[1], k[2], k[4], int(sizes.get(k[0], 4)),
                      _label(k[0], v) if split[k[0]] > 1 else k[0]) for k, v in groups.items()]
    return sorted(out, key=lambda g: (order.get(g.name, len(order)), g.name, g.members[0]))


def _label(name: str, members: list[str]) -> str:
    """``model.layers.*.q_proj.weight`` covering layers 0 and 3 -> ``model.layers.{0,3}.q_proj.weight``."""
    if len(members) == 1:
        return members[0]
    indices = sorted({lo[1] for m in members if (lo := layer_of(m))})
    return name.replace(".*", ".{" + ",".join(map(str, indices)) + "}", 1)


def _collective_groups(plan: PlanView, ctx: dict[str, Any] | None) -> list[CollectiveGroup]:
    infos = (ctx or {}).get("collectives")
    if infos is None:  # no graph, no context: group by node name only
        infos = [{"kind": c.kind, "pass": c.pass_, "scope": "", "sources": [], "bytes": c.bytes,
                  "op": re.sub(r"_\d+$", "", c.after), "module": ""} for c in plan.collectives]
    count: dict[tuple, int] = {}
    ats: dict[tuple, list[str]] = {}
    for i in infos:
        key = (i["pass"], i["kind"], i["scope"], tuple(sorted({fold(s) for s in i["sources"]})), i["bytes"])
        count[key] = count.get(key, 0) + 1
        at = i["op"] + (f" @ {fold(i['module'])}" if i["module"] else "")
        if at not in ats.setdefault(key, []):
            ats[key].append(at)
    out = [CollectiveGroup(k[0], k[1], k[2], k[3], tuple(ats[k]), k[4], n) for k, n in count.items()]
    return sorted(out, key=lambda c: (c.pass_ != "forward", c.scope == "", c.scope, c.kind, c.sources, c.at))


def _replicated(plan: PlanView, ctx: dict[str, Any] | None, params: list[ParamGroup]) -> list[tuple[str, str]]:
    """Replicated matrices with the recorded reasons, gathers kept at nodes, and ops without a rule."""
    reasons: dict[str, list[str]] = {}
    for f in plan.fallbacks:
        if "param" in f:
            reasons.setdefault(f["param"], []).append(f["reason"])
    out: list[tuple[str, str]] = []
    for g in params:
        mine: list[str] = []
        for m in g.members:
            for r in reasons.get(m, []):
                why = _NODE_SUFFIX.sub(r"\1:", r)  # softmax_3: -> softmax: (the same reason in another layer)
                if why not in mine:
                    mine.append(why)
        what = f"{g.label} ×{g.count}" if g.count > 1 else g.label
        if len(g.shape) >= 2 and g.style == "replicate":
            why = "; ".join(mine) or _no_reason(g.shape, plan.world_size)
            out.append((what, why if why.startswith("replicated") else "replicated: " + why))
        elif mine:
            out.append((what, "; ".join(mine)))
    modules = (ctx or {}).get("fallback_modules", {})
    seen: set[tuple[str, str]] = set()
    for f in plan.fallbacks:
        if "node" in f:
            where = fold(modules.get(f["node"], "")) or re.sub(r"_\d+$", "", f["node"])
            if (where, f["reason"]) not in seen:
                seen.add((where, f["reason"]))
                out.append((f"gather kept at {where}", f["reason"]))
    for op in plan.unknown_ops:
        out.append((op, "no sharding rule: the region around it runs replicated"))
    return out


def _no_reason(shape: tuple[int, ...], world: int) -> str:
    odd = [s for s in shape if s % world]
    hint = f"; dims {odd} are not divisible by {world}" if odd else ""
    return f"no reason recorded: no split reached it (its consumers run replicated){hint}"


def build_report(plan: PlanView, hidden: int | None = None) -> Report:
    """Collect the report's tables; ``hidden`` overrides the hidden size read off the graph."""
    ctx = analyze(plan)
    params = _param_groups(plan, ctx)
    layers = (ctx or {}).get("layers") or _layers(plan.placements)
    rep = Report(plan.world_size, params, _collective_groups(plan, ctx), layers,
                 hidden or (ctx or {}).get("hidden"), (ctx or {}).get("tokens"),
                 int((ctx or {}).get("act_itemsize") or 4), _replicated(plan, ctx, params), ctx is not None,
                 sequence_parallel=plan.sequence_parallel)
    if ctx is None:
        rep.notes.append("plan without graph context (old JSON): collectives are not attributed to layers")
    if hidden and rep.tokens is None:
        rep.notes.append("b·s unknown: the Megatron reference needs the planned graph")
    return rep


# ----------------------------------------------------------------------------------- rich output


def _shape(s: tuple[int, ...]) -> str:
    return "[" + ", ".join(map(str, s)) + "]"


def _param_table(rep: Report) -> Table:
    sp = " · sequence parallel (residual stream split by sequence between blocks)" if rep.sequence_parallel else ""
    t = Table(title=f"tpfx sharding plan · world size {rep.world_size} · "
                    f"{sum(g.count for g in rep.params)} parameters in {len(rep.params)} groups{sp}",
              title_justify="left")
    for col, just in (("parameter", "left"), ("×", "right"), ("shape", "left"), ("style", "left"),
                      ("placement", "left"), ("local shape / rank", "left"), ("bytes / rank", "right")):
        t.add_column(col, justify=just)  # type: ignore[arg-type]
    for g in rep.params:
        t.add_row(g.label, str(g.count), _shape(g.shape), g.style, g.placement, _shape(g.local_shape),
                  fmt_bytes(g.bytes_local))
    return t


def _collective_table(rep: Report) -> Table:
    ex = f"b·s = {rep.tokens} tokens" if rep.tokens else "example inputs"
    t = Table(title=f"collectives per step ({ex}; bytes: the full tensor per call)", title_justify="left",
              caption="backward: derived as emission inserts them (Megatron's f where a replicated value enters "
                      "split compute; gradients of weights split into fewer chunks than ranks)",
              caption_justify="left")
    for col, just in (("pass", "left"), ("kind", "left"), ("scope", "left"), ("for weights", "left"),
                      ("after op", "left"), ("bytes", "right"), ("× / step", "right"), ("bytes / step", "right")):
        t.add_column(col, justify=just)  # type: ignore[arg-type]
    for c in rep.collectives:
        count = str(c.count)
        if c.scope and rep.layers.get(c.scope):
            count += f" ({c.count / rep.layers[c.scope]:g}/layer)"
        scope = f"{c.scope}.* ×{rep.layers.get(c.scope, 0)}" if c.scope else "—"
        sources = ", ".join(relative(s, c.scope) for s in c.sources) or "—"
        t.add_row(c.pass_, c.kind, scope, sources, c.where(), fmt_bytes(c.bytes), count, fmt_bytes(c.total))
    return t


def totals_lines(rep: Report) -> list[str]:
    """The totals as plain sentences (shared by the text and HTML reports)."""
    lines = [f"parameter bytes per rank: {fmt_bytes(rep.param_local)} of {fmt_bytes(rep.param_full)} unsharded "
             f"({rep.param_local / max(rep.param_full, 1):.1%}; ideal 1/{rep.world_size} = {1 / rep.world_size:.1%})"]
    for pass_ in ("forward", "backward"):
        counts = rep.counts(pass_)
        if counts or pass_ == "forward":
            kinds = ", ".join(f"{n} {k}" for k, n in sorted(counts.items())) or "none"
            lines.append(f"collective bytes per step, {pass_}: {fmt_bytes(rep.bytes_per_step(pass_))} ({kinds})")
    if rep.n_layers:
        calls, nbytes = rep.per_layer("forward")
        bcalls, bbytes = rep.per_layer("backward")
        lines.append(f"per layer ({rep.main_scope}.* ×{rep.n_layers}): forward {calls:g} collectives "
                     f"({fmt_bytes(nbytes)}), backward {bcalls:g} ({fmt_bytes(bbytes)})")
    mega = rep.megatron
    if mega is None:
        lines.append("Megatron reference (2 all-reduces of b·s·h per layer forward): n/a "
                     "(no repeated layers or no all-reduced activation to read h from; pass hidden=)")
    else:
        ours = rep.in_layers("forward")
        ref = "Megatron-SP reference: (2 reduce-scatters + 2 all-gathers)" if rep.sequence_parallel \
            else "Megatron reference: 2"
        lines.append(f"{ref} × {rep.n_layers} layers × b·s {rep.tokens} × h {rep.hidden} × "
                     f"{rep.act_itemsize} B = {fmt_bytes(mega)}; tpfx in layers: {fmt_bytes(ours)} "
                     f"({ours / mega:.2f}× the reference)")
        outside = [c for c in rep.collectives if c.pass_ == "forward" and c.scope != rep.main_scope]
        if outside:
            parts = ", ".join(f"{c.kind} of {', '.join(c.sources) or c.where()} {fmt_bytes(c.total)}" for c in outside)
            lines.append(f"outside the layers (forward): {parts}")
    return lines


def render_text(plan: PlanView, width: int | None = 140, hidden: int | None = None) -> str:
    """``print(plan)``: parameter groups, collectives per layer and step, totals, fallbacks."""
    rep = build_report(plan, hidden)
    buf = io.StringIO()
    console = Console(file=buf, width=width or 140, force_terminal=False, color_system=None)
    console.print(_param_table(rep))
    console.print(_collective_table(rep))
    console.print("[bold]totals[/bold]")
    for line in totals_lines(rep):
        console.print("  " + line, highlight=False, markup=False)
    console.print("[bold]replicated regions and fallbacks[/bold]")
    for what, why in rep.replicated or [("none", "every matrix is split")]:
        console.print(f"  - {what}: {why}", highlight=False, markup=False)
    for note in rep.notes:
        console.print(f"  note: {note}", highlight=False, markup=False)
    return buf.getvalue()


summary = render_text

__all__ = ["Report", "ParamGroup", "CollectiveGroup", "analyze", "build_report", "render_text", "summary",
           "fold", "layer_of", "module_of", "describe_placement", "fmt_bytes"]
