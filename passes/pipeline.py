"""The ordered pass list: plain ``GraphModule -> GraphModule`` functions, linted and timed."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch
import torch.fx as fx

log = logging.getLogger("tpfx.passes")
aten = torch.ops.aten
Pass = Callable[[fx.GraphModule], fx.GraphModule]


def decompose_bias(gm: fx.GraphModule) -> fx.GraphModule:
    """``linear(x, W, b)`` -> ``linear(x, W) + b`` and ``addmm(b, x, W)`` -> ``mm(x, W) + b``.

    A row-split matmul yields partial sums; its bias must be added once, after the all-reduce.
    Splitting the bias off lets the pointwise rule place it (sharded with a column split,
    after the reduction with a row split)."""
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is aten.linear.default and len(node.args) > 2 and node.args[2] is not None:
            x, w, b = node.args[:3]
            mm_args, bias = (x, w), b
            mm_target = aten.linear.default
        elif node.target is aten.addmm.default and len(node.args) == 3 and not node.kwargs:
            b, x, w = node.args
            mm_args, bias, mm_target = (x, w), b, aten.mm.default
        else:
            continue
        with gm.graph.inserting_before(node):
            mm = gm.graph.call_function(mm_target, mm_args)
            mm.meta = dict(node.meta)
            add = gm.graph.call_function(aten.add.Tensor, (mm, bias))
            add.meta = dict(node.meta)
        node.replace_all_uses_with(add)
        gm.graph.erase_node(node)
    gm.recompile()
    return gm


def run_passes(gm: fx.GraphModule, passes: list[Pass], timings: dict[str, float] | None = None) -> fx.GraphModule:
    for p in passes:
        t0 = time.perf_counter()
        gm = p(gm)
        gm.graph.lint()
        dt = time.perf_counter() - t0
        if timings is not None:
            timings[p.__name__] = timings.get(p.__name__, 0.0) + dt
        log.debug("pass %s: %.3f s, %d nodes", p.__name__, dt, len(gm.graph.nodes))
    return gm


PRE_PASSES: list[Pass] = [decompose_bias]
