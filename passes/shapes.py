"""Symbolic shape reasoning for views (sympy).

Exported graphs carry shapes whose batch and sequence dims are symbols (``s0``, ``s1``) while
head counts are integer constants. A view ``[B, S, H] -> [B, S, n, d]`` is split into *groups*
of input and output dims whose products are equal (``view_groups``); a shard inside a group is
moved through the view by ``map_shard``, which works in the group's flattened index space:

    flat segments of the input  = for each of the K outer blocks, each segment L_s * I
    output dim e carries them iff  they are K' periodic copies of (L'_s * R_e)  with R_e = prod(after e)

so ``[.., 3H] -> [.., 3, n, d]`` with ``segs=(H, H, H)`` lands on ``n`` (the 3 is the period),
and ``[.., n, d] -> [.., n*d]`` lands on the merged dim with one segment. A shard can only land on
a dim whose local size is an integer: otherwise ``map_shard`` reports the largest group count
that would work (``gcd``), which the planner uses to replicate KV heads within groups (GQA).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias, overload

import sympy
import torch

from .placements import Shard, is_whole

Expr: TypeAlias = Any  # a sympy expression (sympy ships no type information)


@overload
def hint(x: Any, default: int) -> int: ...


@overload
def hint(x: Any, default: None = None) -> int | None: ...


def hint(x: Any, default: int | None = None) -> int | None:
    """An int, or a SymInt's traced value (``default`` where it has none): no guard added, nothing specialized."""
    if isinstance(x, torch.SymInt):
        return int(x.node.hint) if x.node.hint is not None else default
    return int(x)


def sym(x: object) -> Expr:
    """A sympy expression for an int or SymInt size."""
    if isinstance(x, torch.SymInt):
        return sympy.sympify(x.node.expr)
    return sympy.Integer(int(x))  # type: ignore[call-overload]


def shape_of(val: object) -> tuple[Expr, ...] | None:
    if isinstance(val, torch.Tensor):
        return tuple(sym(s) for s in val.shape)
    return None


def as_int(e: Expr) -> int | None:
    return int(e) if e.is_Integer else None


def _eq(a: Expr, b: Expr) -> bool:
    return sympy.expand(a - b) == 0


def _needs_more(have: Expr, other: Expr) -> bool:
    """True if ``have`` is a proper divisor of ``other`` (so the ``have`` side must grow)."""
    ratio = sympy.cancel(other / have)
    num, den = sympy.fraction(ratio)
    return den == 1 and not _eq(num, 1)


def view_groups(src: Sequence[Expr], dst: Sequence[Expr]) -> list[tuple[list[int], list[int]]] | None:
    """Pair runs of input and output dims with equal products. Size-1 dims form their own groups."""
    groups: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(src) or j < len(dst):
        if i < len(src) and _eq(src[i], 1):
            groups.append(([i], []))
            i += 1
            continue
        if j < len(dst) and _eq(dst[j], 1):
            groups.append(([], [j]))
            j += 1
            continue
        if i >= len(src) or j >= len(dst):
            return None
        gi, gj = [i], [j]
        pi, pj = src[i], dst[j]
        i += 1
        j += 1
        while not _eq(pi, pj):
            if _needs_more(pi, pj) and i < len(src):
                pi = pi * src[i]
                gi.append(i)
                i += 1
            elif _needs_more(pj, pi) and j < len(dst):
                pj = pj * dst[j]
                gj.append(j)
                j += 1
            else:
                return None
        groups.append((gi, gj))
    return groups


def _whole(src: Sequence[Expr], dst: Sequence[Expr], p: Shard, groups: list[tuple[list[int], list[int]]]
           ) -> Shard | int:
    """A value held whole on every rank (every segment in 1 group: a single key/value head beside split query
    heads) through a view: any static dim may carry the mark; the one its dim becomes, if the view keeps it."""
    ones = [k for k in range(len(src)) if _eq(src[k], 1)]
    ones_dst = [k for k in range(len(dst)) if _eq(dst[k], 1)]
    if p.dim in ones and ones.index(p.dim) < len(ones_dst):
        return p.moved(ones_dst[ones.index(p.dim)])
    for gi, gj in groups:
        if p.dim in gi:
            same = [k for k in gj if as_int(dst[k]) == sum(p.segs)]
            if same:
                return p.moved(same[0])
    return next((Shard(k, 1, (n,)) for k in range(len(dst)) if (n := as_int(dst[k])) is not None), 1)


def divisible_prefix(src: Sequence[Expr], dst: Sequence[Expr], p: Shard
                     ) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """For a view that cuts a dim split ``g`` ways, ``[n*d] -> [n, d]``, with ``n > g`` not divisible by ``g``: the
    segments ``(m*d, r*d)`` (``m`` the largest multiple of ``g`` below ``n``, ``r = n - m``) and their group counts
    ``(g, gcd(g, r))``, or None. Falcon's fused ``[q | k | v]`` is ``n + 2`` heads: at t=4 the 8 query heads split
    4 ways and the 2 others stay in one part until the slices that take k and v out cut it further."""
    if len(p.segs) != 1 or p.sgroups is not None or p.uneven:
        return None
    for gi, gj in view_groups(src, dst) or []:
        if gi != [p.dim] or len(gj) < 2:
            continue
        n, size, g = as_int(dst[gj[0]]), p.segs[0], p.groups
        if n is None or size % n or n <= g or n % g == 0:
            return None
        m, r, unit = n - n % g, n % g, size // n
        return (m * unit, r * unit), (g, math.gcd(g, r))
    return None


@dataclass(frozen=True)
class Cut:
    """What a view needs of a split it cannot carry: chunks in whole multiples of ``unit`` elements of the split
    dim (``[.., n*d] -> [.., n, d]`` with ``n`` not divisible by the group count: whole heads, ``unit = d``)."""

    unit: int


def _uneven_heads(outs: list[int], gj: list[int], In: int, p: Shard) -> Shard | Cut | None:
    """A single-segment split of the outermost dim of a view group into at least ``p.groups`` outer parts
    (``[n*d] -> [n, d]`` with ``n >= groups``): the split lands on ``n`` in uneven whole parts (8 heads on 3 ranks:
    3, 3 and 2) if its chunks are whole multiples of the inner size; otherwise the unit that would make them so."""
    if len(p.segs) != 1 or p.sgroups is not None or outs[0] < p.groups:
        return None
    inner = math.prod(outs[1:])
    flat = p.unit * In  # the chunks' unit in the group's flattened index space
    if flat % inner == 0:
        return Shard(gj[0], p.groups, (outs[0],), unit=flat // inner)
    return Cut(math.lcm(flat, inner) // In)


def _whole_units(outs: list[int], gj: list[int], In: int, p: Shard) -> Shard | None:
    """Segments split unevenly in whole units (``[n*d | d | d]`` with the query heads uneven, the key and value
    heads whole) through ``[.., (n+2)*d] -> [.., n+2, d]``: onto the outer dim, if every unit is whole inner rows."""
    inner = math.prod(outs[1:])
    flat = p.unit * In
    if flat % inner or any((s * In) % inner for s in p.segs) or sum(s * In // inner for s in p.segs) != outs[0]:
        return None
    return Shard(gj[0], p.groups, tuple(s * In // inner for s in p.segs), p.sgroups, flat // inner)


def map_shard(src: Sequence[Expr], dst: Sequence[Expr], p: Shard) -> Shard | Cut | int:
    """Move ``p`` (on ``src``) through a view to ``dst``.

    Returns the output Shard; or a ``Cut``, the unit of uneven whole parts (heads) that would map; or an int:
    the largest group count (< p.groups) that would map (1 when none does), for the planner to demote to.
    """
    groups = view_groups(src, dst)
    if groups is None:
        return 1
    if is_whole(p):
        return _whole(src, dst, p, groups)
    for gi, gj in groups:
        if p.dim not in gi:
            continue
        pos = gi.index(p.dim)
        outer = [as_int(src[k]) for k in gi[:pos]]
        inner = [as_int(src[k]) for k in gi[pos + 1 :]]
        outs = [as_int(dst[k]) for k in gj]
        if None in outer or None in inner or None in outs:
            return 1  # a symbolic size shares the group: no static layout
        K, In = math.prod(outer), math.prod(inner)  # type: ignore[arg-type]
        heads = _uneven_heads(outs, gj, In, p) if K == 1 else None  # type: ignore[arg-type]
        if p.uneven:  # uneven chunks survive a view that keeps the dim, or cuts it at their unit
            if K == 1 and In == 1 and len(gj) == 1:
                return p.moved(gj[0])
            if K == 1 and (parts := _whole_units(outs, gj, In, p)) is not None:  # type: ignore[arg-type]
                return parts
            return heads if heads is not None else math.gcd(p.groups, *p.segs)
        flat = [seg * In for seg in p.segs] * K
        gflat = list(p.seg_groups) * K
        best_g = 1
        for e, size in enumerate(outs):
            Q = math.prod(outs[:e])  # type: ignore[arg-type]
            Rr = math.prod(outs[e + 1 :])  # type: ignore[arg-type]
            if len(flat) % Q:
                continue
            period = flat[: len(flat) // Q]
            if period * Q != flat or any(L % Rr for L in period):
                continue
            segs = tuple(L // Rr for L in period)
            gs = tuple(gflat[: len(period)])
            if sum(segs) != size or list(gs) * Q != gflat:
                continue
            if all(s % g == 0 for s, g in zip(segs, gs)):
                return Shard(gj[e], p.groups, segs, gs)
            best_g = max(best_g, math.gcd(p.groups, *segs))
        return heads if heads is not None else best_g
    return 1
