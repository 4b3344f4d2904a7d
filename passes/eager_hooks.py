"""Forward hooks run eagerly inside the captured graph: ``tpfx::hook``.

torch.export traces a module's forward hooks like the rest of the model's Python: the tensors a hook returns
become graph ops, but what else it does — store an activation, print, count, read a global — happens once,
at capture. So, while a model is captured (``eager_hooks``), each forward hook and pre-hook the user
registered (``_users``: not transformers' or torch's own, which act inside the call, and not one marked
``hook.tpfx_traced = True`` by code that installs its own recording hooks) is replaced by a stand-in that puts
one opaque op in the graph at each call site, ``tpfx::hook(tensors, key, n_out)``: its inputs are the tensors
the hook is given (the module's arguments, and its output for a forward hook), its outputs the tensors that
continue (the output, or the arguments, as the hook leaves them) and a flag saying whether the hook returned
anything. At run time the op calls the hook with the real tensors and the module, on every call. Its gradient
is the hook's: a hook that returned something is run again under autograd in backward (on clones, with the
forward's random state; tensors it reads of its own, such as a trained steering vector, get their gradients
accumulated as in the unsharded model); one that returned ``None`` passes gradients through.

The op's rule wants every operand replicated: a hook sees the full tensors the unsharded model would pass it
(a split value is gathered first). The hook must return ``None`` or what it was given, with the same structure,
shapes and dtypes; anything else raises. Attributes a hook sets on its module (``m.out = o``) are recorded as
``VOLATILE`` so that the sharded module's state key (``tpfx.tree``) does not re-capture for them.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from .placements import R
from .rules import OpCtx, Result, Strategy, register

__all__ = ["eager_hooks", "HOOK_OP", "VOLATILE", "rebind"]

VOLATILE: dict[int, set[str]] = {}  # id(module) -> attributes its hooks set while running


@dataclass
class _Hook:
    fn: Callable[..., Any]
    module: torch.nn.Module
    pre: bool  # a forward pre-hook (given the arguments) or a forward hook (given arguments and output)
    spec: Any = None  # the structure of what the hook is given at this call site (a tuple: args[, kwargs][, out])
    leaves: list[Any] = field(default_factory=list)  # its leaves at capture (tensors as Slot)
    out_spec: Any = None  # the structure of what goes on (the output, or the arguments)

    def given(self, tensors: list[torch.Tensor]) -> tuple:
        return fill(self.leaves, self.spec, tensors)

    def call(self, tensors: list[torch.Tensor], n_out: int) -> tuple[list[torch.Tensor], bool]:
        """Run the hook on these tensors: the tensors that go on (what it returned, else what it was given) and
        whether it returned anything."""
        given = self.given(tensors)
        before = {k: id(v) for k, v in vars(self.module).items()}
        res = self.fn(self.module, *given)
        changed = {k for k, v in vars(self.module).items() if before.get(k) != id(v)}
        if changed:
            VOLATILE.setdefault(id(self.module), set()).update(changed)
        if res is None:
            return tensors[len(tensors) - n_out:], False
        if self.pre and len(given) == 1 and not isinstance(res, tuple):
            res = (res,)  # a pre-hook's single return value is the one argument (as torch wraps it)
        flat, spec = tree_flatten(res)
        kept = [t for t in flat if isinstance(t, torch.Tensor)]
        was = tensors[len(tensors) - n_out:]
        if spec != self.out_spec or [(t.shape, t.dtype) for t in kept] != [(t.shape, t.dtype) for t in was]:
            raise RuntimeError(f"tpfx: the hook {getattr(self.fn, '__qualname__', self.fn)} returned something "
                               "other than what it was given (structure, shapes or dtypes); a hook on a sharded "
                               "model returns None or what it was given, changed in value only")
        return kept, True


class Slot:
    """Where a tensor stood among the leaves of a structure (a hook's or a custom Function's arguments)."""


def holes(flat: list[Any]) -> list[Any]:
    """``flat`` (a structure's leaves) with each tensor replaced by a ``Slot``."""
    return [Slot() if isinstance(v, torch.Tensor) else v for v in flat]


def fill(leaves: list[Any], spec: Any, tensors: Iterable[torch.Tensor]) -> Any:
    """The structure ``spec`` of ``leaves``, its slots filled with ``tensors`` in order."""
    it = iter(tensors)
    return tree_unflatten([next(it) if isinstance(v, Slot) else v for v in leaves], spec)


_HOOKS: dict[int, _Hook] = {}
_PRE = threading.local()  # the random state each op call started from, until its autograd context takes it


@torch.library.custom_op("tpfx::hook", mutates_args=())
def hook_op(tensors: list[torch.Tensor], key: int, n_out: int) -> list[torch.Tensor]:
    if not hasattr(_PRE, "rng"):
        _PRE.rng = {}
    cuda = sorted({t.device.index or 0 for t in tensors if t.device.type == "cuda"})
    # the state the hook's draws start from (CPU and the tensors' GPUs), for its re-run in backward
    _PRE.rng[key] = torch.get_rng_state(), [(d, torch.cuda.get_rng_state(d)) for d in cuda]
    out, returned = _HOOKS[key].call(list(tensors), n_out)
    return [t.clone() for t in out] + [torch.tensor(returned)]


@hook_op.register_fake
def _(tensors: list[torch.Tensor], key: int, n_out: int) -> list[torch.Tensor]:
    return [torch.empty_like(t) for t in tensors[len(tensors) - n_out:]] + [torch.empty((), dtype=torch.bool)]


def _setup(ctx: Any, inputs: tuple, output: Any) -> None:
    tensors, key, n_out = inputs
    ctx.key, ctx.n_out, ctx.n_in = key, n_out, len(tensors)
    ctx.rng = getattr(_PRE, "rng", {}).pop(key, None)  # taken before the hook ran (setup runs after the op)
    ctx.save_for_backward(*tensors, output[-1])  # the flag is read in backward (a value, not a shape)


def _backward(ctx: Any, grads: list[torch.Tensor]) -> tuple:
    grads = list(grads)[:ctx.n_out]
    *saved, returned = ctx.saved_tensors
    if not bool(returned):  # the output went on as it was: its gradient passes through
        return [None] * (ctx.n_in - ctx.n_out) + grads, None, None
    cpu, cuda = ctx.rng if ctx.rng is not None else (None, [])
    with torch.enable_grad(), torch.random.fork_rng(devices=[d for d, _ in cuda]):
        if cpu is not None:
            torch.set_rng_state(cpu)
        for d, state in cuda:
            torch.cuda.set_rng_state(state, d)
        leaf = [x.detach().requires_grad_(x.is_floating_point()) for x in saved]
        out, _ = _HOOKS[ctx.key].call([x.clone() for x in leaf], ctx.n_out)
        used = [(o, g) for o, g in zip(out, grads, strict=True) if o.requires_grad and g is not None]
        if used:  # backward, not grad(): tensors the hook reads of its own (a trained steering vector) get theirs
            torch.autograd.backward([o for o, _ in used], [g for _, g in used])
    return [x.grad if x.requires_grad else None for x in leaf], None, None


hook_op.register_autograd(_backward, setup_context=_setup)
HOOK_OP = torch.ops.tpfx.hook.default
torch.fx.node.has_side_effect(HOOK_OP)  # never dead code: a recording hook's output may be unused


@register(torch.ops.tpfx.hook)
def hook_rule(ctx: OpCtx) -> Result:
    """A hook sees full tensors: every operand replicated, and so is what goes on (and the flag)."""
    return Strategy({i: R for i in range(len(ctx.operands))}, tuple([R] * (int(ctx.arg("n_out")) + 1)))


def _stand_in(fn: Callable[..., Any], pre: bool) -> Callable[..., Any]:
    def stand_in(module: torch.nn.Module, *given: Any) -> Any:
        entry = _Hook(fn, module, pre)  # one per call site: a module called twice may be given other things
        _HOOKS[id(entry)] = entry
        flat, entry.spec = tree_flatten(given)
        entry.leaves = holes(flat)
        tensors = [v for v in flat if isinstance(v, torch.Tensor)]
        goes_on = given[0] if pre and len(given) == 1 else given if pre else given[-1]
        on_flat, entry.out_spec = tree_flatten(goes_on)
        n_out = sum(isinstance(v, torch.Tensor) for v in on_flat)
        return fill(holes(on_flat), entry.out_spec, HOOK_OP(tensors, id(entry), n_out)[:n_out])

    return stand_in


def _users(hooks: dict[int, Any]) -> list[int]:
    """The hooks a user added (see the module docstring)."""
    out = []
    for k, fn in hooks.items():
        where = str(getattr(fn, "__module__", None) or getattr(type(fn), "__module__", ""))
        if not where.startswith(("transformers.", "torch.")) and not getattr(fn, "tpfx_traced", False):
            out.append(k)
    return out


@contextlib.contextmanager
def eager_hooks(model: torch.nn.Module) -> Iterator[None]:
    """While capturing ``model``: its users' forward hooks and pre-hooks (and global ones) as ``tpfx::hook``
    ops (see the module docstring); put back after."""
    g = torch.nn.modules.module
    places = [(g._global_forward_pre_hooks, True), (g._global_forward_hooks, False)]
    places += [(getattr(m, a), pre) for m in model.modules()
               for a, pre in (("_forward_pre_hooks", True), ("_forward_hooks", False))]
    saved: list[tuple[dict, int, Any]] = []
    for hooks, pre in places:
        for k in _users(hooks):
            saved.append((hooks, k, hooks[k]))
            hooks[k] = _stand_in(hooks[k], pre)
    try:
        yield
    finally:
        for hooks, k, fn in saved:
            hooks[k] = fn


def rebind(modules: dict[int, torch.nn.Module]) -> None:
    """Hooks captured on a model's modules run on other modules from now on (``modules``: by the id of the
    module they were captured on; the sharded model's copies of the modules it was captured from)."""
    for entry in _HOOKS.values():
        if id(entry.module) in modules:
            entry.module = modules[id(entry.module)]
