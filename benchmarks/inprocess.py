"""One process, several devices (issue 33): a training step and generate ms/token of ``devices=["cpu"] * 2``
(the ranks on 2 threads of one process, 1 intra-op thread each) vs the same plan on 2 gloo processes (1 thread
each) vs the unsharded model (1 and 2 threads), on CPU.

* step: forward with labels, backward, AdamW step; batch x seq tokens; median of the repeats after warm-ups;
* generate: greedy, batch 1; ms/token = (time of NEW new tokens - time of 1 new token) / (NEW - 1), medians.

The threads and the unsharded model run one after the other in this process; the gloo ranks run in their own
two processes (a barrier before each timed call, a call's time its slowest rank's). threads / processes: what
running the ranks as threads of one Python process costs against processes (the GIL, a thread rendezvous per
collective, a hand-off per call) net of what it saves (gloo's loopback TCP: in-process collectives are copies).

    python benchmarks/inprocess.py [--quick]
"""

from __future__ import annotations

import argparse
import copy
import time
from typing import Any

import _common as C
import torch

SHAPE = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=4, vocab_size=8000)
BATCH, SEQ, PROMPT, NEW, WORLD = 4, 128, 32, 32, 2


def _build() -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**SHAPE, pad_token_id=0, use_cache=False))


def _inputs() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return (torch.randint(0, SHAPE["vocab_size"], (BATCH, SEQ), generator=g),
            torch.randint(0, SHAPE["vocab_size"], (1, PROMPT), generator=g))


def _step(model: Any, opt: Any, ids: torch.Tensor, barrier: Any = None) -> float:
    if barrier is not None:
        barrier()
    t0 = time.perf_counter()
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    opt.zero_grad()
    return time.perf_counter() - t0


def _gen(model: Any, prompt: torch.Tensor, new: int, barrier: Any = None) -> float:
    if barrier is not None:
        barrier()
    t0 = time.perf_counter()
    with torch.no_grad():
        model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new, min_new_tokens=new,
                       do_sample=False, pad_token_id=0)
    return time.perf_counter() - t0


def _measure(model: Any, repeats: int, barrier: Any = None) -> dict[str, float]:
    ids, prompt = _inputs()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    model.train()
    for _ in range(2):
        _step(model, opt, ids, barrier)
    steps = [_step(model, opt, ids, barrier) for _ in range(repeats)]
    model.eval()
    _gen(model, prompt, NEW, barrier)
    one = [_gen(model, prompt, 1, barrier) for _ in range(repeats)]
    full = [_gen(model, prompt, NEW, barrier) for _ in range(repeats)]
    return {"step_s": C.median(steps), "ms_per_token": (C.median(full) - C.median(one)) / (NEW - 1) * 1e3}


def _gloo_rank(rank: int, world: int, repeats: int) -> dict[str, float]:
    import torch.distributed as dist

    import tpfx

    sharded = tpfx.auto_shard(_build(), world)
    got = _measure(sharded, repeats, dist.barrier)
    worst = torch.tensor([got["step_s"], got["ms_per_token"]])
    dist.all_reduce(worst, op=dist.ReduceOp.MAX)
    return {"step_s": worst[0].item(), "ms_per_token": worst[1].item()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="3 repeats instead of 10")
    args = ap.parse_args()
    repeats = 3 if args.quick else 10
    import tpfx

    rows: dict[str, dict[str, float]] = {}
    torch.set_num_threads(1)
    rows["unsharded, 1 thread"] = _measure(_build(), repeats)
    torch.set_num_threads(2)
    rows["unsharded, 2 threads"] = _measure(_build(), repeats)
    torch.set_num_threads(1)
    local = tpfx.auto_shard(copy.deepcopy(_build()), devices=["cpu"] * WORLD)
    rows["tpfx devices=['cpu']*2 (threads)"] = _measure(local, repeats)
    local.close()
    rows["tpfx on 2 gloo processes"] = C.launch(_gloo_rank, WORLD, repeats)[0]
    threads, procs = rows["tpfx devices=['cpu']*2 (threads)"], rows["tpfx on 2 gloo processes"]
    gil = {k: threads[k] / procs[k] for k in ("step_s", "ms_per_token")}
    for name, r in rows.items():
        print(f"{name:36s} step {r['step_s'] * 1e3:8.1f} ms   generate {r['ms_per_token']:7.2f} ms/token")
    print(f"threads / processes: step {gil['step_s']:.2f}x, generate {gil['ms_per_token']:.2f}x")
    C.write_json("inprocess", {"shape": SHAPE, "batch": BATCH, "seq": SEQ, "prompt": PROMPT, "new_tokens": NEW,
                               "world": WORLD, "repeats": repeats, "rows": rows, "threads_over_processes": gil},
                 args.quick)


if __name__ == "__main__":
    main()
