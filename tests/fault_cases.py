"""Rank-side bodies of the fault tests (tests/test_faults.py): ranks that disagree on a call, a peer that
stalls past the group's timeout, a rank that raises mid-backward or is killed mid-forward."""

from __future__ import annotations

import datetime
import os
import signal
import time
from typing import Any

import models
import torch
import torch.distributed as dist

import tpfx


def _mlp(**kwargs: Any) -> Any:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 16))
    return tpfx.auto_shard(model, example_inputs=(torch.randn(4, 16),), **kwargs)


def _error_of(fn: Any) -> tuple[str, float]:
    t0 = time.perf_counter()
    try:
        fn()
    except RuntimeError as e:
        return str(e), time.perf_counter() - t0
    return "", time.perf_counter() - t0


def differing_calls(rank: int, world: int) -> dict[str, Any]:
    """Same first call; then another sequence length on rank 1; then labels on rank 0 only; then the cost
    of the check on steady-state calls."""
    sharded = tpfx.auto_shard(models.llama(layers=2))
    ids = models.token_inputs(models.TINY_VOCAB, 2, 8, seed=1)
    sharded(input_ids=ids)
    longer = models.token_inputs(models.TINY_VOCAB, 2, 8 + rank, seed=2)
    seq_err, seq_s = _error_of(lambda: sharded(input_ids=longer))
    labels = {"labels": ids} if rank == 0 else {}
    labels_err, labels_s = _error_of(lambda: sharded(input_ids=ids, **labels))
    after = sharded(input_ids=ids).logits  # the group is still usable after the refused calls
    times = {}
    for check in (True, False) * 4:  # interleaved: the box is noisy
        sharded.check_calls = check
        t0 = time.perf_counter()
        for _ in range(20):
            sharded(input_ids=ids)
        times[check] = min(times.get(check, 1e9), (time.perf_counter() - t0) / 20)
    return {"seq": seq_err, "seq_s": seq_s, "labels": labels_err, "labels_s": labels_s,
            "after": tuple(after.shape), "with_check_us": 1e6 * times[True], "without_us": 1e6 * times[False],
            **_twin_checks(sharded._group or dist.group.WORLD, rank)}


def _twin_checks(group: Any, rank: int) -> dict[str, Any]:
    """The check's host group: a gloo group is its own; a gloo twin (what a plain NCCL group gets) agrees and
    disagrees like the group it twins."""
    from tpfx.agreement import agree_later, gloo_twin, host_group

    twin = gloo_twin(group)
    agree_later(twin, ("same", 1), "a test value")()
    twin_err, _ = _error_of(lambda: agree_later(twin, ("rank", rank), "a test value")())
    return {"host_is_group": host_group(group, "cpu") == (group, "cpu"), "twin_err": twin_err,
            "twin_ranks": dist.get_process_group_ranks(twin)}


def stalled_peer(rank: int, world: int, via_group: bool) -> dict[str, Any]:
    """Rank 1 stalls past the tp group's 3 s timeout (``auto_shard(timeout=3)``, or a group created with one):
    rank 0's first collective times out, named."""
    if via_group:
        sharded = _mlp(group=dist.new_group(list(range(world)), timeout=datetime.timedelta(seconds=3)))
    else:
        sharded = _mlp(timeout=3)
    sharded.check_first_call = sharded.check_calls = False  # the forward's own first collective times out
    if rank != 0:
        time.sleep(8)
        return {}
    err, s = _error_of(lambda: sharded(torch.randn(4, 16)))
    return {"error": err, "seconds": s}


def stalled_in_backward(rank: int, world: int) -> dict[str, Any]:
    """Rank 1 stalls in its backward past the 3 s timeout: rank 0's backward collective times out, named."""
    sharded = _mlp(timeout=3)
    out = sharded(torch.randn(4, 16, requires_grad=True))  # its gradient is Megatron's f: an all-reduce
    if rank == 1:
        out.register_hook(lambda g: time.sleep(8))
    err, s = _error_of(lambda: out.square().sum().backward())
    return {"error": err, "seconds": s}


def dies_mid_backward(rank: int, world: int) -> None:
    sharded = _mlp()
    out = sharded(torch.randn(4, 16))
    if rank == 1:
        out.register_hook(lambda g: (_ for _ in ()).throw(ValueError("rank 1 dies in backward")))
    out.square().sum().backward()


def killed_mid_forward(rank: int, world: int) -> None:
    sharded = _mlp()
    sharded(torch.randn(4, 16))
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    sharded(torch.randn(4, 16))


def peer_killed_mid_forward(rank: int, world: int) -> None:
    """The last rank is killed mid-forward; each survivor prints the error its next forward raises (run with
    plain processes: a launcher would stop the survivors first, as a second node's launcher would not)."""
    import json

    sharded = _mlp()
    sharded.check_first_call = sharded.check_calls = False  # the forward's own collectives fail
    sharded(torch.randn(4, 16))
    if rank == world - 1:
        os.kill(os.getpid(), signal.SIGKILL)
    err, s = _error_of(lambda: sharded(torch.randn(4, 16)))
    print(json.dumps({"rank": rank, "error": err, "seconds": s}), flush=True)


def run_plain(body: str, world: int, timeout: float = 120) -> list[tuple[int, str]]:
    """``fault_cases.<body>(rank, world)`` on ``world`` plain gloo processes (env:// rendezvous, no launcher
    watching them): each one's exit code and stdout."""
    import subprocess
    import sys

    from tpfx.launch import _free_port

    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": str(world)}
    code = ("import torch.distributed as dist, fault_cases, os; dist.init_process_group('gloo'); "
            f"fault_cases.{body}(int(os.environ['RANK']), {world})")
    procs = [subprocess.Popen([sys.executable, "-c", code], env={**env, "RANK": str(r)}, text=True,
                              cwd=os.path.dirname(__file__), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
             for r in range(world)]
    out = []
    for p in procs:
        try:
            stdout, _ = p.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            stdout, _ = p.communicate()
        out.append((p.returncode, stdout))
    return out
