"""Op sharding rules: one small pure function per op family, in one registry.

A rule sees the op's operands (shape, current placement, and for an undecided parameter the
styles it may take) and returns a ``Strategy``: the placement it wants for each operand, the
placement of its output(s), placements it decides for free parameters, and how to rewrite the
op's constant arguments for one rank (view sizes become local head counts). A rule that cannot
carry the sharding returns ``Fallback(reason)``: the planner then replicates the region (it
reverts the weights the shard came from) or, where weights are pinned, gathers the inputs.
Rules need no process group; they are unit-tested on shapes alone.

Matmuls are einsum specs (as in PyTorch's ``_ops/_matrix_ops.py``): a letter sharded in every
operand that has it and kept in the output stays sharded; a sharded contracted letter makes the
output ``Partial``; with no sharded input, a free weight is split on its first free output letter
(``colwise``); with the contracted letter sharded it is split on that letter (``rowwise``).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import torch
import torch.fx as fx

from . import kernels
from .placements import P, Partial, Placement, R, Replicate, Shard, chunk_range, group_at, is_whole
from .shapes import Expr, as_int, divisible_prefix, map_shard

aten = torch.ops.aten
Rewrite = Callable[[tuple, dict, int, int], tuple[tuple, dict]]


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
    within: tuple[int, ...] | None = None  # with segs: the operand's segments they refine (in the operand's units)


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


def register(*targets: Any) -> Callable[[Rule], Rule]:
    """One rule per op: a second registration is an error (a rule refining another calls it explicitly)."""

    def deco(fn: Rule) -> Rule:
        for t in targets:
            if t in REGISTRY:
                raise RuntimeError(f"tpfx: {t} already has the rule {REGISTRY[t].__qualname__}")
            REGISTRY[t] = fn
        return fn

    return deco


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
                or (s.uneven and s.seg_groups != best.seg_groups):
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


# ----------------------------------------------------------------------------- pointwise

POINTWISE_LINEAR = {aten.add, aten.sub, aten.mul, aten.div, aten.neg, aten.alias, aten.clone, aten.contiguous}

POINTWISE = [
    aten.add, aten.sub, aten.mul, aten.div, aten.neg, aten.pow, aten.rsqrt, aten.sqrt, aten.exp, aten.log,
    aten.tanh, aten.sigmoid, aten.silu, aten.gelu, aten.relu, aten.erf, aten.abs, aten.sin, aten.cos,
    aten.where, aten.masked_fill, aten.clamp, aten.clamp_min, aten.clamp_max, aten.minimum, aten.maximum,
    aten.eq, aten.ne, aten.lt, aten.le, aten.gt, aten.ge, aten.logical_not, aten.logical_and,
    aten.logical_or, aten.bitwise_not, aten.bitwise_and, aten.bitwise_or, aten.__and__, aten.__or__,
    aten.to, aten._to_copy, aten.type_as, aten.alias, aten.clone, aten.contiguous, aten.detach,
    aten.dropout, aten.native_dropout, aten.reciprocal, aten.square, aten.log1p, aten.expm1,
    aten.floor_divide, aten.remainder, aten.fill, aten.zeros_like, aten.ones_like, aten.empty_like,
    aten.full_like, aten.lift_fresh_copy, aten.leaky_relu, aten.hardtanh, aten.softplus, aten.mish,
    aten.elu, aten.gelu_, aten.silu_, aten.relu_, aten.add_, aten.mul_, aten.copy, aten.rsub,
    aten.nan_to_num, aten.sign, aten.triu, aten.tril, aten.lerp, aten.addcmul, aten.addcdiv,
]


def _out_dtype(ctx: OpCtx) -> torch.dtype | None:
    val = ctx.node.meta.get("val")
    return val.dtype if isinstance(val, torch.Tensor) else None


@register(*POINTWISE)
def pointwise(ctx: OpCtx) -> Result:
    out = ctx.out_shapes
    if isinstance(out, list):  # native_dropout etc: (out, mask) with the same shape
        out = out[0]
    nd = len(out)
    ops = ctx.operands
    packet = getattr(ctx.node.target, "overloadpacket", None)
    partial = [i for i, o in enumerate(ops) if isinstance(o.placement, Partial)]
    scalars = [a for a in ctx.args if isinstance(a, (int, float, bool)) and not isinstance(a, bool)]
    if partial and not sharded(ops) and packet in POINTWISE_LINEAR:
        if packet in (aten.add, aten.sub) and scalars and any(x != 0 for x in scalars[:1]):
            return Strategy(keep(ctx), R)  # a constant added to every summand would count t times
        if packet in (aten.add, aten.sub) and len(partial) == len(ops):
            return Strategy(keep(ctx) | {i: P for i in partial}, P)
        if packet in (aten.mul, aten.div) and len(partial) == 1 and (packet is aten.mul or partial[0] == 0):
            return Strategy(keep(ctx) | {partial[0]: P}, P)
        if packet in (aten.neg, aten.alias, aten.clone, aten.contiguous):
            return Strategy({0: P}, P)
    if partial == [0] and len(ops) == 1 and packet in (aten.to, aten._to_copy) and ops[0].dtype == _out_dtype(ctx):
        return Strategy({0: P}, P)  # a device move or same-dtype cast is linear

    def out_dim(o: Operand, d: int) -> int:
        return d + nd - o.ndim

    if partial and not sharded(ops) and packet in (aten.add, aten.sub) and not scalars:
        # P + R stays Partial: the replicated operand is added on one rank only (exact, no collective)
        return Strategy({i: P for i in range(len(ops))}, P)
    shards = [(i, ops[i].placement) for i in sharded(ops)]
    if not shards:
        return Strategy(keep(ctx), R)
    shards = [(i, p) for i, p in shards if not is_whole(p)] or shards  # a whole operand takes the split's layout
    dims = {out_dim(ops[i], p.dim) for i, p in shards}  # type: ignore[union-attr]
    if len(dims) > 1:
        return Fallback("operands sharded on different dims", shards[1][0])
    od = dims.pop()
    if packet in (aten.triu, aten.tril) and od >= nd - 2:
        return Fallback("triangular mask over a sharded dim", shards[0][0])
    best = finest([p for _, p in shards])  # type: ignore[misc]
    if best is None:
        return Fallback("operands sharded with incompatible layouts", shards[0][0])
    want: dict[int, Placement] = {}
    decide: dict[int, tuple[str, Placement]] = {}
    for i, o in enumerate(ops):
        d = od - (nd - o.ndim)
        if d < 0 or o.shape[d] == 1:  # broadcast along the sharded dim: replicated, or held whole as it is
            want[i] = o.placement if is_whole(o.placement) else R
            continue
        if (packet in (aten.add, aten.sub) and isinstance(o.placement, Replicate) and o.free is None
                and o.trained and o.dtype.is_floating_point and tuple(o.shape) == tuple(out)):
            # a column-split region running into the replicated residual stream: Megatron closes such a
            # region with a row-split matmul; splitting the stream instead is the worse plan
            return Fallback("a column-split region reaches the replicated residual stream", shards[0][0])
        target = best.moved(d)
        if o.free is not None:
            if "shard" not in o.free.styles:
                return Fallback("a weight here is pinned replicated", i)
            decide[i] = ("shard", target)
        want[i] = target
    return Strategy(want, best.moved(od), decide)


# ----------------------------------------------------------------------------- views


def _pass_partial(ctx: OpCtx) -> Strategy | None:
    if isinstance(ctx.operands[0].placement, Partial):
        return Strategy({0: P} | {i: R for i in range(1, len(ctx.operands))}, P)
    return None


def view(ctx: OpCtx) -> Result:  # registered by rules_nn.view, which refines its reasons
    if (s := _pass_partial(ctx)) is not None:
        return s
    x = ctx.operands[0]
    if not isinstance(x.placement, Shard):
        return Strategy({0: R}, R)
    out = map_shard(x.shape, ctx.out_shapes, x.placement)
    if isinstance(out, int):
        why = f"view {list(x.shape)} -> {list(ctx.out_shapes)} splits the sharded dim " \
              f"{x.shape[x.placement.dim]} into parts not divisible by {x.placement.groups}"
        if (pre := divisible_prefix(x.shape, ctx.out_shapes, x.placement)) is not None:
            return Fallback(why + "; the largest divisible part is split, the rest kept together", 0,
                            segs=pre[0], sgroups=pre[1], within=x.placement.segs)
        return Fallback(why, 0, groups=out if out > 1 else None)
    dims: dict[int, Shard | int] = {out.dim: out}
    if (dyn := check_sizes_static(ctx.args[1], dims)) is not None:
        return Fallback(dyn, 0)
    return Strategy({0: x.placement}, out, rewrite=resize_arg(1, dims))


@register(aten.expand)
def expand(ctx: OpCtx) -> Result:
    if (s := _pass_partial(ctx)) is not None:
        return s
    x = ctx.operands[0]
    if not isinstance(x.placement, Shard):
        return Strategy({0: R}, R)
    od = x.placement.dim + len(ctx.out_shapes) - x.ndim
    dims: dict[int, Shard | int] = {od: x.placement.moved(od)}
    if (why := check_sizes_static(ctx.args[1], dims)) is not None:
        return Fallback(why, 0)
    return Strategy({0: x.placement}, x.placement.moved(od), rewrite=resize_arg(1, dims))


def _moved(ctx: OpCtx, f: Callable[[int], int | None], allow_partial: bool = True) -> Result:
    if allow_partial and (s := _pass_partial(ctx)) is not None:
        return s
    x = ctx.operands[0]
    if not isinstance(x.placement, Shard):
        return Strategy(keep(ctx), R)
    d = f(x.placement.dim)
    if d is None:
        return Fallback(f"{ctx.node.target} consumes the sharded dim {x.placement.dim}", 0)
    return Strategy({0: x.placement}, x.placement.moved(d))


@register(aten.transpose)
def transpose(ctx: OpCtx) -> Result:
    nd = ctx.operands[0].ndim
    a, b = norm_dim(ctx.args[1], nd), norm_dim(ctx.args[2], nd)
    return _moved(ctx, lambda d: b if d == a else a if d == b else d)


@register(aten.view_as_complex, aten.view_as_real)
def complex_view(ctx: OpCtx) -> Result:
    """``[..., 2]`` real pairs <-> ``[...]`` complex (RoPE as a complex product): leading dims keep their shard;
    the pair dim cannot be split."""
    last = ctx.operands[0].ndim - 1
    pairs = ctx.node.target is aten.view_as_complex.default
    return _moved(ctx, lambda d: None if pairs and d == last else d)


@register(aten.t, aten.numpy_T)
def t(ctx: OpCtx) -> Result:
    nd = ctx.operands[0].ndim
    return _moved(ctx, lambda d: nd - 1 - d)


@register(aten.permute)
def permute(ctx: OpCtx) -> Result:
    nd = ctx.operands[0].ndim
    perm = [norm_dim(p, nd) for p in ctx.args[1]]
    return _moved(ctx, lambda d: perm.index(d))


@register(aten.unsqueeze)
def unsqueeze(ctx: OpCtx) -> Result:
    u = norm_dim(ctx.args[1], ctx.operands[0].ndim + 1)
    return _moved(ctx, lambda d: d + 1 if d >= u else d)


@register(aten.squeeze)
def squeeze(ctx: OpCtx) -> Result:
    x = ctx.operands[0]
    if len(ctx.args) > 1:
        dims = ctx.args[1] if isinstance(ctx.args[1], (list, tuple)) else [ctx.args[1]]
        dims = [norm_dim(d, x.ndim) for d in dims]
    else:
        dims = list(range(x.ndim))
    gone = sorted(d for d in dims if x.shape[d] == 1)

    def f(d: int) -> int | None:
        if d in dims:
            return None  # a sharded dim is never size 1 globally, but may be locally
        return d - sum(1 for g in gone if g < d)

    return _moved(ctx, f)


@register(aten.select)
def select(ctx: OpCtx) -> Result:
    s = norm_dim(ctx.args[1], ctx.operands[0].ndim)
    return _moved(ctx, lambda d: None if d == s else (d - 1 if d > s else d), allow_partial=False)


def _cuts(p: Shard, bounds: list[int]) -> tuple[int, ...] | None:
    """Segments refined so that every cut in ``bounds`` is a segment boundary (None if impossible)."""
    edges = set(bounds)
    off = 0
    for s in p.segs:
        edges.add(off)
        off += s
    edges.add(off)
    pts = sorted(e for e in edges if 0 <= e <= off)
    segs = tuple(b - a for a, b in zip(pts, pts[1:]) if b > a)
    return segs


def _select_segs(p: Shard, start: int, end: int) -> tuple[Shard, int, int] | None:
    """The segments covering [start, end) (as a Shard of them) and the local [start, end) — None if not on
    segment boundaries."""
    if p.uneven:
        return None
    off = loc = 0
    chosen: list[tuple[int, int]] = []
    lstart = lend = None
    for s, g in zip(p.segs, p.seg_groups):
        if off == start:
            lstart = loc
        if start <= off and off + s <= end:
            chosen.append((s, g))
        off += s
        loc += s // g
        if off == end:
            lend = loc
    if lstart is None or lend is None or not chosen:
        return None
    gs = tuple(g for _, g in chosen)
    return Shard(p.dim, max(gs), tuple(s for s, _ in chosen), gs), lstart, lend


def _split_on_shard(ctx: OpCtx, bounds: list[tuple[int, int]], dim: int) -> Result:
    x = ctx.operands[0]
    p = x.placement
    assert isinstance(p, Shard)
    if is_whole(p):  # held whole on every rank: any part is local, as it is
        return Strategy({0: p}, tuple(Shard(dim, 1, (b - a,)) for a, b in bounds)), list(bounds)  # type: ignore
    outs, local = [], []
    for a, b in bounds:
        sel = _select_segs(p, a, b)
        if sel is None:
            segs = _cuts(p, [c for ab in bounds for c in ab])
            why = f"split of the sharded dim at {sorted({c for ab in bounds for c in ab})} does not fall on shard " \
                  f"boundaries"
            if segs is None or p.uneven:
                return Fallback(why, 0)
            # each segment split as finely as it allows: a part smaller than the group count (a single key or
            # value head beside the query heads) is held whole on every rank
            gs, off = [], 0
            for s in segs:
                g0 = group_at(p.segs, p.seg_groups, off)  # the group count of the segment it refines
                taken = any(a <= off and off + s <= b for a, b in bounds)
                gs.append(math.gcd(g0, s) if taken else g0)  # a part not taken here keeps its count
                off += s
            return Fallback(why, 0, segs=segs, sgroups=tuple(gs), within=p.segs)
        outs.append(sel[0].moved(dim))
        local.append((sel[1], sel[2]))
    return Strategy({0: p}, tuple(outs)), local  # type: ignore[return-value]


@register(aten.slice)
def slice_(ctx: OpCtx) -> Result:
    x = ctx.operands[0]
    nd = x.ndim
    dim = norm_dim(ctx.args[1] if len(ctx.args) > 1 else 0, nd)
    if not isinstance(x.placement, Shard) or x.placement.dim != dim:
        return _moved(ctx, lambda d: d, allow_partial=False)
    size = as_int(x.shape[dim])
    start = ctx.args[2] if len(ctx.args) > 2 else 0
    end = ctx.args[3] if len(ctx.args) > 3 else size
    step = ctx.args[4] if len(ctx.args) > 4 else 1
    if size is None or not isinstance(start, int) or not isinstance(end, int) or step != 1:
        return Fallback("slice of the sharded dim with run-time bounds or a step", 0)
    start, end = max(0, start + size if start < 0 else start), min(size, end + size if end < 0 else end)
    res = _split_on_shard(ctx, [(start, end)], dim)
    if isinstance(res, Fallback):
        return res
    strat, local = cast(tuple[Strategy, list[tuple[int, int]]], res)
    (ls, le), = local

    def rw(args: tuple, kwargs: dict, rank: int, world: int) -> tuple[tuple, dict]:
        return (args[0], args[1], ls, le), kwargs

    return Strategy(strat.want, strat.out[0], rewrite=rw)


@register(aten.split, aten.split_with_sizes, aten.chunk)
def split(ctx: OpCtx) -> Result:
    x = ctx.operands[0]
    dim = norm_dim(ctx.args[2] if len(ctx.args) > 2 else ctx.kwargs.get("dim", 0), x.ndim)
    n = len(ctx.out_shapes)
    if not isinstance(x.placement, Shard) or x.placement.dim != dim:
        r = _moved(ctx, lambda d: d, allow_partial=False)
        if isinstance(r, Strategy):
            r.out = tuple([r.out] * n)
        return r
    sizes = [as_int(s[dim]) for s in ctx.out_shapes]
    if None in sizes:
        return Fallback("split of the sharded dim with run-time sizes", 0)
    bounds, off = [], 0
    for s in sizes:
        bounds.append((off, off + s))  # type: ignore[operator]
        off += s  # type: ignore[operator]
    res = _split_on_shard(ctx, bounds, dim)
    if isinstance(res, Fallback):
        return res
    strat, local = cast(tuple[Strategy, list[tuple[int, int]]], res)
    lsizes = [b - a for a, b in local]

    def rw(args: tuple, kwargs: dict, rank: int, world: int) -> tuple[tuple, dict]:
        return (args[0], lsizes, dim), {}

    strat.rewrite = rw
    if ctx.node.target is not aten.split_with_sizes.default:
        strat.target = aten.split_with_sizes.default
    return strat


def _common_shard(ops: list[Operand]) -> Shard | Fallback:
    """The one shard every operand can take (the finest of compatible shards on one dim), or why not."""
    shards = [o.placement for o in ops if isinstance(o.placement, Shard)]
    best = finest(shards)
    if best is None or len({s.dim for s in shards}) > 1:
        return Fallback("operands sharded with incompatible layouts")
    return best


@register(aten.cat)
def cat(ctx: OpCtx) -> Result:
    ops = ctx.operands
    dim = norm_dim(ctx.arg("dim", 0), len(ctx.out_shapes))
    shards = [o.placement for o in ops if isinstance(o.placement, Shard)]
    if not shards:
        return Strategy(keep(ctx), R)
    if all(isinstance(o.placement, Shard) and o.placement.dim == dim for o in ops):
        segs = tuple(s for o in ops for s in o.placement.segs)  # type: ignore[union-attr]
        gs = tuple(g for o in ops for g in o.placement.seg_groups)  # type: ignore[union-attr]
        return Strategy(keep(ctx), Shard(dim, max(gs), segs, gs))
    if any(isinstance(s, Shard) and s.dim == dim for s in shards):
        return Fallback("concatenating a sharded and a replicated tensor along the sharded dim", 0)
    best = _common_shard(ops)
    if isinstance(best, Fallback):
        return best
    return Strategy({i: best for i in range(len(ops))}, best)


def _aligned(ctx: OpCtx) -> tuple[int, Shard] | Result:
    """For ops whose operands must share one layout: (the op's dim, that shard), or the rule's answer when
    nothing is split (replicated) or no common shard exists (fallback)."""
    if not sharded(ctx.operands):
        return Strategy(keep(ctx), R)
    best = _common_shard(ctx.operands)
    return best if isinstance(best, Fallback) else (norm_dim(ctx.arg("dim", 0), len(ctx.out_shapes)), best)


@register(aten.stack)
def stack(ctx: OpCtx) -> Result:
    if not isinstance(r := _aligned(ctx), tuple):
        return r
    dim, best = r
    od = best.dim + 1 if best.dim >= dim else best.dim
    return Strategy({i: best for i in range(len(ctx.operands))}, best.moved(od))


@register(aten.slice_scatter)
def slice_scatter(ctx: OpCtx) -> Result:
    """``out = input`` with ``out[dim][start:end] = src`` (functionalized ``x[..., a:b].copy_(y)``): both
    operands split alike on another dim; writing into the split dim replicates."""
    if not isinstance(r := _aligned(ctx), tuple):
        return r
    dim, best = r
    if best.dim == dim:
        return Fallback("slice_scatter into the sharded dim")  # culprits: every sharded operand
    return Strategy({i: best for i in range(len(ctx.operands))}, best)


@register(aten.flatten)
def flatten(ctx: OpCtx) -> Result:  # also unflatten's base (rules_nn.unflatten)
    """flatten/unflatten are views whose output shape is known: move the shard like a view."""
    if (s := _pass_partial(ctx)) is not None:
        return s
    x = ctx.operands[0]
    if not isinstance(x.placement, Shard):
        return Strategy(keep(ctx), R)
    out = map_shard(x.shape, ctx.out_shapes, x.placement)
    if isinstance(out, int):
        return Fallback(f"{ctx.node.target} splits the sharded dim into parts not divisible by "
                        f"{x.placement.groups}", 0, groups=out if out > 1 else None)
    if ctx.node.target.overloadpacket is aten.unflatten:  # type: ignore[union-attr]
        start = norm_dim(ctx.args[1], x.ndim)
        if not start <= out.dim < start + len(ctx.args[2]):
            return Strategy({0: x.placement}, out)
        return Strategy({0: x.placement}, out, rewrite=_resize_list(2, out.dim - start, out))
    return Strategy({0: x.placement}, out)


def _resize_list(pos: int, i: int, g: Shard | int) -> Rewrite:
    def rw(args: tuple, kwargs: dict, rank: int, world: int) -> tuple[tuple, dict]:
        sizes = list(args[pos])
        if isinstance(sizes[i], int) and sizes[i] != -1:
            sizes[i] = local_len(sizes[i], g, rank, world)
        return tuple(args[:pos]) + (sizes,) + tuple(args[pos + 1 :]), kwargs

    return rw


@register(aten.view_as, aten.expand_as, aten.reshape_as)
def view_as(ctx: OpCtx) -> Result:
    """Shape taken from another tensor: fine when that tensor has the output's placement."""
    x, other = ctx.operands[0], ctx.operands[1] if len(ctx.operands) > 1 else ctx.operands[0]
    if not isinstance(x.placement, Shard):
        if isinstance(other.placement, Shard) and ctx.node.target.overloadpacket is aten.expand_as:  # type: ignore[union-attr]
            return Strategy({0: R, 1: other.placement}, other.placement) if x.shape[other.placement.dim - (len(other.shape) - x.ndim)] == 1 \
                else Fallback("expand_as a sharded tensor", 1)
        return Strategy({0: R, 1: other.placement}, R) if not isinstance(other.placement, Shard) \
            else Fallback("shape taken from a sharded tensor", 1)
    if ctx.node.target.overloadpacket is aten.expand_as:  # type: ignore[union-attr]
        out: Shard | int = x.placement.moved(x.placement.dim + len(ctx.out_shapes) - x.ndim)
    else:
        out = map_shard(x.shape, ctx.out_shapes, x.placement)
    if isinstance(out, int) or other.placement != out:
        return Fallback("shape taken from a tensor with another placement", 0)
    return Strategy({0: x.placement, 1: out}, out)


@register(aten.repeat)
def repeat(ctx: OpCtx) -> Result:
    x = ctx.operands[0]
    if not isinstance(x.placement, Shard):
        return Strategy(keep(ctx), R)
    reps = ctx.args[1]
    od = x.placement.dim + len(reps) - x.ndim
    if reps[od] != 1:
        return Fallback("repeat along the sharded dim", 0)
    return Strategy({0: x.placement}, x.placement.moved(od))


@register(aten.pad, aten.constant_pad_nd)
def pad(ctx: OpCtx) -> Result:
    x = ctx.operands[0]
    if not isinstance(x.placement, Shard):
        return Strategy(keep(ctx), R)
    widths = ctx.args[1]
    touched = {x.ndim - 1 - i // 2 for i, w in enumerate(widths) if w != 0}
    if x.placement.dim in touched:
        return Fallback("padding the sharded dim", 0)
    return Strategy({0: x.placement}, x.placement)


@register(aten.index)
def index(ctx: OpCtx) -> Result:
    """Advanced indexing with replicated index tensors: a gather, linear in x, along unsharded dims."""
    x = ctx.operands[0]
    indices = ctx.args[1]
    idx_ops = [ctx.idx(i) for i in indices if i is not None]
    if any(i is not None and not isinstance(ctx.operands[i].placement, Replicate) for i in idx_ops):
        return Fallback("sharded index tensors", 0)
    want = {i: R for i in range(len(ctx.operands))}
    if isinstance(x.placement, Partial):
        return Strategy(want | {0: P}, P)
    if not isinstance(x.placement, Shard):
        return Strategy(want | {0: R}, R)
    d = x.placement.dim
    pos = [k for k, i in enumerate(indices) if i is not None]
    if d in pos:
        return Fallback("indexing along the sharded dim", 0)
    m = max(len(ctx.operands[ctx.idx(indices[k])].shape) for k in pos)  # type: ignore[index]
    contiguous = pos == list(range(pos[0], pos[-1] + 1))
    if contiguous:
        od = d if d < pos[0] else d - len(pos) + m
    else:
        od = m + sum(1 for k in range(d) if k not in pos)
    return Strategy(want | {0: x.placement}, x.placement.moved(od))


# ----------------------------------------------------------------------------- reductions


def _reduce(ctx: OpCtx, dims: list[int] | None, keepdim: bool, linear: bool) -> Result:
    x = ctx.operands[0]
    nd = x.ndim
    red = list(range(nd)) if not dims else [norm_dim(d, nd) for d in dims]
    if isinstance(x.placement, Partial):
        if linear:
            return Strategy({0: P}, P)
        x = Operand(x.node, x.shape, x.dtype, R)
    p = x.placement
    if not isinstance(p, Shard):
        return Strategy({0: R}, R)
    if p.dim in red:
        if linear and p.split_by(ctx.world):
            return Strategy({0: p}, P)
        return Fallback(f"{ctx.node.target} reduces over the sharded dim {p.dim}", 0)
    od = p.dim if keepdim else p.dim - sum(1 for d in red if d < p.dim)
    return Strategy({0: p}, p.moved(od))


@register(aten.sum)
def sum_(ctx: OpCtx) -> Result:
    dims = ctx.arg("dim")
    if isinstance(dims, int):
        dims = [dims]
    return _reduce(ctx, dims, bool(ctx.arg("keepdim", False)), linear=True)


@register(aten.mean, aten.amax, aten.amin, aten.var, aten.std, aten.any, aten.all, aten.prod, aten.logsumexp)
def reduce_(ctx: OpCtx) -> Result:
    dims = ctx.arg("dim")
    if isinstance(dims, int):
        dims = [dims]
    keepdim = bool(ctx.arg("keepdim", False))
    x = ctx.operands[0]
    p = x.placement
    if (ctx.node.target is aten.mean.dim and isinstance(p, Shard) and p.split_by(ctx.world)
            and dims and p.dim in [norm_dim(d, x.ndim) for d in dims]):
        # mean over the sharded dim = sum of the local sums / N: a Partial, reduced where needed
        # (an RMSNorm over a split projection costs one all-reduce of b*s values, not a gather)
        n = 1
        for d in dims:
            size = as_int(x.shape[norm_dim(d, x.ndim)])
            if size is None:
                return Fallback("mean over a sharded dim with a run-time size", 0)
            n *= size

        def rw(args: tuple, kwargs: dict, rank: int, world: int) -> tuple[tuple, dict]:
            return (args[0], list(dims), keepdim, n), {}

        return Strategy({0: p}, P, rewrite=rw, target=kernels.partial_mean)
    return _reduce(ctx, dims, keepdim, linear=False)


@register(aten.max, aten.min, aten.argmax, aten.argmin, aten.topk, aten.sort, aten.cumsum, aten.cumprod,
          aten.softmax, aten._softmax, aten.log_softmax, aten._log_softmax, aten.logcumsumexp, aten.cummax)
def along_dim(ctx: OpCtx) -> Result:
    """Ops along one dim (softmax, topk, cumsum, max.dim, ...): fine unless that dim is sharded."""
    overload = ctx.node.target._overloadname  # type: ignore[union-attr]
    if overload == "other":  # max(a, b) / min(a, b): elementwise
        return pointwise(ctx)
    x = ctx.operands[0]
    dim = ctx.arg("dim")
    if not isinstance(dim, int):  # full reduction (max.default, argmax without dim)
        return _reduce(ctx, None, False, linear=False)
    dim = norm_dim(dim, x.ndim)
    keepdim = ctx.arg("keepdim", None)
    if keepdim is None:  # softmax, topk, sort, cumsum keep the dim
        keepdim = getattr(ctx.node.target, "overloadpacket", None) not in (aten.max, aten.min, aten.argmax,
                                                                         aten.argmin)
    r = _reduce(ctx, [dim], bool(keepdim), linear=False)
    if isinstance(r, Strategy) and isinstance(ctx.out_shapes, list):
        r.out = tuple([r.out] * len(ctx.out_shapes))
    return r


@register(aten.layer_norm, aten.native_layer_norm, aten.rms_norm)
def norm(ctx: OpCtx) -> Result:  # also group_norm's base (rules_nn.group_norm)
    x = ctx.operands[0]
    nd = x.ndim
    if ctx.node.target in (aten.group_norm.default,):
        red = list(range(1, nd))
    else:
        red = list(range(nd - len(ctx.args[1]), nd))
    p = x.placement
    multi = isinstance(ctx.out_shapes, list)
    if not isinstance(p, Shard):
        return Strategy(keep(ctx), (R, R, R) if multi else R)
    if p.dim in red:
        return Fallback(f"normalization over the sharded dim {p.dim}", 0)
    want = {i: R for i in range(1, len(ctx.operands))} | {0: p}
    return Strategy(want, (p, p.moved(p.dim), p.moved(p.dim)) if multi else p)


# ----------------------------------------------------------------------------- matmuls


def _letters(n: int, start: int = 0) -> str:
    return "".join(chr(ord("A") + start + i) for i in range(n))


def einsum_rule(ctx: OpCtx, specs: list[str], out: str, idx: list[int]) -> Result:
    """Sharding of ``out = einsum(specs..., operands idx...)``. Broadcast (size-1) dims omitted by caller."""
    ops = [ctx.operands[i] for i in idx]
    want: dict[int, Placement] = {i: R for i in range(len(ctx.operands))}
    decide: dict[int, tuple[str, Placement]] = {}
    shard_letters: dict[str, list[Shard]] = {}
    whole: list[int] = []
    for k, (spec, o) in enumerate(zip(specs, ops)):
        if isinstance(o.placement, Shard):
            L = spec[o.placement.dim] if o.placement.dim < len(spec) else None
            if is_whole(o.placement):
                whole.append(k)
                continue
            if L is None or L == "_":
                return Fallback("sharded along a broadcast dim", ctx.idx(o.node))
            shard_letters.setdefault(L, []).append(o.placement)
    for k, (spec, o) in enumerate(zip(specs, ops)):  # a pinned weight overrides what the inputs suggest
        pin = next(iter(o.free.styles)) if o.free is not None and len(o.free.styles) == 1 else None
        if pin == "colwise":
            shard_letters = {}  # its inputs are gathered
        elif pin == "rowwise":
            L = next((c for c in spec if c not in out and c != "_"
                      and any(c in other for j, other in enumerate(specs) if j != k)), None)  # contracted
            size = as_int(o.shape[spec.index(L)]) if L else None
            if L is None or size is None or size < 2 * ctx.world:
                return Fallback("a weight pinned rowwise has no contracted dim to split", idx[k])
            saved = o.free.segs if o.free is not None else None
            segs = saved if saved and sum(saved) == size else (size,)  # a saved plan's parts
            shard_letters = {L: [Shard(0, ctx.world, segs)]}  # its inputs are split locally
    if len(shard_letters) > 1:
        return Fallback(f"operands sharded on different letters {sorted(shard_letters)}", idx[1])
    if not shard_letters:
        return _colwise_or_replicated(specs, out, idx, ops, want, decide)
    (L, shards), = shard_letters.items()
    # held whole on every rank beside operands split on L (one key/value head against the query heads): it stays
    # as it is, its gradient partial over the ranks like any value several ranks hold (cut to L's shard if it
    # has that letter)
    for k in whole:
        want[idx[k]] = ops[k].placement
    best = finest(shards)
    if best is None:
        return Fallback("operands sharded with incompatible layouts", idx[0])
    contracted = L not in out
    if contracted and not best.split_by(ctx.world):
        best = Shard(best.dim, ctx.world, best.segs)
        if any(s % ctx.world for s in best.segs):
            return Fallback("contracted dim not divisible by the world size", idx[0])
    for k, (spec, o) in enumerate(zip(specs, ops)):
        if L in spec:
            d = spec.index(L)
            sh = best.moved(d)
            if o.free is not None:
                style = "rowwise" if contracted else "shard"
                if style not in o.free.styles:
                    return Fallback(f"a weight here is pinned to {sorted(o.free.styles)}", idx[k])
                decide[idx[k]] = (style, sh)
            want[idx[k]] = sh
        elif o.free is not None:
            decide[idx[k]] = ("replicate", R)
    return Strategy(want, P if contracted else best.moved(out.index(L)), decide)


def _colwise_or_replicated(specs: list[str], out: str, idx: list[int], ops: list[Operand],
                           want: dict[int, Placement], decide: dict[int, tuple[str, Placement]]) -> Strategy:
    """Nothing arrives split: the first free weight with an output-only letter is split column-wise on it
    (by parts where it has them, in as many groups as divide each part), else everything stays replicated."""
    for k, (spec, o) in enumerate(zip(specs, ops)):
        if o.free is None or "colwise" not in o.free.styles:
            continue
        for d, L in enumerate(spec):
            if L in out and all(L not in s for j, s in enumerate(specs) if j != k):
                size = as_int(o.shape[d])
                if size is None:
                    break
                segs = o.free.segs or (size,)
                if sum(segs) != size:
                    break
                caps = o.free.sgroups or (o.free.groups,) * len(segs)
                gs = tuple(math.gcd(math.gcd(c, o.free.groups), s) for c, s in zip(caps, segs))
                g = max(gs)
                if g < o.free.groups and len(segs) == 1 and size >= 4 * o.free.groups and o.free.uneven:
                    g, gs = o.free.groups, (o.free.groups,)  # an uneven split (tensor_split bounds)
                if g < 2:
                    break
                sh = Shard(d, g, segs, gs)
                decide[idx[k]] = ("colwise", sh)
                want[idx[k]] = sh
                return Strategy(want, sh.moved(out.index(L)), decide)
    for k, o in enumerate(ops):
        if o.free is not None:
            decide[idx[k]] = ("replicate", R)
    return Strategy(want, R, decide)


@register(aten.linear)
def linear(ctx: OpCtx) -> Result:
    x = ctx.operands[0]
    b = _letters(x.ndim - 1)
    if len(ctx.operands) > 2:
        return Fallback("linear with bias (decomposed by the planner)", 2)
    return einsum_rule(ctx, [b + "k", "nk"], b + "n", [0, 1])


@register(aten.mm)
def mm(ctx: OpCtx) -> Result:
    return einsum_rule(ctx, ["mk", "kn"], "mn", [0, 1])


def _batch_spec(o: Operand, nb: int, tail: str) -> str:
    lead = _letters(nb)
    spec = lead[nb - (o.ndim - 2):] + tail
    return "".join("_" if i < o.ndim - 2 and o.shape[i] == 1 else c for i, c in enumerate(spec))


@register(aten.bmm, aten.matmul)
def matmul(ctx: OpCtx) -> Result:
    a, b = ctx.operands[0], ctx.operands[1]
    if a.ndim < 2 or b.ndim < 1:
        return Fallback("matmul of vectors", 0)
    if b.ndim == 1:
        return einsum_rule(ctx, [_letters(a.ndim - 1) + "k", "k"], _letters(a.ndim - 1), [0, 1])
    if b.ndim == 2:
        la = _letters(a.ndim - 1)
        return einsum_rule(ctx, [la + "k", "kn"], la + "n", [0, 1])
    nb = max(a.ndim, b.ndim) - 2
    sa, sb = _batch_spec(a, nb, "mk"), _batch_spec(b, nb, "kn")
    return einsum_rule(ctx, [sa, sb], _letters(nb) + "mn", [0, 1])


@register(aten.einsum)
def einsum(ctx: OpCtx) -> Result:
    eq = ctx.args[0].replace(" ", "")
    if "..." in eq or "->" not in eq:
        return Fallback("einsum with ellipsis or implicit output", 0)
    lhs, out = eq.split("->")
    specs = lhs.split(",")
    tensors = ctx.args[1]
    idx = [ctx.idx(t) for t in tensors]
    if None in idx:
        return Fallback("einsum operand not a tensor", 0)
    return einsum_rule(ctx, specs, out, idx)  # type: ignore[arg-type]


@register(aten._grouped_mm)
@register_name("transformers::grouped_mm_fallback")
def grouped_mm(ctx: OpCtx) -> Result:
    """Experts: rows of x grouped by ``offs`` times weight[e]: ``tk,ekn->tn`` (each expert split alike)."""
    x, w = ctx.operands[0], ctx.operands[1]
    if x.ndim != 2 or w.ndim != 3:
        return Fallback("grouped_mm other than 2-D x 3-D", 0)
    return einsum_rule(ctx, ["tk", "ekn"], "tn", [0, 1])


@register(aten.scaled_dot_product_attention)
def sdpa(ctx: OpCtx) -> Result:
    qi, ki, vi = (ctx.idx(a) for a in ctx.args[:3])  # key and value may be the same tensor
    if None in (qi, ki, vi):
        return Fallback("sdpa operands that are not tensors", 0)
    q, k, v = ctx.operands[qi], ctx.operands[ki], ctx.operands[vi]  # type: ignore[index]
    if ctx.kwargs.get("enable_gqa"):
        return Fallback("sdpa with enable_gqa", ki)
    nb = q.ndim - 2
    specs = [_batch_spec(q, nb, "st"), _batch_spec(k, nb, "ud"), _batch_spec(v, nb, "ue")]
    specs[0] = specs[0][:-1] + "d"
    idx = [qi, ki, vi]
    mask = ctx.idx(ctx.args[3]) if len(ctx.args) > 3 else ctx.idx(ctx.kwargs.get("attn_mask"))
    if mask is not None:
        m = ctx.operands[mask]
        pad = nb + 2 - m.ndim
        lead = _letters(nb)
        spec = "".join("_" if (i < nb and (i < pad or m.shape[i - pad] == 1)) else c
                       for i, c in enumerate(lead + "su"))[pad:]
        specs.append(spec)
        idx.append(mask)
    r = einsum_rule(ctx, specs, _letters(nb) + "se", cast(list[int], idx))
    if isinstance(r, Strategy) and isinstance(r.out, Partial):
        return Fallback("attention over a sharded head dim or sequence", 0)
    return r


@register(aten.embedding)
def embedding(ctx: OpCtx) -> Result:
    w, ids = ctx.operands[0], ctx.operands[1]
    if isinstance(ids.placement, Shard):
        return Fallback("sharded token ids", 1)
    nd = len(ctx.out_shapes)
    if w.free is not None:
        vocab = as_int(w.shape[0])
        g = w.free.groups  # uneven vocab splits are fine (balanced chunks, masked lookup)
        if "vocab" in w.free.styles and g == ctx.world and vocab is not None and vocab >= 2 * g:
            sh = Shard(0, g, (vocab,))  # type: ignore[arg-type]
            return Strategy({0: sh, 1: R}, P, {0: ("vocab", sh)}, rewrite=_vocab_rewrite(sh), target=_vocab_op())
        cols = as_int(w.shape[1])
        if "vocab" not in w.free.styles and "shard" in w.free.styles and cols is not None and cols % g == 0:
            # split on the embedding dim (T5's relative position bias: one column per head, looked up straight
            # into the head-sharded attention scores); chosen by propagation's reduce-then-split trial
            sh = Shard(1, g, (cols,))  # type: ignore[arg-type]
            return Strategy({0: sh, 1: R}, Shard(nd - 1, g, (cols,)), {0: ("shard", sh)})  # type: ignore[arg-type]
        return Strategy({0: R, 1: R}, R, {0: ("replicate", R)})
    p = w.placement
    if isinstance(p, Shard) and p.dim == 0 and p.groups == ctx.world and len(p.segs) == 1:
        return Strategy({0: p, 1: R}, P, rewrite=_vocab_rewrite(p), target=_vocab_op())
    if isinstance(p, Shard) and p.dim == 1:
        return Strategy({0: p, 1: R}, p.moved(nd - 1))
    return Strategy({0: R, 1: R}, R)


def _vocab_op() -> Any:
    from .kernels import vocab_embedding

    return vocab_embedding


def _vocab_rewrite(p: Shard) -> Rewrite:
    def rw(args: tuple, kwargs: dict, rank: int, world: int) -> tuple[tuple, dict]:
        start, n = chunk_range(p.segs[0], p.groups, p.chunk(rank, world))
        padding_idx = args[2] if len(args) > 2 else kwargs.get("padding_idx", -1)
        return (args[0], args[1], start, n, padding_idx), {}

    return rw


@register(aten.cross_entropy_loss, aten.nll_loss, aten.nll_loss_forward, aten.nll_loss2d_forward,
          aten.nll_loss_nd, aten.binary_cross_entropy_with_logits, aten.mse_loss)
def loss(ctx: OpCtx) -> Result:
    x = ctx.operands[0]
    p = x.placement
    if (ctx.node.target is aten.cross_entropy_loss.default and isinstance(p, Shard) and x.ndim == 2
            and p.dim == 1 and p.groups == ctx.world and len(p.segs) == 1 and ctx.arg("weight") is None
            and not ctx.arg("label_smoothing", 0.0) and len(ctx.operands) == 2
            and not isinstance(ctx.operands[1].placement, Shard)):
        # vocab-parallel cross-entropy: max, sum-exp and target logit reduced over ranks (3 all-reduces of
        # N values), never the logits
        reduction, ignore = ctx.arg("reduction", 1), ctx.arg("ignore_index", -100)

        def rw(args: tuple, kwargs: dict, rank: int, world: int) -> tuple[tuple, dict]:
            start, _ = chunk_range(p.segs[0], p.groups, p.chunk(rank, world))
            return (args[0], args[1], start, reduction, ignore, WORLD), {}

        return Strategy({0: p, 1: R}, R, rewrite=rw, target=_parallel_ce())
    if any(isinstance(o.placement, Shard) for o in ctx.operands):
        return Fallback("the loss needs the full class dim", 0)
    return Strategy(keep(ctx), R)


def _parallel_ce() -> Any:
    from .collectives import parallel_cross_entropy

    return parallel_cross_entropy


# ----------------------------------------------------------------------------- shapes-as-values


@register(aten.sym_size, aten.sym_stride, aten.sym_numel)
def sym_size(ctx: OpCtx) -> Result:
    x = ctx.operands[0]
    if isinstance(x.placement, Shard) and (len(ctx.args) < 2 or norm_dim(ctx.args[1], x.ndim) == x.placement.dim):
        return Fallback("the size of a sharded dim is read at run time", 0)
    return Strategy({0: x.placement if not isinstance(x.placement, Partial) else P}, R)


@register(aten._assert_tensor_metadata, aten.new_zeros, aten.new_ones, aten.new_empty, aten.new_full,
          aten._assert_scalar)
def metadata_only(ctx: OpCtx) -> Result:
    """Ops that read only dtype/device of their tensor input: any placement, replicated output."""
    return Strategy({i: o.placement for i, o in enumerate(ctx.operands)}, R)


@register(operator.getitem)
def getitem(ctx: OpCtx) -> Result:  # handled by the planner (tuple outputs)
    raise AssertionError("getitem is resolved by the planner")
