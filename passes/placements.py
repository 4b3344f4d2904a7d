"""Placements of a value across the ``t`` ranks of a tensor-parallel group.

* ``Replicate()`` – every rank holds the whole value.
* ``Partial()`` – every rank holds a summand; the value is the sum over ranks.
* ``Shard(dim, groups, segs)`` – the value is split along ``dim``.

``Shard`` generalises DTensor's shard in two ways that transformer graphs need:

* ``segs``: the dim is a concatenation of segments (global lengths); *each* segment is split
  ``groups`` ways and a rank holds its chunk of every segment, concatenated. A fused ``c_attn``
  output ``[.., 3H]`` with ``segs=(H, H, H)`` is how "each rank gets its slice of q, k and v".
* ``groups``: the number of distinct chunks (a divisor of ``t``). Rank ``r`` holds chunk
  ``r * groups // t``; with ``groups < t`` each chunk is replicated on ``t / groups`` consecutive
  ranks (GQA with fewer KV heads than ranks). Gradients of such values are *partial within the
  replica group* (see ``passes/collectives.py``).
* ``segs=()``: a dim of run-time length split evenly into ``groups`` chunks (the sequence dim of the
  residual stream under sequence parallelism, ``seq_shard``); only activations are split so.
* ``sgroups``: a group count per segment, where segments differ. Falcon-7B's fused
  ``query_key_value`` is ``[n*d | d | d]`` (multi-query: one key and one value head): the query
  segment is split ``t`` ways and the key/value segments are held whole (1 group) on every rank,
  ``S(0/2[256+32/1+32/1])``. ``groups`` is then the largest of them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TypeGuard

import torch


@dataclass(frozen=True)
class Replicate:
    def __str__(self) -> str:
        return "R"


@dataclass(frozen=True)
class Partial:
    def __str__(self) -> str:
        return "P"


@dataclass(frozen=True)
class Shard:
    dim: int
    groups: int
    segs: tuple[int, ...]
    sgroups: tuple[int, ...] | None = None  # per segment, only where they differ (None: all ``groups``)
    unit: int = 1  # chunks are whole multiples of it (uneven splits at head boundaries); 1 where chunks are equal

    def __post_init__(self) -> None:
        if self.sgroups is not None:
            if len(self.sgroups) != len(self.segs) or max(self.sgroups) != self.groups:
                raise ValueError(f"per-segment groups {self.sgroups} do not fit {self.segs} in {self.groups}")
            if len(set(self.sgroups)) == 1:
                object.__setattr__(self, "sgroups", None)  # one canonical form: uniform is None
        if self.unit != 1:
            if any(s % self.unit for s in self.segs):
                raise ValueError(f"segments {self.segs} are not whole multiples of the unit {self.unit}")
            if all(s % (g * self.unit) == 0 for s, g in zip(self.segs, self.seg_groups)):
                object.__setattr__(self, "unit", 1)  # equal chunks: the unit changes nothing (one canonical form)

    def __str__(self) -> str:
        g = f"/{self.groups}"
        if self.even:
            return f"S({self.dim}/{self.groups} seq)"
        if len(self.segs) == 1:
            s = ""
        elif self.sgroups is None:
            s = f"[{'+'.join(map(str, self.segs))}]"
        else:
            s = "[" + "+".join(f"{n}" if k == self.groups else f"{n}/{k}"
                               for n, k in zip(self.segs, self.sgroups)) + "]"
        u = f"x{self.unit}" if self.unit != 1 else ""
        return f"S({self.dim}{g}{s}{u})"

    @property
    def even(self) -> bool:
        """A split of a run-time length into ``groups`` equal chunks (``seq_shard``): no static segments."""
        return not self.segs

    @property
    def seg_groups(self) -> tuple[int, ...]:
        """The group count of every segment."""
        return self.sgroups or (self.groups,) * len(self.segs)

    def moved(self, dim: int) -> Shard:
        """The same layout on another dim (transposes, views that keep the split)."""
        return replace(self, dim=dim)

    def local_segs(self, rank: int = 0, world: int | None = None) -> tuple[int, ...]:
        return tuple(chunk_range(s, g, rank * g // world if world else 0, self.unit)[1]
                     for s, g in zip(self.segs, self.seg_groups))

    def local_size(self, rank: int = 0, world: int | None = None) -> int:
        return sum(self.local_segs(rank, world))

    def split_by(self, world: int) -> bool:
        """Every segment split into ``world`` disjoint chunks (each rank holds a distinct part of everything)."""
        return self.sgroups is None and self.groups == world

    def chunk(self, rank: int, world: int) -> int:
        return rank * self.groups // world

    def replica_groups(self, rank: int, world: int) -> list[tuple[int, ...]]:
        """Per segment, the ranks holding the same chunk of it as ``rank``."""
        out = []
        for g in self.seg_groups:
            per, j = world // g, rank * g // world
            out.append(tuple(range(j * per, (j + 1) * per)))
        return out

    def pieces(self, rank: int, world: int) -> list[tuple[int, int, int]]:
        """``rank``'s chunks along ``dim`` as (global start, length, local start): one per segment, in the order
        they are concatenated locally. Checkpoint I/O reads and writes exactly these ranges."""
        out, off, local = [], 0, 0
        for seg, g in zip(self.segs, self.seg_groups):
            start, n = chunk_range(seg, g, rank * g // world, self.unit)
            out.append((off + start, n, local))
            off, local = off + seg, local + n
        return out

    def owned_pieces(self, rank: int, world: int) -> list[tuple[int, int, int]]:
        """The ``pieces`` that ``rank`` is the lowest holder of: over all ranks, every element once (a chunk held
        by a replica group belongs to its first rank). Norms count these; gathers send these."""
        held = {(s, n) for r in range(rank) for s, n, _ in self.pieces(r, world)}
        return [p for p in self.pieces(rank, world) if (p[0], p[1]) not in held]

    @property
    def uneven(self) -> bool:
        return any(s % (g * self.unit) for s, g in zip(self.segs, self.seg_groups))


def seq_shard(dim: int, world: int) -> Shard:
    """The sequence split of sequence parallelism: ``dim`` (of run-time length, divisible by ``world``) in
    ``world`` equal chunks, rank r holding chunk r."""
    return Shard(dim, world, ())


def group_at(segs: tuple[int, ...], groups: tuple[int, ...], offset: int) -> int:
    """The group count of the segment (of ``segs``, with ``groups``) that holds position ``offset``."""
    end = 0
    for s, g in zip(segs, groups):
        end += s
        if offset < end:
            return g
    raise ValueError(f"offset {offset} is past the segments {segs}")


def is_whole(p: object) -> bool:
    """A ``Shard`` whose every segment is in 1 group: every rank holds all of it (the single key/value head of
    multi-query attention); unlike ``Replicate`` its gradient is partial over the ranks."""
    return isinstance(p, Shard) and not p.even and all(g == 1 for g in p.seg_groups)


def is_seq_split(p: object) -> TypeGuard[Shard]:
    """A sequence split (``seq_shard``): a run-time length cut in ``world`` equal chunks."""
    return isinstance(p, Shard) and p.even


def whole_mark(shape: tuple, prefer: int = 0) -> Shard | None:
    """The canonical whole placement of a value of ``shape``: on ``prefer`` or the first dim of static size."""
    order = [prefer] + [d for d in range(len(shape)) if d != prefer]
    for d in order:
        if 0 <= d < len(shape) and isinstance(shape[d], int):
            return Shard(d, 1, (shape[d],))
    return None


def chunk_range(size: int, groups: int, j: int, unit: int = 1) -> tuple[int, int]:
    """(start, length) of chunk ``j`` of ``size`` split ``groups`` ways, balanced like ``torch.tensor_split``:
    the first ``size % groups`` chunks are one longer (uneven splits, e.g. a vocab of 50257 on 2 ranks). With a
    ``unit``, the ``size / unit`` units are so split (8 heads of 8 rows on 3 ranks: 24, 24 and 16 rows)."""
    base, extra = divmod(size // unit, groups)
    return (j * base + min(j, extra)) * unit, (base + (1 if j < extra else 0)) * unit


Placement = Replicate | Partial | Shard
R = Replicate()
P = Partial()


def shard_tensor(x: torch.Tensor, p: Placement, rank: int, world: int) -> torch.Tensor:
    """This rank's local piece of the full tensor ``x`` under placement ``p`` (a sequence split included)."""
    if not isinstance(p, Shard):
        return x
    if p.even:  # ``groups`` equal chunks of a run-time length
        n = x.shape[p.dim] // p.groups
        return x.narrow(p.dim, p.chunk(rank, world) * n, n)
    pieces = [x.narrow(p.dim, start, n) for start, n, _ in p.pieces(rank, world)]
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, p.dim)
