"""Forward hooks run eagerly inside the captured graph: ``tpfx::hook``.

torch.export traces a module's forward hooks like the rest of the model's Python: the tensors a hook returns
become graph ops, but what else it does — store an activation, print, count, read a global — happens once,
at capture. So, while a model is captured (``eager_hooks``), each forward hook and pre-hook the user
registered from outside the model's code (``_users``: transformers' own output-recording hooks, and hooks
defined where the model's classes are, act inside the call and are traced) is replaced by a
stand-in that puts one opaque op in the graph, ``tpfx::hook(tensors, key, n_out)``: its inputs are the
tensors the hook is given (the module's arguments, and its output for a forward hook), its outputs the tensors
that continue (the output, or the arguments, as the hook leaves them). At run time the op calls the hook with
the real tensors and the module (the sharded model's own), on every call; its gradient is the hook's (a hook
that returned something is run again under autograd in backward; one that returned ``None`` passes gradients
through).

The op's rule wants every operand replicated: a hook sees the full tensors the unsharded model would pass it
(a split value is gathered first). The hook must return ``None`` or something with the structure of what it
was given (tensors of any values); non-tensor parts (flags, ``None``) are those of the capture.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from .placements import R
from .rules import OpCtx, Result, Strategy, register

__all__ = ["eager_hooks", "HOOK_OP"]


@dataclass
class _Hook:
    fn: Callable[..., Any]
    module: torch.nn.Module
    pre: bool  # a forward pre-hook (given the arguments) or a forward hook (given arguments and output)
    spec: Any = None  # the structure of what the hook is given (a tuple: args[, kwargs][, output])
    leaves: list[Any] | None = None  # its leaves at capture (tensors replaced by None)
    returned: bool = False  # the last call returned a value (its gradient is the hook's)

    def given(self, tensors: list[torch.Tensor]) -> tuple:
        it = iter(tensors)
        leaves = [next(it) if isinstance(v, _Slot) else v for v in self.leaves or []]
        return tree_unflatten(leaves, self.spec)

    def call(self, tensors: list[torch.Tensor], n_out: int) -> list[torch.Tensor]:
        """Run the hook on these tensors; the tensors that go on (what it returned, else what it was given)."""
        given = self.given(tensors)
        res = self.fn(self.module, *given)
        self.returned = res is not None
        if res is None:
            kept = tensors[len(tensors) - n_out:]
        else:
            if self.pre and len(given) == 1 and not isinstance(res, tuple):
                res = (res,)  # a pre-hook's single return value is the one argument (as torch wraps it)
            kept = [t for t in tree_flatten(res)[0] if isinstance(t, torch.Tensor)]
        if len(kept) != n_out:
            raise RuntimeError(f"tpfx: the hook {getattr(self.fn, '__qualname__', self.fn)} returned {len(kept)} "
                               f"tensors where it was given {n_out}; a hook on a sharded model returns None or "
                               "what it was given, changed in value only")
        return kept


class _Slot:
    """Where a tensor stood among a hook's inputs."""


_HOOKS: dict[int, _Hook] = {}


@torch.library.custom_op("tpfx::hook", mutates_args=())
def hook_op(tensors: list[torch.Tensor], key: int, n_out: int) -> list[torch.Tensor]:
    out = _HOOKS[key].call(list(tensors), n_out)
    return [t.clone() for t in out]


@hook_op.register_fake
def _(tensors: list[torch.Tensor], key: int, n_out: int) -> list[torch.Tensor]:
    return [torch.empty_like(t) for t in tensors[len(tensors) - n_out:]]


def _setup(ctx: Any, inputs: tuple, output: Any) -> None:
    tensors, key, n_out = inputs
    ctx.key, ctx.n_out, ctx.n_in = key, n_out, len(tensors)
    ctx.save_for_backward(*tensors)


def _backward(ctx: Any, grads: list[torch.Tensor]) -> tuple:
    hook, xs = _HOOKS[ctx.key], list(ctx.saved_tensors)
    if not hook.returned:  # the output went on as it was: its gradient passes through
        return [None] * (ctx.n_in - ctx.n_out) + list(grads), None, None
    with torch.enable_grad():
        leaf = [x.detach().requires_grad_(x.is_floating_point()) for x in xs]
        out = hook.call(leaf, ctx.n_out)
        used = [(o, g) for o, g in zip(out, grads, strict=True) if o.requires_grad and g is not None]
        got = torch.autograd.grad([o for o, _ in used], [x for x in leaf if x.requires_grad],
                                  [g for _, g in used], allow_unused=True) if used else ()
    it = iter(got)
    return [next(it) if x.requires_grad else None for x in leaf], None, None


hook_op.register_autograd(_backward, setup_context=_setup)
HOOK_OP = torch.ops.tpfx.hook.default


@register(torch.ops.tpfx.hook)
def hook_rule(ctx: OpCtx) -> Result:
    """A hook sees full tensors: every operand replicated, and so is what goes on."""
    return Strategy({i: R for i in range(len(ctx.operands))}, tuple([R] * int(ctx.arg("n_out"))))


def _stand_in(entry: _Hook, key: int) -> Callable[..., Any]:
    def stand_in(module: torch.nn.Module, *given: Any) -> Any:
        flat, spec = tree_flatten(given)
        entry.spec, entry.leaves = spec, [_Slot() if isinstance(v, torch.Tensor) else v for v in flat]
        tensors = [v for v in flat if isinstance(v, torch.Tensor)]
        n_out = len(tensors) if entry.pre else len([v for v in tree_flatten(given[-1])[0]
                                                    if isinstance(v, torch.Tensor)])
        out = iter(HOOK_OP(tensors, key, n_out))
        if entry.pre:  # the arguments (and kwargs) as the hook leaves them
            new = tree_unflatten([next(out) if isinstance(v, torch.Tensor) else v for v in flat], spec)
            return new[0] if len(given) == 1 else new  # args, or (args, kwargs) for a with_kwargs pre-hook
        last, last_spec = tree_flatten(given[-1])
        return tree_unflatten([next(out) if isinstance(v, torch.Tensor) else v for v in last], last_spec)

    return stand_in


def _users(hooks: dict[int, Any], own: set[str]) -> list[int]:
    """The hooks the user added from outside the model's code: not transformers' own, and not defined in a
    Python module that defines one of the model's module classes (a model installing its own recording hooks,
    whose side effects are part of its call, is traced like the rest of its code)."""
    out = []
    for k, fn in hooks.items():
        where = str(getattr(fn, "__module__", None) or getattr(type(fn), "__module__", ""))
        if not where.startswith("transformers.") and where not in own:
            out.append(k)
    return out


@contextlib.contextmanager
def eager_hooks(model: torch.nn.Module) -> Iterator[None]:
    """While capturing ``model``: its users' forward hooks and pre-hooks as ``tpfx::hook`` ops (see the module
    docstring); put back after."""
    saved: list[tuple[dict, int, Any]] = []
    own = {type(m).__module__ for m in model.modules()}
    for m in model.modules():
        for attr, pre in (("_forward_pre_hooks", True), ("_forward_hooks", False)):
            hooks = getattr(m, attr)
            for k in _users(hooks, own):
                entry = _Hook(hooks[k], m, pre)
                _HOOKS[id(entry)] = entry
                saved.append((hooks, k, hooks[k]))
                hooks[k] = _stand_in(entry, id(entry))
    try:
        yield
    finally:
        for hooks, k, fn in saved:
            hooks[k] = fn
