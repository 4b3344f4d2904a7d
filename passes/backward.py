"""The collectives of the backward pass, decided once: emission adds them, the plan's report counts them.

A gradient needs a collective where the forward moved a value into sharded compute without one that
carries it back (``collectives.py`` pairs every forward collective with its backward already):

    f             a replicated value enters sharded compute: its gradient is a partial sum  -> all_reduce
                  (Megatron's f: ``reduce_grad`` before the consumer)
    gather_seq    a sequence-split value is all-gathered into sharded compute              -> reduce_scatter
    split_even    a replicated value joins a sequence split by its own chunk               -> all_gather
    scattered     a reduce-scatter (Megatron-SP, after a row-split matmul)                 -> all_gather
    scatter       a replicated value taken as this rank's chunk of a split (after a gather) -> all_reduce
    replicas      a weight split into fewer chunks than ranks (whole KV heads): its
                  gradient is summed over the ranks holding the same chunk                  -> all_reduce

``operand_grad`` is the per-operand decision emission takes; ``backward_collectives`` lists the same
decisions over the whole graph, one record per value and kind.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx as fx

from . import collectives as C
from .kinds import OPS, STEPS
from .placements import Partial, Replicate, Shard, is_seq_split
from .propagate import Propagation, moves, tensor_inputs
from .redistribute import plan_redistribution


def is_float(node: fx.Node) -> bool:
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and val.dtype.is_floating_point


def sharded_compute(prop: Propagation, node: fx.Node) -> bool:
    """``node`` computes on splits: its output is split or partial, or its strategy wants a split operand."""
    out = prop.placements.get(node)
    outs = out if isinstance(out, tuple) else (out,)
    if any(isinstance(o, (Shard, Partial)) for o in outs):
        return True
    strat = prop.strategies.get(node)
    return strat is not None and any(not isinstance(w, Replicate) for w in strat.want.values())


def operand_grad(prop: Propagation, node: fx.Node, a: fx.Node, sharded: bool) -> str | None:
    """``"gather_seq"`` or ``"f"`` where operand ``a`` of ``node`` needs one (``sharded``: ``node`` computes
    on splits), else None."""
    want, have = prop.wants.get((node, a)), prop.placements.get(a, Replicate())
    if (sharded or node in prop.partial_grad) and isinstance(want, Replicate) and is_seq_split(have) \
            and is_float(a):  # Megatron-SP: all-gather in, reduce-scatter of the gradient back
        return "gather_seq"
    if sharded and isinstance(want or have, Replicate) and is_float(a) and a not in prop.partial_grad:
        return "f"
    return None


@dataclass(frozen=True)
class GradCollective:
    kind: str  # all_reduce | reduce_scatter | all_gather
    via: str  # f | gather_seq | split_even | scattered | scatter | replicas (the module docstring's table)
    value: fx.Node  # whose gradient it moves
    consumers: tuple[fx.Node, ...] = ()  # the sharded ops the value enters (none for scattered / replicas)


_KIND: dict[str, str] = {via: str(OPS[op].backward) for via, op in
                         {"f": C.reduce_grad, "gather_seq": C.gather_seq, "split_even": C.split_even}.items()}


def _entering(prop: Propagation, node: fx.Node, a: fx.Node) -> tuple[fx.Node, str] | None:
    """(value, via) for operand ``a`` entering sharded ``node``; a reshape of a gathered sequence split is
    looked through to the split it was gathered from (the reduce-scatter sits at that gather)."""
    if a in prop.partial_grad:
        inner = tensor_inputs(a)[0]
        return (inner, "gather_seq") if operand_grad(prop, a, inner, False) == "gather_seq" else None
    via = operand_grad(prop, node, a, True)
    if via is not None:
        return a, via
    want = prop.wants.get((node, a))
    steps = plan_redistribution(prop.placements.get(a), want, prop.world) if want is not None else []
    return (a, "split_even") if any(s.kind == "split_even" for s in steps) and is_float(a) else None


_STEP_BACKWARD: dict[str, tuple[str, str]] = {name: (str(k.backward), k.paired) for name, k in STEPS.items()
                                              if k.paired is not None}


def _step_pairs(prop: Propagation) -> list[GradCollective]:
    """Redistribution steps whose backward communicates: a reduce-scattered value's gradient is all-gathered
    back (after a node, or on the way to a consumer that wants the sequence split), a scattered one's is summed
    over the ranks. One per value and target, as the plan counts the forward collectives."""
    found = {(n, "*"): GradCollective("all_gather", "scattered", n) for n in prop.scattered_after}
    for m in moves(prop):
        for step in m.steps:
            if step.kind in _STEP_BACKWARD:
                kind, via = _STEP_BACKWARD[step.kind]
                found.setdefault((m.producer, str(m.want)), GradCollective(kind, via, m.producer, (m.consumer,)))
    return sorted(found.values(), key=lambda c: (c.value.name, c.consumers[0].name if c.consumers else "*"))


def backward_collectives(gm: fx.GraphModule, prop: Propagation) -> list[GradCollective]:
    """Every backward collective of ``prop``'s graph: values entering sharded compute (in the order of their
    first consumer), gradients of reduce-scattered values, weights' replica groups."""
    entering: dict[tuple[fx.Node, str], list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function" or not sharded_compute(prop, node):
            continue
        for a in tensor_inputs(node):
            hit = _entering(prop, node, a)
            if hit is not None:
                entering.setdefault(hit, []).append(node)
    out = [GradCollective(_KIND[via], via, v, tuple(users)) for (v, via), users in entering.items()]
    out += _step_pairs(prop)
    for node, fqn in prop.param_nodes.items():
        _, pl = prop.decided.get(fqn, ("replicate", Replicate()))
        if isinstance(pl, Shard) and min(pl.seg_groups) < prop.world:
            out.append(GradCollective("all_reduce", "replicas", node))
    return out
