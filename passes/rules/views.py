"""Views and reshapes, transposes, slicing, cat/stack, padding and indexing: a split carried through a change of layout."""


from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

from ..placements import P, Partial, Placement, R, Replicate, Shard, group_at, is_whole
from ..shapes import Cut, as_int, divisible_prefix, map_shard, view_groups
from .core import (
    Fallback,
    OpCtx,
    Result,
    Strategy,
    aten,
    check_sizes_static,
    finest,
    keep,
    local_len,
    norm_dim,
    register,
    resize_arg,
    sharded,
)

if TYPE_CHECKING:
    from .core import Operand, Rewrite  # annotations only

# ----------------------------------------------------------------------------- views


def _pass_partial(ctx: OpCtx) -> Strategy | None:
    if isinstance(ctx.operands[0].placement, Partial):
        return Strategy({0: P} | {i: R for i in range(1, len(ctx.operands))}, P)
    return None


def _view(ctx: OpCtx) -> Result:  # the rule of ``view`` below, which refines its reasons
    if (s := _pass_partial(ctx)) is not None:
        return s
    x = ctx.operands[0]
    if not isinstance(x.placement, Shard):
        return Strategy({0: R}, R)
    out = map_shard(x.shape, ctx.out_shapes, x.placement)
    if isinstance(out, Cut):
        return _cut(ctx, out)
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


def _cut(ctx: OpCtx, cut: Cut) -> Fallback:
    """Ask the weights behind the split for uneven chunks of whole ``cut.unit`` elements (whole heads)."""
    p = cast(Shard, ctx.operands[0].placement)
    return Fallback(f"view {list(ctx.operands[0].shape)} -> {list(ctx.out_shapes)} splits the sharded dim into "
                    f"parts not divisible by {p.groups}: uneven whole parts of {cut.unit}", 0, unit=cut.unit,
                    within=p.segs)


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


def _each_part(p: Placement, dim: int, why: str) -> Fallback | None:
    """Taking single entries of a dim split unevenly in whole parts (``[.., 3E] -> [.., 3, E]`` split as 2 and 1
    parts, then q, k and v taken out): ask for each part split on its own instead (a fused projection)."""
    if not isinstance(p, Shard) or p.dim != dim or len(p.segs) != 1 or not p.uneven:
        return None
    n = p.segs[0]
    return Fallback(f"{why}: each of its {n} parts is split on its own", 0, segs=(1,) * n,
                    sgroups=(p.groups,) * n, within=p.segs)


@register(aten.select)
def select(ctx: OpCtx) -> Result:
    s = norm_dim(ctx.args[1], ctx.operands[0].ndim)
    if (parts := _each_part(ctx.operands[0].placement, s, "select along a dim split unevenly")) is not None:
        return parts
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
    """The segments covering [start, end) (as a Shard of them) and their index range [i0, i1) -- None if not on
    segment boundaries."""
    off, i0, i1 = 0, None, None
    for i, s in enumerate(p.segs):
        if off == start:
            i0 = i
        off += s
        if off == end:
            i1 = i + 1
    if i0 is None or i1 is None or i1 <= i0:
        return None
    gs = p.seg_groups[i0:i1]
    return Shard(p.dim, max(gs), p.segs[i0:i1], gs, p.unit), i0, i1


Locate = Callable[[int, int], list[tuple[int, int]]]  # (rank, world) -> each part's local [start, end)


def _split_on_shard(ctx: OpCtx, bounds: list[tuple[int, int]], dim: int) -> tuple[Strategy, Locate] | Fallback:
    """Parts [a, b) of the sharded dim, each a run of whole segments: their placements, and where each part lies
    in a rank's local tensor (uneven chunks: a rank's own sizes). Otherwise ask for segments cut at the bounds."""
    x = ctx.operands[0]
    p = x.placement
    assert isinstance(p, Shard)
    if is_whole(p):  # held whole on every rank: any part is local, as it is
        return Strategy({0: p}, tuple(Shard(dim, 1, (b - a,)) for a, b in bounds)), lambda r, w: list(bounds)
    outs, spans = [], []
    for a, b in bounds:
        sel = _select_segs(p, a, b)
        if sel is None:
            segs = _cuts(p, [c for ab in bounds for c in ab])
            why = f"split of the sharded dim at {sorted({c for ab in bounds for c in ab})} does not fall on shard " \
                  f"boundaries"
            if segs is None:
                return Fallback(why, 0)
            # each segment split as finely as it allows: a part smaller than the group count (a single key or
            # value head beside the query heads) is held whole on every rank
            gs, off = [], 0
            for s in segs:
                g0 = group_at(p.segs, p.seg_groups, off)  # the group count of the segment it refines
                taken = any(a <= off and off + s <= b for a, b in bounds)
                # a part not taken here keeps its count; one taken is split as finely as it divides, or, where
                # nothing above 1 divides it, unevenly (q of GPT-2's c_attn: 64 rows on 3 ranks)
                g = math.gcd(g0, s) if taken else g0
                gs.append(g0 if taken and g == 1 and s >= 2 * g0 else g)
                off += s
            return Fallback(why, 0, segs=segs, sgroups=tuple(gs), within=p.segs)
        outs.append(sel[0].moved(dim))
        spans.append((sel[1], sel[2]))

    def locate(rank: int, world: int) -> list[tuple[int, int]]:
        loc = p.local_segs(rank, world)
        return [(sum(loc[:i0]), sum(loc[:i1])) for i0, i1 in spans]

    return Strategy({0: p}, tuple(outs)), locate


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
    strat, locate = res

    def rw(args: tuple, kwargs: dict, rank: int, world: int) -> tuple[tuple, dict]:
        (ls, le), = locate(rank, world)
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
    strat, locate = res

    def rw(args: tuple, kwargs: dict, rank: int, world: int) -> tuple[tuple, dict]:
        return (args[0], [b - a for a, b in locate(rank, world)], dim), {}

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
        units = {o.placement.unit for o in ops}  # type: ignore[union-attr]
        if len(units) > 1:
            return Fallback("concatenating splits in whole parts of different sizes", 0)
        return Strategy(keep(ctx), Shard(dim, max(gs), segs, gs, units.pop()))
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
def flatten(ctx: OpCtx) -> Result:  # also unflatten's base (``unflatten`` below)
    """flatten/unflatten are views whose output shape is known: move the shard like a view."""
    if (s := _pass_partial(ctx)) is not None:
        return s
    x = ctx.operands[0]
    if not isinstance(x.placement, Shard):
        return Strategy(keep(ctx), R)
    out = map_shard(x.shape, ctx.out_shapes, x.placement)
    if isinstance(out, Cut):
        return _cut(ctx, out)
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
        out: Shard | Cut | int = x.placement.moved(x.placement.dim + len(ctx.out_shapes) - x.ndim)
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
        return _each_part(x.placement, d, "indexing along a dim split unevenly") \
            or Fallback("indexing along the sharded dim", 0)
    m = max(len(ctx.operands[ctx.idx(indices[k])].shape) for k in pos)  # type: ignore[index]
    contiguous = pos == list(range(pos[0], pos[-1] + 1))
    if contiguous:
        od = d if d < pos[0] else d - len(pos) + m
    else:
        od = m + sum(1 for k in range(d) if k not in pos)
    return Strategy(want | {0: x.placement}, x.placement.moved(od))




# ----------------------------------------------------------------------------- refinements: unflatten, view

@register(aten.unflatten)
def unflatten(ctx: OpCtx) -> Result:
    """As ``flatten``; when the sharded dim of a single-segment shard is unflattened into ``[n, ..]``
    parts (a fused q/k/v projection ``[.., 3E] -> [.., 3, E]``), ask for ``n`` segments (each part split)."""
    r = flatten(ctx)
    if not isinstance(r, Fallback) or r.groups or r.segs or r.unit:
        return r
    x = ctx.operands[0]
    p = x.placement
    if not isinstance(p, Shard) or len(p.segs) != 1 or p.dim != norm_dim(ctx.args[1], x.ndim):
        return r
    n, size = ctx.args[2][0], p.segs[0]
    if isinstance(n, int) and n > 1 and size % n == 0 and (size // n) % p.groups == 0:
        return Fallback(f"{ctx.node.target} cuts the sharded dim {size} into {n} parts (a fused projection): "
                        f"each part is split on its own", 0, segs=(size // n,) * n, within=p.segs)
    return r


@register(aten.view, aten.reshape, aten._unsafe_view)
def view(ctx: OpCtx) -> Result:
    """As ``_view``, with a precise reason when the sharded dim is folded together with a run-time size."""
    r = _view(ctx)
    if not isinstance(r, Fallback) or r.groups:
        return r
    x = ctx.operands[0]
    p = x.placement
    groups = view_groups(x.shape, ctx.out_shapes) if isinstance(p, Shard) else None
    for gi, gj in groups or []:
        if p.dim in gi:  # type: ignore[union-attr]
            sizes = [x.shape[k] for k in gi] + [ctx.out_shapes[k] for k in gj]
            dyn = [s for s in sizes if as_int(s) is None]
            if dyn:
                r.reason = (f"view {list(x.shape)} -> {list(ctx.out_shapes)} folds the sharded dim together with "
                            f"the run-time size {dyn[0]} (as nn.MultiheadAttention's [seq, batch*heads, head_dim] "
                            f"does): no static split describes it, so that region runs replicated")
            break
    return r
