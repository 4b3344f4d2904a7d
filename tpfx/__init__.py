"""tpfx: automatic tensor parallelism for any PyTorch model, as a compiler pass."""

import sys as _sys

from tpfx import passes as _passes  # type: ignore[attr-defined]  # noqa: F401  (tpfx.passes, from passes/)
from tpfx.api import CaptureError, ShardedModule, auto_shard, emit_rank, plan, shard_tensor
from tpfx.checkpoint import load, save
from tpfx.clip import clip_grad_norm_, grad_norm
from tpfx.compare import Comparison, compare
from tpfx.data_parallel import dp_sampler
from tpfx.dtensor_params import local
from tpfx.explain import Explanation
from tpfx.launch import launch
from tpfx.loading import from_pretrained
from tpfx.plan import Collective, ParamPlacement, ShardingPlan
from tpfx.pretrained import CheckpointError
from tpfx.verify import Verification, verify

__all__ = ["auto_shard", "plan", "launch", "shard_tensor", "ShardingPlan", "ParamPlacement", "Collective",
           "ShardedModule", "emit_rank", "compare", "Comparison", "Explanation",
           "from_pretrained", "CheckpointError", "save", "load", "clip_grad_norm_", "grad_norm",
           "dp_sampler", "local", "CaptureError", "TrainerCheckpoints", "verify", "Verification"]
__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    """``tpfx.TrainerCheckpoints`` is imported on first use: it imports transformers' Trainer (0.7 s)."""
    if name == "TrainerCheckpoints":
        from tpfx.trainer import TrainerCheckpoints

        return TrainerCheckpoints
    raise AttributeError(f"module 'tpfx' has no attribute {name!r}")
del _sys
