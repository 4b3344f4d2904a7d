"""What tensor-parallel decode costs on this machine: the two figures of RESULTS.md's "What decode costs here".

* **Collective latency**: on 2 gloo ranks (1 thread each), the median wall time of one ``all_reduce`` of a
  decode step's activation (the largest batch and model of benchmarks/generate.py: batch 8, one position, hidden
  1024, fp32) and of one ``all_gather`` of its logits slice (vocab 32000 / 2), each over ``--iters`` calls after a
  warm-up, a barrier before each.
* **Shared memory bandwidth**: a matrix-vector product over a 168 MB fp32 matrix (what a decode step does with
  each weight), GB/s of matrix read per second, on one rank while the other waits at a barrier ("alone") and on
  both at once ("both").

The report combines them with benchmarks/results/generate.json (collectives per decode step: 2 per layer, the
vocab-parallel embedding's all-reduce and the logits' all-gather).

    python benchmarks/decode_limits.py [--quick] [--iters N]
"""

from __future__ import annotations

import argparse
from typing import Any

import _common as C
import torch
import torch.distributed as dist

MATRIX = (6400, 6560)  # 168 MB of fp32


def _timed_calls(fn: Any, iters: int) -> float:
    for _ in range(5):
        fn()
    times = []
    for _ in range(iters):
        dist.barrier()
        with C.Timer() as t:
            fn()
        times.append(t.s)
    return C.median(times)


def _bandwidth(w: torch.Tensor, x: torch.Tensor, iters: int) -> float:
    with C.Timer() as t:
        for _ in range(iters):
            torch.mv(w, x)
    return w.numel() * w.element_size() * iters / t.s / 1e9


def run_rank(rank: int, world: int, iters: int) -> dict[str, Any]:
    act, logits = torch.randn(8, 1, 1024), torch.randn(8, 1, 32000 // world)
    out = [torch.empty_like(logits) for _ in range(world)]
    res = {"all_reduce_s": _timed_calls(lambda: dist.all_reduce(act), iters),
           "all_gather_s": _timed_calls(lambda: dist.all_gather(out, logits), iters)}
    w, x = torch.randn(*MATRIX), torch.randn(MATRIX[1])
    _bandwidth(w, x, 2)
    reps = max(3, iters // 20)
    for turn in range(world):  # one rank at a time; the others wait at the barrier
        dist.barrier()
        if turn == rank:
            res["alone_gbs"] = _bandwidth(w, x, reps)
        dist.barrier()
    dist.barrier()
    res["both_gbs"] = _bandwidth(w, x, reps)
    res["matrix_bytes"] = w.numel() * w.element_size()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer calls")
    ap.add_argument("--iters", type=int, default=None)
    args = ap.parse_args()
    iters = args.iters or (40 if args.quick else 200)
    per_rank = C.launch(run_rank, 2, iters)
    res = {"iters": iters, "world": 2,
           "all_reduce_ms": 1e3 * max(r["all_reduce_s"] for r in per_rank),
           "all_gather_ms": 1e3 * max(r["all_gather_s"] for r in per_rank),
           "alone_gbs": min(r["alone_gbs"] for r in per_rank), "both_gbs": min(r["both_gbs"] for r in per_rank),
           "matrix_mb": per_rank[0]["matrix_bytes"] / 1e6}
    C.console().print(res)
    path = C.write_json("decode_limits", res, args.quick)
    print(f"wrote {path.relative_to(C.ROOT)}")


if __name__ == "__main__":
    main()
