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

from tpfx.passes import collective_nodes, module_of, set_failure_message

_ASSIGN = re.compile(r"^\s*(\w+)\s*=")

ROLL_CALL_S = 2.0  # how long ranks wait for each other to check in after a failed collective
_rolls: dict[str, int] = {}


def _silent_ranks(group: str, wait_s: float) -> list[int] | str | None:
    """After a failed collective of ``group``, every rank that reaches its failure checks in on the process
    group's store; the group ranks that have not checked in after ``wait_s`` seconds (dead, or stuck outside
    this collective). A string where the store itself is gone; None where there is no group or store to ask."""
    import time

    from torch.distributed import distributed_c10d as c10d_

    try:
        pg = c10d_._resolve_process_group(group)  # type: ignore[arg-type]
        ranks, store = dist.get_process_group_ranks(pg), c10d_._get_default_store()
    except Exception:  # noqa: BLE001 - no process group (a simulated one), or torch moved its internals
        return None
    n = _rolls[group] = _rolls.get(group, -1) + 1  # the n-th failure on this group: same on every survivor
    keys = {r: f"tpfx/roll_call/{group}/{n}/{r}" for r in ranks}
    try:
        store.set(keys[dist.get_rank()], "1")
        deadline = time.monotonic() + wait_s
        while True:
            silent = [dist.get_group_rank(pg, r) for r in ranks if not store.check([keys[r]])]
            if not silent or time.monotonic() >= deadline:
                return silent
            time.sleep(0.05)
    except Exception as e:  # noqa: BLE001 - the store's host is gone too
        return f"the group's store is unreachable ({type(e).__name__}): the process hosting it (rank 0 or the launcher) died"


def peers_note(group: str | None, wait_s: float = ROLL_CALL_S) -> str:
    """Which ranks of ``group`` did not check in after a failure (a roll call on the store, ``wait_s`` at most)."""
    found = _silent_ranks(group, wait_s) if group else None
    if found is None:
        return ""
    if isinstance(found, str):
        return f"; {found}"
    if not found:
        return "; every rank of the group reached a failed collective (none died: see the first rank's error)"
    return (f"; rank{'s' if len(found) > 1 else ''} {', '.join(map(str, found))} of the group did not check in within "
            f"{wait_s:g} s: dead, or stuck outside this collective")


def failure_message(rank: int, what: str, error: BaseException, group: str | None = None) -> str:
    """``what`` (a collective, where it sits) failed on ``rank``: the backend's first line, the ranks of
    ``group`` that did not answer a roll call (``peers_note``), and why it happens."""
    first = (str(error).strip().splitlines() or [""])[0]
    return (f"tpfx: rank {rank}: {what} failed: {type(error).__name__}: {first}{peers_note(group)} (a peer rank "
            "died or stalled; with tpfx.launch the failing rank's own error is reported first)")


set_failure_message(failure_message)  # what a failed backward collective of the compiled graphs says


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
