"""One description per collective kind, read by every pass that deals with one.

Each kind of data movement the per-rank graphs perform is an op of ``collectives.py``; this table says, once:

    op          the kernel the emitted graph calls (its autograd is Megatron's pair)
    listed      its name where a graph's collectives are listed (plans, reports, failure messages); None: local
    forward     the collective its forward performs, as the plan counts it (None: local, no data moves)
    backward    the collective its backward performs (None: none, or local)
    named       whether emission tells it where it sits (``where=``), to name its backward if that fails
    args        for a redistribution step (``redistribute.Step``): the op's arguments after the value

``STEPS`` holds the kinds by redistribution step (``redistribute.plan_redistribution`` plans them, emission
builds them, the plan counts their ``forward``, ``backward.py`` pairs the ``backward`` of the steps whose
gradient moves at the step itself). ``OPS`` holds every kind by op, the gradient-only ones (Megatron's ``f``:
``reduce_grad``) and the fused ones (``parallel_cross_entropy``) included. A new collective (an all-to-all) is
one new entry here and its kernel in ``collectives.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import collectives as C


def _groups(groups: Any) -> int | list[int] | None:
    return list(groups) if isinstance(groups, tuple) else groups


@dataclass(frozen=True)
class Kind:
    op: Callable[..., Any]
    listed: str | None  # None: a local op, not listed among a graph's collectives
    forward: str | None = None
    backward: str | None = None
    named: bool = False
    args: Callable[[Any, int, int, str], tuple] | None = None  # (step, rank, world, group name) -> arguments
    paired: str | None = None  # its backward is counted at the step, under this name (``backward.py``'s via)


STEPS: dict[str, Kind] = {
    "all_reduce": Kind(C.all_reduce, "all_reduce", forward="all_reduce",
                       args=lambda s, r, w, g: (g,)),
    "reduce_scatter": Kind(C.reduce_scatter, "reduce_scatter", forward="reduce_scatter", backward="all_gather",
                           named=True, paired="scattered", args=lambda s, r, w, g: (s.dim, w, g)),
    "all_gather": Kind(C.all_gather, "all_gather", forward="all_gather",
                       args=lambda s, r, w, g: (s.dim, list(s.segs), r, w, g)
                       + (() if s.src_groups is None and s.unit == 1 else (_groups(s.src_groups or w),))
                       + (() if s.unit == 1 else (s.unit,))),
    "gather_even": Kind(C.gather_even, "all_gather", forward="all_gather", named=True,
                        args=lambda s, r, w, g: (s.dim, r, w, g)),
    "split_even": Kind(C.split_even, "scatter", backward="all_gather", named=True,
                       args=lambda s, r, w, g: (s.dim, r, w, g)),
    "scatter": Kind(C.scatter, "scatter", backward="all_reduce", named=True, paired="scatter",
                    args=lambda s, r, w, g: (s.dim, _groups(s.dst_groups), list(s.segs), r, w, g)
                    + (() if s.unit == 1 else (s.unit,))),
    "refine": Kind(C.refine, None,
                   args=lambda s, r, w, g: (s.dim, list(s.segs), _groups(s.src_groups), _groups(s.dst_groups), r, w)),
    "to_partial": Kind(C.to_partial, None, args=lambda s, r, w, g: (r,)),
    "unwhole": Kind(C.unwhole, None, args=lambda s, r, w, g: (w,)),
}

_GRADIENT_ONLY = [
    Kind(C.reduce_grad, "reduce_grad", backward="all_reduce", named=True),  # Megatron's f
    Kind(C.reduce_grad_spans, "reduce_grad", backward="all_reduce", named=True),
    Kind(C.gather_seq, "all_gather", forward="all_gather", backward="reduce_scatter", named=True),
    Kind(C.parallel_cross_entropy, "parallel_cross_entropy", forward="all_reduce"),
]

OPS: dict[Any, Kind] = {k.op: k for k in [*STEPS.values(), *_GRADIENT_ONLY]}


def listed(op: Any) -> str | None:
    """The name ``op`` is listed under among a graph's collectives (None: a local op)."""
    kind = OPS.get(op)
    return kind.listed if kind is not None else None
