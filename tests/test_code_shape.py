"""The compiler reads top to bottom: no function of passes/ over 80 lines, one registry, pure rules, no import
cycle, tpfx using only the passes surface, the plan as plain data, stages timed by the runner."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any

PASSES = Path(__file__).resolve().parents[1] / "passes"


def test_no_function_in_passes_is_over_80_lines() -> None:
    long = []  # the compiler and the runtime package
    for path in [*sorted(PASSES.rglob("*.py")), *sorted((PASSES.parent / "tpfx" / "runtime").glob("*.py"))]:
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
                                  text=True, timeout=120, check=True).stdout for first in ("tpfx.passes.rules.nn",
                                                                                         "tpfx.report")}
    assert len(set(outs.values())) == 1 and "rules.views.view" in outs["tpfx.report"], outs
    with pytest.raises(RuntimeError, match="already has the rule"):
        register(torch.ops.aten.view)(lambda ctx: None)


def test_propagation_leaves_the_graph_as_it_found_it() -> None:
    """Rules are pure: a rule's target op travels in its Strategy, not in node.meta. What propagation keeps on
    nodes are memoized shapes and operand lists (``tpfx_shape``, ``tpfx_inputs``), the same for any world size:
    planning at t=4 with sequence parallelism between two plans at t=2 changes no node's meta and not the plan."""
    import models

    from tpfx.derive import capture, plan_graph
    from tpfx.inputs import synthesize

    def meta(gm: Any) -> dict[str, Any]:
        return {n.name: {k: repr(v) for k, v in n.meta.items() if k.startswith("tpfx_") or k == "val"}
                for n in gm.graph.nodes}

    for model in (models.gpt2(layers=1), models.llama(num_kv_heads=2, layers=1)):
        gm, _ = capture(model, *synthesize(model))
        first = plan_graph(gm, 2, None).digest()
        before = meta(gm)
        assert not any("tpfx_retarget" in m for m in before.values())
        plan_graph(gm, 4, None, sequence_parallel=True)
        assert plan_graph(gm, 2, None).digest() == first
        assert meta(gm) == before


ROOT = PASSES.parent


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("").parts  # passes/rules/core -> tpfx.passes.rules.core
    parts = ["tpfx", *rel] if rel[0] == "passes" else list(rel)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, typing: bool = False) -> set[str]:
    """The tpfx modules ``path`` imports (top level and inside functions; ``TYPE_CHECKING`` blocks only with
    ``typing``)."""
    tree = ast.parse(path.read_text())
    typing_only = {id(x) for n in ast.walk(tree) if isinstance(n, ast.If) and "TYPE_CHECKING" in ast.unparse(n.test)
                   for stmt in n.body for x in ast.walk(stmt)}
    me = _module_name(path)
    package = me if path.stem == "__init__" else me.rpartition(".")[0]
    out: set[str] = set()
    for n in ast.walk(tree):
        if id(n) in typing_only and not typing:
            continue
        if isinstance(n, ast.Import):
            out |= {a.name for a in n.names}
        elif isinstance(n, ast.ImportFrom):
            up = package.rsplit(".", n.level - 1)[0] if n.level > 1 else package
            base = (up + ("." + n.module if n.module else "")) if n.level else (n.module or "")
            out |= {f"{base}.{a.name}" for a in n.names} if not n.module else {base}
    return {m for m in out if m.startswith("tpfx") and m != me and m != package}


def test_no_import_cycle() -> None:
    """No tpfx module imports a module that imports it back: at run time, inside functions, or for types only
    (``TYPE_CHECKING``): the plan's views type it by a protocol, not by importing ``tpfx.plan``."""
    import networkx as nx

    g = nx.DiGraph()
    for path in [*sorted((ROOT / "tpfx").rglob("*.py")), *sorted(PASSES.rglob("*.py"))]:
        g.add_edges_from((_module_name(path), m) for m in _imports(path, typing=True))
    assert g.number_of_edges() > 50
    assert list(nx.simple_cycles(g)) == []


def test_tpfx_uses_only_the_passes_surface() -> None:
    """tpfx's modules import the compiler from ``tpfx.passes`` (its ``__all__``), never from its submodules."""
    import tpfx.passes

    bad = []
    for path in sorted((ROOT / "tpfx").glob("*.py")):
        for n in ast.walk(ast.parse(path.read_text())):
            if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("tpfx.passes"):
                names = {a.name for a in n.names} - set(tpfx.passes.__all__)
                if n.module != "tpfx.passes" or names:
                    bad.append(f"{path.name}:{n.lineno} from {n.module} import {sorted(names)}")
    assert not bad, bad


def test_the_plan_is_plain_data() -> None:
    """A plan's compared fields hold strings, numbers, tuples, lists and dicts (no graph nodes); the graph it
    came from is one explicit ``derivation``; nothing else is attached after construction; JSON round-trips."""
    import dataclasses
    import json

    import models

    import tpfx

    plan = tpfx.plan(models.llama(num_kv_heads=2, layers=1), 2)

    def plain(v: Any) -> bool:
        if isinstance(v, (str, int, float, bool, type(None))):
            return True
        if isinstance(v, (list, tuple)):
            return all(plain(x) for x in v)
        if isinstance(v, dict):
            return all(isinstance(k, str) and plain(x) for k, x in v.items())
        return dataclasses.is_dataclass(v) and plain(dataclasses.asdict(v))  # type: ignore[arg-type]

    fields = {f.name: f for f in dataclasses.fields(plan)}
    assert {n for n, f in fields.items() if not f.compare} == {"derivation", "context"}
    assert all(plain(getattr(plan, n)) for n, f in fields.items() if f.compare)
    text = plan.to_json()
    assert set(vars(plan)) == set(fields)  # no attribute set from outside
    again = tpfx.ShardingPlan.from_json(text)
    assert again == plan and again.derivation is None and again.to_json() == text
    assert json.loads(text)["context"] == plan.context  # computed once, kept


def test_stages_are_timed_by_the_runner() -> None:
    import models
    from tpfx.passes.normalize import CLEANUPS

    import tpfx

    timings: dict[str, float] = {}
    plan = tpfx.plan(models.llama(num_kv_heads=2, layers=1), 2, timings=timings)
    tpfx.emit_rank(plan, 1, timings)
    assert {"capture", "propagate", "build_plan", "emit", *(p.__name__ for p in CLEANUPS)} <= set(timings)
    assert all(v >= 0 for v in timings.values()) and timings["capture"] > 0


def test_stages_pause_the_garbage_collector_and_restore_it() -> None:
    import gc

    from tpfx.passes import Stages

    assert gc.isenabled()
    assert Stages().timed("x", gc.isenabled) is False  # paused inside a stage
    assert gc.isenabled()
    gc.disable()
    try:  # a caller that paused it keeps it paused
        Stages().timed("x", gc.isenabled)
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_emission_adds_exactly_the_planned_backward_collectives() -> None:
    """``backward_collectives`` is what emission builds: per rank, one ``reduce_grad`` per Megatron f and per
    weight with replica groups, one ``gather_seq`` per sequence-parallel gather (GQA at t=4: KV heads whole)."""
    from collections import Counter

    import models
    from tpfx.passes import backward_collectives, collective_nodes
    from tpfx.passes.collectives import gather_seq, reduce_grad, reduce_grad_spans

    import tpfx

    for model, sp in ((models.llama(num_kv_heads=2, layers=2), False), (models.llama(num_kv_heads=2, layers=2), True),
                      (models.gpt2(layers=1), True)):
        plan = tpfx.plan(model, 4, sequence_parallel=sp)
        assert plan.derivation is not None
        planned = Counter(c.via for c in backward_collectives(plan.derivation.gm, plan.derivation.prop))
        assert planned["f" if not sp else "gather_seq"] > 0 and (sp or planned["replicas"] > 0)
        for rank in (0, 3):
            emitted = Counter(n.target for _, n in collective_nodes(tpfx.emit_rank(plan, rank)))
            assert emitted[gather_seq] == planned["gather_seq"]
            assert emitted[reduce_grad] + emitted[reduce_grad_spans] == planned["f"] + planned["replicas"]
