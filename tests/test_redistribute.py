"""``plan_redistribution``: the one answer to "which steps move placement A to placement B" (no process group)."""

from __future__ import annotations

import pytest
from tpfx.passes.placements import Partial, Replicate, Shard, seq_shard
from tpfx.passes.redistribute import forward_collective, plan_redistribution

R, P, SEQ = Replicate(), Partial(), seq_shard(1, 4)

CASES = [
    (P, SEQ, ["reduce_scatter"], "reduce_scatter"),  # Megatron-SP after a row split
    (R, SEQ, ["split_even"], None),
    (SEQ, R, ["gather_even"], "all_gather"),
    (SEQ, P, ["gather_even", "to_partial"], "all_gather"),
    (R, P, ["to_partial"], None),
    (P, R, ["all_reduce"], "all_reduce"),
    (P, Shard(0, 4, (8,)), ["all_reduce", "scatter"], "all_reduce"),
    (Shard(0, 2, (8,)), Shard(0, 4, (8,)), ["refine"], None),  # a finer chunk of the same layout: local
    (Shard(0, 1, (8,)), R, ["unwhole"], None),  # held whole on every rank: nothing moves
    (Shard(0, 1, (8,)), Shard(1, 4, (8,)), ["unwhole", "scatter"], None),
    (Shard(0, 4, (8,)), R, ["all_gather"], "all_gather"),
    (Shard(0, 2, (8,)), R, ["refine", "all_gather"], "all_gather"),  # refine first: half the bytes move
    (Shard(0, 2, (10,)), R, ["all_gather"], "all_gather"),  # 10 in 2 chunks on 4 ranks: gathered as they are
    (Shard(0, 4, (8, 4, 4), (4, 2, 2)), R, ["all_gather"], "all_gather"),  # GQA: a group count per part
    (Shard(0, 4, (8,)), Shard(1, 4, (8,)), ["all_gather", "scatter"], "all_gather"),
    (R, Shard(0, 4, (8,)), ["scatter"], None),
    (R, R, [], None),
    (None, R, [], None),  # no placement recorded: replicated
]


@pytest.mark.parametrize(("have", "want", "kinds", "collective"), CASES, ids=lambda v: str(v))
def test_steps_and_the_collective_they_cost(have, want, kinds, collective) -> None:
    assert [s.kind for s in plan_redistribution(have, want, 4)] == kinds
    assert forward_collective(have, want, 4) == collective


def test_group_counts_travel_with_the_steps() -> None:
    (gather,) = plan_redistribution(Shard(0, 4, (8, 4, 4), (4, 2, 2)), R, 4)
    assert gather.src_groups == (4, 2, 2) and gather.segs == (8, 4, 4)
    refine, gather = plan_redistribution(Shard(0, 2, (8,)), R, 4)
    assert (refine.src_groups, refine.dst_groups) == (2, 4) and gather.src_groups is None
    *_, scatter = plan_redistribution(P, Shard(1, 2, (6, 6)), 4)
    assert (scatter.dim, scatter.segs, scatter.dst_groups) == (1, (6, 6), 2)
