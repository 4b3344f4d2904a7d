"""Gradient norms of a sharded model, exact: ``clip_grad_norm_`` and ``grad_norm``.

Every rank holds slices of its parameters' gradients, some held by several ranks (replicated parameters, KV
heads replicated within a group, a part of a fused projection held whole). The model's norm counts every
element once: each rank adds up the pieces it is the lowest holder of (``Shard.owned_pieces``; a replicated
gradient belongs to rank 0), and one all-reduce over the tensor-parallel group sums those partial norms
(a max for the infinity norm). The gradients of the ranks that share a piece are equal (tpfx sums them
within their replica group in backward), so the owner's copy stands for all.

Where every parameter's layout has a DTensor placement, the parameters are DTensors
(``tpfx.dtensor_params``) and torch's own ``torch.nn.utils.clip_grad_norm_(sharded.parameters(), ...)`` is
exact too. Where some have none (parts of a fused projection of different sizes, parts held whole), torch's
call raises on the mix of DTensors and tensors and ``tpfx.clip_grad_norm_(sharded, max_norm)`` is the path; it
scales the gradients by torch's ``clip_grads_with_norm_`` coefficient.

Under a data-parallel wrapper (FSDP2's ``fully_shard``, composable ``replicate``) every gradient is a DTensor:
a layout with a DTensor placement is one over the dp x tp mesh, whose norm DTensor computes exactly; a plain
layout is this rank's tensor-parallel tensor, sharded (or replicated) over dp only: it is made whole over dp
(``full_tensor``), its owned pieces counted as above on the first dp rank, and the shares summed over tp and dp.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from tpfx.dtensor_params import local
from tpfx.passes import Placement, Shard

if TYPE_CHECKING:
    from tpfx.runtime.interface import Sharded as ShardedModule

__all__ = ["clip_grad_norm_", "grad_norm", "owned_norm"]


def owned_norm(grad: torch.Tensor, pl: Placement, rank: int, world: int, norm_type: float) -> torch.Tensor:
    """This rank's share of the model norm of one gradient: sum of |x|^p over the elements it owns (max |x|
    for p = inf), as a float64 scalar. Summed (maxed) over the ranks, it is the full gradient's."""
    g = grad.detach()
    if isinstance(pl, Shard):
        parts = [g.narrow(pl.dim, ls, n) for _, n, ls in pl.owned_pieces(rank, world)]
    else:
        parts = [g] if rank == 0 else []
    zero = torch.zeros((), dtype=torch.float64, device=g.device)
    if math.isinf(norm_type):
        return torch.stack([zero] + [p.abs().max().double() for p in parts if p.numel()]).max()
    return sum((torch.linalg.vector_norm(p, norm_type, dtype=torch.float64) ** norm_type for p in parts), zero)


def _combine(total: torch.Tensor, share: torch.Tensor, norm_type: float) -> torch.Tensor:
    share = share.to(total.device, torch.float64)
    return torch.maximum(total, share) if math.isinf(norm_type) else total + share


def _wrapped_norm(sharded: ShardedModule, norm_type: float) -> torch.Tensor:
    """``grad_norm`` under a data-parallel wrapper (the module docstring's last paragraph)."""
    from torch.distributed.tensor import DTensor

    from tpfx.dtensor_params import dtensor_layout

    whole = torch.zeros((), dtype=torch.float64)  # already the model's (DTensor norms are global)
    plain = torch.zeros((), dtype=torch.float64)  # this rank's share, summed over tp and dp below
    dp_group = None
    for fqn, p in sharded.named_parameters():
        g = p.grad
        if g is None:
            continue
        pl = sharded.placement(fqn)
        if isinstance(g, DTensor) and dtensor_layout(pl, sharded.world_size) is not None:
            n = torch.linalg.vector_norm(g, norm_type, dtype=torch.float64).full_tensor()
            whole = _combine(whole, n if math.isinf(norm_type) else n ** norm_type, norm_type)
            continue
        if isinstance(g, DTensor):  # this tp rank's own tensor, sharded over dp
            dp_group, dp_rank = g.device_mesh.get_group(), g.device_mesh.get_local_rank()
            g = g.full_tensor()
        else:
            dp_rank = 0
        if dp_rank == 0:
            plain = _combine(plain, owned_norm(g, pl, sharded.rank, sharded.world_size, norm_type), norm_type)
    op = dist.ReduceOp.MAX if math.isinf(norm_type) else dist.ReduceOp.SUM
    if sharded.world_size > 1:
        dist.all_reduce(plain, op=op, group=sharded.group)
    if dp_group is not None:
        dist.all_reduce(plain, op=op, group=dp_group)
    total = _combine(whole, plain, norm_type)
    return total if math.isinf(norm_type) else total ** (1.0 / norm_type)


def grad_norm(sharded: ShardedModule, norm_type: float = 2.0) -> torch.Tensor:
    """The norm of the unsharded model's gradient (all parameters together), the same on every rank.
    Collective over the tensor-parallel group (and the data-parallel one under a wrapper)."""
    norm_type = float(norm_type)
    if sharded.wrapped():
        return _wrapped_norm(sharded, norm_type)
    total = torch.zeros((), dtype=torch.float64)
    device = None
    for fqn, p in sharded.named_parameters():
        if p.grad is None:
            continue
        device = p.grad.device
        share = owned_norm(local(p.grad), sharded.placement(fqn), sharded.rank, sharded.world_size, norm_type)
        share = share.to(total.device)
        total = torch.maximum(total, share) if math.isinf(norm_type) else total + share
    if device is not None and device.type != "cpu":
        total = total.to(device)
    if dist.is_initialized() and sharded.world_size > 1:
        op = dist.ReduceOp.MAX if math.isinf(norm_type) else dist.ReduceOp.SUM
        dist.all_reduce(total, op=op, group=sharded.group)
    return total if math.isinf(norm_type) else total ** (1.0 / norm_type)


def clip_grad_norm_(sharded: ShardedModule, max_norm: float, norm_type: float = 2.0,
                    error_if_nonfinite: bool = False, foreach: bool | None = None) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` for a sharded model: returns the unsharded model's total norm
    (as a float32 tensor, like torch) and scales every rank's gradients by the same coefficient, so the
    clipped gradients are the unsharded model's clipped gradients, sliced. Collective."""
    norm = grad_norm(sharded, norm_type)
    if error_if_nonfinite and not torch.isfinite(norm):
        raise RuntimeError(f"tpfx.clip_grad_norm_: the total norm of order {norm_type} is non-finite ({norm})")
    grads = [local(p.grad) for p in sharded.parameters() if p.grad is not None]  # DTensors: their local views
    first = grads[0].dtype if grads else torch.float32
    norm = norm.to(first if first.is_floating_point else torch.float32)
    coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)  # torch's clip_grads_with_norm_, on the local views
    if grads and foreach is not False:
        torch._foreach_mul_(grads, coef.to(grads[0].device))
    else:
        for g in grads:
            g.mul_(coef.to(g.device))
    return norm
