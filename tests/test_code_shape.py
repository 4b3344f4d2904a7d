"""The compiler reads top to bottom: no function of passes/ longer than a screen and a half (80 lines)."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

PASSES = Path(__file__).resolve().parents[1] / "passes"


def test_no_function_in_passes_is_over_80_lines() -> None:
    long = []
    for path in sorted(PASSES.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                if n > 80:
                    long.append(f"{path.name}:{node.lineno} {node.name} ({n} lines)")
    assert not long, long


_REGISTRY = ("import sys; from tpfx.passes.rules import REGISTRY; "
             "print(sorted((str(k), v.__module__ + '.' + v.__qualname__) for k, v in REGISTRY.items()))")


def test_one_registry_whatever_the_import_order() -> None:
    """The rule a reader finds registered is the one that runs: the same registry from any first import, and a
    second registration for an op is an error."""
    import subprocess
    import sys

    import pytest
    import torch
    from tpfx.passes.rules import register

    outs = {first: subprocess.run([sys.executable, "-c", f"import {first}; {_REGISTRY}"], capture_output=True,
                                  text=True, timeout=120, check=True).stdout for first in ("tpfx.passes.rules_nn",
                                                                                         "tpfx.report")}
    assert len(set(outs.values())) == 1 and "rules_nn.view" in outs["tpfx.report"], outs
    with pytest.raises(RuntimeError, match="already has the rule"):
        register(torch.ops.aten.view)(lambda ctx: None)


def test_propagation_leaves_the_graph_as_it_found_it() -> None:
    """Rules are pure: a rule's target op travels in its Strategy, not in node.meta. What propagation keeps on
    nodes are memoized shapes and operand lists (``tpfx_shape``, ``tpfx_inputs``), the same for any world size:
    planning at t=4 with sequence parallelism between two plans at t=2 changes no node's meta and not the plan."""
    import models

    from tpfx.api import _plan_graph, _synthesize, capture

    def meta(gm: Any) -> dict[str, Any]:
        return {n.name: {k: repr(v) for k, v in n.meta.items() if k.startswith("tpfx_") or k == "val"}
                for n in gm.graph.nodes}

    for model in (models.gpt2(layers=1), models.llama(num_kv_heads=2, layers=1)):
        gm, _ = capture(model, *_synthesize(model))
        first = _plan_graph(gm, 2, None).digest()
        before = meta(gm)
        assert not any("tpfx_retarget" in m for m in before.values())
        _plan_graph(gm, 4, None, sequence_parallel=True)
        assert _plan_graph(gm, 2, None).digest() == first
        assert meta(gm) == before
