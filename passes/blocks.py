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
   replaced by a stand-in (an instance of the layer's class that answers with the layer's attributes), which
   records its call and returns a clone of its hidden input (its one node) in its template's output structure
   (the list is put back afterwards). Export so traces the layers before the
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
   - the model itself (``_replay``): it runs twice, eagerly, from its state as given, on static meta (or fake)
     copies of the example inputs under a dispatch-level log that records every op with where each tensor
     input came from (a weight by its first name, an input, an earlier op's output, a constant by value or
     identity), its other arguments by type and value, the grad mode, and what ops returning nothing write: once with the stand-ins in place (what export traced) and once as it is.
     Op for op, outside the stand-ins' layers the two runs must agree; each layer that stands in must run its
     template's ops on its own weights, the same values from before and the hidden state handed to it, and hand
     on what the template hands on; the outputs must be the same. Hooks (its own, the user's, transformers'
     output recording installed on the first call), grad mode, values chosen by index among same-shaped
     tensors, constants hidden in arguments, modules held outside the tree, identity and ``__dict__`` reads all
     show in these ops. While the model runs as it is, each template logs the names read on its modules; a kind
     whose template read its own index or a state that differs between its layers may branch on shapes where
     its template does not, so the graph then serves the example shapes alone (``Captured.dynamic`` False: a
     call at other shapes captures anew, and is proven anew).
4. ``stitch``: each stand-in becomes a copy of its template's nodes, reading its own weights and the output of
   the layer before it, and what read the last stand-in reads the last copy. Names then come from
   ``capture.canonical_names``, as for a whole capture (export's own counters skip names irregularly, so its
   names are not a function of the layer).

Anything not proven gives a reason instead of a graph; the caller then captures the whole model and records
the reason (``plan.fallbacks``). The model is left as it was given (``capture.ModelState``). What the replay
proves holds at the example shapes; at other shapes the graph keeps its templates' guards, which is proven
only as far as the read log sees: a layer whose shape branches differ from its template's through state the
log cannot see (its identity, a ``__dict__`` read, state outside the layer that changes between calls) and
that agree at the example shapes is not caught. Values are not compared: a layer computing on other values
with the same ops and inputs is its template's copy by construction.
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
from torch.fx.graph import _snake_case
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from . import capture as _capture
from .checkpoint import renumber
from .shapes import hint

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
    """Whether two attribute or argument values are the same for the computation: of one type, equal by value
    (floats by ``repr``: -0.0 is not 0.0), containers, partials, modules and plain objects field by field
    (never by their own ``__eq__``, which may skip fields), tensors only if identical."""
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor) or type(a) is not type(b):
        return False  # a tensor attribute (not a parameter or buffer) becomes a graph constant: same object only
    if isinstance(a, float):
        return repr(a) == repr(b)
    if isinstance(a, functools.partial):  # one made per layer (activations)
        return _same(a.func, b.func, depth) and _same(a.args, b.args, depth) and _same(a.keywords, b.keywords, depth)
    if depth < 4 and isinstance(a, dict | list | tuple):  # containers of such values
        pairs = list(zip(a.items(), b.items())) if isinstance(a, dict) else [((0, x), (0, y)) for x, y in zip(a, b)]
        return len(a) == len(b) and all(_same(ka, kb) and _same(x, y, depth + 1) for (ka, x), (kb, y) in pairs)
    if depth < 4 and isinstance(a, torch.nn.Module):
        # a module held outside the module tree (transformers' per-layer kernel functions): one of its own per
        # layer, alike in class, weights and attributes
        attrs_a, attrs_b = _plain_attrs(a), _plain_attrs(b)
        return _layout(a) == _layout(b) and attrs_a.keys() == attrs_b.keys() \
            and all(_same(v, attrs_b[k], depth + 1) for k, v in attrs_a.items())
    if depth < 4 and hasattr(a, "__dict__") and not callable(a):  # a config object, a dataclass: its fields
        return _same(vars(a), vars(b), depth + 1)
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - values that cannot be compared are not proven equal
        return False


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
        """Layer ``layer``'s call as data: its inputs' structure, plain constants by value, tensors and every
        other object by identity (the handed-on hidden state as ``"hidden"``); None if it does not read the
        previous layer's output."""
        leaves, spec, hidden = self.calls[layer]
        marks = tuple("hidden" if hidden is not None and x is hidden else
                      repr(x) if isinstance(x, _PLAIN) else id(x) for x in leaves)
        return (str(spec), marks) if "hidden" in marks else None


def _hidden_leaf(out: Any) -> torch.Tensor | None:
    tensors = [x for x in tree_flatten(out)[0] if isinstance(x, torch.Tensor)]
    return tensors[0] if len(tensors) == 1 else None


class _StandIn(torch.nn.Module):
    """Layer ``k`` of the stack during a block capture: records its call and returns its template's output
    structure with a clone of its hidden input. It is an instance of its layer's class (``make``), so that the
    parent's ``isinstance`` checks (and transformers' hooks by class) see what they see on the real layer."""

    @staticmethod
    def make(k: int, template: int, calls: _Calls, layer: torch.nn.Module) -> _StandIn:
        standin: Any = torch.nn.Module.__new__(_stand_in_class(type(layer)))  # type: ignore[arg-type]
        torch.nn.Module.__init__(standin)
        standin.k, standin.template, standin.calls_ = k, template, calls
        standin.__dict__["_real"] = layer  # not a submodule: its weights stay out of the capture
        return standin

    def __getattr__(self, name: str) -> Any:
        """The real layer's attributes (a loop that picks a mask by ``layer.attention_type``, a parent that
        counts ``hasattr(layer, "attn")``): what the loop then does is traced, checked against the template's
        call and replayed."""
        try:
            return torch.nn.Module.__getattr__(self, name)
        except AttributeError:
            return getattr(self.__dict__["_real"], name)

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


@functools.cache
def _stand_in_class(cls: Any) -> Any:
    return type(f"StandIn{cls.__name__}", (_StandIn, cls), {"__module__": __name__, "forward": _StandIn.forward,
                                                           "__getattr__": _StandIn.__getattr__})


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


# ------------------------------------------------------------------------------------------ the replay


def _static(x: Any, device: torch.device | None) -> Any:
    """A static tensor like ``x`` (its example sizes and strides; on ``device``), to run the model outside the
    capture."""
    if not isinstance(x, torch.Tensor):
        return x
    sizes = [hint(d, -1) for d in x.shape]  # a size with no hint fails in empty_strided, as before
    stride = [hint(d, -1) for d in x.stride()]
    return torch.empty_strided(sizes, stride, dtype=x.dtype, device=device or x.device)


_PLAIN = (int, float, bool, str, type(None), torch.dtype, torch.device, torch.layout, torch.memory_format)
Ref = tuple  # ("w", name) a weight, ("in", i) an input leaf, ("op", j, m) output m of entry j, ("c", ...) other


class _Replay(TorchDispatchMode):
    """One eager run of a model as the ops it dispatches, each with where its tensor inputs came from
    (``Ref``), its constants and the grad mode, and the stack's layers' calls as marks: ``("enter", k)``,
    ``("exit", k, ref of the hidden state it hands on)``."""

    def __init__(self, names: dict[int, str], inputs: list[Any]) -> None:
        super().__init__()
        self.tags: dict[int, Ref] = {i: ("w", n) for i, n in names.items()}
        self.tags.update({id(x): ("in", i) for i, x in enumerate(inputs) if isinstance(x, torch.Tensor)})
        self.keep: list[Any] = list(inputs)  # every tagged tensor stays alive: ids are not reused
        self.entries: list[tuple] = []
        self.out: Any = None

    def ref(self, t: torch.Tensor) -> Ref:
        tag = self.tags.get(id(t))
        if tag is None:  # a tensor no op made: compared by value where it has one, else by identity
            real = not t.is_meta and maybe_get_fake_mode(t) is None and type(t) is torch.Tensor
            data = t.detach().contiguous().view(-1).view(torch.uint8) if real and t.device.type == "cpu" else None
            tag = ("c", t.dtype, tuple(t.shape), id(t) if data is None else hash(data.numpy().tobytes()))
            self.tags[id(t)] = tag
            self.keep.append(t)
        return tag

    def arg(self, x: Any) -> Any:
        return self.ref(x) if isinstance(x, torch.Tensor) else ("k", type(x), repr(x))  # 1 is not 1.0, nor 0.0 -0.0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        outs = [x for x in tree_flatten(out)[0] if isinstance(x, torch.Tensor)] or _written(func, args, kwargs)
        if not outs:  # a query (prim.device, sym sizes, an assert): what it tells shows in the ops that follow
            return out
        sig = tuple(self.arg(x) for x in tree_flatten((args, kwargs))[0])
        j = len(self.entries)
        self.entries.append(("op", func, tuple(kwargs), sig, torch.is_grad_enabled(), len(outs)))
        for m, o in enumerate(outs):
            self.tags[id(o)] = ("op", j, m)
        self.keep += outs
        return out


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


def _written(func: Any, args: tuple, kwargs: dict[str, Any]) -> list[torch.Tensor]:
    """The tensors an op writes into (``_foreach_mul_``, a custom op returning nothing): its results."""
    schema = getattr(func, "_schema", None)
    if schema is None or not schema.is_mutable:
        return []
    values = dict(zip((a.name for a in schema.arguments), args)) | kwargs
    return [t for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write
            for t in tree_flatten(values.get(a.name))[0] if isinstance(t, torch.Tensor)]


def _weight_names(model: torch.nn.Module) -> tuple[dict[int, str], dict[str, str]]:
    """Each parameter and buffer of ``model`` by identity -> its first name; and every name it has -> that
    name (tied and shared weights have several)."""
    ids: dict[int, str] = {}
    canon: dict[str, str] = {}
    for name, t in (*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)):
        canon[name] = ids.setdefault(id(t), name)
    return ids, canon


def _run_context(model: torch.nn.Module) -> tuple[Any, bool]:
    """Where the model runs outside the capture: on meta tensors if its weights are on meta (4x cheaper than
    fake), else in the weights' own fake mode (``tpfx.from_pretrained``'s) or a new one; and whether meta."""
    weights = (*model.parameters(), *model.buffers())
    meta = all(t.device.type == "meta" for t in weights)
    own = [f for f in {maybe_get_fake_mode(t) for t in weights} if f is not None]
    fake: Any = (contextlib.nullcontext() if meta else own[0] if len(own) == 1
                 else FakeTensorMode(allow_non_fake_inputs=True))
    return fake, meta


def _run_logged(model: torch.nn.Module, stack: Stack, args: tuple, kwargs: dict[str, Any], inputs: list[Any],
                names: dict[int, str], standing_in: bool, watch: tuple[int, ...] = ()
                ) -> tuple[_Replay, list[_Reading]]:
    """The model's run (with the stand-ins in place, or as it is) as a ``_Replay``, and the names each layer of
    ``watch`` read while it ran."""
    log = _Replay(names, inputs)

    def enter(k: int, *_: Any) -> None:
        log.entries.append(("enter", k))

    def leave(k: int, _: torch.nn.Module, args: tuple, out: Any) -> None:
        hidden = _hidden_leaf(out)
        log.entries.append(("exit", k, None if hidden is None else log.ref(hidden)))

    with contextlib.ExitStack() as ctx:
        if standing_in:
            ctx.enter_context(_standing_in(model, stack, _Calls()))
        layers: list[torch.nn.Module] = list(model.get_submodule(stack.path))  # type: ignore[call-overload]
        for k, layer in enumerate(layers):  # first in, last out: the layer's own hooks are inside its span
            ctx.callback(layer.register_forward_pre_hook(functools.partial(enter, k), prepend=True).remove)
            ctx.callback(layer.register_forward_hook(functools.partial(leave, k)).remove)
        readings = [ctx.enter_context(_Reading(dict(stack.layers[t].named_modules()))) for t in watch]
        with log:
            log.out = model(*args, **kwargs)
    return log, readings


def _replay(model: torch.nn.Module, stack: Stack, args: tuple, kwargs: dict[str, Any],
            state: _capture.ModelState) -> tuple[str | None, bool]:
    """Why the stitched graph may compute other than the model (None: it computes what the model does at the
    example shapes), and whether it is to serve only those shapes. The model runs twice from its state as given,
    on static meta (or fake) copies of the inputs in export's compiling state: as it was captured (stand-ins
    in place) and as it is; ``_replays_differ`` compares the two runs. While it runs as it is, each template
    logs the names it reads (``_Reading``): a kind whose template read its own index, or a state that differs
    between the kind's layers, may branch on shapes other than its template does, so the graph then serves
    the example shapes alone (a call at other shapes captures anew, ``Captured.dynamic``)."""
    fake, meta = _run_context(model)
    leaves, spec = tree_flatten((args, kwargs))
    leaves = [_static(x, torch.device("meta")) for x in leaves] if meta else leaves
    run_args, run_kwargs = tree_unflatten(leaves, spec)
    names, canon = _weight_names(model)
    kinds = sorted(stack.templates.items())
    try:  # in export's own compiling state, so that models take the paths they take under export (MoE kernels)
        with _compiling_state_context(), fake, torch.enable_grad():
            cut, _ = _run_logged(model, stack, run_args, run_kwargs, leaves, names, True)
            state.restore()
            real, readings = _run_logged(model, stack, run_args, run_kwargs, leaves, names, False,
                                         tuple(t for _, t in kinds))
    except Exception as e:  # noqa: BLE001 - a model that cannot run on meta or fake inputs is not proven
        return f"the model does not run on {'meta' if meta else 'fake'} inputs ({type(e).__name__}: {str(e)[:120]})", False
    finally:
        state.restore()
    static = any(_reads_own_state(stack, kind, r.reads) for (kind, _), r in zip(kinds, readings, strict=True))
    return _replays_differ(real, cut, stack, canon), static


def _spans(entries: list[tuple], n: int) -> dict[int, tuple[int, int]] | None:
    """Each layer's (enter, exit) entry indices; None unless every layer is called once, not inside another."""
    spans: dict[int, tuple[int, int]] = {}
    open_: int | None = None
    for i, e in enumerate(entries):
        if e[0] == "enter":
            if open_ is not None or e[1] in spans:
                return None
            open_ = i
        elif e[0] == "exit":
            if open_ is None or entries[open_][1] != e[1]:
                return None
            spans[e[1]] = (open_, i)
            open_ = None
    return spans if sorted(spans) == list(range(n)) else None


def _same_op(a: tuple, b: tuple, same: Any) -> bool:
    """Entries ``a`` and ``b`` are one op with one grad mode, the same constants, and inputs ``same(x, y)``."""
    return a[0] == b[0] == "op" and a[1:3] == b[1:3] and a[4:] == b[4:] and len(a[3]) == len(b[3]) \
        and all(same(x, y) for x, y in zip(a[3], b[3], strict=True))


def _replays_differ(real: _Replay, cut: _Replay, stack: Stack, canon: dict[str, str]) -> str | None:
    """Why the model's run ``real`` is not the stitched graph's (None: it is). The stitched graph is the capture
    with stand-ins (whose eager run is ``cut``) with each stand-in's one op replaced by a copy of its template's
    ops reading its own weights and the hidden state handed on. So, op for op: outside the stand-ins' layers,
    ``real`` runs ``cut``'s ops on the same inputs (``phi`` maps each value ``real`` computed to ``cut``'s); a
    layer that stands in runs its template's ops in ``cut`` on its own weights, the same values from before and
    the hidden state it is handed, and hands on the value the template hands on; the model returns the same
    outputs. Only the hidden state a layer hands on is read after it."""
    n = len(stack.layers)
    spans_r, spans_c = _spans(real.entries, n), _spans(cut.entries, n)
    if spans_r is None or spans_c is None:
        return "the stack's layers are not each called once, one after another"
    phi: dict[Ref, Ref] = {}

    def same(x: Any, y: Any) -> bool:
        return phi.get(x) == y if x[0] == "op" else x == y

    R, C = real.entries, cut.entries
    i = j = 0
    while i < len(R) and j < len(C):
        a, b = R[i], C[j]
        if a[0] == "enter" and a[1] >= stack.cut and b == a:
            why = _layer_differs(real, cut, a[1], spans_r, spans_c, stack, canon, phi)
            if why:
                return why
            i, j = spans_r[a[1]][1] + 1, spans_c[a[1]][1] + 1
        elif a[0] == "op" and _same_op(a, b, same):
            phi.update({("op", i, m): ("op", j, m) for m in range(a[5])})
            i, j = i + 1, j + 1
        elif a[0] != "op" and a[:2] == b[:2] and (a[0] == "enter" or (a[2] and b[2] and same(a[2], b[2]))):
            i, j = i + 1, j + 1
        else:
            where = next((f"layer {e[1]}" for e in reversed(R[:i + 1]) if e[0] in ("enter", "exit")), "the model")
            return f"the model runs other ops than its capture ({a[1] if a[0] == 'op' else a[0]}, near {where})"
    if i < len(R) or j < len(C):
        return "the model runs other ops than its capture (at its end)"
    (lr, sr), (lc, sc) = tree_flatten(real.out), tree_flatten(cut.out)
    if str(sr) != str(sc) or not all(same(real.arg(x), cut.arg(y)) for x, y in zip(lr, lc, strict=True)):
        return f"the model returns other outputs than its capture ({len(lr)} leaves, the capture {len(lc)})"
    return None


def _layer_differs(real: _Replay, cut: _Replay, k: int, spans_r: dict[int, tuple[int, int]],
                   spans_c: dict[int, tuple[int, int]], stack: Stack, canon: dict[str, str],
                   phi: dict[Ref, Ref]) -> str | None:
    """Why layer ``k`` (one that stands in) does not run its template's ops as ``_replays_differ`` says (None:
    it does); maps the hidden state it hands on to its stand-in's."""
    t = stack.template(k)
    (rs, re), (ts, te), (cs, ce) = spans_r[k], spans_c[t], spans_c[k]
    R, C = real.entries, cut.entries
    clone = C[cs + 1]
    if ce != cs + 2 or clone[0] != "op":
        return f"the stand-in of layer {k} did not run"
    hk, ht = clone[3][0], C[spans_c[t - 1][1]][2]  # the hidden state handed to layer k (stand-in), to t
    pk, pt = f"{stack.path}.{k}.", f"{stack.path}.{t}."
    psi: dict[Ref, Ref] = {}

    def same(x: Any, y: Any) -> bool:
        if x[0] == "op":
            if rs < x[1] < re:
                return psi.get(x) == y
            return phi.get(x) == y or (phi.get(x) == hk and y == ht)
        if x[0] == "w" and y[0] == "w" and y[1].startswith(pt):
            return x[1] == canon.get(pk + y[1][len(pt):])
        return x == y

    if re - rs != te - ts:
        return f"layer {k} runs other ops than layer {t} ({re - rs - 1} ops, layer {t} {te - ts - 1})"
    for off in range(1, re - rs):
        if not _same_op(R[rs + off], C[ts + off], same):
            return f"layer {k} runs other ops than layer {t} (op {off - 1} of the layer: {R[rs + off][1]})"
        psi.update({("op", rs + off, m): ("op", ts + off, m) for m in range(R[rs + off][5])})
    out_r, out_t = R[re][2], C[te][2]
    if out_r is None or out_t is None or out_r[0] != "op" or not same(out_r, out_t):
        return f"layer {k} hands on another value than layer {t}"
    phi[out_r] = C[ce][2]
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
        if any(set(m.users) != {n} for m, n in zip(marks, marks[1:])):
            return "a stand-in's output is read after the layer after it"
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
    parameters and buffers (where a whole capture has them): (layer, template's node) -> its own node. A weight
    the layer shares (a tied parameter, a module of another layer) is read under its first name, once."""
    graph, path = gm.graph, stack.path
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    canon = _weight_names(model)[1]
    mine = [w for w in graph.nodes if w.op == "get_attr" and str(w.target).startswith(path + ".")]
    nodes = {str(w.target): w for w in graph.nodes if w.op == "get_attr"}
    anchors = {kind: next((w for w in reversed(mine) if (str(w.target) in params) == kind), None)
               for kind in (True, False)}
    new: dict[tuple[int, fx.Node], fx.Node] = {}
    for k in range(stack.cut, len(stack.layers)):
        t = stack.template(k)
        pt, pk = f"{path}.{t}", f"{path}.{k}"
        for w in (w for w in mine if str(w.target).startswith(pt + ".")):
            own = pk + str(w.target)[len(pt):]
            target = canon.get(own, own)
            if target not in nodes:
                param = target in params
                _set_attr(gm, target, params[target] if param else buffers[target], param)
                with graph.inserting_after(anchors[param]):  # named as export names it
                    name = w.name.replace(pt.replace(".", "_"), pk.replace(".", "_"), 1) if target == own \
                        else _snake_case(target.replace(".", "_"))
                    anchors[param] = nodes[target] = graph.create_node("get_attr", target, name=name)
                nodes[target].meta = dict(w.meta)
            new[(k, w)] = nodes[target]
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
                renumber(new, f"@{k}")  # a checkpointed region of its own
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


@contextlib.contextmanager
def _standing_in(model: torch.nn.Module, stack: Stack, calls: _Calls) -> Any:
    """The model with every layer from the cut on replaced by its stand-in, and the traced layers hooked."""
    parent_path, _, attr = stack.path.rpartition(".")
    parent, original = model.get_submodule(parent_path), model.get_submodule(stack.path)
    hooks = _traced_hooks(stack, calls)
    setattr(parent, attr, torch.nn.ModuleList(stack.layers[:stack.cut] + [
        _StandIn.make(k, stack.template(k), calls, stack.layers[k]) for k in range(stack.cut, len(stack.layers))]))
    try:
        yield
    finally:
        setattr(parent, attr, original)
        for h in hooks:
            h.remove()


def capture_blocks(model: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> _capture.Captured | str:
    """The model's capture through the layers of its stack before the cut, with stand-ins for the others,
    stitched to all of them and proven by ``_replay``; or why not. The model is left as it was given."""
    stack = find_stack(model)
    if isinstance(stack, str):
        return stack
    calls = _Calls()
    with _capture.ModelState(model) as state:
        try:
            with _standing_in(model, stack, calls):
                captured = _capture.capture(model, args, kwargs, named=False)
        except _capture.CaptureError as e:
            return f"{stack.path}: the model with stand-ins after layer {stack.cut - 1} did not capture ({str(e)[:200]})"
        state.restore()
        why = _uniform_calls(stack, calls) or stitch(captured.gm, model, stack)
        if why is None:
            why, static = _replay(model, stack, args, kwargs, state)
            captured.dynamic = captured.dynamic and not static
    return captured if why is None else f"{stack.path}: {why}"
