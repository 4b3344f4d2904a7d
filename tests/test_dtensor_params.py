"""Parameters as DTensors (tier 1 and 2, no process group): which tpfx layouts have an exact DTensor
placement (checked against DTensor's own split of the full tensor), and the per-rank graph that takes its
parameters as inputs computes what the graph reading them computes."""

from __future__ import annotations

import inspect
from operator import attrgetter

import models
import pytest
import torch
import torch.distributed as dist
from numerics import TOL, rel_err
from torch.distributed.tensor import DTensor
from torch.distributed.tensor import Replicate as DReplicate
from torch.distributed.tensor import Shard as DShard
from torch.distributed.tensor.placement_types import _StridedShard
from tpfx.passes.emit import collective_nodes
from tpfx.passes.placements import Replicate, Shard, shard_tensor

import tpfx
from tpfx.dtensor_params import dtensor_layout, dtensor_placement

CASES = [
    (Replicate(), 4, DReplicate()),
    (Shard(0, 4, (12,)), 4, DShard(0)),
    (Shard(1, 2, (50257,)), 2, DShard(1)),  # uneven, but torch.chunk's sizes too (25129, 25128)
    (Shard(0, 4, (10,)), 4, None),  # balanced 3,3,2,2; torch.chunk gives 3,3,3,1
    (Shard(0, 4, (8, 8, 8)), 4, _StridedShard(0, split_factor=3)),  # per part, equal parts (c_attn)
    (Shard(0, 4, (8, 4, 4)), 4, None),  # per part, GQA q/k/v of different sizes
    (Shard(0, 2, (8,)), 4, None),  # KV heads replicated within groups of 2
    (Shard(0, 4, (8, 2, 2), (4, 1, 1)), 4, None),  # q split, k and v held whole (Falcon's MQA)
    (Shard(0, 3, (24, 24, 24), unit=8), 3, _StridedShard(0, split_factor=3)),  # 3 heads per part on 3: even
    (Shard(0, 3, (30, 30, 30), unit=6), 3, None),  # 5 heads of 6 per part on 3 ranks (2/2/1): not strided
    (Shard(0, 3, (30,), unit=6), 3, None),  # 5 heads of 6 (12/12/6 rows): not torch.chunk's 10/10/10
]


@pytest.mark.parametrize("pl,world,want", CASES, ids=[str(c[0]) + f"@{c[1]}" for c in CASES])
def test_dtensor_placement_is_exact_or_none(pl, world: int, want) -> None:
    got = dtensor_placement(pl, world)
    assert got == want, got
    if got is None or isinstance(got, DReplicate):
        return
    n = max(sum(pl.segs), 3)
    full = torch.arange(n * 3 * 3, dtype=torch.float32).view(n, 3, 3) if pl.dim == 0 else \
        torch.arange(3 * n, dtype=torch.float32).view(3, n)
    full = full.narrow(pl.dim, 0, sum(pl.segs))
    theirs, _ = got._split_tensor(full, world, with_padding=False)
    for r in range(world):  # DTensor's local tensor of rank r is tpfx's slice of rank r
        assert torch.equal(theirs[r], shard_tensor(full, pl, r, world)), r


LAYOUTS_2D = [
    (Shard(0, 2, (8,)), 4, (2, (DShard(0), DReplicate()))),  # KV heads replicated within groups of 2
    (Shard(0, 2, (8, 8, 8)), 4, (2, (_StridedShard(0, split_factor=3), DReplicate()))),
    (Shard(0, 4, (12,)), 4, (4, (DShard(0),))),  # the 1-D mesh where it fits
    (Shard(0, 4, (8, 2, 2), (4, 1, 1)), 4, None),  # parts held whole: no DTensor layout
]


@pytest.mark.parametrize("pl,world,want", LAYOUTS_2D, ids=[str(c[0]) for c in LAYOUTS_2D])
def test_dtensor_layout_on_the_grouped_mesh_is_exact(pl, world: int, want) -> None:
    got = dtensor_layout(pl, world)
    assert got == want
    if got is None or got[0] == world:
        return
    k, (outer, _) = got
    full = torch.arange(sum(pl.segs) * 3, dtype=torch.float32).view(sum(pl.segs), 3)
    theirs, _ = outer._split_tensor(full, k, with_padding=False)
    for r in range(world):  # rank r is at row r // (world // k) of the k x (world // k) view: that row's chunk
        assert torch.equal(theirs[r // (world // k)], shard_tensor(full, pl, r, world)), r


def test_graph_fed_its_parameters_computes_as_the_model(tmp_path) -> None:
    """One rank (an in-process gloo group): the module's DTensor parameters are fed to the graph at call
    time; forward and gradients are the model's, and the graph reads no parameter of its own."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model, ref = models.llama(num_kv_heads=2), models.llama(num_kv_heads=2)
        sharded = tpfx.auto_shard(model, 1)
        assert all(isinstance(p, DTensor) for p in sharded.parameters())
        ids = torch.randint(0, ref.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
        out, want = sharded(input_ids=ids, labels=ids), ref(input_ids=ids, labels=ids)
        assert rel_err(out.logits, want.logits) <= TOL
        out.loss.backward()
        want.loss.backward()
        full = dict(ref.named_parameters())
        for n, p in sharded.named_parameters():
            assert isinstance(p.grad, DTensor) and rel_err(p.grad, full[n].grad) <= TOL, n
        local, runner = next(iter(sharded._graphs.values()))
        # one rank is the model as it is: every weight whole, no collective planned or emitted
        assert not sharded.plan.collectives and not collective_nodes(local), collective_nodes(local)
        assert {p.style for p in sharded.plan.placements.values()} == {"replicate"}
        fed = runner.fn
        reads = [n.target for n in local.graph.nodes if n.op == "get_attr" and id(attrgetter(n.target)(local)) in
                 {id(p) for p in sharded._store.values()}]
        buffers = [n.target for n in local.graph.nodes if n.op == "get_attr" and n.target in
                   dict(sharded.named_buffers())]  # rotary inv_freq: the tree's buffers, fed too
        assert len(reads) + len(buffers) == len(runner.slots) and len(reads) == len(sharded._store)
        assert buffers and not [n for n in fed.graph.nodes if n.op == "get_attr" and n.target in reads + buffers]
        # what HF Trainer reads: the model's forward signature (on the class) and its plain attributes
        assert type(sharded).__name__ == "ShardedLlamaForCausalLM" and isinstance(sharded, tpfx.ShardedModule)
        assert inspect.signature(type(sharded).forward) == inspect.signature(type(ref).forward)
        assert list(inspect.signature(sharded.forward).parameters)[:2] == ["input_ids", "attention_mask"]
        assert (sharded.loss_type, sharded.main_input_name) == (ref.loss_type, "input_ids")
        assert sharded.get_input_embeddings() is sharded.model.embed_tokens  # the tree's method, its modules
        assert type(sharded.lm_head) is torch.nn.Linear  # submodules: the model's types (tpfx.tree)
        assert sharded.lm_head is not ref.lm_head and sharded.lm_head.weight is not model.lm_head.weight
    finally:
        dist.destroy_process_group()
