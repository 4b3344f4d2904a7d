"""The local kernels rules rewrite ops to (``Strategy.target``) and emission emits: what one rank computes in
place of an op of the unsharded graph, none of them a collective of its own (those are ``collectives.py``,
described in ``kinds.py``).

    partial_mean          a mean over a split dim: this rank's summand (the all-reduce follows where planned)
    vocab_embedding       a lookup in this rank's rows of a vocab-split table
    sharded_batch_norm    batch / instance norm of this rank's channels, running statistics kept whole
    dropout_chunk         a dropout of a split value: this rank's chunk of the unsharded run's noise
    sdpa_dropout_chunk    attention with dropout over this rank's heads, the unsharded run's noise
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .collectives import all_gather
from .placements import Shard, shard_tensor


def partial_mean(x: torch.Tensor, dims: list[int], keepdim: bool, n: int) -> torch.Tensor:
    """This rank's summand of a mean over a sharded dim of global size ``n``."""
    return x.sum(dims, keepdim=keepdim, dtype=x.dtype) / n


def vocab_embedding(weight: torch.Tensor, ids: torch.Tensor, start: int, n: int, padding_idx: int = -1,
                    vocab: int = -1) -> torch.Tensor:
    """Lookup in this rank's rows [start, start + n) of a vocab-split table; other tokens give zeros. An id
    outside the whole table (``vocab`` rows) raises ``IndexError`` as ``torch.nn.functional.embedding`` does
    (every rank alike), instead of a row of zeros."""
    if vocab > 0 and not torch.compiler.is_compiling() and ids.numel() and (
            bool((ids < 0).any()) or bool((ids >= vocab).any())):
        bad = ids[(ids < 0) | (ids >= vocab)][0].item()
        raise IndexError(f"index {bad} is out of range: the embedding has {vocab} rows (tpfx's vocab-split lookup)")
    local = ids - start
    outside = (local < 0) | (local >= n)
    pad = padding_idx - start if 0 <= padding_idx - start < n else None
    out = torch.nn.functional.embedding(local.masked_fill(outside, 0), weight, padding_idx=pad)
    return out.masked_fill(outside.unsqueeze(-1), 0.0)


def sharded_batch_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                       running_mean: torch.Tensor | None, running_var: torch.Tensor | None, training: bool,
                       momentum: float, eps: float, cudnn: bool, segs: list[int], groups: int, rank: int,
                       world: int, group: str = "", instance: bool = False) -> torch.Tensor:
    """Batch (or instance) norm of this rank's channels. The running statistics are whole buffers on every
    rank: this rank's chunk is read and, in training, every rank's updated chunk is gathered and written back
    in place (one small all-gather per statistic), so each rank's buffers stay the unsharded model's."""
    p = Shard(0, groups, tuple(segs))
    stats = [None if s is None else shard_tensor(s, p, rank, world).clone() for s in (running_mean, running_var)]
    fn = torch.instance_norm if instance else torch.batch_norm
    y = fn(x, weight, bias, stats[0], stats[1], training, momentum, eps, cudnn)
    if training:
        with torch.no_grad():
            for full, local in zip((running_mean, running_var), stats, strict=True):
                if full is not None and local is not None:
                    full.copy_(all_gather(local, 0, list(segs), rank, world, group, groups))  # (C,)
    return y


def sharded_instance_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                          running_mean: torch.Tensor | None, running_var: torch.Tensor | None, use_input_stats: bool,
                          momentum: float, eps: float, cudnn: bool, segs: list[int], groups: int, rank: int,
                          world: int, group: str = "") -> torch.Tensor:
    return sharded_batch_norm(x, weight, bias, running_mean, running_var, use_input_stats, momentum, eps, cudnn,
                              segs, groups, rank, world, group, instance=True)


def _full_noise(x: torch.Tensor, op: Any, p: float, dim: int, full: int, order: tuple[int, ...]) -> Any:
    """``op`` (a dropout) of ones shaped like the unsharded value (``full`` along ``dim``, its memory order
    ``order``, outermost first): the noise the unsharded run multiplies by, drawn as it draws it."""
    shape = list(x.shape)
    shape[dim] = full
    ones = x.new_ones([shape[d] for d in order]).permute([order.index(d) for d in range(x.dim())])
    return op(ones, p, True)


def dropout_chunk(x: torch.Tensor, p: float, train: bool | None, dim: int, groups: int, segs: tuple[int, ...],
                  sgroups: tuple[int, ...] | None, order: tuple[int, ...], rank: int, world: int,
                  native: bool = False, unit: int = 1) -> Any:
    """A training dropout of this rank's chunk ``x`` of a split value, exactly the unsharded run's: every rank
    draws the full value's noise (the same on every rank of the group, whose generators then advance as the
    unsharded run's does) and multiplies its chunk by its chunk of it. Drawing only a chunk would repeat one
    mask across chunks (every rank's generator is in the same state). Costs the full value's random numbers
    and one transient tensor of its size."""
    op = torch.ops.aten.native_dropout.default if native else torch.ops.aten.dropout.default
    if not train or p == 0:
        return op(x, p, train)
    pl = Shard(dim, groups, tuple(segs), tuple(sgroups) if sgroups else None, unit)
    noise = _full_noise(x, op, p, dim, x.shape[dim] * world if pl.even else sum(segs), order)
    if native:
        return x * shard_tensor(noise[0], pl, rank, world), shard_tensor(noise[1], pl, rank, world)
    return x * shard_tensor(noise, pl, rank, world)


def sdpa_dropout_chunk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None,
                       p: float, is_causal: bool, scale: float | None, enable_gqa: bool, groups: int,
                       segs: tuple[int, ...], sgroups: tuple[int, ...] | None, rank: int, world: int,
                       unit: int = 1) -> torch.Tensor:
    """``scaled_dot_product_attention`` with dropout of this rank's heads (dim 1 split as ``Shard(1, groups,
    segs, sgroups)``) as the unsharded run computes it: torch's math path (q and k each scaled by the scale's
    root, the mask added, a safe softmax), the attention weights dropped out by this rank's chunk of the full
    (B, H, L, S) noise the unsharded kernel draws (``dropout_chunk``), then times v. On CPU the unsharded
    kernel takes this path, so a sharded run is the unsharded one mask for mask; where a fused kernel draws
    inside itself (CUDA), no run can reproduce it, and each head's noise is still its own slice of one draw
    (never a mask repeated across the ranks' heads)."""
    root = (1.0 / math.sqrt(q.size(-1)) if scale is None else abs(scale)) ** 0.5
    q = q * (-root if scale is not None and scale < 0 else root)  # (B, H/t, L, D)
    if enable_gqa:
        k = k.repeat_interleave(q.size(-3) // k.size(-3), -3)
        v = v.repeat_interleave(q.size(-3) // v.size(-3), -3)
    attn = q @ (k.transpose(-2, -1) * root)  # (B, H/t, L, S)
    if is_causal:
        causal = torch.ones(q.size(-2), k.size(-2), dtype=torch.bool, device=q.device).tril()
        attn = attn.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        attn = attn.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else attn + attn_mask
    attn = torch.ops.aten._safe_softmax.default(attn, -1)
    attn = dropout_chunk(attn, p, True, 1, groups, segs, sgroups, tuple(range(attn.dim())), rank, world, False,
                         unit)
    return attn @ v  # (B, H/t, L, Dv)
