"""``tpfx.compare(plan, tp_plan)``: a derived plan next to a hand-written HF ``tp_plan``.

The idea: both sides are brought to one vocabulary, module by module. Our side is the style of each
module's weight (``vocab`` is HF's ``rowwise`` / ``embedding_rowwise`` on an embedding); HF's side is the
family of its style (``colwise_gather_output`` and ``packed_colwise`` are colwise splits with a different
output or packing). HF keys are matched like HF does (layer indices replaced by ``*``), either exactly or as
a suffix, so a ``base_model_tp_plan`` (``layers.*.mlp.up_proj``) matches ``model.layers.*.mlp.up_proj``.
Each module is ``agree``, ``differ``, ``missing_theirs`` (we split it, their plan leaves it out) or
``missing_ours`` (their key matches no module of ours).

Collective bytes, forward, for the example shapes of the planned graph:

* ours: the sum of ``plan.collectives`` (what emission inserts);
* theirs, estimated from the graph's activation sizes: every ``rowwise``-family module (``rowwise``,
  ``rowwise_split_input``, ``packed_rowwise``, ``embedding_rowwise``, ``all_reduce``, ``moe_tp_experts``)
  all-reduces its output once per call (a colwise/rowwise pair costs one all-reduce of the rowwise
  output; a split input is sliced locally, for free); ``colwise_gather_output`` / ``colwise_rep``,
  ``embedding_colwise`` and ``gather`` all-gather their output; ``colwise``, ``packed_colwise``,
  ``local*``, ``replicate``, ``replicated_with_grad_allreduce`` and ``sequence_parallel`` (norms on
  sequence-sharded values, whose collectives live in neighbouring layouts) cost nothing in the forward.
  A style outside this table makes their total unknown (``None``) and adds a note. A module's output size
  is the bytes of the last value computed inside it that is used outside it.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from rich.console import Console
from rich.table import Table

from tpfx.report import fmt_bytes, fold, module_of, numel

if TYPE_CHECKING:
    import torch.fx as fx

    from tpfx.plan import ShardingPlan


FAMILY = {
    "colwise": "colwise", "colwise_gather_output": "colwise", "colwise_rep": "colwise",
    "packed_colwise": "colwise", "local_colwise": "colwise", "embedding_colwise": "colwise",
    "rowwise": "rowwise", "rowwise_split_input": "rowwise", "rowwise_rep": "rowwise",
    "packed_rowwise": "rowwise", "local_rowwise": "rowwise", "embedding_rowwise": "rowwise",
    "replicate": "replicate", "replicated_with_grad_allreduce": "replicate", "sequence_parallel": "replicate",
    "local": "replicate", "local_params": "replicate", "gather": "replicate",
}
OURS = {"colwise": "colwise", "rowwise": "rowwise", "vocab": "rowwise", "replicate": "replicate",
        "shard": "shard"}
ALL_REDUCE = {"rowwise", "rowwise_split_input", "rowwise_rep", "packed_rowwise", "embedding_rowwise",
              "all_reduce", "moe_tp_experts"}
ALL_GATHER = {"colwise_gather_output", "colwise_rep", "embedding_colwise", "gather"}
FREE = {"colwise", "packed_colwise", "local_colwise", "local_rowwise", "local", "local_params", "replicate",
        "replicated_with_grad_allreduce", "sequence_parallel", "moe_identity_expert"}


@dataclass(frozen=True)
class Entry:
    module: str  # folded module (ours), or the HF key when it matches nothing of ours
    ours: str | None  # our style of the module's weight
    theirs: str | None  # their style as written
    status: str  # agree | differ | missing_theirs | missing_ours
    key: str | None = None  # the HF key that matched


@dataclass
class Comparison:
    entries: list[Entry]
    ours_bytes: int | None
    theirs_bytes: int | None
    notes: list[str] = field(default_factory=list)

    def by_status(self, status: str) -> list[Entry]:
        return [e for e in self.entries if e.status == status]

    @property
    def differ(self) -> list[Entry]:
        return self.by_status("differ")

    def __getitem__(self, module: str) -> Entry:
        for e in self.entries:
            if e.module == module or e.key == module:
                return e
        raise KeyError(module)

    def __str__(self) -> str:
        buf = io.StringIO()
        console = Console(file=buf, width=140, force_terminal=False, color_system=None)
        t = Table(title="tpfx plan vs tp_plan", title_justify="left")
        for col in ("module", "tpfx", "tp_plan", "status"):
            t.add_column(col)
        for e in self.entries:
            t.add_row(e.module, e.ours or "—", e.theirs or "—", e.status)
        console.print(t)
        counts = ", ".join(f"{len(self.by_status(s))} {s}" for s in ("agree", "differ", "missing_theirs",
                                                                       "missing_ours"))
        console.print(counts, highlight=False)
        console.print(f"forward collective bytes (example shapes): tpfx {fmt_bytes(self.ours_bytes)}, "
                      f"tp_plan {fmt_bytes(self.theirs_bytes)} (estimated)", highlight=False)
        for n in self.notes:
            console.print(f"note: {n}", highlight=False, markup=False)
        return buf.getvalue()


def _hf_name(name: str) -> str:
    return fold(name)


def _matches(key: str, name: str) -> bool:
    folded = _hf_name(name)
    return folded == key or folded.endswith("." + key)


def _our_modules(plan: ShardingPlan) -> dict[str, str]:
    """Folded module (or parameter, for weights that are module-less) -> our style of its weight."""
    out: dict[str, str] = {}
    for fqn, p in plan.placements.items():
        module, _, leaf = fqn.rpartition(".")
        if leaf == "weight" and len(p.shape) >= 2:
            out.setdefault(fold(module), p.style)
        elif leaf != "bias" and len(p.shape) >= 2:  # e.g. fused expert tensors: experts.gate_up_proj
            out.setdefault(fold(fqn), p.style)
    return out


def _status(ours: str, theirs: str) -> str:
    if theirs not in FAMILY:
        return "differ" if OURS.get(ours) == "replicate" else "agree"  # module-level style (experts, ...)
    return "agree" if OURS.get(ours, ours) == FAMILY[theirs] else "differ"


def _entries(plan: ShardingPlan, tp_plan: dict[str, str]) -> list[Entry]:
    ours = _our_modules(plan)
    entries: list[Entry] = []
    matched: set[str] = set()
    for module, style in ours.items():
        keys = [k for k in tp_plan if _matches(k, module)]
        if not keys:
            if style != "replicate":
                entries.append(Entry(module, style, None, "missing_theirs"))
            continue
        key = max(keys, key=len)  # the most specific key wins
        matched.update(keys)
        entries.append(Entry(module, style, tp_plan[key], _status(style, tp_plan[key]), key))
    for key, style in tp_plan.items():
        if key not in matched and not any(_matches(key, m) for m in _all_modules(plan)):
            entries.append(Entry(key, None, style, "missing_ours", key))
    return entries


def _all_modules(plan: ShardingPlan) -> set[str]:
    names: set[str] = set()
    for fqn in plan.placements:
        parts = fqn.split(".")
        names.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return names


def module_output_bytes(gm: fx.GraphModule) -> dict[str, list[int]]:
    """module name -> bytes of its output, once per call: the last value computed inside the module that a
    node outside it uses."""
    last: dict[str, fx.Node] = {}
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        module = module_of(node)
        while module:
            if any(not _inside(u, module) for u in node.users):
                last[module] = node
            module = module.rpartition(".")[0]
    out: dict[str, list[int]] = {}
    for module, node in last.items():
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor):
            out.setdefault(module, []).append(numel(val.shape) * val.element_size())
    return out


def _inside(node: fx.Node, module: str) -> bool:
    m = module_of(node)
    return m == module or m.startswith(module + ".")


def _theirs_bytes(plan: ShardingPlan, tp_plan: dict[str, str], notes: list[str]) -> int | None:
    if plan.derivation is None:
        notes.append("their collective bytes need the planned graph (plan loaded from JSON)")
        return None
    sizes = module_output_bytes(plan.derivation.gm)
    total = 0
    unknown = sorted({s for s in tp_plan.values() if s not in ALL_REDUCE | ALL_GATHER | FREE})
    if unknown:
        notes.append(f"no collective estimate for tp_plan styles {unknown}")
        return None
    for key, style in tp_plan.items():
        if style in FREE:
            continue
        hits = [b for module, bs in sizes.items() if _matches(key, module) for b in bs]
        total += sum(hits)
    return total


def compare(plan: ShardingPlan, tp_plan: dict[str, str]) -> Comparison:
    """Compare ``plan`` with an HF-style ``tp_plan`` (``{"model.layers.*.mlp.up_proj": "colwise", ...}``)."""
    notes: list[str] = []
    entries = _entries(plan, tp_plan)
    ours_bytes = sum(c.bytes for c in plan.forward_collectives())
    theirs = _theirs_bytes(plan, tp_plan, notes)
    return Comparison(entries, ours_bytes, theirs, notes)


__all__ = ["compare", "Comparison", "Entry", "module_output_bytes", "FAMILY"]
