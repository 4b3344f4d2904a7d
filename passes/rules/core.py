"""The rule registry and what rules are made of: operands, strategies, fallbacks, and the helpers every
op family uses."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from ..placements import Partial, Placement, R, Shard, chunk_range
from ..shapes import Expr

aten = torch.ops.aten
Rewrite = Callable[[tuple, dict, int, int], tuple[tuple, dict]]
Late = Callable[[fx.Node, Any, tuple, dict, int, int], tuple[Any, tuple, dict]]


@dataclass
class FreeParam:
    """An undecided parameter: the styles it may still take and the layout caps the planner set."""

    fqn: str
    styles: frozenset[str]
    groups: int  # upper bound on the number of chunks (a divisor of t)
    segs: tuple[int, ...] | None = None  # segments requested for its split dim
    sgroups: tuple[int, ...] | None = None  # caps per segment where they differ (whole key/value heads)
    dim_map: tuple[int | None, ...] | None = None  # operand dim -> parameter dim (after transposes/casts)
    uneven: bool = True  # may be split into unequal chunks
    unit: int = 1  # chunks in whole multiples of it (an uneven split at head boundaries)


@dataclass
class Operand:
    node: fx.Node
    shape: tuple[Expr, ...]
    dtype: torch.dtype
    placement: Placement
    free: FreeParam | None = None
    trained: bool = False  # depends on a parameter (carries gradients): e.g. the residual stream

    @property
    def ndim(self) -> int:
        return len(self.shape)


@dataclass
class Strategy:
    want: dict[int, Any]  # operand index -> the Placement it must arrive in
    out: Any  # Placement or tuple of Placements
    decide: dict[int, tuple[str, Placement]] = field(default_factory=dict)
    rewrite: Rewrite | None = None
    target: Any = None  # with ``rewrite``: the op emitted in the node's place (None: the node's own)


@dataclass
class Fallback:
    reason: str
    operand: int | None = None  # the operand whose shard could not be carried
    groups: int | None = None  # a group count that would work (GQA), for the planner to demote to
    segs: tuple[int, ...] | None = None  # segment boundaries that would work (fused projections)
    sgroups: tuple[int, ...] | None = None  # with segs: a group count per segment (a whole key/value head)
    within: tuple[int, ...] | None = None  # with segs or unit: the operand's segments (in the operand's units)
    unit: int | None = None  # uneven chunks of whole multiples of this many elements would work (whole heads)


@dataclass
class OpCtx:
    node: fx.Node
    operands: list[Operand]
    world: int
    out_shapes: Any  # tuple of Expr, or list of such for multi-output ops

    def idx(self, arg: Any) -> int | None:
        for i, o in enumerate(self.operands):
            if o.node is arg:
                return i
        return None

    @property
    def args(self) -> tuple:
        return self.node.args

    def arg(self, name: str, default: Any = None) -> Any:
        """An argument by its schema name, positional or keyword."""
        if name in self.node.kwargs:
            return self.node.kwargs[name]
        schema = getattr(self.node.target, "_schema", None)
        if schema is not None:
            for i, a in enumerate(schema.arguments):
                if a.name == name:
                    if i < len(self.node.args):
                        return self.node.args[i]
                    return a.default_value if a.has_default_value() and default is None else default
        return default

    @property
    def kwargs(self) -> dict:
        return dict(self.node.kwargs)


Result = Strategy | Fallback
Rule = Callable[[OpCtx], Result]
REGISTRY: dict[Any, Rule] = {}
SEQ_LOCAL: set[Rule] = set()  # rules whose ops compute each token from the same token (sequence parallelism)


def register(*targets: Any, seq_local: bool = False) -> Callable[[Rule], Rule]:
    """One rule per op: a second registration is an error (a rule refining another calls it explicitly).
    ``seq_local``: the ops compute each position of the sequence dim from the same position of their operands
    (pointwise, norms and reductions over the hidden dim), so sequence parallelism may run them on its split."""

    def deco(fn: Rule) -> Rule:
        for t in targets:
            if t in REGISTRY:
                raise RuntimeError(f"tpfx: {t} already has the rule {REGISTRY[t].__qualname__}")
            REGISTRY[t] = fn
        if seq_local:
            SEQ_LOCAL.add(fn)
        return fn

    return deco


LATE: dict[Any, Late] = {}  # op -> its rewrite chosen at emission (``register_late``)


def register_late(*targets: Any) -> Callable[[Late], Late]:
    """A rewrite of every node of these ops, chosen at emission from the node's final placement (sequence
    parallelism may change it after the rules ran): ``(node, placement, args, kwargs, rank, world) -> (target,
    args, kwargs)``, the node as it is where the placement asks for nothing (dropout's noise on a split value)."""

    def deco(fn: Late) -> Late:
        for t in targets:
            LATE[t] = fn
        return fn

    return deco


def late_of(target: Any) -> Late | None:
    packet = getattr(target, "overloadpacket", None)
    return LATE.get(target) or (LATE.get(packet) if packet is not None else None)


NAMED: dict[str, Rule] = {}  # custom ops registered by other libraries, keyed by "namespace::name"


def register_name(*names: str) -> Callable[[Rule], Rule]:
    def deco(fn: Rule) -> Rule:
        for n in names:
            NAMED[n] = fn
        return fn

    return deco


def uniform_only(fn: Rule) -> Rule:
    """For rules whose arithmetic assumes one group count for every segment: an operand whose segments are
    split into different counts (``Shard.sgroups``) is refused with a reason instead of mis-sliced."""

    def wrapped(ctx: OpCtx) -> Result:
        for i, o in enumerate(ctx.operands):
            if isinstance(o.placement, Shard) and o.placement.sgroups is not None:
                return Fallback(f"{ctx.node.target} on segments split into different group counts "
                                f"{o.placement}", i)
        return fn(ctx)

    wrapped.__name__, wrapped.__doc__ = fn.__name__, fn.__doc__
    return wrapped


def lookup(target: Any) -> Rule | None:
    if target in REGISTRY:
        return REGISTRY[target]
    packet = getattr(target, "overloadpacket", None)
    if packet is not None and packet in REGISTRY:
        return REGISTRY[packet]
    name = getattr(target, "name", None)
    return NAMED.get(name()) if callable(name) else None


# ----------------------------------------------------------------------------- helpers


def norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def sharded(ops: list[Operand]) -> list[int]:
    return [i for i, o in enumerate(ops) if isinstance(o.placement, Shard)]


def keep(ctx: OpCtx, **extra: Placement) -> dict[int, Placement]:
    """Want every operand as it is (P operands are reduced by the planner unless a rule says so)."""
    return {i: (R if isinstance(o.placement, Partial) else o.placement) for i, o in enumerate(ctx.operands)}


def finest(shards: list[Shard]) -> Shard | None:
    """The finest of compatible shards (same segs, nested group counts per segment, uneven ones identical),
    or None."""
    best = max(shards, key=lambda s: s.seg_groups)
    for s in shards:
        if s.segs != best.segs or any(b % g for g, b in zip(s.seg_groups, best.seg_groups)) \
                or (s.uneven and (s.seg_groups, s.unit) != (best.seg_groups, best.unit)):
            return None
    return best


WORLD = "<tpfx:world-group>"  # placeholder argument: emission substitutes the world group's name


def local_len(size: int, p: Shard | int, rank: int, world: int) -> int:
    """This rank's length of a dim of global ``size`` split as ``p`` (a Shard on that dim, or a group count)."""
    if isinstance(p, Shard):
        return p.local_size(rank, world) if sum(p.segs) == size else chunk_range(size, p.groups, p.chunk(rank, world))[1]
    return chunk_range(size, p, rank * p // world)[1]


def resize_arg(shape_pos: int, dims: dict[int, Shard | int]) -> Rewrite:
    """Rewrite a size list argument: entries at ``dims`` (out dim -> its Shard, or a group count) become local."""

    def rw(args: tuple, kwargs: dict, rank: int, world: int) -> tuple[tuple, dict]:
        sizes = list(args[shape_pos])
        for d, g in dims.items():
            v = sizes[d]
            if isinstance(v, int) and v != -1:
                sizes[d] = local_len(v, g, rank, world)
        new = list(args)
        new[shape_pos] = sizes
        return tuple(new), kwargs

    return rw


def check_sizes_static(sizes: Any, dims: dict[int, Any]) -> str | None:
    for d in dims:
        v = sizes[d] if d < len(sizes) else None
        if isinstance(v, fx.Node):
            return f"size argument {d} is computed at run time ({v.name})"
    return None
