"""Block capture (passes/blocks.py): a stack exported through 3 layers of each kind and stitched back must give
the graph a whole capture gives, node for node; what it cannot prove falls back with a reason.
Tier 2: no process group."""

from __future__ import annotations

from typing import Any

import models
import pytest
import torch
from simulate import emit_all, run_ranks
from tpfx.passes import blocks
from tpfx.passes import capture as whole
from tpfx.passes.stages import Stages

import tpfx

_graph = blocks.graph_rows


def _capture_counting(model: torch.nn.Module, kwargs: dict[str, Any], monkeypatch: pytest.MonkeyPatch
                      ) -> tuple[whole.Captured | str, list[int]]:
    """Block capture of ``model``, and how many real layers each export it ran saw."""
    found = blocks.find_stack(model)
    assert not isinstance(found, str), found
    traced: list[int] = []
    real = whole.capture

    def spy(m: torch.nn.Module, a: tuple, k: dict, **kw: Any) -> Any:
        traced.append(sum(not isinstance(x, blocks._StandIn) for x in m.get_submodule(found.path)))
        return real(m, a, k, **kw)

    with monkeypatch.context() as patch:
        patch.setattr(whole, "capture", spy)
        return blocks.capture_blocks(model, (), kwargs), traced


def _kwargs(vocab: int, seq: int = 8) -> dict[str, Any]:
    return {"input_ids": torch.randint(0, vocab, (2, seq), generator=torch.Generator().manual_seed(0)),
            "use_cache": False}


class Block(torch.nn.Module):
    def __init__(self, d: int, scale: float = 1.0) -> None:
        super().__init__()
        self.up, self.down, self.scale = torch.nn.Linear(d, 4 * d), torch.nn.Linear(4 * d, d), scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.scale * self.down(torch.relu(self.up(x)))


class Stack(torch.nn.Module):
    def __init__(self, n: int = 6, d: int = 16, scales: list[float] | None = None) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(Block(d, s) for s in (scales or [1.0] * n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


class IndexedBlock(Block):
    """A block that knows its index (as transformers layers keep ``layer_idx``) and doubles its branch in one."""

    def __init__(self, d: int, idx: int, special: int) -> None:
        super().__init__(d)
        self.idx, self.special = idx, special

    def forward(self, x: torch.Tensor, s: torch.Tensor | None = None) -> torch.Tensor:
        y = self.down(torch.relu(self.up(x))) * (1 if s is None else s)
        return x + (2 * y if self.idx == self.special else y)


class Loop(torch.nn.Module):
    """A stack whose loop treats one layer specially: ``how`` = "scale" (an op between two layers), "skip"
    (one layer not called), "input" (one layer's input is changed), "other" (one layer gets another tensor
    besides it), "index" (the layer itself branches)."""

    def __init__(self, how: str, n: int = 6, d: int = 16) -> None:
        super().__init__()
        self.how = how
        self.layers = torch.nn.ModuleList(IndexedBlock(d, i, 4 if how == "index" else -1) for i in range(n))
        self.bias = torch.nn.Parameter(torch.zeros(2, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s0, s1 = self.bias[0], self.bias[1] + 1
        for i, layer in enumerate(self.layers):
            if self.how == "skip" and i == 4:
                continue
            if self.how == "other":
                x = layer(x, s1 if i == 4 else s0)
                continue
            x = layer(x + self.bias[1] if self.how == "input" and i == 4 else x)
            if self.how == "scale" and i == 4:
                x = x * 0.5
        return x


CASES = {"llama": lambda: models.llama(layers=6), "gpt2": lambda: models.gpt2(layers=5)}


@pytest.mark.parametrize("name", sorted(CASES))
def test_stitched_graph_is_the_whole_capture(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    model = CASES[name]()
    kwargs = _kwargs(model.config.vocab_size)
    full = whole.capture(model, (), kwargs)
    stitched, traced = _capture_counting(model, kwargs, monkeypatch)
    assert isinstance(stitched, whole.Captured), stitched
    assert traced == [blocks.TRACED]  # export traced 3 layers, not all of them
    assert _graph(stitched.gm) == _graph(full.gm)
    assert len(list(model.modules())) == len(list(CASES[name]().modules()))  # the stack is put back


def test_the_plan_and_every_ranks_numbers_are_the_whole_captures() -> None:
    model = models.llama(layers=6)
    kwargs = _kwargs(model.config.vocab_size)
    plans = []
    for use in (True, False):
        d, data, _ = Stages(blocks=use).derive(model, (), kwargs, 2)
        plans.append((data.data_dict(), d))
    assert plans[0][0] == plans[1][0]  # placements, collectives (by node name), fallbacks
    plan = tpfx.plan(model, 2, blocks=True)
    assert not any("capture" in f for f in plan.fallbacks)
    ref = model(**kwargs).logits.detach()

    def body(rank: int) -> torch.Tensor:
        local, _ = ranks[rank]
        return local(**kwargs).logits.detach()

    ranks = emit_all(plan)
    for out in run_ranks(2, body):
        assert float((out - ref).abs().max() / ref.abs().max()) <= 1e-5


def test_plain_stack_stitches_and_a_stack_of_all_different_layers_falls_back() -> None:
    x = torch.randn(2, 16)
    model = Stack()
    got = blocks.capture_blocks(model, (x,), {})
    assert isinstance(got, whole.Captured)
    assert _graph(got.gm) == _graph(whole.capture(model, (x,), {}).gm)
    odd = Stack(scales=[1.0, 1.0, 1.0, 1.0, 0.5, 1.0, 1.0])  # layer 4 scales its branch differently: its own kind
    found = blocks.find_stack(odd)
    assert not isinstance(found, str) and found.kinds == [0, 0, 0, 0, 1, 0, 0] and found.cut == 5, found
    got = blocks.capture_blocks(odd, (x,), {})
    assert isinstance(got, whole.Captured), got
    assert _graph(got.gm) == _graph(whole.capture(odd, (x,), {}).gm)
    ramp = Stack(scales=[1.0, 0.9, 0.8, 0.7, 0.6, 0.5])  # six kinds of one layer each: nothing to stand in for
    why = "layers: no layer to stand in for: its 6 layers are of 6 kinds"
    assert str(blocks.capture_blocks(ramp, (x,), {})).startswith(why)
    plan = tpfx.plan(ramp, 2, example_inputs=(x,), blocks=True)
    assert plan.fallbacks[0]["capture"] == "whole model" and plan.fallbacks[0]["reason"].startswith(why)
    assert blocks.capture_blocks(Stack(n=3), (x,), {}).startswith(blocks.NO_STACK)  # too short to gain
    assert not any("capture" in f for f in tpfx.plan(Stack(n=3), 2, example_inputs=(x,), blocks=True).fallbacks)
    assert not any("capture" in f for f in tpfx.plan(ramp, 2, example_inputs=(x,), blocks=False).fallbacks)


def test_a_stack_that_starts_with_other_layers_traces_them_and_stitches_the_rest() -> None:
    # DeepSeek-V3's layout: the first layers dense, the others MoE (first_k_dense_replace)
    from tpfx.testing.families import tiny_causal_lm

    model = tiny_causal_lm("deepseek_v3", num_hidden_layers=6, first_k_dense_replace=2)
    found = blocks.find_stack(model)
    assert not isinstance(found, str) and found.kinds == [0, 0, 1, 1, 1, 1] and found.cut == 5, found
    kwargs = _kwargs(model.config.vocab_size)
    got = blocks.capture_blocks(model, (), kwargs)
    assert isinstance(got, whole.Captured), got
    assert _graph(got.gm) == _graph(whole.capture(model, (), kwargs).gm)


def _qwen2(layer_types: list[str]) -> torch.nn.Module:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=len(layer_types),
                         num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True, sliding_window=4,
                         layer_types=layer_types)
    return Qwen2ForCausalLM(config)


def test_hybrid_layers_are_traced_three_of_each_kind_and_stitched(monkeypatch: pytest.MonkeyPatch) -> None:
    # sliding and full attention alternating (Gemma 2, GPT-OSS): two kinds, each stitched from its own template
    model = _qwen2(["sliding_attention", "full_attention"] * 5)
    found = blocks.find_stack(model)
    assert not isinstance(found, str) and found.kinds == [0, 1] * 5 and found.cut == 6, found
    assert found.templates == {0: 4, 1: 5} and found.siblings == {0: 2, 1: 3}
    kwargs = _kwargs(128, seq=12)  # longer than the window: the two kinds compute differently
    got, traced = _capture_counting(model, kwargs, monkeypatch)
    assert isinstance(got, whole.Captured), got
    assert traced == [6]
    assert _graph(got.gm) == _graph(whole.capture(model, (), kwargs).gm)
    plan = tpfx.plan(model, 2, example_kwargs=kwargs, blocks=True)
    assert not any("capture" in f for f in plan.fallbacks)
    ref = model(**kwargs).logits.detach()
    ranks = emit_all(plan)
    for out in run_ranks(2, lambda r: ranks[r][0](**kwargs).logits.detach()):
        assert float((out - ref).abs().max() / ref.abs().max()) <= 1e-5


def test_hybrid_kinds_too_short_to_stand_in_fall_back() -> None:
    why = blocks.capture_blocks(_qwen2(["full_attention"] * 2 + ["sliding_attention"] * 2), (), _kwargs(128))
    assert isinstance(why, str) and why.startswith("model.layers: no layer to stand in for"), why


def test_canonical_names_are_dense_per_op() -> None:
    gm = whole.capture(models.llama(layers=2), (), _kwargs(models.HF_VOCAB)).gm
    muls = sorted(int(n.name.rpartition("_")[2] or 0) if n.name != "mul" else 0
                  for n in gm.graph.nodes if n.name == "mul" or n.name.startswith("mul_"))
    assert muls == list(range(len(muls)))  # export's own counters skip (mul_8 -> mul_17)


def test_a_stitched_graph_generates_its_code_when_first_used() -> None:
    model = models.llama(layers=6)
    kwargs = _kwargs(models.HF_VOCAB)
    last = "model_layers_5_mlp_down_proj_weight"
    for use in ("call", "code", "print"):
        got = blocks.capture_blocks(model, (), kwargs)
        assert isinstance(got, whole.Captured), got
        gm = got.gm
        assert "_deferred" in vars(type(gm))  # stitched and renamed, not yet recompiled
        if use == "code":
            assert last in gm.code and "_deferred" not in vars(type(gm))
        elif use == "print":
            assert last in str(gm)
        out = gm(**kwargs).logits  # the stitched graph's code (the stand-ins' would skip layers 3-5)
        assert torch.allclose(out, model(**kwargs).logits, rtol=0, atol=1e-6) and "_deferred" not in vars(type(gm))


@pytest.mark.parametrize(("how", "why"), [
    ("scale", "layer 5 does not read the output of the layer before it"),  # it reads layer 4's output halved
    ("skip", "the layers were called in the order [2, 3, 5]"),
    ("input", "layer 4 does not read the output of the layer before it"),
    ("other", "layer 4 is called with other inputs than layer 2"),
    ("index", "layer 4 runs other ops than layer 2"),
])
def test_a_layer_treated_differently_after_the_traced_ones_falls_back(how: str, why: str) -> None:
    # what the three traced layers cannot show: the loop or a layer's own index singles out layer 4
    x = torch.randn(2, 16)
    model = Loop(how)
    got = blocks.capture_blocks(model, (x,), {})
    assert isinstance(got, str) and got.startswith("layers: ") and why in got, got
    plan = tpfx.plan(model, 2, example_inputs=(x,), blocks=True)
    assert plan.fallbacks[0]["capture"] == "whole model"
    ref = model(x)
    ranks = emit_all(plan)
    for out in run_ranks(2, lambda r: ranks[r][0](x).detach()):
        assert float((out - ref).abs().max() / ref.abs().max()) <= 1e-5  # the whole capture, exact


class _Scale(torch.nn.Module):
    def __init__(self, a: float) -> None:
        super().__init__()
        self.a = a

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a * x


class KernelBlock(Block):
    """A block that keeps a function module in a plain dict, outside the module tree (transformers 5.25 keeps
    its kernel functions so: one instance per layer)."""

    def __init__(self, d: int, a: float) -> None:
        super().__init__(d)
        self.kernels = {"scale": _Scale(a)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.kernels["scale"](self.down(torch.relu(self.up(x))))


def test_kinds_compare_modules_held_outside_the_module_tree_and_the_cut_counts_three_of_each() -> None:
    model = Stack()
    model.layers = torch.nn.ModuleList(KernelBlock(16, a) for a in [1.0, 1.0, 1.0, 2.0, 1.0, 1.0, 1.0])
    assert blocks.layer_kinds(model, list(model.layers)) == [0, 0, 0, 1, 0, 0, 0]  # equal, not identical, modules
    x = torch.randn(2, 16)
    got = blocks.capture_blocks(model, (x,), {})
    assert isinstance(got, whole.Captured), got
    assert _graph(got.gm) == _graph(whole.capture(model, (x,), {}).gm)
    attrs = [{("", "idx"): i, ("", "add"): 2 * i + 2, ("", "window"): 4, ("", "square"): i * i} for i in range(5)]
    assert blocks._index_keys(attrs) == {("", "idx"), ("", "add")}  # affine in the position: the layer's index
    assert blocks._cut([0] * 6) == 3
    assert blocks._cut([0, 1] * 5) == 6
    assert blocks._cut([0, 0, 1, 1, 1, 1]) == 5  # the first kind's layers need not repeat
    assert blocks._cut([0, 1, 2, 0, 1, 2, 0, 1, 2, 0]) == 9
    assert blocks._cut([0, 1, 0, 1, 0, 2]) == 6  # a kind seen once at the end: nothing stands in


class TypedBlock(IndexedBlock):
    """A block of a kind named by a plain attribute, which the loop reads to pick its input (Gemma 3's masks)."""

    def __init__(self, d: int, idx: int, kind: str) -> None:
        super().__init__(d, idx, -1)
        self.attention_type = kind


class TypedLoop(torch.nn.Module):
    def __init__(self, n: int = 10, d: int = 16) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(TypedBlock(d, i, ("local", "global")[i % 2]) for i in range(n))
        self.gates = torch.nn.Parameter(torch.ones(2, d))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = {"local": self.gates[0], "global": self.gates[1] * 0.5}
        for layer in self.layers:
            x = layer(x, gate[layer.attention_type])
        return x


def test_a_loop_that_reads_the_layers_attributes_sees_the_real_ones_through_the_stand_ins() -> None:
    model, x = TypedLoop(), torch.randn(2, 16)
    found = blocks.find_stack(model)
    assert not isinstance(found, str) and found.kinds == [0, 1] * 5 and found.cut == 6, found
    got = blocks.capture_blocks(model, (x,), {})
    assert isinstance(got, whole.Captured), got
    assert _graph(got.gm) == _graph(whole.capture(model, (x,), {}).gm)


class DropBlock(Block):
    def __init__(self, d: int) -> None:
        super().__init__(d)
        self.drop = torch.nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(self.down(torch.relu(self.up(x))))


def test_a_stitched_graph_serves_other_shapes_only_where_no_template_reads_its_index() -> None:
    x = torch.randn(2, 16)
    got = blocks.capture_blocks(Stack(n=8), (x,), {})  # reads no index: one graph for every batch size
    assert isinstance(got, whole.Captured) and got.dynamic, got
    got = blocks.capture_blocks(Loop("none"), (x,), {})  # IndexedBlock reads self.idx: proven at this shape only
    assert isinstance(got, whole.Captured) and not got.dynamic, got
    reading = blocks._Reading(dict(IndexedBlock(4, 3, 3).named_modules()))
    with reading:
        reading.mods[""](torch.randn(1, 4))
    assert {"idx", "special", "up", "down"} <= reading.reads[""] and "weight" in reading.reads["up"]
    assert type(reading.mods[""]) is IndexedBlock  # the class is put back


def test_a_layer_in_another_mode_or_with_a_hook_is_not_stitched_as_its_template() -> None:
    # training and hooks are not compared when layers are grouped into kinds: the replay sees their ops
    x = torch.randn(2, 16)
    model = Stack()
    model.layers = torch.nn.ModuleList(DropBlock(16) for _ in range(7))
    model.eval()
    got = blocks.capture_blocks(model, (x,), {})
    assert isinstance(got, whole.Captured) and got.dynamic, got
    model.layers[5].drop.train()  # dropout on in one layer that stands in
    got = blocks.capture_blocks(model, (x,), {})
    assert isinstance(got, str) and got.startswith("layers: layer 5 runs other ops than layer 2"), got
    model.layers[5].drop.eval()
    hook = model.layers[4].register_forward_hook(lambda m, a, out: 2 * out)
    got = blocks.capture_blocks(model, (x,), {})
    assert isinstance(got, str) and got.startswith("layers: layer 4 runs other ops than layer 2"), got
    hook.remove()
    plan = tpfx.plan(model, 2, example_inputs=(x,), blocks=True)
    assert not any("capture" in f for f in plan.fallbacks)
