"""Non-transformer modules: convolutions, pooling, batch/group norm, nn.MultiheadAttention.

Tier 1: the rules of ``passes/rules/nn.py`` on shapes alone. Tier 2: plans and emitted per-rank graphs (styles,
collective counts) without a process group. Tier 3 (slow): one ``tpfx.launch`` per world size runs every model
of ``nn_cases.CASES`` (forward, gradients, one SGD step, batch-norm running statistics vs. the unsharded model).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import nn_cases
import pytest
import sympy
import torch
from numerics import TOL
from rule_helpers import ctx as _ctx
from rule_helpers import free as _free
from rule_helpers import op as _op
from rule_helpers import rule as _rule
from simulate import run_ranks
from tpfx.passes.collectives import reduce_grad_spans
from tpfx.passes.emit import collective_nodes
from tpfx.passes.kernels import sharded_batch_norm
from tpfx.passes.normalize import decompose_bias
from tpfx.passes.placements import P, R, Shard, shard_tensor
from tpfx.passes.rules import WORLD, Fallback, FreeParam, Strategy, lookup

import tpfx
from tpfx.launch import launch

aten = torch.ops.aten
s0, s1, s2 = sympy.symbols("s0 s1 s2", positive=True, integer=True)
I = sympy.Integer  # noqa: E741


# ----------------------------------------------------------------------------- tier 1: rules


def test_conv2d_colwise_when_input_replicated() -> None:
    x, w = _op((s0, 3, s1, s2)), _op((16, 3, 3, 3), free=_free())
    st = _rule(aten.conv2d.default, [x, w], (s0, 16, s1 - 2, s2 - 2), [x.node, w.node])
    assert isinstance(st, Strategy) and st.out == Shard(1, 2, (16,))
    assert st.decide[1] == ("colwise", Shard(0, 2, (16,)))


def test_conv2d_rowwise_when_input_channels_sharded() -> None:
    x, w = _op((s0, 16, s1, s2), Shard(1, 2, (16,))), _op((32, 16, 3, 3), free=_free())
    st = _rule(aten.conv2d.default, [x, w], (s0, 32, s1 - 2, s2 - 2), [x.node, w.node])
    assert isinstance(st, Strategy) and st.out == P
    assert st.decide[1] == ("rowwise", Shard(1, 2, (16,))) and st.want[0] == Shard(1, 2, (16,))


def test_conv_unbatched_transposed_and_padding_overload() -> None:
    x, w = _op((16, s0), Shard(0, 2, (16,))), _op((8, 16, 3), free=_free())  # conv1d of an unbatched [C, L]
    st = _rule(aten.conv1d.default, [x, w], (8, s0 - 2), [x.node, w.node])
    assert isinstance(st, Strategy) and st.out == P and st.decide[1] == ("rowwise", Shard(1, 2, (16,)))
    x, w = _op((s0, 8, s1, s1)), _op((8, 6, 2, 2), free=_free())  # transposed weight: [in, out, k, k]
    st = _rule(aten.conv_transpose2d.input, [x, w], (s0, 6, 2 * s1, 2 * s1), [x.node, w.node, None, [2, 2]])
    assert isinstance(st, Strategy) and st.out == Shard(1, 2, (6,)) and st.decide[1] == ("colwise", Shard(1, 2, (6,)))
    x, w = _op((s0, 3, s1, s1)), _op((16, 3, 3, 3), free=_free())
    st = _rule(aten.conv2d.padding, [x, w], (s0, 16, s1, s1), [x.node, w.node, None, [1, 1], "same"])
    assert isinstance(st, Strategy) and st.out == Shard(1, 2, (16,))


def test_conv_over_sharded_spatial_dim_or_with_bias_falls_back() -> None:
    x, w = _op((s0, 16, 32, 32), Shard(2, 2, (32,))), _op((16, 16, 3, 3))
    assert isinstance(_rule(aten.conv2d.default, [x, w], (s0, 16, 30, 30), [x.node, w.node]), Fallback)
    x, w, b = _op((s0, 3, 8, 8)), _op((16, 3, 3, 3), free=_free()), _op((16,), free=_free("b"))
    res = _rule(aten.conv2d.default, [x, w, b], (s0, 16, 6, 6), [x.node, w.node, b.node])
    assert isinstance(res, Fallback) and res.operand == 2  # biases are split off by decompose_bias


def test_depthwise_conv_keeps_channel_shard_and_rewrites_groups() -> None:
    x, w = _op((s0, 16, s1), Shard(1, 2, (16,))), _op((16, 1, 3), free=_free())
    args = [x.node, w.node, None, [1], [1], [1], 16]
    st = _rule(aten.conv1d.default, [x, w], (s0, 16, s1), args)
    assert isinstance(st, Strategy) and st.out == Shard(1, 2, (16,))
    assert st.decide[1] == ("shard", Shard(0, 2, (16,)))
    new_args, _ = st.rewrite(("x", "w", None, [1], [1], [1], 16), {}, 1, 2)
    assert new_args[6] == 8
    _, kwargs = st.rewrite(("x", "w"), {}, 0, 2)  # groups defaulted: passed by name
    assert kwargs == {"groups": 8}
    # channel multiplier 2 (out = 2 * in): the weight's 32 rows are split with the same group boundaries
    w2 = _op((32, 1, 3), free=_free())
    st = _rule(aten.conv1d.default, [x, w2], (s0, 32, s1), [x.node, w2.node, None, [1], [1], [1], 16])
    assert isinstance(st, Strategy) and st.out == Shard(1, 2, (32,)) and st.decide[1][1] == Shard(0, 2, (32,))


def test_grouped_conv_needs_whole_groups_per_rank() -> None:
    # 2 groups of 8 channels on 4 ranks: a rank would hold half a group -> ask for 2 chunks instead
    x, w = _op((s0, 16, s1, s1), Shard(1, 4, (16,))), _op((16, 8, 3, 3), free=_free(world=4))
    res = _rule(aten.conv2d.default, [x, w], (s0, 16, s1, s1), [x.node, w.node, None, [1, 1], [1, 1], [1, 1], 2],
                world=4)
    assert isinstance(res, Fallback) and res.groups == 2
    x = _op((s0, 16, s1, s1), Shard(1, 2, (16,)))
    st = _rule(aten.conv2d.default, [x, w], (s0, 16, s1, s1), [x.node, w.node, None, [1, 1], [1, 1], [1, 1], 2],
               world=4)
    assert isinstance(st, Strategy) and st.out == Shard(1, 2, (16,)) and st.rewrite(
        ("x", "w", None, [1, 1], [1, 1], [1, 1], 2), {}, 3, 4)[0][6] == 1


def test_grouped_conv_of_replicated_input_splits_colwise() -> None:
    x, w = _op((s0, 16, s1)), _op((16, 1, 3), free=_free())
    st = _rule(aten.conv1d.default, [x, w], (s0, 16, s1), [x.node, w.node, None, [1], [1], [1], 16])
    assert isinstance(st, Strategy) and st.decide[1] == ("colwise", Shard(0, 2, (16,)))
    assert st.want[0] == Shard(1, 2, (16,)) and st.out == Shard(1, 2, (16,))  # the input is sliced locally
    # segments the planner asked for (a later split of the output) are kept when they are whole groups
    free = FreeParam("w", frozenset({"colwise", "shard", "replicate"}), 2, segs=(8, 8))
    w = _op((16, 1, 3), free=free)
    st = _rule(aten.conv1d.default, [x, w], (s0, 16, s1), [x.node, w.node, None, [1], [1], [1], 16])
    assert isinstance(st, Strategy) and st.out == Shard(1, 2, (8, 8)) and st.want[0] == Shard(1, 2, (8, 8))


def test_pooling_keeps_channel_shard_not_spatial() -> None:
    x = _op((s0, 16, 8, 8), Shard(1, 2, (16,)))
    st = _rule(aten.max_pool2d.default, [x], (s0, 16, 4, 4), [x.node, [2, 2]])
    assert isinstance(st, Strategy) and st.out == Shard(1, 2, (16,))
    st = _rule(aten.adaptive_max_pool2d.default, [x], [(s0, 16, 1, 1)] * 2, [x.node, [1, 1]])
    assert isinstance(st, Strategy) and st.out == (Shard(1, 2, (16,)),) * 2
    y = _op((s0, 16, 8, 8), Shard(3, 2, (8,)))
    assert isinstance(_rule(aten.avg_pool2d.default, [y], (s0, 16, 4, 4), [y.node, [2, 2]]), Fallback)
    z = _op((s0, 16, 8, 8), P)  # averaging is linear: a partial sum is pooled before it is reduced
    st = _rule(aten.adaptive_avg_pool2d.default, [z], (s0, 16, 1, 1), [z.node, [1, 1]])
    assert isinstance(st, Strategy) and st.out == P and st.want[0] == P
    st = _rule(aten.max_pool2d.default, [z], (s0, 16, 4, 4), [z.node, [2, 2]])
    assert isinstance(st, Strategy) and st.want[0] == R and st.out == R


def _bn_operands(x_placement):
    x = _op((s0, 16, s1, s1), x_placement)
    w, b = _op((16,), free=_free("bn.weight")), _op((16,), free=_free("bn.bias"))
    rm, rv = _op((16,)), _op((16,))  # buffers: never free, replicated
    return [x, w, b, rm, rv]


def test_batch_norm_over_channel_shard_splits_weights_and_narrows_stats() -> None:
    ops = _bn_operands(Shard(1, 2, (16,)))
    args = [o.node for o in ops] + [True, 0.1, 1e-5, False]
    ctx = _ctx(aten.batch_norm.default, ops, (s0, 16, s1, s1), args)
    st = lookup(aten.batch_norm.default)(ctx)
    assert isinstance(st, Strategy) and st.out == Shard(1, 2, (16,))
    assert st.decide == {1: ("shard", Shard(0, 2, (16,))), 2: ("shard", Shard(0, 2, (16,)))}
    assert st.want[3] == R and st.want[4] == R  # the running stats are whole buffers, narrowed at run time
    assert st.target is sharded_batch_norm and "tpfx_retarget" not in ctx.node.meta  # rules are pure
    new_args, _ = st.rewrite(("x", "w", "b", "rm", "rv", True, 0.1, 1e-5, False), {}, 1, 2)
    assert new_args[9:] == ([16], 2, 1, 2, WORLD)  # the group its statistics are gathered over


def test_batch_norm_statistics_over_a_sharded_batch() -> None:
    ops = _bn_operands(Shard(0, 2, (8,)))
    train = _rule(aten.batch_norm.default, ops, (s0, 16, s1, s1), [o.node for o in ops] + [True, 0.1, 1e-5, False])
    assert isinstance(train, Fallback)
    evals = _rule(aten.batch_norm.default, ops, (s0, 16, s1, s1), [o.node for o in ops] + [False, 0.1, 1e-5, False])
    assert isinstance(evals, Strategy) and evals.out == Shard(0, 2, (8,)) and evals.want[1] == R


@pytest.mark.parametrize("segs", [(8,), (4, 4)])
def test_sharded_batch_norm_equals_the_full_one_per_chunk(segs: tuple[int, ...]) -> None:
    g = torch.Generator().manual_seed(0)
    x, w, b = torch.randn(4, 8, 5, 5, generator=g), torch.randn(8, generator=g), torch.randn(8, generator=g)
    rm, rv = torch.randn(8, generator=g), torch.rand(8, generator=g) + 0.5
    ref_rm, ref_rv = rm.clone(), rv.clone()
    ref = torch.batch_norm(x, w, b, ref_rm, ref_rv, True, 0.1, 1e-5, False)
    p = Shard(1, 2, segs)

    def body(rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # simulated ranks: the gather is real
        loc_rm, loc_rv = rm.clone(), rv.clone()
        y = sharded_batch_norm(shard_tensor(x, p, rank, 2), shard_tensor(w, Shard(0, 2, segs), rank, 2),
                               shard_tensor(b, Shard(0, 2, segs), rank, 2), loc_rm, loc_rv, True, 0.1, 1e-5, False,
                               list(segs), 2, rank, 2, "fake:0,1")
        return y, loc_rm, loc_rv

    for rank, (y, loc_rm, loc_rv) in enumerate(run_ranks(2, body)):
        torch.testing.assert_close(y, shard_tensor(ref, p, rank, 2))
        torch.testing.assert_close(loc_rm, ref_rm)  # every rank's whole buffer: all chunks updated
        torch.testing.assert_close(loc_rv, ref_rv)
        assert not torch.equal(loc_rm, rm)


def test_group_norm_on_whole_groups_is_local() -> None:
    x = _op((s0, 16, s1, s1), Shard(1, 2, (16,)))
    w, b = _op((16,), free=_free("gn.weight")), _op((16,), free=_free("gn.bias"))
    st = _rule(aten.group_norm.default, [x, w, b], (s0, 16, s1, s1), [x.node, 4, w.node, b.node, 1e-5, False])
    assert isinstance(st, Strategy) and st.out == Shard(1, 2, (16,)) and st.decide[1][0] == "shard"
    assert st.rewrite(("x", 4, "w", "b", 1e-5, False), {}, 0, 2)[0][1] == 2
    x4 = _op((s0, 16, s1, s1), Shard(1, 4, (16,)))  # 2 groups of 8 on 4 ranks: half groups -> 2 chunks
    res = _rule(aten.group_norm.default, [x4, w, b], (s0, 16, s1, s1), [x4.node, 2, w.node, b.node, 1e-5, False],
                world=4)
    assert isinstance(res, Fallback) and res.groups == 2
    y = _op((s0, 16, s1, s1), Shard(3, 2, (8,)))  # over the spatial dims: the generic norm rule refuses
    assert isinstance(_rule(aten.group_norm.default, [y, w, b], (s0, 16, s1, s1),
                            [y.node, 4, w.node, b.node, 1e-5, False]), Fallback)


def test_baddbmm_addend_follows_the_matmul() -> None:
    inp, b1, b2 = _op((s0, 6, 6)), _op((s0, 6, 16), Shard(2, 2, (16,))), _op((s0, 16, 6), Shard(1, 2, (16,)))
    st = _rule(aten.baddbmm.default, [inp, b1, b2], (s0, 6, 6), [inp.node, b1.node, b2.node])
    assert isinstance(st, Strategy) and st.out == P and st.want[0] == P  # added once (on one rank)
    b1, b2 = _op((8, 6, 16), Shard(0, 2, (8,))), _op((8, 16, 6), Shard(0, 2, (8,)))
    bias = _op((1, 6, 6))  # broadcast over the sharded batch dim
    st = _rule(aten.baddbmm.default, [bias, b1, b2], (8, 6, 6), [bias.node, b1.node, b2.node])
    assert isinstance(st, Strategy) and st.out == Shard(0, 2, (8,)) and st.want[0] == R
    full = _op((8, 6, 6))
    st = _rule(aten.baddbmm.default, [full, b1, b2], (8, 6, 6), [full.node, b1.node, b2.node])
    assert isinstance(st, Strategy) and st.want[0] == Shard(0, 2, (8,))


def test_unflatten_of_fused_projection_asks_for_segments() -> None:
    # [.., 96] -> [.., 3, 32] on 2 ranks: first whole parts of 32 (as heads t does not divide: 2 and 1 parts);
    # taking a part out of that uneven split then asks for each part split on its own (a fused projection)
    x = _op((s0, s1, 96), Shard(2, 2, (96,)))
    res = _rule(aten.unflatten.int, [x], (s0, s1, 3, 32), [x.node, -1, [3, 32]])
    assert isinstance(res, Fallback) and res.unit == 32 and res.within == (96,)
    parts = _op((s0, s1, 3, 32), Shard(2, 2, (3,)))  # the uneven whole parts
    res = _rule(aten.select.int, [parts], (s0, s1, 32), [parts.node, 2, 0])
    assert isinstance(res, Fallback) and (res.segs, res.sgroups, res.within) == ((1, 1, 1), (2, 2, 2), (3,))
    x = _op((s0, s1, 96), Shard(2, 2, (32, 32, 32)))
    st = _rule(aten.unflatten.int, [x], (s0, s1, 3, 32), [x.node, -1, [3, 32]])
    assert isinstance(st, Strategy) and st.out == Shard(3, 2, (32,))


def test_view_folding_a_runtime_size_into_the_shard_says_so() -> None:
    x = _op((s1, s0, 32), Shard(2, 2, (32,)))
    res = _rule(aten.view.default, [x], (s1, 4 * s0, 8), [x.node, [s1, 4 * s0, 8]])
    assert isinstance(res, Fallback) and "run-time size s0" in res.reason


def test_fused_mha_kernel_falls_back() -> None:
    q = _op((s0, s1, 32), Shard(2, 2, (32,)))
    w = _op((96, 32), free=_free())
    assert isinstance(_rule(aten._native_multi_head_attention.default, [q, w], [(s0, s1, 32), (s0, s1, s1)],
                            [q.node, q.node, q.node, 32, 4, w.node]), Fallback)


def test_decompose_bias_splits_conv_bias_into_a_channel_add() -> None:
    torch.manual_seed(0)
    for conv, x in ((torch.nn.Conv2d(3, 4, 3), torch.randn(2, 3, 6, 6)), (torch.nn.Conv1d(3, 4, 3), torch.randn(3, 7)),
                    (torch.nn.ConvTranspose2d(3, 4, 2, stride=2), torch.randn(2, 3, 4, 4))):
        gm = decompose_bias(torch.export.export(conv, (x,), strict=False).module())
        convs = [n for n in gm.graph.nodes if n.op == "call_function" and "conv" in str(n.target)]
        assert len(convs) == 1 and convs[0].args[2] is None
        add = next(n for n in gm.graph.nodes if n.target is aten.add.Tensor)
        assert add.args[1].op == "get_attr" and add.args[1].target == "bias"  # a plain [C] operand
        assert add.meta["val"].shape[-1] == 4
        torch.testing.assert_close(gm(x), conv(x))


class _Stats(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (torch.std(x, dim=-1, keepdim=True) + torch.var(x, dim=(0, 2), unbiased=False).sum()
                + torch.var(x, correction=0) + torch.multiply(x, 2.0) - torch.subtract(x, 1.0))


def test_variance_is_two_means_and_aliases_are_canonical() -> None:
    from tpfx.passes.normalize import canonicalize_aliases, decompose_variance

    x = torch.randn(3, 5, 7) * 4 + 10  # a large mean: a one-pass E[x^2] - E[x]^2 would lose digits
    gm = torch.export.export(_Stats(), (x,), strict=False).module()
    gm = decompose_variance(canonicalize_aliases(gm))
    targets = {str(n.target) for n in gm.graph.nodes if n.op == "call_function"}
    assert not {t for t in targets if "var" in t or "std" in t or "multiply" in t or "subtract" in t}, targets
    torch.testing.assert_close(gm(x), _Stats()(x), rtol=1e-6, atol=1e-5)


# ----------------------------------------------------------------------------- tier 2: plans


def _plan(name: str, world: int) -> Any:
    case = nn_cases.CASES[name]
    with nn_cases.static_capture(case.static):
        return tpfx.plan(nn_cases.build(name), world, example_inputs=(nn_cases.inputs(case.example, 1),))


def _forward_collectives(plan: Any, rank: int) -> Counter:
    return Counter(k for k, _ in collective_nodes(tpfx.emit_rank(plan, rank)) if k != "reduce_grad")


def _styles(plan: Any) -> dict[str, str]:
    return {k: v.style for k, v in plan.placements.items()}


@pytest.mark.parametrize("world", [2, 4])
def test_cnn_plan_col_then_row_split_convs(world: int) -> None:
    plan = _plan("cnn", world)
    styles = _styles(plan)
    assert styles["features.0.weight"] == "colwise" and styles["features.0.bias"] == "shard"
    assert styles["features.2.weight"] == "rowwise" and styles["features.2.bias"] == "replicate"
    assert plan.placements["features.2.weight"].local_shape() == (32, 16 // world, 3, 3)
    assert styles["fc.weight"] == "colwise"
    assert not plan.fallbacks and not plan.unknown_ops
    # one all-reduce after the row-split conv (before its ReLU), one gather of the logits
    assert _forward_collectives(plan, world - 1) == Counter({"all_reduce": 1, "all_gather": 1})


@pytest.mark.parametrize("world", [2, 4])
def test_depthwise_plan_stays_channel_sharded(world: int) -> None:
    plan = _plan("depthwise", world)
    assert _styles(plan) == {"pw.weight": "colwise", "pw.bias": "shard", "dw.weight": "shard", "dw.bias": "shard",
                             "out.weight": "rowwise", "out.bias": "replicate"}
    assert plan.placements["dw.weight"].local_shape() == (16 // world, 1, 3)
    gm = tpfx.emit_rank(plan, 0)
    dw = next(n for n in gm.graph.nodes if n.target is aten.conv1d.default and n.args[1].target == "dw.weight")
    assert dw.args[6] == 16 // world  # groups made local
    assert _forward_collectives(plan, 0) == Counter({"all_reduce": 1})


@pytest.mark.parametrize("world", [2, 4])
def test_conv_norm_plan_norms_and_pools_keep_channel_shard(world: int) -> None:
    plan = _plan("conv_norm", world)
    styles = _styles(plan)
    assert styles["c1.weight"] == "colwise" and styles["c2.weight"] == "rowwise"
    for n in ("bn.weight", "bn.bias", "gn.weight", "gn.bias", "grouped.weight", "grouped.bias"):
        assert styles[n] == "shard", n
    assert "bn.running_mean" not in plan.placements  # buffers are not parameters
    assert not plan.fallbacks
    gm = tpfx.emit_rank(plan, world - 1)
    assert any(n.target is sharded_batch_norm for n in gm.graph.nodes)
    gn = next(n for n in gm.graph.nodes if n.target is aten.group_norm.default)
    assert gn.args[1] == 4 // world
    # a single all-reduce: after the row-split 1x1 conv (its mean over space is taken before the output)
    assert _forward_collectives(plan, 0) == Counter({"all_reduce": 1})


def test_repeated_conv_bn_blocks_both_get_the_sharded_batch_norm() -> None:
    # identical layers share one memoized rule solution: the retarget must reach every batch_norm node
    blocks = [torch.nn.Sequential(torch.nn.Conv2d(8, 16, 1, bias=False), torch.nn.BatchNorm2d(16), torch.nn.ReLU(),
                                  torch.nn.Conv2d(16, 8, 1)) for _ in range(2)]
    plan = tpfx.plan(torch.nn.Sequential(*blocks), 2, example_inputs=(torch.randn(2, 8, 5, 5),))
    assert {plan.placements[f"{i}.1.weight"].style for i in range(2)} == {"shard"}
    gm = tpfx.emit_rank(plan, 1)
    assert sum(n.target is sharded_batch_norm for n in gm.graph.nodes) == 2


def test_upsampler_plan_transposed_conv_is_rowwise_after_instance_norm() -> None:
    plan = _plan("upsampler", 2)
    assert _styles(plan) == {"c1.weight": "colwise", "inorm.weight": "shard", "inorm.bias": "shard",
                             "up.weight": "rowwise", "up.bias": "replicate"}
    assert plan.placements["up.weight"].dim == 0  # ConvTranspose2d weights are [in, out, k, k]
    assert _forward_collectives(plan, 1) == Counter({"all_reduce": 1})


@pytest.mark.parametrize("name", ["mha_encoder", "encoder_layer"])
def test_multihead_attention_dynamic_batch_replicates_attention_with_reason(name: str) -> None:
    plan = _plan(name, 2)
    pre = "attn." if name == "mha_encoder" else "self_attn."
    mlp = ("mlp.0", "mlp.2") if name == "mha_encoder" else ("linear1", "linear2")
    styles = _styles(plan)
    assert styles[pre + "in_proj_weight"] == "replicate" and styles[pre + "out_proj.weight"] == "replicate"
    assert styles[mlp[0] + ".weight"] == "colwise" and styles[mlp[1] + ".weight"] == "rowwise"
    reasons = " ".join(f["reason"] for f in plan.fallbacks if f.get("param") == pre + "in_proj_weight")
    assert "unflatten" in reasons and "batch*heads" in reasons and "run-time size" in reasons
    assert _forward_collectives(plan, 1) == Counter({"all_reduce": 1})  # the MLP's


@pytest.mark.parametrize("world", [2, 4])
def test_multihead_attention_static_capture_is_head_parallel(world: int) -> None:
    plan = _plan("mha_encoder_static", world)
    q = plan.placements["attn.in_proj_weight"]
    assert q.style == "colwise" and q.segs == (32, 32, 32)  # each rank: its heads of q, k and v
    assert plan.placements["attn.out_proj.weight"].style == "rowwise"
    assert plan.placements["mlp.0.weight"].style == "colwise"
    assert _forward_collectives(plan, world - 1) == Counter({"all_reduce": 2})  # Megatron: 2 per block


# ----------------------------------------------------------------------------- tier 3: gloo numerics

# The CNN runs at t=2 only: at t=4 its Linear(32, 10) head is split into 2 chunks (10 % 4 != 0) and emitting
# the gather of such a Shard(groups=2) of 10 columns on 4 ranks narrows unequal chunks (passes/emit.py, refine).
def test_no_grad_region_is_inlined_and_split_like_the_rest() -> None:
    # export wraps `with torch.no_grad()` in a higher-order op; inlined, the weights used inside it split
    plan = tpfx.plan(nn_cases.build("no_grad_cycles"), 2, example_inputs=(nn_cases.inputs((2, 6, 16), 0),))
    assert plan.placements["up.weight"].style == "colwise" and plan.placements["down.weight"].style == "rowwise"
    assert not plan.fallbacks and not plan.unknown_ops
    gm = tpfx.emit_rank(plan, 0)
    assert not [n for n in gm.graph.nodes if "wrap_with_set_grad_enabled" in str(n.target)]
    # one all-reduce per cycle (3), after each row-split down projection
    assert Counter(k for k, _ in collective_nodes(gm) if k == "all_reduce") == Counter({"all_reduce": 3})


@pytest.mark.parametrize("world", [2, 4])
def test_heads_folded_into_the_batch_are_unfolded_and_head_parallel(world: int) -> None:
    # [B*n, S, d] with a run-time B has no static layout for a split of n; capture rewrites the bmm/baddbmm into
    # a matmul over [B, n, S, d] (the repeated per-head bias broadcast over B), so attention splits by heads
    from tpfx.derive import capture, examples

    model = nn_cases.build("folded_heads")
    gm, dynamic = capture(model, *examples(model, (nn_cases.inputs((2, 6, 32), 0),), None))
    targets = Counter(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
    assert dynamic and targets["aten.bmm.default"] == targets["aten.baddbmm.default"] == 0
    assert targets["aten.matmul.default"] == 2
    plan = _plan("folded_heads", world)
    assert _styles(plan) == {"qkv.weight": "colwise", "qkv.bias": "shard", "dense.weight": "rowwise",
                             "dense.bias": "replicate", "up.weight": "colwise", "up.bias": "shard",
                             "down.weight": "rowwise", "down.bias": "replicate"}
    assert not plan.fallbacks
    # Megatron's 2 per block; the bias (no gradient) enters the heads by a local slice
    assert _forward_collectives(plan, world - 1) == Counter({"all_reduce": 2, "scatter": 1})


@pytest.mark.parametrize("world", [2, 4])
def test_std_over_the_split_dim_and_op_aliases_keep_the_mlp_split(world: int) -> None:
    # std over the column-split intermediate dim is two means (each a partial sum: one all-reduce of b*s values),
    # and torch.multiply is aten.mul's alias, not an unknown op: gate/up stay colwise, down rowwise
    plan = _plan("sparse_mlp", world)
    assert not plan.unknown_ops and not plan.fallbacks
    styles = _styles(plan)
    assert styles["gate.weight"] == styles["up.weight"] == "colwise" and styles["down.weight"] == "rowwise"
    # the cut's mean, the std's mean and sum of squares (b*s values each), the down projection
    assert _forward_collectives(plan, world - 1) == Counter({"all_reduce": 4})


@pytest.mark.parametrize("world", [2, 4])
def test_multi_query_fused_projection_splits_queries_and_holds_the_key_value_head_whole(world: int) -> None:
    # [n*d | d | d] viewed as n+2 heads and cut at n and n+1: the query segment is split, the single key and
    # value heads are held whole on every rank (their weight rows' gradients summed). At t=4 the n+2 = 6 viewed
    # heads do not split 4 ways: the first 4 do, the other 2 stay together until the slices cut k and v out
    plan = _plan("multi_query", world)
    for name in ("qkv.weight", "qkv.bias"):
        p = plan.placements[name]
        assert (p.segs, p.groups, p.sgroups) == ((32, 8, 8), world, (world, 1, 1)), (name, p)
        assert p.local_shape()[0] == 32 // world + 8 + 8
    styles = _styles(plan)
    assert styles["qkv.weight"] == styles["up.weight"] == "colwise"
    assert styles["dense.weight"] == styles["down.weight"] == "rowwise"
    assert not [f for f in plan.fallbacks if "node" in f]  # no gather left anywhere
    assert _forward_collectives(plan, world - 1) == Counter({"all_reduce": 2})  # Megatron's 2 per block
    gm = tpfx.emit_rank(plan, 0)
    spans = [n.args[2] for n in gm.graph.nodes if n.target is reduce_grad_spans]  # (weight, bias)
    assert len(spans) == 2
    for sp in spans:  # the local rows of k and v (after this rank's query rows), summed over all ranks
        assert [(a, n) for a, n, _ in sp] == [(32 // world, 8), (32 // world + 8, 8)], sp


WORLD_MODELS = {2: list(nn_cases.CASES),
                4: ["cnn", "conv_norm", "mha_encoder", "no_grad_cycles", "folded_heads", "sparse_mlp",
                    "multi_query"]}  # other t=4 plans: tier 2
_results: dict[int, list[dict[str, Any]] | str] = {}


def _run(world: int, name: str) -> list[dict[str, Any]]:
    if world not in _results:
        try:
            _results[world] = launch(nn_cases.nn_check, world, WORLD_MODELS[world], timeout_s=300)
        except RuntimeError as e:
            _results[world] = str(e)
    res = _results[world]
    if isinstance(res, str):
        pytest.fail(f"launch at world size {world} failed:\n{res}", pytrace=False)
    out = [r[name] for r in res]
    for r in out:
        if isinstance(r, str):
            pytest.fail(f"{name} at world size {world} raised:\n{r}", pytrace=False)
    return out


@pytest.mark.slow
@pytest.mark.parametrize(("name", "world"), [(n, t) for t, names in WORLD_MODELS.items() for n in names],
                         ids=lambda v: str(v))
def test_sharded_matches_unsharded(name: str, world: int) -> None:
    for rank, res in enumerate(_run(world, name)):
        assert res["forward"] <= TOL, f"rank {rank}: forward rel err {res['forward']:.3g}"
        assert res["grad"] <= TOL, f"rank {rank}: {res['grad_worst']}.grad rel err {res['grad']:.3g}"
        assert res["after_step"] <= TOL, f"rank {rank}: forward after an SGD step rel err {res['after_step']:.3g}"
        for buf, err in res["buffers"].items():
            assert err <= TOL, f"rank {rank}: {buf} rel err {err:.3g}"
        assert res["local_numel"] < res["full_numel"], f"rank {rank}: nothing sharded ({res['styles']})"
