"""Faults made readable: a collective that fails (a peer died, a timeout) named by the graph node it is.

A rank's forward is one generated GraphModule; when gloo or NCCL raises inside one of its collectives, the
traceback runs through the generated code (``<eval_with_key>``), whose source line names the node. This module
turns that into ``tpfx: rank 0: all_reduce all_reduce_3 after linear_5 (model.layers.0.mlp.down_proj) failed``
with the backend's message kept as the cause. Anything else is left alone.
"""

from __future__ import annotations

import datetime
import re
import traceback
from typing import Any

import torch.distributed as dist
import torch.fx as fx

from tpfx.passes.emit import collective_nodes
from tpfx.report import module_of

_ASSIGN = re.compile(r"^\s*(\w+)\s*=")


def failed_collective(error: BaseException, gm: fx.GraphModule) -> fx.Node | None:
    """The collective node of ``gm`` whose generated line raised ``error`` (innermost such frame), if any."""
    kinds = {n.name: n for _, n in collective_nodes(gm)}
    for frame in reversed(traceback.extract_tb(error.__traceback__)):
        if frame.filename.startswith("<eval_with_key>"):
            m = _ASSIGN.match(frame.line or "")
            return kinds.get(m.group(1)) if m else None
    return None


def describe_failure(error: BaseException, gm: fx.GraphModule, rank: int) -> str | None:
    """A message naming the collective, the node it follows and that node's module; None if ``error`` did
    not come from a collective of ``gm``."""
    node = failed_collective(error, gm)
    if node is None:
        return None
    kind = dict((n, k) for k, n in collective_nodes(gm))[node]
    src = next((a for a in node.all_input_nodes), None)
    after = f" after {src.name} ({module_of(src) or 'the model'})" if src is not None else ""
    return (f"tpfx: rank {rank}: {kind} {node.name}{after} failed: {type(error).__name__}: "
            f"{str(error).strip().splitlines()[0] if str(error).strip() else ''} (a peer rank died or stalled; "
            "with tpfx.launch the failing rank's own error is reported first)")


def set_timeout(group: Any, seconds: float) -> None:
    """Bound every wait of ``group``'s collectives (torch's own setter; it is not in torch's public API yet)."""
    from torch.distributed.distributed_c10d import _set_pg_timeout

    if seconds <= 0:
        raise ValueError(f"tpfx: timeout must be positive seconds, got {seconds}")
    _set_pg_timeout(datetime.timedelta(seconds=seconds), group or dist.group.WORLD)
