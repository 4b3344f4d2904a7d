"""Collectives with Megatron's autograd, built on functional collectives.

``torch.ops._c10d_functional`` ops are traced by torch.compile (inductor schedules them), but
their registered backward of an all-reduce is another all-reduce, which makes gradients t times
too large when every rank holds the same loss. The pairs here are the conjugates:

    all_reduce       (g)  forward: sum over ranks      backward: identity
    reduce_grad      (f)  forward: identity            backward: sum over ranks
    all_gather            forward: gather chunks       backward: take this rank's chunk
    scatter               forward: take own chunk      backward: zero-pad, sum over ranks

Sequence parallelism (Megatron-SP) splits the residual stream on its sequence dim (``seq_shard``):

    reduce_scatter        forward: sum, keep own chunk backward: all-gather
    gather_seq            forward: all-gather          backward: reduce-scatter   (into sharded compute)
    gather_even           forward: all-gather          backward: take own chunk   (into replicated compute)
    split_even            forward: take own chunk      backward: all-gather

Gradient conventions that make these exact: a ``Replicate`` value's gradient is the full one on
every rank (``f`` sits where a replicated value enters sharded compute); a ``Shard`` value with
``groups == t`` holds exactly its chunk; with ``groups < t`` it is *partial within its replica
group* (backward is linear, so that stays true through any op), which is reduced only at the
weight (``reduce_grad`` over the replica group) or where it meets an ``f``.

The runtime hooks in through two calls, its policies staying in ``tpfx``: ``set_pending`` (a check the ranks of
a group run before they communicate, the runtime's comparison of a call's shapes issued asynchronously when the
call starts, settled by the first of these collectives in eager mode so its round trip overlaps the compute
before it: ``tpfx.agreement``) and ``set_failure_message`` (what a failed backward collective says: which
ranks are gone, ``tpfx.faults``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from .placements import Shard, chunk_range, shard_tensor

c10d = torch.ops._c10d_functional


_pending = threading.local()  # .check: run before this thread's next collective (per thread: simulated ranks)


def set_pending(check: Callable[[], None] | None) -> None:
    """The runtime's hook: ``check`` runs right before this thread's next collective (once), or never if none
    comes before ``set_pending`` is called again (``tpfx.agreement.checked_before_collectives``)."""
    _pending.check = check


def settle_pending() -> None:
    """Run the pending check (once) now: eager code only; a compiled graph never sees one (its caller settles
    it before the call)."""
    if not torch.compiler.is_compiling() and getattr(_pending, "check", None) is not None:
        check, _pending.check = _pending.check, None
        check()


_settle = settle_pending


def _all_reduce(x: torch.Tensor, group: str) -> torch.Tensor:
    _settle()
    return c10d.wait_tensor(c10d.all_reduce(x.contiguous(), "sum", group))


def _plain_failure(rank: int, what: str, error: BaseException, group: str | None) -> str:
    return f"tpfx: rank {rank}: {what} failed: {type(error).__name__}: {error}"


_describe: list[Callable[[int, str, BaseException, str | None], str]] = [_plain_failure]


def set_failure_message(fn: Callable[[int, str, BaseException, str | None], str]) -> None:
    """The runtime's hook: ``fn(rank, what, error, group)`` is the message a failed backward collective raises
    with (``tpfx.faults`` adds which ranks of the group are gone)."""
    _describe[0] = fn


def module_of(node: Any) -> str:
    """The innermost module an fx node was traced in ("" for the root)."""
    import re

    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = str(list(stack.values())[-1][0])
    if path.startswith("_empty") or path == "L['self']":
        return ""
    path = re.sub(r"^L\['self'\]\.?", "", path)
    return re.sub(r"\[(\d+)\]", r".\1", path)


def where_of(node: Any) -> str:
    """``node`` and its module, as a backward failure names them: ``add_3 (model.layers.0.mlp)``."""
    return f"{node.name} ({module_of(node) or 'the model'})"


def _named(kind: str, where: str, fn: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
    """``fn(*args)``, a collective of a backward: a failure (a peer died, a timeout) raises naming it and
    ``where`` (the forward node it pairs with, and its module: emission passes it, autograd runs backward
    outside any graph this rank's forward could name a node of)."""
    try:
        return fn(*args)
    except RuntimeError as e:
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        group = next((a for a in reversed(args) if isinstance(a, str)), None)  # the collective's group name
        at = f" for {where}" if where else ""
        raise RuntimeError(_describe[0](rank, f"{kind}{at} in the backward", e, group)) from e


def _gather(x: torch.Tensor, dim: int, segs: tuple[int, ...], gs: tuple[int, ...], rank: int, world: int,
            group: str, unit: int = 1) -> torch.Tensor:
    """All-gather a Shard(dim, segs, a group count per segment): every rank's piece (uneven ones padded in transit),
    then one copy of each chunk of each segment, in order."""
    sizes = [[chunk_range(s, g, r * g // world, unit)[1] for s, g in zip(segs, gs)] for r in range(world)]
    width = max(sum(sz) for sz in sizes)
    mine = sum(sizes[rank])
    if mine < width:
        pad_shape = list(x.shape)
        pad_shape[dim] = width - mine
        x = torch.cat([x, x.new_zeros(pad_shape)], dim)
    _settle()
    full = c10d.wait_tensor(c10d.all_gather_into_tensor(x.movedim(dim, 0).contiguous(), world, group))
    chunks = full.chunk(world, 0)
    out = []
    for k, g in enumerate(gs):
        for j in range(g):
            r = j * world // g  # the first rank holding chunk j of segment k
            out.append(chunks[r].narrow(0, sum(sizes[r][:k]), sizes[r][k]).movedim(0, dim))
    return torch.cat(out, dim)  # one copy, contiguous like the unsharded value


class _AllReduce(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: str) -> torch.Tensor:  # type: ignore[override]
        return _all_reduce(x, group)

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        return g, None


class _ReduceGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group: str, where: str) -> torch.Tensor:  # type: ignore[override]
        ctx.group, ctx.where = group, where
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor):  # type: ignore[override]
        return _named("all_reduce of reduce_grad (Megatron's f)", ctx.where, _all_reduce, g, ctx.group), None, None


def _per_seg(groups: int | list[int] | tuple[int, ...], segs: tuple[int, ...]) -> tuple[int, ...]:
    """A group count per segment (an int applies to every segment)."""
    return tuple(groups) if isinstance(groups, (list, tuple)) else (groups,) * len(segs)


class _AllGather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, segs, rank, world, group, groups, unit):  # type: ignore[override]
        segs = tuple(segs)
        gs = _per_seg(groups, segs)
        ctx.args = (dim, segs, rank, world, gs, unit)
        return _gather(x, dim, segs, gs, rank, world, group, unit)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        dim, segs, rank, world, gs, unit = ctx.args
        pieces, off = [], 0
        for s, k in zip(segs, gs):
            start, n = chunk_range(s, k, rank * k // world, unit)
            piece = g.narrow(dim, off + start, n)
            # a chunk held by world/k ranks: its gradient is partial within that replica group
            pieces.append(piece if k == world else piece * (k / world))
            off += s
        return torch.cat(pieces, dim).contiguous(), None, None, None, None, None, None, None


class _Scatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, groups, segs, rank, world, group, where, unit):  # type: ignore[override]
        segs = tuple(segs)
        gs = _per_seg(groups, segs)
        ctx.args, ctx.where = (x.shape, dim, gs, segs, rank, world, group, unit), where
        return shard_tensor(x, Shard(dim, max(gs), segs, gs, unit), rank, world).contiguous()

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        shape, dim, gs, segs, rank, world, group, unit = ctx.args
        full = g.new_zeros(shape)
        off = loc = 0
        for s, k in zip(segs, gs):
            start, n = chunk_range(s, k, rank * k // world, unit)
            full.narrow(dim, off + start, n).copy_(g.narrow(dim, loc, n))
            off += s
            loc += n
        return _named("all_reduce of scatter", ctx.where, _all_reduce, full, group), *(None,) * 8


class _Unwhole(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, world):  # type: ignore[override]
        ctx.world = world
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        return g * (1.0 / ctx.world), None


class _ReduceGradSpans(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, dim, spans, where):  # type: ignore[override]
        ctx.args, ctx.where = (dim, spans), where
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        dim, spans = ctx.args
        g = g.clone()
        for start, n, group in spans:
            g.narrow(dim, start, n).copy_(_named("all_reduce of reduce_grad_spans", ctx.where, _all_reduce,
                                                 g.narrow(dim, start, n), group))
        return g, None, None, None


class _ToPartial(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, keep):  # type: ignore[override]
        return x.clone() if keep else torch.zeros_like(x)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        return g, None


def _check_even(x: torch.Tensor, dim: int, world: int) -> None:
    if x.shape[dim] % world:
        raise ValueError(f"tpfx: sequence_parallel needs the sequence length ({x.shape[dim]}) divisible by the "
                         f"tensor-parallel size ({world}); pad the batch or shard with sequence_parallel=False")


def _reduce_scatter(x: torch.Tensor, dim: int, rank: int, world: int, group: str) -> torch.Tensor:
    _check_even(x, dim, world)
    _settle()
    y = c10d.wait_tensor(c10d.reduce_scatter_tensor(x.movedim(dim, 0).contiguous(), "sum", world, group))
    return y.movedim(0, dim).contiguous()


def _gather_even(x: torch.Tensor, dim: int, rank: int, world: int, group: str) -> torch.Tensor:
    _settle()
    y = c10d.wait_tensor(c10d.all_gather_into_tensor(x.movedim(dim, 0).contiguous(), world, group))
    return y.movedim(0, dim).contiguous()


def _own_chunk(x: torch.Tensor, dim: int, rank: int, world: int, group: str) -> torch.Tensor:
    _check_even(x, dim, world)
    n = x.shape[dim] // world
    return x.narrow(dim, rank * n, n).contiguous()


SeqOp = Callable[[torch.Tensor, int, int, int, str], torch.Tensor]


def _conjugates(forward: SeqOp, backward: SeqOp) -> type[torch.autograd.Function]:
    """An autograd function running ``forward`` and, on the gradient, ``backward`` (same arguments)."""

    class Pair(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x, dim, rank, world, group, where):  # type: ignore[override]
            ctx.args, ctx.where = (dim, rank, world, group), where
            return forward(x, dim, rank, world, group)

        @staticmethod
        def backward(ctx, g):  # type: ignore[override]
            return _named(Pair.__name__, ctx.where, backward, g, *ctx.args), None, None, None, None, None

    Pair.__name__ = Pair.__qualname__ = f"_{forward.__name__.strip('_')}_then_{backward.__name__.strip('_')}"
    return Pair


_ReduceScatter = _conjugates(_reduce_scatter, _gather_even)
_GatherSeq = _conjugates(_gather_even, _reduce_scatter)
_GatherEven = _conjugates(_gather_even, _own_chunk)
_SplitEven = _conjugates(_own_chunk, _gather_even)


def reduce_scatter(x: torch.Tensor, dim: int, world: int, group: str, where: str = "") -> torch.Tensor:
    """Partial -> seq_shard(dim): the sum over ranks, each keeping its chunk of ``dim`` (after a row split).
    ``where`` (here and below): the node it follows, named if the backward's collective fails."""
    return _ReduceScatter.apply(x, dim, 0, world, group, where)


def gather_seq(x: torch.Tensor, dim: int, world: int, group: str, where: str = "") -> torch.Tensor:
    """seq_shard(dim) -> Replicate entering sharded compute (before a column split): the gradient arriving is
    partial on every rank, so backward reduce-scatters it (Megatron-SP's g-bar). Inside
    ``regathered_in_backward`` the gathered value is not kept for backward: its chunk is, re-gathered there."""
    y = _GatherSeq.apply(x, dim, 0, world, group, where)
    if getattr(_regather, "on", False) and not torch.compiler.is_compiling():
        y._tpfx_chunk = _Chunk(x.detach(), dim, world, group)  # type: ignore[attr-defined]
    return y


_regather = threading.local()  # .on: inside regathered_in_backward


class _Chunk:
    """What autograd keeps of a value ``gather_seq`` gathered (and of its views): this rank's chunk, all-gathered
    again at the first unpack in backward and shared by every consumer that saved it."""

    def __init__(self, chunk: torch.Tensor, dim: int, world: int, group: str) -> None:
        self.chunk, self.dim, self.world, self.group = chunk, dim, world, group
        self.kept: Any = None  # the chunk as the outer saved-tensor hooks packed it (or the chunk)
        self.full: torch.Tensor | None = None

    def pack(self, outer: Any) -> _Chunk:
        if self.kept is None:
            self.kept = (outer[0](self.chunk) if outer else self.chunk,)
            self.chunk = None  # type: ignore[assignment]  # held once, as packed
        return self

    def unpack(self, outer: Any) -> torch.Tensor:
        if self.full is None:
            chunk = outer[1](self.kept[0]) if outer else self.kept[0]
            self.full = _gather_even(chunk, self.dim, 0, self.world, self.group)
        return self.full


@contextmanager
def regathered_in_backward() -> Iterator[None]:
    """Megatron-SP's memory saving: within the block, a value ``gather_seq`` gathered before a column split is
    saved for backward as this rank's chunk and all-gathered again in backward (once, for every consumer),
    instead of whole. Composes with saved-tensor hooks already active (they see what is kept)."""
    outer = torch._C._autograd._top_saved_tensors_default_hooks(False)

    def pack(t: torch.Tensor) -> Any:
        base = t if hasattr(t, "_tpfx_chunk") else t._base
        if base is None or not hasattr(base, "_tpfx_chunk"):
            return (outer[0](t) if outer else t,)
        view = None if t is base else (t.size(), t.stride(), t.storage_offset())
        return (base._tpfx_chunk.pack(outer), view)  # type: ignore[attr-defined]

    def unpack(packed: Any) -> torch.Tensor:
        if len(packed) == 1:
            return outer[1](packed[0]) if outer else packed[0]
        chunk, view = packed
        full = chunk.unpack(outer)
        return full if view is None else full.as_strided(*view)

    _regather.on = True
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, unpack):
            yield
    finally:
        _regather.on = False


def gather_even(x: torch.Tensor, dim: int, rank: int, world: int, group: str, where: str = "") -> torch.Tensor:
    """seq_shard(dim) -> Replicate entering replicated compute: backward keeps this rank's chunk."""
    return _GatherEven.apply(x, dim, rank, world, group, where)


def split_even(x: torch.Tensor, dim: int, rank: int, world: int, group: str, where: str = "") -> torch.Tensor:
    """Replicate -> seq_shard(dim): a local slice; backward gathers the chunks' gradients."""
    return _SplitEven.apply(x, dim, rank, world, group, where)


def to_partial(x: torch.Tensor, rank: int) -> torch.Tensor:
    """Replicate -> Partial: rank 0 keeps the value, the others contribute zeros (exact, no collective).
    The sum over ranks is x itself, so the gradient is the (replicated) output gradient unchanged."""
    return _ToPartial.apply(x, rank == 0)


def all_reduce(x: torch.Tensor, group: str) -> torch.Tensor:
    """Partial -> Replicate (Megatron's g)."""
    return _AllReduce.apply(x, group)


def reduce_grad(x: torch.Tensor, group: str, where: str = "") -> torch.Tensor:
    """Identity forward, sum of gradients over ``group`` backward (Megatron's f)."""
    return _ReduceGrad.apply(x, group, where)


def all_gather(x: torch.Tensor, dim: int, segs: list[int], rank: int, world: int, group: str,
               groups: int | list[int] | None = None, unit: int = 1) -> torch.Tensor:
    """Shard(dim, groups, segs, unit=unit) -> Replicate (groups: one count, or one per segment; default the world
    size)."""
    return _AllGather.apply(x, dim, tuple(segs), rank, world, group, groups or world, unit)


def scatter(x: torch.Tensor, dim: int, groups: int | list[int], segs: list[int], rank: int, world: int,
            group: str, unit: int = 1, where: str = "") -> torch.Tensor:
    """Replicate -> Shard(dim, groups, segs, unit=unit): a local slice; gradients are summed back."""
    return _Scatter.apply(x, dim, groups, tuple(segs), rank, world, group, where, unit)


def unwhole(x: torch.Tensor, world: int) -> torch.Tensor:
    """A value held whole on every rank (its gradient partial over the ranks) -> Replicate (its gradient the full
    one on every rank): no data moves; backward gives each rank its 1/world share."""
    return _Unwhole.apply(x, world)


def reduce_grad_spans(x: torch.Tensor, dim: int, spans: list[tuple[int, int, str]], where: str = "") -> torch.Tensor:
    """Identity forward; backward sums the gradient of each local span ``(start, length, group)`` along ``dim``
    over its group: a fused weight whose segments are held by different replica groups (Falcon's whole
    key/value heads beside split query heads)."""
    return _ReduceGradSpans.apply(x, dim, spans, where)


def refine(x: torch.Tensor, dim: int, segs: list[int], src_groups: int | list[int], dst_groups: int | list[int],
           rank: int, world: int) -> torch.Tensor:
    """Shard(groups=src) -> Shard(groups=dst), dst a multiple of src (per segment): a local narrow."""
    pieces, off = [], 0
    for s, g1, g2 in zip(segs, _per_seg(src_groups, tuple(segs)), _per_seg(dst_groups, tuple(segs))):
        j1, j2 = rank * g1 // world, rank * g2 // world
        n1, n2 = s // g1, s // g2
        pieces.append(x.narrow(dim, off + j2 * n2 - j1 * n1, n2))
        off += n1
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim)


class _ParallelCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target, start, reduction, ignore_index, group):  # type: ignore[override]
        x = logits.float()
        n = x.shape[1]
        _settle()
        gmax = c10d.wait_tensor(c10d.all_reduce(x.detach().amax(1).contiguous(), "max", group))
        z = x - gmax.unsqueeze(1)
        e = z.exp()
        sumexp = _all_reduce(e.sum(1), group)
        valid = target != ignore_index
        local = target - start
        inside = valid & (local >= 0) & (local < n)
        picked = z.gather(1, local.clamp(0, max(n - 1, 0)).unsqueeze(1)).squeeze(1)
        target_logit = _all_reduce(torch.where(inside, picked, torch.zeros_like(picked)), group)
        losses = torch.where(valid, sumexp.log() - target_logit, torch.zeros_like(sumexp))
        count = valid.sum()
        ctx.save_for_backward(e / sumexp.unsqueeze(1), local, inside, valid, count)
        ctx.reduction, ctx.dtype = reduction, logits.dtype
        if reduction == 0:
            return losses.to(logits.dtype)
        total = losses.sum()
        return (total / count if reduction == 1 else total).to(logits.dtype)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        softmax, local, inside, valid, count = ctx.saved_tensors
        # subtract 1 at this rank's target column; a masked scatter rather than ``nonzero`` indexing, whose
        # data-dependent shape would break the graph under torch.compile (x - 0.0 == x exactly elsewhere)
        col = local.clamp(0, max(softmax.shape[1] - 1, 0)).unsqueeze(1)
        grad = softmax.scatter_add(1, col, -inside.to(softmax.dtype).unsqueeze(1))
        grad = grad * valid.unsqueeze(1)
        if ctx.reduction == 0:
            grad = grad * g.unsqueeze(1)
        else:
            grad = grad * (g / count if ctx.reduction == 1 else g)
        return grad.to(ctx.dtype), None, None, None, None, None


def parallel_cross_entropy(logits: torch.Tensor, target: torch.Tensor, start: int, reduction: int,
                           ignore_index: int, group: str) -> torch.Tensor:
    """Cross-entropy of vocab-split logits [N, V/t] (this rank's columns start at ``start``): 3 all-reduces
    of N values forward (max, sum of exp, target logit), none backward; the logits are never gathered."""
    return _ParallelCrossEntropy.apply(logits, target, start, reduction, ignore_index, group)
