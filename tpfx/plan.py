"""The sharding plan: plain data keyed by parameter FQNs and graph node names."""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from tpfx.passes.placements import Placement, Replicate, Shard, shard_tensor
from tpfx.passes.propagate import Propagation, Seed, nbytes
from tpfx.passes.redistribute import forward_collective


@dataclass(frozen=True)
class ParamPlacement:
    style: str  # colwise | rowwise | vocab | shard | replicate
    placement: str  # "R" or "S(dim/groups[segs])"
    shape: tuple[int, ...]
    dim: int | None = None
    groups: int = 1
    segs: tuple[int, ...] = ()
    sgroups: tuple[int, ...] | None = None  # per segment, where they differ (whole key/value heads in a fused qkv)

    def as_placement(self) -> Placement:
        return Shard(self.dim, self.groups, self.segs, self.sgroups) if self.dim is not None else Replicate()

    def local_shape(self) -> tuple[int, ...]:
        if self.dim is None:
            return self.shape
        s = list(self.shape)
        pl = self.as_placement()
        assert isinstance(pl, Shard)
        s[self.dim] = pl.local_size()  # rank 0's: the largest chunk of every segment (uneven splits)
        return tuple(s)

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if d["sgroups"] is None:
            del d["sgroups"]  # uniform groups: the same data (and digest) as before the field existed
        return d


@dataclass(frozen=True)
class Collective:
    kind: str  # all_reduce | all_gather | reduce_scatter | scatter; pass "backward" for gradient ones
    after: str  # the graph node whose output it redistributes
    before: str  # the consumer
    bytes: int  # per call, for the example shapes (full tensor)
    pass_: str = "forward"


@dataclass
class ShardingPlan:
    world_size: int
    placements: dict[str, ParamPlacement]
    collectives: list[Collective]
    fallbacks: list[dict[str, str]] = field(default_factory=list)
    unknown_ops: list[str] = field(default_factory=list)
    _prop: Propagation | None = field(default=None, repr=False, compare=False)
    _gm: Any = field(default=None, repr=False, compare=False)
    sequence_parallel: bool = False  # activations only: the residual stream split by sequence between blocks

    # ---------------------------------------------------------------- views
    def to_tp_plan(self) -> dict[str, str]:
        """HF-style ``{"model.layers.*.self_attn.q_proj": "colwise", ...}`` (non-replicated modules)."""
        per_module: dict[str, set[str]] = {}
        for fqn, p in self.placements.items():
            module, _, leaf = fqn.rpartition(".")
            if leaf != "weight" or p.style == "replicate":
                continue
            # PyTorch/HF RowwiseParallel on an nn.Embedding splits the vocab rows
            style = "rowwise" if p.style == "vocab" else p.style
            per_module.setdefault(re.sub(r"\.\d+\.", ".*.", module + "."), set()).add(style)
        return {k.rstrip("."): "/".join(sorted(v)) for k, v in sorted(per_module.items())}

    def shard(self, fqn: str, full: torch.Tensor, rank: int) -> torch.Tensor:
        return shard_tensor(full, self.placements[fqn].as_placement(), rank, self.world_size)

    def forward_collectives(self) -> list[Collective]:
        return [c for c in self.collectives if c.pass_ == "forward"]

    def count(self, kind: str, pass_: str = "forward") -> int:
        return sum(1 for c in self.collectives if c.kind == kind and c.pass_ == pass_)

    def to_dict(self) -> dict[str, Any]:
        from tpfx.report import analyze

        d: dict[str, Any] = {
            "world_size": self.world_size,
            "placements": {k: v.as_dict() for k, v in sorted(self.placements.items())},
            "collectives": [asdict(c) for c in self.collectives],
            "fallbacks": self.fallbacks,
            "unknown_ops": sorted(self.unknown_ops),
        }
        if self.sequence_parallel:
            d["sequence_parallel"] = True  # absent otherwise: plain-TP plans keep their JSON
        context = analyze(self)  # what the report needs from the graph (layers, attribution, b·s, h)
        if context is not None:
            d["context"] = context
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ShardingPlan:
        d = json.loads(text)
        pls = {k: ParamPlacement(**{**v, "shape": tuple(v["shape"]), "segs": tuple(v["segs"]),
                                    "sgroups": tuple(v["sgroups"]) if v.get("sgroups") else None})
               for k, v in d["placements"].items()}
        cols = [Collective(**c) for c in d["collectives"]]
        plan = cls(d["world_size"], pls, cols, d["fallbacks"], d["unknown_ops"],
                   sequence_parallel=d.get("sequence_parallel", False))
        if "context" in d:
            plan._context = d["context"]  # type: ignore[attr-defined]  # not a field: digest and == ignore it
        return plan

    def digest(self) -> str:
        return hashlib.sha256(json.dumps({k: v.as_dict() for k, v in sorted(self.placements.items())},
                                         sort_keys=True).encode()).hexdigest()[:16]

    def pins(self) -> dict[str, tuple[str, Placement | None]]:
        return {k: (v.style, v.as_placement()) for k, v in self.placements.items()}

    # ------------------------------------------------------- reports (tpfx/report, explain, draw)
    def summary(self, width: int | None = 140, hidden: int | None = None) -> str:
        """Parameter groups, collectives per layer and step, totals vs Megatron, fallbacks."""
        from tpfx.report import render_text

        return render_text(self, width, hidden)

    def explain(self, name: str) -> Any:
        """Why a parameter (or module) got its placement: the chain of ops that forced it."""
        from tpfx.explain import explain

        return explain(self, name)

    def to_dot(self) -> str:
        """Graphviz DOT of the matmul dataflow, repeated layers collapsed into one cluster."""
        from tpfx.draw import to_dot

        return to_dot(self)

    def render(self, path: str) -> str:
        """Draw the dataflow to ``path`` (format from the suffix) with Graphviz ``dot``."""
        from tpfx.draw import render

        return render(self, path)

    def to_html(self, path: str | None = None) -> str:
        """One self-contained HTML page (drawing, tables, explanations); written to ``path`` if given."""
        from tpfx.draw import to_html

        return to_html(self, path)

    def __str__(self) -> str:
        return self.summary()


def build_plan(prop: Propagation, seeds: dict[str, Seed]) -> ShardingPlan:
    placements: dict[str, ParamPlacement] = {}
    for node, fqn in prop.param_nodes.items():
        if fqn in placements:
            continue
        shape = tuple(int(s) for s in node.meta["val"].shape)
        style, pl = prop.decided.get(fqn, ("replicate", Replicate()))
        if isinstance(pl, Shard):
            placements[fqn] = ParamPlacement(style, str(pl), shape, pl.dim, pl.groups, pl.segs, pl.sgroups)
        else:
            placements[fqn] = ParamPlacement("replicate", "R", shape)
    collectives: list[Collective] = [Collective("all_reduce", n.name, "*", nbytes(n)) for n in prop.reduced_after]
    collectives += [Collective("reduce_scatter", n.name, "*", nbytes(n)) for n in prop.scattered_after]
    done: set[tuple[str, str]] = set()
    for (consumer, producer), want in prop.wants.items():
        kind = forward_collective(prop.placements.get(producer), want, prop.world)
        if kind is None:
            continue
        if (producer.name, str(want)) in done:
            continue  # one collective per producer and target placement, shared by its consumers
        done.add((producer.name, str(want)))
        collectives.append(Collective(kind, producer.name, consumer.name, nbytes(producer)))
    collectives.sort(key=lambda c: (c.after, c.before))
    fallbacks = [{"node": n, "reason": r} for n, r in prop.fallbacks]
    for fqn in sorted(seeds):
        for r in seeds[fqn].reasons:
            fallbacks.append({"param": fqn, "reason": r})
    return ShardingPlan(prop.world, dict(sorted(placements.items())), collectives, fallbacks,
                        sorted(prop.unknown_ops), prop, sequence_parallel=prop.sequence_parallel)
