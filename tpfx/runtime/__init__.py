"""The runtime: the sharded module (``module``), its interface for features (``interface``), process groups
and meshes (``groups``)."""

from tpfx.runtime.groups import LAUNCH_HINT, tp_group
from tpfx.runtime.module import ShardedModule, sharded_class

__all__ = ["LAUNCH_HINT", "ShardedModule", "sharded_class", "tp_group"]
