"""Block capture: export a deep model through three layers of its stack and stitch the other layers in.

torch.export's cost grows with depth (with dynamic dims, about 0.19 s of SymInt bookkeeping per Llama-70B
decoder layer), while the layers of a stack run one computation on different weights. So:

1. ``find_stack``: the model's stack is its longest ``ModuleList``; its identical run is the run of layers
   that ends it (at least 4) with the same module classes, parameter and buffer names, shapes, dtypes and
   ``requires_grad``, and the same plain attributes (configuration constants such as a sliding window), except
   attributes that hold each layer's own index. Layers before the run (DeepSeek's first dense layers) are
   traced as they are. A config list with one entry per layer that is not constant over the run
   (``layer_types`` of a hybrid) means its layers are not all one kind.
2. ``capture_blocks``: the model is exported with the layers up to the run's third real and every later
   layer replaced by a stand-in, which records its call and returns a ``tpfx::stand_in`` op of its hidden
   input in the traced layers' output structure (the list is put back afterwards). Export so traces 3 layers
   of the run, and the parent's loop over all of them. The run's first layer can hold nodes made on first use
   (a mask sliced once and reused by later layers), so its next two (below: layers 1 and 2) are the pair
   compared.
3. Proof that every stand-in stands for a copy of layer 2:
   - the calls: each stand-in is called once, in order, with layer 2's input structure, constants and tensors
     (the same objects: masks, rotary tables), reading the previous layer's output where layer 2 read layer 1's;
   - the graph: layer 2's nodes (those whose ``nn_module_stack`` names layer 2) copy layer 1's: the same ops,
     constants and shapes, the same values from before layer 1, their own weights, and layer 1's nodes only
     where layer 1 read values from before it (the residual stream handed on); the stand-ins follow layer 2
     directly (the loop computes nothing between layers) and only the first reads it;
   - the layers themselves: every layer runs once on static meta (or fake) copies of layer 2's inputs, and the
     ops each runs, with their shapes and constants, must be layer 2's: a layer that branches on its own index
     (``if self.layer_idx == last``) runs other ops.
4. ``stitch``: layer 2's nodes are copied once per stand-in, reading that layer's weights and the layer
   before it, and what read the last stand-in reads the last copy. Names then come from
   ``capture.canonical_names``, as for a whole capture (export's own counters skip names irregularly, so its
   names are not a function of the layer).

Anything not proven gives a reason instead of a graph; the caller then captures the whole model and records
the reason (``plan.fallbacks``). What stays unproven: a layer whose computation depends on values rather than
code (the same ops on inputs or constants the checks do not see), which no finite trace rules out.
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Iterator
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
# layers traced past the start of the identical run: its first may hold first-use nodes (a mask sliced once),
# the next two do not and are the pair compared
TRACED = 3
NO_STACK = "no ModuleList"
_NAME = re.compile(r"^(.*?)(?:_(\d+))?$")


# ------------------------------------------------------------------------------------------- the stack


def _plain_attrs(module: torch.nn.Module) -> dict[str, Any]:
    skip = {"_parameters", "_buffers", "_modules", "training"}
    return {k: v for k, v in vars(module).items() if k not in skip and not k.startswith("_forward")
            and not k.endswith("_hooks") and not k.startswith("_state_dict") and not k.startswith("_load_state")}


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return a is b  # a tensor attribute (not a parameter or buffer) becomes a graph constant: same object only
    if isinstance(a, functools.partial) and isinstance(b, functools.partial):  # one made per layer (activations)
        return _same(a.func, b.func) and _same(a.args, b.args) and _same(a.keywords, b.keywords)
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


def _attrs_differ(layers: list[torch.nn.Module]) -> str | None:
    """Why layers of one layout are not one kind: a plain attribute that differs, other than their index."""
    subs = [dict(m.named_modules()) for m in layers]
    for name, sub in subs[0].items():
        for key, value in _plain_attrs(sub).items():
            values = [_plain_attrs(s[name]).get(key) for s in subs]
            if all(_same(value, v) for v in values):
                continue
            if _is_index(values):
                continue  # each layer's own index
            return f"the layers differ in {(name + '.' if name else '') + key}"
    return None


def _is_index(values: list[Any]) -> bool:
    """Consecutive integers, one per layer: each layer's own index (``layer_idx``)."""
    return all(type(v) is int for v in values) and values == list(range(values[0], values[0] + len(values)))


def _config_kinds(model: torch.nn.Module, n: int, start: int) -> str | None:
    """A configuration list with one entry per layer that varies from layer ``start`` on: those layers are of
    several kinds."""
    config = getattr(model, "config", None)
    for key, value in (vars(config).items() if config is not None else ()):
        if isinstance(value, list | tuple) and len(value) == n and len({repr(v) for v in value[start:]}) > 1:
            return f"config.{key} varies across layers {start}..{n - 1}"
    return None


def find_stack(model: torch.nn.Module) -> tuple[str, torch.nn.ModuleList, int] | str:
    """The model's stack (its FQN and the list) and the first layer of its run of identical layers to the end
    (layers before it, such as DeepSeek's first dense ones, are traced as they are); or why there is none."""
    lists = [(name, m) for name, m in model.named_modules() if isinstance(m, torch.nn.ModuleList)
             and len(m) >= MIN_LAYERS and name]
    if not lists:
        return f"{NO_STACK} of {MIN_LAYERS} or more layers"
    name, stack = max(lists, key=lambda nm: len(nm[1]))
    layers = list(stack)
    if len({id(m) for m in layers}) < len(layers):
        return f"{name} holds one module several times"
    layouts = [_layout(m) for m in layers]
    start = len(layers) - 1  # the run of one layout that ends the stack
    while start > 0 and layouts[start - 1] == layouts[-1]:
        start -= 1
    if len(layers) - start < MIN_LAYERS:
        return f"{name}: the layers differ in modules, parameter shapes or dtypes"
    why = _attrs_differ(layers[start:]) or _config_kinds(model, len(layers), start)
    return f"{name}: {why}" if why else (name, stack, start)


# ------------------------------------------------------------------------------------ stand-in layers


@torch.library.custom_op("tpfx::stand_in", mutates_args=())
def stand_in(hidden: torch.Tensor, layer: int) -> torch.Tensor:
    """Where layer ``layer`` of a stack runs in a block capture: its hidden input in, its output out (``stitch``
    puts a copy of the last traced layer in its place)."""
    return hidden.clone()


@stand_in.register_fake
def _(hidden: torch.Tensor, layer: int) -> torch.Tensor:
    return torch.empty_like(hidden)


class _Calls:
    """What the last traced layer and the stand-ins after it were called with, in call order."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.calls: list[tuple[int, tuple, Any, Any]] = []  # (layer, input leaves, tree spec, hidden state due)
        self.out: Any = None  # the last traced layer's output
        self.hidden: torch.Tensor | None = None  # the output the next layer is to read
        self.problem: str | None = None

    def record(self, layer: int, args: tuple, kwargs: dict[str, Any]) -> list[Any]:
        leaves, spec = tree_flatten((args, kwargs))
        self.calls.append((layer, tuple(leaves), spec, self.hidden))
        return leaves

    def signature(self, i: int) -> tuple | None:
        """Call ``i`` as data: its inputs' structure, constants, and tensors by identity (the handed-on hidden
        state as ``"hidden"``); None if it does not read the previous layer's output."""
        _, leaves, spec, hidden = self.calls[i]
        marks = tuple("hidden" if hidden is not None and x is hidden else
                      id(x) if isinstance(x, torch.Tensor) else repr(x) for x in leaves)
        return (str(spec), marks) if "hidden" in marks else None


def _hidden_leaf(out: Any) -> torch.Tensor | None:
    tensors = [x for x in tree_flatten(out)[0] if isinstance(x, torch.Tensor)]
    return tensors[0] if len(tensors) == 1 else None


class _StandIn(torch.nn.Module):
    """Layer ``k`` of the stack during a block capture: records its call and returns the last traced layer's
    output structure with a ``stand_in`` of its hidden input."""

    def __init__(self, k: int, calls: _Calls) -> None:
        super().__init__()
        self.k, self.calls_ = k, calls

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        calls = self.calls_
        leaves = calls.record(self.k, args, kwargs)
        hidden = next((x for x in leaves if x is calls.hidden), None)
        if hidden is None:
            calls.problem = f"layer {self.k} does not read the output of the layer before it"
            hidden = next(x for x in leaves if isinstance(x, torch.Tensor))
        new = torch.ops.tpfx.stand_in(hidden, self.k)
        out_leaves, out_spec = tree_flatten(calls.out)
        calls.hidden = new
        return tree_unflatten([new if isinstance(x, torch.Tensor) else x for x in out_leaves], out_spec)


def _traced_hooks(layer: torch.nn.Module, before: torch.nn.Module, calls: _Calls, cut: int) -> list[Any]:
    """Hooks on the last traced layer (its call and output) and the one before it (the hidden state it hands on)."""
    def pre(_: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        calls.record(cut - 1, args, kwargs)

    def post(_: torch.nn.Module, args: tuple, kwargs: dict[str, Any], out: Any) -> None:
        calls.out, calls.hidden = out, _hidden_leaf(out)
        if calls.hidden is None:
            calls.problem = "a layer's output holds other tensors than its hidden state"

    def handed(_: torch.nn.Module, args: tuple, out: Any) -> None:
        calls.hidden = _hidden_leaf(out)

    return [layer.register_forward_pre_hook(pre, with_kwargs=True),
            layer.register_forward_hook(post, with_kwargs=True), before.register_forward_hook(handed)]


def _uniform_calls(calls: _Calls, n: int, cut: int) -> str | None:
    """Why the stand-ins were not called as the last traced layer was (None: they were)."""
    if calls.problem:
        return calls.problem
    if [c[0] for c in calls.calls] != list(range(cut - 1, n)):
        return f"the layers were called in the order {[c[0] for c in calls.calls]}"
    first = calls.signature(0)
    for i in range(1, len(calls.calls)):
        if calls.signature(i) != first or first is None:
            return f"layer {calls.calls[i][0]} is called with other inputs than layer {cut - 1}"
    return None


# --------------------------------------------------------------------------------------------- op logs


def _static(x: Any, device: torch.device | None) -> Any:
    """A static tensor like ``x`` (its example sizes and strides; on ``device``), for ``_op_logs_differ``."""
    if not isinstance(x, torch.Tensor):
        return x
    hint = [int(d.node.hint) if isinstance(d, torch.SymInt) else int(d) for d in x.shape]
    stride = [int(d.node.hint) if isinstance(d, torch.SymInt) else int(d) for d in x.stride()]
    return torch.empty_strided(hint, stride, dtype=x.dtype, device=device or x.device)


class _OpLog(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[tuple] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        leaves = tree_flatten((args, kwargs or {}))[0]
        self.ops.append((str(func), tuple((tuple(x.shape), x.dtype) if isinstance(x, torch.Tensor) else repr(x)
                                          for x in leaves)))
        return func(*args, **(kwargs or {}))


def _op_logs_differ(layers: list[torch.nn.Module], call: tuple[tuple, Any], start: int, cut: int) -> str | None:
    """Run every layer once on static fake copies of the last traced layer's inputs and compare the ops each
    runs (with their shapes and constants): a layer that branches on its own index runs other ops."""
    leaves, spec = call
    meta = all(t.device.type == "meta" for m in layers for t in (*m.parameters(), *m.buffers()))
    logs = []
    own = [f for f in {maybe_get_fake_mode(t) for m in layers for t in m.parameters()} if f is not None]
    fake: Any = (contextlib.nullcontext() if meta else own[0] if len(own) == 1  # tpfx.from_pretrained's mode
                 else FakeTensorMode(allow_non_fake_inputs=True))
    try:  # meta tensors where the weights are (plan on a meta model: 4x cheaper), else fake ones; in export's
        # own compiling state, so that models take the paths they take under export (MoE experts' kernels)
        with _compiling_state_context(), fake, torch.no_grad():
            args, kwargs = tree_unflatten([_static(x, torch.device("meta") if meta else None) for x in leaves], spec)
            for layer in layers[start + 1:]:
                with _OpLog() as log:
                    layer(*args, **kwargs)
                logs.append(log.ops)
    except Exception as e:  # noqa: BLE001 - a layer that cannot run on fake inputs is not proven uniform
        return f"a layer does not run on fake inputs ({type(e).__name__}: {str(e)[:120]})"
    ref = logs[cut - 2 - start]
    for k, log in enumerate(logs, start=start + 1):
        if log != ref:
            return f"layer {k} runs other ops than layer {cut - 1}"
    return None


# ------------------------------------------------------------------------------------------- stitching


def _in(node: fx.Node, path: str) -> bool:
    return any(p == path or p.startswith(path + ".") for p, _ in node.meta.get("nn_module_stack", {}).values())


def _split(name: str) -> tuple[str, int]:
    m = _NAME.match(name)
    assert m is not None
    return m.group(1), int(m.group(2) or 0)


def _named(base: str, index: int) -> str:
    return f"{base}_{index}" if index else base


def _leaves(node: fx.Node) -> list[Any]:
    return tree_flatten((node.args, node.kwargs))[0]


class _Layers:
    """Layers 0 and 1 of the cut graph, checked to be copies, with the counter step of every name."""

    def __init__(self, gm: fx.GraphModule, path: str, cut: int) -> None:
        self.gm, self.cut, self.p0, self.p1 = gm, cut, f"{path}.{cut - 2}", f"{path}.{cut - 1}"
        nodes = list(gm.graph.nodes)
        self.l0 = [n for n in nodes if n.op != "get_attr" and _in(n, self.p0)]
        self.l1 = [n for n in nodes if n.op != "get_attr" and _in(n, self.p1)]
        self.pos = {n: i for i, n in enumerate(nodes)}
        self.in0, self.in1 = set(self.l0), set(self.l1)
        self.iso = dict(zip(self.l0, self.l1, strict=False))  # layer 1 node -> its layer 2 copy

    def check(self) -> str | None:
        if len(self.l0) != len(self.l1) or not self.l0:
            return f"layers {self.cut - 2} and {self.cut - 1} have different node counts"
        for span in (self.l0, self.l1):
            idx = [self.pos[n] for n in span]
            if idx != list(range(idx[0], idx[0] + len(idx))):
                return "a layer's nodes are not contiguous in the graph"
        if self.pos[self.l0[-1]] + 1 != self.pos[self.l1[0]]:
            return f"nodes between layers {self.cut - 2} and {self.cut - 1}"
        for x, y in zip(self.l0, self.l1, strict=True):
            why = self._pair(x, y)
            if why:
                return f"{y.name} is not a copy of {x.name}: {why}"
        for x in self.l0:
            if any(u not in self.in0 and u not in self.in1 for u in x.users):
                return f"{x.name} of layer {self.cut - 2} is read after layer {self.cut - 1}"
        return None

    def _pair(self, x: fx.Node, y: fx.Node) -> str | None:
        if x.op != y.op or x.target != y.target:
            return "different ops"
        if _shape(x) != _shape(y):
            return "different shapes"
        ax, ay = _leaves(x), _leaves(y)
        if len(ax) != len(ay):
            return "different arguments"
        for a, b in zip(ax, ay, strict=True):
            why = self._arg(a, b)
            if why:
                return why
        return None

    def _arg(self, a: Any, b: Any) -> str | None:
        if not isinstance(b, fx.Node):
            return None if not isinstance(a, fx.Node) and _same_leaf(a, b) else "different constants"
        if not isinstance(a, fx.Node):
            return "different arguments"
        if b in self.in1:
            return None if self.iso.get(a) is b else "a different layer-internal input"
        if b in self.in0:  # handed on from layer 1, which read a value from before it there
            return None if a not in self.in0 and a not in self.in1 else "a different handed-on input"
        if b.op == "get_attr" and isinstance(b.target, str) and b.target.startswith(self.p1 + "."):
            same = a.op == "get_attr" and a.target == self.p0 + b.target[len(self.p1):]
            return None if same else "a different weight"
        return None if a is b else "a different input from before the stack"


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


def _runs(nodes: list[fx.Node]) -> Iterator[list[fx.Node]]:
    """Maximal runs of consecutive nodes (by graph order) from ``nodes``."""
    run: list[fx.Node] = []
    for n in nodes:
        if run and run[-1].next is not n:
            yield run
            run = []
        run.append(n)
    if run:
        yield run


def _retarget_stack(meta: dict[str, Any], p1: str, pk: str) -> dict[str, Any]:
    def sub(s: str) -> str:
        return pk + s[len(p1):] if s == p1 or s.startswith(p1 + ".") else s

    out = dict(meta)
    if "nn_module_stack" in meta:
        out["nn_module_stack"] = {k.replace(p1, pk): (sub(p), c) for k, (p, c) in meta["nn_module_stack"].items()}
    return out


def _markers(gm: fx.GraphModule, layers: _Layers, n: int) -> list[fx.Node] | str:
    """The stand-in nodes of the untraced layers, checked to follow the last traced layer and each other."""
    marks = [m for m in gm.graph.nodes if m.op == "call_function" and m.target is torch.ops.tpfx.stand_in.default]
    if [m.args[1] for m in marks] != list(range(layers.cut, n)):
        return "the stand-in layers are not all in the graph, in order"
    if marks[0].args[0] not in layers.in1 or any(m.args[0] is not p for p, m in zip(marks, marks[1:])):
        return "a layer does not read the output of the layer before it"
    if any(layers.pos[m] != layers.pos[layers.l1[-1]] + 1 + i for i, m in enumerate(marks)):
        return "nodes between layers"
    if any(u not in layers.in1 and u is not marks[0] for y in layers.l1 for u in y.users):
        return f"values of layer {layers.cut - 1} are read after the next layer"
    return marks


def stitch(gm: fx.GraphModule, model: torch.nn.Module, path: str, n: int, cut: int = TRACED) -> str | None:
    """Turn ``gm`` (the model captured with the first ``cut`` layers of its ``n``-layer stack at ``path`` and
    ``stand_in`` nodes for the others) into the whole model's graph in place; or return why it cannot (``gm`` is
    then unchanged)."""
    layers = _Layers(gm, path, cut)
    why = layers.check()
    marks = _markers(gm, layers, n) if why is None else why
    if isinstance(marks, str):
        return marks
    graph, p1 = gm.graph, layers.p1
    weights = [w for w in graph.nodes if w.op == "get_attr" and isinstance(w.target, str)
               and w.target.startswith(p1 + ".")]
    s1 = p1.replace(".", "_")
    # 1. the weights of the further layers, after the last kept layer's (one run for parameters, one for buffers)
    new_w: dict[tuple[int, fx.Node], fx.Node] = {}
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())
    for run in _runs(weights):
        anchor = run[-1]
        for k in range(cut, n):
            pk = f"{path}.{k}"
            for w in run:
                target = pk + str(w.target)[len(p1):]
                _set_attr(gm, target, params[target] if target in params else buffers[target], target in params)
                with graph.inserting_after(anchor):
                    anchor = graph.create_node("get_attr", target, name=w.name.replace(s1, pk.replace(".", "_"), 1))
                anchor.meta = dict(w.meta)
                new_w[(k, w)] = anchor
    # 2. the last traced layer's nodes once per stand-in, each reading the layer before it
    prev = dict(layers.iso)  # node of the layer before the last traced one -> the previous layer's copy of it
    anchor = layers.l1[-1]
    copy: dict[fx.Node, fx.Node] = {}
    for k in range(cut, n):
        pk = f"{path}.{k}"
        copy = {}

        def arg(a: fx.Node, k: int = k, copy: dict = copy, prev: dict = prev) -> fx.Node:
            if a in copy:
                return copy[a]
            if a in layers.in0:
                return prev[a]
            return new_w.get((k, a), a)

        for y in layers.l1:
            with graph.inserting_after(anchor):
                anchor = graph.create_node(y.op, y.target, fx.map_arg(y.args, arg), fx.map_arg(y.kwargs, arg),
                                           name=_split(y.name)[0])
            anchor.meta = _retarget_stack(y.meta, p1, pk)
            copy[y] = anchor
        prev = {x: copy[y] for x, y in layers.iso.items()}
    # 3. what read the last stand-in reads the last copy; the stand-ins go
    marks[-1].replace_all_uses_with(copy[marks[0].args[0]])  # type: ignore[index]
    for m in reversed(marks):
        graph.erase_node(m)
    graph.lint()
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
    """The model's capture through the layers up to ``TRACED`` past the start of its identical run, with
    stand-ins for the others, stitched to all of them; or why not."""
    found = find_stack(model)
    if isinstance(found, str):
        return found
    path, stack, start = found
    layers, cut = list(stack), start + TRACED
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path)
    calls = _Calls()
    hooks = _traced_hooks(layers[cut - 1], layers[cut - 2], calls, cut)
    hooks.append(layers[0].register_forward_pre_hook(lambda *_: calls.reset()))  # a new trace starts afresh
    setattr(parent, attr, torch.nn.ModuleList(layers[:cut] + [_StandIn(k, calls) for k in range(cut, len(layers))]))
    try:
        captured = _capture.capture(model, args, kwargs)
    except _capture.CaptureError as e:
        return f"{path}: the model with stand-ins after layer {cut - 1} did not capture ({str(e)[:200]})"
    finally:
        setattr(parent, attr, stack)
        for h in hooks:
            h.remove()
    why = _uniform_calls(calls, len(layers), cut) or _op_logs_differ(layers, calls.calls[0][1:3], start, cut)
    why = why or stitch(captured.gm, model, path, len(layers), cut)
    return captured if why is None else f"{path}: {why}"
