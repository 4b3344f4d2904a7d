"""Simulated ranks: run the t per-rank graphs of a plan in one process, no process group (test tier 2).

Each rank's emitted GraphModule runs on its own thread; the functional collectives its Megatron autograd
pairs call (``torch.ops._c10d_functional.all_reduce`` / ``all_gather_into_tensor`` / ``reduce_scatter_tensor``)
are swapped for a rendezvous over the threads' tensors, keyed by the group name emission wrote
(``"fake:0,2"`` names global ranks 0 and 2). Forward and backward run exactly the code a real rank runs,
collectives included, so ``run_ranks`` reassembles what t processes would compute, in milliseconds.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from tpfx.passes import collectives
from tpfx.passes.emit import emit

TIMEOUT_S = 60.0


class _Rendezvous:
    """The collectives of one simulated world: the k-th call on a group waits for every member's k-th call."""

    def __init__(self) -> None:
        self.cv = threading.Condition()
        self.slots: dict[tuple[str, int], dict[int, torch.Tensor]] = {}
        self.calls: dict[tuple[str, int], int] = {}  # (group, global rank) -> calls made
        self.local = threading.local()
        self.failed: BaseException | None = None

    def exchange(self, x: torch.Tensor, group: str) -> tuple[list[torch.Tensor], int]:
        """Every member's tensor for this call, in group order, and this rank's index in the group."""
        ranks = [int(r) for r in group.removeprefix("fake:").split(",")]
        me = self.local.rank
        k = self.calls.get((group, me), 0)
        self.calls[(group, me)] = k + 1
        key = (group, k)
        with self.cv:
            self.slots.setdefault(key, {})[me] = x.detach().clone()
            self.cv.notify_all()
            ok = self.cv.wait_for(lambda: self.failed is not None or len(self.slots[key]) == len(ranks), TIMEOUT_S)
            if self.failed is not None:
                raise RuntimeError("simulate: another rank failed") from self.failed
            if not ok:
                raise TimeoutError(f"simulate: rank {me} waited {TIMEOUT_S}s on {group} call {k}")
            got = [self.slots[key][r] for r in ranks]
        return got, ranks.index(me)

    def fail(self, e: BaseException) -> None:
        with self.cv:
            self.failed = e
            self.cv.notify_all()


_REDUCE: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "sum": lambda x: x.sum(0), "max": lambda x: x.amax(0), "min": lambda x: x.amin(0)}


class _SimOps:
    """The subset of ``torch.ops._c10d_functional`` the collectives call, over a rendezvous."""

    def __init__(self, world: _Rendezvous) -> None:
        self.world = world

    def all_reduce(self, x: torch.Tensor, op: str, group: str) -> torch.Tensor:
        got, _ = self.world.exchange(x, group)
        return _REDUCE[op](torch.stack(got))

    def all_gather_into_tensor(self, x: torch.Tensor, size: int, group: str) -> torch.Tensor:
        got, _ = self.world.exchange(x, group)
        assert len(got) == size, (len(got), size)
        return torch.cat(got, 0)

    def reduce_scatter_tensor(self, x: torch.Tensor, op: str, size: int, group: str) -> torch.Tensor:
        assert op == "sum", op
        got, me = self.world.exchange(x, group)
        return torch.stack(got).sum(0).chunk(size, 0)[me].clone()

    def wait_tensor(self, x: torch.Tensor) -> torch.Tensor:
        return x


@contextmanager
def _simulated(world: _Rendezvous) -> Iterator[None]:
    saved = collectives.c10d
    collectives.c10d = _SimOps(world)  # type: ignore[assignment]
    try:
        yield
    finally:
        collectives.c10d = saved


def emit_all(plan: Any) -> list[tuple[torch.fx.GraphModule, dict[str, torch.nn.Parameter]]]:
    """Every rank's graph and its local parameters by FQN (as ``ShardedModule`` installs them)."""
    out = []
    for rank in range(plan.world_size):
        store: dict[str, torch.nn.Parameter] = {}
        gm = emit(plan.derivation.gm, plan.derivation.prop, rank, lambda ranks: "fake:" + ",".join(map(str, ranks)), store)
        out.append((gm, store))
    return out


def run_ranks(world_size: int, body: Callable[[int], Any]) -> list[Any]:
    """``body(rank)`` on one thread per rank with simulated collectives; results in rank order. An exception
    on any rank wakes the others and is re-raised here (the first one, naming its rank)."""
    world = _Rendezvous()
    results: list[Any] = [None] * world_size
    errors: list[tuple[int, BaseException]] = []

    def run(rank: int) -> None:
        world.local.rank = rank
        try:
            results[rank] = body(rank)
        except BaseException as e:  # noqa: BLE001  (re-raised below, with the rank)
            errors.append((rank, e))
            world.fail(e)

    threads = [threading.Thread(target=run, args=(r,), daemon=True) for r in range(world_size)]
    with _simulated(world):
        for th in threads:
            th.start()
        for th in threads:
            th.join(TIMEOUT_S * 2)
    if errors:
        rank, e = errors[0]
        raise RuntimeError(f"simulated rank {rank} failed: {type(e).__name__}: {e}") from e
    if any(th.is_alive() for th in threads):
        raise TimeoutError("simulate: a rank did not finish")
    return results
