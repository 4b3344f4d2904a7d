"""tpfx's compiler: capture, normalize, propagate placements, build the plan, emit one graph per rank.

``stages.py`` reads top to bottom. This package's names are the surface ``tpfx`` uses; the modules' other
names are the compiler's own."""

from . import eager_functions as _eager_functions  # noqa: F401  (registers tpfx::function and its rule)
from . import eager_hooks as _eager_hooks  # noqa: F401  (registers tpfx::hook and its rule)
from .backward import GradCollective, backward_collectives, sharded_compute
from .capture import Captured, CaptureError, check_model, dynamic_spec
from .checkpoint import region, stack_layers
from .collectives import module_of, regathered_in_backward, set_failure_message, set_pending, settle_pending
from .eager_functions import FUNCTION_OP
from .eager_hooks import HOOK_OP, VOLATILE
from .eager_hooks import rebind as rebind_hooks
from .emit import GroupNamer, collective_nodes, emit, local_param
from .placements import Partial, Placement, Replicate, Shard, is_seq_split, shard_tensor
from .plan_data import INDEX, Collective, ParamPlacement, PlanData, build_plan, fold
from .propagate import Propagation, Seed, is_guards, nbytes, propagate, tensor_inputs, trained
from .redistribute import forward_collective
from .rules import REGISTRY
from .shapes import hint
from .stages import TRACE_LOCK, Derivation, Stages

__all__ = ["INDEX", "fold", "hint", "FUNCTION_OP", "HOOK_OP", "VOLATILE", "rebind_hooks", "GradCollective", "backward_collectives", "sharded_compute", "trained", "CaptureError", "Captured", "Collective", "Derivation", "GroupNamer", "ParamPlacement", "Partial",
           "Placement", "PlanData", "Propagation", "REGISTRY", "Replicate", "Seed", "Shard", "Stages",
           "build_plan", "check_model", "collective_nodes", "dynamic_spec", "emit", "local_param", "set_failure_message",
           "set_pending", "settle_pending",
           "forward_collective", "is_guards", "module_of", "is_seq_split", "nbytes", "propagate", "regathered_in_backward", "shard_tensor",
           "tensor_inputs", "region", "stack_layers", "TRACE_LOCK"]
