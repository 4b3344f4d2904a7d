"""GPU checks for the first lent GPU (issue 33), one line each; `bash scripts/gpu_check.sh` runs it.

Checks, on ``devices=["cuda:0"] * t`` (t ranks as threads of this process on one GPU, tpfx.inprocess):
  llama       forward, every gradient piece, greedy generate vs the unsharded model on the GPU (t=2)
  moe         the same for a Mixtral (t=2)
  compile     compile=True: forward and gradients (t=2)
  overhead    a training step of a hidden-1024 Llama: unsharded vs 2 ranks on the one GPU
  7b-stack    2 layers of Llama-7B shape at t=8 (8 ranks on the one GPU), seq 2048: step time, and one rank's
              share (step / 8) as tokens/s
Writes benchmarks/results/gpu_check.json. Exits 1 if a numeric check fails.
"""

from __future__ import annotations

import copy
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-5


def _rel(a: torch.Tensor, b: torch.Tensor, floor: float = 0.0) -> float:
    return ((a.float() - b.float()).abs().max() / max(b.abs().max().item(), floor, 1e-30)).item()


def _grads(sharded: Any, ref: torch.nn.Module) -> float:
    scale = max(p.grad.abs().max().item() for p in ref.parameters() if p.grad is not None)
    worst = 0.0
    for name, p in sharded.named_parameters():
        fqn, _, cut = name.partition("[")
        g = ref.get_parameter(fqn).grad
        if cut:
            *_, span = cut.rstrip("]").split(", ")
            a, b = map(int, span.split(":"))
            g = g.narrow(cut.count(":, "), a, b - a)
        worst = max(worst, _rel(p.grad, g, 1e-2 * scale))
    return worst


def _numerics(name: str, model: torch.nn.Module, t: int, **kw: Any) -> dict[str, Any]:
    import tpfx

    model = model.cuda().train()
    ref = copy.deepcopy(model)
    sharded = tpfx.auto_shard(copy.deepcopy(model).cpu(), devices=["cuda:0"] * t, **kw)
    ids = torch.randint(0, model.config.vocab_size, (2, 16), device="cuda")
    out, want = sharded(input_ids=ids, labels=ids), ref(input_ids=ids, labels=ids)
    out.loss.backward()
    want.loss.backward()
    row = {"check": name, "logits": _rel(out.logits, want.logits), "grads": _grads(sharded, ref)}
    if not kw:
        sharded.eval()
        ref.eval()
        mask = torch.ones_like(ids)
        with torch.no_grad():
            row["tokens_equal"] = bool(torch.equal(
                sharded.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False).cpu(),
                ref.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False).cpu()))
    row["ok"] = row["logits"] <= TOL and row["grads"] <= TOL and row.get("tokens_equal", True)
    sharded.close()
    return row


def _step_time(model: Any, ids: torch.Tensor, repeats: int = 5) -> float:
    times = []
    for i in range(repeats + 1):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        model(input_ids=ids, labels=ids).loss.backward()
        torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _llama(**kw: Any) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**{**dict(vocab_size=512, hidden_size=64, intermediate_size=128,
                                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                  use_cache=False), **kw}))


def main() -> int:
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device: skipped")
        return 0
    from transformers import MixtralConfig, MixtralForCausalLM

    import tpfx

    print(f"gpu_check: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    rows = [_numerics("llama", _llama(), 2)]
    torch.manual_seed(0)
    rows.append(_numerics("moe", MixtralForCausalLM(MixtralConfig(
        vocab_size=512, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, use_cache=False)), 2))
    rows.append(_numerics("compile", _llama(), 2, compile=True))
    for r in rows:
        print(f"gpu_check: {r['check']}: logits rel {r['logits']:.1e}, grads rel {r['grads']:.1e}"
              + (f", tokens equal {r['tokens_equal']}" if "tokens_equal" in r else "") + (": ok" if r["ok"] else
                                                                                      ": FAILED"))
    mid = _llama(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
                 num_attention_heads=16, num_key_value_heads=8).train()
    ids = torch.randint(0, 32000, (4, 512), device="cuda")
    alone = _step_time(mid.cuda(), ids)
    two = tpfx.auto_shard(copy.deepcopy(mid).cpu(), devices=["cuda:0"] * 2)
    both = _step_time(two, ids)
    two.close()
    overhead = {"check": "overhead", "unsharded_s": alone, "two_ranks_one_gpu_s": both, "ratio": both / alone}
    print(f"gpu_check: overhead: step unsharded {alone * 1e3:.1f} ms, 2 ranks on the one GPU {both * 1e3:.1f} ms "
          f"({both / alone:.2f}x)")
    del mid
    big = _llama(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=2,
                 num_attention_heads=32, num_key_value_heads=32).to(torch.bfloat16).train()
    eight = tpfx.auto_shard(big, devices=["cuda:0"] * 8)
    seq_ids = torch.randint(0, 32000, (1, 2048), device="cuda")
    step = _step_time(eight, seq_ids, repeats=3)
    eight.close()
    stack = {"check": "7b-stack", "step_s": step, "rank_share_s": step / 8, "tokens_per_s": 2048 / (step / 8)}
    print(f"gpu_check: 7b-stack: 2 layers at t=8 shapes, seq 2048, bf16: step {step:.3f} s for 8 ranks on one GPU, "
          f"one rank's share {step / 8 * 1e3:.1f} ms = {2048 / (step / 8):,.0f} tokens/s")
    out = ROOT / "benchmarks" / "results" / "gpu_check.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"device": torch.cuda.get_device_name(0), "torch": torch.__version__,
                               "rows": rows + [overhead, stack]}, indent=1) + "\n")
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
