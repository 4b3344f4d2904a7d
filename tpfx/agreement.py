"""Ranks that must agree: a digest of a call's inputs compared across the tensor-parallel group.

Every rank of a group runs the same graph on the same inputs; a rank that was given something else (another
batch, other options) would compute a different result or deadlock in a later collective. One small
all-gather of a digest (tensors by shape, dtype and content) turns that into an error on every rank.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.distributed as dist

from tpfx.passes import FUNCTION_OP, HOOK_OP, set_pending, settle_pending

__all__ = ["Disagreement", "agree", "agree_later", "checked_before_collectives", "describe", "draws_random",
           "gloo_twin", "host_group", "rng_digest", "signature"]


class Disagreement(RuntimeError):
    """The ranks of a group were called with different inputs (raised on every rank of the group)."""


def _walk(value: Any, tensor: Callable[[torch.Tensor], Any]) -> Any:
    """A rank-independent description of a call argument, tensors described by ``tensor``."""
    if isinstance(value, torch.Tensor):
        return tensor(value)
    if isinstance(value, (int, float, str, bool, type(None))):
        return value
    if isinstance(value, (list, tuple)):
        return [_walk(v, tensor) for v in value]
    if isinstance(value, dict):
        return {str(k): _walk(v, tensor) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    if hasattr(value, "to_diff_dict"):  # GenerationConfig
        return _walk(value.to_diff_dict(), tensor)
    return type(value).__name__  # streamers, logits processors: objects with per-process identity


def _content(value: torch.Tensor) -> Any:
    data = value.detach().cpu().contiguous().reshape(-1)
    raw = data.view(torch.uint8).numpy().tobytes() if data.numel() else b""
    return ("tensor", tuple(value.shape), str(value.dtype), hashlib.sha256(raw).hexdigest())


def describe(value: Any) -> Any:
    """A rank-independent description of a call argument (tensors by shape, dtype and content)."""
    return _walk(value, _content)


def signature(value: Any) -> Any:
    """What selects a graph and sizes its collectives: the call's structure, tensor shapes and dtypes, and
    plain values (no tensor content; cheap enough to compute on every call)."""
    return _walk(value, lambda t: (tuple(t.shape), t.dtype))


def _draws_nothing(n: Any) -> bool:
    """A dropout that returns its input (aten's at p = 0 or out of training; emission's ``dropout_chunk`` calls
    it then): it draws no random numbers (``native_dropout`` at p = 0 does draw)."""
    name = getattr(n.target, "__name__", "")
    if n.target is not torch.ops.aten.dropout.default and name != "dropout_chunk":
        return False
    p, train = n.args[1], n.args[2] if len(n.args) > 2 else True
    native = name == "dropout_chunk" and n.kwargs.get("native", n.args[10] if len(n.args) > 10 else False)
    return train is False or (p == 0.0 and not native)


def draws_random(gm: Any, user_code: bool = True) -> bool:
    """Whether a graph (or a region it calls) draws random numbers: an ATen op tagged
    ``nondeterministic_seeded`` (dropout, bernoulli, rand, ...; attention only with ``dropout_p > 0``), a
    dropout kernel of emission's, or user code run eagerly (a hook, a custom autograd Function)."""
    for m in gm.modules():
        for n in getattr(getattr(m, "graph", None), "nodes", ()):
            t = n.target
            if n.op != "call_function":
                continue
            if t is torch.ops.aten.scaled_dot_product_attention.default:
                p = n.kwargs.get("dropout_p", n.args[4] if len(n.args) > 4 else 0.0)
                if p != 0.0:
                    return True
            elif _draws_nothing(n):
                continue
            elif torch.Tag.nondeterministic_seeded in getattr(t, "tags", ()) or "dropout" in getattr(t, "__name__", ""):
                return True
            elif user_code and t in (HOOK_OP, FUNCTION_OP):  # user code run eagerly may draw from the generator
                return True
    return False


def refuse_random(sharded: Any, gm: Any) -> None:
    """Generation in training mode whose emitted graph ``gm`` draws random numbers (dropout) is refused: the
    sharded steps would not draw the unsharded model's masks. Checked before every run (memoized per graph)."""
    if "tpfx_draws" not in gm.meta:
        gm.meta["tpfx_draws"] = draws_random(gm, user_code=False)  # the model's dropout, not a user's hook
    if sharded.training and gm.meta["tpfx_draws"]:
        raise NotImplementedError("tpfx.generate: generate in training mode with dropout would not draw the "
                                  "unsharded model's masks; call .eval() before generate")


def rng_digest(device: Any) -> str:
    """A digest of the random state a graph on ``device`` draws from (the CPU generator, and the device's)."""
    state = torch.get_rng_state()
    if torch.device(device).type == "cuda":
        state = torch.cat([state, torch.cuda.get_rng_state(device)])
    return hashlib.sha256(state.numpy().tobytes()).hexdigest()[:16]


def host_group(group: Any, device: Any) -> tuple[Any, Any]:
    """Where a check's few integers travel: (group, "cpu") where ``group`` has a CPU backend (gloo, or
    ``"cpu:gloo,cuda:nccl"``), else a gloo twin of it made once by its own ranks (``gloo_twin``), so that reading
    the answer waits on no device stream; (group, device) if no twin can be made."""
    try:
        group._get_backend(torch.device("cpu"))
        return group, "cpu"
    except Exception:  # noqa: BLE001 - no CPU backend on this group (plain NCCL)
        pass
    try:
        return gloo_twin(group), "cpu"
    except Exception:  # noqa: BLE001 - no gloo in this build or network: the device it is
        return group, device


def gloo_twin(group: Any) -> Any:
    """A gloo group over ``group``'s ranks, created by those ranks alone (other groups of the mesh need not
    call it at the same time)."""
    return dist.new_group(dist.get_process_group_ranks(group), backend="gloo", use_local_synchronization=True)


def agree_later(group: Any, what: Any, name: str, device: Any = "cpu") -> Callable[[], None]:
    """``agree`` in one all-reduce of two integers (max of the digest and of its negation: equal only if
    every rank sent the same), issued now without waiting; the returned call waits for it and raises on every
    rank if they differ (then ``agree``'s all-gather names the ranks)."""
    digest = int.from_bytes(hashlib.sha256(repr(what).encode()).digest()[:7], "big")
    both = torch.tensor([digest, -digest], dtype=torch.int64, device=device)
    work = dist.all_reduce(both, op=dist.ReduceOp.MAX, group=group, async_op=True)

    def settle() -> None:
        work.wait()
        if int(both[0]) != -int(both[1]):
            agree(group, what, name)

    return settle


def agree(group: Any, what: Any, name: str, share_rng: bool = False) -> None:
    """Raise on every rank if the ranks of ``group`` disagree on ``what`` (one small all-gather). With
    ``share_rng``, the same all-gather gives every rank the random state of the group's first rank, so that
    sampling draws the same tokens everywhere."""
    digest = hashlib.sha256(repr(what).encode()).hexdigest()[:16]
    mine = (digest, torch.get_rng_state() if share_rng and dist.get_rank(group) == 0 else None)
    got: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(got, mine, group=group)
    digests = [d for d, _ in got]
    if len(set(digests)) != 1:
        odd = [r for r, d in enumerate(digests) if d != digests[0]]
        raise Disagreement(f"tpfx: ranks disagree on {name} (ranks {odd} differ from rank 0; digests by rank: "
                           f"{digests}); every rank of a tensor-parallel group must make the same call with the "
                           "same inputs and options")
    if share_rng:
        torch.set_rng_state(got[0][1])


@contextlib.contextmanager
def checked_before_collectives(check: Callable[[], None] | None) -> Iterator[None]:
    """Within the block, ``check`` runs right before the first collective of this thread, or at the block's
    end if none came (every rank runs it: the ranks of a group issue the same collectives). A check still
    pending when the block raises is dropped: the error is already on its way."""
    set_pending(check)
    try:
        yield
    except BaseException:
        set_pending(None)
        raise
    settle_pending()
