"""Dropout on split values (tier 2, no process group): each rank's chunk is multiplied by its chunk of the noise
the unsharded run draws, so sharded training with dropout is the unsharded run's, mask for mask."""

from __future__ import annotations

import models
import pytest
import torch
from tpfx.passes.collectives import dropout_chunk
from tpfx.passes.emit import emit
from tpfx.passes.placements import Shard, seq_shard, shard_tensor
from transformers import GPT2Config, GPT2LMHeadModel

import tpfx

P = 0.3
LAYOUTS = [  # (shape, placement, world, memory order of the unsharded value)
    ((2, 6, 8), Shard(2, 2, (8,)), 2, (0, 1, 2)),  # a column split
    ((2, 6, 12), Shard(2, 4, (4, 4, 4)), 4, (0, 1, 2)),  # a fused projection split per part
    ((2, 6, 12), Shard(2, 4, (8, 2, 2), (4, 2, 2)), 4, (0, 1, 2)),  # KV parts replicated within groups
    ((2, 8, 5), seq_shard(1, 4), 4, (0, 1, 2)),  # the sequence split
    ((2, 4, 6, 6), Shard(1, 2, (4,)), 2, (0, 2, 1, 3)),  # heads of a transposed (non-contiguous) value
]


def _unsharded(shape: tuple[int, ...], order: tuple[int, ...], seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn([shape[d] for d in order]).permute([order.index(d) for d in range(len(shape))])
    torch.manual_seed(seed)
    return x, torch.ops.aten.dropout.default(x, P, True)


_chunk = shard_tensor  # this rank's chunk of the full value (a sequence split included)


@pytest.mark.parametrize("shape,pl,world,order", LAYOUTS, ids=["column", "fused", "grouped", "seq", "strided"])
def test_each_rank_s_chunk_is_the_unsharded_dropout_s_chunk(shape, pl, world, order) -> None:
    x, ref = _unsharded(shape, order, seed=3)
    after = torch.get_rng_state()
    for rank in range(world):
        torch.manual_seed(3)  # every rank of a group starts from the same state
        got = dropout_chunk(_chunk(x, pl, rank, world), P, True, pl.dim, pl.groups, pl.segs, pl.sgroups, order,
                            rank, world)
        assert torch.equal(got, _chunk(ref, pl, rank, world))
        assert torch.equal(torch.get_rng_state(), after)  # the generator advanced as the unsharded run's
        torch.manual_seed(3)
        out, mask = dropout_chunk(_chunk(x, pl, rank, world), P, True, pl.dim, pl.groups, pl.segs, pl.sgroups,
                                  order, rank, world, native=True)
        assert torch.allclose(out, got) and mask.dtype == torch.bool and torch.equal(out != 0, mask)


def _gpt2(dropout: float) -> GPT2LMHeadModel:
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=models.TINY_VOCAB, n_positions=32, n_embd=32, n_layer=1, n_head=4,
                        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
    config._attn_implementation = "eager"
    return GPT2LMHeadModel(config)


@pytest.mark.parametrize("sp", [False, True], ids=["tp", "sp"])
def test_dropouts_of_split_values_are_emitted_as_chunks_of_the_full_noise(sp: bool) -> None:
    plan = tpfx.plan(_gpt2(0.1).train(), 2, sequence_parallel=sp)
    d = plan.derivation
    split = {n.name for n in d.gm.graph.nodes if n.target is torch.ops.aten.dropout.default
             and isinstance(d.prop.placements.get(n), Shard)}
    assert len(split) == (4 if sp else 1)  # attention probs (head split); with SP also the residual stream's
    for rank in range(2):
        gm = emit(d.gm, d.prop, rank, lambda ranks: "fake:" + ",".join(map(str, ranks)), {})
        chunked = {n.name for n in gm.graph.nodes if n.target is dropout_chunk}
        assert chunked == split
    ids = next(n.meta["val"] for n in d.gm.graph.find_nodes(op="placeholder")
               if isinstance(n.meta.get("val"), torch.Tensor) and n.meta["val"].dtype == torch.long)
    seq = ids.shape[1]  # input_ids (B, S): S dynamic, and emission specialized nothing
    assert isinstance(seq, torch.SymInt) and not seq.node.shape_env.replacements
    evaluated = [n for n in tpfx.plan(_gpt2(0.1).eval(), 2).derivation.gm.graph.nodes if "dropout" in str(n.target)]
    assert evaluated and all(n.args[2] is False for n in evaluated)  # an eval capture's dropouts do nothing
