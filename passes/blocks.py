"""Block capture: export a deep model through a few layers of each kind in its stack and stitch the others in.

torch.export's cost grows with depth (with dynamic dims, about 0.19 s of SymInt bookkeeping per Llama-70B
decoder layer), while the layers of a stack run a few computations on different weights. So:

1. ``find_stack``: the model's stack is its longest ``ModuleList``. Its layers are grouped into *kinds*: two
   layers are of one kind when they have the same module classes, parameter and buffer names, shapes, dtypes
   and ``requires_grad``, the same plain attributes (configuration constants such as a sliding window, also
   inside modules held outside the module tree), except attributes that hold each layer's own index, and the
   same entries in every config list with one entry per layer (``layer_types``). A plain Llama has one kind;
   Gemma 3 two (sliding and full attention), DeepSeek-V3 two (its first dense layers, then MoE), a hybrid one
   per layer type. The *cut* is the first layer from which on every layer's kind has 3 layers before it:
   the layers before the cut are traced, the others stand in. Each kind's last traced layer is its
   *template*, the one before it of its kind its *sibling* (a kind's first layer can hold nodes made on first
   use, a mask sliced once and reused later, so it is neither).
2. ``capture_blocks``: the model is exported with the layers before the cut real and every later layer
   replaced by a stand-in, which records its call and returns a clone of its hidden input (its one node) in
   its template's output structure (the list is put back afterwards). Export so traces the layers before the
   cut, and the parent's loop over all of them.
3. Proof that every stand-in stands for a copy of its kind's template:
   - the calls: each stand-in is called once, in order, with its template's input structure, constants and
     tensors (the same objects: masks, rotary tables), reading the previous layer's output where the template
     read the output of the layer before it;
   - the graph: the template's nodes (those whose ``nn_module_stack`` names it) copy its sibling's: the same
     ops, constants and shapes, the same values from before, their own weights, and the output of the layer
     before each (one value: the residual stream handed on), read nowhere but in the layer and the next one;
     the layers' nodes are contiguous, the loop computes nothing between layers, and the stand-ins follow the
     last traced layer, each reading the one before;
   - the layers themselves: each template runs once more, on static meta (or fake) copies of its inputs,
     logging the attribute names read on each of its modules. A layer of its kind has the same code, compared
     attributes and weight shapes, and gets the same inputs; so unless the template read its own index or a
     state the kinds do not compare that differs between the layers (``training``, hooks), every layer runs
     the template's ops. Where it did, every layer of the kind runs once and the ops each runs, with their
     shapes and constants, must be the template's: a layer that branches on its own index
     (``if self.layer_idx == last``) runs other ops.
4. ``stitch``: each stand-in becomes a copy of its template's nodes, reading its own weights and the output of
   the layer before it, and what read the last stand-in reads the last copy. Names then come from
   ``capture.canonical_names``, as for a whole capture (export's own counters skip names irregularly, so its
   names are not a function of the layer).

Anything not proven gives a reason instead of a graph; the caller then captures the whole model and records
the reason (``plan.fallbacks``). What stays unproven: a layer whose computation depends on values rather than
code (the same ops on inputs or constants the checks do not see), which no finite trace rules out, or on what
the read log does not see: its own identity (``self is ...``), a read through its ``__dict__``, or state
outside the layer that changes from call to call.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch._export.utils import _compiling_state_context
from torch._subclasses.fake_tensor import FakeTensorMode, maybe_get_fake_mode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from . import capture as _capture

# the default of Stages(blocks=...) and tpfx.plan(blocks=...); tpfx.passes.blocks.ENABLED = False captures
# every model whole (auto_shard included)
ENABLED = True
MIN_LAYERS = 4
# layers of a kind traced before any of its layers stands in: its first may hold first-use nodes (a mask sliced
# once), the next two do not and are the pair compared
TRACED = 3
NO_STACK = "no ModuleList"


# ------------------------------------------------------------------------------------------- the stack


def _plain_attrs(module: torch.nn.Module) -> dict[str, Any]:
    skip = {"_parameters", "_buffers", "_modules", "training"}
    return {k: v for k, v in vars(module).items() if k not in skip and not k.startswith("_forward")
            and not k.endswith("_hooks") and not k.startswith("_state_dict") and not k.startswith("_load_state")}


def _same(a: Any, b: Any, depth: int = 0) -> bool:
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return False  # a tensor attribute (not a parameter or buffer) becomes a graph constant: same object only
    if isinstance(a, functools.partial) and isinstance(b, functools.partial):  # one made per layer (activations)
        return _same(a.func, b.func, depth) and _same(a.args, b.args, depth) and _same(a.keywords, b.keywords, depth)
    if depth < 4 and type(a) is type(b) and isinstance(a, dict | list | tuple):  # containers of such values
        pairs = list(zip(a.items(), b.items())) if isinstance(a, dict) else [((0, x), (0, y)) for x, y in zip(a, b)]
        return len(a) == len(b) and all(ka == kb and _same(x, y, depth + 1) for (ka, x), (kb, y) in pairs)
    if depth < 4 and type(a) is type(b) and isinstance(a, torch.nn.Module):
        # a module held outside the module tree (transformers' per-layer kernel functions): one of its own per
        # layer, alike in class, weights and attributes
        attrs_a, attrs_b = _plain_attrs(a), _plain_attrs(b)
        return _layout(a) == _layout(b) and attrs_a.keys() == attrs_b.keys() \
            and all(_same(v, attrs_b[k], depth + 1) for k, v in attrs_a.items())
    try:
        return bool(type(a) is type(b) and a == b)
    except Exception:  # noqa: BLE001 - values that cannot be compared are not proven equal
        return a is b


def _layout(module: torch.nn.Module) -> tuple:
    """What must agree between two layers: module classes, parameters and buffers by name and kind."""
    mods = tuple((n, type(m)) for n, m in module.named_modules())
    params = tuple((n, tuple(p.shape), p.dtype, p.requires_grad) for n, p in module.named_parameters())
    bufs = tuple((n, tuple(b.shape), b.dtype) for n, b in module.named_buffers())
    return mods, params, bufs


def _attrs(layer: torch.nn.Module) -> dict[tuple[str, str], Any]:
    return {(sub, k): v for sub, m in layer.named_modules() for k, v in _plain_attrs(m).items()}


def _index_keys(attrs: list[dict[tuple[str, str], Any]]) -> set[tuple[str, str]]:
    """Attributes that hold each layer's own index (``layer_idx``, or ``2 * i + 2`` as a residual-add counter):
    in every layer that has one (three or more: two ints fit any line), an int affine in its position in the
    stack, not constant."""
    out = set()
    for key in {k for a in attrs for k in a}:
        held = [(i, a[key]) for i, a in enumerate(attrs) if key in a]
        if len(held) < 3 or not all(type(v) is int for _, v in held):
            continue
        (i0, v0), (i1, v1) = held[0], held[1]
        step, rest = divmod(v1 - v0, i1 - i0)
        if step and not rest and all(v == v0 + step * (i - i0) for i, v in held):
            out.add(key)
    return out


def _config_rows(model: torch.nn.Module, n: int) -> list[tuple]:
    """Per layer, its entries of every config list with one entry per layer (``layer_types``)."""
    config = getattr(model, "config", None)
    lists = [v for v in (vars(config).values() if config is not None else ()) if isinstance(v, list | tuple)
             and len(v) == n]
    return [tuple(repr(v[i]) for v in lists) for i in range(n)]


def _same_attrs(a: dict[tuple[str, str], Any], b: dict[tuple[str, str], Any], index: set[tuple[str, str]]) -> bool:
    return a.keys() == b.keys() and all(k in index or _same(v, b[k]) for k, v in a.items())


def layer_kinds(model: torch.nn.Module, layers: list[torch.nn.Module]) -> list[int]:
    """A kind for every layer (0, 1, ... in order of first appearance): layers of one kind have one layout,
    the same attributes but their index, and the same per-layer config entries."""
    return _kinds(model, layers)[0]


def _kinds(model: torch.nn.Module, layers: list[torch.nn.Module]) -> tuple[list[int], set[tuple[str, str]]]:
    """``layer_kinds`` and the index attributes it set aside."""
    attrs = [_attrs(m) for m in layers]
    layouts, rows, index = [_layout(m) for m in layers], _config_rows(model, len(layers)), _index_keys(attrs)
    firsts: list[int] = []  # each kind's first layer
    kinds = []
    for i in range(len(layers)):
        kind = next((k for k, f in enumerate(firsts) if layouts[f] == layouts[i] and rows[f] == rows[i]
                     and _same_attrs(attrs[f], attrs[i], index)), None)
        if kind is None:
            kind = len(firsts)
            firsts.append(i)
        kinds.append(kind)
    return kinds, index


def _cut(kinds: list[int]) -> int:
    """The first layer from which on every layer's kind has ``TRACED`` layers before it (``len(kinds)``: none)."""
    seen: list[int] = [0] * (max(kinds) + 1)
    for cut in range(len(kinds)):
        if all(seen[k] >= TRACED for k in set(kinds[cut:])):
            return cut
        seen[kinds[cut]] += 1
    return len(kinds)


@dataclass
class Stack:
    """The model's stack of layers, split into kinds: layers before ``cut`` are traced, the others stand in for
    a copy of their kind's ``template`` (its last traced layer), which is compared with its ``sibling``."""

    path: str
    layers: list[torch.nn.Module]
    kinds: list[int]
    cut: int
    index: set[tuple[str, str]] = field(default_factory=set)  # (submodule, attribute): each layer's own index
    templates: dict[int, int] = field(default_factory=dict)  # kind -> template layer
    siblings: dict[int, int] = field(default_factory=dict)  # kind -> the traced layer of its kind before it

    def __post_init__(self) -> None:
        for k in set(self.kinds[self.cut:]):
            traced = [i for i in range(self.cut) if self.kinds[i] == k]
            self.templates[k], self.siblings[k] = traced[-1], traced[-2]

    def template(self, layer: int) -> int:
        return self.templates[self.kinds[layer]]


def find_stack(model: torch.nn.Module) -> Stack | str:
    """The model's stack (its longest ``ModuleList``) with its layers' kinds and the cut; or why there is none
    to stand in for."""
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.ModuleList)
             and len(m) >= MIN_LAYERS and name]
    if not lists:
        return f"{NO_STACK} of {MIN_LAYERS} or more layers"
    name, stack = max(lists, key=lambda nm: len(nm[1]))
    layers = list(stack)
    if len({id(m) for m in layers}) < len(layers):
        return f"{name} holds one module several times"
    kinds, index = _kinds(model, layers)
    cut = _cut(kinds)
    if cut == len(layers):
        counts = [kinds.count(k) for k in range(max(kinds) + 1)]
        return (f"{name}: no layer to stand in for: its {len(layers)} layers are of {len(counts)} kinds with "
                f"{counts} layers, and every layer's kind needs {TRACED} traced layers before it")
    return Stack(name, layers, kinds, cut, index)


# ------------------------------------------------------------------------------------ stand-in layers


class _Calls:
    """What the templates and the stand-ins were called with, in call order, and the templates' outputs."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.calls: dict[int, tuple[tuple, Any, Any]] = {}  # layer -> (input leaves, tree spec, hidden state due)
        self.order: list[int] = []  # the layers recorded, in call order
        self.out: dict[int, Any] = {}  # template layer -> its output
        self.hidden: torch.Tensor | None = None  # the output the next layer is to read
        self.problem: str | None = None

    def record(self, layer: int, args: tuple, kwargs: dict[str, Any]) -> list[Any]:
        leaves, spec = tree_flatten((args, kwargs))
        self.calls[layer] = (tuple(leaves), spec, self.hidden)
        self.order.append(layer)
        return leaves

    def signature(self, layer: int) -> tuple | None:
        """Layer ``layer``'s call as data: its inputs' structure, constants, and tensors by identity (the
        handed-on hidden state as ``"hidden"``); None if it does not read the previous layer's output."""
        leaves, spec, hidden = self.calls[layer]
        marks = tuple("hidden" if hidden is not None and x is hidden else
                      id(x) if isinstance(x, torch.Tensor) else repr(x) for x in leaves)
        return (str(spec), marks) if "hidden" in marks else None


def _hidden_leaf(out: Any) -> torch.Tensor | None:
    tensors = [x for x in tree_flatten(out)[0] if isinstance(x, torch.Tensor)]
    return tensors[0] if len(tensors) == 1 else None


class _StandIn(torch.nn.Module):
    """Layer ``k`` of the stack during a block capture: records its call and returns its template's output
    structure with a clone of its hidden input."""

    def __init__(self, k: int, template: int, calls: _Calls, layer: torch.nn.Module) -> None:
        super().__init__()
        self.k, self.template, self.calls_ = k, template, calls
        self.__dict__["_real"] = layer  # not a submodule: its weights stay out of the capture

    def __getattr__(self, name: str) -> Any:
        """The real layer's plain attributes (a loop that picks a mask by ``layer.attention_type``): what the loop
        then passes is checked against the template's call."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            real = vars(self.__dict__["_real"])
            if name in real and not isinstance(real[name], torch.Tensor | torch.nn.Module):
                return real[name]
            raise

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        calls = self.calls_
        leaves = calls.record(self.k, args, kwargs)
        hidden = next((x for x in leaves if x is calls.hidden), None)
        if hidden is None:
            calls.problem = f"layer {self.k} does not read the output of the layer before it"
            hidden = next(x for x in leaves if isinstance(x, torch.Tensor))
        new = hidden.clone()  # the stand-in's one node, known by its module path (a custom op costs 2 ms more)
        out_leaves, out_spec = tree_flatten(calls.out.get(self.template))
        calls.hidden = new
        return tree_unflatten([new if isinstance(x, torch.Tensor) else x for x in out_leaves], out_spec)


def _traced_hooks(stack: Stack, calls: _Calls) -> list[Any]:
    """Hooks on the traced layers: each hands on its output as the hidden state the next layer is due to read;
    the templates' calls and outputs are recorded."""
    def pre(i: int, _: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        calls.record(i, args, kwargs)

    def post(i: int, _: torch.nn.Module, args: tuple, out: Any) -> None:
        calls.hidden = _hidden_leaf(out)
        if i in templates:
            calls.out[i] = out
            if calls.hidden is None:
                calls.problem = "a layer's output holds other tensors than its hidden state"

    templates = set(stack.templates.values())
    hooks = [stack.layers[0].register_forward_pre_hook(lambda *_: calls.reset())]  # a new trace starts afresh
    for i in range(stack.cut):
        if i in templates:
            hooks.append(stack.layers[i].register_forward_pre_hook(functools.partial(pre, i), with_kwargs=True))
        hooks.append(stack.layers[i].register_forward_hook(functools.partial(post, i)))
    return hooks


def _uniform_calls(stack: Stack, calls: _Calls) -> str | None:
    """Why the stand-ins were not called as their templates were (None: they were)."""
    if calls.problem:
        return calls.problem
    if calls.order != sorted(stack.templates.values()) + list(range(stack.cut, len(stack.layers))):
        return f"the layers were called in the order {calls.order}"
    for k in range(stack.cut, len(stack.layers)):
        t = stack.template(k)
        if calls.signature(k) != calls.signature(t) or calls.signature(t) is None:
            return f"layer {k} is called with other inputs than layer {t}"
    return None


# --------------------------------------------------------------------------------------------- op logs


def _static(x: Any, device: torch.device | None) -> Any:
    """A static tensor like ``x`` (its example sizes and strides; on ``device``), to run a layer outside the
    capture."""
    if not isinstance(x, torch.Tensor):
        return x
    hint = [int(d.node.hint) if isinstance(d, torch.SymInt) else int(d) for d in x.shape]
    stride = [int(d.node.hint) if isinstance(d, torch.SymInt) else int(d) for d in x.stride()]
    return torch.empty_strided(hint, stride, dtype=x.dtype, device=device or x.device)


_PLAIN = (int, float, bool, str, type(None), torch.dtype, torch.device, torch.layout, torch.memory_format)


def _sig(x: Any) -> Any:
    """An op argument as comparable data: a tensor by its shape and dtype, a constant by value."""
    if isinstance(x, torch.Tensor):
        return x.shape, x.dtype
    if isinstance(x, list | tuple):
        return tuple(_sig(v) for v in x)
    if isinstance(x, dict):
        return tuple((k, _sig(v)) for k, v in x.items())
    return x if isinstance(x, _PLAIN) else repr(x)


class _OpLog(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        self.ops.append((func, _sig(args), _sig(kwargs or {})))
        return func(*args, **(kwargs or {}))


class _Reading:
    """While active, the names read on each module of ``mods`` (``getattr`` included): each module's class is
    swapped for a subclass that logs reads (FSDP2 swaps classes the same way), and swapped back on exit."""

    def __init__(self, mods: dict[str, torch.nn.Module]) -> None:
        self.mods = mods
        self.reads: dict[str, set[str]] = {name: set() for name in mods}

    def __enter__(self) -> _Reading:
        self.swapped: list[tuple[torch.nn.Module, type]] = []
        try:
            for name, m in self.mods.items():
                _READS[id(m)] = self.reads[name]
                cls = type(m)
                m.__class__ = _reading_class(cls)  # type: ignore[arg-type]
                self.swapped.append((m, cls))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for m, cls in self.swapped:
            m.__class__ = cls
        for m in self.mods.values():
            _READS.pop(id(m), None)


_READS: dict[int, set[str]] = {}  # id(module) -> the names read on it (while a _Reading is active)


@functools.cache
def _reading_class(cls: type) -> type:
    def __getattribute__(self: Any, name: str) -> Any:  # noqa: N807 - the slot itself
        log = _READS.get(id(self))
        if log is not None:
            log.add(name)
        return cls.__getattribute__(self, name)  # type: ignore[call-arg]

    return type(cls.__name__, (cls,), {"__getattribute__": __getattribute__, "__qualname__": cls.__qualname__,
                                       "__module__": cls.__module__})


_STRUCTURE = {"_parameters", "_buffers", "_modules"}  # compared by the layers' layouts


def _reads_own_state(stack: Stack, kind: int, reads: dict[str, set[str]]) -> bool:
    """Whether the template of ``kind``, having read ``reads``, may compute other than some layer of its kind: it
    read an index attribute, or a state that is not a compared attribute (``training``, hooks) and differs
    between the kind's layers. (Reads through a module's ``__dict__`` are not seen: ``nn.Module`` reads its own
    on every parameter access.)"""
    template = stack.layers[stack.templates[kind]]
    members = [m for m, k in zip(stack.layers, stack.kinds, strict=True) if k == kind]
    for sub, names in reads.items():
        if any((sub, n) in stack.index for n in names):
            return True
        own = vars(template.get_submodule(sub))
        read = names & (own.keys() - _STRUCTURE)
        for m in members:
            theirs = vars(m.get_submodule(sub))
            if any(not _same(theirs.get(n), own[n]) for n in read):
                return True
    return False


def _run_context(stack: Stack) -> tuple[Any, bool]:
    """Where the layers run once outside the capture: meta tensors if the weights are on meta (4x cheaper than
    fake), else the weights' own fake mode (``tpfx.from_pretrained``'s) or a new one; and whether meta."""
    layers = stack.layers
    meta = all(t.device.type == "meta" for m in layers for t in (*m.parameters(), *m.buffers()))
    own = [f for f in {maybe_get_fake_mode(t) for m in layers for t in m.parameters()} if f is not None]
    fake: Any = (contextlib.nullcontext() if meta else own[0] if len(own) == 1
                 else FakeTensorMode(allow_non_fake_inputs=True))
    return fake, meta


def _uniform_layers(stack: Stack, calls: _Calls) -> str | None:
    """Why a layer that stands in may compute other than its template (None: none may). Each template runs once
    on static copies of its inputs, logging the names it reads. Every layer of its kind has its code, its
    compared attributes and its weights' shapes, and gets its inputs (``_uniform_calls``); so if the template
    reads no index attribute and no other state that differs between the layers, each layer runs the template's
    ops. A kind whose template reads such state has each of its layers run and their ops compared
    (``_op_logs_differ``): a layer that branches on its own index runs other ops."""
    fake, meta = _run_context(stack)
    logged: list[int] = []
    try:  # in export's own compiling state, so that models take the paths they take under export (MoE kernels)
        with _compiling_state_context(), fake, torch.no_grad():
            for kind, t in stack.templates.items():
                args, kwargs = _static_call(calls, t, meta)
                with _Reading(dict(stack.layers[t].named_modules())) as reading:
                    stack.layers[t](*args, **kwargs)
                if _reads_own_state(stack, kind, reading.reads):
                    logged.append(kind)
            return _op_logs_differ(stack, calls, logged, meta)
    except Exception as e:  # noqa: BLE001 - a layer that cannot run on fake inputs is not proven uniform
        return f"a layer does not run on fake inputs ({type(e).__name__}: {str(e)[:120]})"


def _static_call(calls: _Calls, t: int, meta: bool) -> tuple[Any, Any]:
    """Layer ``t``'s recorded call as (args, kwargs) of static meta (or fake) tensors."""
    leaves, spec, _ = calls.calls[t]
    return tree_unflatten([_static(x, torch.device("meta") if meta else None) for x in leaves], spec)


def _op_logs_differ(stack: Stack, calls: _Calls, kinds: list[int], meta: bool) -> str | None:
    """Run every layer of ``kinds`` that stands in (but the kind's first) once on static copies of its
    template's inputs and compare the ops each runs (with their shapes and constants) with the template's."""
    logs: dict[int, list[tuple]] = {}
    for kind in kinds:
        args, kwargs = _static_call(calls, stack.templates[kind], meta)
        for i in [i for i, k in enumerate(stack.kinds) if k == kind][1:]:
            with _OpLog() as log:
                stack.layers[i](*args, **kwargs)
            logs[i] = log.ops
    for i in sorted(logs):
        if logs[i] != logs[stack.template(i)]:
            return f"layer {i} runs other ops than layer {stack.template(i)}"
    return None


# ------------------------------------------------------------------------------------------- stitching


def _leaves(node: fx.Node) -> list[Any]:
    return tree_flatten((node.args, node.kwargs))[0]


def _layer_index(node: fx.Node, prefix: str) -> int | None:
    """The index of the stack's layer (``prefix`` = the stack's path and a dot) whose code made ``node``."""
    for p, _ in node.meta.get("nn_module_stack", {}).values():
        if p.startswith(prefix):
            head = p[len(prefix):].split(".", 1)[0]
            return int(head) if head.isdigit() else None
    return None


class _Traced:
    """The traced layers' nodes in the cut graph (weights aside), by layer, and the stand-in nodes."""

    def __init__(self, gm: fx.GraphModule, stack: Stack) -> None:
        self.stack, self.cut, self.n = stack, stack.cut, len(stack.layers)
        nodes = list(gm.graph.nodes)
        self.pos = {n: i for i, n in enumerate(nodes)}
        self.layer_of: dict[fx.Node, int] = {}
        self.nodes: dict[int, list[fx.Node]] = {i: [] for i in range(self.cut)}
        self.marks: list[fx.Node] = []  # the stand-ins' nodes (one each: a clone of its input), in graph order
        self.mark_layer: dict[fx.Node, int] = {}
        for n in nodes:
            i = None if n.op == "get_attr" else _layer_index(n, stack.path + ".")
            if i is not None and i < self.cut:
                self.nodes[i].append(n)
                self.layer_of[n] = i
            elif i is not None:
                self.marks.append(n)
                self.mark_layer[n] = i

    def handed(self, i: int) -> fx.Node | str:
        """The one tensor of layer ``i - 1`` that layer ``i`` reads (its hidden state handed on). Other values it
        reads there (sizes computed once, on first use, and shared by later layers) are values from before."""
        if i == self.cut:
            return self.marks[0].args[0]  # type: ignore[return-value]
        read = {a for y in self.nodes[i] for a in y.all_input_nodes
                if self.layer_of.get(a) == i - 1 and isinstance(a.meta.get("val"), torch.Tensor)}
        return next(iter(read)) if len(read) == 1 else f"layer {i} reads {len(read)} tensors of layer {i - 1}"

    def markers(self) -> str | None:
        """Why the stand-in nodes do not follow the last traced layer and each other (None: they do)."""
        marks, last = self.marks, self.nodes[self.cut - 1]
        if [self.mark_layer[m] for m in marks] != list(range(self.cut, self.n)) or not last \
                or any(m.target is not torch.ops.aten.clone.default for m in marks):
            return "the stand-in layers are not all in the graph, in order"
        first = marks[0].args[0]
        if not isinstance(first, fx.Node) or self.layer_of.get(first) != self.cut - 1 \
                or any(m.args[0] is not p for p, m in zip(marks, marks[1:])):
            return "a layer does not read the output of the layer before it"
        if any(self.pos[m] != self.pos[last[-1]] + 1 + i for i, m in enumerate(marks)):
            return "nodes between layers"
        return self.read_after(self.cut - 1)

    def contiguous(self, i: int) -> str | None:
        """Why layer ``i``'s nodes are not one run right after layer ``i - 1``'s (None: they are)."""
        span, before = self.nodes[i], self.nodes[i - 1]
        idx = [self.pos[n] for n in span]
        if not span or idx != list(range(idx[0], idx[0] + len(idx))):
            return "a layer's nodes are not contiguous in the graph"
        return None if before and self.pos[before[-1]] + 1 == idx[0] else f"nodes between layers {i - 1} and {i}"

    def read_after(self, i: int) -> str | None:
        """Why values of layer ``i`` other than its output are read outside it, or its output outside it and the
        next layer (None: they are not)."""
        out = self.handed(i + 1)
        if isinstance(out, str):
            return out
        for y in self.nodes[i]:
            for u in y.users:
                if self.layer_of.get(u) != i and not (y is out and (self.layer_of.get(u) == i + 1 or u is self.marks[0])):
                    return f"{y.name} of layer {i} is read after layer {i + 1}"
        return None


class _Pair:
    """A kind's sibling ``a`` and template ``b``: ``check`` proves ``b``'s nodes copy ``a``'s."""

    def __init__(self, traced: _Traced, a: int, b: int) -> None:
        self.t, self.a, self.b = traced, a, b
        self.pa, self.pb = f"{traced.stack.path}.{a}", f"{traced.stack.path}.{b}"
        self.la, self.lb = traced.nodes[a], traced.nodes[b]
        self.inb = set(self.lb)
        self.iso = dict(zip(self.la, self.lb, strict=False))  # sibling node -> its template copy
        self.ha: fx.Node | str = traced.handed(a)
        self.hb: fx.Node | str = traced.handed(b)

    def check(self) -> str | None:
        t, a, b = self.t, self.a, self.b
        if len(self.la) != len(self.lb) or not self.la:
            return f"layers {a} and {b} have different node counts"
        why = t.contiguous(a) or t.contiguous(b) or t.read_after(a) or t.read_after(b)
        if why:
            return why
        if isinstance(self.ha, str) or isinstance(self.hb, str):
            return self.ha if isinstance(self.ha, str) else self.hb  # type: ignore[return-value]
        for x, y in zip(self.la, self.lb, strict=True):
            why = self._pair(x, y)
            if why:
                return f"{y.name} is not a copy of {x.name}: {why}"
        out = t.handed(b + 1)
        if isinstance(out, fx.Node) and _shape(out) != _shape(self.hb):
            return f"layer {b} changes the shape of the hidden state it hands on"
        return None

    def _pair(self, x: fx.Node, y: fx.Node) -> str | None:
        if x.op != y.op or x.target != y.target:
            return "different ops"
        if _shape(x) != _shape(y):
            return "different shapes"
        ax, ay = _leaves(x), _leaves(y)
        if len(ax) != len(ay):
            return "different arguments"
        for u, v in zip(ax, ay, strict=True):
            why = self._arg(u, v)
            if why:
                return why
        return None

    def _arg(self, u: Any, v: Any) -> str | None:
        if not isinstance(v, fx.Node):
            return None if not isinstance(u, fx.Node) and _same_leaf(u, v) else "different constants"
        if not isinstance(u, fx.Node):
            return "different arguments"
        if v in self.inb:
            return None if self.iso.get(u) is v else "a different layer-internal input"
        if v is self.hb:  # the hidden state handed on by the layer before
            return None if u is self.ha else "a different handed-on input"
        if v.op == "get_attr" and isinstance(v.target, str) and v.target.startswith(self.pb + "."):
            same = u.op == "get_attr" and u.target == self.pa + v.target[len(self.pb):]
            return None if same else "a different weight"
        return None if u is v else "a different input from before the layer"


def _shape(node: fx.Node) -> tuple[str, str] | None:
    val = node.meta.get("val")
    return (str(val.shape), str(val.dtype)) if isinstance(val, torch.Tensor) else None


def _same_leaf(a: Any, b: Any) -> bool:
    if isinstance(a, torch.SymInt | torch.SymFloat | torch.SymBool) or isinstance(b, torch.SymInt):
        return str(a) == str(b)
    return _same(a, b)


def _set_attr(root: torch.nn.Module, target: str, value: torch.Tensor, param: bool) -> None:
    *path, leaf = target.split(".")
    m = root
    for part in path:
        if not hasattr(m, part):
            m.add_module(part, torch.nn.Module())
        m = getattr(m, part)
    if param:
        m.register_parameter(leaf, value)  # type: ignore[arg-type]
    else:
        m.register_buffer(leaf, value)


def _retarget_stack(meta: dict[str, Any], p1: str, pk: str) -> dict[str, Any]:
    def sub(s: str) -> str:
        return pk + s[len(p1):] if s == p1 or s.startswith(p1 + ".") else s

    out = dict(meta)
    if "nn_module_stack" in meta:
        out["nn_module_stack"] = {k.replace(p1, pk): (sub(p), c) for k, (p, c) in meta["nn_module_stack"].items()}
    return out


def _weights(gm: fx.GraphModule, model: torch.nn.Module, stack: Stack) -> dict[tuple[int, fx.Node], fx.Node]:
    """Every stand-in layer's weights as get_attr nodes (its template's, renamed), after the traced layers'
    parameters and buffers (where a whole capture has them): (layer, template's node) -> its own node."""
    graph, path = gm.graph, stack.path
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    mine = [w for w in graph.nodes if w.op == "get_attr" and str(w.target).startswith(path + ".")]
    anchors = {kind: next((w for w in reversed(mine) if (str(w.target) in params) == kind), None)
               for kind in (True, False)}
    new: dict[tuple[int, fx.Node], fx.Node] = {}
    for k in range(stack.cut, len(stack.layers)):
        t = stack.template(k)
        pt, pk = f"{path}.{t}", f"{path}.{k}"
        st = pt.replace(".", "_")
        for w in (w for w in mine if str(w.target).startswith(pt + ".")):
            target, param = pk + str(w.target)[len(pt):], str(w.target) in params
            _set_attr(gm, target, params[target] if param else buffers[target], param)
            with graph.inserting_after(anchors[param]):
                anchors[param] = graph.create_node("get_attr", target, name=w.name.replace(st, pk.replace(".", "_"), 1))
            anchors[param].meta = dict(w.meta)  # type: ignore[union-attr]
            new[(k, w)] = anchors[param]  # type: ignore[assignment]
    return new


def _copy_layers(gm: fx.GraphModule, traced: _Traced, weights: dict[tuple[int, fx.Node], fx.Node]) -> fx.Node:
    """Each stand-in's template's nodes, copied after the last traced layer in layer order, each copy reading
    its own weights and the output of the copy before it; returns the last copy's output."""
    stack, graph = traced.stack, gm.graph
    out = traced.handed(stack.cut)
    with graph.inserting_before(traced.marks[0]):  # the stand-ins follow the last traced layer directly
        for k in range(stack.cut, len(stack.layers)):
            t = stack.template(k)
            hin, pt, pk = traced.handed(t), f"{stack.path}.{t}", f"{stack.path}.{k}"
            copy: dict[fx.Node, fx.Node] = {}

            def arg(a: fx.Node, k: int = k, copy: dict = copy, hin: Any = hin, prev: Any = out) -> fx.Node:
                return copy[a] if a in copy else prev if a is hin else weights.get((k, a), a)

            for y in traced.nodes[t]:
                new = graph.create_node(y.op, y.target, fx.map_arg(y.args, arg), fx.map_arg(y.kwargs, arg),
                                        name=y.name)
                new.meta = _retarget_stack(y.meta, pt, pk)
                copy[y] = new
            out = copy[traced.handed(t + 1)]  # type: ignore[index]
    return out  # type: ignore[return-value]


def stitch(gm: fx.GraphModule, model: torch.nn.Module, stack: Stack) -> str | None:
    """Turn ``gm`` (the model captured with the layers of ``stack`` before its cut traced and a clone
    node for each of the others) into the whole model's graph in place; or return why it cannot (``gm`` is then
    unchanged)."""
    traced = _Traced(gm, stack)
    why = traced.markers()
    for kind in sorted(stack.templates):
        why = why or _Pair(traced, stack.siblings[kind], stack.templates[kind]).check()
    if why:
        return why
    last = _copy_layers(gm, traced, _weights(gm, model, stack))
    traced.marks[-1].replace_all_uses_with(last)
    for m in reversed(traced.marks):
        gm.graph.erase_node(m)
    gm.graph.lint()
    _capture.canonical_names(gm)
    return None


def graph_rows(gm: fx.GraphModule) -> list[tuple]:
    """Every node as plain data (op, name, target, arguments by name, module path, shape): two captures of a
    model are the same graph when these are equal (tests, benchmarks/blocks_check.py)."""
    out = []
    for n in gm.graph.nodes:
        args = tuple(a.name if isinstance(a, fx.Node) else repr(a) for a in _leaves(n))
        path = tuple(p for p, _ in n.meta.get("nn_module_stack", {}).values())
        val = n.meta.get("val")
        out.append((n.op, n.name, str(n.target), args, path, str(val.shape) if isinstance(val, torch.Tensor) else None))
    return out


def capture_blocks(model: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> _capture.Captured | str:
    """The model's capture through the layers of its stack before the cut, with stand-ins for the others,
    stitched to all of them; or why not."""
    stack = find_stack(model)
    if isinstance(stack, str):
        return stack
    path, layers, cut = stack.path, stack.layers, stack.cut
    parent_path, _, attr = path.rpartition(".")
    parent, original = model.get_submodule(parent_path), model.get_submodule(path)
    calls = _Calls()
    hooks = _traced_hooks(stack, calls)
    setattr(parent, attr, torch.nn.ModuleList(layers[:cut] + [_StandIn(k, stack.template(k), calls, layers[k])
                                                              for k in range(cut, len(layers))]))
    try:
        captured = _capture.capture(model, args, kwargs, named=False)
    except _capture.CaptureError as e:
        return f"{path}: the model with stand-ins after layer {cut - 1} did not capture ({str(e)[:200]})"
    finally:
        setattr(parent, attr, original)
        for h in hooks:
            h.remove()
    why = _uniform_calls(stack, calls) or _uniform_layers(stack, calls) or stitch(captured.gm, model, stack)
    return captured if why is None else f"{path}: {why}"
