"""Dropout on split values (tier 2, no process group): each rank's chunk is multiplied by its chunk of the noise
the unsharded run draws, so sharded training with dropout is the unsharded run's, mask for mask."""

from __future__ import annotations

import models
import pytest
import torch
from tpfx.passes.emit import emit
from tpfx.passes.kernels import dropout_chunk
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


def _sdpa_inputs(heads: int = 4) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(2, heads, 6, 8, generator=g) for _ in range(3))


@pytest.mark.parametrize("world", [2, 4])
def test_attention_dropout_over_split_heads_is_the_unsharded_kernel_s(world: int) -> None:
    # F.scaled_dot_product_attention with dropout (transformers' default attention in training) on CPU draws
    # its noise over the whole (B, H, L, S) weights: each rank's heads get exactly their chunk of it
    from tpfx.passes.kernels import sdpa_dropout_chunk

    q, k, v = _sdpa_inputs()
    torch.manual_seed(7)
    ref = torch.nn.functional.scaled_dot_product_attention(q, k, v, dropout_p=P, is_causal=True)
    after = torch.get_rng_state()
    pl = Shard(1, world, (4,))  # 4 heads, split over the world
    for rank in range(world):
        torch.manual_seed(7)
        mine = [shard_tensor(t, pl, rank, world) for t in (q, k, v)]
        got = sdpa_dropout_chunk(*mine, None, P, True, None, False, pl.groups, pl.segs, pl.sgroups, rank, world)
        assert torch.allclose(got, shard_tensor(ref, pl, rank, world), rtol=0, atol=1e-6)
        assert torch.equal(torch.get_rng_state(), after)


def test_attention_dropout_masks_of_two_ranks_heads_are_independent_at_rate_p() -> None:
    # what a fused kernel (CUDA) cannot reproduce is still drawn per head: rank 0's and rank 1's heads, from one
    # random state, get different masks (never one mask repeated), each dropping p within its binomial bound
    from tpfx.passes.kernels import sdpa_dropout_chunk

    n = 64
    q, k = torch.zeros(2, 4, n, 8), torch.zeros(2, 4, n, 8)  # uniform attention: weights 1/n
    v = torch.eye(n).expand(2, 4, n, n)  # the output is the dropped-out weights themselves
    pl = Shard(1, 2, (4,))
    masks = []
    for rank in range(2):
        torch.manual_seed(7)
        mine = [shard_tensor(t, pl, rank, 2) for t in (q, k, v)]
        out = sdpa_dropout_chunk(*mine, None, P, False, None, False, pl.groups, pl.segs, pl.sgroups, rank, 2)
        masks.append(out == 0)
    assert not torch.equal(masks[0], masks[1])
    for m in masks:
        cells = m.numel()
        rate, bound = float(m.float().mean()), 4 * (P * (1 - P) / cells) ** 0.5  # 4 sigma
        assert abs(rate - P) <= bound, (rate, bound)
