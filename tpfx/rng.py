"""Random ops on sharded parameters (``torch.nn.init`` on a DTensor) on a CPU mesh.

DTensor draws random numbers for a sharded tensor through an RNG tracker; torch ships one for CUDA-like
devices only (``OffsetBasedRNGTracker``: each rank its slice of one full draw, by Philox offsets). On a CPU
mesh it has none and runs the op on each rank's local tensor: ranks seeded alike fill every slice of a split
weight with the *same* numbers (the full tensor is t copies of one chunk), and ranks seeded differently make
the replicas of a replicated weight differ.

``CpuTracker`` is the equivalent scheme for CPU's Mersenne Twister, which has no offsets: before each random op
on a DTensor, the mesh agrees on one 63-bit draw from the first rank's generator (one small broadcast; every
rank's generator then advances alike), and each rank draws its local tensor from a generator seeded with that
draw and the coordinates of the shard it holds. Distinct shards get independent streams, replicas of one shard
the same numbers, and each element has the op's distribution, as in the unsharded init (not the same numbers:
those come from one stream drawn in full, and the default generator advances by one draw here, by the
tensor's size there, so later draws differ from the unsharded run's too). Random ops are collectives here, like
every op on a sharded model: every rank of the mesh makes them in the same order.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.tensor import _random


class CpuTracker(_random._RNGStateTracker):
    """DTensor's RNG tracker for CPU meshes (see the module docstring)."""

    def __init__(self) -> None:  # noqa: D107 - torch's __init__ refuses CPU: set its one field
        self._device = torch.device("cpu")
        self._device_handle = None
        self._use_distribute_region = True

    @contextlib.contextmanager
    def _distribute_region(self, spec: Any, generator: torch.Generator | None = None) -> Iterator[None]:
        gen = generator if generator is not None else torch.default_generator
        mesh = spec.mesh
        base = torch.randint(0, 2**62, (1,), generator=gen)  # every rank's generator advances alike
        group = mesh.get_group(0) if mesh.ndim == 1 else None
        if dist.is_initialized() and mesh.size() > 1:
            src = dist.get_global_rank(group, 0) if group is not None else int(mesh.mesh.flatten()[0])
            dist.broadcast(base, src, group=group if group is not None else _flat_group(mesh))
        coord = mesh.get_coordinate() or []
        shard = tuple((i, int(coord[i])) for i, p in enumerate(spec.placements) if p.is_shard())
        seed = int.from_bytes(hashlib.sha256(repr((int(base), shard)).encode()).digest()[:7], "big")
        saved = gen.get_state()
        gen.manual_seed(seed)
        try:
            yield
        finally:
            gen.set_state(saved)


_GROUPS: dict[tuple[int, ...], Any] = {}


def _flat_group(mesh: Any) -> Any:
    """A process group over every rank of a multi-dimensional mesh (made once per set of ranks)."""
    ranks = tuple(int(r) for r in mesh.mesh.flatten().tolist())
    if ranks not in _GROUPS:
        _GROUPS[ranks] = dist.new_group(list(ranks), use_local_synchronization=True)
    return _GROUPS[ranks]


def install(device: torch.device) -> None:
    """Make DTensor's random ops on CPU meshes draw as ``CpuTracker`` does (where no tracker is set yet)."""
    if device.type == "cpu" and _random._rng_tracker is None:
        _random._rng_tracker = CpuTracker()
