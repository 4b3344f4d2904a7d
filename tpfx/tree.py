"""The sharded module's tree: the model's own module types, holding this rank's tensors.

A ``ShardedModule`` is built over a structural copy of the model (``build``): every module is a new instance of
its class, sharing the model's plain attributes and config by reference, with containers of its own
(parameters, buffers, submodules, hooks). Its parameters are this rank's slices, its buffers copies of the
model's. So what users do to modules (``apply``, freezing or re-initialising by type, ``model.layers[0]``,
``eval()`` of one submodule, ``Dropout.p``, hooks) acts on the sharded model, not on the unsharded one, and
the per-rank graphs read the tree's parameters and buffers at each call (``.data =``, casts and
``load_state_dict`` are what runs and what is saved).

A graph is captured from the model's Python code as it was then: each module's train flag and plain
attributes, which hooks it has (they run eagerly: ``tpfx.passes.eager_hooks``), the config's values, the
dtypes and devices of its tensors. ``State.key`` summarises
that state in one pass over the tree; a call whose key differs from the graphs' captures anew from the tree
(``capturing``: full-shape fake tensors in place of this rank's slices), planned with the first plan's
placements pinned. Hooks registered on the unsharded model before sharding were copied; removing one through
its handle removes the copy too (``State.mirror``).
"""

from __future__ import annotations

import contextlib
import types
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

import torch

from tpfx.passes import VOLATILE

_CONTAINERS = (dict, OrderedDict, list, set)  # a module's own containers: copied, never shared
_PLAIN = (bool, int, float, str, types.NoneType, torch.dtype, torch.device)
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
          "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called",
          "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
          "_load_state_dict_post_hooks")
_GRAPH_HOOKS = _HOOKS[:4]  # the hooks a forward runs (the with_kwargs / always_called dicts key into these)


def _copy(m: torch.nn.Module, memo: dict[int, torch.nn.Module]) -> torch.nn.Module:
    """A new instance of ``m``'s class with ``m``'s attributes, its own containers and copied submodules
    (a module reached twice is copied once)."""
    if id(m) in memo:
        return memo[id(m)]
    c = type(m).__new__(type(m))
    memo[id(m)] = c
    attrs = {k: (v.copy() if type(v) in _CONTAINERS else v) for k, v in vars(m).items()}
    attrs["_modules"] = {k: None if s is None else _copy(s, memo) for k, s in m._modules.items()}
    attrs["_parameters"] = dict.fromkeys(m._parameters)  # filled with this rank's slices by the caller
    attrs["_buffers"] = {k: None if b is None else b.detach().clone() for k, b in m._buffers.items()}
    vars(c).update(attrs)
    return c


def _relink(c: torch.nn.Module, memo: dict[int, torch.nn.Module]) -> None:
    """Modules a copy holds outside ``_modules`` (``self.reuse = [self.enc]``, a module set through
    ``__dict__``, in a dict, list or tuple) are the tree's copies too."""
    def swap(item: Any) -> Any:
        return memo.get(id(item), item) if isinstance(item, torch.nn.Module) else item

    for k, v in list(vars(c).items()):
        if k in _OWN:
            continue
        if isinstance(v, torch.nn.Module):
            vars(c)[k] = swap(v)
        elif isinstance(v, dict):
            for key, item in v.items():
                v[key] = swap(item)
        elif isinstance(v, list):
            v[:] = [swap(item) for item in v]
        elif type(v) is tuple:
            vars(c)[k] = tuple(swap(item) for item in v)


_OWN = {"_parameters", "_buffers", "_modules", "_non_persistent_buffers_set", *(
    "_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks", "_forward_hooks_with_kwargs",
    "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called", "_state_dict_hooks", "_state_dict_pre_hooks",
    "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")}  # nn.Module's own containers


def build(model: torch.nn.Module) -> torch.nn.Module:
    """The model's tree with empty parameter slots (see the module docstring)."""
    memo: dict[int, torch.nn.Module] = {}
    root = _copy(model, memo)
    for c in memo.values():
        _relink(c, memo)
    return root


def _configs(root: torch.nn.Module) -> list[Any]:
    """The distinct config objects the modules hold, with the configs nested in them (``text_config``)."""
    seen: dict[int, Any] = {}
    todo = [getattr(m, "config", None) for m in root.modules()]
    while todo:
        c = todo.pop()
        if c is None or id(c) in seen or not hasattr(c, "__dict__") or isinstance(c, torch.nn.Module):
            continue
        seen[id(c)] = c
        todo += [v for v in vars(c).values() if hasattr(v, "to_dict") and hasattr(v, "__dict__")]
    return list(seen.values())


def _value(v: Any) -> Any:
    """A hashable stand-in for an attribute value: plain values as they are, containers by their items
    (one level), anything else by identity."""
    if type(v) in _PLAIN:
        return v
    if type(v) is tuple:
        return ("tuple", tuple(_value(x) for x in v))
    if type(v) in _CONTAINERS:
        items = v.items() if isinstance(v, dict) else enumerate(v) if not isinstance(v, set) else ()
        return (type(v).__name__, len(v), tuple((k, x if type(x) in _PLAIN else id(x)) for k, x in items))
    return id(v)


def _plain(obj: Any, skip: set[str] | frozenset[str] = frozenset()) -> tuple:
    """Every attribute but nn.Module's own containers (and ``skip``): plain values, containers' items, others'
    identity (a config, a function, a tensor held as a plain attribute): replacing or changing one is a
    change."""
    return tuple((k, _value(v)) for k, v in vars(obj).items() if k not in _OWN and k not in skip)


def _module_key(m: torch.nn.Module, ids: bool) -> tuple:
    """``ids``: parameters by identity too (a parameter replaced or untied), unless a data-parallel wrapper
    swaps them each call."""
    d = vars(m)
    hooks = tuple((h, tuple(d[h])) for h in _GRAPH_HOOKS if d.get(h))  # hooks run eagerly: which, not what
    tensors = tuple((k, t.dtype, t.device.type, id(t) if ids else 0)
                    for k, t in (*d["_parameters"].items(), *d["_buffers"].items()) if t is not None)
    forward = getattr(type(m), "forward", None)
    return (id(m), id(forward), _plain(m, VOLATILE.get(id(m), frozenset())), hooks, tensors)  # a module replaced by an equal one is another module


class State:
    """What the captured graphs depend on in a tree (see the module docstring)."""

    def __init__(self, root: torch.nn.Module, model: torch.nn.Module) -> None:
        self.root = root
        self.configs = _configs(root)
        # hooks the model had when it was sharded, copied into the tree: (model's dict, tree's dict, keys)
        pairs = zip(model.modules(), root.modules(), strict=True)
        self.copied = [(vars(m)[h], vars(c)[h], tuple(vars(m)[h])) for m, c in pairs for h in _HOOKS if vars(m).get(h)]

    def mirror(self) -> None:
        """A hook removed from the unsharded model through the handle its registration returned is removed from
        the tree too (the tree holds a copy)."""
        for theirs, ours, keys in self.copied:
            for k in keys:
                if k not in theirs:
                    ours.pop(k, None)

    def key(self, training: bool, ids: bool = True) -> tuple:
        """The tree's state as one hashable value (one pass over modules and configs)."""
        if self.copied:
            self.mirror()
        g = torch.nn.modules.module
        hooks = tuple(tuple(d) for d in (g._global_forward_hooks, g._global_forward_pre_hooks,
                                         g._global_backward_hooks, g._global_backward_pre_hooks))
        return (training, hooks, tuple(_module_key(m, ids) for m in self.root.modules()),
                tuple(_plain(c) for c in self.configs))

    def describe_change(self, before: tuple, now: tuple) -> str:
        """Which part of the state differs (for messages)."""
        names = [n or "(root)" for n, _ in self.root.named_modules()]
        for name, a, b in zip(names, before[2], now[2], strict=False):
            if a != b:
                return f"module {name}"
        return "the config" if before[3] != now[3] else "the train/eval mode or global hooks"


@contextlib.contextmanager
def full_shaped(root: torch.nn.Module, shapes: dict[str, tuple[int, ...]]) -> Iterator[None]:
    """The tree's parameters as fake tensors of their full shapes (``shapes``: by FQN; dtype, device and
    ``requires_grad`` as the tree's), for capturing the model's code; put back after. Parameters held at one
    slot twice (tied) get one fake."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    saved: list[tuple[dict, str, Any]] = []
    fakes: dict[int, torch.nn.Parameter] = {}
    for fqn, p in root.named_parameters(remove_duplicate=False):
        prefix, _, leaf = fqn.rpartition(".")
        slots = root.get_submodule(prefix)._parameters
        if id(p) not in fakes:
            shape = shapes.get(fqn, tuple(p.shape))
            with mode:
                fake = torch.empty(shape, dtype=p.dtype, device=p.device)
            fakes[id(p)] = torch.nn.Parameter(fake, requires_grad=p.requires_grad)
        saved.append((slots, leaf, p))
        slots[leaf] = fakes[id(p)]
    try:
        yield
    finally:
        for slots, leaf, p in saved:
            slots[leaf] = p
