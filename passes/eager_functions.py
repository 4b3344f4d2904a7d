"""Custom autograd Functions honoured inside the captured graph: ``tpfx::function``.

torch.export traces a ``torch.autograd.Function``'s forward as plain ops and drops its backward: the captured
graph's gradient is the derivative of the forward, not what the Function's author wrote (a straight-through
estimator, a clipped square root, an FFT convolution's hand-written backward). Trained through such a graph, a
model would get other gradients than unsharded, at any world size. So, while a model is captured
(``eager_functions``), each call of a Function subclass (not torch's own, and not one whose class says
``tpfx_traced = True``: its backward is its forward's derivative) becomes one opaque op at its call site,
``tpfx::function(tensors, key)``: its inputs are the tensor arguments, its outputs the tensors ``apply``
returned. The call is intercepted in torch's ``Function.apply`` itself (its code is swapped while a thread
captures, for that thread's calls), so an ``apply`` bound before capture (``act = MyFn.apply``) is seen too. At
run time the op calls the Function's ``apply`` once on the tensors it is given, under autograd when gradients
are on; the op's backward runs that graph, so the gradient is the Function's own backward, with the draws and
side effects of one forward. Calls with equal non-tensor arguments share a key, so identical layers stay
identical graphs (block capture).

Placement. A Function whose forward and backward are both elementwise — every ATen op of the two, traced on meta
tensors of the call's shapes, of other sizes and of a rank's slice, is tagged pointwise by torch (or copies, or
makes a tensor of the operands' shape), with the same constants in every trace (a scalar computed from a shape
would differ on a rank's slice), and its tensors all have one shape — computes each element from the same
element of its inputs, so it runs on each rank's slices as it is: it takes the pointwise rule (the operands'
common split, no collective). Any other sees the full tensors the unsharded model passes it: every operand
replicated (a split value is gathered first), as ``tpfx::hook`` does.

Refused at capture: a ``torch.Generator`` argument (its state between calls cannot be reproduced) and a
Function that writes into its inputs (``ctx.mark_dirty``: the op's inputs are values the model may read again).
Planning traces a Function's forward and backward on fake and meta tensors (no real side effects); calls with
equal constants share one record for the process's life (``_CALLS``), objects passed to them included.
"""

from __future__ import annotations

import contextlib
import threading
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.fx.experimental.proxy_tensor import make_fx
from torch.utils._pytree import tree_flatten

from .eager_hooks import Slot, fill, holes
from .placements import R
from .rules import OpCtx, Result, Strategy, pointwise, register
from .shapes import hint

__all__ = ["eager_functions", "FUNCTION_OP"]

_TORCH_APPLY = torch.autograd.Function.__dict__["apply"].__func__  # torch's apply (the classmethod's function)
_APPLY = types.FunctionType(_TORCH_APPLY.__code__, _TORCH_APPLY.__globals__, "apply", _TORCH_APPLY.__defaults__,
                            _TORCH_APPLY.__closure__)  # a copy that keeps torch's code while the original is swapped


@dataclass
class _Call:
    fn: type  # the Function subclass
    spec: Any = None  # the structure of the arguments (args, kwargs)
    leaves: list[Any] = field(default_factory=list)  # their leaves at capture (tensors as Slot)
    out_spec: Any = None  # the structure of what apply returned
    out_leaves: list[Any] = field(default_factory=list)  # non-tensor leaves of the result, as at capture

    def apply(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        args, kwargs = fill(self.leaves, self.spec, tensors)
        flat, spec = tree_flatten(_APPLY(self.fn, *args, **kwargs))
        if self.out_spec is None:  # the first call (export's, on fake tensors): the result's structure
            self.out_spec = spec
            self.out_leaves = holes(flat)
        if spec != self.out_spec:
            raise RuntimeError(f"tpfx: the autograd Function {self.fn.__qualname__} returned another structure "
                               "than when the model was captured")
        return [t for t in flat if isinstance(t, torch.Tensor)]

    def result(self, outs: list[torch.Tensor]) -> Any:
        return fill(self.out_leaves, self.out_spec, outs)


_CALLS: dict[int, _Call] = {}
_KEYS: dict[tuple, int] = {}  # a call's class, argument structure and constants -> its key
_PRE = threading.local()  # each op call's autograd graph, until the op's autograd context takes it
_LOCK = threading.Lock()


@torch.library.custom_op("tpfx::function", mutates_args=())
def function_op(tensors: list[torch.Tensor], key: int) -> list[torch.Tensor]:
    if not any(t.requires_grad for t in tensors):  # no gradient asked for (autograd runs this op's kernel alone)
        with torch.no_grad():
            return [t.clone() for t in _CALLS[key].apply(list(tensors))]
    # gradients asked for: the Function runs once, under autograd; its graph waits for the op's backward (the
    # autograd context takes it right after; under an outer no_grad it is replaced by the key's next call)
    if not hasattr(_PRE, "graphs"):
        _PRE.graphs = {}
    leaf = [t.detach().requires_grad_(t.requires_grad) for t in tensors]
    with torch.enable_grad():
        out = _CALLS[key].apply(leaf)
    _PRE.graphs[key] = (leaf, out)
    return [t.detach().clone() for t in out]


@function_op.register_fake
def _(tensors: list[torch.Tensor], key: int) -> list[torch.Tensor]:
    call = _CALLS[key]
    versions = [t._version for t in tensors]
    with torch.no_grad():
        out = [t.clone() for t in call.apply(list(tensors))]
    if versions != [t._version for t in tensors]:
        raise ValueError(f"tpfx: the autograd Function {call.fn.__qualname__} writes into its inputs "
                         "(ctx.mark_dirty), which the model may read again; return a new tensor instead")
    return out


def _setup(ctx: Any, inputs: tuple, output: Any) -> None:
    _, key = inputs
    ctx.graph = getattr(_PRE, "graphs", {}).pop(key, None)  # the forward's own graph (None while tracing)
    ctx.set_materialize_grads(False)  # an unused output's gradient stays None, as the Function would see it


def _backward(ctx: Any, grads: list[torch.Tensor]) -> tuple:
    if ctx.graph is None:
        raise RuntimeError("tpfx: a custom autograd Function's op reached backward without its forward's graph")
    leaf, out = ctx.graph
    used = [(o, g) for o, g in zip(out, grads, strict=True) if o.requires_grad and g is not None]
    if used:  # backward, not grad(): tensors the Function reads of its own get theirs accumulated
        torch.autograd.backward([o for o, _ in used], [g for _, g in used])
    return [x.grad if x.requires_grad else None for x in leaf], None


function_op.register_autograd(_backward, setup_context=_setup)
FUNCTION_OP = torch.ops.tpfx.function.default

_aten = torch.ops.aten
_MOVES = {_aten.detach.default, _aten.alias.default, _aten.clone.default, _aten._to_copy.default,
          _aten.lift_fresh_copy.default, _aten.ones_like.default, _aten.zeros_like.default, _aten.empty_like.default,
          _aten.full_like.default}  # copies, and fresh tensors of an operand's shape
_SHAPED = {_aten.view.default, _aten._unsafe_view.default, _aten.reshape.default, _aten.expand.default,
           _aten.zeros.default, _aten.empty.memory_format, _aten.full.default, _aten.new_zeros.default,
           _aten.new_empty.default, _aten.new_full.default}  # elementwise when given the operands' own shape
_ELEMENTWISE: dict[tuple[int, tuple, int], bool] = {}


def _elementwise(key: int, shapes: tuple[tuple[tuple[int, ...], torch.dtype], ...], world: int) -> bool:
    """Whether the Function's forward and backward on tensors of these shapes use elementwise ops only, with the
    same constants at the full size, at other sizes and at a rank's slice."""
    if (key, shapes, world) not in _ELEMENTWISE:
        grown = tuple((tuple(d + 1 + i if d > 1 else d for i, d in enumerate(s)), t) for s, t in shapes)
        local = tuple((tuple(max(1, -(-d // world)) if d > 1 else d for d in s), t) for s, t in shapes)
        a, *others = (_trace(_CALLS[key], x) for x in (shapes, grown, local))
        _ELEMENTWISE[key, shapes, world] = a is not None and all(b == a for b in others) and all(
            op in _MOVES or torch.Tag.pointwise in getattr(op, "tags", ()) or (op in _SHAPED and ok)
            for op, _, ok in a)
    return _ELEMENTWISE[key, shapes, world]


def _trace(call: _Call, shapes: tuple[tuple[tuple[int, ...], torch.dtype], ...]) -> list[tuple] | None:
    """Forward and backward (ones as output gradients) traced on meta tensors of ``shapes`` (one shape): each op
    with its constants (the operands' shape as ``"shape"``) and whether its list arguments are that shape;
    None if an output has another shape or the Function does not trace on meta tensors."""
    shape = shapes[0][0]

    def both(*xs: torch.Tensor) -> list[torch.Tensor]:
        leaf = [x.detach().requires_grad_(x.is_floating_point() or x.is_complex()) for x in xs]
        out = call.apply([x.clone() for x in leaf])
        if any(tuple(o.shape) != shape for o in out):
            raise ValueError("not elementwise")
        diff, wrt = [o for o in out if o.requires_grad], [x for x in leaf if x.requires_grad]
        if not diff or not wrt:
            return out
        grads = torch.autograd.grad(diff, wrt, [torch.ones_like(o) for o in diff], allow_unused=True)
        return out + [g for g in grads if g is not None]

    def const(a: Any) -> Any:
        if isinstance(a, (list, tuple, torch.Size)):
            return "shape" if tuple(a) == shape else tuple(const(x) for x in a)
        return "node" if isinstance(a, torch.fx.Node) else a

    try:
        gm = make_fx(both)(*[torch.empty(s, dtype=d, device="meta") for s, d in shapes])
    except Exception:  # noqa: BLE001 - a Function that does not trace on meta tensors is taken whole
        return None
    out = []
    for n in gm.graph.nodes:
        if n.op == "call_function":
            args = tuple(const(a) for a in n.args) + tuple((k, const(v)) for k, v in sorted(n.kwargs.items()))
            lists = [a for a in n.args if isinstance(a, (list, tuple)) and not any(isinstance(x, torch.fx.Node) for x in a)]
            out.append((n.target, args, all(const(a) == "shape" for a in lists)))
    return out


@register(torch.ops.tpfx.function)
def function_rule(ctx: OpCtx) -> Result:
    """Elementwise (see the module docstring): the pointwise rule; else every operand replicated, as is what
    the Function returns."""
    ops = ctx.operands
    given = [a for a in ctx.node.args[0] if isinstance(a, torch.fx.Node)]  # type: ignore[union-attr]  # repeats too
    shapes = tuple((tuple(hint(d, 2) for d in a.meta["val"].shape), a.meta["val"].dtype) for a in given)
    if ops and len({o.shape for o in ops}) == 1 and _elementwise(int(ctx.arg("key")), shapes, ctx.world):
        return pointwise(ctx)
    n_out = len(ctx.out_shapes) if isinstance(ctx.out_shapes, list) else 1
    return Strategy({i: R for i in range(len(ops))}, tuple([R] * n_out))


_CONSTANT = (int, float, bool, str, type(None), torch.dtype, torch.device, torch.memory_format, torch.layout)


def _key(fn: type, spec: Any, leaves: list[Any]) -> int:
    """The call's key: equal for calls of one class with one argument structure and equal constants (floats by
    their bits, so -0.0 is not 0.0; objects by identity)."""
    sig = (fn, str(spec), tuple("tensor" if isinstance(v, Slot) else (float, v.hex()) if isinstance(v, float)
                                else (type(v), v) if isinstance(v, _CONSTANT) else ("object", id(v)) for v in leaves))
    with _LOCK:
        if sig not in _KEYS:
            _KEYS[sig] = len(_KEYS) + 1
            _CALLS[_KEYS[sig]] = _Call(fn, spec, leaves)
        return _KEYS[sig]


def _stand_in(fn: type, *args: Any, **kwargs: Any) -> Any:
    flat, spec = tree_flatten((args, kwargs))
    if any(isinstance(v, torch.Generator) for v in flat):
        raise ValueError(f"tpfx: the autograd Function {fn.__qualname__} is given a torch.Generator, whose state "
                         "between calls a captured graph cannot reproduce; draw from the default generator")
    tensors = [v for v in flat if isinstance(v, torch.Tensor)]
    key = _key(fn, spec, holes(flat))
    return _CALLS[key].result(list(FUNCTION_OP(tensors, key)))


def _honoured(fn: type) -> bool:
    return not fn.__module__.startswith(("torch.", "tpfx.")) and not getattr(fn, "tpfx_traced", False)


def _dispatch(cls: type, *args: Any, **kwargs: Any) -> Any:
    if _honoured(cls) and threading.get_ident() in _CAPTURING:
        return _stand_in(cls, *args, **kwargs)
    return _APPLY(cls, *args, **kwargs)


def _trampoline() -> types.CodeType:
    """The code ``Function.apply`` runs while capturing: ``_dispatch`` (set in torch.autograd.function's globals,
    which the swapped code reads). It has the one free variable torch's code has (``__class__``, for
    ``super()``), so that it can be given to the same function object."""
    __class__ = None  # noqa: F841 - a cell of this function, a free variable of the one below

    def apply(cls: type, *args: Any, **kwargs: Any) -> Any:
        __class__  # noqa: B018
        return _tpfx_function_dispatch(cls, *args, **kwargs)  # type: ignore[name-defined]  # noqa: F821

    return apply.__code__


_TRAMPOLINE = _trampoline()
_CAPTURING: dict[int, int] = {}  # thread id -> how many captures it is inside


@contextlib.contextmanager
def eager_functions() -> Iterator[None]:
    """While this thread captures: each call of a Function a model defines as ``tpfx::function`` (see the module
    docstring); torch's own ``apply`` put back when no thread captures."""
    module = torch.autograd.function
    me = threading.get_ident()
    with _LOCK:
        if not _CAPTURING:
            module._tpfx_function_dispatch = _dispatch  # type: ignore[attr-defined]
            _TORCH_APPLY.__code__ = _TRAMPOLINE
        _CAPTURING[me] = _CAPTURING.get(me, 0) + 1
    try:
        yield
    finally:
        with _LOCK:
            _CAPTURING[me] -= 1
            if not _CAPTURING[me]:
                del _CAPTURING[me]
            if not _CAPTURING:
                _TORCH_APPLY.__code__ = _APPLY.__code__
                del module._tpfx_function_dispatch  # type: ignore[attr-defined]
