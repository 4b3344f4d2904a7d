"""Activation checkpointing honoured in the per-rank graphs.

``torch.export`` runs a model's ``torch.utils.checkpoint.checkpoint`` calls as plain code: the graph it returns
keeps every activation for backward, so a model that asked for checkpointing (transformers'
``gradient_checkpointing_enable()``, or its own ``checkpoint`` calls) would silently use the memory it asked
not to. So:

1. ``marking_regions``: while export traces, ``checkpoint`` (both the reentrant and the non-reentrant form)
   runs its function under ``torch.fx.traceback.annotate``: each node it makes carries the call's region
   number in ``node.meta["custom"]["tpfx_checkpoint"]``. A checkpoint policy tpfx cannot carry into the graph
   (a ``context_fn``: selective checkpointing) is refused.
2. ``checkpoint_regions`` (after emission): each region's span in a rank's graph, from its first marked node to
   its last (the collectives emission put between them included; parameters and inputs stay outside), is
   outlined into a submodule called through ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``:
   autograd keeps the region's inputs and recomputes the rest in backward, collectives included (as Megatron's
   recompute does), with the random state of the forward (the same dropout masks).

A block capture's stitched copies of a layer get a region of their own (``blocks._copy_layers``).

3. ``checkpointing_layers`` (``auto_shard(..., activation_checkpointing=True)``): for a model that does not ask
   for checkpointing itself, each layer of its stack (its longest ``nn.ModuleList``) runs through
   ``torch.utils.checkpoint`` while export traces, so steps 1 and 2 make it a region: checkpointing per block.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx as fx
import torch.fx.traceback as fx_traceback
import torch.utils.checkpoint as torch_checkpoint
from torch.fx.passes.utils.fuser_utils import fuse_by_partitions

KEY = "tpfx_checkpoint"


class CheckpointPolicyError(ValueError):
    """A checkpoint call whose policy the per-rank graph cannot carry."""


def region(node: fx.Node) -> Any:
    return node.meta.get("custom", {}).get(KEY)


@contextlib.contextmanager
def marking_regions() -> Iterator[None]:
    """While active, every ``torch.utils.checkpoint.checkpoint`` call runs its function directly, its nodes
    marked with a region number (see the module docstring)."""
    numbers = itertools.count()
    plain = torch_checkpoint._checkpoint_without_reentrant_generator
    reentrant = torch_checkpoint.CheckpointFunction

    def generator(fn: Any, preserve: bool, context_fn: Any, *args: Any, **kwargs: Any) -> Iterator[None]:
        if context_fn is not torch_checkpoint.noop_context_fn:
            raise CheckpointPolicyError("tpfx: torch.utils.checkpoint with a context_fn (selective activation "
                                        "checkpointing) is not carried into the sharded graphs; checkpoint whole "
                                        "regions (no context_fn), or none")
        with fx_traceback.annotate({KEY: next(numbers)}):
            yield

    class Reentrant:
        @staticmethod
        def apply(fn: Any, preserve: bool, *args: Any) -> Any:
            with fx_traceback.annotate({KEY: next(numbers)}):
                return fn(*args)

    torch_checkpoint._checkpoint_without_reentrant_generator = generator  # type: ignore[assignment]
    torch_checkpoint.CheckpointFunction = Reentrant  # type: ignore[assignment,misc]
    try:
        with fx_traceback.preserve_node_meta():
            yield
    finally:
        torch_checkpoint._checkpoint_without_reentrant_generator = plain
        torch_checkpoint.CheckpointFunction = reentrant  # type: ignore[misc]


def stack_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The layers of the model's stack: its longest ``nn.ModuleList`` (the first of equal length)."""
    lists = [list(m) for name, m in model.named_modules() if isinstance(m, torch.nn.ModuleList) and len(m) and name]
    return max(lists, key=len) if lists else []


def _checkpoints_itself(model: torch.nn.Module) -> bool:
    """transformers' ``gradient_checkpointing_enable()`` was called: the model checkpoints its layers itself."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


@contextlib.contextmanager
def checkpointing_layers(model: torch.nn.Module) -> Iterator[None]:
    """While active, each layer of the model's stack runs through ``torch.utils.checkpoint`` (non-reentrant);
    a model that checkpoints its layers itself is left as it is."""
    if _checkpoints_itself(model):
        yield
        return
    layers = stack_layers(model)
    if not layers:
        raise CheckpointPolicyError("tpfx: activation_checkpointing=True checkpoints each layer of the model's "
                                    "stack (its longest nn.ModuleList), and this model has none; call "
                                    "torch.utils.checkpoint in its forward instead (tpfx honours it)")
    saved = [(layer, vars(layer).get("forward")) for layer in layers]
    for layer in layers:
        layer.forward = functools.partial(torch_checkpoint.checkpoint, layer.forward,  # type: ignore[method-assign]
                                          use_reentrant=False)
    try:
        yield
    finally:
        for layer, own in saved:
            if own is None:
                del layer.forward
            else:
                layer.forward = own  # type: ignore[method-assign]


def renumber(node: fx.Node, suffix: str) -> None:
    """Give ``node``'s region (if any) a name of its own: a copy of a layer is a region of its own."""
    if region(node) is not None:
        node.meta["custom"] = {**node.meta["custom"], KEY: f"{region(node)}{suffix}"}


def _checkpointed(module: torch.nn.Module, *args: Any) -> Any:
    return torch_checkpoint.checkpoint(module, *args, use_reentrant=False)


def _spans(gm: fx.GraphModule) -> list[list[fx.Node]]:
    """Each region's computed nodes, from its first marked node to its last, in graph order. Only nodes whose
    result is read mark a region: export leaves stale marks on checks it adds after the fact (asserts)."""
    nodes = list(gm.graph.nodes)
    first: dict[Any, int] = {}
    last: dict[Any, int] = {}
    for i, n in enumerate(nodes):
        r = region(n) if n.users else None
        if r is not None:
            first.setdefault(r, i)
            last[r] = i
    spans = []
    for r in sorted(first, key=first.__getitem__):
        span = [n for n in nodes[first[r]:last[r] + 1] if n.op == "call_function"]
        if any(region(n) not in (None, r) for n in span if n.users):
            raise CheckpointPolicyError(f"tpfx: checkpointed regions interleave in the graph (region {r}); "
                                        "checkpoint regions that do not overlap")
        spans.append(span)
    return spans


def checkpoint_regions(gm: fx.GraphModule) -> fx.GraphModule:
    """Outline each checkpointed region of a per-rank graph and call it through ``checkpoint`` (in place)."""
    spans = _spans(gm)
    if not spans:
        return gm
    fuse_by_partitions(gm, [dict.fromkeys(s) for s in spans], prefix="checkpointed_")
    for node in list(gm.graph.nodes):
        if node.op == "call_module" and str(node.target).startswith("checkpointed_"):
            with gm.graph.inserting_before(node):
                module = gm.graph.get_attr(str(node.target))
            node.op, node.target, node.args = "call_function", _checkpointed, (module, *node.args)
    gm.graph.lint()
    gm.recompile()
    return gm
