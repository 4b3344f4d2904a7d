"""The sharded module: this rank's piece of a model, a module tree like the model's, running per-rank graphs.

``ShardedModule`` shares the module tree of a structural copy of the model (``tpfx.tree``), holds this rank's
slices as that tree's parameters, and serves every call with the per-rank graph captured for the tree's state
and the inputs' structure (captured on first use, planned with the first plan's placements pinned). Features
use its public interface (``tpfx.runtime.interface.Sharded``): the plan and placements, this rank's local
tensors, the graph for a key, adding a graph, and one call path (``call``) that forward and generation share,
with the agreement checks before the first collective and failed collectives named.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import warnings
from collections.abc import Callable, Iterator, Mapping
from operator import attrgetter
from typing import Any

import torch
import torch.distributed as dist
import torch.fx as fx
from torch.utils._pytree import tree_flatten

from tpfx.agreement import checked_before_collectives
from tpfx.derive import derive, prepare_kwargs
from tpfx.dtensor_params import (
    ParamFeeder,
    as_dtensor,
    dtensor_layout,
    grouped_mesh,
    local,
    mark,
    params_as_inputs,
    tp_mesh,
)
from tpfx.faults import describe_failure
from tpfx.passes import (
    HOOK_OP,
    Placement,
    Replicate,
    Stages,
    local_param,
    rebind_hooks,
    regathered_in_backward,
)
from tpfx.plan import ShardingPlan
from tpfx.rng import install as install_rng_tracker
from tpfx.runtime.groups import group_namer, replica_groups
from tpfx.tree import State as TreeState
from tpfx.tree import build as build_tree
from tpfx.tree import full_shaped


def _aliases(model: torch.nn.Module) -> dict[str, list[str]]:
    """Each parameter's first name (the plan's key) -> every name it is registered under (tied weights)."""
    first: dict[int, str] = {}
    out: dict[str, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        out.setdefault(first.setdefault(id(p), name), []).append(name)
    return out


def _install(module: torch.nn.Module, fqn: str, param: torch.nn.Parameter) -> None:
    *path, leaf = fqn.split(".")
    m = module
    for part in path:
        if not hasattr(m, part):
            m.add_module(part, torch.nn.Module())
        m = getattr(m, part)
    m.register_parameter(leaf, param)


@functools.cache
def sharded_class(cls: type) -> type:
    """``ShardedModule`` named for the model's class, with its ``forward`` signature: clients that read the
    class's signature (HF Trainer: label names, dataset columns, loss kwargs) see the model's."""
    if not callable(getattr(cls, "forward", None)):
        return ShardedModule

    def forward(self: ShardedModule, *args: Any, **kwargs: Any) -> Any:
        return ShardedModule.forward(self, *args, **kwargs)

    forward.__signature__ = inspect.signature(cls.forward)  # type: ignore[attr-defined]
    name = f"Sharded{cls.__name__}"
    return type(name, (ShardedModule,), {"forward": forward, "__qualname__": name, "__module__": __name__})


class ShardedModule(torch.nn.Module):
    """This rank's piece of a model: original FQNs, local parameters, same call signature."""

    # kept in ``__dict__`` (not registered as submodules or parameters): declared for the type checker
    _model: torch.nn.Module
    _graphs: dict[Any, tuple[fx.GraphModule, Any]]
    _store: dict[str, torch.nn.Parameter]
    _plan: ShardingPlan
    _namer: Any
    _group: Any

    def __init__(self, model: torch.nn.Module, plan: ShardingPlan, rank: int, group: Any,
                 compile: bool, gather_outputs: bool = True, timeout: float | None = None, mesh: Any = None,
                 checkpoint_layers: bool = False) -> None:
        super().__init__()
        tree = build_tree(model)  # the model's module types; its containers are this module's (tpfx.tree)
        for k in ("_modules", "_parameters", "_buffers", "_non_persistent_buffers_set"):
            self.__dict__[k] = vars(tree)[k]
        self.__dict__["_tree"] = tree
        self.__dict__["_state"] = TreeState(tree, model)
        rebind_hooks({id(m): c for m, c in zip(model.modules(), tree.modules(), strict=True)})  # first capture's
        self.__dict__["_model"] = model
        self.__dict__["_graphs"] = {}
        self.__dict__["_store"] = {}
        self.__dict__["_plan"] = plan
        self.__dict__["_aliases"] = _aliases(model)
        vars(self).update(rank=rank, world_size=plan.world_size, _compile=compile, _gather_outputs=gather_outputs)
        self.training = model.training  # the first graph is captured in the model's mode; .train()/.eval() switch
        self.__dict__["_group"] = group
        self.__dict__["_namer"] = group_namer(group, plan.world_size, timeout)
        self._namer.prepare(replica_groups(plan))
        self.__dict__["_given_mesh"] = mesh  # the tp mesh given (a mesh axis), else one built on first use
        self.__dict__["_checkpoint_layers"] = checkpoint_layers  # auto_shard(activation_checkpointing=True)

    def load_params(self, model: torch.nn.Module, loader: Callable[[str, Placement], torch.Tensor]) -> None:
        """Register every parameter of ``model`` in the tree as ``loader(fqn, placement)`` gives this rank's
        tensor: planned parameters their placement's slice, parameters no graph uses whole (replicated)."""
        for fqn, p in model.named_parameters():
            pp = self._plan.placements.get(fqn)
            pl: Placement = pp.as_placement() if pp is not None else Replicate()
            self._register(fqn, torch.nn.Parameter(loader(fqn, pl), requires_grad=p.requires_grad))

    def serve(self, plan: ShardingPlan, args: tuple, kwargs: dict[str, Any], dynamic: bool) -> None:
        """Emit ``plan``'s graph for this rank and serve calls with inputs like ``args``/``kwargs`` with it
        (their shapes too unless ``dynamic``)."""
        self.add_graph(plan, self._key(args, kwargs, dynamic))

    def plain_params(self) -> list[str]:
        """Parameters whose layout has no DTensor placement (plain tensors holding this rank's slice)."""
        return list(self.__dict__.get("_plain", []))

    @property
    def plan(self) -> ShardingPlan:
        return self._plan

    def _refuse_copy(self, *args: Any) -> Any:
        raise TypeError("tpfx: a ShardedModule holds this rank's slices and its process group, so it cannot be "
                        "deep-copied or pickled (torch.save(sharded)); save it with sharded.save_pretrained(dir) "
                        "(the full model, loaded back with tpfx.from_pretrained) or tpfx.save(sharded, dir) (a "
                        "resumable per-rank checkpoint, loaded with tpfx.load)")

    __deepcopy__ = __reduce_ex__ = _refuse_copy  # type: ignore[assignment]

    def __getattr__(self, name: str) -> Any:
        """Parameters, buffers and submodules as ``nn.Module`` finds them (the tree's: this module shares its
        containers); else the tree root's attributes and methods (``main_input_name``, ``loss_type``,
        ``get_input_embeddings()``, ...: what clients such as HF Trainer read), which act on this rank's tree."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            tree = self.__dict__.get("_tree")
            if tree is None or name.startswith("__") or not hasattr(tree, name):
                raise
            return getattr(tree, name)

    def __setattr__(self, name: str, value: Any) -> None:
        """An attribute of the model's root (``sharded.scale = 0.5``) is set on the tree root, whose code the
        graphs are captured from; modules, parameters and buffers go to the shared containers as usual."""
        tree = self.__dict__.get("_tree")
        if tree is not None and name in vars(tree) and name not in self.__dict__:
            setattr(tree, name, value)
        else:
            super().__setattr__(name, value)

    @property
    def config(self) -> Any:
        """The wrapped model's ``config`` (transformers models)."""
        return getattr(self._tree, "config", None)

    @property
    def generation_config(self) -> Any:
        """The wrapped model's ``generation_config`` (transformers models)."""
        return getattr(self._tree, "generation_config", None)

    @property
    def device(self) -> torch.device:
        """The device this rank's slices live on."""
        return next(iter(self._store.values())).device if self._store else torch.device("cpu")

    def can_generate(self) -> bool:
        """As the wrapped model's ``can_generate()``."""
        fn = getattr(self._tree, "can_generate", None)
        return bool(fn()) if callable(fn) else False

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """transformers' ``generate`` (same arguments and return value) with a KV cache split by heads; the
        result is identical on every rank. Collective: every rank calls it with the same arguments. See
        ``tpfx.generate``."""
        if not self.can_generate():
            raise AttributeError(f"tpfx: {type(self._tree).__name__} cannot generate (its can_generate() is "
                                 "False)")
        from tpfx.generate import generate

        return generate(self, *args, **kwargs)

    def placement(self, fqn: str) -> Placement:
        """How this module holds tensor ``fqn``: its plan placement if it holds a slice, else ``Replicate``
        (parameters no graph uses, buffers)."""
        pp = self._plan.placements.get(fqn)
        return pp.as_placement() if pp is not None and fqn in self._store else Replicate()

    @property
    def group(self) -> dist.ProcessGroup | None:
        """The tensor-parallel process group (``None``: the default group)."""
        return self._group

    def state_dict(self, *args: Any, **kwargs: Any) -> Any:
        """This rank's slices under the original names (not the model's tensors): warns, since saving it as a
        checkpoint would silently lose the other ranks' parts. ``save_pretrained`` writes the full model;
        ``tpfx.save`` a resumable per-rank checkpoint."""
        self.sync()
        if not self.__dict__.get("_warned_state_dict") and self.world_size > 1:
            self.__dict__["_warned_state_dict"] = True
            warnings.warn("tpfx: ShardedModule.state_dict() holds only this rank's slices of split parameters; "
                          "use sharded.save_pretrained(dir) for the full model or tpfx.save(sharded, dir) for a "
                          "resumable checkpoint (HF Trainer's checkpoints: Trainer(..., "
                          "callbacks=[tpfx.TrainerCheckpoints()]))", UserWarning, stacklevel=2)
        return super().state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """torch's ``load_state_dict``, also taking the unsharded model's tensors (full shapes, tied aliases):
        each is cut to this rank's slice. See ``tpfx.full_state_dict``."""
        from tpfx.full_state_dict import load_state_dict

        return load_state_dict(self, state_dict, strict=strict, assign=assign)

    def save_pretrained(self, save_directory: str, *, max_shard_size: int | str = "5GB",
                        timeout_s: float = 300.0) -> None:
        """Write the unsharded model in transformers' layout (config.json, safetensors with the original FQNs
        and full shapes); a peft model writes its adapters in peft's (``tpfx.adapters``). Collective: every rank
        of the group must call it. See ``tpfx.pretrained``."""
        from tpfx.adapters import is_peft, save
        from tpfx.pretrained import save_pretrained

        if is_peft(self.tree):  # a peft model saves its adapters, as peft does (tpfx.adapters)
            save(self, save_directory, timeout_s=timeout_s)
            return
        save_pretrained(self, save_directory, max_shard_size=max_shard_size, timeout_s=timeout_s)

    @property
    def tree(self) -> torch.nn.Module:
        """The model's module tree holding this rank's tensors (``tpfx.tree``): this module's children and
        parameters are its own; the per-rank graphs were captured from its code."""
        return self._tree

    def state_key(self) -> int:
        """What the graphs depend on in the tree now (modes, plain attributes, hooks, config, dtypes), as the
        number of that state among those seen: a graph serves a call only in the state it was captured in
        (``tpfx.tree.State``)."""
        seen = self.__dict__.setdefault("_states", {})
        return seen.setdefault(self._state.key(self.training, ids=not self.wrapped()), len(seen))

    def _key(self, args: tuple, kwargs: dict[str, Any], dynamic: bool = True, state: int | None = None) -> Any:
        flat, spec = tree_flatten((args, kwargs))
        leaves = tuple((v.dtype, v.ndim) + (() if dynamic else tuple(v.shape)) if isinstance(v, torch.Tensor)
                       else v for v in flat)
        return (self.state_key() if state is None else state, str(spec), leaves)

    def sync(self) -> None:
        """Take in what the user changed in the tree since the last call (new modules' parameters cut to this
        rank's slices, assigned parameters, casts); every save path calls it first."""
        if not self.wrapped():
            self._sync_tree()
        self.check_params()

    def local_params(self) -> dict[str, torch.Tensor]:
        """This rank's tensor of every parameter by its first name, as registered now (a DTensor's local
        tensor): what the graphs compute with and what every save path writes."""
        self.sync()
        return {fqn: local(self._slot(fqn)[0]._parameters[self._slot(fqn)[1]]) for fqn in self._store}

    def persistent_buffers(self) -> dict[str, torch.Tensor]:
        """The buffers ``state_dict`` holds (not those registered ``persistent=False``), by FQN: whole on
        every rank."""
        return {f"{name}.{k}" if name else k: b for name, m in self.named_modules()
                for k, b in m._buffers.items() if b is not None and k not in m._non_persistent_buffers_set}

    def pins(self) -> dict[str, tuple[str, Placement | None]]:
        """The placements every capture after the first is planned with: the first plan's, and whole for the
        parameters it did not use (held whole)."""
        pins = self._plan.pins()
        return {**{f: ("replicate", Replicate()) for f in self._store if f not in pins}, **pins}

    def _check_consistent(self, plan: ShardingPlan) -> None:
        for fqn, pp in plan.placements.items():
            first = self._plan.placements.get(fqn)
            if (first is not None and first.as_dict() != pp.as_dict()) or (first is None and pp.style != "replicate"):
                raise RuntimeError(f"tpfx: a new capture placed {fqn} as {pp.placement}, the first plan as "
                                   f"{first.placement if first else 'held whole'}; this is a bug")

    def add_graph(self, plan: ShardingPlan, key: Any, local_outputs: frozenset[int] = frozenset()) -> fx.GraphModule:
        """Emit this rank's graph for ``plan``'s derivation (planned with this module's weight placements) and
        serve ``key`` with it. ``local_outputs``: positions in the flattened output returned as this rank's slice."""
        self._check_consistent(plan)
        if plan.derivation is None:
            raise ValueError("tpfx: add_graph needs a plan derived in this process")
        local_gm = Stages().emit_rank(plan.derivation, self.rank, self._namer, self._store, self._gather_outputs,
                                      local_outputs)
        if self._compile and any(n.target is HOOK_OP for n in local_gm.graph.nodes):
            raise NotImplementedError("tpfx: forward hooks on a model sharded with compile=True are not supported "
                                      "(the compiled backward would fix what a hook does at compile time); remove "
                                      "the hooks or shard with compile=False")
        fqn_of = {id(p): fqn for fqn, p in self._store.items()}
        buffers = {name for name, _ in self._tree.named_buffers(remove_duplicate=False)}
        slots: list[tuple[dict, str]] = []
        targets: list[str] = []
        for n in local_gm.graph.nodes:
            if n.op != "get_attr" or n.target in targets:
                continue
            fqn = fqn_of.get(id(attrgetter(n.target)(local_gm)))
            if fqn is not None:  # a parameter: the tree's, as registered at call time
                module, leaf = self._slot(fqn)
                slots.append((module._parameters, leaf))
            elif n.target in buffers:  # a buffer (running statistics): the tree's, written in place
                parent, _, leaf = str(n.target).rpartition(".")
                slots.append((self._tree.get_submodule(parent)._buffers, leaf))
            else:
                continue
            targets.append(str(n.target))
        fed = params_as_inputs(local_gm, targets)
        # no-grad regions were inlined at capture (``inline_grad_regions``), so each rank compiles as one graph
        runner = ParamFeeder(torch.compile(fed, dynamic=True) if self._compile else fed, slots)
        self._graphs[key] = (local_gm, runner)
        return local_gm

    def _slot(self, fqn: str) -> tuple[torch.nn.Module, str]:
        parent, _, leaf = fqn.rpartition(".")
        return self.get_submodule(parent), leaf

    def _register(self, fqn: str, param: torch.nn.Parameter) -> None:
        """Register this rank's slice ``param`` of ``fqn`` (under each of its names): as a DTensor parameter on
        the tp mesh where its layout has a DTensor placement (``tpfx.dtensor_params``), else as it is."""
        self._store[fqn] = param
        layout = dtensor_layout(self.placement(fqn), self.world_size)
        pp = self._plan.placements.get(fqn)
        if layout is not None:
            k, pls = layout
            shape = tuple(pp.shape) if pp is not None else tuple(param.shape)
            param = as_dtensor(param, pls, self._tp_mesh(k, param.device), shape)
        else:
            self.__dict__.setdefault("_plain", []).append(fqn)
        for name in self._aliases.get(fqn, [fqn]):
            _install(self, name, param)
        self.__dict__.setdefault("_slots", {})[fqn] = (*self._slot(fqn), param)

    def _adopt(self, fqn: str, p: torch.Tensor) -> None:
        """A parameter the user put in the tree after sharding (a new module, ``m.weight = Parameter(t)``): its
        full tensor is cut to this rank's slice and registered in its place; one already laid out as this
        rank's (a DTensor of the same placement) is taken as it is."""
        from torch.distributed.tensor import DTensor

        pp = self._plan.placements.get(fqn)
        full = tuple(pp.shape) if pp is not None else tuple(p.shape)
        if isinstance(p, DTensor) and tuple(p.shape) == full and fqn in self.__dict__.get("_slots", {}) \
                and self._slots[fqn][2].placements == p.placements:
            self._slots[fqn] = (*self._slot(fqn), p)
            return
        if isinstance(p, DTensor):
            raise RuntimeError(f"tpfx: {fqn!r} holds a slice laid out for another place (a sharded parameter "
                               "moved or copied there after auto_shard: a new layer, an adapter wrapping a layer); "
                               "tpfx plans by parameter names, so change the unsharded model and shard it anew "
                               "(tpfx.auto_shard), or assign full tensors (each rank keeps its slice). For peft "
                               "adapters: tpfx.auto_shard(get_peft_model(model, config)), or "
                               "tpfx.from_pretrained(path, adapter=config) to load the base by slices")
        if tuple(p.shape) != full:
            raise RuntimeError(f"tpfx: parameter {fqn!r} was replaced after auto_shard by a {type(p).__name__} of "
                               f"shape {tuple(p.shape)}; the plan holds it as {full} in full. Assign the full tensor "
                               "(each rank keeps its slice), or shard the changed model anew (tpfx.auto_shard)")
        piece = local_param(p.detach(), self.placement(fqn) if pp is not None else Replicate(), self.rank,
                            self.world_size)
        piece.requires_grad_(p.requires_grad)
        self._register(fqn, piece)

    def _sync_tree(self) -> None:
        """Before a capture: parameters of modules the user added or replaced become this rank's slices
        (``_adopt``); parameters no longer in the tree leave the store."""
        self.__dict__["_aliases"] = _aliases(self._tree)
        live = {fqn: self._tree.get_parameter(fqn) for fqn in self._aliases}
        for fqn in [f for f in self._store if f not in live]:
            del self._store[fqn]
            self._slots.pop(fqn, None)
        for fqn, p in live.items():
            if fqn not in self._slots or self._slots[fqn][2] is not p or self._slots[fqn][0] is not \
                    self._slot(fqn)[0]:
                self._adopt(fqn, p)

    def _tp_mesh(self, k: int, device: torch.device) -> Any:
        """The tp mesh (``k`` = the tp size), or its view as ``k`` groups of consecutive ranks; built once each."""
        meshes = self.__dict__.setdefault("_meshes", {})
        if self.world_size not in meshes:
            meshes[self.world_size] = self.__dict__.get("_given_mesh") or tp_mesh(self._group, device)
            install_rng_tracker(device)  # torch.nn.init on a split DTensor on CPU: a slice per rank (tpfx.rng)
        if k not in meshes:
            meshes[k] = grouped_mesh(meshes[self.world_size], k)
        return meshes[k]

    def graph_module(self, *args: Any, **kwargs: Any) -> fx.GraphModule:
        """The emitted per-rank GraphModule that serves these inputs (captured if needed)."""
        kwargs = prepare_kwargs(self._tree, kwargs)
        return self._entry(args, kwargs)[0]

    @contextlib.contextmanager
    def capturing(self) -> Iterator[torch.nn.Module]:
        """The tree to capture a graph from: in this module's mode (a train-mode graph holds the dropouts),
        its parameters as fake tensors of their full shapes (``tpfx.tree.full_shaped``)."""
        if not self.wrapped():
            self._sync_tree()
        tree, was = self._tree, self._tree.training
        tree.training = self.training
        shapes = {f: tuple(pp.shape) for f, pp in self._plan.placements.items()}
        try:
            with full_shaped(tree, shapes):
                yield tree
        finally:
            tree.training = was

    def _cached(self, args: tuple, kwargs: dict[str, Any], state: int) -> tuple[fx.GraphModule, Any] | None:
        """The graph that already serves these inputs, if any (dynamic first, then static)."""
        for dynamic in (True, False):
            key = self._key(args, kwargs, dynamic, state)
            if key in self._graphs:
                return self._graphs[key]
        return None

    def _entry(self, args: tuple, kwargs: dict[str, Any]) -> tuple[fx.GraphModule, Any]:
        state = self.state_key()
        return self._cached(args, kwargs, state) or self._capture(args, kwargs, state)

    def _capture(self, args: tuple, kwargs: dict[str, Any], state: int) -> tuple[fx.GraphModule, Any]:
        """Capture, plan and emit a graph for these inputs (no graph serves them yet) from the tree as it is."""
        with self.capturing() as tree:
            plan, dynamic = derive(tree, args, kwargs, self.world_size, self.pins(), self._plan.sequence_parallel,
                                   Stages(checkpoint_layers=self.__dict__["_checkpoint_layers"]))
        state = self.state_key()  # after the capture took in new modules' parameters (_sync_tree)
        key = self._key(args, kwargs, dynamic, state)
        self.add_graph(plan, key)
        alive = [(m, list(vars(m).values())) for m in self._tree.modules()]  # what the key names by id stays
        self.__dict__.setdefault("_alive", []).append(alive)
        return self._graphs[key]

    check_first_call = True  # compare the first call's inputs across the group (set False to skip)
    check_calls = True  # compare every call's shapes and structure across the group (False: skip)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        kwargs = prepare_kwargs(self._tree, kwargs)
        if kwargs.get("use_cache") or kwargs.get("past_key_values") is not None:
            raise ValueError("tpfx: a sharded forward keeps no KV cache (use_cache=True / past_key_values); "
                             "cached decoding is sharded.generate(...), which keeps a head-split cache")
        self.check_params()
        state = self.state_key()
        entry = self._cached(args, kwargs, state)
        check = self._check_call(args, kwargs, entry)
        if check is not None and (entry is None or self._compile):
            check()  # before a capture (it communicates) or a compiled graph (it cannot settle one): now
            check = None
        return self.call(entry or self._capture(args, kwargs, state), args, kwargs, check)

    def call(self, entry: tuple[fx.GraphModule, Any], args: tuple, kwargs: dict[str, Any],
             check: Callable[[], None] | None = None) -> Any:
        """The one way a per-rank graph runs (``forward`` and generation): ``entry`` is ``(graph, runner)``
        (``graph(key)``, ``add_graph``); this rank's parameters are fed at call time; ``check`` (a pending
        agreement check) is settled right before the graph's first collective; a collective that fails is
        named (its node, the ranks that are gone: ``tpfx.faults``)."""
        from tpfx.agreement import Disagreement

        local, runner = entry
        try:
            with checked_before_collectives(check), self._saving():
                return runner(*args, **kwargs)
        except Disagreement:
            raise
        except RuntimeError as e:  # a collective that failed: name its node (tpfx.faults)
            msg = describe_failure(e, local, self.rank)
            if msg is None:
                raise
            raise RuntimeError(msg) from e

    def graph(self, key: Any) -> tuple[fx.GraphModule, Any] | None:
        """The ``(graph, runner)`` serving ``key`` (as ``add_graph`` registered it), if any."""
        return self._graphs.get(key)

    def graph_keys(self, feature: str) -> list[tuple]:
        """The keys of the graphs a feature captured (``("generate", state, phase, ...)`` -> ``(phase, ...)``)."""
        return list(self.feature_graphs(feature))

    def feature_graphs(self, feature: str) -> dict[tuple, fx.GraphModule]:
        """The emitted graphs a feature captured, by key without the feature and state (``(phase, ...)``)."""
        return {k[2:]: v[0] for k, v in self._graphs.items() if isinstance(k, tuple) and k and k[0] == feature}

    def attachment(self, name: str, make: Callable[[], Any]) -> Any:
        """A feature's state kept with this module (generation's decoder): made by ``make`` on first use."""
        store = self.__dict__.setdefault("_attachments", {})
        if name not in store:
            store[name] = make()
        return store[name]

    def holds(self, fqn: str) -> bool:
        """Whether ``fqn`` is one of this module's parameters (by its first name)."""
        return fqn in self._store

    regather_in_backward = True  # sequence parallel: keep gathered inputs as chunks for backward (Megatron-SP)

    def _saving(self) -> contextlib.AbstractContextManager[None]:
        """How a training forward keeps values for backward: with sequence parallelism (eager graphs), the
        all-gathered inputs of column-split matmuls as this rank's chunk, re-gathered in backward."""
        if self._plan.sequence_parallel and self.regather_in_backward and not self._compile \
                and torch.is_grad_enabled():
            return regathered_in_backward()
        return contextlib.nullcontext()

    def _check_call(self, args: tuple, kwargs: dict[str, Any],
                    entry: tuple[fx.GraphModule, Any] | None = None) -> Callable[[], None] | None:
        """Ranks called with other shapes or another structure (one passes ``labels``, one a longer sequence)
        would deadlock or mix wrong sizes in the next collective. The first call compares its inputs' contents
        (``_check_first``, once); every later call digests its shapes and structure and issues one all-reduce of
        two integers without waiting: the returned check, settled right before the forward's first collective
        (``checked_before_collectives``), so its round trip overlaps the compute before it. A per-call skip
        would not be symmetric: a rank whose call did not change would not join the check of one whose did."""
        from tpfx.agreement import agree_later, host_group, rng_digest, signature

        if self.check_first_call and not self.__dict__.get("_first_checked"):
            self._check_first(args, kwargs)
            return None
        if not self.check_calls or self.world_size == 1:
            return None
        if "_host" not in self.__dict__:  # every rank of the group gets here at the same call
            self.__dict__["_host"] = host_group(self._group or dist.group.WORLD, self.device)
        group, device = self.__dict__["_host"]
        what: Any = signature((args, kwargs))
        name = "the shapes and structure of this call's inputs"
        if entry is not None and self._random(entry[0]):  # dropout: ranks draw the masks of replicated values alike
            what = (what, rng_digest(self.device))
            name += (" or the random state the graph's dropout draws from (a rank drew random numbers the others "
                     "did not, e.g. a rank-0-only torch.randint: draw the same numbers on every rank, or give "
                     "per-rank draws a torch.Generator of their own)")
        return agree_later(group, what, name, device)

    def _random(self, gm: fx.GraphModule) -> bool:
        """Whether graph ``gm`` draws random numbers (computed once per graph)."""
        from tpfx.agreement import draws_random

        memo = self.__dict__.setdefault("_draws", {})
        if id(gm) not in memo:
            memo[id(gm)] = draws_random(gm)
        return memo[id(gm)]

    def _check_first(self, args: tuple, kwargs: dict[str, Any]) -> None:
        """The first call's inputs, digested and compared across the tensor-parallel group (one small
        all-gather, once): ranks of one group fed different batches (a data loader not keyed by the
        data-parallel axis) raise on every rank instead of training a silently wrong model. The same all-gather
        gives every rank the group's first rank's random state: the ranks of a group draw the same dropout
        masks (seeded alike or not), as one unsharded process would."""
        from tpfx.agreement import agree, describe

        self.__dict__["_first_checked"] = True
        if self.world_size > 1:
            agree(self._group, describe((args, kwargs)), "the inputs of the first call (every rank of one "
                  "tensor-parallel group must be fed the same batch: see tpfx.dp_sampler)", share_rng=True)

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        """``nn.Module._apply`` (``.to()``, ``.half()``, ``.cuda()``): torch swaps DTensor parameters for new
        ones; they are marked ``ShardedParameter`` again (``.data =`` then still takes effect)."""
        out = super()._apply(fn, recurse)
        if not self.wrapped():
            for p in self.parameters():
                mark(p)
        return out

    def check_params(self) -> None:
        """The graphs compute with the parameters registered at call time. A data-parallel wrapper may swap
        them for its own if they hold the same local slices (FSDP2's ``fully_shard`` and torch's composable
        ``replicate`` put unsharded DTensors on the tp mesh in place before each forward). Anything else is
        refused, as is torch's ``DistributedDataParallel``, which does not reduce DTensor gradients
        (checks per parameter, microseconds)."""
        from torch.distributed.tensor import DTensor
        from torch.nn.parallel import DistributedDataParallel

        active = DistributedDataParallel._get_active_ddp_module()
        slots = self.__dict__.get("_slots", {})
        if active is not None and active.module is self and any(isinstance(o, DTensor) for *_, o in slots.values()):
            raise RuntimeError(
                "tpfx: torch's DistributedDataParallel does not average the gradients of DTensor parameters (a "
                "ShardedModule's are DTensors on the tp mesh), so it would train silently wrong; wrap it with "
                "torch's composable DDP instead, replicate(sharded, mesh=mesh['dp']) from "
                "torch.distributed._composable.replicate_with_fsdp, or with FSDP2's fully_shard(sharded, "
                "mesh=mesh['dp'])")
        for fqn, (module, leaf, ours) in slots.items():
            p = module._parameters.get(leaf)
            if p is ours:
                mark(p)  # a submodule's .to() swapped its class back to DTensor
                continue
            if p is None:
                raise RuntimeError(f"tpfx: parameter {fqn!r} is no longer where the plan has it (a parametrization "
                                   "such as weight_norm, or a module that moved it); tpfx plans by parameter names: "
                                   "change the unsharded model, then shard it (tpfx.auto_shard)")
            if p is not None and not isinstance(p, DTensor) and not isinstance(ours, DTensor) \
                    and local(p).shape == local(ours).shape:
                continue  # a plain slice replaced by one of the same shape: fed as it is
            if p is not None and not self.wrapped() and not (isinstance(p, DTensor) and isinstance(ours, DTensor)
                                                              and p.placements != ours.placements):
                self._adopt(fqn, p)  # the user assigned a new parameter: its full tensor, this rank's slice
                continue
            if p is None or isinstance(p, DTensor) != isinstance(ours, DTensor) or local(p).shape != local(ours).shape:
                raise RuntimeError(
                    f"tpfx: parameter {leaf!r} of this ShardedModule was replaced after auto_shard by one that is "
                    f"not this rank's slice ({type(p).__name__} of shape {tuple(getattr(p, 'shape', ()))}); its "
                    "per-rank graphs compute with this rank's slices. Data parallelism over the dp axis: "
                    "fully_shard(sharded, mesh=mesh['dp']) or replicate(sharded, mesh=mesh['dp'])")

    def wrapped(self) -> bool:
        """Whether a data-parallel wrapper (``fully_shard``, ``replicate``) now holds the parameters: they are
        then its shards, not this rank's tp slices."""
        from torch.distributed._composable_state import _get_module_state

        return _get_module_state(self) is not None

    def check_own_params(self, what: str) -> None:
        """Raise if a data-parallel wrapper holds the parameters (``what`` needs this rank's tp slices)."""
        if self.wrapped():
            raise RuntimeError(f"tpfx: {what} reads this rank's tensor-parallel slices, but a data-parallel "
                               "wrapper (fully_shard / replicate) now holds the parameters as its own shards; "
                               "use torch's APIs, which see them as DTensors: torch.nn.utils.clip_grad_norm_, "
                               "torch.distributed.checkpoint with get_state_dict")
