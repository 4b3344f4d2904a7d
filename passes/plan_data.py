"""The compiler's output as plain data: every parameter's placement and every forward collective, keyed by
parameter FQNs and graph node names (``build_plan``). ``tpfx.plan.ShardingPlan`` adds the views."""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from .placements import Placement, Replicate, Shard, shard_tensor
from .propagate import Propagation, Seed, moves, nbytes
from .redistribute import steps_collective

INDEX = re.compile(r"\.(\d+)(?=\.|$)")  # a container index in a module path: ``.17`` of ``model.layers.17.mlp``


def fold(name: str) -> str:
    """``model.layers.17.mlp.down_proj.weight`` -> ``model.layers.*.mlp.down_proj.weight``."""
    return INDEX.sub(".*", name)


@dataclass(frozen=True)
class ParamPlacement:
    style: str  # colwise | rowwise | vocab | shard | replicate
    placement: str  # "R" or "S(dim/groups[segs])"
    shape: tuple[int, ...]
    dim: int | None = None
    groups: int = 1
    segs: tuple[int, ...] = ()
    sgroups: tuple[int, ...] | None = None  # per segment, where they differ (whole key/value heads in a fused qkv)
    unit: int = 1  # uneven chunks in whole multiples of it (heads not divisible by the group count)

    def as_placement(self) -> Placement:
        return Shard(self.dim, self.groups, self.segs, self.sgroups, self.unit) if self.dim is not None \
            else Replicate()

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
        if d["unit"] == 1:
            del d["unit"]  # likewise
        return d

    @classmethod
    def from_dict(cls, v: dict[str, Any]) -> ParamPlacement:
        return cls(**{**v, "shape": tuple(v["shape"]), "segs": tuple(v["segs"]),
                      "sgroups": tuple(v["sgroups"]) if v.get("sgroups") else None})


def _chunk_layout(p: ParamPlacement, world: int) -> bool:
    """The layout is ``torch.chunk``'s over all ``world`` ranks of one segment (what HF's colwise/rowwise do)."""
    pl = p.as_placement()
    if not isinstance(pl, Shard) or len(pl.segs) != 1 or pl.groups != world:
        return False
    step = -(-pl.segs[0] // world)
    return all(pl.local_size(r, world) == max(0, min(step, pl.segs[0] - r * step)) for r in range(world))


@dataclass(frozen=True)
class Collective:
    kind: str  # all_reduce | all_gather | reduce_scatter | scatter; pass "backward" for gradient ones
    after: str  # the graph node whose output it redistributes
    before: str  # the consumer
    bytes: int  # per call, for the example shapes (full tensor)
    pass_: str = "forward"


@dataclass
class PlanData:
    world_size: int
    placements: dict[str, ParamPlacement]
    collectives: list[Collective]
    fallbacks: list[dict[str, str]] = field(default_factory=list)
    unknown_ops: list[str] = field(default_factory=list)
    sequence_parallel: bool = False  # activations only: the residual stream split by sequence between blocks

    def to_tp_plan(self) -> dict[str, str]:
        """HF-style ``{"model.layers.*.self_attn.q_proj": "colwise", ...}`` (non-replicated modules). HF's styles
        split a weight in ``torch.chunk``'s sizes over all ranks: a layout they cannot express (whole heads split
        unevenly, a part held whole, chunks replicated within groups) is named in a ``UserWarning``."""
        per_module: dict[str, set[str]] = {}
        inexact = sorted({fold(fqn.rpartition(".")[0]) for fqn, p in self.placements.items()
                          if p.dim is not None and not _chunk_layout(p, self.world_size)})
        if inexact:
            warnings.warn(f"tpfx: HF's tp_plan styles cannot express the layout of {', '.join(inexact[:4])}"
                          f"{' and others' if len(inexact) > 4 else ''} (uneven whole heads, parts held whole, or "
                          "chunks replicated within groups): HF would split them in torch.chunk's sizes",
                          stacklevel=2)
        for fqn, p in self.placements.items():
            module, _, leaf = fqn.rpartition(".")
            if leaf != "weight" or p.style == "replicate":
                continue
            # PyTorch/HF RowwiseParallel on an nn.Embedding splits the vocab rows
            style = "rowwise" if p.style == "vocab" else p.style
            per_module.setdefault(fold(module), set()).add(style)
        return {k: "/".join(sorted(v)) for k, v in sorted(per_module.items())}

    def shard(self, fqn: str, full: torch.Tensor, rank: int) -> torch.Tensor:
        return shard_tensor(full, self.placements[fqn].as_placement(), rank, self.world_size)

    def forward_collectives(self) -> list[Collective]:
        return [c for c in self.collectives if c.pass_ == "forward"]

    def count(self, kind: str, pass_: str = "forward") -> int:
        return sum(1 for c in self.collectives if c.kind == kind and c.pass_ == pass_)

    def data_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "world_size": self.world_size,
            "placements": {k: v.as_dict() for k, v in sorted(self.placements.items())},
            "collectives": [asdict(c) for c in self.collectives],
            "fallbacks": self.fallbacks,
            "unknown_ops": sorted(self.unknown_ops),
        }
        if self.sequence_parallel:
            d["sequence_parallel"] = True  # absent otherwise: plain-TP plans keep their JSON
        return d

    @staticmethod
    def fields_of(d: dict[str, Any]) -> dict[str, Any]:
        """The constructor's arguments from ``data_dict``'s output (parsed JSON)."""
        return {"world_size": d["world_size"],
                "placements": {k: ParamPlacement.from_dict(v) for k, v in d["placements"].items()},
                "collectives": [Collective(**c) for c in d["collectives"]], "fallbacks": d["fallbacks"],
                "unknown_ops": d["unknown_ops"], "sequence_parallel": d.get("sequence_parallel", False)}

    def digest(self) -> str:
        return hashlib.sha256(json.dumps({k: v.as_dict() for k, v in sorted(self.placements.items())},
                                         sort_keys=True).encode()).hexdigest()[:16]

    def pins(self) -> dict[str, tuple[str, Placement | None]]:
        return {k: (v.style, v.as_placement()) for k, v in self.placements.items()}


def _placements(prop: Propagation) -> dict[str, ParamPlacement]:
    placements: dict[str, ParamPlacement] = {}
    for node, fqn in prop.param_nodes.items():
        if fqn in placements:
            continue
        shape = tuple(int(s) for s in node.meta["val"].shape)
        style, pl = prop.decided.get(fqn, ("replicate", Replicate()))
        if isinstance(pl, Shard):
            placements[fqn] = ParamPlacement(style, str(pl), shape, pl.dim, pl.groups, pl.segs, pl.sgroups, pl.unit)
        else:
            placements[fqn] = ParamPlacement("replicate", "R", shape)
    return dict(sorted(placements.items()))


def _collectives(prop: Propagation) -> list[Collective]:
    collectives: list[Collective] = [Collective("all_reduce", n.name, "*", nbytes(n)) for n in prop.reduced_after]
    collectives += [Collective("reduce_scatter", n.name, "*", nbytes(n)) for n in prop.scattered_after]
    for m in moves(prop):
        kind = steps_collective(m.steps)
        if kind is not None:  # one collective per producer and target placement, shared by its consumers
            collectives.append(Collective(kind, m.producer.name, m.consumer.name, nbytes(m.producer)))
    collectives.sort(key=lambda c: (c.after, c.before))
    return collectives


def build_plan(prop: Propagation, seeds: dict[str, Seed]) -> PlanData:
    """The plan of a propagation: placements by FQN, forward collectives by node name, fallbacks with reasons."""
    fallbacks = [{"node": n, "reason": r} for n, r in prop.fallbacks]
    for fqn in sorted(seeds):
        for r in seeds[fqn].reasons:
            fallbacks.append({"param": fqn, "reason": r})
    return PlanData(prop.world, _placements(prop), _collectives(prop), fallbacks, sorted(prop.unknown_ops),
                    sequence_parallel=prop.sequence_parallel)
