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

from tpfx.passes import collective_nodes, failure_message, module_of

_ASSIGN = re.compile(r"^\s*(\w+)\s*=")


def failed_collective(error: BaseException, gm: fx.GraphModule) -> tuple[str, fx.Node] | None:
    """(kind, node) of the collective of ``gm`` whose generated line raised ``error`` (innermost such frame)."""
    by_name = {n.name: (kind, n) for kind, n in collective_nodes(gm)}
    for frame in reversed(traceback.extract_tb(error.__traceback__)):
        if frame.filename.startswith("<eval_with_key>"):
            m = _ASSIGN.match(frame.line or "")
            return by_name.get(m.group(1)) if m else None
    return None


def describe_failure(error: BaseException, gm: fx.GraphModule, rank: int) -> str | None:
    """A message naming the collective, the node it follows and that node's module; None if ``error`` did
    not come from a collective of ``gm``."""
    found = failed_collective(error, gm)
    if found is None:
        return None
    kind, node = found
    src = node.all_input_nodes[0] if node.all_input_nodes else None
    after = f" after {src.name} ({module_of(src) or 'the model'})" if src is not None else ""
    group = next((a for a in reversed(node.args) if isinstance(a, str)), None)  # the collective's group name
    return failure_message(rank, f"{kind} {node.name}{after}", error, group)


def set_timeout(group: Any, seconds: float) -> None:
    """Bound every wait of ``group``'s collectives (torch's own setter; it is not in torch's public API yet)."""
    from torch.distributed.distributed_c10d import _set_pg_timeout

    if seconds <= 0:
        raise ValueError(f"tpfx: timeout must be positive seconds, got {seconds}")
    _set_pg_timeout(datetime.timedelta(seconds=seconds), group or dist.group.WORLD)
