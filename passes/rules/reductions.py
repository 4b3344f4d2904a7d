"""Reductions and normalizations over the hidden dim (sums, means, norms)."""


from __future__ import annotations

from .. import kernels
from ..placements import P, Partial, R, Shard
from ..shapes import as_int
from .core import Fallback, OpCtx, Operand, Result, Strategy, aten, keep, norm_dim, register
from .elementwise import pointwise

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


@register(aten.sum, seq_local=True)
def sum_(ctx: OpCtx) -> Result:
    dims = ctx.arg("dim")
    if isinstance(dims, int):
        dims = [dims]
    return _reduce(ctx, dims, bool(ctx.arg("keepdim", False)), linear=True)


@register(aten.mean, aten.amax, aten.amin, aten.var, aten.std, aten.any, aten.all, aten.prod, aten.logsumexp, seq_local=True)
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


@register(aten.layer_norm, aten.native_layer_norm, aten.rms_norm, seq_local=True)
def norm(ctx: OpCtx) -> Result:  # also group_norm's base (nn.group_norm)
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
