"""The per-call check's timing (tier 2, simulated ranks): it runs once per call, right before the rank's first
collective (so its round trip overlaps the compute before it), at the end of a call without collectives, and
not at all when the call raises first."""

from __future__ import annotations

from typing import Any

import models
import pytest
import torch
from simulate import emit_all, run_ranks
from tpfx.passes import collectives

import tpfx
from tpfx.agreement import checked_before_collectives


def _calls_made(rank: int) -> int:
    """Collectives this simulated rank has made so far, over all groups."""
    return sum(n for (_, r), n in collectives.c10d.world.calls.items() if r == rank)  # type: ignore[attr-defined]


def _run(plan: tpfx.ShardingPlan, x: torch.Tensor, fail: bool = False) -> list[Any]:
    ranks = emit_all(plan)

    def body(rank: int) -> list[int]:
        seen: list[int] = []
        for _ in range(3):  # three calls, one check each
            with checked_before_collectives(lambda: seen.append(_calls_made(rank))):
                ranks[rank][0](x)
        if fail:
            with pytest.raises(ValueError), checked_before_collectives(lambda: seen.append(-1)):
                raise ValueError("a rank's own error before any collective")
        return [seen, _calls_made(rank)]

    return run_ranks(plan.world_size, body)


def test_the_check_runs_right_before_each_call_s_first_collective() -> None:
    x = models.mlp_inputs()
    plan = tpfx.plan(models.mlp(), 2, example_inputs=(x,))
    per_call = len([c for c in plan.collectives if c.kind == "all_reduce"])
    assert per_call >= 1
    for seen, total in _run(plan, x, fail=True):
        assert total == 3 * per_call
        assert seen == [0, per_call, 2 * per_call]  # before call k's first collective, never after; none on failure


def test_a_call_without_collectives_runs_the_check_at_its_end() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.ReLU(), torch.nn.Linear(3, 3))
    x = torch.randn(2, 3)
    with pytest.warns(UserWarning, match="no weight is split"):
        plan = tpfx.plan(model, 8, example_inputs=(x,))
    for seen, total in _run(plan, x):
        assert total == 0 and seen == [0, 0, 0]
