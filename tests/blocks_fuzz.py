"""Adversarial stacks for block capture (passes/blocks.py): random 6-layer models whose layers differ in ways
the three traced layers cannot show, each compared with the unsharded model through tpfx's default plan.

A model is a stack of ``Layer``s (an MLP block, d=16) with one to three *twists* drawn from ``TWISTS`` and
placed on random layers, most of them after the cut (layer 3 on). Each twist is a way a realistic model makes
one layer compute other than its neighbours while its class, weights' shapes and plain attributes stay alike:

    select    each layer picks one of several same-shaped tensors of its parent by its index
    hidden    a per-layer constant hidden in an argument object whose repr is the same for every layer
    hook      forward hooks on every layer whose effect follows a counter they share
    grad      the loop runs some layers without grad (frozen layers)
    tied      a layer reuses another layer's weight (one parameter), or its whole MLP (ALBERT's pairs)
    outside   each layer holds a module outside the module tree with its own buffer (same attributes)
    shape     a layer past the cut branches on the batch size by its index (a guard only it has)
    identity  one layer is singled out by identity (``self is``)
    dict      a layer reads its index through ``__dict__`` (the read log cannot see it)
    counter   a counter outside the model, reset by each forward, decides which layer's call scales its output
    training  one layer is in train mode, which its forward reads
    record    the model installs recording hooks on its layers on its first call (transformers' output
              recording) and returns what they record

``check(seed)`` plans with block capture on (``tpfx.plan``'s default), runs 2 simulated ranks at the example
shape and at a second batch size (planning anew where the capture serves only its example shapes, as the
sharded module does), and returns the worst relative error of outputs and gradients; it also checks that
planning left the model as it was (``ModelState``). ``python blocks_fuzz.py N`` runs N seeds.
"""

from __future__ import annotations

import math
import random
import sys
from dataclasses import dataclass
from typing import Any

import torch
from simulate import run_ranks
from torch import nn
from tpfx.passes.emit import emit
from tpfx.passes.stages import Stages

import tpfx
from tpfx.plan import ShardingPlan

D, N = 16, 6
TOL = 1e-5
TWISTS = ("select", "hidden", "hook", "grad", "tied", "outside", "shape", "identity", "dict", "counter",
          "training", "record")


class Hidden:
    """An argument object with a per-layer value and the same repr for every layer."""

    def __init__(self, scale: float) -> None:
        self.scale = scale

    def __repr__(self) -> str:
        return "Hidden()"


class _Scale(nn.Module):
    def __init__(self, a: float) -> None:
        super().__init__()
        self.register_buffer("a", torch.tensor(a))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a * x


STATE = {"calls": 0}  # a counter outside the model, reset by each forward


class Layer(nn.Module):
    """One MLP block. ``twists`` is the model's dict (the same object in every layer); a layer reads its index
    only where a twist needs it."""

    def __init__(self, idx: int, twists: dict[str, set[int]]) -> None:
        super().__init__()
        self.idx, self.twists = idx, twists
        self.up, self.down = nn.Linear(D, 2 * D), nn.Linear(2 * D, D)
        if "outside" in twists:
            self.outside = {"f": _Scale(1.5 if idx in twists["outside"] else 1.0)}

    def forward(self, x: torch.Tensor, table: list[torch.Tensor] | None = None, cfg: Hidden | None = None
                ) -> torch.Tensor:
        tw = self.twists
        y = self.down(torch.relu(self.up(x)))  # (B, S, D)
        if "select" in tw:
            y = y + table[self.idx % len(table)]  # type: ignore[index]
        if cfg is not None:
            y = y * cfg.scale
        if "shape" in tw and self.idx in tw["shape"] and x.shape[0] > 2:
            y = -y
        if "identity" in tw and self.marked is self:
            y = 2 * y
        if "dict" in tw and self.__dict__["idx"] in tw["dict"]:
            y = y * 3
        if "counter" in tw:
            STATE["calls"] += 1
            if STATE["calls"] - 1 in tw["counter"]:
                y = y * 0.5
        if "training" in tw and self.training:
            y = y + 1
        if "outside" in tw:
            y = self.outside["f"](y)
        return x + y


class Model(nn.Module):
    def __init__(self, twists: dict[str, set[int]]) -> None:
        super().__init__()
        self.twists = twists
        self.layers = nn.ModuleList(Layer(i, twists) for i in range(N))
        self.table = nn.Parameter(torch.randn(3, D)) if "select" in twists else None
        self.recorded: list[torch.Tensor] | None = None
        self._recording = False
        for i in twists.get("tied", ()):  # layer i reuses layer i-1's MLP (ALBERT) or its up weight
            if i % 2:
                self.layers[i].up, self.layers[i].down = self.layers[i - 1].up, self.layers[i - 1].down
            else:
                self.layers[i].up.weight = self.layers[i - 1].up.weight
        for i in twists.get("identity", ()):
            for layer in self.layers:
                layer.__dict__["marked"] = self.layers[i]
        for i in twists.get("hook", ()):
            state = {"n": 0}

            def hook(m: nn.Module, args: Any, out: torch.Tensor, state: dict = state, i: int = i) -> torch.Tensor:
                state["n"] += 1
                return out * (1.5 if state["n"] % N == i else 1.0)

            for layer in self.layers:
                layer.register_forward_hook(hook)

    def _install_recording(self) -> None:
        self._recording = True

        def rec(m: nn.Module, args: Any, out: torch.Tensor) -> None:
            if self.recorded is not None:
                self.recorded.append(out)

        rec.tpfx_traced = True  # type: ignore[attr-defined]  # the model's own recording: part of its call
        for m in self.modules():
            if isinstance(m, Layer):
                m.register_forward_hook(rec)

    def forward(self, x: torch.Tensor) -> Any:
        if "record" in self.twists and not self._recording:
            self._install_recording()
        self.recorded = [] if "record" in self.twists else None
        STATE["calls"] = 0
        table = list(self.table) if self.table is not None else None
        for layer in self.layers:
            cfg = Hidden(1.25 if layer.idx in self.twists["hidden"] else 1.0) if "hidden" in self.twists else None
            if "grad" in self.twists and layer.idx in self.twists["grad"]:
                with torch.no_grad():
                    x = layer(x, table, cfg)
            else:
                x = layer(x, table, cfg)
        out = (x, *self.recorded) if self.recorded is not None else x
        self.recorded = None
        return out


@dataclass
class Result:
    seed: int
    twists: dict[str, set[int]]
    error: float
    stitched: bool
    model_changed: bool
    whole_error: float | None = None  # where ``error`` is over the tolerance: the error with blocks off

    @property
    def wrong(self) -> bool:
        """Silently wrong through block capture: over the tolerance where the whole capture is exact, or the
        model changed by planning."""
        return (self.error > TOL and (self.whole_error or 0.0) <= TOL) or self.model_changed


def draw(seed: int) -> dict[str, set[int]]:
    rng = random.Random(seed)
    out: dict[str, set[int]] = {}
    for name in rng.sample(TWISTS, rng.randint(1, 3)):
        out[name] = {rng.choice([1, 2, 3, 4, 4, 5, 5])}
    return out


def build(twists: dict[str, set[int]], seed: int) -> Model:
    torch.manual_seed(seed)
    model = Model(twists).eval()
    for i in twists.get("training", ()):
        model.layers[i].train()
    return model


def _state(model: nn.Module) -> list[Any]:
    """Every module's attributes and hooks, by identity: equal before and after planning."""
    return [(name, {k: (id(v), len(v) if isinstance(v, dict) else None) for k, v in vars(m).items()})
            for name, m in model.named_modules()]


def _leaves(out: Any) -> list[torch.Tensor]:
    return list(out) if isinstance(out, tuple) else [out]


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    if a.shape != b.shape:
        return math.inf
    return float((a - b).abs().max() / max(float(b.abs().max()), 1e-6))


def _reference(model: Model, x: torch.Tensor) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    out = _leaves(model(x))
    sum((o * (i + 1)).sum() for i, o in enumerate(out)).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return [o.detach() for o in out], grads


def _sharded(model: Model, x: torch.Tensor, world: int, use_blocks: bool
             ) -> tuple[list[list[torch.Tensor]], list[dict], Any, bool]:
    """Outputs and local gradients of every simulated rank under the default plan (block capture on), and
    whether the plan's graph was stitched to serve every shape."""
    d, data, dynamic = Stages(blocks=use_blocks).derive(model, (x,), {}, world)
    plan = ShardingPlan.derived(data, d)
    stitched = not any("capture" in f for f in data.fallbacks)
    stores: list[dict[str, torch.nn.Parameter]] = [{} for _ in range(world)]
    gms = [emit(d.gm, d.prop, r, lambda ranks: "fake:" + ",".join(map(str, ranks)), stores[r]) for r in range(world)]

    def body(rank: int) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        out = _leaves(gms[rank](x))
        sum((o * (i + 1)).sum() for i, o in enumerate(out)).backward()
        return [o.detach() for o in out], {f: p.grad for f, p in stores[rank].items() if p.grad is not None}

    got = run_ranks(world, body)
    return [g[0] for g in got], [g[1] for g in got], plan, stitched and dynamic


def check(seed: int, world: int = 2) -> Result:
    result = _check(seed, world, True)
    if result.error > TOL:  # wrong: is it block capture's doing, or does the whole capture get it wrong too?
        result.whole_error = _check(seed, world, False).error
    return result


def _check(seed: int, world: int, use_blocks: bool) -> Result:
    twists = draw(seed)
    model = build(twists, seed)
    worst, stitched, changed = 0.0, False, False
    for batch in (2, 3):  # the example shape, then another batch size (a plan serving only the first re-plans)
        x = torch.randn(batch, 4, D, generator=torch.Generator().manual_seed(seed + batch))
        state = _state(model)
        outs, grads, plan, dyn = _sharded(model, x, world, use_blocks)  # planned first: its run is the model's first
        changed = changed or _state(model) != state
        ref_out, ref_grads = _reference(model, x)
        stitched = stitched or dyn
        worst = max([worst] + [_err(o, r) for out in outs for o, r in zip(out, ref_out, strict=True)]
                    + [math.inf for out in outs if len(out) != len(ref_out)])
        for rank, g in enumerate(grads):
            for fqn, local in g.items():
                full = ref_grads.get(_capture_name(model, fqn))
                worst = max(worst, _grad_err(plan, fqn, local, full, rank))
    return Result(seed, twists, worst, stitched, changed)


def _capture_name(model: nn.Module, fqn: str) -> str:
    names = dict(model.named_parameters(remove_duplicate=False))
    first = {id(p): n for n, p in reversed(list(model.named_parameters(remove_duplicate=False)))}
    return first[id(names[fqn])] if fqn in names else fqn


def _grad_err(plan: ShardingPlan, fqn: str, local: torch.Tensor, full: torch.Tensor | None, rank: int) -> float:
    if full is None:
        return 0.0 if float(local.abs().max()) == 0 else math.inf
    return _err(local, tpfx.shard_tensor(plan, fqn, full, rank))


def run(n: int, start: int = 0) -> list[Result]:
    return [check(seed) for seed in range(start, start + n)]


def figure(results: list[Result]) -> str:
    export = sum(r.whole_error is not None and r.whole_error > TOL for r in results)
    return (f"blocks fuzz: {len(results)} models, {sum(r.wrong for r in results)} silently wrong "
            f"({sum(r.stitched for r in results)} stitched for every shape; {export} wrong with blocks off too)")


if __name__ == "__main__":
    results = run(int(sys.argv[1]) if len(sys.argv) > 1 else 40)
    for r in results:
        print(r.seed, sorted((k, sorted(v)) for k, v in r.twists.items()), f"{r.error:.1e}", "stitched" if r.stitched
              else "whole or per shape", "" if r.whole_error is None else f"blocks off: {r.whole_error:.1e}",
              "MODEL CHANGED" if r.model_changed else "")
    print(figure(results))
