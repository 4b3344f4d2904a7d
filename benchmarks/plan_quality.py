"""Plan-quality benchmark: tpfx's communication and memory per model family against Megatron-LM's plan.

For each transformers family (built tiny from its default config: hidden 256, 2 layers, 8 heads / 4 KV heads,
vocab 1024, random weights) and t = 2, 4:

* forward collectives from the plan (``plan.collectives``), attributed to the numbered layer whose weights'
  shard or partial sum they resolve (``tpfx.report``'s scope; a partial sum may travel through casts into the
  next layer's norm before it is reduced): count and bytes per layer, against Megatron's 2 all-reduces of
  b*s*h per layer, 3 in a decoder layer with cross-attention (b*s = the example batch*seq,
  h = ``config.hidden_size``, fp32);
* per step: forward all-reduces against Megatron's 2L + 1 (the +1 is the vocab-parallel embedding; an
  encoder-decoder adds one per decoder layer for cross-attention and one for the decoder embedding), and the
  bytes of every forward collective, gathers included;
* measured per step: the functional collectives that actually run in one forward and one backward of this
  rank's module (counted with a dispatch mode under a single-process fake process group of size t);
* parameter bytes per rank against total / t.

Plus a Llama-7B shape at t = 8 on the meta device (plan only): its parameter-bytes ratio (target <= 1.02) and
per-layer collectives. Families that fail to plan are listed with their error.

    python benchmarks/plan_quality.py [--quick] [--families llama,gpt2,...] [--tp 2,4]
"""

from __future__ import annotations

import argparse
import gc
import math
import traceback
import warnings
from collections import Counter
from typing import Any

import _common as C
import torch
import torch.distributed as dist
from rich.table import Table
from torch.utils._python_dispatch import TorchDispatchMode

import tpfx

FAMILIES = [
    "llama",
    "gpt2",
    "bert",
    "mistral",
    "qwen2",
    "qwen3",
    "gemma",
    "gemma2",
    "phi",
    "phi3",
    "opt",
    "falcon",
    "gpt_neox",
    "bloom",
    "gptj",
    "t5",
    "mixtral",
    "qwen2_moe",
    "starcoder2",
    "olmo",
    "stablelm",
    "granite",
    "cohere",
    "deepseek_v3",
    "minicpm3",
    "hrm_text",
]
QUICK_FAMILIES = ["llama", "gpt2", "bert", "qwen2"]
TINY = dict(
    hidden_size=256,
    d_model=256,
    n_embd=256,
    intermediate_size=512,
    ffn_dim=512,
    d_ff=512,
    num_hidden_layers=2,
    num_layers=2,
    n_layer=2,
    num_decoder_layers=2,
    num_attention_heads=8,
    num_heads=8,
    n_head=8,
    num_key_value_heads=4,
    num_kv_heads=4,
    head_dim=32,
    d_kv=32,
    qk_rope_head_dim=32,  # multi-head latent attention: rope dims = head_dim, as in the default configs
    qk_nope_head_dim=32,
    v_head_dim=32,
    kv_lora_rank=64,
    q_lora_rank=64,
    vocab_size=1024,
    max_position_embeddings=512,
    word_embed_proj_dim=256,
    rotary_dim=16,
)
BATCH, SEQ = 2, 16
TARGET_7B_BYTES = 1.02
ABBREV = {
    "all_reduce": "AR",
    "all_gather": "AG",
    "all_gather_into_tensor": "AG",
    "reduce_scatter": "RS",
    "reduce_scatter_tensor": "RS",
    "all_to_all_single": "A2A",
    "broadcast": "BC",
}


# ----------------------------------------------------------------------------------------------- models


def tiny_model(family: str) -> torch.nn.Module:
    """The family's default config shrunk to ``TINY`` sizes through its constructor (``tpfx.testing.families``)."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSeq2SeqLM

    from tpfx.testing.families import tiny_config

    cfg = tiny_config(family, sizes=TINY)
    kwargs: dict[str, Any] = {}
    if family == "gpt2":
        kwargs["attn_implementation"] = "eager"  # sdpa does not export (see shared NOTES)
    if getattr(cfg, "is_encoder_decoder", False):
        auto: Any = AutoModelForSeq2SeqLM
    elif family in ("bert", "roberta", "distilbert"):
        auto = AutoModelForMaskedLM
    else:
        auto = AutoModelForCausalLM
    torch.manual_seed(0)
    return auto.from_config(cfg, **kwargs)


def example(model: torch.nn.Module, batch: int = BATCH, seq: int = SEQ) -> dict[str, Any]:
    device = next(iter(model.parameters())).device
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(1))
    kw = {"input_ids": ids.to(device)}
    if getattr(model.config, "is_encoder_decoder", False):
        kw["decoder_input_ids"] = ids.clone().to(device)
    return kw


# ----------------------------------------------------------------------------------------------- analysis


def megatron(model: torch.nn.Module, layer_keys: list[str], bsh_bytes: int) -> dict[str, Any]:
    """Megatron-LM's forward all-reduces per step for this model (TP only, vocab-parallel embedding)."""
    n = len(layer_keys)
    count = 2 * n + 1
    dec = 0
    if getattr(model.config, "is_encoder_decoder", False):
        dec = sum(1 for k in layer_keys if k.startswith("decoder.") or ".decoder." in k)
        count += dec + 1
    per_layer = (2 * n + dec) / max(n, 1)  # a decoder layer's cross-attention adds one
    return {
        "fwd_all_reduce": count,
        "fwd_bytes": count * bsh_bytes,
        "per_layer_all_reduce": per_layer,
        "per_layer_bytes": per_layer * bsh_bytes,
    }


def analyse_plan(plan: Any, model: torch.nn.Module, t: int, bs: int) -> dict[str, Any]:
    gm = plan.derivation.gm
    h = int(model.config.hidden_size)
    bsh_bytes = bs * h * 4
    layer_keys = sorted(C.layer_signatures(gm), key=lambda k: (k.rsplit(".", 1)[0], int(k.rsplit(".", 1)[1])))
    by_name = {n.name: n for n in gm.graph.nodes}
    per_layer: dict[str, dict[str, Any]] = {
        k: {"count": 0, "bytes": 0, "kinds": Counter()} for k in layer_keys
    }
    outside: list[dict[str, Any]] = []
    fwd = plan.forward_collectives()
    # a collective belongs to the layer of the weights whose shard / partial sum it resolves (the report's
    # scope), not to the node it follows: a partial sum may flow through casts into the next layer's norm
    scope = {i["after"]: (f"{i['scope']}.{i['index']}" if i["index"] is not None else None)
             for i in (tpfx.report.analyze(plan) or {}).get("collectives", []) if i["pass"] == "forward"}
    for c in fwd:
        node = by_name.get(c.after)
        key = scope[c.after] if c.after in scope else (C.layer_of(node) if node is not None else None)
        if key in per_layer:
            per_layer[key]["count"] += 1
            per_layer[key]["bytes"] += c.bytes
            per_layer[key]["kinds"][c.kind] += 1
        else:
            outside.append({"kind": c.kind, "after": c.after, "before": c.before, "bytes": c.bytes})
    counts = [v["count"] for v in per_layer.values()]
    nbytes = [v["bytes"] for v in per_layer.values()]
    ref = megatron(model, layer_keys, bsh_bytes)
    kinds = Counter(c.kind for c in fwd)
    dtypes = {n: p.element_size() for n, p in model.named_parameters()}
    total = local = 0
    for fqn, p in plan.placements.items():
        size = dtypes.get(fqn, 4)
        total += math.prod(p.shape) * size
        local += math.prod(p.local_shape()) * size
    ar_bytes = sum(c.bytes for c in fwd if c.kind == "all_reduce")
    all_bytes = sum(c.bytes for c in fwd)
    return {
        "layers": len(layer_keys),
        "h": h,
        "bs": bs,
        "bsh_bytes": bsh_bytes,
        "per_layer_count_mean": sum(counts) / max(len(counts), 1),
        "per_layer_count_min": min(counts, default=0),
        "per_layer_count_max": max(counts, default=0),
        "per_layer_bytes_mean": sum(nbytes) / max(len(nbytes), 1),
        "per_layer_bytes_ratio": (sum(nbytes) / max(len(nbytes), 1)) / ref["per_layer_bytes"],
        "per_layer_kinds": {k: dict(v["kinds"]) for k, v in per_layer.items()},
        "outside_layers": outside,
        "step_fwd_counts": dict(kinds),
        "step_fwd_all_reduce": kinds.get("all_reduce", 0),
        "step_fwd_ar_bytes": ar_bytes,
        "step_fwd_bytes": all_bytes,
        "megatron": ref,
        "step_ar_bytes_ratio": ar_bytes / ref["fwd_bytes"],
        "step_bytes_ratio": all_bytes / ref["fwd_bytes"],
        "param_bytes_total": total,
        "param_bytes_rank": local,
        "param_bytes_ratio": local / (total / t),
        "fallbacks": plan.fallbacks,
        "unknown_ops": list(plan.unknown_ops),
    }


class CommCounter(TorchDispatchMode):
    """Counts functional / c10d collectives that run, with the full-tensor bytes they move."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        ns = getattr(func, "namespace", "")
        name = func.overloadpacket.__name__
        if ns in ("_c10d_functional", "c10d_functional", "c10d") and name != "wait_tensor":
            x = args[0] if args else None
            if isinstance(x, (list, tuple)):
                x = x[0] if x else None
            nb = x.numel() * x.element_size() if isinstance(x, torch.Tensor) else 0
            if "all_gather" in name and len(args) > 1 and isinstance(args[1], int):
                nb *= args[1]
            self.calls.append((name, nb))
        return func(*args, **(kwargs or {}))

    def summary(self) -> dict[str, Any]:
        kinds = Counter(n for n, _ in self.calls)
        return {"counts": dict(kinds), "total": len(self.calls), "bytes": sum(b for _, b in self.calls)}


def _first_tensor(out: Any) -> torch.Tensor:
    if hasattr(out, "logits") and out.logits is not None:
        return out.logits
    if isinstance(out, torch.Tensor):
        return out
    for v in out.values() if hasattr(out, "values") else out:
        if isinstance(v, torch.Tensor):
            return v
    raise TypeError(f"no tensor output in {type(out).__name__}")


def measure_step(model: torch.nn.Module, t: int) -> dict[str, Any]:
    """Collectives that run in one forward and one backward of rank 0's module (fake group of size t)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=t)
    try:
        kw = example(model)
        sharded = tpfx.auto_shard(model, t, example_kwargs=kw)
        fwd = CommCounter()
        with fwd:
            out = sharded(**kw)
        loss = _first_tensor(out).float().pow(2).mean()
        bwd = CommCounter()
        with bwd:
            loss.backward()
        return {"fwd": fwd.summary(), "bwd": bwd.summary()}
    finally:
        dist.destroy_process_group()


# ----------------------------------------------------------------------------------------------- driver


def run_family(family: str, t: int, runtime: bool) -> dict[str, Any]:
    row: dict[str, Any] = {"family": family, "t": t}
    try:
        model = tiny_model(family)
        row["model"] = type(model).__name__
    except Exception as e:  # noqa: BLE001
        return {**row, "status": "build failed", "error": f"{type(e).__name__}: {e}"[:500]}
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            plan = tpfx.plan(model, t, example_kwargs=example(model))
        row["warnings"] = sorted({str(w.message)[:200] for w in caught if "tpfx" in str(w.message)})
        row.update(analyse_plan(plan, model, t, BATCH * SEQ))
        row["status"] = "ok"
    except Exception as e:  # noqa: BLE001
        row.update(
            status="plan failed",
            error=f"{type(e).__name__}: {e}"[:500],
            traceback=traceback.format_exc()[-2000:],
        )
        return row
    if runtime:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                row["runtime"] = measure_step(model, t)
        except Exception as e:  # noqa: BLE001
            row["runtime"] = {"error": f"{type(e).__name__}: {e}"[:500]}
    del model, plan
    gc.collect()
    return row


def run_7b(t: int) -> dict[str, Any]:
    model = C.meta_llama("7B")
    row: dict[str, Any] = {"family": "llama-7B (meta)", "t": t, "model": "LlamaForCausalLM"}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            plan = tpfx.plan(model, t, example_kwargs=example(model))
        row.update(analyse_plan(plan, model, t, BATCH * SEQ), status="ok")
    except Exception as e:  # noqa: BLE001
        row.update(status="plan failed", error=f"{type(e).__name__}: {e}"[:500])
    return row


# name -> (Llama shape overrides, t): head counts the world size does not divide, and one key/value head
HEADS = {
    "llama-7B 32 heads t=3": ({}, 3),
    "llama-7B 32 heads t=6": ({}, 6),
    "32 heads / 8 KV t=3": ({"num_key_value_heads": 8}, 3),
    "qwen2-7B 28 heads / 4 KV t=8": ({"hidden_size": 3584, "intermediate_size": 18944, "num_attention_heads": 28,
                                      "num_key_value_heads": 4, "head_dim": 128}, 8),
    "hidden 3072 / 24 heads t=5": ({"hidden_size": 3072, "intermediate_size": 8192, "num_attention_heads": 24,
                                    "num_key_value_heads": 24, "head_dim": 128}, 5),
    "1 KV head (MQA) t=4": ({"num_key_value_heads": 1}, 4),
    "1 KV head (MQA) t=8": ({"num_key_value_heads": 1}, 8),
}


def _ideal(heads: int, kv: int, t: int) -> tuple[int, int]:
    """The head-parallel ideal on the fullest rank: ceil(heads/t) query heads (q and o), and the most key/value
    heads any rank's query heads read (k and v)."""
    rep, q_most, kv_most = heads // kv, 0, 0
    base, extra = divmod(heads, t)
    for r in range(t):
        a = r * base + min(r, extra)
        b = a + base + (1 if r < extra else 0)
        q_most = max(q_most, b - a)
        kv_most = max(kv_most, (b - 1) // rep - a // rep + 1 if b > a else 0)
    return q_most, kv_most


def _rows_per_rank(plan: Any, fqn: str, dim: int, t: int) -> list[int]:
    p = plan.placements[fqn]
    if p.dim != dim:
        return [p.shape[dim]] * t
    return [p.as_placement().local_size(r, t) for r in range(t)]


def run_heads(name: str) -> dict[str, Any]:
    overrides, t = HEADS[name]
    model = C.meta_llama("7B", **overrides)
    cfg = model.config
    heads, kv, hidden = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size
    d = getattr(cfg, "head_dim", None) or hidden // heads
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = tpfx.plan(model, t, example_kwargs=example(model))
    attn = "model.layers.0.self_attn."
    q = _rows_per_rank(plan, attn + "q_proj.weight", 0, t)
    o = _rows_per_rank(plan, attn + "o_proj.weight", 1, t)
    k = _rows_per_rank(plan, attn + "k_proj.weight", 0, t)
    q_ideal, kv_ideal = _ideal(heads, kv, t)
    return {"name": name, "t": t, "heads": heads, "kv": kv, "head_dim": d,
            "q_heads_per_rank": [n // d for n in q], "kv_heads_per_rank": [n // d for n in k],
            "kv_placement": plan.placements[attn + "k_proj.weight"].placement,
            "q_o_vs_ideal": max(a + b for a, b in zip(q, o)) / (2 * q_ideal * d),
            "kv_vs_ideal": max(k) / (kv_ideal * d),
            "per_layer_all_reduce": analyse_plan(plan, model, t, BATCH * SEQ)["per_layer_count_mean"],
            "gathers": plan.count("all_gather"),
            "node_fallbacks": len([f for f in plan.fallbacks if "node" in f])}


def _fused_models() -> dict[str, tuple[Any, int, str]]:
    """name -> (meta model, t, the fused q|k|v weight): fused projections whose heads t does not divide."""
    from transformers import GPT2Config, GPT2LMHeadModel, Phi3Config, Phi3ForCausalLM

    with torch.device("meta"):
        return {"phi3-mini (32 heads) t=3": (Phi3ForCausalLM(Phi3Config()), 3, "model.layers.0.self_attn.qkv_proj.weight"),
                "phi3-mini (32 heads) t=5": (Phi3ForCausalLM(Phi3Config()), 5, "model.layers.0.self_attn.qkv_proj.weight"),
                "gpt2 (12 heads) t=5": (GPT2LMHeadModel(GPT2Config(attn_implementation="eager")), 5,
                                        "transformer.h.0.attn.c_attn.weight")}


def run_fused(name: str, model: Any, t: int, fused: str) -> dict[str, Any]:
    """Parameters on the fullest rank ÷ (total / t), and forward all-reduces per layer."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = tpfx.plan(model, t, example_kwargs=example(model))
    total = fullest = 0
    for f, p in plan.placements.items():
        n = math.prod(p.shape)
        total += n
        fullest += n if p.dim is None else n // p.shape[p.dim] * max(_rows_per_rank(plan, f, p.dim, t))
    return {"name": name, "t": t, "fused_placement": plan.placements[fused].placement,
            "params_vs_total_over_t": fullest * t / total,
            "per_layer_all_reduce": analyse_plan(plan, model, t, BATCH * SEQ)["per_layer_count_mean"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help=f"families {','.join(QUICK_FAMILIES)} at t=2 only")
    ap.add_argument("--families", default=None)
    ap.add_argument("--tp", default=None, help="comma list of world sizes (default 2,4)")
    ap.add_argument("--no-runtime", action="store_true", help="skip the measured fwd/bwd collectives")
    ap.add_argument("--no-7b", action="store_true", help="skip the Llama-7B meta plan")
    args = ap.parse_args()
    families = args.families.split(",") if args.families else (QUICK_FAMILIES if args.quick else FAMILIES)
    tps = [int(x) for x in (args.tp or ("2" if args.quick else "2,4")).split(",")]
    console = C.console()
    console.print(f"[bold]tpfx plan quality[/] families={families} t={tps}{' (quick)' if args.quick else ''}")

    rows = []
    for fam in families:
        for t in tps:
            row = run_family(fam, t, not args.no_runtime)
            console.print(
                f"  {fam} t={t}: {row['status']}" + (f" ({row.get('error')})" if "error" in row else "")
            )
            rows.append(row)
    big = None if args.no_7b else run_7b(8)
    heads = [] if args.no_7b else [run_heads(n) for n in HEADS]
    fused = [] if args.no_7b else [run_fused(n, *v) for n, v in _fused_models().items()]
    for f in fused:
        console.print(f"  {f['name']}: {f['fused_placement']}, params on the fullest rank ÷ total/t "
                      f"{f['params_vs_total_over_t']:.3f}, {f['per_layer_all_reduce']:.2g} all-reduces per layer")
    for h in heads:
        console.print(f"  {h['name']}: query heads per rank {h['q_heads_per_rank']}, key/value heads per rank "
                      f"{h['kv_heads_per_rank']}, q/o ÷ ideal {h['q_o_vs_ideal']:.3f}, k/v ÷ ideal "
                      f"{h['kv_vs_ideal']:.3f}, {h['per_layer_all_reduce']:.2g} all-reduces per layer")

    table = Table(
        title=f"forward collectives vs Megatron (b*s = {BATCH}x{SEQ}, fp32; per layer: attributed to "
        "the layer of the node a collective follows)"
    )
    for col in (
        "family",
        "t",
        "L",
        "AR/layer",
        "bytes/layer ÷2bsh",
        "step AR (Megatron)",
        "other fwd colls",
        "AR bytes ÷Megatron",
        "all bytes ÷Megatron",
        "ran fwd",
        "ran bwd",
        "params/rank ÷(total/t)",
        "fallbacks",
        "no-rule ops",
    ):
        table.add_column(col, justify="right")
    failed = []
    for r in rows + ([big] if big else []):
        if r["status"] != "ok":
            failed.append(r)
            table.add_row(r["family"], str(r["t"]), "–", "[red]" + r["status"] + "[/]", *["–"] * 10)
            continue
        rt = r.get("runtime") or {}

        def ran(part: str, rt: dict[str, Any] = rt) -> str:
            if "error" in rt:
                return "error"
            if part not in rt:
                return "–"
            s = rt[part]
            return " + ".join(f"{v} {ABBREV.get(k, k)}" for k, v in sorted(s["counts"].items())) or "0"

        gathers = [c for c in r["outside_layers"] if c["kind"] != "all_reduce"]
        lay = r["per_layer_count_mean"]
        table.add_row(
            r["family"],
            str(r["t"]),
            str(r["layers"]),
            f"{lay:.2g}"
            + (
                ""
                if r["per_layer_count_min"] == r["per_layer_count_max"]
                else f" ({r['per_layer_count_min']}–{r['per_layer_count_max']})"
            ),
            f"{r['per_layer_bytes_ratio']:.2f}",
            f"{r['step_fwd_all_reduce']} ({r['megatron']['fwd_all_reduce']})",
            " + ".join(f"{ABBREV.get(g['kind'], g['kind'])} {C.fmt_bytes(g['bytes'])}" for g in gathers)
            or "0",
            f"{r['step_ar_bytes_ratio']:.2f}",
            f"{r['step_bytes_ratio']:.2f}",
            ran("fwd"),
            ran("bwd"),
            f"{r['param_bytes_ratio']:.3f}",
            str(len(r["fallbacks"])),
            ", ".join(r["unknown_ops"]) or "–",
        )
    console.print(table)
    for r in failed:
        console.print(f"[red]{r['family']} t={r['t']} {r['status']}:[/] {r.get('error')}")
    for r in rows:
        if isinstance(r.get("runtime"), dict) and "error" in r["runtime"]:
            console.print(
                f"[yellow]{r['family']} t={r['t']} runtime count failed:[/] {r['runtime']['error']}"
            )

    targets = []
    if big is not None:
        ok = big["status"] == "ok" and big["param_bytes_ratio"] <= TARGET_7B_BYTES
        targets.append(
            {
                "target": f"Llama-7B t=8: parameter bytes per rank <= {TARGET_7B_BYTES} x total/t",
                "value": round(big["param_bytes_ratio"], 4) if big["status"] == "ok" else None,
                "ok": ok,
            }
        )
        if big["status"] == "ok":
            targets.append(
                {
                    "target": "Llama-7B t=8: 2 forward all-reduces per layer (Megatron)",
                    "value": big["per_layer_count_mean"],
                    "ok": big["per_layer_count_mean"] == 2,
                }
            )
    for h in heads:
        targets.append({"target": f"{h['name']}: q/o on the fullest rank <= 1.02 x ceil(heads/t) heads, "
                                  "2 all-reduces per layer",
                        "value": round(h["q_o_vs_ideal"], 4),
                        "ok": h["q_o_vs_ideal"] <= 1.02 and h["per_layer_all_reduce"] == 2})
        targets.append({"target": f"{h['name']}: k/v on the fullest rank <= 1.02 x the key/value heads its query "
                                  "heads read",
                        "value": round(h["kv_vs_ideal"], 4), "ok": h["kv_vs_ideal"] <= 1.02})
    tt = Table(title="targets")
    for col in ("target", "value", "verdict"):
        tt.add_column(col)
    for t in targets:
        tt.add_row(t["target"], str(t["value"]), C.verdict(t["ok"]))
    console.print(tt)
    path = C.write_json(
        "plan_quality",
        {"batch": BATCH, "seq": SEQ, "tiny_config": TINY, "rows": rows, "llama_7b": big, "heads": heads,
         "fused": fused, "targets": targets},
        args.quick,
    )
    console.print(f"wrote {path.relative_to(C.ROOT)}")


if __name__ == "__main__":
    main()
