"""Data parallelism around a sharded module: which batch each rank reads.

tpfx shards a model over the tensor-parallel axis of a ``DeviceMesh``; data parallelism over the other axis
is torch's own (``DistributedDataParallel`` over ``mesh["dp"].get_group()``). The rule for data: every rank
of one tensor-parallel group must see the same batch (they compute one model together), and the data-
parallel groups see different batches. ``dp_sampler`` is torch's ``DistributedSampler`` keyed by the
data-parallel coordinate of this rank, which gives exactly that.
"""

from __future__ import annotations

from typing import Any

from torch.utils.data import Dataset, DistributedSampler

__all__ = ["dp_sampler"]


def dp_sampler(dataset: Dataset, mesh: Any, dp_axis: str = "dp", **kwargs: Any) -> DistributedSampler:
    """A ``DistributedSampler`` over ``mesh``'s ``dp_axis``: ranks with the same data-parallel coordinate
    (one tensor-parallel group) get the same indices, in the same order. ``kwargs`` go to the sampler
    (``shuffle``, ``seed``, ``drop_last``)."""
    names = tuple(mesh.mesh_dim_names or ())
    if dp_axis not in names:
        raise ValueError(f"tpfx.dp_sampler: the mesh has no axis named {dp_axis!r} (its axes: {names})")
    sub = mesh[dp_axis]
    return DistributedSampler(dataset, num_replicas=sub.size(), rank=sub.get_local_rank(), **kwargs)
