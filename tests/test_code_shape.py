"""The compiler reads top to bottom: no function of passes/ longer than a screen and a half (80 lines)."""

from __future__ import annotations

import ast
from pathlib import Path

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
