"""Pointwise ops (one rule, the operands' common split) and dropout (a split value draws its chunk of the unsharded run's noise)."""


from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from .. import kernels
from ..placements import P, Partial, Placement, R, Replicate, Shard, is_whole
from ..shapes import hint
from .core import (
    Fallback,
    OpCtx,
    Operand,
    Result,
    Strategy,
    aten,
    finest,
    keep,
    register,
    register_late,
    sharded,
)

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


@register(*POINTWISE, seq_local=True)
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


def _memory_order(val: Any) -> tuple[int, ...]:
    """The dims of a (fake) tensor, outermost in memory first (by the strides' hints: no guard is added, so
    no dynamic dim is specialized)."""
    strides = [hint(s, 0) for s in val.stride()]
    return tuple(sorted(range(val.dim()), key=lambda d: -strides[d]))


@register_late(aten.dropout, aten.native_dropout)
def dropout_chunk(node: fx.Node, pl: Any, args: tuple, kwargs: dict, rank: int, world: int
                  ) -> tuple[Any, tuple, dict]:
    """A dropout of a split value becomes ``kernels.dropout_chunk`` (the unsharded run's noise, this rank's
    chunk); one of a value every rank holds whole draws the whole noise already and stays."""
    pl = pl[0] if isinstance(pl, (list, tuple)) else pl  # native_dropout: (out, mask), placed alike
    if not isinstance(pl, Shard) or is_whole(pl) or kwargs:
        return node.target, args, kwargs
    x, p, train = args
    order = _memory_order(node.args[0].meta["val"])  # type: ignore[union-attr]
    native = node.target is torch.ops.aten.native_dropout.default
    return kernels.dropout_chunk, (x, p, train, pl.dim, pl.groups, pl.segs, pl.sgroups, order, rank, world,
                                   native) + ((pl.unit,) if pl.unit != 1 else ()), {}
