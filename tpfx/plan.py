"""The sharding plan: plain data keyed by parameter FQNs and graph node names."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any

from tpfx.passes import Collective, Derivation, ParamPlacement, PlanData

__all__ = ["Collective", "ParamPlacement", "PlanData", "ShardingPlan"]


@dataclass
class ShardingPlan(PlanData):
    """The compiler's plan (``PlanData``: placements, collectives, fallbacks) and its views: the summary
    table, explanations, drawings. ``derivation``: the graph state it was derived from (None when loaded from
    JSON); ``context``: what the report needs from that graph, computed once (stored by ``to_json``)."""

    derivation: Derivation | None = field(default=None, repr=False, compare=False)
    context: dict[str, Any] | None = field(default=None, repr=False, compare=False)

    @classmethod
    def derived(cls, data: PlanData, derivation: Derivation) -> ShardingPlan:
        return cls(**{f.name: getattr(data, f.name) for f in fields(PlanData)}, derivation=derivation)

    def report_context(self) -> dict[str, Any] | None:
        """The report's facts (layers, attribution, b·s, h): from the derivation once, or as loaded."""
        if self.context is None and self.derivation is not None:
            from tpfx.report import analyze

            self.context = analyze(self)
        return self.context

    def to_dict(self) -> dict[str, Any]:
        d = self.data_dict()
        context = self.report_context()
        if context is not None:
            d["context"] = context
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ShardingPlan:
        d = json.loads(text)
        return cls(**PlanData.fields_of(d), context=d.get("context"))

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
