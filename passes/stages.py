"""The compiler, top to bottom. Every stage is timed by the runner (``Stages.timings``, seconds by name):

    capture      torch.export (non-strict) on example inputs -> ATen GraphModule        (capture.py)
    normalize    clean-up passes, linted after each: functionalized views relaxed, grad regions inlined,
                 aliases canonical, biases split off, variance decomposed, ...          (normalize.py)
    propagate    a placement for every value and a style for every weight, to a fixpoint (propagate.py);
                 with sequence parallelism, the residual stream split by sequence       (sequence_parallel.py)
    build_plan   the plan as plain data: placements by FQN, collectives by node name    (plan_data.py)
    emit_rank    one GraphModule per rank, holding that rank's slices, with Megatron's
                 autograd collectives                                                   (emit.py)

``derive`` runs the first four; the graph state they leave (the normalized graph and its propagation) is a
``Derivation``, which emission and the plan's views read. A plan loaded from JSON has none.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.fx as fx

from . import blocks as _blocks
from . import capture as _capture
from . import normalize
from .checkpoint import checkpointing_layers
from .eager_functions import eager_functions
from .eager_hooks import eager_hooks
from .emit import GroupNamer, emit
from .placements import Placement
from .plan_data import PlanData, build_plan
from .propagate import Propagation, Seed, propagate
from .sequence_parallel import sequence_parallel as split_sequence

T = TypeVar("T")


@dataclass
class Derivation:
    """The graph a plan was derived from and its propagation (node-keyed: not part of the plan's data)."""

    gm: fx.GraphModule
    prop: Propagation
    seeds: dict[str, Seed] = field(default_factory=dict)


@contextlib.contextmanager
def _gc_paused() -> Any:
    """Python's cyclic garbage collector paused while a stage runs, as compilers do: the stages allocate many
    small objects, and each full collection they trigger walks the whole heap (a 70B model's modules, the
    graph's nodes: measured 0.3-0.5 s per plan and emission at 70B). Cycles a stage leaves are collected after."""
    paused = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if paused:
            gc.enable()


# Capture, planning and emission trace with shared state (torch.export, fake-tensor modes of cached blocks, the
# hook and Function registries patched during a capture): ranks on threads of one process (tpfx.inprocess) take
# turns; only running the emitted graphs is concurrent.
TRACE_LOCK = threading.RLock()


def _one_at_a_time(fn: Callable[..., T]) -> Callable[..., T]:
    @functools.wraps(fn)
    def locked(*args: Any, **kwargs: Any) -> T:
        with TRACE_LOCK, _dynamo_compiling():
            return fn(*args, **kwargs)

    return locked


def _dynamo_compiling() -> Any:
    """torch.compile's own lock (a rank thread compiling its graph traces with state an export shares), if
    torch.compile is loaded."""
    import sys

    convert = sys.modules.get("torch._dynamo.convert_frame")
    lock = getattr(convert, "compile_lock", None)
    return lock if lock is not None else contextlib.nullcontext()


class Stages:
    """Runs the stages and adds each one's seconds to ``timings`` (a caller's dict, or a new one)."""

    def __init__(self, timings: dict[str, float] | None = None, blocks: bool | None = None,
                 checkpoint_layers: bool = False) -> None:
        self.timings: dict[str, float] = {} if timings is None else timings
        # every layer of the stack a checkpointed region (checkpoint.checkpointing_layers)
        self.checkpoint_layers = checkpoint_layers
        # capture a stack of identical layers through three of them (blocks.py); default: blocks.ENABLED
        self.blocks = _blocks.ENABLED if blocks is None else blocks

    def timed(self, name: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        t0 = time.perf_counter()
        try:
            with _gc_paused():
                return fn(*args, **kwargs)
        finally:
            self.timings[name] = self.timings.get(name, 0.0) + time.perf_counter() - t0

    @_one_at_a_time
    def capture(self, model: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> _capture.Captured:
        """The model's graph: through three layers of each kind in its stack and stitched (``blocks``), else whole, with the
        reason the stack could not be used in ``Captured.whole_because``. The model is left as it was given
        (``capture.ModelState``)."""
        why = None
        layers = checkpointing_layers(model) if self.checkpoint_layers else contextlib.nullcontext()
        with layers, eager_hooks(model), eager_functions(), _capture.ModelState(model) as state:  # from and back to the model as given
            if self.blocks:
                got = self.timed("capture", _blocks.capture_blocks, model, args, kwargs)
                if isinstance(got, _capture.Captured):
                    return got
                why = None if got.startswith(_blocks.NO_STACK) else got
                state.restore()
            captured = self.timed("capture", _capture.capture, model, args, kwargs)
        captured.whole_because = why
        return captured

    def normalize(self, captured: _capture.Captured) -> fx.GraphModule:
        passes = ([normalize.relax_views] if captured.functionalized else []) + normalize.CLEANUPS
        with _gc_paused():
            return normalize.run_passes(captured.gm, passes, self.timings)  # each pass timed by name

    def propagate(self, gm: fx.GraphModule, world: int, pins: dict[str, tuple[str, Placement | None]] | None = None,
                  fed: dict[str, Placement] | None = None, sequence_parallel: bool = False) -> Derivation:
        prop, seeds = self.timed("propagate", propagate, gm, world, pins, fed=fed)
        if sequence_parallel:
            prop = self.timed("sequence_parallel", split_sequence, gm, prop)
        return Derivation(gm, prop, seeds)

    def build_plan(self, d: Derivation) -> PlanData:
        return self.timed("build_plan", build_plan, d.prop, d.seeds)

    @_one_at_a_time
    def emit_rank(self, d: Derivation, rank: int, group_name: GroupNamer,
                  store: dict[str, torch.nn.Parameter] | None = None, gather_outputs: bool = True,
                  local_outputs: frozenset[int] = frozenset()) -> fx.GraphModule:
        return self.timed("emit", emit, d.gm, d.prop, rank, group_name, store, gather_outputs, local_outputs)

    @_one_at_a_time
    def derive(self, model: torch.nn.Module, args: tuple, kwargs: dict[str, Any], world: int,
               pins: dict[str, tuple[str, Placement | None]] | None = None,
               fed: dict[str, Placement] | Callable[[fx.GraphModule], dict[str, Placement]] | None = None,
               sequence_parallel: bool = False) -> tuple[Derivation, PlanData, bool]:
        """capture -> normalize -> propagate -> build_plan; returns the derivation, the plan's data and whether
        the capture has dynamic dims. ``fed``: placements of inputs the caller passes split (a KV cache), or a
        function of the normalized graph that names them."""
        captured = self.capture(model, args, kwargs)
        gm = self.normalize(captured)
        d = self.propagate(gm, world, pins, fed(gm) if callable(fed) else fed, sequence_parallel)
        data = self.build_plan(d)
        if captured.whole_because:
            data.fallbacks.insert(0, {"capture": "whole model", "reason": captured.whole_because})
        return d, data, captured.dynamic
