"""User-facing errors of the public API that need no process group."""

from __future__ import annotations

import models
import pytest
import torch.distributed as dist

import tpfx


@pytest.mark.parametrize("world_size", [2, None])
def test_auto_shard_without_process_group(world_size: int | None) -> None:
    assert not dist.is_initialized()
    model = models.mlp()
    with pytest.raises(Exception, match=r"init_process_group|tpfx\.launch"):
        tpfx.auto_shard(model, world_size, example_inputs=(models.mlp_inputs(),))


def test_auto_shard_hf_without_process_group() -> None:
    assert not dist.is_initialized()
    with pytest.raises(Exception, match=r"init_process_group|tpfx\.launch"):
        tpfx.auto_shard(models.llama(), 2)
