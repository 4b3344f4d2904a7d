"""Rank functions for ``tests/test_train.py``: tensor parallelism x data parallelism on a 2-D mesh."""

from __future__ import annotations

from typing import Any

import models
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.nn.parallel import DistributedDataParallel

import tpfx

LR, MAX_NORM, STEPS = 1e-2, 0.5, 3


def ddp_2d_check(rank: int, world: int) -> dict[str, Any]:
    """dp=2 x tp=2: DDP over the dp axis around tpfx over the tp axis, clipped with tpfx.clip_grad_norm_,
    against one unsharded model on the concatenated global batch clipped with torch's clip_grad_norm_."""
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    dp_rank, dp = mesh["dp"].get_local_rank(), mesh["dp"].size()
    model, ref = models.llama(num_kv_heads=2), models.llama(num_kv_heads=2)
    sharded = tpfx.auto_shard(model, mesh=mesh, tp_axis="tp")
    ddp = DistributedDataParallel(sharded, process_group=mesh["dp"].get_group())
    opt = torch.optim.AdamW(sharded.parameters(), lr=LR)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=LR)
    losses, ref_losses, norms, ref_norms = [], [], [], []
    for step in range(STEPS):
        batch = torch.randint(0, ref.config.vocab_size, (2 * dp, 6), generator=torch.Generator().manual_seed(step))
        mine = batch[2 * dp_rank: 2 * dp_rank + 2]  # this dp group's half; both tp ranks read the same rows
        loss = ddp(input_ids=mine, labels=mine).loss
        loss.backward()
        norms.append(float(tpfx.clip_grad_norm_(sharded, MAX_NORM)))
        opt.step()
        opt.zero_grad()
        mean = loss.detach().clone()
        dist.all_reduce(mean, group=mesh["dp"].get_group())
        losses.append(float(mean) / dp)
        ref_loss = ref(input_ids=batch, labels=batch).loss
        ref_loss.backward()
        ref_norms.append(float(torch.nn.utils.clip_grad_norm_(ref.parameters(), MAX_NORM)))
        ref_opt.step()
        ref_opt.zero_grad()
        ref_losses.append(float(ref_loss))
    held = torch.randint(0, ref.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(99))
    with torch.no_grad():  # after the 3 updates: the weights agree where it counts
        final, ref_final = float(sharded(input_ids=held, labels=held).loss), float(ref(input_ids=held, labels=held).loss)
    sampler = list(tpfx.dp_sampler(list(range(10)), mesh, shuffle=True, seed=0))
    return {"sampler": sampler, "coords": (dp_rank, mesh["tp"].get_local_rank()), "losses": losses + [final], "ref_losses": ref_losses + [ref_final], "norms": norms,
            "ref_norms": ref_norms, "tp_world": sharded.world_size, "dp": dp}


def mesh_errors(rank: int, world: int) -> dict[str, str]:
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("dp",))
    out = {}
    for name, fn in {"no_axis": lambda: tpfx.auto_shard(models.llama(), mesh=mesh, tp_axis="tp"),
                     "wrapped": lambda: tpfx.auto_shard(DistributedDataParallel(models.llama()), 2)}.items():
        try:
            fn()
            out[name] = "no error"
        except Exception as e:  # noqa: BLE001
            out[name] = f"{type(e).__name__}: {e}"
    return out


def fsdp_after_auto_shard(rank: int, world: int) -> str:
    """fully_shard over a ShardedModule swaps its parameters: the next call must refuse, not train stale weights."""
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    sharded = tpfx.auto_shard(models.llama(num_kv_heads=2), mesh=mesh, tp_axis="tp")
    fully_shard(sharded, mesh=mesh["dp"])
    ids = torch.randint(0, 64, (2, 6))
    try:
        sharded(input_ids=ids, labels=ids)
    except RuntimeError as e:
        return str(e)
    return "no error"


def different_batches(rank: int, world: int) -> dict[str, str]:
    """Tensor-parallel ranks fed different batches in the first step (a loader not keyed by the dp axis):
    every rank raises; later calls pay no check."""
    out = {}
    sharded = tpfx.auto_shard(models.llama(), world)
    batch = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(rank))  # differs per rank
    try:
        sharded(input_ids=batch, labels=batch)
        out["first"] = "no error"
    except RuntimeError as e:
        out["first"] = str(e)
    same = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    loss = sharded(input_ids=same, labels=same).loss  # checked once: the next calls run unchecked
    out["checked_once"] = str(sharded.__dict__.get("_first_checked") and bool(torch.isfinite(loss)))
    return out
