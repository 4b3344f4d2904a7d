"""Op sharding rules: one small pure function per op family, in one registry.

A rule sees the op's operands (shape, current placement, and for an undecided parameter the
styles it may take) and returns a ``Strategy``: the placement it wants for each operand, the
placement of its output(s), placements it decides for free parameters, and how to rewrite the
op's constant arguments for one rank (view sizes become local head counts). A rule that cannot
carry the sharding returns ``Fallback(reason)``: the planner then replicates the region (it
reverts the weights the shard came from) or, where weights are pinned, gathers the inputs.
Rules need no process group; they are unit-tested on shapes alone.

Matmuls are einsum specs (as in PyTorch's ``_ops/_matrix_ops.py``): a letter sharded in every
operand that has it and kept in the output stays sharded; a sharded contracted letter makes the
output ``Partial``; with no sharded input, a free weight is split on its first free output letter
(``colwise``); with the contracted letter sharded it is split on that letter (``rowwise``).

The rules, one module per op family: ``core`` (the registry, operands, strategies, fallbacks, shared helpers),
``elementwise``, ``views``, ``reductions``, ``matmuls``, ``values`` (shapes and metadata) and ``nn``
(convolutions, pooling, batch/group norm). Importing the package registers every rule once.
"""

from . import elementwise, matmuls, nn, reductions, values, views  # noqa: F401  (each registers its rules)
from .core import (
    NAMED,
    REGISTRY,
    SEQ_LOCAL,
    WORLD,
    Fallback,
    FreeParam,
    OpCtx,
    Operand,
    Result,
    Rewrite,
    Rule,
    Strategy,
    late_of,
    lookup,
    register,
    register_name,
)
from .elementwise import pointwise
from .matmuls import grouped_mm
from .values import metadata_only

__all__ = ["NAMED", "REGISTRY", "SEQ_LOCAL", "WORLD", "Fallback", "FreeParam", "OpCtx", "Operand", "Result",
           "Rewrite", "Rule", "Strategy", "grouped_mm", "late_of", "lookup", "metadata_only", "pointwise", "register",
           "register_name"]
