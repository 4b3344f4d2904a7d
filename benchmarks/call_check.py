"""What the per-call agreement check costs (issue 14): the same sharded model with and without it, in one run.

Every call of a ``ShardedModule`` after the first digests its inputs' shapes and structure and all-reduces two
integers across the tensor-parallel group, so that ranks called differently raise instead of hanging or mixing
sizes in the next collective (``tpfx/agreement.py``). The all-reduce is issued without waiting when the call
starts and settled right before the forward's first collective, so its round trip overlaps the compute before
it. Here ``sharded.check_calls`` is switched on and off between iterations of one 2-rank launch (NCCL with a
GPU per rank, else gloo with 1 thread per rank), the two settings interleaved so that load noise hits both;
a barrier precedes every call. A call's time is its slowest rank's; the cost is the median over iterations of
the difference between the checked and the unchecked call of one iteration (they run back to back, so drift
between iterations cancels), and the noise the same median between two checked calls.

Models (Llama): ``tiny`` (hidden 256, 4 layers, batch 2x32: overhead dominates) and ``h1024`` (hidden 1024,
4 layers, batch 4x128: compute dominates). Measured: forward (no_grad) and a training step (forward with
labels + backward). Target (issue 14): the check costs nothing on steady-state calls (<= 1.02x); reported as the
difference and ratio with the 95% bootstrap interval of the median paired difference: PASS when the whole
interval is under the bar, FAIL when over it, "not resolved" when the bar lies inside it.

    python benchmarks/call_check.py [--quick] [--iters N]
"""

from __future__ import annotations

import argparse
from typing import Any

import _common as C
import torch
import torch.distributed as dist

import tpfx

MODELS: dict[str, dict[str, Any]] = {
    "tiny": {"config": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=8,
                            num_key_value_heads=8, vocab_size=1024), "batch": (2, 32)},
    "h1024": {"config": dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
                             num_key_value_heads=16, vocab_size=32000), "batch": (4, 128)},
}
TARGET = 1.02  # "costs nothing": within 2% of the unchecked call


def _timed(fn: Any, dev: torch.device) -> float:
    dist.barrier()
    C.sync(dev)
    with C.Timer() as t:
        fn()
        C.sync(dev)
    return t.s


def _series(sharded: torch.nn.Module, ids: torch.Tensor, dev: torch.device, spec: dict[str, Any]
            ) -> dict[str, list[float]]:
    """Seconds of each forward and training step with the check on, off, and on again, interleaved."""
    def forward() -> None:
        with torch.no_grad():
            sharded(input_ids=ids)

    def step() -> None:
        sharded(input_ids=ids, labels=ids).loss.backward()

    times: dict[str, list[float]] = {}
    for what, fn in (("forward", forward), ("step", step)):
        for _ in range(spec["warmup"]):
            fn()
        # on, off, on2: the second "on" series measures the noise between two runs of one setting; the order
        # rotates every iteration, so no setting always runs first (after the barrier) or last
        order = ("on", "off", "on2")
        for i in range(spec["iters"]):
            for setting in order[i % 3:] + order[:i % 3]:
                sharded.check_calls = setting != "off"
                times.setdefault(f"{what}/{setting}", []).append(_timed(fn, dev))
        sharded.check_calls = True
    return times


def run_rank(rank: int, world: int, spec: dict[str, Any]) -> dict[str, Any]:
    from transformers import LlamaConfig, LlamaForCausalLM

    dev = C.device_for(rank, world)
    out: dict[str, Any] = {}
    for name in spec["models"]:
        m = MODELS[name]
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**m["config"], use_cache=False)).to(dev)
        ids = torch.randint(0, m["config"]["vocab_size"], m["batch"], generator=torch.Generator().manual_seed(1))
        out[name] = _series(tpfx.auto_shard(model, world), ids.to(dev), dev, spec)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model only, fewer iterations")
    ap.add_argument("--iters", type=int, default=None)
    args = ap.parse_args()
    spec = {"models": ["tiny"] if args.quick else ["tiny", "h1024"],
            "iters": args.iters or (10 if args.quick else 40), "warmup": 3}
    console = C.console()
    console.print(f"[bold]per-call check cost[/] models={spec['models']} iters={spec['iters']} (2 ranks)")
    per_rank = C.launch(run_rank, 2, spec)
    rows: list[dict[str, Any]] = []
    targets = []
    for name in spec["models"]:
        cfg = MODELS[name]
        for what in ("forward", "step"):
            # a call's time is the slowest rank's; on/off/on2 of one iteration ran back to back
            on, off, on2 = ([max(r[name][f"{what}/{s}"][i] for r in per_rank) for i in range(spec["iters"])]
                            for s in ("on", "off", "on2"))
            diffs = [a - b for a, b in zip(on, off)]
            cost = C.median(diffs)  # paired: drift between iterations cancels
            lo, hi = C.median_ci(diffs)  # the median cost's 95% bootstrap interval
            noise = C.median([abs(a - b) for a, b in zip(on, on2)])
            row = {"model": name, "config": cfg["config"], "batch": cfg["batch"], "what": what,
                   "on_s": C.median(on), "off_s": C.median(off), "on2_s": C.median(on2), "cost_ms": cost * 1e3,
                   "ratio": 1 + cost / C.median(off), "noise_ms": noise * 1e3,
                   "ratio_ci": [1 + lo / C.median(off), 1 + hi / C.median(off)]}
            rows.append(row)
            console.print(f"  {name} {what}: with check {row['on_s'] * 1e3:.2f} ms, without {row['off_s'] * 1e3:.2f} "
                          f"ms; paired cost {row['cost_ms']:+.2f} ms (x{row['ratio']:.3f}); the same setting twice "
                          f"differs by {row['noise_ms']:.2f} ms; 95% interval x{row['ratio_ci'][0]:.3f}.."
                          f"x{row['ratio_ci'][1]:.3f}")
            verdict = C.interval_verdict(*row["ratio_ci"], TARGET)
            targets.append({"target": f"{name} {what}: with the check <= {TARGET}x without (95% interval of the "
                            "median paired ratio)", "value": f"{row['ratio']:.3f} ({row['ratio_ci'][0]:.3f}-"
                            f"{row['ratio_ci'][1]:.3f})", "ok": None if verdict == "not resolved" else
                            verdict == "PASS", "verdict": verdict})
    path = C.write_json("call_check", {"rows": rows, "iters": spec["iters"], "targets": targets}, args.quick)
    console.print(f"wrote {path.relative_to(C.ROOT)}")


if __name__ == "__main__":
    main()
