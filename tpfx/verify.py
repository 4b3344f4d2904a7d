"""``tpfx.verify(model, t)``: is the t-rank plan exact for this model? A check to run on a laptop before a cluster.

The idea: run the plan's t ranks in this process on CPU threads (``auto_shard(devices=["cpu"] * t)``: the same
per-rank graphs, collectives and all, a launched job would run) and the unsharded model on the same inputs, and
compare. The loss is a fixed random projection of every floating output (so every output and every gradient
path is checked, whatever the model returns). Reported:

    outputs       the relative error of each floating output
    per layer     the relative error of the gradients of each layer of the model's stack (its longest
                  ``nn.ModuleList``) and of the parameters outside it, and the forward collectives there
    verdict       ``ok`` when every error is within ``tol`` (fp32: 1e-5)

Relative error is ``max|sharded - unsharded| / max|unsharded|``; for gradients the denominator is at least 1e-2 of
the model's largest gradient entry, since gradients that are zero in exact arithmetic (a key bias under softmax)
are fp32 noise of ~1e-11 whose value depends on summation order.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._pytree import tree_flatten

GRAD_FLOOR_FRACTION = 1e-2


@dataclass
class Row:
    """One part of the model: a layer of the stack, or a module outside it."""
    name: str
    params: int
    grad_error: float | None  # None: no parameter of it gets a gradient
    collectives: dict[str, int] = field(default_factory=dict)


@dataclass
class Verification:
    """What ``tpfx.verify`` measured; ``ok`` when every error is within ``tol``."""
    world_size: int
    tol: float
    outputs: dict[str, float]
    rows: list[Row]
    forward: dict[str, int]

    @property
    def worst(self) -> float:
        errs = list(self.outputs.values()) + [r.grad_error for r in self.rows if r.grad_error is not None]
        return max(errs, default=0.0)

    @property
    def ok(self) -> bool:
        return self.worst <= self.tol

    def __str__(self) -> str:
        from rich.console import Console
        from rich.table import Table

        table = Table(title=f"tpfx.verify at world_size={self.world_size} (tolerance {self.tol:g})")
        for col in ("compared", "params", "rel err", "forward collectives"):
            table.add_column(col)
        for name, err in self.outputs.items():
            table.add_row(f"output {name}", "", f"{err:.2e}", "")
        for r in self.rows:
            table.add_row(f"grads {r.name}", f"{r.params:,}", "-" if r.grad_error is None else f"{r.grad_error:.2e}",
                          ", ".join(f"{n} {k}" for k, n in sorted(r.collectives.items())))
        console = Console(width=120, record=True, file=None, force_terminal=False)
        with console.capture() as cap:
            console.print(table)
        verdict = "ok" if self.ok else "FAILED"
        total = ", ".join(f"{n} {k}" for k, n in sorted(self.forward.items())) or "none"
        return (cap.get().rstrip() + f"\nworst relative error {self.worst:.2e}: {verdict}; forward collectives: "
                f"{total}")


def _rel(a: torch.Tensor, b: torch.Tensor, floor: float = 0.0) -> float:
    if a.shape != b.shape:
        return float("inf")
    scale = max(b.detach().abs().max().item() if b.numel() else 0.0, floor, 1e-30)
    return (a.detach().float() - b.detach().float()).abs().max().item() / scale if a.numel() else 0.0


def _parts(model: torch.nn.Module) -> dict[str, str]:
    """Each parameter's part: the layer of the stack it is in, else its module."""
    from tpfx.passes import stack_layers

    layers = {id(m) for m in stack_layers(model)}
    prefix = [name for name, m in model.named_modules() if id(m) in layers]
    out = {}
    for fqn, _ in model.named_parameters():
        out[fqn] = next((p for p in prefix if fqn.startswith(p + ".")), fqn.rpartition(".")[0] or fqn)
    return out


def _projection(outputs: list[torch.Tensor], seed: int) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(o.shape, generator=gen, dtype=o.dtype) for o in outputs]


def _floating(out: Any) -> list[tuple[str, torch.Tensor]]:
    """The floating tensors of a model's output, named by position (or key)."""
    if hasattr(out, "keys") and hasattr(out, "values"):
        items = [(str(k), v) for k, v in out.items()]
    else:
        flat, _ = tree_flatten(out)
        items = [(str(i), v) for i, v in enumerate(flat)]
    found = []
    for name, v in items:
        leaves, _ = tree_flatten(v)
        found += [(name if len(leaves) == 1 else f"{name}.{i}", x) for i, x in enumerate(leaves)
                  if isinstance(x, torch.Tensor) and x.is_floating_point()]
    return found


def _collectives_by_part(plan: Any, parts: dict[str, str]) -> dict[str, dict[str, int]]:
    """Forward collectives of the plan, by the part of the model they sit after."""
    from tpfx.passes import module_of

    gm = plan.derivation.gm if plan.derivation is not None else None
    nodes = {n.name: n for n in gm.graph.nodes} if gm is not None else {}
    names = sorted(set(parts.values()), key=len, reverse=True)
    out: dict[str, dict[str, int]] = {}
    for c in plan.forward_collectives():
        node = nodes.get(c.after)
        mod = module_of(node) if node is not None else ""
        part = next((p for p in names if mod == p or mod.startswith(p + ".")), "(the model's root)")
        counts = out.setdefault(part, {})
        counts[c.kind] = counts.get(c.kind, 0) + 1
    return out


def verify(model: torch.nn.Module, world_size: int, *, example_inputs: tuple | None = None,
           example_kwargs: dict[str, Any] | None = None, tol: float = 1e-5, seed: int = 0,
           **shard_kwargs: Any) -> Verification:
    """Run the ``world_size``-rank plan of ``model`` in this process on CPU threads and the unsharded model on
    the same inputs (those given, else synthesized as ``auto_shard`` does), in the model's mode, and compare
    outputs and every parameter's gradient. ``model`` is left as it was (no ``.grad`` written). Extra keyword
    arguments go to ``auto_shard`` (``sequence_parallel=True``, ``overrides=...``). See ``Verification``."""
    from tpfx.api import auto_shard
    from tpfx.derive import examples

    args, kwargs = examples(model, example_inputs, example_kwargs)
    sharded = auto_shard(copy.deepcopy(model), devices=["cpu"] * world_size, example_inputs=args or None,
                         example_kwargs=kwargs or None, **shard_kwargs)
    try:
        torch.manual_seed(seed)
        got = _floating(sharded(*args, **kwargs))
        ref = copy.deepcopy(model)
        torch.manual_seed(seed)
        want = _floating(ref(*args, **kwargs))
        outputs = {n: _rel(g, w) for (n, g), (_, w) in zip(got, want, strict=True)}
        weights = _projection([w for _, w in want], seed)
        params = [p for p in ref.parameters() if p.requires_grad]
        loss = sum(((w * x).sum() for (_, x), w in zip(want, weights, strict=True)), torch.zeros(()))
        grads = dict(zip([id(p) for p in params], torch.autograd.grad(loss, params, allow_unused=True), strict=True))
        sloss = sum(((w * x).sum() for (_, x), w in zip(got, weights, strict=True)), torch.zeros(()))
        sparams = [p for p in sharded.parameters() if p.requires_grad]
        sgrads = dict(zip([n for n, p in sharded.named_parameters() if p.requires_grad],
                          torch.autograd.grad(sloss, sparams, allow_unused=True), strict=True))
    finally:
        sharded.close()
    full = {n: grads.get(id(p)) for n, p in ref.named_parameters()}
    scale = max((g.abs().max().item() for g in full.values() if g is not None), default=0.0)
    parts = _parts(ref)
    rows: dict[str, Row] = {}
    for n, p in ref.named_parameters():
        row = rows.setdefault(parts[n], Row(parts[n], 0, None))
        row.params += p.numel()
    for name, g in sgrads.items():
        fqn, _, cut = name.partition("[")
        want_g = full.get(fqn)
        if want_g is None and g is None:
            continue
        err = float("inf") if want_g is None or g is None else _rel(g, _cut(want_g, cut), GRAD_FLOOR_FRACTION * scale)
        row = rows[parts[fqn]]
        row.grad_error = max(row.grad_error or 0.0, err)
    by_part = _collectives_by_part(sharded.plan, parts)
    for part, counts in by_part.items():
        rows.setdefault(part, Row(part, 0, None)).collectives = counts
    forward: dict[str, int] = {}
    for c in sharded.plan.forward_collectives():
        forward[c.kind] = forward.get(c.kind, 0) + 1
    return Verification(world_size, tol, outputs, list(rows.values()), forward)


def _cut(full: torch.Tensor, cut: str) -> torch.Tensor:
    """The piece of ``full`` an exposed parameter's name spells after its ``[`` (``"a:b]"``, ``":, a:b]"``)."""
    if not cut:
        return full
    *_, span = cut.rstrip("]").split(", ")
    a, b = map(int, span.split(":"))
    return full.narrow(cut.count(":, "), a, b - a)
