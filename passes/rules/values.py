"""Ops whose results are shapes or metadata, not tensors."""


from __future__ import annotations

import operator

from ..placements import P, Partial, R, Shard
from .core import Fallback, OpCtx, Result, Strategy, aten, norm_dim, register

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
