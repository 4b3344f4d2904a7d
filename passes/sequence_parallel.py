"""Sequence parallelism (Megatron-SP): the replicated stretch of the residual stream split by sequence.

Plain tensor parallelism leaves the residual stream replicated between the sharded blocks: every rank runs the
same norms (and dropouts) over the whole sequence and holds the whole ``(B, S, H)`` activation, and each
block's partial sum is all-reduced. Megatron-SP splits that stretch along the sequence instead: the partial
sum is reduce-scattered (each rank keeps ``S/t`` positions), norms and residual adds run on the sequence
chunk, and the chunk is all-gathered where the next column-split matmul needs the whole sequence. Same
bytes per layer (a reduce-scatter plus an all-gather is one all-reduce), activations between layers 1/t.

The pass rewrites a finished propagation; weights keep their placements (so plans, digests and checkpoints
are the same with and without it). One walk in graph order:

1. A node joins the split *region* when its placement in the TP plan is replicated (or partial, with an
   operand in the region), its value is floating point with the sequence length at dim 1 (batch-first, the
   sequence of the first input), its rule is registered sequence-local (``rules.SEQ_LOCAL``: pointwise,
   norms, reductions over other dims), and that rule, fed ``seq_shard(1)`` for operands in the region and for
   partial operands (reduce-scattered on the way in), returns its output on ``seq_shard(1)`` with no rewrite
   and no weight decision. A partial node off the region keeps summing partials: they are reduced once.
   A reshape between the gather and sharded compute (``view`` before ``addmm``) keeps its gradient partial
   (``partial_grad``): the gather's backward reduce-scatters it, as it would at the matmul itself.
2. A value all-reduced right after its producer (``reduced_after``) that does not join through its operands is
   reduce-scattered there instead (``scattered_after``) and seeds the region.
3. Consumers outside the region want the value replicated: emission all-gathers it, with Megatron's autograd
   (``gather_seq`` into sharded compute: the gradient is reduce-scattered back; ``gather_even`` elsewhere).
4. A seed none of whose consumers joined is put back to its all-reduce (it would only move the same bytes
   in two collectives).

The sequence length must be divisible by t at run time; the collectives raise otherwise (on every rank,
at the same op). Nothing in ``propagate.py`` changes: this is a pass over its result.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from . import rules
from .backward import sharded_compute
from .placements import Partial, Replicate, seq_shard
from .propagate import Propagation, _out_shapes, _shape, tensor_inputs, trained
from .rules import OpCtx, Operand, Strategy, lookup

SEQ_DIM = 1


def sequence_length(gm: fx.GraphModule) -> Any:
    """The sequence length (sympy expr or int): dim 1 of the first tensor input with two or more dims."""
    for node in gm.graph.nodes:
        val = node.meta.get("val") if node.op == "placeholder" else None
        if isinstance(val, torch.Tensor) and val.ndim >= 2:
            return _shape(node)[SEQ_DIM]
    return None


def _on_sequence(node: fx.Node, seq: Any) -> bool:
    val = node.meta.get("val")
    return isinstance(val, torch.Tensor) and val.dtype.is_floating_point and val.ndim > SEQ_DIM \
        and _shape(node)[SEQ_DIM] == seq


def _seq_out(out: Any, world: int) -> bool:
    outs = out if isinstance(out, tuple) else (out,)
    return all(o == seq_shard(SEQ_DIM, world) for o in outs)


def _try_join(node: fx.Node, prop: Propagation, region: set[fx.Node], seq: Any,
              trained: set[fx.Node]) -> Strategy | None:
    """The strategy of ``node`` on the sequence split, or None where it stays as planned (step 1)."""
    cur = prop.placements.get(node)
    if node.op != "call_function" or not isinstance(cur, (Replicate, Partial)) or not _on_sequence(node, seq):
        return None
    rule = lookup(node.target)
    if rule not in rules.SEQ_LOCAL:
        return None
    inputs = tensor_inputs(node)
    split = seq_shard(SEQ_DIM, prop.world)
    # partial sums are reduce-scattered on the way in only where the plan reduces them anyway (a replicated
    # node) or where the node meets the region: a partial node keeps summing partials (one reduction, later)
    if not isinstance(cur, Replicate) and not any(a in region for a in inputs):
        return None
    operands, joined = [], False
    for a in inputs:
        have = prop.placements.get(a, Replicate())
        if a in region or (isinstance(have, Partial) and _on_sequence(a, seq)):
            have, joined = split, True
        elif not isinstance(have, Replicate):
            return None  # a shard or partial sum this pass does not reason about
        val = a.meta["val"]
        # a replicated operand joins by its own chunk (split_even: its gradient is all-gathered back, whole on
        # every rank), so the rules' guard against column splits meeting a trained replicated value is moot
        operands.append(Operand(a, _shape(a), val.dtype, have, None, a in trained and not isinstance(have, Replicate)))
    if not joined:
        return None
    result = rule(OpCtx(node, operands, prop.world, _out_shapes(node)))  # type: ignore[misc]
    if not isinstance(result, Strategy) or result.rewrite is not None or result.decide \
            or not _seq_out(result.out, prop.world):
        return None
    return result


def _join(node: fx.Node, strat: Strategy, prop: Propagation) -> None:
    for i, a in enumerate(tensor_inputs(node)):
        want = strat.want.get(i, Replicate())
        if want == prop.placements.get(a, Replicate()):
            prop.wants.pop((node, a), None)
        else:
            prop.wants[(node, a)] = want
    prop.strategies[node] = strat
    prop.placements[node] = strat.out
    prop.reduced_after.discard(node)


aten = torch.ops.aten
RESHAPES = frozenset({aten.view, aten.reshape, aten._unsafe_view, aten.flatten, aten.transpose, aten.t,
                      aten.unsqueeze})


def _reshapes_into_split(u: fx.Node, prop: Propagation) -> bool:
    """``u`` only reshapes the gathered value for sharded compute (GPT-2's Conv1D flattens ``(B, S, H)`` to
    ``(B*S, H)`` before ``addmm``): its gradient may stay partial, to be reduce-scattered at the gather."""
    return getattr(u.target, "overloadpacket", None) in RESHAPES and len(tensor_inputs(u)) == 1 and bool(u.users) \
        and all(sharded_compute(prop, w) and w.op != "output" for w in u.users)


def _planned_want(prop: Propagation, consumer: fx.Node, a: fx.Node) -> Any:
    """What ``consumer``'s strategy takes ``a`` as (replicated where it has none: the graph's output)."""
    strat = prop.strategies.get(consumer)
    if strat is None or consumer.op == "output":
        return Replicate()
    i = tensor_inputs(consumer).index(a)
    return strat.want.get(i, Replicate())


def sequence_parallel(gm: fx.GraphModule, prop: Propagation) -> Propagation:
    """Split the replicated stretches of the residual stream by sequence (in place; returns ``prop``)."""
    seq = sequence_length(gm)
    if prop.world == 1 or seq is None:
        return prop
    carry = trained(gm, prop.param_nodes)
    split = seq_shard(SEQ_DIM, prop.world)
    region: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.target is operator.getitem and node.args[0] in region:
            pl = prop.placements[node.args[0]]
            prop.placements[node] = pl[node.args[1]] if isinstance(pl, tuple) else pl
            region.add(node)
            continue
        strat = _try_join(node, prop, region, seq, carry)
        if strat is not None:
            _join(node, strat, prop)
            region.add(node)
        elif node in prop.reduced_after and _on_sequence(node, seq):  # step 2: a seed
            prop.reduced_after.discard(node)
            prop.scattered_after.add(node)
            prop.placements[node] = split
            region.add(node)
    for node in list(prop.scattered_after):  # step 4: a seed nobody downstream took
        if not any(u in region for u in node.users):
            prop.scattered_after.discard(node)
            prop.reduced_after.add(node)
            prop.placements[node] = Replicate()
            region.discard(node)
    for node in region:  # step 3: consumers outside the region get the value as they were planned to
        for u in node.users:
            if u in region or u.target is operator.getitem:
                continue
            if lookup(u.target) is rules.metadata_only:  # reads dtype/device only: takes the chunk as it is
                prop.wants.pop((u, node), None)
                continue
            prop.wants[(u, node)] = _planned_want(prop, u, node)
            if _reshapes_into_split(u, prop):
                prop.partial_grad.add(u)
    prop.sequence_parallel = True
    return prop
