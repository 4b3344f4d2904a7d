"""tpfx compiler passes: placements, op rules, propagation, per-rank emission."""

from .placements import Partial, Placement, Replicate, Shard, shard_tensor
from .propagate import Propagation, propagate
from .rules import REGISTRY

__all__ = ["Partial", "Placement", "Replicate", "Shard", "shard_tensor", "Propagation", "propagate", "REGISTRY"]
from . import rules_nn  # noqa: E402,F401  (registers the nn-module rules)
