"""Any head count at any world size: query heads split in whole heads, unevenly where t does not divide them
(32 heads on 3 ranks: 11, 11, 10), key/value heads held by the ranks whose query heads read them (one key/value
head: held whole on every rank), Megatron's 2 all-reduces per layer. Plans at full size on the meta device,
numerics on simulated ranks, the lifecycle (checkpoint slices, generate, training with clipping, save_pretrained,
DCP at another t) on gloo ranks."""

from __future__ import annotations

import math
from pathlib import Path

import heads_cases
import pytest
import torch
from numerics import GRAD_FLOOR_FRACTION, TOL, rel_err
from simulate import emit_all, run_ranks
from transformers import LlamaConfig, LlamaForCausalLM

import tpfx
from tpfx.derive import examples
from tpfx.launch import launch

LAYERS = 2


def _meta_plan(hidden: int, heads: int, kv: int, head_dim: int, t: int) -> tpfx.ShardingPlan:
    cfg = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=LAYERS,
                      num_attention_heads=heads, num_key_value_heads=kv, head_dim=head_dim, use_cache=False)
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    return tpfx.plan(model, t)


def _rows(plan: tpfx.ShardingPlan, fqn: str, dim: int) -> list[int]:
    """Every rank's length of ``fqn`` along ``dim``."""
    p = plan.placements[fqn]
    pl = p.as_placement()
    full = p.shape[dim]
    if p.dim != dim:
        return [full] * plan.world_size
    return [pl.local_size(r, plan.world_size) for r in range(plan.world_size)]  # type: ignore[union-attr]


# name: hidden, heads, kv, head_dim, t
FULL_SIZE = {
    "llama7b_t3": (4096, 32, 32, 128, 3),
    "llama7b_t6": (4096, 32, 32, 128, 6),
    "gqa32_8_t3": (4096, 32, 8, 128, 3),
    "qwen2_7b_t8": (3584, 28, 4, 128, 8),
    "h3072_24_t5": (3072, 24, 24, 128, 5),
    "mqa_t4": (2048, 8, 1, 256, 4),
    "mqa_t8": (2048, 8, 1, 256, 8),
}


@pytest.mark.parametrize("name", sorted(FULL_SIZE))
def test_full_size_attention_is_head_parallel(name: str) -> None:
    hidden, heads, kv, d, t = FULL_SIZE[name]
    plan = _meta_plan(hidden, heads, kv, d, t)
    attn = "model.layers.0.self_attn."
    most = math.ceil(heads / t)
    q, o = _rows(plan, attn + "q_proj.weight", 0), _rows(plan, attn + "o_proj.weight", 1)
    assert max(q) <= 1.02 * most * d and max(o) <= 1.02 * most * d, (q, o)
    assert sum(q) == heads * d and sum(o) == heads * d, (q, o)  # each head on exactly one rank
    assert all(n % d == 0 for n in q), q  # whole heads
    for proj in ("k_proj.weight", "v_proj.weight"):
        rows = _rows(plan, attn + proj, 0)
        # the key/value heads its query heads read: whole (every one) at most, a 1/t share where t divides them
        assert max(rows) <= kv * d and all(n % d == 0 for n in rows), (proj, rows)
        if kv % t == 0:
            assert max(rows) == kv * d // t, (proj, rows)
    # Megatron's collectives: 2 all-reduces per layer forward, 1 for the vocab-split embedding, the logits gathered
    assert plan.count("all_reduce") == 2 * LAYERS + 1 and plan.count("all_gather") == 1, str(plan)
    if heads % t:
        text = str(plan.explain(attn + "q_proj.weight"))
        per_rank = "/".join(str(n // d) for n in q)
        assert f"{per_rank} per rank" in text, text


def test_fused_projections_split_in_whole_heads_at_full_size() -> None:
    # q|k|v in one projection, cut into parts before the heads are made: every part split in whole heads
    # (Phi-3-mini, 32 heads of 96, and GPT-2, 12 heads of 64, were replicated where t does not divide the heads)
    from transformers import GPT2Config, GPT2LMHeadModel, Phi3Config, Phi3ForCausalLM

    for build, fused, out, t, d in [
        (lambda: Phi3ForCausalLM(Phi3Config(num_hidden_layers=LAYERS)), "model.layers.0.self_attn.qkv_proj.weight",
         ("model.layers.0.self_attn.o_proj.weight", 1), 3, 96),
        (lambda: GPT2LMHeadModel(GPT2Config(n_layer=LAYERS, attn_implementation="eager")),
         "transformer.h.0.attn.c_attn.weight", ("transformer.h.0.attn.c_proj.weight", 0), 5, 64),
    ]:
        with torch.device("meta"):
            model = build()
        plan = tpfx.plan(model, t)
        p = plan.placements[fused]
        assert p.unit == d and len(p.segs) == 3 and p.groups == t, p  # each of q, k, v in whole heads
        heads = p.segs[0] // d
        assert max(_rows(plan, fused, p.dim)) == 3 * math.ceil(heads / t) * d
        assert max(_rows(plan, *out)) == math.ceil(heads / t) * d
        assert plan.count("all_reduce") == 2 * LAYERS + 1 and plan.count("all_gather") == 1, str(plan)
        total = sum(math.prod(q.shape) for q in plan.placements.values())
        fullest = sum(math.prod([*q.shape[:q.dim], max(_rows(plan, f, q.dim)), *q.shape[q.dim + 1:]])
                      if q.dim is not None else math.prod(q.shape) for f, q in plan.placements.items())
        assert fullest <= 1.03 * total / t, (fullest * t / total)  # was 2.07 (Phi-3, t=3) and 1.35 (GPT-2, t=5)


# hidden, heads, kv, t: tiny shapes whose head counts t does not divide, and one key/value head
SIMULATED = [(64, 8, 8, 3), (96, 12, 12, 5), (64, 8, 2, 3), (64, 8, 1, 2), (64, 8, 1, 3), (64, 8, 1, 4),
             (96, 12, 4, 5), (112, 14, 2, 4), (64, 8, 8, 6), (192, 24, 6, 4), (224, 28, 4, 8)]


def _simulated(model: torch.nn.Module, ref: torch.nn.Module, t: int, x: torch.Tensor, y: torch.Tensor,
               sequence_parallel: bool = False) -> tpfx.ShardingPlan:
    """Plan ``model`` for ``t`` ranks, run every rank's graph on simulated collectives and check logits and every
    local gradient against the unsharded ``ref``; returns the plan."""
    plan = tpfx.plan(model, t, example_kwargs={"input_ids": x, "labels": y}, sequence_parallel=sequence_parallel)
    args, kwargs = examples(model, None, {"input_ids": x, "labels": y})
    ranks = emit_all(plan)

    def body(rank: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        gm, store = ranks[rank]
        out = gm(*args, **kwargs)
        out.loss.backward()
        return out.logits.detach(), {f: p.grad for f, p in store.items()}

    got = run_ranks(t, body)
    out = ref(input_ids=x, labels=y)
    out.loss.backward()
    full = dict(ref.named_parameters())
    for rank, (logits, grads) in enumerate(got):
        assert rel_err(logits, out.logits) <= TOL
        for fqn, g in grads.items():
            assert rel_err(g, plan.shard(fqn, full[fqn].grad, rank)) <= TOL, (rank, fqn)
    return plan


@pytest.mark.parametrize("hidden,heads,kv,t", SIMULATED)
def test_uneven_and_single_kv_heads_are_exact_on_simulated_ranks(hidden: int, heads: int, kv: int, t: int) -> None:
    plan = _simulated(heads_cases.llama(hidden, heads, kv), heads_cases.llama(hidden, heads, kv), t,
                      heads_cases.ids(seed=3), heads_cases.ids(seed=4))
    assert plan.count("all_reduce") == 2 * LAYERS + 1 and plan.count("all_gather") == 1, str(plan)
    q = _rows(plan, "model.layers.0.self_attn.q_proj.weight", 0)
    assert max(q) == math.ceil(heads / t) * (hidden // heads), q


@pytest.mark.parametrize("name,t", [("mha8", 3), ("mqa8", 4), ("mha12", 5), ("gqa12_4", 5)])
def test_sequence_parallel_with_uneven_heads_on_simulated_ranks(name: str, t: int) -> None:
    x = heads_cases.ids((2, 2 * t), seed=3)
    plan = _simulated(heads_cases.build(name), heads_cases.build(name), t, x, x, sequence_parallel=True)
    # Megatron-SP: an all-gather before and a reduce-scatter after each block's split region, no all-reduce
    assert {k: plan.count(k) for k in ("all_reduce", "reduce_scatter")} == {"all_reduce": 0, "reduce_scatter": 5}


@pytest.mark.parametrize("t", [3, 5])
def test_gpt2_fused_c_attn_in_whole_heads_on_simulated_ranks(t: int) -> None:
    from transformers import GPT2Config, GPT2LMHeadModel

    def build() -> GPT2LMHeadModel:
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(vocab_size=250, n_embd=64, n_layer=LAYERS, n_head=8, n_positions=32,
                                          attn_implementation="eager", resid_pdrop=0.0, embd_pdrop=0.0,
                                          attn_pdrop=0.0, use_cache=False))

    plan = _simulated(build(), build(), t, heads_cases.ids(seed=3), heads_cases.ids(seed=4))
    assert plan.placements["transformer.h.0.attn.c_attn.weight"].unit == 8
    assert plan.count("all_reduce") == 2 * LAYERS + 1 and plan.count("all_gather") == 1, str(plan)


def test_hf_tp_plan_export_names_what_hf_cannot_express() -> None:
    plan = tpfx.plan(heads_cases.build("mha8"), 3)
    with pytest.warns(UserWarning, match=r"cannot express the layout of .*self_attn\.k_proj"):
        tp_plan = plan.to_tp_plan()
    assert tp_plan["model.layers.*.self_attn.q_proj"] == "colwise"


@pytest.mark.slow
def test_compile_with_uneven_heads_matches_and_does_not_recompile() -> None:
    import dist_cases

    for res in launch(dist_cases.lm_check, 3, "heads4", True, timeout_s=500):  # 4 heads on 3 ranks: 2, 1, 1
        assert res["q_proj"] == "S(0/3x24)", res
        assert res["logits"] <= TOL and res["loss"] <= TOL and res["grad"] <= TOL and res["recompiles"] == 0, res


@pytest.mark.slow
@pytest.mark.parametrize("name,world,resume_world", [("mha8", 3, 2), ("mqa8", 4, 2), ("mha12", 5, None)])
def test_lifecycle_on_gloo_ranks(tmp_path: Path, name: str, world: int, resume_world: int | None) -> None:
    path, out, ckpt = str(tmp_path / "base"), str(tmp_path / "out"), str(tmp_path / "dcp")
    heads_cases.build(name).save_pretrained(path)
    res = launch(heads_cases.lifecycle, world, name, path, out, ckpt, timeout_s=500)
    hidden, heads, kv = heads_cases.SHAPES[name]
    for r in res:
        assert r["exact_slices"] and r["logits"] <= TOL and r["grads"] <= TOL, r
        assert r["tokens"] == r["ref_tokens"], r
        assert max(abs(a - b) / abs(b) for a, b in zip(r["losses"], r["ref_losses"])) <= TOL, r
        # after 3 AdamW steps: AdamW's first step is lr * sign(g), so a gradient near 0 whose sign the ranks' fp32
        # summation order flips moves its weight by 2 lr; the even split (12 heads at t=2) is 3.8e-5 off too
        assert r["trained"] <= 1e-4, r
        assert r["forward"] == {"all_reduce": 2 * 2 + 1, "all_gather": 1}, r
    # the fullest rank holds ceil(heads/t) query heads (q and o) and the key/value heads its query heads read
    d = hidden // heads
    most = math.ceil(heads / world) * d * hidden * 2 + (kv if kv < world else math.ceil(kv / world)) * d * hidden * 2
    assert max(r["attn_local"] for r in res) <= 1.02 * most * LAYERS, [r["attn_local"] for r in res]
    reloaded = LlamaForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert rel_err(res[0]["trained_logits"], reloaded(input_ids=heads_cases.ids()).logits) <= TOL
    assert sum(f.endswith(".distcp") for f in res[0]["files"]) == world
    if resume_world is not None:
        for r in launch(heads_cases.resume, resume_world, name, ckpt, timeout_s=300):
            assert rel_err(r["logits"], res[0]["trained_logits"]) <= TOL


def test_no_head_parallel_plan_warns_with_its_cost() -> None:
    # 3 heads on 8 ranks: no group count divides both, so attention is replicated -- loudly, with its cost
    with pytest.warns(UserWarning, match=r"no head-parallel plan exists at world_size=8") as rec:
        plan = tpfx.plan(heads_cases.llama(24, 3, 3), 8)
    assert plan.placements["model.layers.0.self_attn.q_proj.weight"].style == "replicate"
    assert any("more elements per rank" in str(w.message) for w in rec)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a head-parallel plan (8 heads on 3 ranks: 3, 3, 2) says nothing
        tpfx.plan(heads_cases.llama(64, 8, 8), 3)


class _HandMQA(torch.nn.Module):
    """Multi-query attention written by hand, heads merged by ``.transpose(1, 2).contiguous().view(b, s, -1)``
    before the output projection (the pattern the issue's crash came from)."""

    def __init__(self, hidden: int = 64, heads: int = 8, core: str = "sdpa") -> None:
        super().__init__()
        self.n, self.d, self.core = heads, hidden // heads, core
        self.q, self.k = torch.nn.Linear(hidden, hidden), torch.nn.Linear(hidden, self.d)
        self.v, self.o = torch.nn.Linear(hidden, self.d), torch.nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, S, h)
        b, s, _ = x.shape
        q = self.q(x).view(b, s, self.n, self.d).transpose(1, 2)  # (B, n, S, d)
        k = self.k(x).view(b, s, 1, self.d).transpose(1, 2)  # (B, 1, S, d)
        v = self.v(x).view(b, s, 1, self.d).transpose(1, 2)
        if self.core == "sdpa":
            out = torch.nn.functional.scaled_dot_product_attention(q, k.expand(b, self.n, s, self.d),
                                                                   v.expand(b, self.n, s, self.d), is_causal=True)
        else:
            out = (q @ k.transpose(-2, -1) / self.d ** 0.5).softmax(-1) @ v
        out = out.transpose(1, 2).contiguous().view(b, s, -1)  # (B, S, n*d)
        return x + self.o(out)


@pytest.mark.parametrize("core", ["sdpa", "matmul"])
@pytest.mark.parametrize("t", [2, 3, 4])
def test_hand_written_mqa_with_contiguous_view_runs_head_parallel(core: str, t: int) -> None:
    torch.manual_seed(0)
    model = _HandMQA(core=core)
    x = torch.randn(2, 5, 64)
    plan = tpfx.plan(model, t, example_inputs=(x,))
    ranks = emit_all(plan)

    def body(rank: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        gm, store = ranks[rank]
        out = gm(x)
        out.square().sum().backward()
        return out.detach(), {f: p.grad for f, p in store.items()}

    got = run_ranks(t, body)
    ref = model(x)
    ref.square().sum().backward()
    # k's bias moves every score of a row alike (softmax ignores it): its gradient is rounding noise around 0
    floor = GRAD_FLOOR_FRACTION * max(float(p.grad.abs().max()) for p in model.parameters())
    for rank, (out, grads) in enumerate(got):
        assert rel_err(out, ref) <= TOL
        for fqn, g in grads.items():
            assert rel_err(g, plan.shard(fqn, model.get_parameter(fqn).grad, rank), floor) <= TOL, (rank, fqn)
    assert plan.placements["q.weight"].style == "colwise" and plan.placements["o.weight"].style == "rowwise"
    assert max(_rows(plan, "q.weight", 0)) == math.ceil(8 / t) * 8  # whole query heads, uneven at t=3


# a sample of the adversarial generator (tests/heads_attack.py: 115 cases by a helper; every one exact, the
# EXTRA-COMM ones listed in README's limits): families whose head counts t does not divide, run on simulated ranks
ATTACK_SAMPLE = [("gemma_h5kv1_d32", 3), ("gemma2_h7kv1_cap", 4), ("qwen3_h7kv1", 5), ("mistral_h7kv7_d24", 6),
                 ("neox_h5_partial", 4), ("bloom_h7_alibi", 4), ("deepseek_v2_h5", 3), ("olmo2_h5kv5", 3),
                 ("nest_h12kv4", 5), ("phi3_h5kv5", 3), ("bigcode_mha_h7", 3)]


@pytest.mark.parametrize("name,t", ATTACK_SAMPLE)
def test_adversarial_sample_is_exact_and_head_parallel(name: str, t: int) -> None:
    import heads_attack

    case = next(c for c in heads_attack.cases() if c.name == name)
    line = heads_attack.run_case(case, t)
    assert " OK " in line, line


def test_concatenating_whole_head_splits_keeps_their_unit() -> None:
    # two projections each split in whole heads (5 heads of 8 on 3 ranks: 2/2/1), concatenated along the split dim
    from rule_helpers import op, rule
    from tpfx.passes import Shard
    from tpfx.passes.rules import Fallback, Strategy

    aten = torch.ops.aten
    a, b = op((2, 40), Shard(1, 3, (40,), unit=8)), op((2, 40), Shard(1, 3, (40,), unit=8))
    st = rule(aten.cat.default, [a, b], (2, 80), [[a.node, b.node], 1], world=3)
    assert isinstance(st, Strategy) and st.out == Shard(1, 3, (40, 40), unit=8), st
    assert st.out.local_segs(2, 3) == (8, 8)  # rank 2 holds 1 head of each part
    c = op((2, 40), Shard(1, 3, (40,), unit=4))
    assert isinstance(rule(aten.cat.default, [a, c], (2, 80), [[a.node, c.node], 1], world=3), Fallback)
