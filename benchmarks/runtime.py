"""Runtime benchmark: tpfx against the peers, side by side in one run, same model, inputs and process count.

One launch of 2 ranks (NCCL with one GPU per rank when available, else gloo on CPU with 1 intra-op thread
per rank). Every rank loads the same random-init checkpoint (saved to a temp dir by the parent) and builds:

* ``unsharded``      the full model on every rank (each rank runs it alone, 1 thread: the t=1 baseline);
* ``tpfx``           ``tpfx.auto_shard(model, 2)`` (eager per-rank GraphModule);
* ``tpfx-compiled``  ``tpfx.auto_shard(model, 2, compile=True)`` (inductor, functional collectives);
* ``hf-tp_plan``     ``from_pretrained(path, tp_plan="auto")`` under the same process group (needs
                     accelerate);
* ``dtensor``        ``parallelize_module`` with a hand Megatron plan on a DeviceMesh over the same group:
                     q/k/v, gate/up ColwiseParallel, o/down RowwiseParallel, and lm_head
                     ColwiseParallel(output_layouts=Replicate()) as in HF's plan.

Measured for the decoder *body* (``model.model``: embeddings, layers, final norm; loss = mean of the last
hidden state) and the *full* causal LM (logits; step = loss with labels + backward): forward (no_grad) and
forward+backward, median of N iterations after warm-up, the tools interleaved round-robin so load noise hits
them alike; a barrier precedes every iteration; a rank's time is its median, a tool's the max over ranks.
Before timing, every tool's logits, loss and body output are compared with the unsharded model's.

Models: ``tiny`` (hidden 256, overhead dominates) and ``h1024`` (hidden 1024, 4 layers, intermediate 2816,
16 heads, vocab 32000, batch 4 x seq 128, compute dominates). Targets (issue): body speedup vs unsharded
>= 1.8x on h1024; tpfx step time <= 0.7x HF tp_plan's on tiny and <= 1.0x on h1024.

    python benchmarks/runtime.py [--quick] [--models tiny,h1024] [--iters N] [--warmup N]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import traceback
import warnings
from collections.abc import Callable
from typing import Any

import _common as C
import torch
import torch.distributed as dist
from rich.table import Table

import tpfx

MODELS: dict[str, dict[str, Any]] = {
    "tiny": {
        "config": dict(
            hidden_size=256,
            intermediate_size=688,
            num_hidden_layers=4,
            num_attention_heads=8,
            num_key_value_heads=8,
            vocab_size=1024,
            max_position_embeddings=512,
        ),
        "batch": [2, 32],
        "iters": 30,
        "warmup": 3,
    },
    "h1024": {
        "config": dict(
            hidden_size=1024,
            intermediate_size=2816,
            num_hidden_layers=4,
            num_attention_heads=16,
            num_key_value_heads=16,
            vocab_size=32000,
            max_position_embeddings=512,
        ),
        "batch": [4, 128],
        "iters": 8,
        "warmup": 2,
    },
}
QUICK: dict[str, dict[str, Any]] = {
    "tiny": {"config": {"num_hidden_layers": 2}, "iters": 4, "warmup": 1},
    "h1024": {"config": {"num_hidden_layers": 1}, "batch": [2, 32], "iters": 2, "warmup": 1},
}
TOOLS = ["unsharded", "tpfx", "tpfx-compiled", "hf-tp_plan", "dtensor"]
MEASURES = {
    "body_fwd": "body fwd",
    "body_step": "body fwd+bwd",
    "full_fwd": "full fwd (logits)",
    "full_step": "full fwd+bwd (loss)",
}
TARGET_BODY_SPEEDUP = 1.8
TARGET_VS_HF = {"tiny": 0.7, "h1024": 1.0}


# ----------------------------------------------------------------------------------------------- builders


def _load(path: str, dev: torch.device) -> torch.nn.Module:
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).to(dev).eval()


def build_hf(path: str, dev: torch.device, world: int) -> torch.nn.Module:
    """HF's own tensor parallelism; it reuses the initialised default process group."""
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32, tp_plan="auto").eval()


def build_dtensor(path: str, dev: torch.device, world: int) -> torch.nn.Module:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    model = _load(path, dev)
    mesh = init_device_mesh(dev.type, (world,))
    plan: dict[str, Any] = {"lm_head": ColwiseParallel(output_layouts=Replicate())}
    for i in range(model.config.num_hidden_layers):
        p = f"model.layers.{i}."
        for name in (
            "self_attn.q_proj",
            "self_attn.k_proj",
            "self_attn.v_proj",
            "mlp.gate_proj",
            "mlp.up_proj",
        ):
            plan[p + name] = ColwiseParallel()
        for name in ("self_attn.o_proj", "mlp.down_proj"):
            plan[p + name] = RowwiseParallel()
    return parallelize_module(model, mesh, plan)


class Tool:
    """One implementation: a full causal-LM callable and a body callable, plus their parameters."""

    def __init__(self, full: torch.nn.Module, body: torch.nn.Module) -> None:
        self.full, self.body = full, body

    def zero_grad(self) -> None:
        for m in (self.full, self.body):
            for p in m.parameters():
                p.grad = None


def _local(x: Any) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return x.full_tensor() if isinstance(x, DTensor) else x


def _body_out(out: Any) -> torch.Tensor:
    return _local(out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0])


# ----------------------------------------------------------------------------------------------- one rank


def bench_model(rank: int, world: int, spec: dict[str, Any], tools_wanted: list[str]) -> dict[str, Any]:
    dev = C.device_for(rank, world)
    path = spec["path"]
    g = torch.Generator().manual_seed(1)
    b, s = spec["batch"]
    ids = torch.randint(0, spec["config"]["vocab_size"], (b, s), generator=g).to(dev)
    labels = torch.randint(0, spec["config"]["vocab_size"], (b, s), generator=g).to(dev)
    res: dict[str, Any] = {"times": {}, "errors": {}, "skipped": {}, "setup_s": {}}

    ref = _load(path, dev)
    builders: dict[str, Callable[[], Tool]] = {
        "unsharded": lambda: Tool(ref, ref.model),
        "tpfx": lambda: Tool(tpfx.auto_shard(base, world), tpfx.auto_shard(base.model, world)),
        "tpfx-compiled": lambda: Tool(
            tpfx.auto_shard(base, world, compile=True), tpfx.auto_shard(base.model, world, compile=True)
        ),
        "hf-tp_plan": lambda: (lambda m: Tool(m, m.model))(build_hf(path, dev, world)),
        "dtensor": lambda: (lambda m: Tool(m, m.model))(build_dtensor(path, dev, world)),
    }
    base = _load(path, dev) if any(t.startswith("tpfx") for t in tools_wanted) else None
    tools: dict[str, Tool] = {}
    for name in tools_wanted:
        dist.barrier()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                with C.Timer() as t:
                    tools[name] = builders[name]()
            res["setup_s"][name] = t.s
        except Exception as e:  # noqa: BLE001 - a peer that cannot run is reported, not fatal
            res["skipped"][name] = f"{type(e).__name__}: {e}".strip()[:1500]
            res.setdefault("tracebacks", {})[name] = traceback.format_exc()[-3000:]
    # every rank must agree on the tool set, or collectives would pair up wrongly
    flags = [None] * world
    dist.all_gather_object(flags, sorted(tools))
    common = set.intersection(*(set(f) for f in flags))  # type: ignore[arg-type]
    for name in list(tools):
        if name not in common:
            res["skipped"].setdefault(name, "failed on another rank")
            del tools[name]

    def body_fwd(tool: Tool) -> Any:
        with torch.no_grad():
            return tool.body(input_ids=ids, use_cache=False)

    def body_step(tool: Tool) -> Any:
        _body_out(tool.body(input_ids=ids, use_cache=False)).float().square().mean().backward()

    def full_fwd(tool: Tool) -> Any:
        with torch.no_grad():
            return tool.full(input_ids=ids, use_cache=False)

    def full_step(tool: Tool) -> Any:
        _local(tool.full(input_ids=ids, labels=labels, use_cache=False).loss).backward()

    fns = {"body_fwd": body_fwd, "body_step": body_step, "full_fwd": full_fwd, "full_step": full_step}

    # ---- correctness against the unsharded model (the first calls also capture / compile)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            want_logits = ref(input_ids=ids, use_cache=False).logits
            want_loss = ref(input_ids=ids, labels=labels, use_cache=False).loss
            want_body = ref.model(input_ids=ids, use_cache=False).last_hidden_state
        for name, tool in tools.items():
            dist.barrier()
            try:
                with torch.no_grad():
                    logits = _local(tool.full(input_ids=ids, use_cache=False).logits)
                    loss = _local(tool.full(input_ids=ids, labels=labels, use_cache=False).loss)
                    body = _body_out(tool.body(input_ids=ids, use_cache=False))
                res["errors"][name] = {
                    "logits": C.rel_err(logits, want_logits),
                    "loss": C.rel_err(loss, want_loss),
                    "body": C.rel_err(body, want_body),
                }
            except Exception as e:  # noqa: BLE001
                res["errors"][name] = {"error": f"{type(e).__name__}: {e}"[:1500]}

    # ---- timing: per measure, warm up every tool, then interleave the tools round-robin
    rounds = max(1, min(spec["iters"], 4))
    per_round = [spec["iters"] // rounds + (1 if r < spec["iters"] % rounds else 0) for r in range(rounds)]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for measure, fn in fns.items():
            live = dict(tools)
            for name, tool in list(live.items()):
                try:
                    for _ in range(spec["warmup"]):
                        dist.barrier()
                        tool.zero_grad()
                        fn(tool)
                        C.sync(dev)
                except Exception as e:  # ranks would desynchronise: let the launcher report it
                    raise RuntimeError(f"{name} failed in {measure} on rank {rank}") from e
            for n_iter in per_round:
                for name, tool in live.items():
                    for _ in range(n_iter):
                        tool.zero_grad()
                        dist.barrier()
                        C.sync(dev)
                        with C.Timer() as t:
                            fn(tool)
                            C.sync(dev)
                        res["times"].setdefault(name, {}).setdefault(measure, []).append(t.s)
    res["params_local"] = {n: sum(tpfx.local(p).numel() for p in tool.full.parameters()) for n, tool in tools.items()}
    return res


def bench_rank(rank: int, world: int, specs: list[dict[str, Any]], tools: list[str]) -> dict[str, Any]:
    torch.manual_seed(0)
    return {spec["name"]: bench_model(rank, world, spec, tools) for spec in specs}


# ----------------------------------------------------------------------------------------------- parent


def make_specs(
    names: list[str], quick: bool, iters: int | None, warmup: int | None, tmp: str
) -> list[dict[str, Any]]:
    from transformers import LlamaConfig, LlamaForCausalLM

    specs = []
    for name in names:
        spec = {**MODELS[name], "config": dict(MODELS[name]["config"])}
        if quick:
            q = QUICK[name]
            spec = {**spec, **{k: v for k, v in q.items() if k != "config"}}
            spec["config"].update(q.get("config", {}))
        if iters is not None:
            spec["iters"] = iters
        if warmup is not None:
            spec["warmup"] = warmup
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**spec["config"], use_cache=False))
        path = os.path.join(tmp, name)
        model.save_pretrained(path)
        specs.append({**spec, "name": name, "path": path})
    return specs


def summarise(per_rank: list[dict[str, Any]], specs: list[dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for spec in specs:
        name = spec["name"]
        ranks = [r[name] for r in per_rank]
        times: dict[str, dict[str, Any]] = {}
        for tool in TOOLS:
            for m in MEASURES:
                per = [r["times"].get(tool, {}).get(m) for r in ranks]
                if any(isinstance(p, dict) for p in per):
                    times.setdefault(tool, {})[m] = next(p for p in per if isinstance(p, dict))
                elif all(isinstance(p, list) and p for p in per):
                    times.setdefault(tool, {})[m] = {
                        "median_s": max(C.median(p) for p in per),  # type: ignore[arg-type]
                        "per_rank_median_s": [C.median(p) for p in per],  # type: ignore[arg-type]
                        "samples": per,
                    }
        errors: dict[str, Any] = {}
        for tool in TOOLS:
            errs = [r["errors"].get(tool) for r in ranks if tool in r["errors"]]
            if errs:
                bad = [e for e in errs if "error" in e]
                errors[tool] = bad[0] if bad else {k: max(e[k] for e in errs) for k in errs[0]}
        skipped = {}
        for r in ranks:
            skipped.update({k: v for k, v in r["skipped"].items() if k not in skipped})
        ratios: dict[str, Any] = {}
        for tool, tm in times.items():
            for m, v in tm.items():
                if "median_s" not in v:
                    continue
                base = times.get("unsharded", {}).get(m, {}).get("median_s")
                hf = times.get("hf-tp_plan", {}).get(m, {}).get("median_s")
                ratios.setdefault(tool, {})[m] = {
                    "speedup_vs_unsharded": base / v["median_s"] if base else None,
                    "time_vs_hf": v["median_s"] / hf if hf else None,
                }
        out[name] = {
            "config": spec["config"],
            "batch": spec["batch"],
            "iters": spec["iters"],
            "warmup": spec["warmup"],
            "times": times,
            "ratios": ratios,
            "errors": errors,
            "skipped": skipped,
            "setup_s": {k: max(r["setup_s"].get(k, 0) for r in ranks) for k in ranks[0]["setup_s"]},
            "params_local": ranks[0].get("params_local"),
            "tracebacks": ranks[0].get("tracebacks", {}),
        }
    return out


def targets(summary: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []

    def ratio(model: str, tool: str, m: str, key: str) -> float | None:
        return summary.get(model, {}).get("ratios", {}).get(tool, {}).get(m, {}).get(key)

    for tool in ("tpfx", "tpfx-compiled"):
        for m in ("body_fwd", "body_step"):
            v = ratio("h1024", tool, m, "speedup_vs_unsharded")
            rows.append(
                {
                    "target": f"h1024 {tool} {MEASURES[m]}: speedup vs unsharded 1 thread >= "
                    f"{TARGET_BODY_SPEEDUP}x",
                    "value": None if v is None else round(v, 3),
                    "ok": None if v is None else v >= TARGET_BODY_SPEEDUP,
                }
            )
    for model, limit in TARGET_VS_HF.items():
        for tool in ("tpfx", "tpfx-compiled"):
            for m in ("full_step", "full_fwd"):
                v = ratio(model, tool, m, "time_vs_hf")
                rows.append(
                    {
                        "target": f"{model} {tool} {MEASURES[m]}: time <= {limit}x HF tp_plan's",
                        "value": None if v is None else round(v, 3),
                        "ok": None if v is None else v <= limit,
                    }
                )
    return rows


def render(summary: dict[str, Any], tgt: list[dict[str, Any]], world: int, backend: str) -> None:
    console = C.console()
    for name, s in summary.items():
        cfg = s["config"]
        title = (
            f"{name}: Llama hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, vocab "
            f"{cfg['vocab_size']}, batch {s['batch'][0]}x{s['batch'][1]}; {world} ranks ({backend}), "
            f"ms (median of {s['iters']}, max over ranks); x = speedup vs unsharded, hf = time ÷ HF's"
        )
        table = Table(title=title)
        table.add_column("tool")
        for m in MEASURES.values():
            table.add_column(m, justify="right")
        table.add_column("max rel err (logits/loss/body)", justify="right")
        for tool in TOOLS:
            if tool in s["skipped"]:
                table.add_row(tool, *["[yellow]skipped[/]"] * len(MEASURES), s["skipped"][tool][:60])
                continue
            if tool not in s["times"]:
                continue
            cells = []
            for m in MEASURES:
                v = s["times"][tool].get(m, {})
                if "median_s" not in v:
                    cells.append("[red]error[/]" if "error" in v else "–")
                    continue
                r = s["ratios"][tool][m]
                extra = [f"{r['speedup_vs_unsharded']:.2f}x"] if r["speedup_vs_unsharded"] else []
                if r["time_vs_hf"] and tool != "hf-tp_plan":
                    extra.append(f"hf {r['time_vs_hf']:.2f}")
                cells.append(
                    f"{C.fmt_ms(v['median_s'])} ({', '.join(extra)})" if extra else C.fmt_ms(v["median_s"])
                )
            e = s["errors"].get(tool, {})
            err = (
                ("error: " + e["error"][:50])
                if "error" in e
                else "/".join(f"{e[k]:.1e}" for k in ("logits", "loss", "body") if k in e)
            )
            table.add_row(tool, *cells, err)
        console.print(table)
        for tool, why in s["skipped"].items():
            console.print(f"[yellow]{name}: {tool} skipped:[/] {why}")
        for tool, e in s["errors"].items():
            if "error" in e:
                console.print(f"[red]{name}: {tool} output check failed:[/] {e['error']}")
    tt = Table(title="targets")
    for col in ("target", "value", "verdict"):
        tt.add_column(col)
    for t in tgt:
        tt.add_row(t["target"], "not measured" if t["value"] is None else str(t["value"]), C.verdict(t["ok"]))
    console.print(tt)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--quick", action="store_true", help="2-layer tiny and 1-layer h1024 (batch 2x32), few iters"
    )
    ap.add_argument("--models", default="tiny,h1024")
    ap.add_argument("--tools", default=",".join(TOOLS))
    ap.add_argument(
        "--iters", type=int, default=None, help="timed iterations per measure (overrides the model's)"
    )
    ap.add_argument("--warmup", type=int, default=None)
    ap.add_argument("--world", type=int, default=2)
    args = ap.parse_args()
    tools = [t for t in TOOLS if t in args.tools.split(",")]
    console = C.console()
    backend = "nccl" if C.use_gpu(args.world) else "gloo"
    console.print(
        f"[bold]runtime[/] models={args.models} tools={tools} world={args.world} ({backend})"
        f"{' (quick)' if args.quick else ''}"
    )
    with tempfile.TemporaryDirectory(prefix="tpfx_runtime_") as tmp:
        specs = make_specs(args.models.split(","), args.quick, args.iters, args.warmup, tmp)
        per_rank = C.launch(bench_rank, args.world, specs, tools)
    summary = summarise(per_rank, specs)
    tgt = targets(summary)
    render(summary, tgt, args.world, backend)
    path = C.write_json(
        "runtime",
        {
            "world": args.world,
            "backend": backend,
            "threads_per_rank": 1,
            "tools": tools,
            "models": summary,
            "targets": tgt,
        },
        args.quick,
    )
    console.print(f"wrote {path.relative_to(C.ROOT)}")


if __name__ == "__main__":
    main()
