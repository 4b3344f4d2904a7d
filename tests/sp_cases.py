"""Rank-side helpers for ``tests/test_sequence_parallel.py`` (launched on gloo ranks by ``tpfx.launch``)."""

from __future__ import annotations

from typing import Any

import models
import torch
from numerics import rel_err

import tpfx


def compiled_check(rank: int, world: int) -> dict[str, Any]:
    """``compile=True`` with ``sequence_parallel=True``: one forward and backward against the unsharded model,
    and dynamo's graph count (one graph, no breaks)."""
    torch.set_num_threads(1)
    torch._dynamo.utils.counters.clear()
    ref, model = models.llama(num_kv_heads=2), models.llama(num_kv_heads=2)
    sharded = tpfx.auto_shard(model, world, compile=True, sequence_parallel=True)
    ids = torch.randint(0, ref.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(3))
    out, want = sharded(input_ids=ids, labels=ids), ref(input_ids=ids, labels=ids)
    out.loss.backward()
    want.loss.backward()
    ref_norm = torch.nn.utils.get_total_norm([p.grad for p in ref.parameters()])
    return {"logits": rel_err(out.logits, want.logits), "loss": rel_err(out.loss, want.loss),
            "grad_norm": rel_err(tpfx.grad_norm(sharded), ref_norm),
            "graph_breaks": sum(torch._dynamo.utils.counters["graph_break"].values()),
            "graphs": torch._dynamo.utils.counters["stats"]["unique_graphs"]}


def generate_check(rank: int, world: int) -> dict[str, Any]:
    """``generate`` on a sequence-parallel module: its own graphs run without the split (one-token decode
    steps); greedy tokens equal the unsharded model's."""
    torch.set_num_threads(1)
    ref, model = models.llama(num_kv_heads=2), models.llama(num_kv_heads=2)
    sharded = tpfx.auto_shard(model, world, sequence_parallel=True)
    ids = torch.randint(0, ref.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(4))
    mask = torch.ones_like(ids)
    got = sharded.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    want = ref.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False)
    return {"equal": bool(torch.equal(got, want)), "new_tokens": int(got.shape[1] - ids.shape[1])}
