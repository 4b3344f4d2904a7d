"""Sequence parallelism (``auto_shard(..., sequence_parallel=True)``, ``passes/sequence_parallel.py``).

Tier 2 (no process group): the plan keeps every weight's placement and replaces each layer's two forward
all-reduces by reduce-scatter / all-gather pairs; the emitted per-rank graphs hold no all-reduce inside layers.
Tier 3 (real gloo ranks): forward, gradients and 3 AdamW steps equal the unsharded model at t=2 and t=4.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import models
import pytest
import sp_cases
from numerics import TOL, in_layer, run_case
from tpfx.passes.emit import collective_nodes

import tpfx

LAUNCH_TIMEOUT_S = 300


PLANS = {"llama": lambda: models.llama(num_kv_heads=2, layers=3), "gpt2": models.gpt2, "bert": models.bert}


@pytest.mark.parametrize(("name", "world"), [("llama", 2), ("llama", 4), ("gpt2", 2), ("bert", 2)])
def test_plan_swaps_all_reduces_for_reduce_scatter_all_gather_pairs(name: str, world: int) -> None:
    model = PLANS[name]()
    plain = tpfx.plan(model, world)
    sp = tpfx.plan(model, world, sequence_parallel=True)
    assert sp.digest() == plain.digest() and sp.placements == plain.placements  # weights unchanged
    layers = {re.search(r"\.(\d+)\.", f).group(1) for f in sp.placements if re.search(r"\.(\d+)\.", f)}  # type: ignore[union-attr]
    fwd = Counter(c.kind for c in sp.forward_collectives())
    assert fwd["all_reduce"] == 0, fwd
    assert fwd["reduce_scatter"] >= 2 * len(layers) and fwd["all_gather"] >= 2 * len(layers), fwd
    # the same bytes as plain TP's all-reduces: a reduce-scatter plus an all-gather of b*s*h each
    rs = sum(c.bytes for c in sp.forward_collectives() if c.kind == "reduce_scatter")
    ar = sum(c.bytes for c in plain.forward_collectives() if c.kind == "all_reduce")
    assert rs == ar, (rs, ar)
    assert "reduce_scatter" in str(sp) and "sequence parallel" in str(sp)
    assert tpfx.ShardingPlan.from_json(sp.to_json()).sequence_parallel
    assert "sequence_parallel" not in plain.to_json()
    for rank in range(world):
        kinds = Counter(k for k, n in collective_nodes(tpfx.emit_rank(sp, rank)) if in_layer(n))
        assert kinds["all_reduce"] == 0 and kinds["reduce_scatter"] == 2 * len(layers), kinds
        assert kinds["all_gather"] == 2 * len(layers), kinds


_results: dict[tuple[str, int], Any] = {}


def _run(name: str, world: int) -> list[dict[str, Any]]:
    key = (name, world)
    if key not in _results:
        _results[key] = tpfx.launch(run_case, world, name, True, timeout_s=LAUNCH_TIMEOUT_S)
    return _results[key]


@pytest.mark.slow
@pytest.mark.parametrize("world", [2, 4])
@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_sequence_parallel_matches_the_unsharded_model(name: str, world: int) -> None:
    for res in _run(name, world):
        assert max(res["forward"].values()) <= TOL, res["forward"]
        assert res["grad_err"] <= TOL and not res["grad_missing"], (res["grad_err"], res["grad_worst"])
        assert res["train_err"] <= TOL, (res["train_losses"], res["ref_train_losses"])
        assert res["in_layers"].get("all_reduce", 0) == 0, res["in_layers"]
        assert res["in_layers"]["reduce_scatter"] > 0 and res["in_layers"]["all_gather"] > 0, res["in_layers"]
        assert "divisible by the tensor-parallel size" in (res["indivisible"] or ""), res["indivisible"]


@pytest.mark.slow
def test_sequence_parallel_compiles_to_one_graph_and_stays_exact() -> None:
    for res in tpfx.launch(sp_cases.compiled_check, 2, timeout_s=LAUNCH_TIMEOUT_S):
        assert res["graph_breaks"] == 0 and res["graphs"] == 1, res
        assert max(res["logits"], res["loss"], res["grad_norm"]) <= TOL, res


@pytest.mark.slow
def test_generate_on_a_sequence_parallel_module_gives_the_unsharded_tokens() -> None:
    for res in tpfx.launch(sp_cases.generate_check, 2, timeout_s=LAUNCH_TIMEOUT_S):
        assert res["equal"] and res["new_tokens"] == 6, res


@pytest.mark.slow
def test_gathered_inputs_are_kept_as_chunks_and_regathered_in_backward() -> None:
    for r in tpfx.launch(sp_cases.regather_check, 2, timeout_s=LAUNCH_TIMEOUT_S):
        assert r["gathers"] == 4, r  # attention's and the MLP's input, per layer
        assert r["backward_gathers"] == {False: 0, True: r["gathers"]}, r  # one re-gather per gathered value
        saved = r["kept"][False] - r["kept"][True]  # each gathered value kept as its half instead of whole
        assert saved == r["gathers"] * r["gathered_bytes"] // 2, r
        assert r["grad_err"] == 0.0, r  # the same gradients, bit for bit
