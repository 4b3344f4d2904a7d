"""Reading a plan: summary table, explain, JSON round trip, compare with HF tp_plans, drawing, overrides."""

from __future__ import annotations

import functools
import json
import re
import shutil
from collections import Counter
from typing import Any

import models
import plan_cases
import pytest
import torch
from dist_cases import FlipMLP
from numerics import TOL
from transformers import LlamaConfig, LlamaForCausalLM

import tpfx
from tpfx.draw import dataflow
from tpfx.inputs import synthesize
from tpfx.launch import launch
from tpfx.report import build_report, fold

LLAMA_MATRICES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                  "mlp.up_proj", "mlp.down_proj")
TOKENS, HIDDEN, F32 = 2 * 8, 64, 4  # synthesized example input_ids (2, 8); tests/models.py llama hidden size
ACT = TOKENS * HIDDEN * F32  # bytes of one b·s·h activation


@functools.cache
def llama_plan(world: int = 2, layers: int = 3, kv: int = 2) -> tpfx.ShardingPlan:
    return tpfx.plan(models.llama(num_kv_heads=kv, layers=layers), world)


# ------------------------------------------------------------------------------------------ summary


def test_summary_folds_layers_into_one_row_group() -> None:
    plan = llama_plan()
    rep = build_report(plan)
    assert len(rep.params) == 12  # embed, 7 matrices, 2 norms per layer, final norm, lm_head
    layer_groups = [g for g in rep.params if ".layers.*." in g.name]
    assert len(layer_groups) == 9 and all(g.count == 3 for g in layer_groups)
    down = next(g for g in rep.params if g.name == "model.layers.*.mlp.down_proj.weight")
    assert (down.style, down.shape, down.local_shape) == ("rowwise", (64, 128), (64, 64))
    assert down.bytes_local == 3 * 64 * 64 * F32 and down.bytes_full == 2 * down.bytes_local
    text = str(plan)
    assert text == plan.summary()
    assert not re.search(r"layers\.\d+\.", text)  # no per-layer copies anywhere
    rows = [ln for ln in text.splitlines() if ln.startswith("│ model.layers.*.")]
    assert len(rows) == 9


def test_summary_collectives_per_layer_and_megatron_reference() -> None:
    rep = build_report(llama_plan())
    assert (rep.main_scope, rep.n_layers, rep.hidden, rep.tokens) == ("model.layers", 3, HIDDEN, TOKENS)
    assert rep.per_layer("forward") == (2, 2 * ACT)  # Megatron: 2 all-reduces of b·s·h per layer forward
    assert rep.per_layer("backward") == (2, 2 * ACT)  # and 2 in the backward (f before q/k/v and gate/up)
    assert rep.megatron == 2 * 3 * ACT == rep.in_layers("forward")
    layer_ar = [c for c in rep.collectives if c.pass_ == "forward" and c.scope == "model.layers"]
    assert {c.sources for c in layer_ar} == {("model.layers.*.self_attn.o_proj",), ("model.layers.*.mlp.down_proj",)}
    assert all(c.kind == "all_reduce" and c.count == 3 and c.bytes == ACT for c in layer_ar)
    outside = {(c.kind, c.sources) for c in rep.collectives if c.pass_ == "forward" and not c.scope}
    assert outside == {("all_reduce", ("model.embed_tokens",)), ("all_gather", ("lm_head",))}
    assert rep.counts("forward") == Counter({"all_reduce": 1 + 2 * 3, "all_gather": 1})
    assert rep.bytes_per_step("forward") == (1 + 2 * 3) * ACT + TOKENS * models.HF_VOCAB * F32
    replicated = sum(g.bytes_full for g in rep.params if g.style == "replicate")
    assert 2 * (rep.param_local - replicated) == rep.param_full - replicated  # every matrix split in 2
    text = str(llama_plan())
    assert "(1.00× the reference)" in text and f"b·s {TOKENS} × h {HIDDEN}" in text
    assert "none: every matrix is split" in text


def test_summary_hidden_can_be_passed_in() -> None:
    assert build_report(llama_plan(), hidden=128).megatron == 2 * 3 * TOKENS * 128 * F32


def heads2_hidden96() -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=96, intermediate_size=192, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2, use_cache=False)
    return LlamaForCausalLM(cfg)


def test_summary_lists_replicated_regions_with_reasons() -> None:
    plan = tpfx.plan(heads2_hidden96(), 3)  # 2 heads on 3 ranks: no part of them splits 3 ways
    replicated = dict(build_report(plan).replicated)
    recorded = {f["param"] for f in plan.fallbacks if "param" in f and f["reason"].startswith("replicated")}
    assert {f"model.layers.0.self_attn.{n}.weight" for n in ("q_proj", "k_proj", "v_proj")} <= recorded
    reasons = {f["param"]: f["reason"] for f in plan.fallbacks if f.get("param") in recorded}
    for fqn in recorded:  # every replication the planner recorded is listed once, with its reason
        [why] = [w for k, w in replicated.items() if k == fold(fqn)]
        assert why.startswith("replicated") and why.split(": ")[-1] == reasons[fqn].split(": ")[-1]
        if ".self_attn." in fqn and not fqn.endswith("o_proj.weight"):
            assert "not divisible by 3" in why
    # the output projection of the replicated attention is not split either: it would split the residual
    assert "residual" in reasons["model.layers.0.self_attn.o_proj.weight"]
    text = str(plan)
    assert text.count("not divisible by 3") >= 3 and "every matrix is split" not in text


def test_groups_whose_layers_differ_are_labelled_by_layer() -> None:
    from tpfx.plan import ParamPlacement

    plan = llama_plan()
    placements = dict(plan.placements)
    placements["model.layers.1.mlp.up_proj.weight"] = ParamPlacement("replicate", "R", (128, 64))
    odd = tpfx.ShardingPlan(2, placements, plan.collectives)
    labels = {g.label: g.count for g in build_report(odd).params if "up_proj" in g.name}
    assert labels == {"model.layers.{0,2}.mlp.up_proj.weight": 2, "model.layers.1.mlp.up_proj.weight": 1}
    assert dict(build_report(odd).replicated)["model.layers.1.mlp.up_proj.weight"].startswith("replicated")



def test_summary_lists_unknown_ops() -> None:
    with pytest.warns(UserWarning, match=r"aten\.flip"):
        plan = tpfx.plan(FlipMLP(), 2, example_inputs=(torch.randn(4, 16),))
    replicated = dict(build_report(plan).replicated)
    assert "no sharding rule" in replicated["aten.flip.default"]
    assert replicated["up.weight"].startswith("replicated")
    assert "aten.flip.default" in str(plan)


# ------------------------------------------------------------------------------------------- json


def test_json_round_trip_is_lossless_and_diffable() -> None:
    plan = llama_plan()
    text = plan.to_json()
    back = tpfx.ShardingPlan.from_json(text)
    assert back.to_json() == text
    assert back == plan and back.digest() == plan.digest()
    assert back.placements == plan.placements and back.collectives == plan.collectives
    d = json.loads(text)
    assert list(d) == sorted(d) and list(d["placements"]) == sorted(d["placements"])
    assert len(d["placements"]) == 3 * 9 + 3
    # the loaded plan reports exactly like the planned one (context saved with it)
    assert str(back) == str(plan)
    # a second planning run gives byte-identical JSON (stable for git diffs)
    assert tpfx.plan(models.llama(layers=3), 2).to_json() == text


def test_json_without_context_still_loads_and_reports() -> None:
    d = json.loads(llama_plan().to_json())
    d.pop("context")
    back = tpfx.ShardingPlan.from_json(json.dumps(d))
    assert back.placements == llama_plan().placements
    text = str(back)
    assert "model.layers.*.mlp.down_proj.weight" in text and "old JSON" in text


def test_json_diff_between_world_sizes_names_the_changed_weights() -> None:
    a = json.loads(llama_plan(2).to_json())["placements"]
    b = json.loads(llama_plan(4).to_json())["placements"]
    changed = {fold(k) for k in a if a[k] != b[k]}
    assert {f"model.layers.*.{m}.weight" for m in ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj")} <= changed
    # GQA: 2 KV heads stay 2 chunks at t=4 (each replicated on 2 ranks), so k/v do not change; norms neither
    assert not any("k_proj" in k or "v_proj" in k or "norm" in k for k in changed)
    assert b["model.layers.0.self_attn.k_proj.weight"]["groups"] == 2


# ---------------------------------------------------------------------------------------- explain


def test_explain_down_proj_traces_gate_up_and_the_all_reduce() -> None:
    ex = llama_plan().explain("model.layers.0.mlp.down_proj.weight")
    assert ex.style == "rowwise" and ex.received == "S(-1)" and ex.output == "P"
    assert ex.upstream == ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"]
    assert "silu" in ex.upstream_path and "mul" in ex.upstream_path
    [ar] = ex.collectives
    assert ar.kind == "all_reduce" and ar.bytes == ACT
    text = str(ex)
    assert "partial sum" in text and "gate_proj" in text and "all_reduce" in text
    assert str(llama_plan().explain("model.layers.0.mlp.down_proj")) == text  # module name works too


def test_explain_colwise_is_consumed_locally_by_the_rowwise_partner() -> None:
    ex = llama_plan().explain("model.layers.1.self_attn.q_proj")
    assert ex.style == "colwise" and ex.received == "R" and ex.output == "S(-1)"
    assert ex.collectives == []
    [local] = ex.resolutions
    assert local.kind == "local" and local.weights == ("model.layers.1.self_attn.o_proj",)
    assert "scaled_dot_product_attention" in local.path


def test_explain_embedding_lm_head_and_gqa_groups() -> None:
    emb = llama_plan().explain("model.embed_tokens")
    assert emb.style == "vocab" and emb.output == "P" and [c.kind for c in emb.collectives] == ["all_reduce"]
    head = llama_plan().explain("lm_head")
    assert [(c.kind, c.bytes) for c in head.collectives] == [("all_gather", TOKENS * models.HF_VOCAB * F32)]
    k = llama_plan(4).explain("model.layers.0.self_attn.k_proj")
    assert "2 chunks, each replicated on 2 ranks" in str(k)
    assert any("groups 2" in r for r in k.reasons)


def test_explain_replicated_weight_gives_the_recorded_reason() -> None:
    ex = tpfx.plan(heads2_hidden96(), 3).explain("model.layers.0.self_attn.q_proj")
    assert ex.style == "replicate"
    assert any("not divisible by 3" in r for r in ex.reasons)


def test_explain_loaded_plan_and_unknown_names() -> None:
    back = tpfx.ShardingPlan.from_json(llama_plan().to_json())
    ex = back.explain("model.layers.2.mlp.down_proj")
    assert not ex.derived and ex.style == "rowwise"
    assert [(c.kind, c.bytes) for c in ex.collectives] == [("all_reduce", ACT)]  # from the saved context
    with pytest.raises(KeyError, match="did you mean"):
        llama_plan().explain("model.layers.0.mlp.down_prj.weight")


# ---------------------------------------------------------------------------------------- compare


def hf_llama_tp_plan() -> dict[str, str]:
    return {**LlamaConfig.base_model_tp_plan, **LlamaForCausalLM._tp_plan}


def test_compare_with_hf_llama_plan_agrees_on_every_layer_matrix() -> None:
    cmp = tpfx.compare(llama_plan(), hf_llama_tp_plan())
    for m in LLAMA_MATRICES:
        e = cmp["model.layers.*." + m]
        assert e.status == "agree" and e.key == "layers.*." + m, e
    assert cmp["lm_head"].status == "agree" and cmp["lm_head"].theirs == "colwise_gather_output"
    assert cmp["model.embed_tokens"].status == "missing_theirs"  # HF replicates the embedding
    assert cmp.differ == [] and cmp.by_status("missing_ours") == []
    # ours: 1 embedding + 2 per layer all-reduces + the logits gather; HF: 2 per layer + the gather
    logits = TOKENS * models.HF_VOCAB * F32
    assert cmp.ours_bytes == (1 + 2 * 3) * ACT + logits
    assert cmp.theirs_bytes == 2 * 3 * ACT + logits


def test_compare_shows_a_deliberate_difference() -> None:
    theirs = hf_llama_tp_plan()
    theirs["layers.*.mlp.down_proj"] = "colwise"
    theirs["layers.*.mlp.nonexistent"] = "rowwise"
    cmp = tpfx.compare(llama_plan(), theirs)
    assert [(e.module, e.ours, e.theirs) for e in cmp.differ] == [("model.layers.*.mlp.down_proj", "rowwise",
                                                                   "colwise")]
    assert [e.module for e in cmp.by_status("missing_ours")] == ["layers.*.mlp.nonexistent"]
    text = str(cmp)
    assert re.search(r"model\.layers\.\*\.mlp\.down_proj\s+│ rowwise\s+│ colwise\s+│ differ", text)
    assert "1 differ" in text


def test_compare_own_tp_plan_round_trips() -> None:
    cmp = tpfx.compare(llama_plan(), llama_plan().to_tp_plan())
    assert {e.status for e in cmp.entries} == {"agree"} and len(cmp.entries) == 9


# ------------------------------------------------------------------------------------------- draw


def test_dataflow_collapses_layers_and_labels_placements() -> None:
    g2, g4 = dataflow(llama_plan(layers=2)), dataflow(llama_plan(layers=3))
    assert sorted(g2.nodes) == sorted(g4.nodes)  # repeated layers collapse: same drawing for 2 or 3 layers
    kinds = Counter(d["kind"] for _, d in g2.nodes(data=True))
    assert kinds == Counter({"weight": 9, "collective": 4, "junction": 2, "input": 1, "output": 1})  # 2 residual +
    styles = Counter(d["style"] for _, d in g2.nodes(data=True) if d["kind"] == "weight")
    assert styles == Counter({"colwise": 6, "rowwise": 2, "vocab": 1})
    byname = {d["name"]: n for n, d in g2.nodes(data=True) if d["kind"] == "weight"}
    up, down = byname["model.layers.*.mlp.up_proj"], byname["model.layers.*.mlp.down_proj"]
    assert g2.edges[up, down]["labels"] == {"S(-1)"}
    [(_, plus)] = g2.out_edges(down)  # down_proj's partial sum joins the residual stream, then is reduced
    [(_, coll)] = g2.out_edges(plus)
    assert g2.nodes[plus]["kind"] == "junction" and g2.edges[down, plus]["labels"] == {"P"}
    assert g2.nodes[coll]["kind"] == "collective" and g2.nodes[coll]["name"] == "all_reduce"
    assert g2.edges[plus, coll]["labels"] == {"P"}
    assert any(d["loop"] for *_, d in g2.edges(data=True))  # the edge into the next layer copy


def test_to_dot_has_a_cluster_per_repeated_layer_and_style_colors() -> None:
    dot = llama_plan().to_dot()
    assert dot.startswith("digraph")
    assert dot.count("subgraph cluster_") == 2  # model.layers and the legend
    assert "model.layers.* ×3" in dot
    assert "#4e79a7" in dot and "#f28e2b" in dot and "octagon" in dot
    assert "layers.0" not in dot and "layers.1" not in dot


def test_loaded_plan_cannot_be_drawn_but_html_still_works() -> None:
    back = tpfx.ShardingPlan.from_json(llama_plan().to_json())
    with pytest.raises(ValueError, match="not one loaded from JSON"):
        back.to_dot()
    page = back.to_html()
    assert "No drawing" in page and "model.layers.*.mlp.down_proj.weight" in page


def test_render_without_dot_says_how_to_install(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(RuntimeError, match="apt-get install graphviz"):
        llama_plan().render(str(tmp_path / "plan.svg"))
    page = llama_plan().to_html()  # falls back to the DOT text
    assert "<pre>digraph" in page and "<svg" not in page


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz `dot` is not installed")
def test_render_svg_and_self_contained_html(tmp_path) -> None:
    svg = tmp_path / "plan.svg"
    assert llama_plan().render(str(svg)) == str(svg)
    text = svg.read_text()
    assert "<svg" in text and "all_reduce" in text and "model.layers.* ×3" in text
    page = llama_plan().to_html(str(tmp_path / "plan.html"))
    assert (tmp_path / "plan.html").read_text() == page
    assert page.count("<svg") == 1 and "<script" not in page and "<link" not in page
    assert not re.search(r"(src|href)=\"https?://", page)  # nothing fetched from the network
    assert page.count("<tr>") == 2 + 12 + len(build_report(llama_plan()).collectives)  # 2 header rows
    assert page.count("<details>") == 9  # one explanation per matrix group


# ------------------------------------------------------------------------------------------ overrides


def test_override_lm_head_replicate_removes_the_logits_all_gather() -> None:
    base = llama_plan(layers=2)
    pinned = tpfx.plan(models.llama(layers=2), 2, overrides={"lm_head": "replicate",
                                                              "model.layers.*.mlp.down_proj": "rowwise"})
    assert base.count("all_gather") == 1 and pinned.count("all_gather") == 0
    assert pinned.count("all_reduce") == base.count("all_reduce") == 1 + 2 * 2
    assert pinned.placements["lm_head.weight"].style == "replicate"
    assert all(pinned.placements[f"model.layers.{i}.mlp.down_proj.weight"].style == "rowwise" for i in (0, 1))
    removed = {c.kind for c in base.collectives} - {c.kind for c in pinned.collectives}
    assert removed == {"all_gather"}
    assert tpfx.compare(pinned, hf_llama_tp_plan())["lm_head"].status == "differ"


def test_override_pin_is_honoured_and_exact() -> None:
    """A pin the default plan would not choose: colwise down_proj (its input must be gathered). It is honoured,
    and the pinned plan still computes the unsharded model's numbers (forward and every gradient)."""
    pins = {"model.layers.*.mlp.down_proj": "colwise"}
    pinned = tpfx.plan(models.llama(layers=2), 2, overrides=pins)
    assert pinned.placements["model.layers.0.mlp.down_proj.weight"].style == "colwise"
    assert tpfx.plan(models.llama(layers=2), 2).placements["model.layers.0.mlp.down_proj.weight"].style == "rowwise"
    check = tpfx.verify(models.llama(layers=2), 2, overrides=pins)
    assert check.ok and check.worst <= TOL, check


def test_override_matching_nothing_is_an_error() -> None:
    with pytest.raises(ValueError, match="matches no parameter"):
        tpfx.plan(models.llama(layers=1), 2, overrides={"model.layers.*.mlp.nope": "rowwise"})


@pytest.mark.slow
def test_auto_shard_with_a_saved_plan_matches_the_unsharded_model() -> None:
    plan = tpfx.plan(models.llama(num_kv_heads=2), 2, overrides={"lm_head": "replicate"})
    text = tpfx.ShardingPlan.from_json(plan.to_json()).to_json()
    for res in launch(plan_cases.saved_plan_check, 2, text, timeout_s=300):
        assert res["logits"] <= TOL and res["loss"] <= TOL and res["grad"] <= TOL, res
        assert res["same_digest"] and res["lm_head"] == "replicate", res
        assert res["lm_head_local"] == (models.HF_VOCAB, 64)  # the saved pin, not the default vocab split


def _parallel_block_model() -> tuple[torch.nn.Module, tuple]:
    """The fuzzer's parallel block whose replicated MLP output joins the sequence-split residual (test_fuzz)."""
    from fuzz_models import Block, FuzzModel, Spec, inputs

    attn = {"heads": 4, "kv": 4, "head_dim": 3, "bias": False, "fused": "split", "split_heads": "reshape",
            "order": "transpose", "repeat": "expand", "core": "sdpa", "causal": True, "merge": "flatten"}
    mlp = {"ffn": 16, "act": "relu", "bias": False, "gate": "chunk"}
    spec = Spec(12, 50, 6, False, False, (Block("parallel", "none", {"attn": attn, "mlp": mlp}),), seed=0)
    return FuzzModel(spec), inputs(spec, 1)


def test_report_lists_every_backward_collective_of_the_emitted_graph() -> None:
    """Each backward-communicating node emission builds on a value that carries gradients appears in the report
    with its kind, once per value and kind: a value that enters one op through Megatron's f and joins the
    sequence split elsewhere (split_even) has both, an all-reduce and an all-gather (the report used to keep only
    the last kind it saw); a scatter after a gather has its gradient all-reduce."""
    from tpfx.passes import backward_collectives, collective_nodes, kinds, trained
    from tpfx.passes import collectives as C

    from tpfx.derive import capture, plan_graph
    from tpfx.testing.families import tiny_causal_lm

    backward = {C.reduce_grad: "all_reduce", C.reduce_grad_spans: "all_reduce", C.gather_seq: "reduce_scatter",
                C.split_even: "all_gather", C.reduce_scatter: "all_gather", C.scatter: "all_reduce"}
    forward = {op for op in kinds.OPS if kinds.listed(op)}
    block, block_inputs = _parallel_block_model()
    cases: list[tuple[torch.nn.Module, Any, int, bool]] = [(block, block_inputs, 6, True), (models.llama(num_kv_heads=2, layers=1), None, 4, True),
             (models.gpt2(layers=1), None, 2, True), (models.llama(num_kv_heads=2, layers=1), None, 4, False),
             (FlipMLP(), ((torch.randn(2, 3, 16),), {}), 2, False), (tiny_causal_lm("deepseek_v3"), None, 2, False)]
    seen: Counter[str] = Counter()
    for model, ins, t, sp in cases:
        gm, _ = capture(model, *(ins if ins is not None else synthesize(model)))
        plan = plan_graph(gm, t, None, sequence_parallel=sp)
        assert plan.derivation is not None and plan.context is None
        names = {n.name for n in trained(gm, plan.derivation.prop.param_nodes, floating=True)}
        ctx = plan.report_context()
        assert ctx is not None
        listed = Counter((c["kind"], c["after"]) for c in ctx["collectives"] if c["pass"] == "backward")
        for rank in (0, t - 1):
            emitted: Counter[tuple[str, str]] = Counter()
            for _, n in collective_nodes(tpfx.emit_rank(plan, rank)):
                src = n.args[0]
                while src.op == "call_function" and src.target in forward:  # back to the planned graph's value
                    src = src.args[0]
                if n.target in backward and src.name in names:
                    emitted[(backward[n.target], src.name)] += 1
            assert emitted == listed, (type(model).__name__, t, sp, emitted - listed, listed - emitted)
        seen.update(k for k, _ in listed)
        seen.update(c.via for c in backward_collectives(gm, plan.derivation.prop))
    assert min(seen[k] for k in ("all_reduce", "all_gather", "reduce_scatter", "scatter", "split_even")) > 0, seen
