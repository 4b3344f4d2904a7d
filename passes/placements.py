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
"""

from __future__ import annotations

from dataclasses import dataclass

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

    def __str__(self) -> str:
        g = f"/{self.groups}"
        s = "" if len(self.segs) == 1 else f"[{'+'.join(map(str, self.segs))}]"
        return f"S({self.dim}{g}{s})"

    def local_segs(self, rank: int = 0, world: int | None = None) -> tuple[int, ...]:
        j = self.chunk(rank, world) if world else 0
        return tuple(chunk_range(s, self.groups, j)[1] for s in self.segs)

    def chunk(self, rank: int, world: int) -> int:
        return rank * self.groups // world

    @property
    def uneven(self) -> bool:
        return any(s % self.groups for s in self.segs)


def chunk_range(size: int, groups: int, j: int) -> tuple[int, int]:
    """(start, length) of chunk ``j`` of ``size`` split ``groups`` ways, balanced like ``torch.tensor_split``:
    the first ``size % groups`` chunks are one longer (uneven splits, e.g. a vocab of 50257 on 2 ranks)."""
    base, extra = divmod(size, groups)
    return j * base + min(j, extra), base + (1 if j < extra else 0)


Placement = Replicate | Partial | Shard
R = Replicate()
P = Partial()


def is_shard(p: object) -> bool:
    return isinstance(p, Shard)


def shard_tensor(x: torch.Tensor, p: Placement, rank: int, world: int) -> torch.Tensor:
    """This rank's local piece of the full tensor ``x`` under placement ``p``."""
    if not isinstance(p, Shard):
        return x
    j = p.chunk(rank, world)
    pieces, off = [], 0
    for seg in p.segs:
        start, n = chunk_range(seg, p.groups, j)
        pieces.append(x.narrow(p.dim, off + start, n))
        off += seg
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, p.dim)


def refine_local(x: torch.Tensor, src: Shard, dst: Shard, rank: int, world: int) -> torch.Tensor:
    """Narrow a local ``src`` chunk to the finer ``dst`` chunk (``src.groups`` divides ``dst.groups``, even)."""
    j1, j2 = src.chunk(rank, world), dst.chunk(rank, world)
    pieces, off = [], 0
    for seg in src.segs:
        n1, n2 = seg // src.groups, seg // dst.groups
        start = j2 * n2 - j1 * n1
        pieces.append(x.narrow(src.dim, off + start, n2))
        off += n1
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, src.dim)
