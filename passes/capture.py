"""Capture: ``torch.export`` (non-strict) of a module on example inputs, into an ATen ``GraphModule``.

Dynamic dims are tried first (``Dim.AUTO`` on every dim of every tensor input), so one capture serves
every batch and sequence length the model allows; a model that refuses them is captured statically
(one graph per input shape). A graph that writes into values it computed itself is functionalized,
because a redistributed operand is a new tensor a write would miss (``normalize`` then relaxes its views).
"""

from __future__ import annotations

import inspect
import re
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import maybe_get_fake_mode
from torch.export import Dim
from torch.utils._pytree import tree_map

from .checkpoint import CheckpointPolicyError, marking_regions


class CaptureError(RuntimeError):
    """torch.export could not capture the model; the message says why and what to do."""


@dataclass
class Captured:
    gm: fx.GraphModule
    dynamic: bool  # captured with dynamic dims (serves other shapes)
    functionalized: bool  # in-graph writes were turned into functional ops
    whole_because: str | None = None  # why a stack of layers was captured whole (blocks.py), if it was


class ModelState:
    """The state of every module of a model (its attributes, hooks, parameters, buffers and submodules by
    reference, its buffers' contents) and of its config, as it is now; ``restore`` puts it back. Planning runs the model's Python code
    (export, block capture's proofs), and that code may change the model on its first call: transformers
    installs its output-recording hooks then, on whatever layers the stack holds at that moment, and marks the
    model as hooked. Every capture starts from and leaves the model as the user gave it."""

    def __init__(self, model: torch.nn.Module) -> None:
        objs: list[Any] = list(model.modules())
        objs += [c for c in {id(getattr(m, "config", None)): getattr(m, "config", None) for m in objs}.values()
                 if c is not None and hasattr(c, "__dict__")]
        self.saved = [(o, dict(vars(o)), {k: v.copy() for k, v in vars(o).items() if type(v) in _COPIED})
                      for o in objs]
        # buffers' contents (a counter, running statistics): what a forward on real buffers may write in place
        self.buffers = [(b, b._version, b.clone()) for b in model.buffers()
                        if b.device.type != "meta" and type(b) is torch.Tensor and maybe_get_fake_mode(b) is None]

    def restore(self) -> None:
        with torch.no_grad():
            for b, version, saved in self.buffers:
                if b._version != version:
                    b.copy_(saved)
        for o, attrs, inner in self.saved:
            now = vars(o)
            for k in [k for k in now if k not in attrs]:
                del now[k]
            now.update(attrs)
            for k, v in inner.items():  # the same containers, with their saved entries
                if isinstance(v, list):
                    attrs[k][:] = v
                else:
                    attrs[k].clear()
                    attrs[k].update(v)

    def __enter__(self) -> ModelState:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()


_COPIED = (dict, OrderedDict, list, set)


def check_model(model: torch.nn.Module) -> None:
    """Refuse what no plan can serve: quantized modules, and tensors on more than one device."""
    for name, m in model.named_modules():
        quantized = type(m).__module__.startswith(("torch.ao.nn.quantized", "torch.nn.quantized"))
        if quantized or any(t.is_quantized for t in m.parameters(recurse=False)):
            raise ValueError(f"tpfx: module {name or '(root)'!r} ({type(m).__name__}) is quantized; tpfx shards float "
                             "weights: shard the float model, then quantize each rank's module")
    g = torch.nn.modules.module
    hooked = [name or "(root)" for name, m in model.named_modules() if m._backward_hooks or m._backward_pre_hooks]
    if hooked or g._global_backward_hooks or g._global_backward_pre_hooks:
        where = f"module {hooked[0]!r}" if hooked else "every module (register_module_full_backward_hook)"
        raise CaptureError(f"tpfx: {where} has a backward hook (register_full_backward_hook / _pre_hook), which "
                           "torch.export drops from the captured graph, so it would never fire; remove it, and hook "
                           "gradients where they arrive: a parameter's p.register_hook(fn) or "
                           "p.register_post_accumulate_grad_hook(fn), or an output's out.register_hook(fn) in "
                           "your own code")
    devices = {t.device.type if t.device.type == "meta" else str(t.device)
               for t in (*model.parameters(), *model.buffers())}
    if len(devices) > 1:
        raise ValueError(f"tpfx: the model's parameters and buffers are on several devices ({sorted(devices)}); "
                         "move the whole model to one device (model.to(device)) before planning or sharding")


def dynamic_spec(model: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> dict[str, Any] | None:
    """``Dim.AUTO`` for every dim of every tensor argument; None where the signature cannot be bound."""
    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs)
    except TypeError:
        return None
    spec: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = inspect.signature(model.forward).parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD or kind is inspect.Parameter.VAR_POSITIONAL:
            return None
        spec[name] = tree_map(lambda v: {i: Dim.AUTO for i in range(v.ndim)} if isinstance(v, torch.Tensor)
                              and v.ndim > 0 else None, value)
    return spec


def mutates_intermediates(graph: fx.Graph) -> bool:
    """True if an op writes into a value computed inside the graph (``x[..., :d].copy_(y)``, ``h.add_(r)``).

    Sharding such a graph as it is would be unsafe: a redistributed operand is a new tensor, and the write
    would miss the value that later nodes read. Such graphs are functionalized first. Writes into inputs and
    buffers (BatchNorm running statistics) are kept: export records them as buffer mutations."""
    for node in graph.nodes:
        schema = getattr(node.target, "_schema", None)
        if node.op != "call_function" or schema is None or not schema.is_mutable:
            continue
        for arg, value in zip(schema.arguments, node.args, strict=False):
            if arg.alias_info is not None and arg.alias_info.is_write and isinstance(value, fx.Node) \
                    and value.op != "placeholder":
                return True
    return False


def _advice(model: torch.nn.Module, e: Exception) -> str:
    first = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
    hint = ("the model branches on a tensor's value (data-dependent control flow); make the branch static "
            "(a config flag), or write it with torch.cond / torch.where" if "data-dependent" in str(e)
            else "see the cause below; tpfx captures with torch.export.export(model, args, kwargs, strict=False)")
    return (f"tpfx: torch.export could not capture {type(model).__name__} ({type(e).__name__}: {first[:300]}). "
            f"tpfx plans from the captured graph: {hint}")


def _export(model: torch.nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[Any, bool]:
    """``torch.export`` with dynamic dims, else static; checkpointed regions marked (``checkpoint.py``)."""
    spec = dynamic_spec(model, args, kwargs)
    if spec is not None:
        try:
            with warnings.catch_warnings(), marking_regions():
                warnings.simplefilter("ignore")
                return torch.export.export(model, args, kwargs, dynamic_shapes=spec, strict=False), True
        except CheckpointPolicyError:
            raise
        except Exception:  # noqa: BLE001 - fall back to a static capture per shape
            pass
    try:
        with marking_regions():
            return torch.export.export(model, args, kwargs, strict=False), False
    except CheckpointPolicyError:
        raise
    except Exception as e:  # noqa: BLE001 - every export failure gets the same advice
        raise CaptureError(_advice(model, e)) from e


_SUFFIX = re.compile(r"^(.*?)(?:_\d+)?$")


def canonical_names(gm: fx.GraphModule, recompile: bool = True) -> fx.GraphModule:
    """Name every computed node by its op and a dense counter in graph order (``mul``, ``mul_1``, ...), so a
    graph's names depend on its nodes alone: export's counters skip names where its tracing made nodes it
    later dropped, and not at the same places in every layer (``blocks.stitch`` relies on this). Placeholders,
    weights (named by their FQN) and the output keep their names. The nodes are renamed in place, through a new
    namespace that resolves every name as ``Graph.create_node`` would (a builtin's name gets a suffix)."""
    graph = gm.graph
    namespace = fx.graph._Namespace()
    counts: dict[str, int] = {}
    for n in graph.nodes:
        name = n.name
        if n.op in ("call_function", "call_method", "call_module") and n.name != "_guards_fn":
            base = m.group(1) if (m := _SUFFIX.match(n.name)) else n.name
            k = counts.get(base, 0)
            counts[base] = k + 1
            name = f"{base}_{k}" if k else base
        name = namespace.create_name(name, None)
        namespace.associate_name_with_obj(name, n)
        if name != n.name:
            n.name = name
    graph._graph_namespace = namespace
    if recompile:
        defer_recompile(gm)
    return gm


def defer_recompile(gm: fx.GraphModule) -> None:
    """Generate ``gm``'s Python code when it is first called, printed or its code read, not now, as torch's own
    ``_LazyGraphModule`` does (planning never runs the graph; a 70B graph's code generation costs 0.3 s).
    ``GraphModule`` gives every instance its own class, and ``recompile`` sets ``forward`` there; so do these
    stand-ins, until the first use recompiles."""
    cls = type(gm)

    def real(self: fx.GraphModule) -> None:
        if "_deferred" in vars(cls):
            for name in ("_deferred", "code", "__str__"):
                delattr(cls, name)
            self.recompile()

    def forward(self: fx.GraphModule, *args: Any, **kwargs: Any) -> Any:
        real(self)
        return cls.forward(self, *args, **kwargs)

    def code(self: fx.GraphModule) -> str:
        real(self)
        return self._code

    def text(self: fx.GraphModule) -> str:
        real(self)
        return str(self)

    cls._deferred = True  # type: ignore[attr-defined]
    cls.forward = forward  # type: ignore[method-assign]
    cls.code = property(code)  # type: ignore[assignment]
    cls.__str__ = text  # type: ignore[method-assign,assignment]


def capture(model: torch.nn.Module, args: tuple, kwargs: dict[str, Any], named: bool = True) -> Captured:
    """The model's ATen graph for these example inputs (the inputs are cloned: export may write into them);
    ``named=False`` leaves export's node names (a block capture names the stitched graph once)."""
    check_model(model)
    args, kwargs = tree_map(lambda v: v.clone() if isinstance(v, torch.Tensor) else v, (args, kwargs))
    ep, dynamic = _export(model, args, kwargs)
    functionalized = mutates_intermediates(ep.graph)
    if functionalized:
        ep = ep.run_decompositions({})  # functional ops only (e.g. copy_ into a slice -> slice_scatter)
    gm: fx.GraphModule = ep.module()  # type: ignore[assignment]
    return Captured(canonical_names(gm) if named else gm, dynamic, functionalized)
