"""Which steps move a value from the placement it has to the placement a consumer wants.

One pure function, ``plan_redistribution(have, want, world)``, answers it for every caller: emission builds a
graph node per step (``emit.redistribute``), and the plan, the report and the planner's cost count the steps
that communicate (``forward_collective``). A step is a collective or a local op (``kinds.STEPS`` describes each):

    Partial  -> seq split   reduce_scatter                        (Megatron-SP, after a row split)
    Replicate-> seq split   split_even                            (own chunk)
    seq split-> anything    gather_even, then as from Replicate
    Replicate-> Partial     to_partial
    Partial  -> anything    all_reduce, then as from Replicate
    Shard    -> finer Shard refine                                (a local narrow: same layout, more chunks)
    whole    -> anything    unwhole (+ scatter)                   (every rank holds it all)
    Shard    -> anything    [refine] all_gather (+ scatter)       (refine first where it moves less data)
    Replicate-> Shard       scatter                               (own chunk)
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .kinds import STEPS
from .placements import Partial, Placement, Replicate, Shard, is_seq_split, is_whole

Groups = int | tuple[int, ...]  # a group count, or one per segment


@dataclass(frozen=True)
class Step:
    kind: str
    dim: int = 0
    segs: tuple[int, ...] = ()
    src_groups: Groups | None = None  # group count(s) of the value before the step (None: the collective's default)
    dst_groups: Groups | None = None  # ... after it
    unit: int = 1  # uneven chunks in whole multiples of it (``Shard.unit``)


def groups_arg(p: Shard) -> Groups:
    """The group count(s) a collective takes: one, or one per segment where they differ."""
    return p.groups if p.sgroups is None else tuple(p.sgroups)


def _refinable(have: Shard, want: Shard) -> bool:
    return (have.dim, have.segs) == (want.dim, want.segs) and not have.uneven and not want.uneven \
        and all(w % h == 0 for h, w in zip(have.seg_groups, want.seg_groups))


def _gather(have: Shard, world: int) -> list[Step]:
    if have.groups == world or have.uneven or have.sgroups is not None:
        return [Step("all_gather", have.dim, have.segs, groups_arg(have), unit=have.unit)]
    if all(s % world == 0 for s in have.segs):  # refine locally first: less data to move
        return [Step("refine", have.dim, have.segs, have.groups, world), Step("all_gather", have.dim, have.segs)]
    return [Step("all_gather", have.dim, have.segs, have.groups)]  # e.g. 10 columns in 2 chunks on 4 ranks


def plan_redistribution(have: Placement | None, want: Placement, world: int) -> list[Step]:
    """The steps, in order, that turn a value placed ``have`` (None: replicated) into ``want``."""
    have = Replicate() if have is None else have
    if is_seq_split(want) and isinstance(have, (Partial, Replicate)):  # onto the split
        return [Step("reduce_scatter" if isinstance(have, Partial) else "split_even", want.dim)]
    steps: list[Step] = []
    if is_seq_split(have):  # off the sequence split: whole again on every rank
        steps.append(Step("gather_even", have.dim))
        have = Replicate()
    if isinstance(want, Partial) and isinstance(have, Replicate):
        return steps + [Step("to_partial")]
    if isinstance(have, Partial):
        steps.append(Step("all_reduce"))
        have = Replicate()
    scatter = [Step("scatter", want.dim, want.segs, None, groups_arg(want), want.unit)] if isinstance(want, Shard) else []
    if isinstance(have, Shard) and isinstance(want, Shard) and _refinable(have, want):
        return steps + [Step("refine", have.dim, have.segs, groups_arg(have), groups_arg(want))]
    if is_whole(have):  # every rank holds it all: nothing moves, its gradient is shared out
        return steps + [Step("unwhole")] + scatter
    if isinstance(have, Shard):
        return steps + _gather(have, world) + scatter
    return steps + scatter


def forward_collective(have: Placement | None, want: Placement, world: int) -> str | None:
    """The collective (if any) that moving ``have`` to ``want`` costs in the forward."""
    return steps_collective(plan_redistribution(have, want, world))


def steps_collective(steps: Iterable[Step]) -> str | None:
    """The collective (if any) among redistribution ``steps``."""
    return next((f for s in steps if (f := STEPS[s.kind].forward) is not None), None)
