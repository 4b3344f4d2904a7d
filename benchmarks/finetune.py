"""Fine-tuning benchmark: three recipes, tpfx against HF's ``tp_plan`` with the same recipe, one run.

One launch of 2 ranks (gloo on CPU, 1 intra-op thread per rank; NCCL when each rank has a GPU). Every rank loads
the same random-init checkpoint (saved by the parent) and runs, per recipe:

* ``plain``         full fine-tuning, every parameter trains;
* ``checkpointed``  the same after ``gradient_checkpointing_enable()`` (transformers' non-reentrant form);
* ``lora``          peft LoRA (r=8 on q/k/v/o/gate/up/down), only the adapters train;

with each tool: ``tpfx`` (``tpfx.from_pretrained(path, 2)``, or with ``adapter=`` for LoRA) and ``hf-tp_plan``
(``from_pretrained(path, tp_plan="auto")``, then the recipe's call on it). One step = forward with labels,
backward, AdamW on the trainable parameters; ms, median of N steps after warm-up, the tools interleaved step
by step, a barrier before each, max over ranks. Bytes saved for backward per rank: a ``saved_tensors_hooks``
count over one forward (each storage once, parameters excluded). Before timing, each tool's first loss is
compared with the unsharded model's (same recipe). No verdicts: the figures are measured, not targets.

    python benchmarks/finetune.py [--quick] [--iters N]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import traceback
import warnings
from typing import Any

import _common as C
import torch
import torch.distributed as dist

import tpfx

sys.path.insert(0, str(C.ROOT / "tests"))
from finetune_cases import saved_bytes  # noqa: E402  (the tests' count: saved_tensors_hooks, each storage once)

CONFIG = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=4, num_attention_heads=16,
              num_key_value_heads=16, vocab_size=32000, max_position_embeddings=512)
QUICK = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=8,
             num_key_value_heads=8, vocab_size=1024)
RECIPES = ["plain", "checkpointed", "lora"]
TOOLS = ["tpfx", "hf-tp_plan"]
LORA = dict(r=8, lora_alpha=16, lora_dropout=0.0,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


def _lora() -> Any:
    from peft import LoraConfig

    return LoraConfig(**LORA)


def build(tool: str, recipe: str, path: str, world: int) -> torch.nn.Module:
    """``tool``'s model for ``recipe`` (the adapter drawn from seed 0 on every rank and tool alike)."""
    from peft import get_peft_model
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    if tool == "tpfx":
        if recipe == "checkpointed":
            model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            return tpfx.auto_shard(model.train(), world)
        return tpfx.from_pretrained(path, world, adapter=_lora() if recipe == "lora" else None).train()
    kw = {"tp_plan": "auto"} if tool == "hf-tp_plan" else {}
    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, **kw).train()
    if recipe == "checkpointed":
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if recipe == "lora":
        model = get_peft_model(model, _lora())
    return model


def bench(rank: int, world: int, path: str, batch: list[int], vocab: int, iters: int, warmup: int) -> dict[str, Any]:
    dev = C.device_for(rank, world)
    ids = torch.randint(0, vocab, tuple(batch), generator=torch.Generator().manual_seed(1)).to(dev)
    res: dict[str, Any] = {"times": {}, "saved": {}, "loss_err": {}, "skipped": {}, "tracebacks": {}}
    for recipe in RECIPES:
        ref = build("unsharded", recipe, path, world)
        want = ref(input_ids=ids, labels=ids).loss.detach()
        del ref
        runs: dict[str, tuple[torch.nn.Module, torch.optim.Optimizer]] = {}
        for tool in TOOLS:
            key = f"{tool}/{recipe}"
            dist.barrier()
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    model = build(tool, recipe, path, world)
                    first = model(input_ids=ids, labels=ids).loss
                res["loss_err"][key] = C.rel_err(first.detach().to(want.device), want)
                first.backward()
                model.zero_grad()
                opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
                runs[tool] = (model, opt)
            except Exception as e:  # noqa: BLE001 - a peer that cannot run a recipe is reported, not fatal
                res["skipped"][key] = f"{type(e).__name__}: {e}".strip()[:600]
                res["tracebacks"][key] = traceback.format_exc()[-2000:]
        flags: list[Any] = [None] * world
        dist.all_gather_object(flags, sorted(runs))
        for tool in [t for t in runs if not all(t in f for f in flags)]:
            res["skipped"].setdefault(f"{tool}/{recipe}", "failed on another rank")
            del runs[tool]
        times: dict[str, list[float]] = {t: [] for t in runs}
        for i in range(warmup + iters):
            for tool, (model, opt) in runs.items():
                dist.barrier()
                with C.Timer() as t:
                    model(input_ids=ids, labels=ids).loss.backward()
                    opt.step()
                    opt.zero_grad()
                    C.sync(dev)
                if i >= warmup:
                    times[tool].append(t.s)
        for tool, (model, _) in runs.items():
            res["times"][f"{tool}/{recipe}"] = C.median(times[tool])
            res["saved"][f"{tool}/{recipe}"] = saved_bytes(lambda m=model: m(input_ids=ids, labels=ids).loss, model)
            model.zero_grad()
        del runs
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--iters", type=int, default=None)
    args = ap.parse_args()
    config = {**CONFIG, **(QUICK if args.quick else {})}
    batch = [2, 32] if args.quick else [4, 128]
    iters, warmup = (args.iters or (2 if args.quick else 5)), 1
    from transformers import LlamaConfig, LlamaForCausalLM

    with tempfile.TemporaryDirectory(prefix="tpfx_ft_") as tmp:
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**config)).save_pretrained(tmp)
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        ranks = C.launch(bench, 2, tmp, batch, config["vocab_size"], iters, warmup)
    keys = sorted(set().union(*(r["times"] for r in ranks)))
    data = {
        "config": config, "batch": batch, "iters": iters, "world": 2, "lora": LORA,
        "step_s": {k: max(r["times"][k] for r in ranks) for k in keys},
        "saved_bytes": {k: max(r["saved"][k] for r in ranks) for k in keys},
        "loss_err": {k: max(r["loss_err"].get(k, float("nan")) for r in ranks) for k in ranks[0]["loss_err"]},
        "skipped": ranks[0]["skipped"], "tracebacks": ranks[0]["tracebacks"],
    }
    path = C.write_json("finetune", data, args.quick)
    C.console().print(f"wrote {path}")
    for k in keys:
        C.console().print(f"{k:28s} {C.fmt_ms(data['step_s'][k]):>10s}  saved {C.fmt_bytes(data['saved_bytes'][k])}"
                          f"  loss rel {data['loss_err'].get(k, float('nan')):.1e}")
    for k, why in data["skipped"].items():
        C.console().print(f"{k}: skipped ({why[:200]})")


if __name__ == "__main__":
    main()
