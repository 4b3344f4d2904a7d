"""Parameters as DTensors on the tensor-parallel mesh.

A ``ShardedModule`` registers each parameter whose tpfx layout has an exact DTensor placement as a DTensor
on the tp mesh, holding this rank's slice as its local tensor (no copy): torch's own
``clip_grad_norm_``, optimizers, ``fully_shard`` and ``replicate`` then see the full parameter and give
the unsharded model's numbers. The mapping (``dtensor_placement``):

- ``Replicate`` -> ``Replicate()``;
- one segment split over all ranks in ``torch.chunk``'s sizes -> ``Shard(dim)``;
- several equal segments each split over all ranks evenly (GPT-2's fused ``c_attn``) -> ``_StridedShard(dim,
  split_factor=segments)``: every rank holds its chunk of each segment, which is what a strided shard is.

- a tensor split into k < world chunks, each held by one group of consecutive ranks (two KV heads on four
  ranks) -> ``(Shard(dim), Replicate())`` on the tp mesh viewed as k groups (``dtensor_layout``,
  ``grouped_mesh``). torch's ``clip_grad_norm_`` refuses DTensors on two meshes; transformers' Trainer and
  accelerate take one norm per mesh, which is exact.

Layouts DTensor cannot express stay plain tensors holding this rank's slice: parts held whole next to split
ones (Falcon's multi-query k/v), segments of different sizes or group counts. torch's ``clip_grad_norm_`` then
raises on the mix of DTensors and tensors (never a silently local norm) and ``tpfx.clip_grad_norm_`` is the
exact path; ``auto_shard`` warns once naming them.

The per-rank graphs take the parameters as leading inputs (``params_as_inputs``) and ``ParamFeeder`` passes
the module's parameters as registered at call time, DTensors as their local tensors (``to_local`` is
differentiable: gradients arrive as DTensors with the parameter's placement). A wrapper that swaps the
registered parameters for its own (FSDP2's ``fully_shard`` all-gathers them into unsharded DTensors on the
tp mesh before each forward) is then computed with, not bypassed.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import fx
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.distributed.tensor import Replicate as DReplicate
from torch.distributed.tensor import Shard as DShard
from torch.distributed.tensor.placement_types import Placement as DPlacement
from torch.distributed.tensor.placement_types import _StridedShard
from torch.utils._pytree import tree_structure, tree_unflatten

from tpfx.passes import Placement, Replicate, Shard

__all__ = ["dtensor_placement", "dtensor_layout", "grouped_mesh", "tp_mesh", "as_dtensor", "local", "params_as_inputs", "ParamFeeder", "ShardedParameter", "mark"]


def _chunk_sizes(size: int, world: int) -> list[int]:
    """Local sizes of ``torch.chunk`` (DTensor's ``Shard``) of ``size`` over ``world`` ranks."""
    step = math.ceil(size / world) if size else 0
    return [max(0, min(step, size - r * step)) for r in range(world)]


def dtensor_placement(pl: Placement, world: int) -> DPlacement | None:
    """The DTensor placement on a 1-D mesh of ``world`` ranks that lays a tensor out exactly as tpfx's
    ``pl`` does, or ``None`` where there is none."""
    if isinstance(pl, Replicate):
        return DReplicate()
    if not isinstance(pl, Shard) or not pl.split_by(world):
        return None
    if len(pl.segs) == 1:
        seg = pl.segs[0]
        fits = [pl.local_size(r, world) for r in range(world)] == _chunk_sizes(seg, world)
        return DShard(pl.dim) if fits else None
    if len(set(pl.segs)) == 1 and pl.segs[0] % world == 0 and not pl.uneven:  # uneven whole heads: not strided
        return _StridedShard(pl.dim, split_factor=len(pl.segs))
    return None


def dtensor_layout(pl: Placement, world: int) -> tuple[int, tuple[DPlacement, ...]] | None:
    """``(k, placements)``: the layout ``pl`` as DTensor placements on the tp mesh of ``world`` ranks viewed as
    ``k`` groups of ``world // k`` consecutive ranks, or ``None``. ``k == world`` is the 1-D mesh
    (``dtensor_placement``); a tensor split into ``k < world`` chunks, each held by the ``world // k`` ranks of
    one group (KV heads replicated within groups), is ``(Shard-like, Replicate())`` on the 2-D view."""
    flat = dtensor_placement(pl, world)
    if flat is not None:
        return world, (flat,)
    if not isinstance(pl, Shard) or pl.sgroups is not None or pl.groups >= world or world % pl.groups:
        return None
    k = pl.groups
    outer = dtensor_placement(Shard(pl.dim, k, pl.segs, unit=pl.unit), k)  # rank r holds chunk r // (world // k)
    return (k, (outer, DReplicate())) if outer is not None else None


def grouped_mesh(mesh: DeviceMesh, k: int) -> DeviceMesh:
    """The 1-D tp ``mesh`` viewed as ``k`` groups of consecutive ranks (a 2-D mesh under the same root, so
    FSDP2 and DCP see one family of meshes). Collective the first time: every rank calls it in the same order."""
    name = (mesh.mesh_dim_names or ("tp",))[0]
    return mesh._unflatten(0, (k, mesh.size() // k), (f"{name}_groups{k}", f"{name}_within{k}"))


def tp_mesh(group: dist.ProcessGroup | None, device: torch.device) -> DeviceMesh:
    """A 1-D ``DeviceMesh`` over the tensor-parallel group (the world when ``group`` is None)."""
    pg = group if group is not None else dist.group.WORLD
    assert pg is not None, "tpfx: no process group"
    return DeviceMesh.from_group(pg, device.type, mesh_dim_names=("tp",))


class ShardedParameter(DTensor):
    """A DTensor parameter whose ``.data = value`` takes effect. torch's DTensor ignores it silently (the local
    tensor stays), which would drop ``p.data = t`` and ``torch.nn.utils.vector_to_parameters``. ``value`` is
    the new full tensor, as for the unsharded parameter: a DTensor (redistributed to this parameter's
    placements) or a plain tensor of the full shape (each rank keeps its slice; no communication)."""

    __slots__ = ()

    @property  # type: ignore[override]
    def data(self) -> torch.Tensor:
        return torch._C.TensorBase.data.__get__(self)  # type: ignore[attr-defined]

    @data.setter
    def data(self, value: torch.Tensor) -> None:
        from torch.distributed.tensor import distribute_tensor

        if not isinstance(value, DTensor):
            if tuple(value.shape) != tuple(self.shape):
                raise ValueError(f"tpfx: .data = a tensor of shape {tuple(value.shape)} on a parameter of full shape "
                                 f"{tuple(self.shape)} (give the full tensor: each rank keeps its slice)")
            value = distribute_tensor(value.detach().to(self._local_tensor.device), self.device_mesh, self.placements,
                                      src_data_rank=None)
        elif value.placements != self.placements or value.device_mesh != self.device_mesh:
            value = value.redistribute(self.device_mesh, self.placements)
        torch._C.TensorBase.data.__set__(self, value)  # type: ignore[attr-defined]
        self._local_tensor, self._spec = value._local_tensor, value._spec

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        """As DTensor (torch functions run on the DTensor); a conversion (``.to()``, ``.double()``, ...) gives a
        ShardedParameter, so the parameter a module's ``.to()`` swaps in keeps this class."""
        with torch._C.DisableTorchFunctionSubclass():
            out = func(*args, **(kwargs or {}))
        return mark(out) if func in _CONVERSIONS else out

    def detach(self) -> Any:  # type: ignore[override]
        """A ShardedParameter, as ``nn.Parameter`` requires of a parameter's class (``.to()`` / ``.float()`` that
        convert nothing hand the parameter itself back to ``Parameter``)."""
        return mark(super().detach())

    def __deepcopy__(self, memo: dict[int, Any]) -> Any:
        if id(self) not in memo:
            dt = DTensor.from_local(self._local_tensor.clone(), self.device_mesh, self.placements, run_check=False,
                                    shape=self.shape, stride=self.stride())
            copy_ = torch.nn.Parameter(dt, requires_grad=self.requires_grad) if isinstance(self, torch.nn.Parameter) \
                else dt.requires_grad_(self.requires_grad)
            memo[id(self)] = mark(copy_)
        return memo[id(self)]


_CONVERSIONS = {torch.Tensor.to, torch.Tensor.double, torch.Tensor.float, torch.Tensor.half, torch.Tensor.bfloat16,
                torch.Tensor.cpu, torch.Tensor.cuda, torch.Tensor.type}


def mark(param: Any) -> Any:
    """``param`` as a ``ShardedParameter`` if it is a DTensor (after torch swapped its class, ``.to()``)."""
    if type(param) is DTensor:
        param.__class__ = ShardedParameter
    return param


def as_dtensor(param: torch.nn.Parameter, pls: Sequence[DPlacement], mesh: DeviceMesh,
               shape: Sequence[int]) -> torch.nn.Parameter:
    """``param`` (this rank's slice) as a DTensor parameter of the full ``shape``, sharing its storage."""
    stride = torch.empty(tuple(shape), device="meta").stride()
    dt = DTensor.from_local(param.detach(), mesh, list(pls), run_check=False, shape=torch.Size(shape),
                            stride=stride)
    return mark(torch.nn.Parameter(dt, requires_grad=param.requires_grad))


def local(t: Any) -> Any:
    """A DTensor's local tensor, anything else as it is. Differentiable (``to_local``) where autograd records
    ``t``; otherwise the local tensor itself, so in-place updates of it (clipping a gradient) reach ``t``."""
    if not isinstance(t, DTensor):
        return t
    return t.to_local() if t.requires_grad and torch.is_grad_enabled() else t._local_tensor


def params_as_inputs(gm: fx.GraphModule, targets: Sequence[str]) -> fx.GraphModule:
    """A copy of ``gm`` (an exported per-rank graph) that takes the attributes ``targets`` (its parameters)
    as leading positional inputs instead of reading them from itself."""
    graph = copy.deepcopy(gm.graph)
    info = graph._codegen.pytree_info  # type: ignore[attr-defined]
    args_spec, kwargs_spec = info.in_spec.children()
    index = {t: i for i, t in enumerate(targets)}
    first = next(iter(graph.nodes))
    with graph.inserting_before(first):
        inputs = [graph.placeholder(f"tpfx_param_{i}") for i in range(len(targets))]
    for node in list(graph.nodes):
        if node.op == "get_attr" and node.target in index:
            node.replace_all_uses_with(inputs[index[node.target]])
            graph.erase_node(node)
    args = tuple(tree_unflatten([0] * args_spec.num_leaves, args_spec))
    kwargs = tree_unflatten([0] * kwargs_spec.num_leaves, kwargs_spec)
    in_spec = tree_structure(((0,) * len(targets) + args, kwargs))
    names = [n.name for n in inputs]
    graph._codegen.pytree_info = info._replace(orig_args=names + list(info.orig_args),  # type: ignore[attr-defined]
                                                in_spec=in_spec)
    out = fx.GraphModule(gm, graph, class_name=type(gm).__name__)  # copies what the graph still reads
    out.graph.lint()
    return out


class ParamFeeder:
    """Calls a graph from ``params_as_inputs`` with the tensors registered at ``slots`` ((a module's
    ``_parameters`` or ``_buffers``, name) pairs) as they are at call time."""

    def __init__(self, fn: Any, slots: Sequence[tuple[dict[str, Any], str]]) -> None:
        self.fn, self.slots = fn, list(slots)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        params = [local(where[name]) for where, name in self.slots]
        return self.fn(*params, *args, **kwargs)
