"""Matmuls as einsum strings (linear, mm, matmul, einsum, grouped mm, attention), embeddings and the loss."""


from __future__ import annotations

import math
from typing import Any, cast

import torch.fx as fx

from .. import kernels
from ..placements import P, Partial, Placement, R, Shard, chunk_range, is_whole
from ..shapes import as_int
from .core import (
    WORLD,
    Fallback,
    OpCtx,
    Operand,
    Result,
    Rewrite,
    Strategy,
    aten,
    finest,
    keep,
    register,
    register_late,
    register_name,
)

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
            unit = o.free.unit if o.free is not None and len(segs) == 1 and size % o.free.unit == 0 else 1
            shard_letters = {L: [Shard(0, ctx.world, segs, unit=unit)]}  # its inputs are split locally
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
                u = o.free.unit
                if g < o.free.groups and o.free.sgroups is None and o.free.uneven \
                        and all(s // u >= o.free.groups if u > 1 else s >= 4 * o.free.groups for s in segs):
                    # an uneven split of every part (tensor_split bounds, in whole units where asked: heads)
                    g, gs = o.free.groups, (o.free.groups,) * len(segs)
                # whole units (heads) only where every part has a unit for each of its groups (no rank holds none)
                unit = u if all(s % u == 0 and s // u >= k for s, k in zip(segs, gs)) else 1
                if g < 2 and o.free.groups != 1:  # 1 group asked for: held whole (a single key/value head)
                    break
                sh = Shard(d, g, segs, gs, unit)
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
    if (kv := _kv_off_heads(ctx, q, (ki, vi), nb)) is not None:  # type: ignore[arg-type]
        return kv
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


def _nests(p: Shard, q: Shard) -> bool:
    """Every rank's chunk of ``q`` lies inside its chunk of ``p``, so ``p`` becomes ``q`` by a local narrow."""
    return p == q or (p.segs == q.segs and not p.uneven and not q.uneven
                      and all(b % g == 0 for g, b in zip(p.seg_groups, q.seg_groups)))


def _kv_off_heads(ctx: OpCtx, q: Operand, kv: tuple[int, int], nb: int) -> Fallback | None:
    """Query split by heads while a key or value arrives split in a way its heads cannot follow: along another dim
    (multi-query attention's single key/value head, viewed ``[.., d] -> [.., 1, d]``, leaves only the head dim),
    or by heads in chunks other than the query's (uneven query heads, 14 on 4 ranks, against 2 key/value heads
    replicated in 2 groups). Ask for it in fewer groups whose chunks nest in the query's (GQA), else held whole
    on every rank (1 group): each rank's query heads read all of it, and its weight's gradient is summed over the
    ranks, as for key/value heads replicated within groups."""
    qp = q.placement
    if not isinstance(qp, Shard) or is_whole(qp) or qp.dim != nb - 1:
        return None
    for i in kv:
        p = ctx.operands[i].placement
        if not isinstance(p, Shard) or is_whole(p) or p.even:
            continue
        if p.dim != nb - 1:
            return Fallback(f"key/value split along dim {p.dim}, not its heads, beside query heads split "
                            f"{qp.groups} ways: held whole", i, groups=1)
        if not _nests(p, qp.moved(p.dim)):
            g = math.gcd(p.segs[0] // p.unit, qp.groups) if len(p.segs) == 1 and not qp.uneven else 1
            g = g if g < p.groups else 1
            return Fallback(f"key/value heads split as {p}, query heads as {qp}: the key/value in {g} group(s)",
                            i, groups=g)
    return None


_SDPA_ARGS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
_SDPA_DEFAULTS = (None, 0.0, False, None, False)


@register_late(aten.scaled_dot_product_attention)
def sdpa_dropout_chunk(node: fx.Node, pl: Any, args: tuple, kwargs: dict, rank: int, world: int
                       ) -> tuple[Any, tuple, dict]:
    """Attention with dropout over split heads becomes ``kernels.sdpa_dropout_chunk`` (the unsharded run's
    noise, this rank's heads); without dropout, or over heads every rank holds, it stays. Dropout over a value
    split along another dim is refused."""
    bound = dict(zip(_SDPA_ARGS, (*args, *_SDPA_DEFAULTS[len(args) - 3:]), strict=False)) | kwargs
    p = bound["dropout_p"]
    if not isinstance(p, float | int) or p == 0 or not isinstance(pl, Shard) or is_whole(pl):
        return node.target, args, kwargs
    if pl.dim != 1:
        raise NotImplementedError(f"tpfx: {node.name}: attention with dropout (p={p}) on a value split along dim "
                                  f"{pl.dim}, not its heads: its noise cannot be drawn as the unsharded run's; "
                                  "train with the attention dropout at 0, or plan without this split")
    return kernels.sdpa_dropout_chunk, (*(bound[a] for a in _SDPA_ARGS), pl.groups, pl.segs, pl.sgroups, rank,
                                        world) + ((pl.unit,) if pl.unit != 1 else ()), {}


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
    from ..kernels import vocab_embedding

    return vocab_embedding


def _vocab_rewrite(p: Shard) -> Rewrite:
    def rw(args: tuple, kwargs: dict, rank: int, world: int) -> tuple[tuple, dict]:
        start, n = chunk_range(p.segs[0], p.groups, p.chunk(rank, world), p.unit)
        padding_idx = args[2] if len(args) > 2 else kwargs.get("padding_idx", -1)
        return (args[0], args[1], start, n, padding_idx, p.segs[0]), {}

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
            start, _ = chunk_range(p.segs[0], p.groups, p.chunk(rank, world), p.unit)
            return (args[0], args[1], start, reduction, ignore, WORLD), {}

        return Strategy({0: p, 1: R}, R, rewrite=rw, target=_parallel_ce())
    if any(isinstance(o.placement, Shard) for o in ctx.operands):
        return Fallback("the loss needs the full class dim", 0)
    return Strategy(keep(ctx), R)


def _parallel_ce() -> Any:
    from ..collectives import parallel_cross_entropy

    return parallel_cross_entropy
