"""Rank functions for ``tests/test_report.py`` (module level so spawned ranks can import them)."""

from __future__ import annotations

from typing import Any

import models
import torch
from numerics import rel_err

import tpfx


def saved_plan_check(rank: int, world: int, plan_json: str) -> dict[str, Any]:
    """``auto_shard(model, plan=ShardingPlan.from_json(...))`` against the unsharded model: forward and grads."""
    loaded = tpfx.ShardingPlan.from_json(plan_json)
    model, ref = models.llama(num_kv_heads=2), models.llama(num_kv_heads=2)
    sharded = tpfx.auto_shard(model, world, plan=loaded)
    ids = models.token_inputs(models.HF_VOCAB, 3, 6, seed=5)
    labels = models.token_inputs(models.HF_VOCAB, 3, 6, seed=6)
    out, ref_out = sharded(input_ids=ids, labels=labels), ref(input_ids=ids, labels=labels)
    out.loss.backward()
    ref_out.loss.backward()
    full = dict(ref.named_parameters())
    grad = max(rel_err(p.grad, tpfx.shard_tensor(sharded.plan, n, full[n].grad, rank))
               for n, p in sharded.named_parameters())
    local = {n: tuple(tpfx.local(p).shape) for n, p in sharded.named_parameters()}
    return {"logits": rel_err(out.logits, ref_out.logits), "loss": rel_err(out.loss, ref_out.loss), "grad": grad,
            "same_digest": sharded.plan.digest() == loaded.digest(),
            "lm_head": sharded.plan.placements["lm_head.weight"].style,
            "lm_head_local": local["lm_head.weight"],
            "params": sum(torch.Size(s).numel() for s in local.values())}
