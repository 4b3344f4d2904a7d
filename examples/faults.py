"""What a user sees when ranks disagree or a peer stalls, on 2 gloo ranks (``python examples/faults.py``)."""

from __future__ import annotations

import torch

import tpfx


def main(rank: int, world_size: int) -> None:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 16))
    sharded = tpfx.auto_shard(model, example_inputs=(torch.randn(4, 16),), timeout=60)  # bounds every wait (s)
    sharded(torch.randn(4, 16))
    try:
        sharded(torch.randn(4 + rank, 16))  # rank 1 was handed a larger batch
    except RuntimeError as e:
        print(f"rank {rank}: {str(e)[:90]}...", flush=True)
    sharded(torch.randn(4, 16))  # the group goes on


if __name__ == "__main__":
    tpfx.launch(main, 2)
