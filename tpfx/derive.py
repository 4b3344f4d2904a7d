"""One place where a model becomes a ``ShardingPlan``: the compiler's stages (``tpfx.passes.Stages``) run on a
model and its example inputs, with what every caller needs — ``tpfx.plan``, ``auto_shard``'s first capture,
a sharded module's later captures (pinned to its first plan), generation's prefill and decode steps (a KV
cache fed as this rank's heads), the tests and the fuzzer (a normalized graph planned at several sizes).

    examples      the inputs to capture with: given, or made from a transformers model's description
    derive        model + inputs -> plan (capture, normalize, propagate, build_plan), peft adapters named in
                  capture errors
    capture       model + inputs -> the normalized graph (tests, the fuzzer: one capture, many plans)
    plan_graph    a normalized graph -> plan
"""

from __future__ import annotations

import fnmatch
import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.fx as fx

from tpfx.adapters import check, explain
from tpfx.inputs import prepare, synthesize
from tpfx.passes import CaptureError, Derivation, Placement, PlanData, Stages
from tpfx.plan import ShardingPlan

Fed = dict[str, Placement] | Callable[[fx.GraphModule], dict[str, Placement]] | None

prepare_kwargs = prepare  # use_cache=False for transformers models (and models wrapping one)


def examples(model: torch.nn.Module, example_inputs: tuple | None,
             example_kwargs: dict[str, Any] | None) -> tuple[tuple, dict[str, Any]]:
    """The inputs to capture with: those given, else synthesized from the model's description."""
    if example_inputs is None and example_kwargs is None:
        args, kwargs = synthesize(model)
    else:
        args, kwargs = tuple(example_inputs or ()), dict(example_kwargs or {})
    return args, prepare_kwargs(model, kwargs)


def override_pins(model: torch.nn.Module, overrides: dict[str, str] | None) -> dict | None:
    """``{fqn or glob: style}`` overrides as planner pins (every matching parameter, ``.weight`` implied)."""
    if not overrides:
        return None
    names = [n for n, _ in model.named_parameters()]
    pins: dict[str, tuple[str, Any]] = {}
    for pattern, style in overrides.items():
        hits = [n for n in names if fnmatch.fnmatchcase(n, pattern) or fnmatch.fnmatchcase(n, pattern + ".weight")]
        if not hits:
            raise ValueError(f"tpfx: override {pattern!r} matches no parameter")
        for n in hits:
            pins[n] = (style, None)
    return pins


def derived(data: PlanData, d: Derivation, stacklevel: int = 4, warn: bool = True) -> ShardingPlan:
    """The plan of a derivation; warns (at the frame ``stacklevel`` names: the caller of tpfx.plan or
    auto_shard by default) when no weight is split."""
    plan = ShardingPlan.derived(data, d)
    world_size = plan.world_size
    if warn and world_size > 1 and plan.placements and all(p.style == "replicate" for p in plan.placements.values()):
        widest = max((max(p.shape, default=0) for p in plan.placements.values()), default=0)
        warnings.warn(f"tpfx: no weight is split at world_size={world_size} (the widest weight dim is {widest}; "
                      "see plan.fallbacks): every rank holds and computes the whole model", stacklevel=stacklevel)
    elif warn and world_size > 1 and (why := _indivisible_views(plan)):
        warnings.warn(why, stacklevel=stacklevel)
    return plan


def _indivisible_views(plan: ShardingPlan) -> str | None:
    """A warning naming the weights replicated because a view cuts their split dim into parts no split of the
    ranks can carry (fewer heads than ranks, with no group count dividing both), and what that costs per rank."""
    reasons = {f["param"]: f["reason"] for f in plan.fallbacks
               if "param" in f and f["reason"].startswith("replicated:") and "splits the sharded dim" in f["reason"]}
    if not reasons:
        return None
    t = plan.world_size
    extra = sum(math.prod(plan.placements[f].shape) for f in reasons) * (t - 1) // t
    first = sorted(reasons)[0]
    return (f"tpfx: {len(reasons)} weights (e.g. {first}) are replicated, not split: {reasons[first].split(': ', 1)[1]}; "
            f"{extra:,} more elements per rank than a split would hold (heads fewer than the ranks and no group "
            f"count dividing both: no head-parallel plan exists at world_size={t}; see plan.fallbacks)")


def derive(model: torch.nn.Module, args: tuple, kwargs: dict[str, Any], world_size: int, pins: dict | None,
           sequence_parallel: bool = False, stages: Stages | None = None, fed: Fed = None,
           warn: bool = True) -> tuple[ShardingPlan, bool]:
    """The plan for these inputs (``Stages.derive``) and whether its graph serves other shapes. ``fed``: the
    placements in which inputs arrive (or a function of the normalized graph giving them), default replicated."""
    check(model)
    try:
        d, data, dynamic = (Stages() if stages is None else stages).derive(model, args, kwargs, world_size, pins,
                                                                           fed, sequence_parallel)
    except CaptureError as e:
        raise CaptureError(explain(model, str(e))) from e
    return derived(data, d, warn=warn), dynamic


def capture(model: torch.nn.Module, args: tuple, kwargs: dict[str, Any],
            stages: Stages | None = None) -> tuple[fx.GraphModule, bool]:
    """The model's normalized ATen graph for these inputs (``stages``: capture, normalize); returns (graph,
    dynamic)."""
    stages = Stages() if stages is None else stages
    captured = stages.capture(model, args, kwargs)
    return stages.normalize(captured), captured.dynamic


def plan_graph(gm: fx.GraphModule, world_size: int, pins: dict | None, stages: Stages | None = None,
               fed: dict[str, Placement] | None = None, sequence_parallel: bool = False) -> ShardingPlan:
    """``stages``' propagate and build_plan on a normalized graph."""
    stages = Stages() if stages is None else stages
    d = stages.propagate(gm, world_size, pins, fed, sequence_parallel)
    return derived(stages.build_plan(d), d, stacklevel=3)
