"""The unsharded model's state dict loaded into a sharded module: ``ShardedModule.load_state_dict``.

A client that holds the full model's tensors (a ``model.safetensors`` read with ``load_file``, the original
model's ``state_dict()``: what HF Trainer does when it resumes a module that is not a ``PreTrainedModel``)
calls ``load_state_dict`` with them. torch's own ``load_state_dict`` would copy a full tensor into a DTensor
parameter (it refuses the mix) or into a plain slice (a size mismatch). Here each full tensor is cut to this
rank's slice with the plan's own placement and copied into the parameter's local tensor; a tied alias (the
LM head of tied embeddings, which the sharded module registers once) loads its canonical parameter.
Everything else (DTensors, as ``torch.distributed.checkpoint`` hands them, and tensors already of the local
shape of a plain parameter) goes to torch's ``load_state_dict`` unchanged. Missing and unexpected keys are
reported as torch reports them, and ``strict=True`` raises on them as torch does.

Every rank reads the full tensors it is given: loading this way costs the whole model's memory while the
dict is alive (``tpfx.from_pretrained`` and ``tpfx.load`` read only a rank's slices).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, cast

import torch
from torch.distributed.tensor import DTensor
from torch.nn.modules.module import _IncompatibleKeys

from tpfx.dtensor_params import local
from tpfx.passes import shard_tensor
from tpfx.pretrained import canonical_names, full_shape

if TYPE_CHECKING:
    from tpfx.runtime.interface import Sharded as ShardedModule

__all__ = ["load_state_dict"]


def _copy_full(sharded: ShardedModule, fqn: str, param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy this rank's slice of the full tensor ``full`` into parameter ``fqn``."""
    piece = shard_tensor(full, sharded.placement(fqn), sharded.rank, sharded.world_size)
    with torch.no_grad():
        local(param).copy_(piece)


def load_state_dict(sharded: ShardedModule, state_dict: Mapping[str, Any], strict: bool = True,
                    assign: bool = False) -> _IncompatibleKeys:
    """``sharded.load_state_dict``: full tensors are cut to this rank's slices (see the module docstring)."""
    params = dict(sharded.named_parameters())
    aliases = canonical_names(sharded.tree)
    rest: dict[str, Any] = {}
    loaded: set[str] = set()
    for key, value in state_dict.items():
        fqn = key if key in params else aliases.get(key, key)
        param = params.get(fqn)
        if param is None or isinstance(value, DTensor):
            rest[key] = value
            continue
        full = full_shape(sharded, fqn, local(param))
        if tuple(value.shape) == full:
            if fqn not in loaded:
                sharded.check_own_params("load_state_dict of full tensors")
                _copy_full(sharded, fqn, param, value)
                loaded.add(fqn)
        elif not isinstance(param, DTensor) and fqn == key and value.shape == param.shape:
            rest[key] = value  # a plain parameter's own slice, as its state_dict() gives it
        else:
            raise RuntimeError(f"tpfx: load_state_dict: {key!r} has shape {tuple(value.shape)}; parameter {fqn!r} "
                               f"is {full} in full (give the full tensor, or a DTensor)")
    result = torch.nn.Module.load_state_dict(cast(torch.nn.Module, sharded), rest, strict=False, assign=assign)
    missing = [k for k in result.missing_keys if k not in loaded and aliases.get(k, k) not in loaded]
    if strict and (missing or result.unexpected_keys):
        raise RuntimeError(f"Error(s) in loading state_dict for {type(sharded).__name__}: missing keys "
                           f"{missing}, unexpected keys {result.unexpected_keys}")
    return _IncompatibleKeys(missing, result.unexpected_keys)
