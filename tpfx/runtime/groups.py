"""Process groups and meshes of a sharded module: the tensor-parallel group from a mesh axis, the subgroups a
plan's replica groups need (created once, in the same order on every rank), and the check that every rank
derived the same plan."""

from __future__ import annotations

import datetime
from typing import Any

import torch.distributed as dist

from tpfx.passes import Shard
from tpfx.plan import ShardingPlan

LAUNCH_HINT = ("tpfx.auto_shard needs an initialized process group: launch with "
               "`torchrun --nproc-per-node N script.py` and call `torch.distributed.init_process_group('gloo')`, "
               "or run your function with `tpfx.launch(fn, world_size)`.")


def group_namer(group: dist.ProcessGroup | None, world: int, timeout: float | None = None) -> Any:
    """Map a tuple of (group-local) ranks to a process-group name, creating subgroups as needed (with
    ``timeout`` seconds, if given). Every rank creates every subgroup of the plan in the same order
    (``new_group`` is collective)."""
    base = group or dist.group.WORLD
    names: dict[tuple[int, ...], str] = {tuple(range(world)): base.group_name}  # type: ignore[union-attr]
    globals_ = dist.get_process_group_ranks(base)

    def name(ranks: tuple[int, ...]) -> str:
        if ranks not in names:
            raise KeyError(ranks)
        return names[ranks]

    def prepare(all_groups: list[tuple[int, ...]]) -> None:
        for ranks in sorted(set(all_groups)):
            if ranks not in names:
                limit = None if timeout is None else datetime.timedelta(seconds=timeout)
                pg = dist.new_group([globals_[r] for r in ranks], timeout=limit)  # collective: every rank calls it
                if isinstance(pg, dist.ProcessGroup):  # non-members get a sentinel
                    names[ranks] = pg.group_name

    name.prepare = prepare  # type: ignore[attr-defined]
    return name


def replica_groups(plan: ShardingPlan) -> list[tuple[int, ...]]:
    t = plan.world_size
    out: set[tuple[int, ...]] = set()
    for p in plan.placements.values():
        pl = p.as_placement()
        if isinstance(pl, Shard):  # every rank's replica group of every segment held by several ranks
            out |= {ranks for r in range(t) for ranks in pl.replica_groups(r, t) if len(ranks) > 1}
    return sorted(out)


def tp_group(mesh: Any, tp_axis: str, group: dist.ProcessGroup | None) -> dist.ProcessGroup | None:
    """The tensor-parallel process group: ``mesh``'s ``tp_axis`` when a mesh is given, else ``group``."""
    if mesh is None:
        return group
    if group is not None:
        raise ValueError("tpfx: pass either mesh= (with tp_axis=) or group=, not both")
    names = tuple(mesh.mesh_dim_names or ())
    if tp_axis not in names:
        raise ValueError(f"tpfx: the mesh has no axis named {tp_axis!r} (its axes: {names}); create it with "
                         f"init_device_mesh(..., mesh_dim_names=(..., {tp_axis!r})) or pass tp_axis=")
    return mesh[tp_axis].get_group()


def check_agreement(plan: ShardingPlan, group: dist.ProcessGroup | None) -> None:
    """Every rank must have derived the same plan; raise (on every rank) instead of hanging later."""
    digests: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(digests, plan.digest(), group=group)
    if len(set(digests)) != 1:
        raise RuntimeError(f"tpfx: ranks derived different sharding plans (digests by rank: {digests}); "
                           "every rank must build the same model and call auto_shard with the same arguments")
