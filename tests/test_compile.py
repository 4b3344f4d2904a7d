"""``auto_shard(..., compile=True)`` on 2 gloo ranks: one inductor graph per call structure, collectives
inside it (forward and backward), no recompiles for new batch/sequence lengths, exact to fp32 rounding.

A single launch runs every check (cold inductor compiles dominate: ~1.5 min on 2 cores)."""

from __future__ import annotations

import compile_cases
import pytest
from numerics import TOL

from tpfx.launch import launch

pytestmark = pytest.mark.slow

# (batch, seq) of the training steps: first compile, same shape, new sequence length, new batch and length, a
# batch of 1 (dynamo specializes sizes of 1: one recompile), then another length at batch 1.
STEPS = [(3, 6), (3, 6), (3, 9), (2, 7), (1, 5), (1, 8)]


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return launch(compile_cases.all_checks, 2, STEPS, timeout_s=500)


def test_forward_is_one_graph_with_its_collectives(results: list[dict]) -> None:
    for res in results:
        fwd = res["forward"]
        assert fwd["graph_breaks"] == 0 and fwd["dynamo_graphs"] == 1, fwd
        assert fwd["inductor_fw"] == 1 and fwd["inductor_bw"] == 0, fwd
        # the same collectives as the eager run of the emitted graph, all inside the compiled graph
        assert fwd["fw_collectives"] == fwd["eager_fw_collectives"] > 0, fwd


def test_forward_matches_unsharded_and_eager(results: list[dict]) -> None:
    for res in results:
        fwd = res["forward"]
        assert fwd["logits"] <= TOL and fwd["eager"] <= TOL, fwd


def test_training_step_is_one_forward_and_one_backward_graph(results: list[dict]) -> None:
    for res in results:
        first = res["steps"][0]
        assert first["graph_breaks"] == 0 and first["dynamo_graphs"] == 1, first
        assert first["inductor_fw"] == 1 and first["inductor_bw"] == 1, first
        assert first["fw_collectives"] == first["eager_fw_collectives"] > 0, first
        # Megatron's backward collectives (reduce_grad's all-reduce) are in the compiled backward graph
        assert first["bw_collectives"] == first["eager_bw_collectives"] > 0, first


def test_no_recompile_for_same_shape(results: list[dict]) -> None:
    for res in results:
        same = res["steps"][1]
        assert same["dynamo_graphs"] == 0 and same["inductor_fw"] == same["inductor_bw"] == 0, same


def test_new_lengths_do_not_recompile_and_a_size_of_one_recompiles_once(results: list[dict]) -> None:
    for res in results:
        new_seq, new_both, one, one_again = res["steps"][2:6]
        for step in (new_seq, new_both, one_again):
            assert step["graph_breaks"] == 0 and step["dynamo_graphs"] == 0, step
            assert step["inductor_fw"] == step["inductor_bw"] == 0, step
        assert one["graph_breaks"] == 0 and one["dynamo_graphs"] == 1, one


def test_training_matches_unsharded_and_eager(results: list[dict]) -> None:
    for res in results:
        for step in res["steps"]:
            for key in ("loss", "logits", "grad", "weights_after_step", "eager_loss", "eager_logits",
                        "eager_grad"):
                assert step[key] <= TOL, (key, step)


def test_dropout_masks_are_eagers_with_inductors_fallback_random(results: list[dict]) -> None:
    # docs/training.md: with torch._inductor.config.fallback_random = True a compiled sharded model draws eager's
    # dropout masks (the unsharded eager model's logits); without it inductor draws its own, as for any model
    for res in results:
        assert res["dropout"][True] <= TOL and res["dropout"][False] > 0.05, res["dropout"]
