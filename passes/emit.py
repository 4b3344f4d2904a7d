"""Per-rank emission: one GraphModule per rank that holds only that rank's slices.

For each node of the planned graph, in order: parameters are replaced by their local slices;
operands whose placement differs from what the node's strategy wants are redistributed
(``collectives.py``); a replicated floating-point operand entering sharded compute goes through
``reduce_grad`` (Megatron's f) so its gradient is summed; the strategy's rewrite makes constant
arguments local (``view(x, [B, S, 8, 16]) -> view(x, [B, S, 4, 16])``); a vocab-split embedding
becomes a masked local lookup. Weights split into fewer chunks than ranks (GQA KV heads
replicated within groups) get their gradients summed over their replica group.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten, tree_unflatten

from . import collectives as C
from .backward import operand_grad, sharded_compute
from .checkpoint import checkpoint_regions
from .kinds import OPS, STEPS, listed
from .placements import Placement, Replicate, Shard, is_seq_split, shard_tensor
from .propagate import Propagation, group_of, is_guards
from .redistribute import Step, plan_redistribution
from .rules import WORLD, late_of

aten = torch.ops.aten
GroupNamer = Callable[[tuple[int, ...]], str]


def _fetch(gm: torch.nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _step(call: Callable[..., fx.Node], step: Step, x: fx.Node, rank: int, world: int, wg: str,
          src: fx.Node) -> fx.Node:
    """The graph node of one redistribution step (``passes/redistribute.py``) applied to ``x``: its kind's op
    and arguments (``kinds.STEPS``)."""
    kind = STEPS[step.kind]
    assert kind.args is not None, step.kind
    return call(kind.op, x, *kind.args(step, rank, world, wg), src=src)


def local_param(full: torch.Tensor, placement: Placement, rank: int, world: int) -> torch.nn.Parameter:
    local = shard_tensor(full.detach(), placement, rank, world)
    return torch.nn.Parameter(local.clone().contiguous(), requires_grad=full.requires_grad)


def emit(gm: fx.GraphModule, prop: Propagation, rank: int, group_name: GroupNamer,
         store: dict[str, torch.nn.Parameter] | None = None, gather_outputs: bool = True,
         local_outputs: frozenset[int] = frozenset()) -> fx.GraphModule:
    """Build ``rank``'s GraphModule. ``store`` (fqn -> local Parameter) is reused across captures.
    ``gather_outputs=False`` returns split outputs (e.g. vocab-split logits) as this rank's slice;
    ``local_outputs`` does so for the outputs at these positions of the flattened output (a KV cache)."""
    return _Emitter(gm, prop, rank, group_name, {} if store is None else store, gather_outputs,
                    local_outputs).run()


class _Emitter:
    """One rank's graph, built node by node: parameters become local slices, operands are redistributed to
    what their consumer wants (with Megatron's autograd pairs), partial sums are reduced where planned."""

    def __init__(self, gm: fx.GraphModule, prop: Propagation, rank: int, group_name: GroupNamer,
                 store: dict[str, torch.nn.Parameter], gather_outputs: bool, local_outputs: frozenset[int]) -> None:
        self.gm, self.prop, self.rank, self.world = gm, prop, rank, prop.world
        self.group_name, self.store = group_name, store
        self.gather_outputs, self.local_outputs = gather_outputs, local_outputs
        self.wg = group_name(tuple(range(prop.world)))
        self.new = fx.Graph()
        self.new._codegen = copy.deepcopy(gm.graph._codegen)
        self.env: dict[fx.Node, fx.Node] = {}
        self.root: dict[str, Any] = {}
        self.cache: dict[tuple[fx.Node, Any], fx.Node] = {}

    def run(self) -> fx.GraphModule:
        for node in self.gm.graph.nodes:
            if node.op == "get_attr":
                self.env[node] = self.attribute(node)
            elif is_guards(node) and any(not isinstance(self.prop.placements.get(a), Replicate)
                                         for a in node.all_input_nodes):
                continue  # export's checks of full-shape inputs; this rank is fed its slices (a split KV cache)
            elif node.op == "output":
                self.output(node)
            else:
                self.compute(node)
        out = fx.GraphModule(self.root, self.new, class_name=f"TPRank{self.rank}")
        out.graph.lint()
        return checkpoint_regions(out)  # the regions the model checkpoints, checkpointed

    def call(self, fn: Any, *args: Any, src: fx.Node | None = None, where: str | None = None) -> fx.Node:
        """``fn(*args)`` after ``src``; a collective whose backward communicates is told ``where`` it sits (default:
        ``src`` and its module), to name it if that backward fails."""
        if where is None and src is not None:
            where = C.where_of(src)
        named = (kind := OPS.get(fn)) is not None and kind.named
        kwargs: dict[str, Any] = {"where": where} if named and where else {}
        n = self.new.call_function(fn, tuple(args), kwargs)
        if src is not None and "nn_module_stack" in src.meta:  # attribute the collective to its layer
            n.meta["nn_module_stack"] = src.meta["nn_module_stack"]
        return n

    def redistribute(self, a: fx.Node, have: Placement, want: Placement) -> fx.Node:
        key = (a, want)
        if key not in self.cache:
            x = self.env[a]
            for step in plan_redistribution(have, want, self.world):
                x = _step(self.call, step, x, self.rank, self.world, self.wg, a)
            self.cache[key] = x
        return self.cache[key]

    def once(self, a: fx.Node, tag: str, fn: Any, *args: Any) -> fx.Node:
        """``fn(*args)`` for operand ``a``, emitted once and shared by its consumers."""
        if (a, tag) not in self.cache:
            self.cache[(a, tag)] = self.call(fn, *args, src=a)
        return self.cache[(a, tag)]

    def attribute(self, node: fx.Node) -> fx.Node:
        """A parameter becomes this rank's slice; one split into fewer chunks than ranks gets its gradient
        reduced over its replica group."""
        name = str(node.target)
        obj, fqn, rank, world = _fetch(self.gm, name), self.prop.param_nodes.get(node), self.rank, self.world
        if fqn is None:
            self.root[name] = obj
            return self.new.node_copy(node, lambda a: self.env[a])
        _, pl = self.prop.decided.get(fqn, ("replicate", Replicate()))
        if fqn not in self.store:
            self.store[fqn] = local_param(obj, pl, rank, world)
        self.root[name] = self.store[fqn]
        x = self.new.node_copy(node, lambda a: self.env[a])
        x.meta["tpfx_placement"] = pl
        if isinstance(pl, Shard) and pl.sgroups is not None:  # segments in different replica groups
            local, spans = pl.local_segs(rank, world), []
            for k, (g, ranks) in enumerate(zip(pl.seg_groups, pl.replica_groups(rank, world))):
                if g < world:
                    spans.append((sum(local[:k]), local[k], self.group_name(ranks)))
            return self.call(C.reduce_grad_spans, x, pl.dim, spans, where=f"the gradient of {fqn}")
        if isinstance(pl, Shard) and pl.groups < world:
            return self.call(C.reduce_grad, x, self.group_name(group_of(pl, rank, world)),
                             where=f"the gradient of {fqn}")
        return x

    def operand(self, a: Any, node: fx.Node, sharded: bool) -> Any:
        """Operand ``a`` of ``node`` as the node's strategy wants it (``sharded``: the node computes on splits)."""
        if not isinstance(a, fx.Node):
            return a
        want, have = self.prop.wants.get((node, a)), self.prop.placements.get(a, Replicate())
        grad = operand_grad(self.prop, node, a, sharded)  # the backward collective it needs (backward.py)
        if grad == "gather_seq":  # Megatron-SP: all-gather in, reduce-scatter of the gradient back
            assert isinstance(have, Shard)
            return self.once(a, "gather_seq", C.gather_seq, self.env[a], have.dim, self.world, self.wg)
        x = self.env[a] if want is None else self.redistribute(a, have, want)
        if grad == "f":
            return self.once(a, "f", C.reduce_grad, x, self.wg)  # Megatron's f: replicated into sharded compute
        return x

    def output(self, node: fx.Node) -> None:
        leaves, spec = tree_flatten(node.args[0])
        outs = []
        for i, a in enumerate(leaves):
            pl = self.prop.placements.get(a) if isinstance(a, fx.Node) else None
            local = isinstance(pl, Shard) and not is_seq_split(pl) and (not self.gather_outputs
                                                                       or i in self.local_outputs)
            outs.append(self.env[a] if local else self.operand(a, node, False))
        self.new.output(tree_unflatten(outs, spec))

    def compute(self, node: fx.Node) -> None:
        """A placeholder, module call or op: operands redistributed, the op rewritten where its strategy says
        (local view constants, the vocab-parallel embedding), its partial sum reduced where planned."""
        prop, world, wg = self.prop, self.world, self.wg
        if node.op == "call_module":
            self.root[str(node.target)] = _fetch(self.gm, str(node.target))
        if node.op == "call_function" and node.target is torch.set_grad_enabled:
            self.cache.clear()  # a redistribution made under no_grad carries no gradient: redo it after a switch
        sharded = sharded_compute(prop, node)
        args = fx.map_arg(node.args, lambda a: self.operand(a, node, sharded))
        kwargs = dict(fx.map_arg(dict(node.kwargs), lambda a: self.operand(a, node, sharded)))
        strat = prop.strategies.get(node)
        target = node.target
        if strat is not None and strat.rewrite is not None:
            args, kwargs = strat.rewrite(args, kwargs, self.rank, world)
            args = tuple(wg if a == WORLD else a for a in args)
            target = strat.target or node.target
        elif node.op == "placeholder":
            self.env[node] = self.new.node_copy(node, lambda a: self.env[a])
            return
        elif (late := late_of(target)) is not None:  # dropout's noise, attention's (rules.register_late)
            target, args, kwargs = late(node, prop.placements.get(node), args, kwargs, self.rank, world)
        if target is torch.ops.aten.view.default:
            # a rank's value may be laid out unlike the captured one (a gathered tensor is contiguous where the
            # unsharded one was a transposed view, so ``.contiguous()`` traced to nothing): the same value by
            # reshape, which copies only where a view is impossible
            target = torch.ops.aten.reshape.default
        y = self.new.create_node(node.op, target, args, kwargs, name=node.name)
        y.meta = {k: v for k, v in node.meta.items() if k not in ("val", "tensor_meta") and not k.startswith("tpfx_")}
        y.meta["tpfx_placement"] = prop.placements.get(node)
        if node in prop.reduced_after:
            y = _step(self.call, Step("all_reduce"), y, self.rank, world, wg, node)
        elif node in prop.scattered_after:
            y = _step(self.call, Step("reduce_scatter", prop.placements[node].dim), y, self.rank, world, wg, node)
        self.env[node] = y


def collective_nodes(gm: fx.GraphModule) -> list[tuple[str, fx.Node]]:
    """(kind, node) for every collective in an emitted graph, forward ones and reduce_grad."""
    return [(name, n) for n in gm.graph.nodes if n.op == "call_function" and (name := listed(n.target)) is not None]
