"""Sharding propagation: every value gets a placement, every weight a style.

The idea (Megatron's plan, derived instead of written down):

1. Walk the ATen graph in topological order. Inputs are ``Replicate``. A weight is *free* until
   its first consumer's rule decides it: a matmul whose activation is replicated splits the weight
   on its output letter (``colwise``, output ``Shard(-1)``); a matmul whose contracted dim arrives
   sharded splits the weight on that dim (``rowwise``, output ``Partial``); an embedding splits on
   vocab (``vocab``, output ``Partial``). Everything between (pointwise ops, head reshapes,
   attention) carries the shard by its rule, so q/k/v -> attention -> o_proj and gate/up -> act ->
   down need no communication, and ``Partial`` is reduced where it meets a non-linear op or the
   replicated residual: 2 all-reduces per layer in the forward.
2. A rule that cannot carry a shard (a reshape whose head count is not divisible, a norm over the
   sharded dim, an op with no rule) raises a *demand* on the weights the shard came from
   (``origins``): lower their group count to what works (GQA: KV heads replicated within groups),
   refine their segments (fused q/k/v and gate/up projections), or replicate them.
3. Re-run until no demand is left. Each round only ever lowers a weight's group count, refines
   its segments or replicates it, so the fixpoint is reached (``rounds_bound`` is only a safety net); pinned
   weights (overrides, a saved plan) are never demoted: a gather is inserted instead. A fallback
   downstream of another one in the same round may be transient, so its demand is held back,
   and applied only if it is still there when nothing else changes. In a deep model the residual stream
   puts every layer downstream of the one before, so fallbacks that chain settle a layer per few rounds.
4. Megatron undoes each column split with exactly one row split. A column split whose shard reaches
   two or more row-split weights has split a residual stream (Gemma 3n's AltUp projections before the
   first layer), and every layer below is planned inverted (q/k/v rowwise, o_proj colwise). Row splits of one
   activation count once (a layer and its adapter's A, or two adapter B's after one A, undo one split). The
   first such weights (in graph order) are tried replicated, and the trial is kept if it moves fewer
   collective bytes, paying for them with at most the same fraction of parameter bytes per rank:
       accept  iff  comm' < comm  and  params' / params - 1  <=  1 - comm' / comm
5. Greedy step 1 pairs every column split with the next row split. In a low-rank chain
   (``x -> A (h x r) -> norm -> B (r x n*d) -> heads``, multi-head latent attention) that pairs A
   with B, and B's partial sum is all-reduced only to be split into heads again. For such a
   *reduce-then-split*, A is tried replicated (then B splits by columns straight into the heads),
   accepted by the rule of step 4 (the low-rank A is small). The same holds for an embedding whose
   vocab-split partial sum is reduced and split again (T5's relative position bias, one column per
   head): the trial splits it on its columns instead. A trial that would replicate a full-width
   projection to save a sliver of communication (Doge's per-head dt all-reduce of b*s*n values) is
   refused: the memory and compute are not worth it. A partial sum reduced straight into a split (``P -> S``:
   a low-rank adapter ``x -> A -> B`` beside a column-split layer, added to its output) is the same chain in
   one move: its low-rank column-split A is tried replicated, and B splits by columns as the layer does.
6. A partial sum all-reduced only to enter a matmul with a replicated weight, whose product is then added to
   another partial sum (an adapter beside a row-split layer: ``x -> A (row-split) -> B``), is tried carried
   through the matmul as a partial sum: it joins the layer's own all-reduce (the weight's gradient is then a
   partial sum, reduced in the backward by Megatron's ``f``). Kept by the rule of step 4.

Collectives are where placements meet: ``P -> R`` all-reduce, ``S -> R`` all-gather (only at
outputs in a Megatron-shaped model), ``R -> S`` a local slice. Their autograd is Megatron's
(see ``collectives.py``).
"""

from __future__ import annotations

import itertools
import math
import operator
import os
import warnings
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.fx as fx

from .placements import (
    P,
    Partial,
    Placement,
    R,
    Replicate,
    Shard,
    group_at,
    is_whole,
    whole_mark,
)
from .redistribute import Step, forward_collective, plan_redistribution
from .rules import Fallback, FreeParam, OpCtx, Operand, Strategy, lookup
from .shapes import hint, shape_of

aten = torch.ops.aten

ALL_STYLES = frozenset({"colwise", "rowwise", "vocab", "shard", "replicate"})


@dataclass
class Seed:
    """What the planner allows a weight to become."""

    styles: frozenset[str]
    groups: int
    segs: tuple[int, ...] | None = None
    sgroups: tuple[int, ...] | None = None  # per segment (with segs), where a part is held whole
    unit: int = 1  # uneven chunks in whole multiples of it (heads not divisible by the group count)
    pinned: bool = False
    reasons: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Demand:
    """A fallback's request on the weights whose shard reached it: ``kind`` "groups" (split into fewer chunks:
    ``value`` the count), "segs" (split by parts: ``value`` (segs, sgroups, within)) or "replicate"."""

    fqns: frozenset[str]
    kind: str
    value: Any
    reason: str


@dataclass
class Propagation:
    world: int
    placements: dict[fx.Node, Any]
    wants: dict[tuple[fx.Node, fx.Node], Placement]  # (consumer, producer) -> placement wanted
    strategies: dict[fx.Node, Strategy]
    decided: dict[str, tuple[str, Placement]]  # fqn -> (style, placement)
    param_nodes: dict[fx.Node, str]
    fallbacks: list[tuple[str, str]]  # (node name, reason) of gathers kept
    unknown_ops: set[str]
    demands: list[Demand]
    rounds: int = 0
    # demands held back because the fallback sits downstream of another one this round (maybe transient)
    held: list[Demand] = field(default_factory=list)
    reduced_after: set[fx.Node] = field(default_factory=set)  # Partial outputs all-reduced at the producer
    origins: dict[fx.Node, frozenset[str]] = field(default_factory=dict)  # shard/partial value -> its weights
    # sequence parallelism (``sequence_parallel.py``): partial outputs reduce-scattered at the producer
    scattered_after: set[fx.Node] = field(default_factory=set)
    partial_grad: set[fx.Node] = field(default_factory=set)  # reshapes of a gathered value: no f after them
    sequence_parallel: bool = False


@dataclass(frozen=True)
class Move:
    """One redistribution of a propagation: ``producer``'s value moved to ``want``, built once and shared by
    every consumer that wants it (``consumer`` is the first)."""

    producer: fx.Node
    want: Placement
    consumer: fx.Node
    steps: tuple[Step, ...]


def moves(prop: Propagation) -> list[Move]:
    """Every distinct (producer, wanted placement) of ``prop.wants``, in first-want order, with its steps
    (``plan_redistribution``): what the plan counts in the forward and ``backward`` pairs in the backward."""
    found: dict[tuple[fx.Node, str], Move] = {}
    for (consumer, producer), want in prop.wants.items():
        key = (producer, str(want))
        if key not in found:
            steps = tuple(plan_redistribution(prop.placements.get(producer), want, prop.world))
            found[key] = Move(producer, want, consumer, steps)
    return list(found.values())


def param_fqns(gm: fx.GraphModule) -> dict[fx.Node, str]:
    """get_attr node -> canonical parameter FQN (tied weights map to the first name, as in the model)."""
    canon: dict[int, str] = {}
    for name, p in gm.named_parameters(remove_duplicate=False):
        canon.setdefault(id(p), name)
    alias = {name: canon[id(p)] for name, p in gm.named_parameters(remove_duplicate=False)}
    return {n: alias[n.target] for n in gm.graph.nodes if n.op == "get_attr" and n.target in alias}  # type: ignore[index]


def tensor_inputs(node: fx.Node) -> list[fx.Node]:
    """The node's tensor-valued inputs, in argument order (``all_input_nodes`` is in that order)."""
    cached = node.meta.get("tpfx_inputs")
    if cached is not None and len(cached) <= len(node.all_input_nodes):
        return cached
    out = [a for a in node.all_input_nodes if isinstance(a.meta.get("val"), torch.Tensor)]
    node.meta["tpfx_inputs"] = out
    return out


def _shape(node: fx.Node) -> Any:
    """Sympy shape of a node's value, computed once."""
    if "tpfx_shape" not in node.meta:
        node.meta["tpfx_shape"] = shape_of(node.meta.get("val"))
    return node.meta["tpfx_shape"]


def _out_shapes(node: fx.Node) -> Any:
    val = node.meta.get("val")
    if isinstance(val, (list, tuple)):
        return [shape_of(v) for v in val]
    return _shape(node)


def _multi(node: fx.Node) -> int | None:
    val = node.meta.get("val")
    return len(val) if isinstance(val, (list, tuple)) else None


_IDENTITY_LAYOUT = {aten.to, aten._to_copy, aten.alias, aten.detach, aten.contiguous, aten.clone,
                    aten.lift_fresh_copy}


def _layout_map(node: fx.Node, ndim: int) -> tuple[int, ...] | None:
    """For a pure layout op on one tensor: output dim -> input dim (None if not such an op)."""
    packet = getattr(node.target, "overloadpacket", None)
    args: Any = node.args
    if packet is aten.transpose:
        a, b = (d + ndim if d < 0 else d for d in args[1:3])
        m = list(range(ndim))
        m[a], m[b] = m[b], m[a]
        return tuple(m)
    if packet in (aten.t, aten.numpy_T):
        return tuple(reversed(range(ndim)))
    if packet is aten.permute:
        return tuple(d + ndim if d < 0 else d for d in args[1])
    if packet in _IDENTITY_LAYOUT:
        val, src = node.meta.get("val"), node.args[0]
        if isinstance(val, torch.Tensor) and isinstance(src, fx.Node) and src.meta.get("val") is not None \
                and tuple(val.shape) == tuple(src.meta["val"].shape):
            return tuple(range(ndim))
    return None


def trained(gm: fx.GraphModule, params: dict[fx.Node, str], floating: bool = False) -> set[fx.Node]:
    """Nodes whose value depends on a parameter (they carry gradients); ``floating``: only those with a
    floating-point output (an integer result carries none)."""
    out: set[fx.Node] = set(params)
    for node in gm.graph.nodes:
        if node.op == "call_function" and any(a in out for a in node.all_input_nodes):
            val = node.meta.get("val")
            vals = val if isinstance(val, (list, tuple)) else (val,)
            if not floating or any(isinstance(v, torch.Tensor) and v.dtype.is_floating_point for v in vals):
                out.add(node)
    return out


def _freeze(v: Any, operands: dict[fx.Node, int]) -> Any:
    """A hashable form of an argument: operands by position, other nodes as markers."""
    if isinstance(v, fx.Node):
        return ("<operand>", operands[v]) if v in operands else ("<node>",)
    if isinstance(v, (list, tuple)):
        return tuple(_freeze(x, operands) for x in v)
    if isinstance(v, dict):
        return tuple(sorted((k, _freeze(x, operands)) for k, x in v.items()))
    if isinstance(v, (int, float, bool, str, type(None), torch.dtype, torch.device, torch.layout,
                      torch.memory_format)):
        return v
    return ("<obj>", id(v))


def _rule_key(node: fx.Node, operands: list[Operand], out_shapes: Any) -> Any:
    """Everything a rule may look at. Identical keys (the same op in every repeated layer) share one
    solution: a repeated decoder block is solved once, not once per layer."""
    ops = tuple((o.shape, o.dtype, o.placement, o.trained,
                 None if o.free is None else (o.free.styles, o.free.groups, o.free.segs, o.free.sgroups,
                                              o.free.dim_map, o.free.uneven, o.free.unit)) for o in operands)
    val = node.meta.get("val")
    fixed = node.meta.get("tpfx_rule_key")  # the parts no round changes, once per node (while its args stand)
    if fixed is None or fixed[0] is not node.args or fixed[1] is not node.kwargs or fixed[2] is not val:
        index = {o.node: i for i, o in enumerate(operands)}
        dtype = val.dtype if isinstance(val, torch.Tensor) else None
        outs = tuple(out_shapes) if isinstance(out_shapes, list) else out_shapes
        fixed = (node.args, node.kwargs, val, (_freeze(node.args, index), _freeze(dict(node.kwargs), index), outs, dtype))
        node.meta["tpfx_rule_key"] = fixed
    return (node.target, ops, fixed[3])


RuleCache = dict[Any, Any]  # rule key -> the rule's result (rules are pure: the key decides it)


def run_once(gm: fx.GraphModule, world: int, seeds: dict[str, Seed],
             reduce_now: frozenset[str] = frozenset(), cache: RuleCache | None = None,
             fed: dict[str, Placement] | None = None, carry: frozenset[str] = frozenset()) -> Propagation:
    """One propagation round in graph order (see ``_Round``). ``carry``: matmuls that take a partial sum
    through a replicated weight (step 6)."""
    return _Round(gm, world, seeds, reduce_now, cache, fed, carry).run()


class _Round:
    """One round: every node gets a placement from its rule, given its operands' placements; the first
    consumer of a free weight decides its layout; a rule's fallback records a demand on the weights that
    produced the shard (the next round honours it)."""

    def __init__(self, gm: fx.GraphModule, world: int, seeds: dict[str, Seed], reduce_now: frozenset[str],
                 cache: RuleCache | None, fed: dict[str, Placement] | None, carry: frozenset[str]) -> None:
        self.gm, self.world, self.seeds, self.reduce_now, self.cache, self.fed = gm, world, seeds, reduce_now, cache, fed
        self.carry = carry
        self.params = param_fqns(gm)
        self.prop = Propagation(world, {}, {}, {}, {}, self.params, [], set(), [])
        self.trained = trained(gm, self.params)
        self.origins: dict[fx.Node, frozenset[str]] = {}
        self.tainted: set[fx.Node] = set()  # downstream of a fallback in this round: its state may be transient
        self.tainted_seeds: set[str] = set()
        # weights seen through layout ops (transpose, numpy_T, casts) stay free until a real consumer decides:
        # node -> (fqn, output dim -> parameter dim, the get_attr node)
        self.derived: dict[fx.Node, tuple[str, tuple[int, ...], fx.Node]] = {}
        self.chains: dict[str, list[fx.Node]] = {}

    def run(self) -> Propagation:
        for node in self.gm.graph.nodes:
            if self._leaf(node) or self._layout(node):
                continue
            operands = self._operands(node)
            if is_guards(node):  # export's input checks: they read the inputs as the caller passes them
                self.prop.strategies[node] = Strategy({i: o.placement for i, o in enumerate(operands)}, R)
                self.prop.placements[node] = R
                continue
            replicated_out: Any = tuple([R] * n) if (n := _multi(node)) else R
            result = self._strategy(node, operands, replicated_out)
            if isinstance(result, Fallback):
                result = self._fall_back(node, operands, result, replicated_out)
            self._apply(node, operands, result)
        for fqn in list(self.chains):  # layout ops of weights no rule consumed: replicated
            self.prop.decided.setdefault(fqn, ("replicate", R))
            self.materialize(fqn)
        self.prop.origins = self.origins
        return self.prop

    def materialize(self, fqn: str) -> None:
        """Placements of the layout ops between a just-decided weight and its consumers."""
        prop = self.prop
        pl = prop.decided[fqn][1]
        for c in self.chains.pop(fqn, []):
            _, m, root = self.derived[c]
            src: Any = c.args[0]
            have = prop.placements.get(src, pl) if src is not root else pl
            mine = pl.moved(m.index(pl.dim)) if isinstance(pl, Shard) else R
            prop.placements[c] = mine
            prop.strategies[c] = Strategy({0: have}, mine)
            if isinstance(pl, Shard):
                self.origins[c] = frozenset({fqn})

    def _leaf(self, node: fx.Node) -> bool:
        """Placeholders, weights, the output and ``getitem`` of a multi-output node (True: handled)."""
        prop = self.prop
        if node.op == "placeholder":  # replicated unless the caller feeds this rank's slice (a split KV cache)
            prop.placements[node] = (self.fed or {}).get(node.name, R)
            return True
        if node.op == "get_attr":
            fqn = self.params.get(node)
            prop.placements[node] = prop.decided[fqn][1] if fqn in prop.decided else R
            if fqn in prop.decided:
                self.origins[node] = frozenset({fqn})  # type: ignore[arg-type]
            return True
        if node.op == "output":
            for a in tensor_inputs(node):
                prop.wants[(node, a)] = R
            return True
        if any(a in self.tainted for a in node.all_input_nodes):
            self.tainted.add(node)
        if node.target is operator.getitem:
            src, i = node.args
            pl = prop.placements.get(src, R)  # type: ignore[arg-type]
            prop.placements[node] = pl[i] if isinstance(pl, tuple) else pl  # type: ignore[index]
            self.origins[node] = self.origins.get(src, frozenset())  # type: ignore[arg-type]
            return True
        return False

    def _layout(self, node: fx.Node) -> bool:
        """A layout op of a still-free weight: it joins the weight's chain (True) until a consumer decides."""
        inputs = tensor_inputs(node)
        if node.op != "call_function" or len(inputs) != 1 or len(node.all_input_nodes) != 1:
            return False
        a = inputs[0]
        base = (self.params[a], tuple(range(a.meta["val"].ndim)), a) if a in self.params else self.derived.get(a)
        if base is None or base[0] in self.prop.decided:
            return False
        m = _layout_map(node, a.meta["val"].ndim)
        if m is None:
            return False
        self.derived[node] = (base[0], tuple(base[1][i] for i in m), base[2])
        self.chains.setdefault(base[0], []).append(node)
        return True

    def _operands(self, node: fx.Node) -> list[Operand]:
        operands = []
        for a in tensor_inputs(node):
            fqn = self.params.get(a)
            dim_map = None
            if fqn is None and a in self.derived:
                fqn, dim_map, _ = self.derived[a]
            free = None
            if fqn is not None and fqn not in self.prop.decided:
                s = self.seeds[fqn]
                free = FreeParam(fqn, s.styles, s.groups, s.segs, s.sgroups, dim_map, unit=s.unit)
            elif fqn is not None and fqn in self.chains:
                self.materialize(fqn)
            val = a.meta["val"]
            operands.append(Operand(a, _shape(a), val.dtype, self.prop.placements.get(a, R), free,  # type: ignore[arg-type]
                                    a in self.trained))
        return operands

    def _strategy(self, node: fx.Node, operands: list[Operand], replicated_out: Any) -> Strategy | Fallback:
        """The node's rule on these operands (cached by operand layouts), or the replicated default."""
        rule = lookup(node.target) if node.op == "call_function" else None
        busy = any(not isinstance(o.placement, Replicate) for o in operands)
        has_free = any(o.free is not None for o in operands)
        if not busy and (rule is None or not has_free):
            return Strategy({i: R for i in range(len(operands))}, replicated_out)
        if busy and not has_free and all(isinstance(o.placement, Replicate) or is_whole(o.placement)
                                         for o in operands):
            return _on_whole(node, operands)
        if node.name in self.carry and (carried := _carry_partial(operands)) is not None:
            return carried
        if rule is None:
            name = str(node.target)
            self.prop.unknown_ops.add(name)
            return Fallback(f"no sharding rule for {name}")
        out_shapes, cache = _out_shapes(node), self.cache
        key = _rule_key(node, operands, out_shapes) if cache is not None else None
        if key is not None and cache is not None and key in cache:
            return cache[key]
        result = rule(OpCtx(node, operands, self.world, out_shapes))
        if key is not None and cache is not None:
            cache[key] = result
        return result

    def _fall_back(self, node: fx.Node, operands: list[Operand], result: Fallback, replicated_out: Any) -> Strategy:
        """Replicate here, and ask the weights whose shard arrived for a layout this op can take."""
        prop, seeds = self.prop, self.seeds
        culprits = [result.operand] if result.operand is not None else [
            i for i, o in enumerate(operands) if isinstance(o.placement, Shard)]
        src = frozenset().union(*[self.origins.get(operands[i].node, frozenset()) for i in culprits])
        kind = "groups" if result.groups else "segs" if result.segs else "unit" if result.unit else "replicate"
        value = result.groups or ((result.segs, result.sgroups, result.within) if result.segs else
                                  (result.unit, result.within) if result.unit else None)
        movable = frozenset(f for f in src if not seeds[f].pinned and f not in self.tainted_seeds)
        if movable and (node not in self.tainted or result.groups or result.segs or result.unit):
            prop.demands.append(Demand(movable, kind, value, f"{node.name}: {result.reason}"))
        elif unpinned := frozenset(f for f in src if not seeds[f].pinned):
            prop.held.append(Demand(unpinned, kind, value, f"{node.name}: {result.reason}"))
        if any(isinstance(o.placement, Shard) for o in operands):
            prop.fallbacks.append((node.name, result.reason))
        self.tainted.add(node)
        return Strategy({i: R for i in range(len(operands))}, replicated_out)

    def _decide(self, node: fx.Node, o: Operand, result: Strategy, i: int) -> None:
        """The first consumer of free weight ``o`` decides its layout (and that of its layout ops)."""
        assert o.free is not None
        prop = self.prop
        style, pl = result.decide.get(i, ("replicate", R))
        if isinstance(pl, Replicate):
            style = "replicate"
        param_pl: Placement = pl
        if o.free.dim_map is not None and isinstance(pl, Shard):
            d = o.free.dim_map[pl.dim]
            assert d is not None  # a split dim of a layout op maps to a parameter dim
            param_pl = pl.moved(d)
        prop.decided[o.free.fqn] = (style, param_pl)
        if node in self.tainted:
            self.tainted_seeds.add(o.free.fqn)
        if o.node in self.derived:
            root = self.derived[o.node][2]
            prop.placements[root] = param_pl
            if isinstance(param_pl, Shard):
                self.origins[root] = frozenset({o.free.fqn})
            self.materialize(o.free.fqn)
        prop.placements[o.node] = pl
        o.placement = pl
        if not isinstance(pl, Replicate):
            self.origins[o.node] = frozenset({o.free.fqn})

    def _apply(self, node: fx.Node, operands: list[Operand], result: Strategy) -> None:
        """Record the strategy: decisions, redistributions wanted, the output's placement and origins."""
        prop = self.prop
        prop.strategies[node] = result
        out_origins: set[str] = set()
        for i, o in enumerate(operands):
            want = result.want.get(i, R)
            if o.free is not None:
                self._decide(node, o, result, i)
            if want != o.placement:
                prop.wants[(node, o.node)] = want
            # a shard or partial sum flows into the output; after a redistribution (reduce, gather) its
            # history resets — only a local refinement of the same layout keeps it
            kept = want == o.placement or (isinstance(want, Shard) and isinstance(o.placement, Shard)
                                           and (want.dim, want.segs) == (o.placement.dim, o.placement.segs))
            if not isinstance(want, Replicate) and kept:
                out_origins |= self.origins.get(o.node, frozenset())
        prop.placements[node] = result.out
        if node.name in self.reduce_now and isinstance(result.out, Partial):
            prop.placements[node] = R  # reduced once, right after the producer, for every consumer
            prop.reduced_after.add(node)
        outs = prop.placements[node] if isinstance(prop.placements[node], tuple) else (prop.placements[node],)
        self.origins[node] = frozenset(out_origins) if any(not isinstance(o, Replicate) for o in outs) else frozenset()


def is_guards(node: fx.Node) -> bool:
    """The ``_guards_fn`` call that ``ExportedProgram.module()`` puts before the body (input shape checks)."""
    return node.op == "call_module" and node.target == "_guards_fn"


def _on_whole(node: fx.Node, operands: list[Operand]) -> Strategy:
    """Any op whose split operands are all held whole (every rank has all of it) runs locally on them as they
    are; its outputs are held whole too (their gradients partial over the ranks, like the inputs'), or, with no
    static dim to carry the mark, replicated after the inputs are made ``Replicate``."""
    val = node.meta.get("val")
    vals = val if isinstance(val, (list, tuple)) else [val]
    prefer = next(o.placement.dim for o in operands if isinstance(o.placement, Shard) and is_whole(o.placement))
    outs = [whole_mark(tuple(int(s) if isinstance(s, int) else None for s in v.shape), prefer)
            if isinstance(v, torch.Tensor) else R for v in vals]
    if any(m is None for m in outs):
        return Strategy({i: R for i in range(len(operands))}, tuple([R] * len(vals)) if len(vals) > 1 else R)
    out: Any = tuple(outs) if isinstance(val, (list, tuple)) else outs[0]
    return Strategy({i: o.placement for i, o in enumerate(operands)}, out)


def propagate(gm: fx.GraphModule, world: int, pins: dict[str, tuple[str, Placement | None]] | None = None,
              max_rounds: int | None = None, fed: dict[str, Placement] | None = None
              ) -> tuple[Propagation, dict[str, Seed]]:
    """Run propagation to a fixpoint. ``pins``: fqn -> (style, placement or None). ``fed``: placeholder name
    -> the placement in which the caller passes it (default ``Replicate``): a decode step's KV cache arrives as
    this rank's heads, laid out as the prefill graph left it. ``max_rounds``: default ``rounds_bound`` (step 3)."""
    seeds: dict[str, Seed] = {}
    for fqn in sorted(set(param_fqns(gm).values())):  # one rank: nothing to split, the model as it is
        seeds[fqn] = Seed(ALL_STYLES, world) if world > 1 else Seed(frozenset({"replicate"}), 1, reasons=["world_size 1"])
    for fqn, (style, pl) in (pins or {}).items():
        if fqn in seeds:
            s = seeds[fqn]
            s.styles, s.pinned = frozenset({style}), True
            if isinstance(pl, Shard):
                s.groups, s.segs, s.sgroups, s.unit = pl.groups, pl.segs, pl.sgroups, pl.unit
    cache: RuleCache | None = None if os.environ.get("TPFX_NO_RULE_CACHE") else {}
    max_rounds = max_rounds or rounds_bound(len(seeds))
    prop = _fixpoint(gm, world, seeds, cache, max_rounds, fed)
    for step in (_stream_splits, _split_partials, _reduced_then_split):  # steps 4 and 5 of the module docstring
        found = step(prop, seeds)
        if not found:
            continue
        trial_seeds = {f: replace(s, reasons=list(s.reasons)) for f, s in seeds.items()}
        for f, why in found.items():
            s = trial_seeds[f]
            s.styles = s.styles - {"vocab"} if why == "vocab" else frozenset({"replicate"})
            s.reasons.append(_TRIAL_REASONS[why])
        trial = _fixpoint(gm, world, trial_seeds, cache, max_rounds, fed)
        local = step is _split_partials  # an adapter's layout: it must not cost a split elsewhere
        if _better(_cost(prop), _cost(trial)) and not (local and _unsplit(prop, trial, set(found))):
            prop, seeds = trial, trial_seeds
    if joins := _partial_joins(prop):  # step 6
        trial_seeds = {f: replace(s, reasons=list(s.reasons)) for f, s in seeds.items()}
        trial = _fixpoint(gm, world, trial_seeds, cache, max_rounds, fed, joins)
        carried = {w for n in gm.graph.nodes if n.name in joins for a in tensor_inputs(n)
                   if (w := _weight_of(prop, a)) is not None}  # the weights carried through, held whole
        if _better(_cost(prop), _cost(trial)) and not _unsplit(prop, trial, carried):
            prop, seeds = trial, trial_seeds
    _keep_unused_pins(gm, prop, pins or {})
    _check_pins(prop, seeds)
    _check_layouts(gm, prop)
    if prop.unknown_ops:
        warnings.warn(f"tpfx: no sharding rule for {sorted(prop.unknown_ops)}; the region around them "
                      f"is replicated", stacklevel=3)
    return prop, seeds


def rounds_bound(weights: int) -> int:
    """Propagation's round limit for a graph with this many weights: 50, and 4 more per weight (a weight's
    seed changes a few times at most: its segments, its group count, replicated)."""
    return 50 + 4 * weights


def _fixpoint(gm: fx.GraphModule, world: int, seeds: dict[str, Seed], cache: RuleCache | None,
              max_rounds: int, fed: dict[str, Placement] | None = None, carry: frozenset[str] = frozenset()
              ) -> Propagation:
    reduce_now: set[str] = set()
    unknown: set[str] = set()
    for rounds in range(1, max_rounds + 1):
        prop = run_once(gm, world, seeds, frozenset(reduce_now), cache, fed, carry)
        unknown |= prop.unknown_ops
        prop.unknown_ops = set(unknown)
        prop.rounds = rounds
        changed = False
        refine = [d for d in prop.demands if d.kind != "replicate"]
        for d in refine or prop.demands:
            for f in sorted(d.fqns):
                changed |= _apply(seeds[f], prop, f, d.kind, d.value, d.reason)
        if not changed:
            # a Partial value that one consumer reduces and another carries on as Partial would be
            # reduced twice further down: reduce it once, at its producer, for everyone
            reduced = {p.name for (c, p), w in prop.wants.items()
                       if isinstance(prop.placements.get(p), Partial) and isinstance(w, Replicate)}
            carried = {a.name for n, st in prop.strategies.items() for i, a in enumerate(tensor_inputs(n))
                       if isinstance(prop.placements.get(a), Partial) and isinstance(st.want.get(i), Partial)}
            if (reduced & carried) - reduce_now:
                reduce_now |= reduced & carried
                continue
            # at the fixpoint a held-back demand is no longer transient: apply it rather than keep a gather
            held = False
            for d in prop.held:
                for f in sorted(d.fqns):
                    held |= _apply(seeds[f], prop, f, d.kind, d.value, d.reason)
            if held:
                continue
            return prop
    raise RuntimeError(f"tpfx: sharding propagation did not converge in {max_rounds} rounds")


def _reduced_then_split(prop: Propagation, seeds: dict[str, Seed], depth: int = 12) -> dict[str, str]:
    """Weights behind a partial sum that is all-reduced and then split again (a replicated value refined to
    a shard, reached from the reduction through replicated ops only): the column-split partner of the row
    split that made it, or the vocab-split embedding that made it. fqn -> its style."""
    out: dict[str, str] = {}
    for (_, producer), want in prop.wants.items():
        if not isinstance(want, Shard) or not _replicated(prop.placements.get(producer)):
            continue
        frontier, seen = [producer], {producer}
        for _ in range(depth):
            nxt = []
            for x in frontier:
                reduced = x in prop.reduced_after
                for y in x.all_input_nodes:
                    if reduced or (isinstance(prop.placements.get(y), Partial)
                                   and isinstance(prop.wants.get((x, y)), Replicate)):
                        src = x if reduced else y
                        out |= {f: style for f in prop.origins.get(src, frozenset())
                                if (style := prop.decided.get(f, ("",))[0]) in ("colwise", "vocab")
                                and not seeds[f].pinned}
                    elif y not in seen and y.op == "call_function" and _replicated(prop.placements.get(y)):
                        seen.add(y)
                        nxt.append(y)
            frontier = nxt
    return out


def _split_partials(prop: Propagation, seeds: dict[str, Seed]) -> dict[str, str]:
    """Low-rank column-split weights behind a partial sum that is reduced straight into a split (``P -> S``: an
    adapter ``x -> A -> B`` added to a column-split layer's output, A split by columns, B by rows): replicated,
    A lets B split by columns as the layer does (step 5, the reduction and the split in one move)."""
    shapes = {fqn: tuple(node.meta["val"].shape) for node, fqn in prop.param_nodes.items()}
    out: dict[str, str] = {}
    for (_, producer), want in prop.wants.items():
        if isinstance(want, Shard) and isinstance(prop.placements.get(producer), Partial):
            out |= {f: "colwise" for f in prop.origins.get(producer, frozenset())
                    if prop.decided.get(f, ("",))[0] == "colwise" and not seeds[f].pinned and _narrowing(
                        shapes[f], prop.decided[f][1])}
    return out


def _narrowing(shape: tuple[int, ...], pl: Placement) -> bool:
    """A 2-D weight split on its smaller dim: a low-rank down-projection (r < in), not a layer of its own."""
    return isinstance(pl, Shard) and len(shape) == 2 and shape[pl.dim] < shape[1 - pl.dim]


_MATMULS = {aten.linear, aten.mm, aten.matmul, aten.bmm}
_LINEAR_PATH = {aten.mul, aten.div, aten.to, aten._to_copy, aten.view, aten.reshape, aten._unsafe_view, aten.clone,
                aten.alias, aten.contiguous, aten.transpose, aten.permute, aten.t}


def _packet(node: fx.Node) -> Any:
    return getattr(node.target, "overloadpacket", None)


def _joins_partial(prop: Propagation, node: fx.Node, depth: int = 8) -> bool:
    """``node``'s value reaches, through linear ops only, an addition whose other operand is a partial sum."""
    x = node
    for _ in range(depth):
        if len(x.users) != 1:
            return False
        u = next(iter(x.users))
        if _packet(u) in (aten.add, aten.sub):
            return any(isinstance(prop.placements.get(a), Partial) for a in tensor_inputs(u) if a is not x)
        if _packet(u) not in _LINEAR_PATH:
            return False
        x = u
    return False


def _partial_joins(prop: Propagation) -> frozenset[str]:
    """Matmuls whose partial-sum input is all-reduced only for their replicated weight, their product then
    added to another partial sum (a low-rank adapter beside a row-split layer: ``x -> A (row-split) -> B``
    next to the layer's own partial output). Carried through as a partial sum, it joins the layer's
    all-reduce; the replicated weight's gradient is then a partial sum too (Megatron's ``f``)."""
    out = set()
    for (consumer, producer), want in prop.wants.items():
        ins = tensor_inputs(consumer)
        if _packet(consumer) in _MATMULS and isinstance(want, Replicate) and len(ins) == 2 \
                and isinstance(prop.placements.get(producer), Partial) \
                and all(_replicated(prop.placements.get(a)) or _weight_of(prop, a) for a in ins if a is not producer) \
                and _joins_partial(prop, consumer):
            out.add(consumer.name)
    return frozenset(out)


def _weight_of(prop: Propagation, node: fx.Node) -> str | None:
    """The parameter ``node`` is (through transposes), if any."""
    for _ in range(3):
        if node in prop.param_nodes:
            return prop.param_nodes[node]
        if node.target not in _VIEWISH or not isinstance(node.args[0], fx.Node):
            return None
        node = node.args[0]
    return None


def _carry_partial(operands: list[Operand]) -> Strategy | None:
    """A matmul of one partial sum and one replicated operand: the product is a partial sum (no collective)."""
    partial = [i for i, o in enumerate(operands) if isinstance(o.placement, Partial)]
    if len(operands) != 2 or len(partial) != 1 or not isinstance(operands[1 - partial[0]].placement, Replicate):
        return None
    other = 1 - partial[0]
    free = operands[other].free
    if free is not None and "replicate" not in free.styles:
        return None  # a weight pinned to a split
    decide: dict[int, tuple[str, Placement]] = {other: ("replicate", R)} if free is not None else {}
    return Strategy({partial[0]: P, other: R}, P, decide)


_TRIAL_REASONS = {
    "stream": "replicated: its column split reached several row-split weights (a split residual stream); "
              "replicated, each layer pairs its own splits",
    "colwise": "replicated: its row-split partner's sum was all-reduced and split again (low-rank chain); "
               "replicated, the chain splits by columns",
    "vocab": "not vocab-split: its partial sum was all-reduced and split again; split on the embedding dim "
             "instead",
}


def _unsplit(prop: Propagation, trial: Propagation, allowed: set[str]) -> list[str]:
    """Weights ``prop`` splits and ``trial`` replicates, beyond ``allowed`` (the ones the trial set out to
    replicate): an adapter's trial that would undo a layer's split elsewhere (GPT-2's fused ``c_attn``, whose
    adapter cannot follow its parts) is not taken."""
    return [f for f, (style, _) in trial.decided.items() if style == "replicate" and f not in allowed
            and prop.decided.get(f, ("replicate",))[0] != "replicate"]


def _better(base: tuple[int, int], trial: tuple[int, int]) -> bool:
    """Keep a trial plan: fewer collective bytes, and parameter bytes per rank grown by no larger a fraction than
    the fraction of collective bytes saved (steps 4 and 5 of the module docstring)."""
    (comm, params), (comm2, params2) = base, trial
    return comm2 < comm and params2 / params - 1 <= max(0.0, 1 - comm2 / comm)


_VIEWISH = {aten.t.default, aten.numpy_T.default, aten.transpose.int, aten.permute.default}


def _matmul_of(w: fx.Node) -> list[fx.Node]:
    """The ops that consume weight ``w``, through a transpose (``t``, ``numpy_T``, ...)."""
    out: list[fx.Node] = []
    frontier = [w]
    for _ in range(3):
        nxt: list[fx.Node] = []
        for x in frontier:
            for u in x.users:
                (nxt if u.target in _VIEWISH else out).append(u)
        frontier = nxt
    return out


def _stream_splits(prop: Propagation, seeds: dict[str, Seed]) -> dict[str, str]:
    """The first column-split weights (in graph order) whose shard reaches the contracted dim of two or more
    row-split weights through two or more activations.

    In Megatron's plan each column split is undone by exactly one row split (q/k/v -> o_proj, gate/up ->
    down_proj). A column split feeding several row splits has split a residual stream (Gemma 3n's AltUp
    projections, applied once before the first layer), and every layer below it is then planned inverted;
    only the splits before the first such row split are the cause."""
    nodes: Any = next(iter(prop.param_nodes)).graph.nodes if prop.param_nodes else []
    pos = {n: i for i, n in enumerate(nodes)}
    fed: dict[str, set[str]] = {}  # column split -> the row-split weights it reaches
    through: dict[str, set[fx.Node]] = {}  # column split -> the activations it reaches them through
    first_op: dict[str, int] = {}
    row_op: dict[str, int] = {}
    for w, fqn in prop.param_nodes.items():
        style = prop.decided.get(fqn, ("",))[0]
        ops = _matmul_of(w)
        if not ops:
            continue
        if style == "colwise":
            first_op[fqn] = min(first_op.get(fqn, len(pos)), *(pos[u] for u in ops))
        if style != "rowwise":
            continue
        row_op[fqn] = min(row_op.get(fqn, len(pos)), *(pos[u] for u in ops))
        for u in ops:
            for a in tensor_inputs(u):
                for c in prop.origins.get(a, frozenset()):
                    if prop.decided.get(c, ("",))[0] == "colwise" and not seeds[c].pinned:
                        fed.setdefault(c, set()).add(fqn)
                        through.setdefault(c, set()).add(a)
    # several row splits of one activation (a layer and its adapter's A, two adapter B's of one A) undo one split
    many = {c: rows for c, rows in fed.items() if len(rows) >= 2 and len(through[c]) >= 2}
    if not many:
        return {}
    first_row = min(row_op[r] for rows in many.values() for r in rows)
    return {c: "stream" for c in many if first_op.get(c, len(pos)) < first_row}


def _replicated(pl: Any) -> bool:
    return isinstance(pl, Replicate) or (isinstance(pl, tuple) and all(isinstance(q, Replicate) for q in pl))


def _cost(prop: Propagation) -> tuple[int, int]:
    """(bytes of forward all-reduces and gathers, parameter bytes per rank) of a propagation."""
    comm = sum(nbytes(p) for (c, p), w in prop.wants.items()
               if (isinstance(w, Replicate) or isinstance(prop.placements.get(p), Partial))
               and forward_collective(prop.placements.get(p), w, prop.world))
    comm += sum(nbytes(n) for n in prop.reduced_after)
    params = 0
    for node, fqn in prop.param_nodes.items():
        pl = prop.decided.get(fqn, ("replicate", R))[1]
        if isinstance(pl, Shard):
            params += nbytes(node) * sum(s // g for s, g in zip(pl.segs, pl.seg_groups)) // sum(pl.segs)
        else:
            params += nbytes(node)
    return comm, params


def _check_layouts(gm: fx.GraphModule, prop: Propagation) -> None:
    """Every split must fit its value's static size: a rule that got one wrong fails here, at plan time,
    never mid-forward on some rank."""
    for node in gm.graph.nodes:
        pl, val = prop.placements.get(node), node.meta.get("val")
        for q, v in zip(pl if isinstance(pl, tuple) else (pl,), val if isinstance(val, (tuple, list)) else (val,),
                        strict=False):
            if isinstance(q, Shard) and isinstance(v, torch.Tensor) and q.dim < v.ndim \
                    and isinstance(v.shape[q.dim], int) and v.shape[q.dim] != sum(q.segs):
                raise RuntimeError(f"tpfx internal error: {node.name} ({node.target}) was given {q} for shape "
                                   f"{tuple(v.shape)}; please report it with the model")


def _keep_unused_pins(gm: fx.GraphModule, prop: Propagation, pins: dict[str, tuple[str, Placement | None]]) -> None:
    """A pinned weight that no node of this graph uses keeps its pinned placement: any layout is right for a
    value nobody reads, and the graph must not block the plan (``inputs_embeds=`` leaves the embedding unused)."""
    fqns = param_fqns(gm)
    used = {fqn for node, fqn in fqns.items() if node.users}
    for fqn, (style, pl) in pins.items():
        if fqn not in used and pl is not None and fqn in fqns.values():
            prop.decided[fqn] = (style, pl)


def _check_pins(prop: Propagation, seeds: dict[str, Seed]) -> None:
    """A pinned style that the graph cannot honour correctly is an error, never a silent change."""
    bad = []
    for fqn, seed in seeds.items():
        if not seed.pinned:
            continue
        want = next(iter(seed.styles))
        got = prop.decided.get(fqn, ("replicate", R))[0]
        if got != want:
            why = [r for n, r in prop.fallbacks] or ["no consumer of this weight can use that split"]
            bad.append(f"{fqn}: pinned {want!r} but the graph allows only {got!r} ({why[0]})")
    if bad:
        raise ValueError("tpfx: overrides cannot be honoured:\n  " + "\n  ".join(bad))


def _apply(s: Seed, prop: Propagation, fqn: str, kind: str, value: Any, reason: str) -> bool:
    """Apply one demand to a weight's seed; True if it changed."""
    if kind == "groups":
        if value >= s.groups:
            return False  # already satisfied by an earlier demand this round
        s.groups = value
        s.reasons.append(f"groups {value}: {reason}")
        return True
    if kind == "unit" and (unit := _unit_of(prop, fqn, *value)) is not None:
        new = math.lcm(s.unit, unit)
        if new == s.unit:
            return False
        s.unit = new
        s.reasons.append(f"uneven whole parts of {new}: {reason}")
        return True
    if kind == "segs" and (fit := _merged(prop, fqn, s, *value)) is not None:
        segs, gs = fit
        groups, sgroups = (min(s.groups, gs[0]), None) if len(set(gs)) == 1 else (s.groups, gs)
        if (segs, groups, sgroups) == (s.segs, s.groups, s.sgroups):
            return False
        s.segs, s.groups, s.sgroups = segs, groups, sgroups
        s.reasons.append(f"segments {segs}" + (f" in {sgroups} groups" if sgroups else "") + f": {reason}")
        return True
    if s.styles == frozenset({"replicate"}):
        return False
    s.styles = frozenset({"replicate"})
    s.reasons.append(f"replicated: {reason}")
    return True


def _merged(prop: Propagation, fqn: str, seed: Seed, segs: tuple[int, ...], sgroups: tuple[int, ...] | None,
            within: tuple[int, ...] | None = None) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """The segments and per-segment group counts of weight ``fqn`` once a demand's are merged in (every cut of
    both; each part split no finer than either allows), on the weight's split dim; None if they do not fit it.

    A demand is in the units of the op that raised it: counted in heads when it came from after a
    ``[.., n*d] -> [.., n, d]`` view, so it is scaled to the weight's rows -- only when the operand's own
    segments (``within``), scaled alike, are the weight's this round: a cut in a part taken out of the
    projection (the rope slice of MLA's ``kv_a_proj``) does not describe the whole weight. Merging, not
    replacing: the slices that take q, k and v out of one fused projection each raise their own cuts in the
    same round."""
    style, pl = prop.decided.get(fqn, ("", R))
    if not isinstance(pl, Shard):
        return None
    node = next(n for n, f in prop.param_nodes.items() if f == fqn)
    size = int(node.meta["val"].shape[pl.dim]) if "val" in node.meta else None
    if size is None or size % sum(segs):
        return None
    k = size // sum(segs)
    if tuple(w * k for w in (within or (sum(segs),))) != pl.segs:
        return None
    new = tuple(s * k for s in segs), sgroups or (pl.groups,) * len(segs)
    old_segs = seed.segs or (size,)
    old = old_segs, seed.sgroups or (seed.groups,) * len(old_segs)
    cuts = sorted({e for parts in (new[0], old[0]) for e in itertools.accumulate(parts)})
    merged, start = [], 0
    for e in cuts:
        g = math.gcd(group_at(*new, start), group_at(*old, start))
        if pl.groups % g or ((e - start) % g and (e - start) < 2 * g):  # an uneven part: at least 2 rows a rank
            return None
        merged.append((e - start, g))
        start = e
    return tuple(s for s, _ in merged), tuple(g for _, g in merged)


def _unit_of(prop: Propagation, fqn: str, unit: int, within: tuple[int, ...]) -> int | None:
    """A demand's unit (in the units of the op that raised it, whose operand had segments ``within``) on weight
    ``fqn``'s split dim, or None where the weight's split is not that operand's (scaled alike)."""
    style, pl = prop.decided.get(fqn, ("", R))
    if not isinstance(pl, Shard):
        return None
    if len(within) == 1 and len(pl.segs) > 1 and within[0] in pl.segs:  # one part of a fused projection (q of
        return unit if all(s % unit == 0 for s in pl.segs) else None  # q|k|v): every part in whole heads alike
    if sum(pl.segs) % sum(within):
        return None
    k = sum(pl.segs) // sum(within)
    if tuple(w * k for w in within) != pl.segs:
        return None
    return unit * k


def group_of(p: Shard, rank: int, world: int) -> tuple[int, ...]:
    """The ranks holding the same chunk as ``rank`` (its replica group)."""
    per = world // p.groups
    j = p.chunk(rank, world)
    return tuple(range(j * per, (j + 1) * per))


def nbytes(node: fx.Node) -> int:
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        n = 1
        for s in val.shape:
            n *= hint(s, 1)
        return n * val.element_size()
    return 0


__all__ = ["propagate", "Propagation", "Seed", "group_of", "nbytes", "math", "P", "Partial"]
