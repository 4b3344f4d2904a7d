"""Per-rank, resumable checkpoints through ``torch.distributed.checkpoint`` (DCP): ``save`` and ``load``.

Each rank writes and reads only its own slices, and a checkpoint saved at one world size loads at another:
DCP stores every tensor as chunks with their offsets in the full tensor and, on load, reads whatever
overlaps the chunks a rank asks for. What tpfx adds is the description of a rank's chunks, since its
layouts are not all DTensor placements: a fused projection split per part (``c_attn``'s q, k and v) is one
chunk per part, a part held whole (Falcon's single key/value head) or a KV head replicated within a group
is a chunk several ranks hold (DCP's de-duplication keeps one copy), and uneven splits are chunks of
their own lengths. The planners below replace DCP's default description of a plain local tensor (which
DCP takes for a replicated, full tensor and de-duplicates, losing every rank's slice but one) by those
chunks; storage, metadata, de-duplication and resharding are DCP's own.

Optimizer state goes through ``torch.distributed.checkpoint.state_dict`` (keys by parameter FQN, lazily
created state initialized first); a moment tensor laid out like its parameter gets its parameter's chunks.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import (
    DefaultLoadPlanner,
    DefaultSavePlanner,
    create_default_local_load_plan,
)
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlan, WriteItem, WriteItemType
from torch.distributed.checkpoint.planner_helpers import TensorWriteData, create_read_items_for_chunk_list
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from tpfx.dtensor_params import local
from tpfx.passes import Shard

if TYPE_CHECKING:
    from tpfx.runtime.interface import Sharded as ShardedModule

__all__ = ["save", "load"]


@dataclass(frozen=True)
class Chunks:
    """Where a rank's local tensor sits in the full one: pieces along ``dim`` as (global start, length,
    local start), in local order."""

    dim: int
    shape: tuple[int, ...]
    pieces: tuple[tuple[int, int, int], ...]

    def offsets(self, start: int) -> torch.Size:
        return torch.Size(start if d == self.dim else 0 for d in range(len(self.shape)))

    def sizes(self, n: int) -> torch.Size:
        return torch.Size(n if d == self.dim else s for d, s in enumerate(self.shape))

    def metadata(self) -> list[ChunkStorageMetadata]:
        return [ChunkStorageMetadata(self.offsets(s), self.sizes(n)) for s, n, _ in self.pieces]

    def local_view(self, local: torch.Tensor, offset: torch.Size) -> torch.Tensor:
        for s, n, ls in self.pieces:
            if self.offsets(s) == offset:
                return local.narrow(self.dim, ls, n)
        raise KeyError(f"no local chunk at offset {tuple(offset)}")


def _chunks_of(sharded: ShardedModule) -> dict[str, Chunks]:
    """FQN -> this rank's chunks, for every parameter that is split (replicated ones are plain tensors)."""
    out: dict[str, Chunks] = {}
    for fqn, pp in sharded.plan.placements.items():
        pl = sharded.placement(fqn)
        if isinstance(pl, Shard):
            out[fqn] = Chunks(pl.dim, tuple(pp.shape), tuple(pl.pieces(sharded.rank, sharded.world_size)))
    return out


def _state(sharded: ShardedModule, optimizer: torch.optim.Optimizer | None) -> tuple[dict[str, Any],
                                                                                      dict[str, Chunks],
                                                                                      dict[str, Any]]:
    """The flat state dict DCP sees ("model.<fqn>", "optim.state.<fqn>.<name>", "optim.param_groups..."),
    the chunks of every split entry and the DTensors whose local tensors the state holds. Tensors are this
    rank's own (loads write into them in place)."""
    sharded.check_own_params("tpfx.save / tpfx.load")
    sharded.sync()
    chunks = _chunks_of(sharded)
    state: dict[str, Any] = {}
    layouts: dict[str, Chunks] = {}
    wrapped: dict[str, Any] = {}
    params = {fqn: local(p.detach()) for fqn, p in sharded.named_parameters()}  # DTensors: their local slice
    for fqn, p in params.items():
        state[f"model.{fqn}"] = p
        if fqn in chunks:
            layouts[f"model.{fqn}"] = chunks[fqn]
    for fqn, b in sharded.persistent_buffers().items():  # held whole on every rank (running statistics)
        state[f"model.{fqn}"] = b
    if optimizer is not None:
        osd = get_optimizer_state_dict(cast(torch.nn.Module, sharded), optimizer,
                                       options=StateDictOptions(flatten_optimizer_state_dict=True))
        for key, value in osd.items():
            if (mine := local(value)) is not value:  # moments of DTensor parameters are DTensors: their chunks
                wrapped[f"optim.{key}"], value = value, mine
            state[f"optim.{key}"] = value
            owner = _state_param(key, params)
            if owner in chunks and isinstance(value, torch.Tensor) and value.shape == params[owner].shape:
                layouts[f"optim.{key}"] = chunks[owner]  # a moment laid out like its parameter
    return state, layouts, wrapped


def _state_param(key: str, params: dict[str, Any]) -> str:
    """The parameter FQN of a flattened optimizer key ``state.<fqn>.<name>`` ('' for other keys)."""
    owner = key[len("state."):].rpartition(".")[0] if key.startswith("state.") else ""
    return owner if owner in params else ""


class _SavePlanner(DefaultSavePlanner):
    """DCP's default save planner, with split entries written as their chunks by every rank."""

    def __init__(self, layouts: dict[str, Chunks]) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.layouts = layouts

    def create_local_plan(self) -> Any:
        plan = super().create_local_plan()
        items = [it for it in plan.items if it.index.fqn not in self.layouts]
        for key, ch in self.layouts.items():
            local = self.state_dict[key]
            props = TensorProperties.create_from_tensor(local)
            for md in ch.metadata():
                items.append(WriteItem(index=MetadataIndex(key, md.offsets), type=WriteItemType.SHARD,
                                       tensor_data=TensorWriteData(chunk=md, properties=props,
                                                                   size=torch.Size(ch.shape))))
        self.plan = type(plan)(items, planner_data=plan.planner_data, usable=plan.usable)
        return self.plan

    def lookup_object(self, index: MetadataIndex) -> Any:
        if index.fqn in self.layouts:
            assert index.offset is not None
            return self.layouts[index.fqn].local_view(self.state_dict[index.fqn], index.offset).contiguous()
        return super().lookup_object(index)


class _LoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, with split entries read chunk by chunk into this rank's tensors."""

    def __init__(self, layouts: dict[str, Chunks]) -> None:
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self.layouts = layouts

    def create_local_plan(self) -> LoadPlan:
        assert self.metadata is not None
        md = self.metadata.state_dict_metadata
        plain = {k: v for k, v in self.state_dict.items() if k not in self.layouts}
        plan = create_default_local_load_plan(plain, self.metadata, not self.allow_partial_load)
        items = list(plan.items)
        for key, ch in self.layouts.items():
            saved = md.get(key)
            if not isinstance(saved, TensorStorageMetadata):
                raise RuntimeError(f"tpfx.load: the checkpoint has no tensor {key!r}")
            if tuple(saved.size) != ch.shape:
                raise ValueError(f"tpfx.load: {key!r} has shape {list(saved.size)} in the checkpoint, "
                                 f"{list(ch.shape)} in the model")
            items += create_read_items_for_chunk_list(key, saved, ch.metadata())
        return LoadPlan(items)

    def lookup_tensor(self, index: MetadataIndex) -> torch.Tensor:
        if index.fqn in self.layouts:
            assert index.offset is not None
            return self.layouts[index.fqn].local_view(self.state_dict[index.fqn], index.offset)
        return super().lookup_tensor(index)


def save(sharded: ShardedModule, path: str | os.PathLike, *, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Save this rank's parameters and persistent buffers (and ``optimizer``'s state) to the DCP checkpoint directory ``path``.
    Collective: every rank of the group calls it; each writes only its own slices."""
    state, layouts, _ = _state(sharded, optimizer)
    dcp.save(state, checkpoint_id=str(path), planner=_SavePlanner(layouts), process_group=sharded.group)


def load(sharded: ShardedModule, path: str | os.PathLike, *, optimizer: torch.optim.Optimizer | None = None) -> None:
    """Load a checkpoint written by ``save`` at any world size into ``sharded`` (and ``optimizer``), in place.
    Collective: every rank of the group calls it; each reads only what overlaps its own slices."""
    if not (Path(path) / ".metadata").is_file():  # checked by every rank before any collective
        raise FileNotFoundError(f"tpfx.load: {str(path)!r} is not a tpfx.save checkpoint (no .metadata file)")
    state, layouts, wrapped = _state(sharded, optimizer)
    dcp.load(state, checkpoint_id=str(path), planner=_LoadPlanner(layouts), process_group=sharded.group)
    if optimizer is not None:  # loaded into the local tensors in place: hand torch back the DTensors
        osd = {k[len("optim."):]: wrapped.get(k, v) for k, v in state.items() if k.startswith("optim.")}
        set_optimizer_state_dict(cast(torch.nn.Module, sharded), optimizer, osd,
                                 options=StateDictOptions(flatten_optimizer_state_dict=True))
    if dist.is_initialized():
        dist.barrier(sharded.group)
