"""What features may use of a sharded module: the ``Sharded`` protocol ``ShardedModule`` implements.

Features (saving and loading, checkpoints, clipping, generation, adapters) are written against this interface
and never read a sharded module's private fields; this module imports no feature, so the features' type
annotations create no import cycle.

    the plan         plan, placement(fqn), holds(fqn), pins(), plain_params()
    the group        rank, world_size, group
    the tensors      tree, named_parameters(), parameters(), local_params(), persistent_buffers(), sync(),
                     check_own_params(what), check_params(), wrapped()
    the graphs       state_key(), capturing(), add_graph(plan, key), graph(key), call(entry, args, kwargs)
    feature state    attachment(name, make)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import torch
import torch.distributed as dist
import torch.fx as fx

from tpfx.passes import Placement
from tpfx.plan import ShardingPlan


class Sharded(Protocol):
    rank: int
    world_size: int
    training: bool

    @property
    def plan(self) -> ShardingPlan: ...

    @property
    def group(self) -> dist.ProcessGroup | None: ...

    @property
    def tree(self) -> torch.nn.Module: ...

    @property
    def config(self) -> Any: ...

    def placement(self, fqn: str) -> Placement: ...

    def holds(self, fqn: str) -> bool: ...

    def pins(self) -> dict[str, tuple[str, Placement | None]]: ...

    def plain_params(self) -> list[str]: ...

    def named_parameters(self, prefix: str = "", recurse: bool = True,
                         remove_duplicate: bool = True) -> Iterator[tuple[str, torch.nn.Parameter]]: ...

    def parameters(self, recurse: bool = True) -> Iterator[torch.nn.Parameter]: ...

    def local_params(self) -> dict[str, torch.Tensor]: ...

    def persistent_buffers(self) -> dict[str, torch.Tensor]: ...

    def sync(self) -> None: ...

    def check_own_params(self, what: str) -> None: ...

    def check_params(self) -> None: ...

    def wrapped(self) -> bool: ...

    def state_key(self) -> int: ...

    def capturing(self) -> contextlib.AbstractContextManager[torch.nn.Module]: ...

    def add_graph(self, plan: ShardingPlan, key: Any, local_outputs: frozenset[int] = frozenset()
                  ) -> fx.GraphModule: ...

    def graph(self, key: Any) -> tuple[fx.GraphModule, Any] | None: ...

    def call(self, entry: tuple[fx.GraphModule, Any], args: tuple, kwargs: dict[str, Any],
             check: Callable[[], None] | None = None) -> Any: ...

    def attachment(self, name: str, make: Callable[[], Any]) -> Any: ...

    def save_pretrained(self, save_directory: str, *, max_shard_size: int | str = "5GB",
                        timeout_s: float = 300.0) -> None: ...

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any: ...
