"""What a user sees when the ranks of a group are called differently, on 2 gloo ranks (``python examples/faults.py``)."""

from __future__ import annotations

import torch

import tpfx


def main(rank: int, world_size: int) -> str:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 16))
    sharded = tpfx.auto_shard(model, example_inputs=(torch.randn(4, 16),), timeout=60)  # bounds every wait (s)
    sharded(torch.randn(4, 16))
    error = ""
    try:
        sharded(torch.randn(4 + rank, 16))  # rank 1 was handed a larger batch
    except RuntimeError as e:
        error = str(e)
    sharded(torch.randn(4, 16))  # the group goes on
    return error


if __name__ == "__main__":
    for rank, error in enumerate(tpfx.launch(main, 2)):
        print(f"rank {rank}: {error[:90]}...")
