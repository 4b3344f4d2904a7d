"""Tests of tpfx.launch: per-rank results over real gloo processes and error propagation."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

from tpfx.launch import launch


def _sum_ranks(rank: int, world_size: int, scale: float) -> dict[str, object]:
    t = torch.tensor([float(rank + 1)]) * scale
    dist.all_reduce(t)
    return {"rank": rank * 10, "world": dist.get_world_size(), "sum": t, "threads": torch.get_num_threads()}


def _fail_on_rank1(rank: int, world_size: int) -> int:
    if rank == 1:
        raise ValueError("boom from the second rank")
    # The healthy rank blocks in a collective that never completes; launch must still terminate it.
    dist.all_reduce(torch.ones(1))
    return rank


def _hang_on_rank0(rank: int, world_size: int) -> int:
    if rank == 0:
        time.sleep(600)
    return rank


@pytest.mark.parametrize("world_size", [2, 3])
def test_results_per_rank(world_size: int) -> None:
    results = launch(_sum_ranks, world_size, 2.0)
    assert len(results) == world_size
    expected = 2.0 * world_size * (world_size + 1) / 2
    for r, res in enumerate(results):
        assert res["rank"] == r * 10
        assert res["world"] == world_size
        assert res["threads"] == 1
        assert isinstance(res["sum"], torch.Tensor)
        assert res["sum"].item() == pytest.approx(expected)


def test_exception_in_rank1_surfaces() -> None:
    start = time.monotonic()
    with pytest.raises(RuntimeError) as info:
        launch(_fail_on_rank1, 2, timeout_s=600)
    msg = str(info.value)
    # the root cause first, even when rank 0's collective failed on its crashed peer and was seen first
    assert msg.startswith("tpfx.launch: rank 1 failed")
    assert "boom from the second rank" in msg
    assert "ValueError" in msg and "Traceback" in msg
    # surfaced when rank 1 died, not when the timeout killed the blocked rank 0 (a liveness bound, not a speed
    # target: on a loaded 2-core box spawning and importing can take tens of seconds)
    assert "did not finish within" not in msg and time.monotonic() - start < 300


def test_timeout_kills_ranks() -> None:
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="did not finish within"):
        launch(_hang_on_rank0, 2, timeout_s=4)
    assert time.monotonic() - start < 30


def test_in_process_when_group_initialised(tmp_path) -> None:
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert launch(_sum_ranks, 1, 3.0)[0]["sum"].item() == pytest.approx(3.0)
        with pytest.raises(RuntimeError, match="world size 1"):
            launch(_sum_ranks, 2, 1.0)
    finally:
        dist.destroy_process_group()


_NO_FILE = """
import torch, torch.distributed as dist, tpfx
def main(rank, world):  # the name multiprocessing's forkserver module also defines
    x = torch.tensor([rank + 1.0])
    dist.all_reduce(x)
    return x.item()
if __name__ == "__main__":
    print("ranks:", tpfx.launch(main, 2))
"""


@pytest.mark.parametrize("how", ["stdin", "-c"])
def test_launch_from_code_with_no_main_file(how: str) -> None:
    """Code on stdin or ``python -c`` (as a notebook kernel runs cells) has no main file a forkserver could import:
    the ranks are forked from the process, and a function named ``main`` is the user's."""
    import subprocess
    import sys

    cmd = [sys.executable, "-"] if how == "stdin" else [sys.executable, "-c", _NO_FILE]
    done = subprocess.run(cmd, input=_NO_FILE if how == "stdin" else None, capture_output=True, text=True,
                          timeout=180, env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    assert "ranks: [3.0, 3.0]" in done.stdout
