"""Rank function for ``tests/test_compile.py``: ``auto_shard(..., compile=True)`` under inductor.

One launch does everything (a cold inductor compile of the tiny Llama takes 15-35 s per graph on a 2-core
box): a forward-only call, then training steps (forward with ``labels``, ``loss.backward()``, an SGD step)
at the same shape and at new batch/sequence lengths. Each is compared with the unsharded model and with an
eager run of the same emitted GraphModule, and measured: dynamo graphs and graph breaks
(``torch._dynamo.utils.counters``), the graphs inductor compiles (forward and backward) and the collectives
in them.

Inductor's graphs are observed with a post-grad pass (``GraphRecorder``); an AOT backward graph is the one
with ``tangents_*`` inputs. Its ``uuid`` is ``None``, which makes inductor bypass its FX-graph and
AOT-autograd caches: every compile in the run is cold and seen by the pass.
"""

from __future__ import annotations

import time
from typing import Any

import models
import torch
import torch._inductor.config as inductor_config
from numerics import compare_parameters, rel_err
from torch._dynamo.utils import counters
from torch._inductor.custom_graph_pass import CustomGraphPass
from torch.utils._python_dispatch import TorchDispatchMode

import tpfx

TRAIN_LR = 0.1  # SGD: weights after a step stay comparable to fp32 rounding (AdamW's g/sqrt(v) amplifies it)


def _collective(op: Any) -> str | None:
    """The name of a ``_c10d_functional`` op that launches communication (waits excluded)."""
    if getattr(op, "namespace", None) != "_c10d_functional":
        return None
    name = op.name().split("::")[-1].split(".")[0]
    return None if name.startswith("wait") else name


class GraphRecorder(CustomGraphPass):
    """Inductor post-grad pass recording each compiled graph: backward or forward, its collectives."""

    def __init__(self) -> None:
        self.graphs: list[dict[str, Any]] = []

    def __call__(self, graph: torch.fx.Graph) -> None:
        ops: dict[str, int] = {}
        for n in graph.nodes:
            name = _collective(n.target) if n.op == "call_function" else None
            if name is not None:
                ops[name] = ops.get(name, 0) + 1
        backward = any(n.op == "placeholder" and n.name.startswith("tangents") for n in graph.nodes)
        self.graphs.append({"backward": backward, "collectives": ops})

    def uuid(self) -> Any:
        return None  # not cacheable: every compile runs (and is recorded)


class CountCollectives(TorchDispatchMode):
    """Counts the collectives an eager run launches (forward and autograd backward alike)."""

    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        if _collective(func) is not None:
            self.n += 1
        return func(*args, **(kwargs or {}))


class Meter:
    """Dynamo and inductor activity since the last ``mark``."""

    def __init__(self, recorder: GraphRecorder) -> None:
        self.recorder = recorder
        self.mark()

    def mark(self) -> None:
        self.t0 = time.perf_counter()
        self.graphs0 = counters["stats"]["unique_graphs"]
        self.breaks0 = sum(counters["graph_break"].values())
        self.n0 = len(self.recorder.graphs)

    def read(self) -> dict[str, Any]:
        new = self.recorder.graphs[self.n0:]

        def launched(backward: bool) -> int:
            return sum(sum(g["collectives"].values()) for g in new if g["backward"] == backward)

        res = {"seconds": round(time.perf_counter() - self.t0, 2),
               "dynamo_graphs": counters["stats"]["unique_graphs"] - self.graphs0,
               "graph_breaks": sum(counters["graph_break"].values()) - self.breaks0,
               "inductor_fw": sum(not g["backward"] for g in new), "inductor_bw": sum(g["backward"] for g in new),
               "fw_collectives": launched(False), "bw_collectives": launched(True),
               "ops": [g["collectives"] for g in new]}
        self.mark()
        return res


def _lm_inputs(batch: int, seq: int, seed: int) -> dict[str, torch.Tensor]:
    return {"input_ids": models.token_inputs(models.HF_VOCAB, batch, seq, seed=seed),
            "labels": models.token_inputs(models.HF_VOCAB, batch, seq, seed=seed + 1000)}


def compile_check(rank: int, world: int, steps: list[tuple[int, int]]) -> dict[str, Any]:
    """A forward-only call, then one SGD training step per (batch, seq) in ``steps``."""
    recorder = GraphRecorder()
    inductor_config.post_grad_custom_post_pass = recorder
    counters.clear()
    model, ref = models.llama(num_kv_heads=2), models.llama(num_kv_heads=2)
    sharded = tpfx.auto_shard(model, world, compile=True)
    meter = Meter(recorder)
    res: dict[str, Any] = {}

    # forward only: the graph auto_shard captured (input_ids alone; the logits are gathered)
    ids = models.token_inputs(models.HF_VOCAB, 3, 6, seed=5)
    with torch.no_grad():
        eager_count = CountCollectives()
        with eager_count:
            eager = sharded.graph_module(input_ids=ids)(input_ids=ids, use_cache=False)
        meter.mark()
        out = sharded(input_ids=ids)
        res["forward"] = meter.read()
        ref_out = ref(input_ids=ids)
    res["forward"] |= {"logits": rel_err(out.logits, ref_out.logits), "eager": rel_err(out.logits, eager.logits),
                       "eager_fw_collectives": eager_count.n}

    opt = torch.optim.SGD(sharded.parameters(), lr=TRAIN_LR)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=TRAIN_LR)
    params = [p for _, p in sharded.named_parameters()]
    graph_params = [sharded._store[n] for n, _ in sharded.named_parameters()]  # what graph_module() reads
    res["steps"] = []
    for i, (batch, seq) in enumerate(steps):
        kw = _lm_inputs(batch, seq, seed=10 + i)
        # the eager run of the same emitted graph and weights, before the step changes them
        fw_count, bw_count = CountCollectives(), CountCollectives()
        with fw_count:
            eager = sharded.graph_module(**kw)(**kw, use_cache=False)
        with bw_count:
            eager_grads = torch.autograd.grad(eager.loss, graph_params, allow_unused=True)
        meter.mark()
        opt.zero_grad(set_to_none=True)
        out = sharded(**kw)
        out.loss.backward()
        opt.step()
        step = meter.read()
        ref_opt.zero_grad(set_to_none=True)
        ref_out = ref(**kw)
        ref_out.loss.backward()
        ref_opt.step()
        grads = compare_parameters(sharded, ref, sharded.plan, rank, grads=True)["errors"]
        weights = compare_parameters(sharded, ref, sharded.plan, rank, grads=False)["errors"]
        step |= {"shape": (batch, seq), "loss": rel_err(out.loss, ref_out.loss),
                 "logits": rel_err(out.logits, ref_out.logits), "grad": max(grads.values()),
                 "weights_after_step": max(weights.values()),
                 "eager_loss": rel_err(out.loss, eager.loss), "eager_logits": rel_err(out.logits, eager.logits),
                 "eager_grad": max(rel_err(p.grad, g if g is not None else torch.zeros_like(tpfx.local(p)))
                                   for p, g in zip(params, eager_grads)),
                 "eager_fw_collectives": fw_count.n, "eager_bw_collectives": bw_count.n}
        res["steps"].append(step)
    return res


def dropout_check(rank: int, world: int) -> dict[bool, float]:
    """GPT-2 with dropout 0.1 in training mode, compile=True, seeded alike with the unsharded eager model: the
    logits' error with inductor's ``fallback_random`` on (eager's masks: exact) and off (inductor's own draws)."""
    import train_cases

    ids = models.token_inputs(models.TINY_VOCAB, 2, 8, seed=1)
    errs, before = {}, inductor_config.fallback_random
    try:
        for fallback in (True, False):
            inductor_config.fallback_random = fallback
            sharded, ref = tpfx.auto_shard(train_cases.dropout_gpt2(), world, compile=True), train_cases.dropout_gpt2()
            with torch.no_grad():
                torch.manual_seed(7)
                got = sharded(input_ids=ids).logits
                torch.manual_seed(7)
                want = ref(input_ids=ids).logits
            errs[fallback] = rel_err(got, want)
    finally:
        inductor_config.fallback_random = before
    return errs


def all_checks(rank: int, world: int, steps: list[tuple[int, int]]) -> dict[str, Any]:
    """Every check of tests/test_compile.py in one launch (inductor's cold compiles dominate)."""
    return {"dropout": dropout_check(rank, world), **compile_check(rank, world, steps)}
