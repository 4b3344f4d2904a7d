"""``tpfx`` command line: ``tpfx demo`` and ``tpfx plan``."""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch


def demo_model(layers: int = 4) -> torch.nn.Module:
    """The built-in default model: a small random-init Llama with grouped-query attention."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=688, num_hidden_layers=layers,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256, use_cache=False)
    return LlamaForCausalLM(cfg)


def _demo_rank(rank: int, world: int, layers: int) -> dict[str, Any]:
    import tpfx

    model, reference = demo_model(layers), demo_model(layers)
    sharded = tpfx.auto_shard(model, world)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 1024, (2, 32), generator=g)
    labels = torch.randint(0, 1024, (2, 32), generator=g)
    out, ref = sharded(input_ids=ids, labels=labels), reference(input_ids=ids, labels=labels)
    out.loss.backward()
    ref.loss.backward()
    full = dict(reference.named_parameters())
    grad_err = max(((p.grad - tpfx.shard_tensor(sharded.plan, n, full[n].grad, rank)).abs().max()
                    / full[n].grad.abs().max()).item() for n, p in sharded.named_parameters())
    return {
        "plan": str(sharded.plan) if rank == 0 else "",
        "logits_err": ((out.logits - ref.logits).abs().max() / ref.logits.abs().max()).item(),
        "loss": (out.loss.item(), ref.loss.item()),
        "grad_err": grad_err,
        "params": (sum(p.numel() for p in sharded.parameters()), sum(p.numel() for p in reference.parameters())),
    }


def demo(world: int, layers: int) -> int:
    import tpfx

    print(f"tpfx demo: random-init Llama ({layers} layers, hidden 256, 8 heads / 4 KV heads, vocab 1024) "
          f"on {world} CPU processes (gloo)\n")
    results = tpfx.launch(_demo_rank, world, layers)
    print(results[0]["plan"])
    worst = 0.0
    for r, res in enumerate(results):
        loss, ref = res["loss"]
        print(f"rank {r}: logits rel err {res['logits_err']:.2e}  loss {loss:.6f} (unsharded {ref:.6f})  "
              f"grad rel err {res['grad_err']:.2e}  params {res['params'][0]:,} of {res['params'][1]:,}")
        worst = max(worst, res["logits_err"], res["grad_err"], abs(loss - ref) / abs(ref))
    ok = worst <= 1e-5
    print(f"\nmax relative error vs the unsharded model: {worst:.2e}  ({'OK' if ok else 'FAIL'}, tolerance 1e-5)")
    return 0 if ok else 1


def plan_cmd(args: argparse.Namespace) -> int:
    import tpfx

    model = _build(args.model, args.layers)
    p = tpfx.plan(model, args.world_size)
    if args.format == "json":
        text = p.to_json()
    elif args.format == "tp_plan":
        import json

        text = json.dumps(p.to_tp_plan(), indent=1)
    else:
        text = str(p)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
    else:
        print(text)
    return 0


def _build(name: str, layers: int | None) -> torch.nn.Module:
    """A transformers model type built from its default config on the meta device."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(name)
    if layers is not None:
        for attr in ("num_hidden_layers", "n_layer", "num_layers"):
            if hasattr(cfg, attr):
                setattr(cfg, attr, layers)
    cfg.use_cache = False
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tpfx", description="Automatic tensor parallelism for PyTorch models.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="shard a small random-init Llama over CPU processes and check it")
    d.add_argument("--world-size", type=int, default=2)
    d.add_argument("--layers", type=int, default=4)
    p = sub.add_parser("plan", help="print the sharding plan of a transformers model type (built on meta)")
    p.add_argument("model", help="a transformers model type, e.g. llama, gpt2, mistral")
    p.add_argument("--world-size", type=int, required=True)
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--format", choices=["table", "json", "tp_plan"], default="table")
    p.add_argument("-o", "--output", default=None)
    args = parser.parse_args(argv)
    if args.cmd == "demo":
        return demo(args.world_size, args.layers)
    return plan_cmd(args)


if __name__ == "__main__":
    sys.exit(main())
