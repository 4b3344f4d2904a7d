"""Run a function on ``world_size`` local CPU processes joined by a gloo process group.

``launch(fn, world_size, *args)`` is the small harness used by the tests and examples: it starts one process
per rank, initialises ``torch.distributed`` with the gloo backend on 127.0.0.1, calls
``fn(rank, world_size, *args)`` and returns the per-rank results to the caller. Under ``torchrun`` (a process
group already exists) it simply calls ``fn`` in the current process.

Ranks are started with Python's ``forkserver`` method: one clean server process is started on the first
launch, imports torch, transformers and tpfx once (``_PRELOAD``), and every rank of every later launch is
forked from it, so a rank starts in a fraction of a second instead of re-importing them (about 6 s of CPU
per rank). Each rank gets the caller's environment as it is at ``launch`` time, not the server's.
"""

from __future__ import annotations

import datetime
import os
import pickle
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessContext, ProcessException

__all__ = ["launch"]

# imported once by the forkserver; every rank forks from it with these already loaded. "__main__" re-imports a
# script's main module there (as "__mp_main__", like spawn), so rank functions defined in scripts unpickle.
_PRELOAD = ["__main__", "tpfx", "transformers.modeling_utils", "transformers.generation",
            "torch.distributed.tensor", "torch.distributed.checkpoint", "torch._dynamo"]

R = TypeVar("R")


def _free_port() -> int:
    """Ask the OS for a TCP port on 127.0.0.1 that is free right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _result_path(tmpdir: str, rank: int) -> str:
    return os.path.join(tmpdir, f"rank{rank}.pt")


def _worker(
    rank: int,
    fn: Callable[..., Any],
    world_size: int,
    port: int,
    tmpdir: str,
    args: tuple[Any, ...],
    pg_timeout_s: float | None,
    env: dict[str, str],
) -> None:
    """Body of one rank: take the caller's environment, set up gloo, run ``fn``, save its result."""
    os.environ.clear()
    os.environ.update(env)
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    kwargs: dict[str, Any] = {}
    if pg_timeout_s is not None:
        kwargs["timeout"] = datetime.timedelta(seconds=pg_timeout_s)
    dist.init_process_group("gloo", rank=rank, world_size=world_size, **kwargs)
    # An exception propagates to torch.multiprocessing's wrapper, which records the traceback for the parent.
    result = fn(rank, world_size, *args)
    torch.save(result, _result_path(tmpdir, rank))
    dist.destroy_process_group()


_PEER_ERROR = ("remote worker", "Connection closed by peer", "Connection reset by peer")


def _failure_report(ctx: ProcessContext, first: ProcessException, grace_s: float = 10.0) -> str:
    """Every failed rank's traceback, the root cause first.

    When one rank raises, a peer blocked in a collective may fail too (gloo: "remote worker crashing"), and
    either can be seen first. The others get ``grace_s`` to exit; ranks whose error is only a peer's crash are
    listed after the rest."""
    end = time.monotonic() + grace_s
    for p in ctx.processes:
        p.join(max(0.0, end - time.monotonic()))
    failures: list[tuple[int, str]] = []
    for rank, p in enumerate(ctx.processes):
        text = first.msg.strip() if rank == first.error_index else ""
        path = ctx.error_files[rank]
        if not text and p.exitcode not in (None, 0) and os.path.exists(path) and os.path.getsize(path):
            with open(path, "rb") as f:
                text = str(pickle.load(f)).strip()
        if not text and rank == first.error_index:
            text = (f"{first.msg.strip()} before reporting an error (it failed while starting, before calling "
                    "the rank function: its stderr above says why)")
        if text or rank == first.error_index:
            failures.append((rank, text))
    failures.sort(key=lambda f: any(m in f[1] for m in _PEER_ERROR))
    return "\n".join(f"tpfx.launch: rank {r} failed (pid {ctx.processes[r].pid}):\n{t}" for r, t in failures)


def _kill_all(ctx: ProcessContext) -> None:
    for p in ctx.processes:
        if p.is_alive():
            p.terminate()
    for p in ctx.processes:
        p.join(5)
        if p.is_alive():
            p.kill()
            p.join()


def _start_method() -> str:
    """``forkserver`` when the main module is a file the server can import; otherwise (a notebook, ``python -c``,
    code on stdin) the ranks are forked from this process, so functions defined here reach them, unless CUDA is
    initialised here (a forked child cannot use it): then raise with what to do."""
    path = getattr(sys.modules.get("__main__"), "__file__", None)
    if path and os.path.isfile(path):
        return "forkserver"
    if torch.cuda.is_initialized() or "fork" not in mp.get_all_start_methods():
        raise RuntimeError("tpfx.launch: this code has no main file (a notebook, `python -c` or code on stdin), so "
                           "the ranks would have to be forked from this process, which "
                           + ("has initialised CUDA (a forked child cannot use it)" if torch.cuda.is_initialized()
                              else "this platform cannot do") + "; put the rank function in a .py file and run "
                           "that file, or shard in this process with tpfx.auto_shard(model, devices=[...])")
    return "fork"


def launch(fn: Callable[..., R], world_size: int, *args: Any, timeout_s: float | None = None) -> list[R]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks and return the results by rank.

    ``fn`` (and ``args``) must be picklable, i.e. ``fn`` is defined at module level: ranks are forked from a
    ``forkserver`` that imports the main module (as spawn does), so scripts must call ``launch`` under
    ``if __name__ == "__main__":``. Code with no main file (a notebook, ``python -c``, stdin) forks its ranks from
    this process instead (CPU only: refused once CUDA is initialised). Each rank uses one intra-op thread. Return values travel back through
    ``torch.save``/``torch.load`` and may be tensors, dicts of tensors or any picklable object.

    If a process group is already initialised (e.g. under ``torchrun``) with the same world size, ``fn`` is
    called in-process as ``fn(dist.get_rank(), world_size, *args)`` and ``[result]`` is returned.

    Raises ``RuntimeError`` naming the failing rank and carrying its traceback text if any rank raises or
    dies; the other ranks are terminated. With ``timeout_s``, all ranks are killed and ``RuntimeError`` is
    raised once that many seconds have passed (it also bounds each collective of the process group).
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    if dist.is_available() and dist.is_initialized():
        current = dist.get_world_size()
        if current != world_size:
            raise RuntimeError(
                f"tpfx.launch: a process group of world size {current} is already initialised, "
                f"but world_size={world_size} was requested"
            )
        return [fn(dist.get_rank(), world_size, *args)]

    port = _free_port()
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    method = _start_method()
    with tempfile.TemporaryDirectory(prefix="tpfx_launch_") as tmpdir:
        if method == "forkserver":
            mp.set_forkserver_preload(_PRELOAD)  # read when the server starts (the first launch)
        ctx = mp.start_processes(
            _worker,
            args=(fn, world_size, port, tmpdir, args, timeout_s, dict(os.environ)),
            nprocs=world_size,
            join=False,
            start_method=method,
        )
        assert ctx is not None
        try:
            while True:
                remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
                if ctx.join(timeout=remaining):
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    raise RuntimeError(f"tpfx.launch: ranks did not finish within {timeout_s} s")
        except ProcessException as e:
            raise RuntimeError(_failure_report(ctx, e)) from None
        finally:
            _kill_all(ctx)  # no-op when every rank has exited
        return [torch.load(_result_path(tmpdir, r), weights_only=False) for r in range(world_size)]
