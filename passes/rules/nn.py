"""Sharding rules for non-transformer modules: convolutions, pooling, batch/instance/group norm, baddbmm.

The idea: channels are to a CNN what features are to a transformer. A convolution with ``groups=1`` is a
matmul over channels whose spatial and kernel dims are carried along, so it is the einsum
``B k ... , O k ... -> B O ...`` with the spatial/kernel dims as unshardable letters (``_``):
fed a replicated activation it splits its weight on the output channels (``colwise``, W ``Shard(0)``,
output ``Shard(1)``), fed an activation split on the input channels it splits W on dim 1 (``rowwise``,
output ``Partial``). The conv bias is split off by ``decompose_bias`` (``passes/normalize.py``) so the
pointwise rule places it like a linear bias: sharded after a column split, added once after the
reduction of a row split.

A grouped convolution (depthwise: ``groups == in == out channels``) is block diagonal over channel
groups: a channel shard that falls on group boundaries stays local, the weight is split on dim 0 with
the same boundaries and the ``groups`` argument becomes the local group count. Everything per-channel
keeps the channel shard: pooling and upsampling (over the spatial dims only), batch and instance norm
(statistics per channel; weight/bias ``Shard(0)``, the running-stat *buffers* stay whole on every rank:
``sharded_batch_norm`` reads this rank's chunk and, in training, gathers every rank's updated chunk back
into the whole buffer, a small all-gather inside the kernel), group norm when a rank's
channels are whole groups (``num_groups`` becomes local).

Messages never name a parameter: the planner memoizes rule results across identical layers.

Two wrappers in ``views.py`` refine its rules without changing what they accept: ``unflatten`` of a sharded
fused projection (``nn.MultiheadAttention``'s in_proj ``[.., 3E] -> [.., 3, E]``) asks for q/k/v
segments instead of giving up, and a ``view`` that folds the sharded dim together with a run-time size
(MHA's ``[S, B, E] -> [S, B*heads, d]``, which no static ``Shard`` can describe) says so in its reason.
With a dynamic batch, MHA's attention is therefore replicated (its MLP still splits); the fused kernels
``_native_multi_head_attention`` / ``_transformer_encoder_layer_fwd`` (never emitted by export) fall back.
"""


from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx as fx

from ..kernels import sharded_batch_norm, sharded_instance_norm
from ..placements import P, Partial, Placement, R, Shard
from ..shapes import as_int
from .core import WORLD, Fallback, OpCtx, Operand, Result, Rewrite, Strategy, register, uniform_only
from .matmuls import einsum_rule
from .reductions import norm

aten = torch.ops.aten

# ----------------------------------------------------------------------------- convolutions

TRANSPOSED_CONVS = (aten.conv_transpose1d, aten.conv_transpose2d, aten.conv_transpose3d)


def _set_arg(ctx: OpCtx, name: str, value: Any) -> Rewrite:
    """Rewrite argument ``name`` (found in the op's schema) to a constant."""
    schema = ctx.node.target._schema  # type: ignore[union-attr]
    pos = next(i for i, a in enumerate(schema.arguments) if a.name == name)

    def rw(args: tuple, kwargs: dict, rank: int, world: int) -> tuple[tuple, dict]:
        if name in kwargs or len(args) <= pos:
            return args, {**kwargs, name: value}
        return args[:pos] + (value,) + args[pos + 1 :], kwargs

    return rw


def _divisor_fitting(g: int, ok: Any) -> int:
    """The largest divisor ``d`` of ``g`` with ``ok(d)``, or 1."""
    return max((d for d in range(1, g + 1) if g % d == 0 and ok(d)), default=1)


@register(aten.conv1d, aten.conv2d, aten.conv3d, aten.convolution, *TRANSPOSED_CONVS)
@uniform_only
def conv(ctx: OpCtx) -> Result:
    """Convolutions (plain, ``.padding`` overloads, transposed): a matmul over channels."""
    xi, wi = ctx.idx(ctx.arg("input")), ctx.idx(ctx.arg("weight"))
    if xi is None or wi is None:
        return Fallback("convolution operands that are not tensors")
    bias = ctx.arg("bias")
    if isinstance(bias, fx.Node):
        return Fallback("convolution with bias (decomposed by the planner)", ctx.idx(bias))
    packet = ctx.node.target.overloadpacket  # type: ignore[union-attr]
    transposed = packet in TRANSPOSED_CONVS or (packet is aten.convolution and bool(ctx.arg("transposed")))
    x, w = ctx.operands[xi], ctx.operands[wi]
    nsp = w.ndim - 2
    batched = x.ndim == nsp + 2
    cdim = 1 if batched else 0
    for i, o in ((xi, x), (wi, w)):
        if isinstance(o.placement, Shard) and o.placement.dim >= o.ndim - nsp:
            return Fallback(f"convolution over a sharded spatial/kernel dim {o.placement.dim}", i)
    groups = ctx.arg("groups", 1)
    if not isinstance(groups, int):
        return Fallback("convolution with a run-time group count", xi)
    lead, sp = ("B" if batched else ""), "_" * nsp
    if groups == 1:
        wspec = ("kO" if transposed else "Ok") + sp
        return einsum_rule(ctx, [lead + "k" + sp, wspec], lead + "O" + sp, [xi, wi])
    return _grouped_conv(ctx, xi, wi, groups, transposed, cdim)


def _grouped_conv(ctx: OpCtx, xi: int, wi: int, G: int, transposed: bool, cdim: int) -> Result:
    """Block-diagonal over ``G`` channel groups: shard on whole groups, ``groups`` becomes ``G / g``.

    W is ``[Cout, C/G, k..]`` (transposed: ``[C, Cout/G, k..]``): its dim 0 carries the groups either way."""
    x, w = ctx.operands[xi], ctx.operands[wi]
    C, Cout = as_int(x.shape[cdim]), as_int(ctx.out_shapes[cdim])
    if C is None or Cout is None:
        return Fallback("grouped convolution with run-time channel counts", xi)
    cpg, opg = C // G, Cout // G
    want: dict[int, Placement] = {i: R for i in range(len(ctx.operands))}

    def strategy(g: int, csegs: tuple[int, ...], style: str) -> Result:
        osegs = tuple(s // cpg * opg for s in csegs)
        wsh = Shard(0, g, csegs if transposed else osegs)
        decide: dict[int, tuple[str, Placement]] = {}
        if w.free is not None:
            if style not in w.free.styles:
                return Fallback(f"the convolution weight is pinned to {sorted(w.free.styles)}", xi)
            decide[wi] = (style, wsh)
        return Strategy(want | {xi: Shard(cdim, g, csegs), wi: wsh}, Shard(cdim, g, osegs), decide,
                        rewrite=_set_arg(ctx, "groups", G // g))

    def aligned(g: int, csegs: tuple[int, ...]) -> bool:
        return all(s % (g * cpg) == 0 for s in csegs)

    p = x.placement
    if isinstance(p, Shard) and p.dim == cdim:
        if p.uneven or not aligned(p.groups, p.segs):
            g = _divisor_fitting(p.groups, lambda d: aligned(d, p.segs))
            return Fallback(f"channel shard of a grouped convolution (groups={G}) is not on group boundaries",
                            xi, groups=g if g > 1 else None)
        return strategy(p.groups, p.segs, "shard")
    rep: dict[int, tuple[str, Placement]] = {wi: ("replicate", R)} if w.free is not None else {}
    if isinstance(p, Shard):  # split on the batch dim: every rank convolves its samples with the full W
        return Strategy(want | {xi: p}, p.moved(p.dim), rep)
    if w.free is not None and "colwise" in w.free.styles:
        # a replicated input is sliced locally to the channels of this rank's groups; segments the planner
        # asked for (on W's dim 0) are honoured when they fall on group boundaries
        wsegs = w.free.segs or ((C,) if transposed else (Cout,))
        csegs = wsegs if transposed else tuple(s // opg * cpg for s in wsegs)
        if transposed or all(s % opg == 0 for s in wsegs):
            g = _divisor_fitting(math.gcd(w.free.groups, G), lambda d: aligned(d, csegs))
            if g >= 2:
                return strategy(g, csegs, "colwise")
    wp = w.placement
    if w.free is None and isinstance(wp, Shard) and wp.dim == 0 and len(wp.segs) == 1 and aligned(wp.groups, (C,)):
        return strategy(wp.groups, (C,), "shard")
    return Strategy(want, R, rep)


# ----------------------------------------------------------------------------- pooling and friends


def _spatial_ops() -> dict[Any, tuple[int, bool]]:
    """op packet -> (number of trailing spatial dims, linear in its input)."""
    table: dict[Any, tuple[int, bool]] = {}
    for n in (1, 2, 3):
        for name, linear in ((f"max_pool{n}d", False), (f"max_pool{n}d_with_indices", False),
                             (f"avg_pool{n}d", True), (f"adaptive_avg_pool{n}d", True),
                             (f"_adaptive_avg_pool{n}d", True), (f"adaptive_max_pool{n}d", False),
                             (f"reflection_pad{n}d", True), (f"replication_pad{n}d", True),
                             (f"upsample_nearest{n}d", True), (f"_upsample_nearest_exact{n}d", True)):
            op = getattr(aten, name, None)
            if op is not None:
                table[op] = (n, linear)
    for name, n in (("upsample_linear1d", 1), ("upsample_bilinear2d", 2), ("upsample_bicubic2d", 2),
                    ("upsample_trilinear3d", 3), ("_upsample_bilinear2d_aa", 2), ("_upsample_bicubic2d_aa", 2)):
        op = getattr(aten, name, None)
        if op is not None:
            table[op] = (n, True)
    return table


SPATIAL = _spatial_ops()


@register(*SPATIAL)
@uniform_only
def spatial(ctx: OpCtx) -> Result:
    """Pooling, upsampling and reflection/replication padding act on the trailing spatial dims of each
    channel independently: any other sharded dim (channels, batch) is kept; linear ones carry Partial."""
    nsp, linear = SPATIAL[ctx.node.target.overloadpacket]  # type: ignore[union-attr]
    x = ctx.operands[0]
    n_out = len(ctx.out_shapes) if isinstance(ctx.out_shapes, list) else None
    p = x.placement
    rest: dict[int, Placement] = {i: R for i in range(1, len(ctx.operands))}
    if isinstance(p, Partial) and linear and n_out is None:
        return Strategy(rest | {0: P}, P)
    if not isinstance(p, Shard):
        return Strategy(rest | {0: R}, (R,) * n_out if n_out else R)
    if p.dim >= x.ndim - nsp:
        return Fallback(f"{ctx.node.target} over the sharded spatial dim {p.dim}", 0)
    out = p.moved(p.dim)
    return Strategy(rest | {0: p}, (out,) * n_out if n_out else out)


# ----------------------------------------------------------------------------- normalization


def _param_want(ctx: OpCtx, i: int | None, sh: Shard, want: dict[int, Placement],
                decide: dict[int, tuple[str, Placement]]) -> str | None:
    """Operand ``i`` (a per-channel weight, maybe absent) split like ``sh``; an error text if it cannot be."""
    if i is None:
        return None
    o: Operand = ctx.operands[i]
    if o.free is not None:
        if "shard" not in o.free.styles:
            return f"a per-channel weight here is pinned to {sorted(o.free.styles)}"
        decide[i] = ("shard", sh)
    want[i] = sh
    return None


@register(aten.batch_norm, aten.instance_norm)
@uniform_only
def batch_norm(ctx: OpCtx) -> Result:
    """Statistics per channel: a channel shard stays local (weight/bias ``Shard(0)``, running stats
    narrowed at run time). Training statistics reduce over batch and spatial dims, which must be whole."""
    instance = ctx.node.target.overloadpacket is aten.instance_norm  # type: ignore[union-attr]
    x = ctx.operands[0]
    p = x.placement
    training = bool(ctx.arg("use_input_stats" if instance else "training"))
    idx = {n: ctx.idx(ctx.arg(n)) for n in ("weight", "bias", "running_mean", "running_var")}
    want: dict[int, Placement] = {i: R for i in range(len(ctx.operands))}
    if not isinstance(p, Shard):
        return Strategy(want, R)  # a Partial input is reduced first: the normalization is not linear
    if p.dim != 1:
        reduced = training and (p.dim >= 2 or not instance or idx["running_mean"] is not None)
        if reduced:
            return Fallback(f"{ctx.node.target} computes statistics over the sharded dim {p.dim}", 0)
        return Strategy(want | {0: p}, p)
    if p.unit != 1:
        return Fallback(f"{ctx.node.target} over channels split in whole parts of {p.unit}", 0)
    sh = p.moved(0)
    decide: dict[int, tuple[str, Placement]] = {}
    for name in ("weight", "bias"):
        if (err := _param_want(ctx, idx[name], sh, want, decide)) is not None:
            return Fallback(err, 0)
    want[0] = p

    def rw(args: tuple, kwargs: dict, rank: int, world: int) -> tuple[tuple, dict]:
        names = ("input", "weight", "bias", "running_mean", "running_var",
                 "use_input_stats" if instance else "training", "momentum", "eps", "cudnn_enabled")
        schema = ctx.node.target._schema  # type: ignore[union-attr]
        full = [kwargs.get(n, args[k] if k < len(args) else schema.arguments[k].default_value)
                for k, n in enumerate(names)]
        return tuple(full) + (list(p.segs), p.groups, rank, world, WORLD), {}

    return Strategy(want, p.moved(1), decide, rewrite=rw,
                    target=sharded_instance_norm if instance else sharded_batch_norm)


@register(aten.group_norm)
@uniform_only
def group_norm(ctx: OpCtx) -> Result:
    """Group norm over a channel shard made of whole groups: ``num_groups`` becomes local."""
    x = ctx.operands[0]
    p = x.placement
    if not (isinstance(p, Shard) and p.dim == 1):
        return norm(ctx)
    G = ctx.arg("num_groups")
    C = as_int(x.shape[1])
    if not isinstance(G, int) or C is None:
        return Fallback("group norm with run-time sizes", 0)
    cpg = C // G

    def aligned(d: int) -> bool:
        return all(s % (d * cpg) == 0 for s in p.segs)

    if p.uneven or not aligned(p.groups):
        g = _divisor_fitting(p.groups, aligned)
        return Fallback(f"channel shard of a group norm ({G} groups) is not on group boundaries", 0,
                        groups=g if g > 1 else None)
    want: dict[int, Placement] = {i: R for i in range(len(ctx.operands))}
    want[0] = p
    decide: dict[int, tuple[str, Placement]] = {}
    sh = p.moved(0)
    for name in ("weight", "bias"):
        if (err := _param_want(ctx, ctx.idx(ctx.arg(name)), sh, want, decide)) is not None:
            return Fallback(err, 0)
    return Strategy(want, p.moved(1), decide, rewrite=_set_arg(ctx, "num_groups", G // p.groups))


# ----------------------------------------------------------------------------- batched matmul with an addend


@register(aten.baddbmm)
def baddbmm(ctx: OpCtx) -> Result:
    """``beta * input + alpha * batch1 @ batch2``: the matmul is an einsum; the addend follows its output
    (sharded alike, or ``Partial`` — added on one rank — when the contraction is split)."""
    ii, i1, i2 = (ctx.idx(ctx.arg(n)) for n in ("self", "batch1", "batch2"))
    if i1 is None or i2 is None:
        return Fallback("baddbmm operands that are not tensors")
    a = ctx.operands[ii] if ii is not None else None
    if a is not None and isinstance(a.placement, Shard):
        return Fallback("baddbmm with a sharded addend", ii)
    r = einsum_rule(ctx, ["Bmk", "Bkn"], "Bmn", [i1, i2])
    if not isinstance(r, Strategy) or a is None or ii is None:
        return r
    out = r.out
    if isinstance(out, Partial):
        r.want[ii] = P
    elif isinstance(out, Shard):
        d = out.dim - (3 - a.ndim)
        if d >= 0 and a.shape[d] != 1:
            sh = out.moved(d)
            if a.free is not None:
                if "shard" not in a.free.styles:
                    return Fallback(f"the baddbmm addend is pinned to {sorted(a.free.styles)}", i1)
                r.decide[ii] = ("shard", sh)
            r.want[ii] = sh
    return r


# ----------------------------------------------------------------------------- fused attention kernels


@register(aten._native_multi_head_attention, aten._transformer_encoder_layer_fwd)
def fused_attention(ctx: OpCtx) -> Result:
    """The eval fast paths of ``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` (export traces the
    decomposed path instead): their weights are inside one kernel with global head counts."""
    return Fallback(f"{ctx.node.target} is a fused kernel with global head counts; it runs replicated")
