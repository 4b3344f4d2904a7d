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


def _kept_for_backward(sharded: Any, ids: torch.Tensor) -> dict[str, Any]:
    """One training step's bytes kept for backward (parameters excluded), all-gathers run in backward, and
    the gradients."""
    from tpfx.passes import collectives

    params = {tpfx.local(p).untyped_storage().data_ptr() for p in sharded.parameters()}
    real_gather, kept, calls = collectives._gather_even, {}, [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            kept[ptr] = max(kept.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    def counted(*args: Any) -> torch.Tensor:
        calls[0] += 1
        return real_gather(*args)

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = sharded(input_ids=ids, labels=ids).loss
    collectives._gather_even = counted  # type: ignore[assignment]
    try:
        loss.backward()
    finally:
        collectives._gather_even = real_gather  # type: ignore[assignment]
    grads = {n: p.grad.full_tensor().clone() for n, p in sharded.named_parameters() if p.grad is not None}
    sharded.zero_grad(set_to_none=True)
    return {"kept": sum(kept.values()), "backward_gathers": calls[0], "grads": grads}


def regather_check(rank: int, world: int) -> dict[str, Any]:
    """What a sequence-parallel training forward keeps for backward, with and without re-gathering the
    column-split matmuls' inputs in backward (Megatron-SP), and the gradients either way."""
    from tpfx.passes import collectives

    sharded = tpfx.auto_shard(models.llama(layers=2), sequence_parallel=True)
    ids = models.token_inputs(models.TINY_VOCAB, 2, 16, seed=1)
    sharded(input_ids=ids, labels=ids)  # captured outside the measurement (export runs on fake tensors)
    gathers = sum(1 for n in sharded.graph_module(input_ids=ids, labels=ids).graph.nodes
                  if n.target is collectives.gather_seq)
    out = {}
    for on in (False, True):
        sharded.regather_in_backward = on
        out[on] = _kept_for_backward(sharded, ids)
    grad_err = max(rel_err(out[True]["grads"][n], g) for n, g in out[False]["grads"].items())
    return {"gathers": gathers, "kept": {k: v["kept"] for k, v in out.items()}, "grad_err": grad_err,
            "backward_gathers": {k: v["backward_gathers"] for k, v in out.items()},
            "gathered_bytes": ids.numel() * sharded.config.hidden_size * 4}
