"""``plan.explain(fqn)``: why a weight got its placement, told as the chain of ops that forced it.

The idea: a weight's style is decided by the rule of its first consumer (a matmul or an embedding), and
that rule only looks at how the consumer's activation arrives. So the explanation walks

* backwards from the consumer through its activation input, over values that are not replicated, to the
  weights whose split made the activation sharded (``down_proj`` <- ``mul`` <- ``silu`` <- ``gate_proj``,
  ``up_proj``): a sharded contraction dim forces a row split and a partial sum;
* forwards from the consumer's output, over values that are not replicated, to what resolves it: the
  collective emission inserts (``all_reduce`` after the residual ``add``) or a later weight that consumes
  the shard locally (``q_proj`` -> attention -> ``o_proj``).

It adds the reasons the planner recorded for the weight (``plan.fallbacks``): group counts lowered for
GQA, segments for fused projections, replication. A plan loaded from JSON has no graph: its explanation
is the style, the placement and those recorded reasons.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from tpfx.report import (
    describe_placement,
    edge_collective,
    fmt_bytes,
    module_of,
    op_name,
    sharded_weights,
    tensor_inputs,
    weight_module,
)

if TYPE_CHECKING:
    import torch.fx as fx

    from tpfx.passes import Propagation
    from tpfx.report import PlanView

MAX_PATH = 8


@dataclass(frozen=True)
class Resolution:
    """What a weight's output meets downstream: a collective or a local consumer."""

    kind: str  # all_reduce | all_gather | local
    after: str  # graph node the collective follows (or the consuming node for "local")
    where: str  # "op @ module"
    bytes: int = 0
    weights: tuple[str, ...] = ()  # for "local": the weights that consume it
    path: tuple[str, ...] = ()  # ops between the weight's consumer and here


@dataclass
class Explanation:
    """The answer of ``plan.explain``; ``str()`` gives the sentences."""

    fqn: str
    style: str
    placement: str
    shape: tuple[int, ...]
    local_shape: tuple[int, ...]
    consumer: str = ""  # "linear @ model.layers.0.mlp.down_proj"
    received: str = ""  # placement of the activation the consumer received
    output: str = ""  # placement of the consumer's output
    upstream: list[str] = field(default_factory=list)  # modules of the weights that sharded the input
    upstream_path: list[str] = field(default_factory=list)  # ops between them and the consumer
    resolutions: list[Resolution] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    steps: list[str] = field(default_factory=list)
    derived: bool = True  # False for a plan loaded from JSON (no graph)

    @property
    def collectives(self) -> list[Resolution]:
        return [r for r in self.resolutions if r.kind != "local"]

    def __str__(self) -> str:
        head = (f"{self.fqn}: {self.style} {self.placement}, shape {list(self.shape)} -> "
                f"{list(self.local_shape)} per rank")
        lines = [head] + [f"  {i}. {s}" for i, s in enumerate(self.steps, 1)]
        lines += [f"  planner: {r}" for r in self.reasons]
        return "\n".join(lines)

    def _repr_pretty_(self, p: Any, cycle: bool) -> None:  # IPython
        p.text(str(self))


# ----------------------------------------------------------------------------------------- lookup


def resolve_name(plan: PlanView, name: str) -> str:
    """A parameter FQN, or a module name meaning its ``weight``; KeyError with suggestions otherwise."""
    if name in plan.placements:
        return name
    for cand in (name + ".weight", name.removesuffix(".") + ".weight"):
        if cand in plan.placements:
            return cand
    close = difflib.get_close_matches(name, list(plan.placements), n=3)
    raise KeyError(f"tpfx: no parameter {name!r} in the plan" + (f"; did you mean {close}?" if close else ""))


def _where(node: fx.Node) -> str:
    module = module_of(node)
    return f"{op_name(node)} @ {module}" if module else op_name(node)


def _squash(ops: list[str]) -> list[str]:
    out: list[str] = []
    for o in ops:
        if o != "getitem" and (not out or out[-1] != o):
            out.append(o)
    return out if len(out) <= MAX_PATH else out[:MAX_PATH // 2] + ["…"] + out[-MAX_PATH // 2:]


def _consumers(plan: PlanView, fqn: str) -> tuple[list[fx.Node], set[fx.Node]]:
    """(ops where the weight meets activations, in graph order; the weight and its reshapes). Ops that only
    reshape the weight itself (``transpose`` of a fused expert tensor) are looked through."""
    assert plan.derivation is not None
    prop = plan.derivation.prop
    order = {n: i for i, n in enumerate(plan.derivation.gm.graph.nodes)}
    chain = {node for node, f in prop.param_nodes.items() if f == fqn}
    uses: set[fx.Node] = set()
    frontier = list(chain)
    while frontier:
        for user in frontier.pop().users:
            if user.op != "call_function" or user in chain:
                continue
            if any(a not in chain for a in tensor_inputs(user)) or not user.users or len(chain) > 16:
                uses.add(user)
            else:
                chain.add(user)
                frontier.append(user)
    return sorted(uses, key=order.__getitem__), chain


# ----------------------------------------------------------------------------------------- walks


def _nonrep(prop: Propagation, node: fx.Node) -> bool:
    from tpfx.passes import Replicate

    pl = prop.placements.get(node)
    outs = pl if isinstance(pl, tuple) else (pl,)
    return node not in prop.reduced_after and any(p is not None and not isinstance(p, Replicate) for p in outs)


def walk_up(prop: Propagation, start: fx.Node, order: dict[fx.Node, int]) -> tuple[list[str], list[str]]:
    """(modules of the split weights whose shard reaches ``start``, ops in between in graph order)."""
    origins: list[str] = []
    seen: set[fx.Node] = set()
    path: list[fx.Node] = []
    stack = [start]
    while stack:
        node = stack.pop()
        if node in seen or not _nonrep(prop, node) or node.op != "call_function":
            continue
        seen.add(node)
        mine = sharded_weights(prop, node)
        if mine:
            origins += [weight_module(f) for f in mine if weight_module(f) not in origins]
            continue
        path.append(node)
        stack += [a for a in node.all_input_nodes if a.op == "call_function"]
    path.sort(key=order.__getitem__)
    return sorted(origins), _squash([op_name(n) for n in path])


def walk_down(plan: PlanView, start: fx.Node) -> list[Resolution]:
    """Follow ``start``'s non-replicated output to the collectives or weights that resolve it."""
    assert plan.derivation is not None
    prop = plan.derivation.prop
    sizes = {(c.kind, c.after): c.bytes for c in plan.collectives}
    found: dict[tuple[str, str], Resolution] = {}
    frontier: list[tuple[fx.Node, tuple[str, ...]]] = [(start, ())]
    seen: set[fx.Node] = {start}
    while frontier:
        node, path = frontier.pop(0)
        if node in prop.reduced_after:
            key = ("all_reduce", node.name)
            found.setdefault(key, Resolution("all_reduce", node.name, _where(node), sizes.get(key, 0), (), path))
            continue
        for user in node.users:
            kind = edge_collective(prop, node, user)
            if kind is not None:
                key = (kind, node.name)
                found.setdefault(key, Resolution(kind, node.name, _where(node), sizes.get(key, 0), (), path))
                continue
            if user in seen or user.op != "call_function":
                continue
            seen.add(user)
            weights = tuple(weight_module(f) for f in sharded_weights(prop, user))
            if weights:
                key = ("local", user.name)
                found.setdefault(key, Resolution("local", user.name, _where(user), 0, weights, path))
            elif _nonrep(prop, user) or user in prop.reduced_after:
                frontier.append((user, path + (op_name(user),)))
    return list(found.values())


# ----------------------------------------------------------------------------------------- story


def _decision(ex: Explanation, plan: PlanView, fqn: str) -> str:
    p = plan.placements[fqn]
    dim = f"dim {p.dim}" if p.dim is not None else ""
    if p.style == "colwise":
        return (f"{ex.consumer} receives its activation replicated ({ex.received}), so the weight is split on "
                f"its output features ({dim}) with no communication -> output {ex.output}")
    if p.style == "rowwise":
        src = f" from {', '.join(ex.upstream)}" if ex.upstream else ""
        via = f" through {' -> '.join(ex.upstream_path)}" if ex.upstream_path else ""
        return (f"{ex.consumer} receives its input sharded on the contracted dim ({ex.received}){src}{via}; "
                f"so the weight is split on its input features ({dim}) and each rank computes a partial sum "
                f"-> output {ex.output}")
    if p.style == "vocab":
        return (f"{ex.consumer} looks up replicated token ids: the vocabulary rows are split ({dim}); each rank "
                f"looks up the ids it owns and zeros the rest -> output {ex.output}")
    if p.style == "shard":
        return (f"{ex.consumer} combines it with a value placed {ex.received}, so it is split the same way "
                f"({dim}) -> output {ex.output}")
    if len(p.shape) < 2:
        return f"a vector applied by {ex.consumer} to replicated values: kept whole (replicating it is free)"
    return f"{ex.consumer} runs replicated (input {ex.received}, output {ex.output}): kept whole"


def _layout_notes(plan: PlanView, fqn: str) -> list[str]:
    p = plan.placements[fqn]
    notes = []
    if p.dim is not None and p.groups < plan.world_size:
        notes.append(f"split into {p.groups} chunks, each replicated on {plan.world_size // p.groups} ranks "
                     f"(fewer units than ranks, e.g. GQA key/value heads)")
    if p.unit != 1:
        pl = p.as_placement()
        first = [pl.local_segs(r, plan.world_size)[0] // p.unit for r in range(plan.world_size)]  # type: ignore[union-attr]
        each = "" if len(p.segs) == 1 else f" in the first of its {len(p.segs)} parts"
        notes.append(f"uneven: dim {p.dim} in whole parts of {p.unit} (heads), {'/'.join(map(str, first))} per rank"
                     f"{each} ({p.segs[0] // p.unit} not divisible by {p.groups})")
    if p.sgroups is not None:
        notes.append(f"fused: dim {p.dim} is {len(p.segs)} segments "
                     + ", ".join(f"{n} in {g} chunk{'s' if g > 1 else ''}" for n, g in zip(p.segs, p.sgroups))
                     + "; a segment in fewer chunks than ranks (one key/value head) is held whole, its gradient "
                       "rows summed over the ranks that share it")
    elif len(p.segs) > 1:
        notes.append(f"fused: dim {p.dim} is {len(p.segs)} segments {'+'.join(map(str, p.segs))}, each split "
                     f"separately so every rank holds its slice of each part")
    return notes


def _resolution_text(r: Resolution) -> str:
    via = f" through {' -> '.join(_squash(list(r.path)))}" if r.path else ""
    if r.kind == "local":
        return f"its output flows{via} into {', '.join(r.weights)} ({r.where}), which consumes the shard locally"
    return f"its output flows{via} to an {r.kind} after {r.where} ({fmt_bytes(r.bytes)} for the example shapes)"


def _stored_resolutions(plan: PlanView, fqn: str) -> list[Resolution]:
    """Forward collectives the stored report context attributes to this weight's module."""
    ctx = plan.context or {}
    module = weight_module(fqn)
    out = []
    for c in ctx.get("collectives", []):
        if c["pass"] == "forward" and module in c["sources"]:
            where = f"{c['op']} @ {c['module']}" if c["module"] else c["op"]
            out.append(Resolution(c["kind"], c["after"], where, c["bytes"]))
    return out


def explain(plan: PlanView, name: str) -> Explanation:
    """Why ``name`` (a parameter FQN or a module name) has its placement in ``plan``."""
    fqn = resolve_name(plan, name)
    p = plan.placements[fqn]
    ex = Explanation(fqn, p.style, p.placement, p.shape, p.local_shape())
    ex.reasons = [f["reason"] for f in plan.fallbacks if f.get("param") == fqn]
    if plan.derivation is None:
        ex.derived = False
        ex.steps = ["plan loaded without its graph (e.g. from JSON): the chain of ops is not available; "
                    "re-plan the model with tpfx.plan to see it"] + _layout_notes(plan, fqn)
        ex.resolutions = _stored_resolutions(plan, fqn)
        ex.steps += [_resolution_text(r) for r in ex.resolutions]
        return ex
    _trace(plan, fqn, ex)
    return ex


def _trace(plan: PlanView, fqn: str, ex: Explanation) -> None:
    assert plan.derivation is not None
    prop = plan.derivation.prop
    consumers, chain = _consumers(plan, fqn)
    if not consumers:
        ex.steps = ["no op consumes it in the captured graph"]
        return
    first = consumers[0]
    order = {n: i for i, n in enumerate(plan.derivation.gm.graph.nodes)}
    ex.consumer = _where(first)
    strat = prop.strategies.get(first)
    acts = [(i, a) for i, a in enumerate(tensor_inputs(first)) if a not in chain and a not in prop.param_nodes]
    received = [strat.want.get(i, prop.placements.get(a)) if strat else prop.placements.get(a) for i, a in acts]
    ex.received = ", ".join(describe_placement(pl, a.meta["val"].ndim) for (_, a), pl in zip(acts, received)) or "-"
    out_val = first.meta.get("val")
    ex.output = describe_placement(prop.placements.get(first), getattr(out_val, "ndim", None))
    for _, a in acts:
        ups, path = walk_up(prop, a, order)
        ex.upstream += [u for u in ups if u not in ex.upstream]
        ex.upstream_path += [o for o in path if o not in ex.upstream_path]
    ex.steps.append(_decision(ex, plan, fqn))
    ex.steps += _layout_notes(plan, fqn)
    for c in consumers:
        if _nonrep(prop, c) or c in prop.reduced_after:
            ex.resolutions += [r for r in walk_down(plan, c) if r not in ex.resolutions]
    ex.steps += [_resolution_text(r) for r in ex.resolutions]
    if len(consumers) > 1:
        ex.steps.append("also used by " + ", ".join(_where(c) for c in consumers[1:4])
                        + (" …" if len(consumers) > 4 else "") + " (decided by the first use)")
    node_notes = {f["node"]: f["reason"] for f in plan.fallbacks if "node" in f}
    for c in consumers:
        if c.name in node_notes:
            ex.reasons.append(f"gather kept at {_where(c)}: {node_notes[c.name]}")


__all__ = ["Explanation", "Resolution", "explain", "resolve_name", "walk_up", "walk_down"]
