"""Tier 2 (no process group): the decode graph of ``tpfx.generate`` takes its KV cache split by heads
(``propagate(fed=...)``), returns it split (``emit(local_outputs=...)``) and has Megatron's collectives."""

from __future__ import annotations

from collections import Counter

import models
import pytest
import torch
from tpfx.passes.emit import collective_nodes, emit
from tpfx.passes.placements import Shard

from tpfx.derive import capture, plan_graph
from tpfx.generate import CacheStep, _cache_outputs


def _graphs(kv: int, world: int):
    model = models.llama(num_kv_heads=kv).eval()
    step = CacheStep(model, [None, None])
    ids = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(0))
    gm, _ = capture(step, (ids, ()), {"attention_mask": torch.ones(2, 10, dtype=torch.long), "position_ids": None})
    prefill = plan_graph(gm, world, None)
    layout, local, _ = _cache_outputs(gm, prefill.derivation.prop)
    past = tuple(torch.zeros(2, kv, 10, 8) for _ in range(4))
    dgm, dynamic = capture(step, (ids[:, :1], past), {"attention_mask": torch.ones(2, 11, dtype=torch.long),
                                                       "position_ids": None})
    return prefill, layout, local, dgm, dynamic


def _kinds(gm: torch.fx.GraphModule) -> Counter:
    return Counter(kind for kind, _ in collective_nodes(gm))


@pytest.mark.parametrize("kv,world", [(4, 2), (4, 4), (2, 4)])
def test_decode_graph_keeps_the_cache_split_with_megatron_collectives(kv: int, world: int) -> None:
    prefill, layout, local, dgm, dynamic = _graphs(kv, world)
    assert dynamic  # one decode graph for every cache length
    groups = min(kv, world)  # KV heads split, or replicated within groups when the ranks outnumber them
    assert layout == [Shard(1, groups, (kv,))] * 4 and local == frozenset(range(1, 5)), layout
    fed = {f"past_{i}": p for i, p in enumerate(layout)}
    decode = plan_graph(dgm, world, prefill.pins(), fed=fed)
    assert decode.digest() == prefill.digest()  # one set of weight placements
    assert _cache_outputs(dgm, decode.derivation.prop)[0] == layout  # leaves in the layout it came in
    for rank in range(world):
        local_gm = emit(dgm, decode.derivation.prop, rank, lambda r: "fake", local_outputs=local)
        kinds = _kinds(local_gm)
        assert kinds["all_reduce"] == 2 * 2 + 1 and kinds["all_gather"] == 1, kinds  # 2/layer, embedding; logits
        assert not any(n.op == "call_module" for n in local_gm.graph.nodes)  # full-shape guards not emitted
    # the same graph with the cache passed whole would gather new keys/values in every layer
    unfed = plan_graph(dgm, world, prefill.pins())
    assert _kinds(emit(dgm, unfed.derivation.prop, 0, lambda r: "fake"))["all_gather"] > 1
