"""Adapters (peft) on a sharded model: attached before planning, saved as peft's own files.

A peft model is planned as any other model (``auto_shard(get_peft_model(model, config))``): the planner sees
each low-rank adapter beside its base layer and lays it out along the layer's split (``passes/propagate.py``,
steps 5 and 6), so the forward has the base plan's collectives. Two things are peft's own and live here:

- ``attach``: ``tpfx.from_pretrained(path, t, adapter=...)`` puts an adapter (a ``PeftConfig``, or the
  directory of a saved adapter) on the storage-less base model it builds, before planning. The base's
  parameters are fake tensors, the adapter's are real (peft creates them on the base layer's device, CPU,
  drawing the same random numbers as on a real model); each rank then reads its slices of the base from the
  checkpoint and cuts its slices of the adapter: no rank ever holds the full model.
- ``save``: ``sharded.save_pretrained(dir)`` of a peft model writes what peft's ``save_pretrained`` writes
  (``adapter_config.json``, ``adapter_model.safetensors`` with full shapes), by peft's own code on rank 0,
  from the adapter tensors gathered there. ``PeftModel.from_pretrained(base, dir)`` loads it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch._subclasses.fake_tensor import maybe_get_fake_mode

from tpfx.dtensor_params import local

if TYPE_CHECKING:
    from tpfx.runtime.interface import Sharded as ShardedModule


def is_peft(model: torch.nn.Module) -> bool:
    """``model`` is a peft ``PeftModel`` (peft need not be installed otherwise)."""
    try:
        from peft import PeftModel
    except ImportError:
        return False
    return isinstance(model, PeftModel)


def _types(model: Any) -> dict[str, str]:
    return {name: str(getattr(c.peft_type, "value", c.peft_type)) for name, c in model.peft_config.items()}


def check(model: torch.nn.Module) -> None:
    """Refuse an adapter that feeds the model through its KV cache (prefix tuning: ``past_key_values``), which a
    sharded forward does not take, naming the adapter."""
    if not is_peft(model):
        return
    kv = {n: t for n, t in _types(model).items() if t == "PREFIX_TUNING"}
    if kv:
        raise ValueError(f"tpfx: peft adapter {', '.join(f'{n!r} ({t})' for n, t in kv.items())} passes its "
                         "prefix to the model as a KV cache (past_key_values), which a sharded forward does not "
                         "take; shard a model with LoRA, IA3 or prompt tuning adapters instead")


def explain(model: torch.nn.Module, message: str) -> str:
    """A capture error of a peft model, with the adapter named (its code is part of what was captured)."""
    if not is_peft(model):
        return message
    names = ", ".join(f"{n!r} ({t})" for n, t in _types(model).items())
    return (f"{message}\n(the model is a peft model with adapter {names}; its code is captured with the base "
            "model's: LoRA, IA3 and prompt tuning are tested. An adapter that draws a random number to decide "
            "whether it runs cannot be captured: LoKr and LoHa test torch.rand(1) > module_dropout in train mode "
            "(even at 0), so they shard in eval mode only)")


def _refuse_base_reading(config: Any) -> None:
    """A new adapter whose initial values are computed from the base weights (DoRA's magnitude, PiSSA's and
    OLoRA's decompositions, LoftQ, EVA, CorDA) cannot be made from a base no rank holds: refused, naming it."""
    init = getattr(config, "init_lora_weights", True)
    reads = [f"init_lora_weights={init!r}"] if isinstance(init, str) and init not in ("gaussian", "orthogonal") else []
    reads += ["use_dora=True"] if getattr(config, "use_dora", False) else []
    if reads:
        raise ValueError(f"tpfx.from_pretrained: a new {getattr(getattr(config, 'peft_type', None), 'value', 'peft')} adapter with "
                         f"{' and '.join(reads)} computes its initial values from the full base weights, which "
                         "no rank holds here; create it with peft on an unsharded model once, save it "
                         "(model.save_pretrained(dir)) and pass adapter=dir, or shard the peft model itself "
                         "with tpfx.auto_shard(get_peft_model(model, config))")


def attach(model: torch.nn.Module, adapter: Any, adapter_kwargs: dict[str, Any] | None = None
           ) -> tuple[torch.nn.Module, dict[str, str]]:
    """``model`` with ``adapter`` on it (``get_peft_model`` for a ``PeftConfig``, ``PeftModel.from_pretrained``
    for a directory), and the base parameters' names: peft name -> the name in ``model`` (peft keeps the base
    layers' parameter objects, under ``base_layer``; a ``modules_to_save`` copy of a base module is read from
    the checkpoint as its original). An adapter parameter peft made from the storage-less base (DoRA's
    magnitude, a ``modules_to_save`` copy) is read from the adapter's directory when there is one."""
    try:
        from peft import PeftConfig, PeftModel, get_peft_model
    except ImportError as e:
        raise ImportError("tpfx: adapter= needs peft (pip install peft)") from e
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    if isinstance(adapter, PeftConfig):
        _refuse_base_reading(adapter)
        wrapped = get_peft_model(model, adapter, **(adapter_kwargs or {}))
    elif isinstance(adapter, (str, os.PathLike)):
        # low_cpu_mem_usage: peft makes the adapter on the meta device and assigns the saved tensors, computing
        # nothing from the storage-less base
        kwargs = {"low_cpu_mem_usage": True} | (adapter_kwargs or {})
        wrapped = PeftModel.from_pretrained(model, str(adapter), **kwargs)
    else:
        raise TypeError(f"tpfx: adapter= takes a peft config or an adapter directory, not {type(adapter).__name__}")
    base = {n: names[id(p)] for n, p in wrapped.named_parameters(remove_duplicate=False) if id(p) in names}
    fake = [n for n, p in wrapped.named_parameters() if n not in base and (p.is_meta or maybe_get_fake_mode(p) is not None)]
    if fake and isinstance(adapter, (str, os.PathLike)):
        fake = _read_saved(wrapped, fake, Path(adapter))
    base |= _copies_of_base(wrapped, fake, base)
    if left := [n for n in fake if n not in base]:
        raise ValueError(f"tpfx.from_pretrained: peft adapter {', '.join(map(repr, _types(wrapped).items()))} "
                         f"computes {left[:3]} from the base weights, which no rank holds here; shard the peft "
                         "model itself with tpfx.auto_shard(get_peft_model(model, config))")
    return wrapped, base


def _read_saved(model: torch.nn.Module, wanted: list[str], directory: Path) -> list[str]:
    """Give the adapter parameters ``wanted`` their saved values (full shapes) from ``directory``'s adapter
    file, found by peft's own naming; returns those it does not hold."""
    from safetensors import safe_open

    file = directory / "adapter_model.safetensors"
    if not file.is_file():
        return wanted
    configs: dict[str, Any] = model.peft_config  # type: ignore[assignment]
    saved = {name: key for adapter_name in configs for name, key in _peft_keys(model, wanted, adapter_name).items()}
    left = []
    with safe_open(str(file), "pt") as f:
        keys = set(f.keys())
        for name in wanted:
            key = saved.get(name)
            if key not in keys:
                left.append(name)
                continue
            module, _, leaf = name.rpartition(".")
            old = model.get_parameter(name)
            value = f.get_tensor(key).to(old.dtype)  # (full shape)
            if tuple(value.shape) != tuple(old.shape):
                raise ValueError(f"tpfx.from_pretrained: {key!r} in {str(file)!r} has shape {list(value.shape)}, "
                                 f"the adapter expects {list(old.shape)}")
            model.get_submodule(module)._parameters[leaf] = torch.nn.Parameter(value, old.requires_grad)
    return left


def _copies_of_base(model: torch.nn.Module, fake: list[str], base: dict[str, str]) -> dict[str, str]:
    """peft's ``modules_to_save`` copies of base modules (``X.modules_to_save.<adapter>.Y``, a deep copy of
    ``X.original_module.Y``): their names -> the checkpoint names of the originals."""
    out = {}
    for name in fake:
        head, sep, tail = name.partition(".modules_to_save.")
        original = f"{head}.original_module.{tail.partition('.')[2]}"
        if sep and original in base:
            out[name] = base[original]
    return out


def _peft_keys(model: torch.nn.Module, names: list[str], adapter_name: str) -> dict[str, str]:
    """Of the state-dict ``names`` of ``model``, those peft saves for ``adapter_name``, each with the key it saves
    it under: peft's own filter and renaming, run on placeholders and mapped back by identity."""
    from peft import get_peft_model_state_dict

    holders = {k: torch.empty(0) for k in names}
    kept = get_peft_model_state_dict(model, state_dict=holders, adapter_name=adapter_name)
    key_of = {id(v): k for k, v in kept.items()}
    return {k: key_of[id(v)] for k, v in holders.items() if id(v) in key_of}


def save(sharded: ShardedModule, directory: str | os.PathLike, timeout_s: float = 300.0) -> None:
    """Write the adapters of ``sharded`` (a sharded ``PeftModel``) as peft does (collective: every rank calls
    it). Each adapter tensor is gathered to rank 0 in full; rank 0 runs peft's ``save_pretrained`` on them."""
    from tpfx.pretrained import _barrier, _gather_full, _global, canonical_names

    tree: Any = sharded.tree
    _barrier(sharded.group, timeout_s, "save_pretrained")
    state = dict(tree.state_dict(keep_vars=True))
    canonical = canonical_names(tree)
    error: str | None = None
    for adapter_name in list(tree.peft_config):
        full: dict[str, torch.Tensor] = {}
        for name in _peft_keys(tree, list(state), adapter_name):
            t = _gather_full(sharded, canonical.get(name, name), local(state[name]))
            if t is not None:
                full[name] = t.detach().cpu()
        if sharded.rank == 0 and error is None:
            try:
                tree.save_pretrained(str(directory), state_dict=full, selected_adapters=[adapter_name],
                                     is_main_process=True)
            except Exception as e:  # noqa: BLE001 - reported to every rank below
                error = f"{type(e).__name__}: {e}"
    status = [error]
    dist.broadcast_object_list(status, src=_global(sharded.group, 0), group=sharded.group)
    if status[0] is not None:
        raise RuntimeError(f"tpfx.save_pretrained: rank 0 could not write the adapter to {str(directory)!r}: "
                           f"{status[0]}")
