"""Plan rendering: a rich table grouped by repeated layer, then collectives and totals."""

from __future__ import annotations

import io
import re
from collections import defaultdict
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from tpfx.plan import ShardingPlan

_LAYER = re.compile(r"\.(\d+)\.")


def _fold(name: str) -> str:
    return _LAYER.sub(".*.", name, count=1)


def render_text(plan: ShardingPlan, width: int = 140) -> str:
    buf = io.StringIO()
    console = Console(file=buf, width=width, force_terminal=False, color_system=None)
    groups: dict[str, list[str]] = defaultdict(list)
    for fqn in plan.placements:
        groups[_fold(fqn)].append(fqn)
    t = Table(title=f"tpfx sharding plan, world size {plan.world_size}")
    for col in ("parameter", "×", "shape", "style", "placement", "local shape", "bytes/rank"):
        t.add_column(col)
    total = local = 0
    for name, members in groups.items():
        p = plan.placements[members[0]]
        n = 1
        for s in p.shape:
            n *= s
        ln = 1
        for s in p.local_shape():
            ln *= s
        total += 4 * n * len(members)
        local += 4 * ln * len(members)
        t.add_row(name, str(len(members)), str(list(p.shape)), p.style, p.placement, str(list(p.local_shape())),
                  f"{4 * ln:,}")
    console.print(t)
    c = Table(title="collectives (forward)")
    for col in ("kind", "after", "before", "bytes"):
        c.add_column(col)
    seen: dict[tuple[str, str, str], int] = defaultdict(int)
    for col in plan.forward_collectives():
        seen[(col.kind, re.sub(r"_\d+$", "", col.after), str(col.bytes))] += 1
    for (kind, after, nb), k in seen.items():
        c.add_row(kind, f"{after} ×{k}" if k > 1 else after, "", nb)
    console.print(c)
    console.print(f"parameter bytes per rank (fp32): {local:,} of {total:,} ({local / max(total, 1):.3f})")
    console.print(f"forward collectives: {plan.count('all_reduce')} all_reduce, {plan.count('all_gather')} all_gather")
    for fb in plan.fallbacks:
        console.print(f"fallback: {fb.get('param') or fb.get('node')}: {fb['reason']}")
    if plan.unknown_ops:
        console.print(f"ops with no sharding rule (replicated region): {', '.join(plan.unknown_ops)}")
    return buf.getvalue()
