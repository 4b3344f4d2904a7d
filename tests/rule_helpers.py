"""Tier-1 helpers shared by the rule tests (tests/test_rules.py, tests/test_nn_modules.py): operands, op contexts
and free parameters on shapes alone, no graph to capture and no process group."""

from __future__ import annotations

from typing import Any

import sympy
import torch
import torch.fx as fx
from tpfx.passes.placements import R
from tpfx.passes.rules import FreeParam, OpCtx, Operand, Result, lookup

I = sympy.Integer  # noqa: E741
STYLES = ("colwise", "rowwise", "vocab", "shard", "replicate")


def shape(s: Any) -> tuple:
    return tuple(I(x) if isinstance(x, int) else x for x in s)


def node(target: Any, args: tuple) -> fx.Node:
    return fx.Graph().create_node("call_function", target, args, {})


def op(s: Any, placement: Any = R, free: FreeParam | None = None, dtype: torch.dtype = torch.float32) -> Operand:
    return Operand(fx.Graph().placeholder("x"), shape(s), dtype, placement, free)


def ctx(target: Any, operands: list[Operand], out_shape: Any, args: Any = None, world: int = 2) -> OpCtx:
    """The context a rule sees; ``args`` default to the operands' nodes."""
    n = node(target, tuple(args) if args is not None else tuple(o.node for o in operands))
    out = [shape(s) for s in out_shape] if isinstance(out_shape, list) else shape(out_shape)
    return OpCtx(n, operands, world, out)


def free(fqn: str = "w", world: int = 2, styles: tuple[str, ...] = STYLES) -> FreeParam:
    return FreeParam(fqn, frozenset(styles), world)


def rule(target: Any, operands: list[Operand], out_shape: Any, args: Any = None, world: int = 2) -> Result:
    return lookup(target)(ctx(target, operands, out_shape, args, world))  # type: ignore[misc]
