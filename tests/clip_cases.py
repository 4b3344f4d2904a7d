"""Rank functions for ``tests/test_clip.py`` (module level so spawned ranks can import them)."""

from __future__ import annotations

from typing import Any

import models
import torch
from numerics import rel_err
from torch.distributed.tensor import DTensor

import tpfx
from tpfx.families import tiny_causal_lm

BUILDERS = {"llama": lambda: models.llama(num_kv_heads=2), "gpt2": lambda: models.gpt2(),
            "falcon": lambda: tiny_causal_lm("falcon", seed=0)}


def clip_check(rank: int, world: int, name: str, norm_type: float) -> dict[str, Any]:
    """tpfx.clip_grad_norm_ vs torch's on the unsharded model: the norm and every clipped gradient slice."""
    model, ref = BUILDERS[name](), BUILDERS[name]()
    sharded = tpfx.auto_shard(model, world)
    vocab = ref.config.vocab_size
    ids = torch.randint(0, vocab, (2, 7), generator=torch.Generator().manual_seed(3))
    sharded(input_ids=ids, labels=ids).loss.backward()
    ref(input_ids=ids, labels=ids).loss.backward()
    local_norm = float(torch.nn.utils.get_total_norm([tpfx.local(p.grad) for p in sharded.parameters()], norm_type))
    want = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.1, norm_type)
    full = dict(ref.named_parameters())

    def grad_err() -> float:
        return max(rel_err(p.grad, tpfx.shard_tensor(sharded.plan, n, full[n].grad, rank))
                   for n, p in sharded.named_parameters())

    saved = [tpfx.local(p.grad).clone() for p in sharded.parameters()]
    try:  # torch's own call: exact where every parameter is a DTensor, else it raises on the mix
        norm = torch.nn.utils.clip_grad_norm_(sharded.parameters(), 0.1, norm_type)
        torch_call: dict[str, Any] = {"norm_err": rel_err(norm.full_tensor(), want), "grad_err": grad_err()}
    except RuntimeError as e:
        torch_call = {"error": str(e)[:200]}
    for p, g in zip(sharded.parameters(), saved):
        tpfx.local(p.grad).copy_(g)
    # transformers' Trainer (and accelerate) on DTensors over several meshes: one norm per mesh, no clipping
    from transformers import Trainer

    trainer_norm = Trainer._mixed_mesh_grad_norm(None, sharded, float("inf"))  # type: ignore[arg-type]
    got = tpfx.clip_grad_norm_(sharded, 0.1, norm_type)
    errs = [grad_err()]
    layouts = sorted({p.placement for p in sharded.plan.placements.values()})
    return {"norm": float(got), "want": float(want), "norm_err": rel_err(got, want), "grad_err": max(errs),
            "local_norm": local_norm, "layouts": layouts, "dtype": str(got.dtype), "torch": torch_call,
            "trainer_norm_err": rel_err(trainer_norm, want),
            "meshes": len({p.device_mesh for p in sharded.parameters() if isinstance(p, DTensor)}),
            "plain": [n for n, p in sharded.named_parameters() if not isinstance(p, DTensor)]}
