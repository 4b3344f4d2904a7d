"""Tier 1: op rules and shape reasoning on shapes alone (no process group, milliseconds)."""

from __future__ import annotations

import sympy
import torch
from rule_helpers import ctx as _ctx
from rule_helpers import free as _free
from rule_helpers import op as _op
from tpfx.passes.collectives import refine
from tpfx.passes.placements import P, R, Shard, shard_tensor
from tpfx.passes.rules import Fallback, FreeParam, Strategy, lookup
from tpfx.passes.shapes import map_shard, view_groups

aten = torch.ops.aten
s0, s1 = sympy.symbols("s0 s1", positive=True, integer=True)
I = sympy.Integer  # noqa: E741


def test_view_groups_symbolic_batch():
    assert view_groups([s0, s1, I(64)], [s0, s1, I(4), I(16)]) == [([0], [0]), ([1], [1]), ([2], [2, 3])]
    assert view_groups([s0 * s1, I(64)], [s0, s1, I(64)]) == [([0], [0, 1]), ([1], [2])]


def test_map_shard_heads_and_gqa_groups():
    assert map_shard([s0, s1, I(64)], [s0, s1, I(4), I(16)], Shard(2, 2, (64,))) == Shard(2, 2, (4,))
    # 2 KV heads at t=4: no 4-way layout, but 2 groups work
    assert map_shard([s0, s1, I(32)], [s0, s1, I(2), I(16)], Shard(2, 4, (32,))) == 2
    # merge heads back: shard lands on the merged dim
    assert map_shard([s0, s1, I(4), I(16)], [s0, s1, I(64)], Shard(2, 2, (4,))) == Shard(2, 2, (64,))


def test_map_shard_fused_segments_land_on_heads():
    # [.., 3H] with q/k/v segments viewed as [.., 3, n, d]: the shard is on n, the 3 is the period
    assert map_shard([s0, s1, I(192)], [s0, s1, I(3), I(4), I(16)], Shard(2, 2, (64, 64, 64))) == Shard(3, 2, (4,))


def test_shard_tensor_segments_and_refine():
    x = torch.arange(12.0)
    p = Shard(0, 2, (6, 6))  # two segments, each split in 2
    assert shard_tensor(x, p, 0, 2).tolist() == [0, 1, 2, 6, 7, 8]
    assert shard_tensor(x, p, 1, 2).tolist() == [3, 4, 5, 9, 10, 11]
    # groups 2 of 4 ranks: ranks 2 and 3 hold the same chunk; refining to 4 groups takes a sub-chunk
    q = Shard(0, 2, (12,))
    assert shard_tensor(x, q, 2, 4).tolist() == shard_tensor(x, q, 3, 4).tolist() == list(range(6, 12))
    fine = Shard(0, 4, (12,))
    for r in range(4):
        assert torch.equal(refine(shard_tensor(x, q, r, 4), 0, [12], 2, 4, r, 4), shard_tensor(x, fine, r, 4))


def test_segments_with_their_own_group_counts():
    # Falcon-7B's fused [q | k | v] with one key and one value head: q split 2 ways, k and v held whole
    p = Shard(0, 2, (4, 1, 1), (2, 1, 1))
    x = torch.arange(6.0)
    assert shard_tensor(x, p, 0, 2).tolist() == [0, 1, 4, 5] and shard_tensor(x, p, 1, 2).tolist() == [2, 3, 4, 5]
    assert p.local_segs(1, 2) == (2, 1, 1) and str(p) == "S(0/2[4+1/1+1/1])"
    assert Shard(0, 2, (4, 2), (2, 2)).sgroups is None  # uniform counts have one form
    assert p.replica_groups(1, 4) == [(0, 1), (0, 1, 2, 3), (0, 1, 2, 3)]
    # a slice that takes the key head out of the viewed heads: held whole, no communication and no rewrite
    heads = _op((s0, 6, 8), Shard(1, 2, (4, 1, 1), (2, 1, 1)))
    st = lookup(aten.slice.Tensor)(_ctx(aten.slice.Tensor, [heads], (s0, 1, 8), args=[heads.node, 1, 4, 5]))
    assert isinstance(st, Strategy) and st.out == Shard(1, 1, (1,))
    # before the cuts are known, the slice asks for them: the key head alone in 1 group
    heads = _op((s0, 6, 8), Shard(1, 2, (6,)))
    fb = lookup(aten.slice.Tensor)(_ctx(aten.slice.Tensor, [heads], (s0, 1, 8), args=[heads.node, 1, 4, 5]))
    assert isinstance(fb, Fallback) and (fb.segs, fb.sgroups) == ((4, 1, 1), (2, 1, 2))
    # the whole head broadcasts against the split query heads in attention: kept as it is
    q, k = _op((s0, 4, 5, 8), Shard(1, 2, (4,))), _op((s0, 1, 5, 8), Shard(1, 1, (1,)))
    st = lookup(aten.scaled_dot_product_attention.default)(
        _ctx(aten.scaled_dot_product_attention.default, [q, k, k], (s0, 4, 5, 8), args=[q.node, k.node, k.node]))
    assert isinstance(st, Strategy) and st.out == Shard(1, 2, (4,)) and st.want[1] == Shard(1, 1, (1,))
    # through the [.., (n+2)*d] -> [.., n+2, d] view the segments are counted in heads
    assert map_shard((s0, I(48)), (s0, I(6), I(8)), Shard(1, 2, (32, 8, 8), (2, 1, 1))) == Shard(1, 2, (4, 1, 1), (2, 1, 1))


def test_constant_list_index_becomes_a_slice():
    from tpfx.derive import capture, examples

    class Pick(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x[:, :, [1]] * 2 + x[:, :, [0, 1]].sum(2, keepdim=True) + x[:, :, [3, 1]].sum(2, keepdim=True) \
                + x[:, :, [-2]]

    m = Pick()
    x = torch.randn(2, 3, 4)
    gm, _ = capture(m, *examples(m, (x,), None))
    slices = {tuple(n.args[1:]) for n in gm.graph.nodes if n.target is aten.slice.Tensor and n.args[1] == 2}
    assert slices == {(2, 1, 2), (2, 0, 2)}
    # [3, 1] is not a run; [-2] counts from a run-time size (the dims are dynamic here): both kept
    assert sum(n.target is aten.index.Tensor for n in gm.graph.nodes) == 2
    assert torch.equal(gm(x)[0] if isinstance(gm(x), tuple) else gm(x), m(x))


def test_linear_colwise_when_input_replicated():
    x, w = _op((s0, s1, 64)), _op((128, 64), free=_free())
    st = lookup(aten.linear.default)(_ctx(aten.linear.default, [x, w], (s0, s1, 128)))
    assert isinstance(st, Strategy)
    assert st.out == Shard(2, 2, (128,))
    assert st.decide[1] == ("colwise", Shard(0, 2, (128,)))


def test_linear_rowwise_when_contraction_sharded():
    x, w = _op((s0, s1, 128), Shard(2, 2, (128,))), _op((64, 128), free=_free())
    st = lookup(aten.linear.default)(_ctx(aten.linear.default, [x, w], (s0, s1, 64)))
    assert isinstance(st, Strategy) and st.out == P
    assert st.decide[1] == ("rowwise", Shard(1, 2, (128,)))


def test_conv1d_mm_colwise_splits_weight_dim_1():
    x, w = _op((s0, 64)), _op((64, 192), free=_free())
    st = lookup(aten.mm.default)(_ctx(aten.mm.default, [x, w], (s0, 192)))
    assert isinstance(st, Strategy) and st.decide[1] == ("colwise", Shard(1, 2, (192,)))


def test_pinned_replicate_weight_stays_replicated():
    free = FreeParam("w", frozenset({"replicate"}), 2)
    x, w = _op((s0, 64)), _op((128, 64), free=free)
    st = lookup(aten.linear.default)(_ctx(aten.linear.default, [x, w], (s0, 128)))
    assert isinstance(st, Strategy) and st.out == R and st.decide[1][0] == "replicate"


def test_pointwise_partial_plus_replicate_stays_partial():
    a, b = _op((s0, 64), P), _op((s0, 64), R)
    st = lookup(aten.add.Tensor)(_ctx(aten.add.Tensor, [a, b], (s0, 64)))
    assert isinstance(st, Strategy) and st.out == P and st.want == {0: P, 1: P}


def test_pointwise_partial_into_nonlinear_is_reduced():
    a = _op((s0, 64), P)
    st = lookup(aten.silu.default)(_ctx(aten.silu.default, [a], (s0, 64)))
    assert isinstance(st, Strategy) and st.out == R and st.want[0] == R


def test_pointwise_broadcast_keeps_size1_operand_replicated():
    q = _op((s0, 4, s1, 16), Shard(1, 2, (4,)))
    cos = _op((s0, 1, s1, 16), R)
    st = lookup(aten.mul.Tensor)(_ctx(aten.mul.Tensor, [q, cos], (s0, 4, s1, 16)))
    assert isinstance(st, Strategy) and st.out == Shard(1, 2, (4,)) and st.want[1] == R


def test_view_rewrites_head_count_constant():
    x = _op((s0, s1, 64), Shard(2, 2, (64,)))
    ctx = _ctx(aten.view.default, [x], (s0, s1, 4, 16), args=[x.node, [s0, s1, 4, 16]])
    st = lookup(aten.view.default)(ctx)
    assert isinstance(st, Strategy) and st.out == Shard(2, 2, (4,))
    args, _ = st.rewrite((None, [7, 9, 4, 16]), {}, 0, 2)
    assert args[1] == [7, 9, 2, 16]


def test_view_indivisible_heads_falls_back_with_groups():
    x = _op((s0, s1, 32), Shard(2, 4, (32,)))
    ctx = _ctx(aten.view.default, [x], (s0, s1, 2, 16), args=[x.node, [s0, s1, 2, 16]], world=4)
    res = lookup(aten.view.default)(ctx)
    assert isinstance(res, Fallback) and res.groups == 2


def test_split_fused_projection_asks_for_segments():
    x = _op((s0, 192), Shard(1, 2, (192,)))
    ctx = _ctx(aten.split.Tensor, [x], [(s0, 64)] * 3, args=[x.node, 64, 1])
    res = lookup(aten.split.Tensor)(ctx)
    assert isinstance(res, Fallback) and res.segs == (64, 64, 64)
    x2 = _op((s0, 192), Shard(1, 2, (64, 64, 64)))
    st = lookup(aten.split.Tensor)(_ctx(aten.split.Tensor, [x2], [(s0, 64)] * 3, args=[x2.node, 64, 1]))
    assert isinstance(st, Strategy) and st.out == (Shard(1, 2, (64,)),) * 3


def test_softmax_over_sharded_dim_falls_back_but_not_over_other_dims():
    x = _op((s0, 4, s1, s1), Shard(1, 2, (4,)))
    ok = lookup(aten._softmax.default)(_ctx(aten._softmax.default, [x], (s0, 4, s1, s1), args=[x.node, -1, False]))
    assert isinstance(ok, Strategy) and ok.out == Shard(1, 2, (4,))
    y = _op((s0, 64), Shard(1, 2, (64,)))
    bad = lookup(aten._softmax.default)(_ctx(aten._softmax.default, [y], (s0, 64), args=[y.node, -1, False]))
    assert isinstance(bad, Fallback)


def test_sum_over_sharded_dim_is_partial():
    x = _op((s0, 64), Shard(1, 2, (64,)))
    st = lookup(aten.sum.dim_IntList)(_ctx(aten.sum.dim_IntList, [x], (s0,), args=[x.node, [-1]]))
    assert isinstance(st, Strategy) and st.out == P


def test_embedding_vocab_split_gives_partial():
    w, ids = _op((128, 64), free=_free()), _op((s0, s1), dtype=torch.int64)
    st = lookup(aten.embedding.default)(_ctx(aten.embedding.default, [w, ids], (s0, s1, 64)))
    assert isinstance(st, Strategy) and st.out == P and st.decide[0] == ("vocab", Shard(0, 2, (128,)))


def test_sdpa_head_sharded():
    q = _op((s0, 4, s1, 16), Shard(1, 2, (4,)))
    k = _op((s0, 4, s1, 16), Shard(1, 2, (4,)))
    v = _op((s0, 4, s1, 16), Shard(1, 2, (4,)))
    st = lookup(aten.scaled_dot_product_attention.default)(
        _ctx(aten.scaled_dot_product_attention.default, [q, k, v], (s0, 4, s1, 16)))
    assert isinstance(st, Strategy) and st.out == Shard(1, 2, (4,))


def test_partial_plus_constant_is_reduced_first():
    # add(P, 1e-6): the constant would be added once per rank
    a = _op((s0, 1), P)
    st = lookup(aten.add.Tensor)(_ctx(aten.add.Tensor, [a], (s0, 1), args=[a.node, 1e-6]))
    assert isinstance(st, Strategy) and st.out == R and st.want[0] == R
    # a partial times a constant stays partial
    st = lookup(aten.mul.Tensor)(_ctx(aten.mul.Tensor, [a], (s0, 1), args=[a.node, 0.5]))
    assert isinstance(st, Strategy) and st.out == P


def test_pinned_rowwise_expert_weight_splits_the_contracted_dim_not_the_expert_dim():
    # grouped_mm "tk,ekn->tn": a rowwise pin must split k (contracted), never e (the experts)
    from tpfx.passes.rules import grouped_mm

    x = _op((s0, 128))
    w = _op((4, 128, 64), free=FreeParam("w", frozenset({"rowwise"}), 2))
    st = grouped_mm(_ctx(aten.mm.default, [x, w], (s0, 64)))
    assert isinstance(st, Strategy) and st.out == P
    assert st.decide[1] == ("rowwise", Shard(1, 2, (128,))) and st.want[0] == Shard(1, 2, (128,))


def test_slice_scatter_keeps_a_shard_off_the_written_dim():
    # key[..., :16] = k_nope (functionalized copy_ into a slice): heads split, the written dim whole
    base, src = _op((s0, 4, s1, 24)), _op((s0, 4, s1, 16), Shard(1, 2, (4,)))
    st = lookup(aten.slice_scatter.default)(
        _ctx(aten.slice_scatter.default, [base, src], (s0, 4, s1, 24), args=[base.node, src.node, 3, 0, 16]))
    assert isinstance(st, Strategy) and st.out == Shard(1, 2, (4,)) and st.want == {0: st.out, 1: st.out}
    # writing into the split dim itself cannot stay split
    src = _op((s0, 4, s1, 16), Shard(3, 2, (16,)))
    bad = lookup(aten.slice_scatter.default)(
        _ctx(aten.slice_scatter.default, [base, src], (s0, 4, s1, 24), args=[base.node, src.node, 3, 0, 16]))
    assert isinstance(bad, Fallback) and bad.operand is None


def test_view_as_complex_carries_leading_shards_but_not_the_pair_dim():
    x = _op((s0, 4, s1, 4, 2), Shard(1, 2, (4,)))
    st = lookup(aten.view_as_complex.default)(_ctx(aten.view_as_complex.default, [x], (s0, 4, s1, 4)))
    assert isinstance(st, Strategy) and st.out == Shard(1, 2, (4,))
    y = _op((s0, 4, s1, 4, 2), Shard(4, 2, (2,)))
    assert isinstance(lookup(aten.view_as_complex.default)(
        _ctx(aten.view_as_complex.default, [y], (s0, 4, s1, 4))), Fallback)
    z = _op((s0, 4, s1, 4), Shard(1, 2, (4,)), dtype=torch.complex64)
    st = lookup(aten.view_as_real.default)(_ctx(aten.view_as_real.default, [z], (s0, 4, s1, 4, 2)))
    assert isinstance(st, Strategy) and st.out == Shard(1, 2, (4,))
