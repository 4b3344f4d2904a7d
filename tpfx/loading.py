"""``from_pretrained``: a transformers checkpoint loaded straight into this rank's slices (``tpfx.pretrained``
reads them; its docstring says how memory stays bounded)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors import safe_open

from tpfx.adapters import attach
from tpfx.api import shard_with
from tpfx.passes import TRACE_LOCK, Placement, shard_tensor
from tpfx.pretrained import (
    _ST_DTYPES,
    CheckpointError,
    TensorEntry,
    convert_full,
    index_checkpoint,
    match_tensors,
    read_slice,
)
from tpfx.runtime import LAUNCH_HINT, ShardedModule, tp_group

__all__ = ["from_pretrained"]


def _default_dtype(config: Any, entries: dict[str, TensorEntry]) -> torch.dtype:
    """transformers' ``dtype="auto"``: the config's dtype, else the first floating-point weight's."""
    dt = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dt, str) and dt != "auto":
        dt = getattr(torch, dt)
    if isinstance(dt, torch.dtype):
        return dt
    names = {v: k for k, v in _ST_DTYPES.items()}
    for e in entries.values():
        if names.get(e.dtype, torch.int64).is_floating_point:
            return names[e.dtype]
    return torch.float32


def _device_for(group: dist.ProcessGroup | None) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _build_empty(model_cls: Any, config: Any, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """The model with parameters that hold no memory and buffers computed for real on ``device``.

    Parameters are fake tensors on ``device`` (``FakeTensorMode``: shapes, dtypes and device, no storage), not
    meta tensors: model code that branches on the device (transformers' MoE routing takes an integer
    ``histc`` path off the CPU) is then captured as it runs on ``device``. Tied parameters stay one object."""
    from accelerate import init_empty_weights
    from torch._subclasses.fake_tensor import FakeTensorMode

    build = getattr(model_cls, "from_config", None) or model_cls._from_config  # Auto* classes or a model class
    with init_empty_weights(include_buffers=False):
        model = build(config, dtype=dtype)
    if callable(getattr(model, "tie_weights", None)):
        model.tie_weights()  # as transformers does once the weights are in
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fakes: dict[int, torch.nn.Parameter] = {}
    for module in model.modules():
        for name, p in list(module._parameters.items()):
            if p is not None:
                if id(p) not in fakes:
                    with mode:
                        fake = torch.empty(p.shape, dtype=p.dtype, device=device)
                    fakes[id(p)] = torch.nn.Parameter(fake, requires_grad=p.requires_grad)
                module._parameters[name] = fakes[id(p)]
        for name, buf in list(module._buffers.items()):
            if buf is not None and buf.device != device:
                module._buffers[name] = buf.to(device)
    return model


def from_pretrained(path: str | os.PathLike, world_size: int | None = None, *, model_cls: Any = None,
                    torch_dtype: torch.dtype | None = None, adapter: Any = None,
                    adapter_kwargs: dict[str, Any] | None = None, **auto_shard_kwargs: Any) -> ShardedModule:
    """Load a transformers checkpoint directory straight into this rank's sharded module.

    The model is built from ``config.json`` on the meta device, planned, and each rank reads only its own
    slices of each ``*.safetensors`` file (one file or ``model.safetensors.index.json`` with several).
    ``model_cls`` defaults to the class ``config.json``'s ``architectures`` names (else ``AutoModelForCausalLM``),
    as transformers' pipelines pick it; ``torch_dtype`` defaults to transformers' "auto" (the
    config's dtype, else the checkpoint's). ``adapter``: a peft config (a new adapter, initialized as peft
    does) or a saved adapter's directory (``adapter_kwargs`` go to ``PeftModel.from_pretrained``, e.g.
    ``is_trainable=True``), put on the base before planning (``tpfx.adapters``). Other keyword arguments go to
    ``tpfx.auto_shard``. Needs an initialized process group (``tpfx.launch`` or ``torchrun``), or ``devices=``
    (every rank in this process, each reading its own slices: ``tpfx.inprocess``)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    devices = auto_shard_kwargs.pop("devices", None)
    if devices is not None:
        from tpfx.inprocess import shard_locally

        def one_rank(r: int, t: int, device: torch.device) -> Any:
            if device.type != "cpu":
                raise NotImplementedError("tpfx.from_pretrained(devices=) reads to CPU ranks in this version; load "
                                          "on CPU devices, or launch one process per GPU")
            return from_pretrained(path, t, model_cls=model_cls, torch_dtype=torch_dtype, adapter=adapter,
                                   adapter_kwargs=adapter_kwargs, **auto_shard_kwargs, warn_plain=False)

        return shard_locally(None, devices, world_size, one_rank, **{k: auto_shard_kwargs.get(k) or None for k in
                                                                  ("group", "mesh")})  # type: ignore[return-value]

    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(LAUNCH_HINT)
    root = Path(path)
    entries = index_checkpoint(root)  # local checks first: every rank sees the same files and raises alike
    if not (root / "config.json").is_file():
        raise FileNotFoundError(f"tpfx.from_pretrained: no config.json in {str(root)!r}")
    config = AutoConfig.from_pretrained(root)
    dtype = torch_dtype or _default_dtype(config, entries)
    group = tp_group(auto_shard_kwargs.get("mesh"), auto_shard_kwargs.get("tp_axis", "tp"),
                     auto_shard_kwargs.get("group"))
    device = _device_for(group)
    with TRACE_LOCK:  # accelerate's empty-weights build patches nn.Module for every thread: ranks take turns
        model = _build_empty(model_cls or _named_class(config) or AutoModelForCausalLM, config, dtype,
                             device).eval()  # as transformers
    _generation_config(model, root)
    if dist.get_backend(group) == "threaded":  # ranks on threads (tpfx.inprocess): none registers a parameter
        dist.barrier(group)  # while another's build has nn.Module patched
    found, converted = match_tensors(model, entries, str(root))
    _load_buffers(model, entries, device)
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    params = dict(model.named_parameters())
    pending: dict[str, torch.Tensor] = {}  # full tensors a conversion yielded that are not loaded yet
    names: dict[str, str] = {}  # the planned model's name -> the base model's (an adapter renames)
    if adapter is not None:
        model, names = attach(model, adapter, adapter_kwargs)
    own = dict(model.named_parameters())

    def loader(fqn: str, pl: Placement) -> torch.Tensor:
        if adapter is not None and fqn not in names:  # the adapter's own: a real tensor, cut here
            return shard_tensor(own[fqn].detach(), pl, rank, world).to(device).clone()
        fqn = names.get(fqn, fqn)
        if fqn in found:
            return read_slice(found[fqn], pl, rank, world, params[fqn].dtype, device)
        if fqn not in pending:
            pending.update(convert_full(model, converted[fqn], entries, params[fqn].dtype))
        full = pending.pop(fqn)
        if tuple(full.shape) != tuple(params[fqn].shape):
            raise CheckpointError(f"tpfx.from_pretrained: {fqn!r} converted from {converted[fqn].sources[0][0]!r} "
                                  f"... in {str(root)!r} has shape {list(full.shape)}, the model built from "
                                  f"config.json expects {list(params[fqn].shape)}")
        return shard_tensor(full, pl, rank, world).to(device).clone()  # a copy: the full tensor is dropped

    sharded = shard_with(model, world_size, loader=loader, **auto_shard_kwargs)
    return sharded


def _named_class(config: Any) -> Any:
    """The transformers class ``config.architectures`` names (T5ForConditionalGeneration, ...), if it exists."""
    import transformers

    names = getattr(config, "architectures", None) or []
    return getattr(transformers, names[0], None) if len(names) == 1 else None


def _generation_config(model: torch.nn.Module, root: Path) -> None:
    """The checkpoint's ``generation_config.json`` becomes the model's, as transformers' ``from_pretrained``
    reads it (without one, the model keeps the generation config its constructor made from config.json)."""
    can = getattr(model, "can_generate", None)
    if callable(can) and can() and (root / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(root)  # type: ignore[assignment]


def _load_buffers(model: torch.nn.Module, entries: dict[str, TensorEntry], device: torch.device) -> None:
    """Persistent buffers saved in the checkpoint are loaded whole (transformers does the same); the rest keep
    the values the constructor computed."""
    persistent = set(model.state_dict().keys())
    for name, buf in model.named_buffers():
        if name in entries and name in persistent and buf is not None:
            with safe_open(entries[name].file, "pt") as f:
                raw = f.get_tensor(name)
                value = torch.empty(raw.shape, dtype=buf.dtype, device=device).copy_(raw)
            if tuple(value.shape) != tuple(buf.shape):
                raise CheckpointError(f"tpfx.from_pretrained: buffer {name!r} in {entries[name].file!r} has shape "
                                      f"{list(value.shape)}, the model expects {list(buf.shape)}")
            module, _, leaf = name.rpartition(".")
            model.get_submodule(module)._buffers[leaf] = value


# ----------------------------------------------------------------------------------------- saving
