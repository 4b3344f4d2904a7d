"""Public entry points: ``plan`` (no process group), ``auto_shard`` / ``shard_with`` (this rank's module),
``emit_rank`` and ``shard_tensor`` (inspection). The sharded module itself is ``tpfx.runtime``; how a model
becomes a plan, ``tpfx.derive``."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.fx as fx

from tpfx.derive import derive, examples, override_pins
from tpfx.inputs import hf_model
from tpfx.passes import CaptureError as CaptureError  # re-exported: tpfx.api.CaptureError
from tpfx.passes import Placement, Stages, local_param
from tpfx.plan import ShardingPlan
from tpfx.runtime import LAUNCH_HINT as LAUNCH_HINT
from tpfx.runtime import ShardedModule, sharded_class, tp_group
from tpfx.runtime.groups import check_agreement


def plan(model: torch.nn.Module, world_size: int, *, example_inputs: tuple | None = None,
         example_kwargs: dict[str, Any] | None = None, overrides: dict[str, str] | None = None,
         timings: dict[str, float] | None = None, sequence_parallel: bool = False,
         blocks: bool | None = None) -> ShardingPlan:
    """Derive the sharding plan for ``world_size`` ranks. Needs no process group; works on meta models.
    ``sequence_parallel``: split the residual stream by sequence between the sharded blocks (Megatron-SP).
    ``blocks``: capture a stack of layers through three layers of each kind and stitch the rest in
    (``tpfx.passes.blocks``; default ``tpfx.passes.blocks.ENABLED``, on), the same graph in a fraction of the
    time; a stack it cannot prove identical is captured whole, with the reason first in ``plan.fallbacks``.

    ``timings``, if given, is filled with seconds per stage (``tpfx.passes.stages``): ``capture``
    (torch.export), each normalize pass by name (``decompose_bias``, ...), ``propagate``, ``build_plan``."""
    if world_size < 1:
        raise ValueError("world_size must be >= 1")
    args, kwargs = examples(model, example_inputs, example_kwargs)
    return derive(model, args, kwargs, world_size, override_pins(model, overrides), sequence_parallel,
                   Stages(timings, blocks))[0]


def auto_shard(model: torch.nn.Module, world_size: int | None = None, *, example_inputs: tuple | None = None,
               example_kwargs: dict[str, Any] | None = None, rank: int | None = None,
               group: dist.ProcessGroup | None = None, compile: bool = False,
               plan: ShardingPlan | None = None, overrides: dict[str, str] | None = None,
               gather_outputs: bool = True, mesh: Any = None, tp_axis: str = "tp",
               sequence_parallel: bool = False, timeout: float | None = None,
               activation_checkpointing: bool = False, devices: Any = None) -> ShardedModule:
    """Shard ``model`` over the ranks of ``group`` (default: the world) and return this rank's module.

    Outputs are replicated on every rank. ``gather_outputs=False`` leaves split outputs as this rank's
    slice (e.g. vocab-split logits when only ``.loss`` is used: the loss is computed with a parallel
    cross-entropy either way, so training then never gathers the logits). ``mesh`` (a ``DeviceMesh`` with
    named axes) and ``tp_axis``: shard over that axis of the mesh; the other axes are for data parallelism
    (wrap the result in torch's ``fully_shard`` or ``replicate`` over them). ``sequence_parallel=True``:
    Megatron sequence parallelism (norms and residual adds on sequence chunks, reduce-scatter / all-gather
    instead of all-reduce); the sequence length must then be divisible by the tp size. ``timeout`` (seconds):
    how long any collective of the tp group may wait for a peer before raising on this rank (sets the group's
    timeout; default: the group's own, 30 min on gloo and 10 min on NCCL unless ``init_process_group(timeout=)``
    said otherwise). ``activation_checkpointing=True``: each layer of the model's stack (its longest
    ``nn.ModuleList``) is a checkpointed region of the per-rank graphs (recomputed in backward), as
    ``gradient_checkpointing_enable()`` or ``torch.utils.checkpoint`` in the model's code would make it."""
    if any(p.device.type == "meta" for p in model.parameters()):
        raise ValueError("tpfx.auto_shard needs real weights; the model has parameters on the meta device "
                         "(use tpfx.plan for meta models, tpfx.from_pretrained to load a checkpoint)")
    if devices is not None:  # every rank in this process, on a thread each (tpfx.inprocess)
        from tpfx.inprocess import shard_locally

        params = dict(model.named_parameters())

        def shard(rank: int, t: int, device: torch.device) -> ShardedModule:
            def load(fqn: str, pl: Placement) -> torch.Tensor:  # this rank's slice, on its device
                return local_param(params[fqn], pl, rank, t).detach().to(device)

            return shard_with(model, t, example_inputs=example_inputs, example_kwargs=example_kwargs, compile=compile,
                              loader=load,
                              plan=plan, overrides=overrides, gather_outputs=gather_outputs,
                              sequence_parallel=sequence_parallel, timeout=timeout,
                              activation_checkpointing=activation_checkpointing, warn_plain=False)

        return shard_locally(model, devices, world_size, shard, rank=rank, group=group,
                             mesh=mesh)  # type: ignore[return-value]
    return shard_with(model, world_size, example_inputs=example_inputs, example_kwargs=example_kwargs, rank=rank,
                      group=group, compile=compile, plan=plan, overrides=overrides, gather_outputs=gather_outputs,
                      mesh=mesh, tp_axis=tp_axis, sequence_parallel=sequence_parallel, timeout=timeout,
                      activation_checkpointing=activation_checkpointing)


def _check_unwrapped(model: torch.nn.Module) -> None:
    """Data parallelism wraps the sharded module, never the other way round."""
    from torch.distributed.tensor import DTensor
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(model, DistributedDataParallel) or any(isinstance(p, DTensor) for p in model.parameters()):
        raise ValueError("tpfx: the model is already wrapped for data parallelism (DDP, or FSDP's fully_shard: "
                         "its parameters are DTensors); call tpfx.auto_shard on the plain model first, then wrap "
                         "the sharded module (fully_shard(sharded, mesh=mesh['dp']))")


ParamLoader = Callable[[str, Placement], torch.Tensor]


def shard_with(model: torch.nn.Module, world_size: int | None = None, *, example_inputs: tuple | None = None,
               example_kwargs: dict[str, Any] | None = None, rank: int | None = None,
               group: dist.ProcessGroup | None = None, compile: bool = False,
               plan: ShardingPlan | None = None, overrides: dict[str, str] | None = None,
               gather_outputs: bool = True, loader: ParamLoader | None = None, mesh: Any = None,
               tp_axis: str = "tp", sequence_parallel: bool = False, timeout: float | None = None,
               activation_checkpointing: bool = False, warn_plain: bool = True) -> ShardedModule:
    """``auto_shard``, with this rank's parameters taken from ``loader(fqn, placement)`` (its local slice)
    instead of sliced from the model's own weights: a model whose parameters hold no data (fake tensors) is
    then sharded without ever holding its full weights (``tpfx.from_pretrained``)."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(LAUNCH_HINT)
    _check_unwrapped(model)
    group = tp_group(mesh, tp_axis, group)
    group_size = dist.get_world_size(group)
    world_size = group_size if world_size is None else world_size
    if world_size != group_size:
        raise ValueError(f"tpfx: world_size={world_size} but the process group has {group_size} ranks")
    rank = dist.get_rank(group) if rank is None else rank
    if timeout is not None:
        from tpfx.faults import set_timeout

        set_timeout(group, timeout)
    lazy = example_inputs is None and example_kwargs is None and hf_model(model) is None
    if lazy and plan is None:
        raise ValueError("tpfx: pass example_inputs (or a plan) for a module that is not a transformers model")
    if plan is not None and sequence_parallel and not plan.sequence_parallel:
        plan = dataclasses.replace(plan, sequence_parallel=True, context=None)  # type: ignore[call-arg]  # the weights' plan, activations split by sequence
    sequence_parallel = sequence_parallel or (plan is not None and plan.sequence_parallel)
    first = None
    if plan is None or not lazy:
        args, kwargs = examples(model, example_inputs, example_kwargs)
        pins = plan.pins() if plan is not None else override_pins(model, overrides)
        planned, dynamic = derive(model, args, kwargs, world_size, pins, sequence_parallel,
                                  Stages(checkpoint_layers=activation_checkpointing))
        first = (planned, args, kwargs, dynamic)
        plan = planned
    check_agreement(plan, group)
    sharded = sharded_class(type(model))(model, plan, rank, group, compile, gather_outputs,  # type: ignore[arg-type]
                                          timeout, mesh[tp_axis] if mesh is not None else None,
                                          activation_checkpointing)
    sharded.load_params(model, loader or _slicer(model, plan, rank))
    if first is not None:
        planned, args, kwargs, dynamic = first
        sharded.serve(planned, args, kwargs, dynamic)
    if warn_plain:  # devices= exposes plain pieces that torch's clipping takes (tpfx.inprocess)
        _warn_plain(sharded)
    return sharded


def _warn_plain(sharded: ShardedModule) -> None:
    """Say once which parameters are plain tensors (no DTensor placement for their layout): torch's
    ``clip_grad_norm_`` over ``sharded.parameters()`` raises on the mix, ``tpfx.clip_grad_norm_`` is exact."""
    plain = sharded.plain_params()
    if not plain or sharded.rank != 0:
        return
    layouts = sorted({str(sharded.placement(f)) for f in plain})
    warnings.warn(f"tpfx: {len(plain)} parameters (e.g. {plain[0]}) have layouts with no DTensor placement "
                  f"({', '.join(layouts)}) and are plain tensors holding this rank's slice; torch.nn.utils."
                  "clip_grad_norm_(sharded.parameters()) raises on this mix, so clip with tpfx.clip_grad_norm_"
                  "(sharded, max_norm) (exact). HF Trainer and accelerate count plain tensors as whole tensors: "
                  "their gradient norm and clipping of this model would be wrong; train it in your own loop",
                  UserWarning, stacklevel=3)


def _slicer(model: torch.nn.Module, plan: ShardingPlan, rank: int) -> ParamLoader:
    """A loader cutting this rank's slice from the model's own weights."""
    params = dict(model.named_parameters())

    def load(fqn: str, pl: Placement) -> torch.Tensor:
        return local_param(params[fqn], pl, rank, plan.world_size).detach()

    return load


def emit_rank(plan: ShardingPlan, rank: int, timings: dict[str, float] | None = None) -> fx.GraphModule:
    """``rank``'s GraphModule for a plan from ``tpfx.plan`` without a process group (for inspection and
    tests: collectives name a placeholder group ``"fake:<ranks>"`` and cannot run). ``timings["emit"]``
    gets the seconds spent."""
    if plan.derivation is None:
        raise ValueError("emit_rank needs a plan derived in this process (not one loaded from JSON)")
    return Stages(timings).emit_rank(plan.derivation, rank, lambda ranks: "fake:" + ",".join(map(str, ranks)))


def shard_tensor(plan: ShardingPlan, fqn: str, full: torch.Tensor, rank: int) -> torch.Tensor:
    """``rank``'s slice of a full tensor laid out like parameter ``fqn`` (e.g. its gradient)."""
    return plan.shard(fqn, full, rank)
