"""Checkpoint benchmark: load time and peak memory per rank, tpfx against transformers, in one run.

A random-init Llama (hidden 2048, 4 layers, MLP 5632, vocab 32000: 1.35 GB fp32) is written once with
``save_pretrained``. Then, each in fresh processes:

* ``tpfx``        ``tpfx.from_pretrained(path)`` on 2 gloo ranks (each reads only its slices), then
                  ``sharded.save_pretrained`` (gathered to rank 0, streamed to disk) and ``tpfx.save`` (DCP,
                  each rank writes its own slices);
* ``hf-tp_plan``  ``from_pretrained(path, tp_plan="auto")`` on 2 gloo ranks (needs accelerate);
* ``unsharded``   ``from_pretrained(path)`` in one process, then ``save_pretrained``.

Memory is the kernel's exact high-water mark (``VmHWM``), reset (``/proc/self/clear_refs``) after a warm-up
that imports and exercises the same code on a tiny model, so the figure is what loading this model costs:
``peak growth`` = VmHWM after the load and one read of every weight - VmRSS before it (transformers maps
the files lazily: a weight's pages become resident when it is first used, so an unread model looks free);
``load s`` likewise runs until every weight has been read once (tpfx's time includes capture and planning). The absolute VmHWM of the process is reported too.
Goal (issue): tpfx's peak growth per rank <= 0.55x the unsharded load's, and no worse than HF tp_plan's.

    python benchmarks/checkpoint.py [--quick]      # --quick: hidden 1024, 2 layers (~0.3 GB)
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import tempfile
import time
from typing import Any

import _common as C
import torch

WORLD = 2
TARGET_VS_UNSHARDED = 0.55


def _vm(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def _config(quick: bool) -> dict[str, Any]:
    if quick:
        return dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=2, num_attention_heads=16,
                    num_key_value_heads=16, vocab_size=32000)
    return dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=4, num_attention_heads=16,
                num_key_value_heads=16, vocab_size=32000)


def _warm_up(world: int) -> None:
    """Import and run the loading code once on a tiny checkpoint, so one-time costs are not counted."""
    from transformers import LlamaConfig, LlamaForCausalLM

    import tpfx

    tiny = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=2, vocab_size=64))
    tpfx.plan(tiny, world)
    del tiny
    gc.collect()


def _reset() -> int:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _vm("VmRSS")


def tpfx_rank(rank: int, world: int, path: str, out: str) -> dict[str, Any]:
    import torch.distributed as dist

    import tpfx

    _warm_up(world)
    before = _reset()
    t0 = time.perf_counter()
    sharded = tpfx.from_pretrained(path)
    _touch(sharded)
    dist.barrier()
    load_s = time.perf_counter() - t0
    res = {"load_s": load_s, "peak_growth": _vm("VmHWM") - before, "hwm": _vm("VmHWM"),
           "local_bytes": sum(tpfx.local(p).numel() * p.element_size() for p in sharded.parameters())}
    before = _reset()
    t0 = time.perf_counter()
    sharded.save_pretrained(os.path.join(out, "hf"))
    res["save_pretrained_s"] = time.perf_counter() - t0
    res["save_peak_growth"] = _vm("VmHWM") - before
    t0 = time.perf_counter()
    tpfx.save(sharded, os.path.join(out, "dcp"))
    res["dcp_save_s"] = time.perf_counter() - t0
    return res


def hf_tp_rank(rank: int, world: int, path: str, out: str) -> dict[str, Any]:
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    _warm_up(world)
    before = _reset()
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, tp_plan="auto")
    _touch(model)
    dist.barrier()
    res = {"load_s": time.perf_counter() - t0, "peak_growth": _vm("VmHWM") - before, "hwm": _vm("VmHWM")}
    del model
    return res


def unsharded_rank(rank: int, world: int, path: str, out: str) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM

    _warm_up(2)
    before = _reset()
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path)
    _touch(model)
    res = {"load_s": time.perf_counter() - t0, "peak_growth": _vm("VmHWM") - before, "hwm": _vm("VmHWM")}
    t0 = time.perf_counter()
    model.save_pretrained(os.path.join(out, "unsharded"))
    res["save_pretrained_s"] = time.perf_counter() - t0
    return res


def _touch(model: torch.nn.Module) -> None:
    """Read every weight once: transformers maps checkpoint files lazily, so pages become resident (and count)
    only when a weight is first used; tpfx's slices are already in memory."""
    with torch.no_grad():
        for p in model.parameters():
            getattr(p, "_local_tensor", p).sum()


def _worst(rows: list[dict[str, Any]]) -> dict[str, Any]:
    return {k: max(r[k] for r in rows) for k in rows[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    console = C.console()
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = _config(args.quick)
    tmp = tempfile.mkdtemp(prefix="tpfx_ckpt_bench_")
    try:
        path, out = os.path.join(tmp, "ckpt"), os.path.join(tmp, "out")
        os.makedirs(out)
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**cfg, tie_word_embeddings=False))
        total = sum(p.numel() * p.element_size() for p in model.parameters())
        largest = max(p.numel() * p.element_size() for p in model.parameters())
        model.save_pretrained(path)
        del model
        gc.collect()
        console.print(f"[bold]checkpoint[/] {C.fmt_bytes(total)} fp32 Llama, t={WORLD} gloo")
        tools = {"tpfx": _worst(C.launch(tpfx_rank, WORLD, path, out)),
                 "hf-tp_plan": _worst(C.launch(hf_tp_rank, WORLD, path, out)),
                 "unsharded": _worst(C.launch(unsharded_rank, 1, path, out))}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    bound = 1.15 * total / WORLD + largest
    tp, hf, un = tools["tpfx"], tools["hf-tp_plan"], tools["unsharded"]
    targets = [
        {"target": f"tpfx peak growth per rank <= {TARGET_VS_UNSHARDED}x unsharded load's",
         "value": f"{tp['peak_growth'] / un['peak_growth']:.2f}x",
         "ok": tp["peak_growth"] <= TARGET_VS_UNSHARDED * un["peak_growth"]},
        {"target": "tpfx peak growth per rank <= HF tp_plan's",
         "value": f"{tp['peak_growth'] / hf['peak_growth']:.2f}x", "ok": tp["peak_growth"] <= hf["peak_growth"]},
        {"target": "tpfx peak growth per rank <= 1.15 x model/t + largest tensor",
         "value": f"{C.fmt_bytes(tp['peak_growth'])} vs {C.fmt_bytes(bound)}", "ok": tp["peak_growth"] <= bound},
    ]
    for name, r in tools.items():
        console.print(name, {k: (C.fmt_bytes(v) if "growth" in k or k in ("hwm", "local_bytes") else f"{v:.2f} s")
                             for k, v in r.items()})
    for t in targets:
        console.print(t["target"], t["value"], C.verdict(t["ok"]))
    p = C.write_json("checkpoint", {"world": WORLD, "config": cfg, "model_bytes": total, "largest_tensor": largest,
                                    "tools": tools, "targets": targets}, args.quick)
    console.print(f"wrote {p.relative_to(C.ROOT)}")


if __name__ == "__main__":
    main()
