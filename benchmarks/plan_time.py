"""Compile-time benchmark: how long tpfx takes to plan full-size Llama shapes, stage by stage.

For Llama 1B/7B/13B/70B shapes built on the meta device (no weight memory) and t = 2, 4, 8:

* ``export``: ``torch.export.export`` alone (non-strict, dynamic batch/seq dims, as tpfx calls it), measured
  interleaved with the plans (once before each t) and summarised by its median; ``static export``: plain
  ``torch.export.export`` without dims, what a user pays who calls it themselves (the reference of issue 15);
* tpfx's stages from ``tpfx.plan(..., timings=...)``: ``capture`` (export + unlifting), ``decompose_bias``,
  ``propagate``; and ``emit`` from ``tpfx.emit_rank`` (one rank's GraphModule, slicing meta tensors);
* ratio = (capture + passes + one rank's emission) / export alone; ``plan``: the wall time of ``tpfx.plan``
  (block capture on: ``tpfx.passes.blocks``); graph nodes; numbered layers and how many of them are
  structurally distinct ("unique layers"). Each model and t is planned ``--repeat`` times (3) and the median
  plan's figures are reported (all plan times in ``plan_samples``), the same statistic as export's: on this box
  one run of the same plan varies by +-30%, enough to decide a ratio of two single runs.

Then, on 2 ranks (NCCL on GPUs, gloo on CPU), the ``torch.compile`` cost for a small real Llama:
``auto_shard(compile=True)`` and the first call of the sharded module (inductor compiles there), measured
inside the rank, next to ``torch.compile`` of the unsharded model.

Targets: 70B at t=8 planned in <= 1.3x the time of torch.export alone (same dims); propagation + emission <= 1 s;
issue 15: ``tpfx.plan`` and plan + one rank's emission each <= 0.5x plain static export, and plan time flat in
depth: 70B's (80 layers) <= 1.5x 1B's (16 layers) at t=8, with the seconds each further layer adds (the slope
between the two) next to static export's.

    python benchmarks/plan_time.py [--quick] [--models 1B,7B,13B,70B] [--tp 2,4,8]
"""

from __future__ import annotations

import argparse
import gc
import math
import statistics
import warnings
from typing import Any

import _common as C
import torch
from rich.table import Table
from torch.export import Dim

import tpfx

TARGET_RATIO = 1.3
TARGET_PROP_EMIT_S = 1.0
TARGET_STATIC_RATIO = 0.5  # issue 15: plan once per distinct block, not once per layer
TARGET_DEPTH_RATIO = 1.5  # issue 15: 70B (80 layers) plan time over 1B's (16 layers): flat in depth
COMPILE_MODEL = dict(
    vocab_size=1024,
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=256,
)


def _example(model: torch.nn.Module) -> dict[str, Any]:
    device = next(iter(model.parameters())).device
    ids = torch.randint(0, model.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    return {"input_ids": ids.to(device), "use_cache": False}


def export_alone(model: torch.nn.Module, dynamic: bool = True) -> tuple[float, int]:
    """Seconds of ``torch.export.export`` with the dynamic dims tpfx asks for (or, ``dynamic=False``, plain
    static export: what a user calling it without dims pays), and the graph's node count."""
    kwargs = _example(model)
    spec = {"input_ids": {0: Dim.AUTO, 1: Dim.AUTO}, "use_cache": None} if dynamic else None
    gc.collect()  # both timed sides start from a collected heap (a pending collection costs seconds at 70B)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with C.Timer() as t:
            ep = torch.export.export(model, (), kwargs, dynamic_shapes=spec, strict=False)
    nodes = len(ep.graph.nodes)
    del ep
    return t.s, nodes


def plan_once(model: torch.nn.Module, world: int, emit_ranks: list[int]) -> dict[str, Any]:
    timings: dict[str, float] = {}
    gc.collect()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with C.Timer() as wall:
            plan = tpfx.plan(model, world, timings=timings)
        emits = []
        for r in emit_ranks:
            et: dict[str, float] = {}
            gm = tpfx.emit_rank(plan, r, et)
            emits.append(et["emit"])
            del gm
    gm = plan.derivation.gm
    sigs = C.layer_signatures(gm)
    passes = {k: v for k, v in timings.items() if k not in ("capture", "propagate", "build_plan")}
    row = {
        "capture": timings.get("capture"),
        "passes": passes,
        "propagate": timings.get("propagate", 0.0) + timings.get("build_plan", 0.0),
        "emit": statistics.mean(emits),
        "emit_ranks": dict(zip(emit_ranks, emits, strict=True)),
        "plan_wall": wall.s,
        "nodes": len(gm.graph.nodes),
        "layers": len(sigs),
        "unique_layers": len(set(sigs.values())),
        "traced_layers": _traced(model),
        "forward_collectives": len(plan.forward_collectives()),
        "fallbacks": len(plan.fallbacks),
    }
    row["prop_emit"] = row["propagate"] + row["emit"]
    row["total"] = row["capture"] + sum(passes.values()) + row["propagate"] + row["emit"]
    del plan, gm
    gc.collect()
    return row


def _traced(model: torch.nn.Module) -> int | None:
    """How many layers of the stack block capture traces (the others are stitched in); None: captured whole."""
    from tpfx.passes import blocks

    found = blocks.find_stack(model)
    return None if isinstance(found, str) or not blocks.ENABLED else found.cut


def _depth_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Issue 15's depth figure at the largest t: 70B's plan time over 1B's, and the seconds per further layer of
    plan + emission against static export's."""
    t = max((r["t"] for r in rows), default=None)
    by = {r["model"]: r for r in rows if r["t"] == t}
    small, big = by.get("1B"), by.get("70B")
    if small is None or big is None:
        return [{"target": f"70B / 1B plan time <= {TARGET_DEPTH_RATIO}x (flat in depth)", "value": None, "ok": None}]
    ratio = big["plan_wall"] / small["plan_wall"]
    extra = big["layers"] - small["layers"]
    slope = (big["plan_wall"] + big["emit"] - small["plan_wall"] - small["emit"]) / extra
    static_slope = (big["static_export"] - small["static_export"]) / extra
    noise = math.hypot(C.spread(big["plan_samples"]), C.spread(small["plan_samples"]))
    return [{"target": f"t={t}: tpfx.plan of 70B ({big['layers']} layers) <= {TARGET_DEPTH_RATIO}x 1B's "
                       f"({small['layers']} layers), issue 15 (plan + emission add {slope * 1e3:.1f} ms per layer; "
                       f"static export {static_slope * 1e3:.0f} ms)",
             "value": round(ratio, 3), "ok": ratio <= TARGET_DEPTH_RATIO, "noise": round(noise, 3),
             "limit": TARGET_DEPTH_RATIO}]


def _judge_noise(targets: list[dict[str, Any]], r70: dict[str, Any]) -> None:
    """Each target's verdict against its own noise (half-IQR / median of the repeated runs behind it, combined
    over both sides of a ratio): "not resolved" where the bar lies within it."""
    plan, static, export = (C.spread(r70[k]) for k in ("plan_samples", "static_samples", "export_samples"))
    noise = {"torch.export alone": math.hypot(plan, export), "propagation + emission": plan,
             "tpfx.plan <=": math.hypot(plan, static), "plan + one rank's emission": math.hypot(plan, static)}
    limits = {"torch.export alone": TARGET_RATIO, "propagation + emission": TARGET_PROP_EMIT_S,
              "tpfx.plan <=": TARGET_STATIC_RATIO, "plan + one rank's emission": TARGET_STATIC_RATIO}
    for t in targets:
        key = next((k for k in noise if k in t["target"] and "70B t=8" in t["target"]), None)
        if key is not None:
            t["noise"], t["limit"] = round(noise[key], 3), limits[key]
        if t.get("value") is not None and "noise" in t:
            t["verdict"] = C.ratio_verdict(float(t["value"]), t["limit"], t["noise"])
            t["ok"] = None if t["verdict"] == "not resolved" else t["ok"]


def warm_up() -> None:
    """The first export in a process pays ~1.5 s of one-time setup; pay it on a tiny model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**{**COMPILE_MODEL, "num_hidden_layers": 1, "use_cache": False})
    with torch.device("meta"):
        m = LlamaForCausalLM(cfg)
    export_alone(m)
    plan_once(m, 2, [0])


def compile_rank(rank: int, world: int, spec: dict[str, Any]) -> dict[str, Any]:
    """Inside one rank: sharding and torch.compile costs of a small real Llama."""
    from transformers import LlamaConfig, LlamaForCausalLM

    dev = C.device_for(rank, world)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**COMPILE_MODEL, **spec["model"], "use_cache": False})).to(dev)
    ids = torch.randint(
        0, model.config.vocab_size, tuple(spec["batch"]), generator=torch.Generator().manual_seed(1)
    ).to(dev)

    def timed(fn: Any, n: int = 1) -> tuple[list[float], Any]:
        out, ts = None, []
        for _ in range(n):
            C.sync(dev)
            with C.Timer() as t:
                out = fn()
                C.sync(dev)
            ts.append(t.s)
        return ts, out

    res: dict[str, Any] = {"rank": rank}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            ref = model(input_ids=ids).logits
        (res["eager_shard_s"],), eager = timed(lambda: tpfx.auto_shard(model, world))
        (res["eager_first_s"],), _ = timed(lambda: eager(input_ids=ids))
        res["eager_steady_s"] = C.median(timed(lambda: eager(input_ids=ids), 3)[0])
        (res["compiled_shard_s"],), compiled = timed(lambda: tpfx.auto_shard(model, world, compile=True))
        (res["compiled_first_s"],), out = timed(lambda: compiled(input_ids=ids))
        res["compiled_steady_s"] = C.median(timed(lambda: compiled(input_ids=ids), 3)[0])
        res["compiled_rel_err"] = C.rel_err(out.logits, ref)
        unsharded = torch.compile(model)
        (res["unsharded_compile_first_s"],), _ = timed(lambda: unsharded(input_ids=ids))
        res["unsharded_compiled_steady_s"] = C.median(timed(lambda: unsharded(input_ids=ids), 3)[0])
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="1B only, t = 2 and 8, 2-layer compile model")
    ap.add_argument("--models", default=None, help="comma list of Llama sizes (1B,7B,13B,70B)")
    ap.add_argument("--tp", default=None, help="comma list of world sizes (default 2,4,8)")
    ap.add_argument(
        "--emit-ranks",
        default="first-last",
        choices=["first-last", "all", "first"],
        help="which ranks' emission to time (they differ only in slice offsets)",
    )
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile part")
    ap.add_argument("--repeat", type=int, default=3, help="plans per model and t; the median is reported")
    args = ap.parse_args()
    models = (args.models or ("1B" if args.quick else "1B,7B,13B,70B")).split(",")
    tps = [int(x) for x in (args.tp or ("2,8" if args.quick else "2,4,8")).split(",")]
    console = C.console()
    console.print(f"[bold]tpfx plan time[/] models={models} t={tps}{' (quick)' if args.quick else ''}")

    warm_up()
    rows: list[dict[str, Any]] = []
    for size in models:
        model = C.meta_llama(size)
        exports: list[float] = []
        statics: list[float] = []
        per_t: list[dict[str, Any]] = []
        for t in tps:
            secs, export_nodes = export_alone(model)
            exports.append(secs)
            statics.append(export_alone(model, dynamic=False)[0])
            ranks = {"first": [0], "first-last": sorted({0, t - 1}), "all": list(range(t))}[args.emit_ranks]
            plans = [plan_once(model, t, ranks) for _ in range(args.repeat)]
            row = {
                "model": size,
                "t": t,
                "params": C.llama_params(size),
                "export_nodes": export_nodes,
                **sorted(plans, key=lambda p: p["plan_wall"])[len(plans) // 2],  # the median, as export's
                "plan_samples": [round(p["plan_wall"], 3) for p in plans],
            }
            per_t.append(row)
            console.print(
                f"  {size} t={t}: export {secs:.2f}s capture {row['capture']:.2f}s "
                f"propagate {row['propagate']:.3f}s emit {row['emit']:.3f}s"
            )
        export_med, static_med = C.median(exports), C.median(statics)
        for row in per_t:
            row["export"] = export_med
            row["export_samples"] = exports
            row["ratio"] = row["total"] / export_med
            row["static_export"], row["static_samples"] = static_med, statics
            row["ratio_static"] = row["total"] / static_med
            row["plan_ratio_static"] = row["plan_wall"] / static_med
        rows += per_t
        del model
        gc.collect()

    table = Table(title="tpfx plan time by stage (seconds; meta-device Llama shapes)")
    for col in C.PLAN_TIME_COLUMNS:
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(*C.plan_time_cells(r))
    console.print(table)

    targets: list[dict[str, Any]] = []
    hit = [r for r in rows if r["model"] == "70B" and r["t"] == 8]
    r70 = hit[0] if hit else None
    targets.append(
        {
            "target": f"70B t=8: total plan time <= {TARGET_RATIO}x torch.export alone",
            "value": None if r70 is None else round(r70["ratio"], 3),
            "ok": None if r70 is None else r70["ratio"] <= TARGET_RATIO,
        }
    )
    targets.append(
        {
            "target": f"70B t=8: propagation + emission <= {TARGET_PROP_EMIT_S} s",
            "value": None if r70 is None else round(r70["prop_emit"], 3),
            "ok": None if r70 is None else r70["prop_emit"] <= TARGET_PROP_EMIT_S,
        }
    )

    targets.append(
        {
            "target": f"70B t=8: tpfx.plan <= {TARGET_STATIC_RATIO}x plain static torch.export (issue 15)",
            "value": None if r70 is None else round(r70["plan_ratio_static"], 3),
            "ok": None if r70 is None else r70["plan_ratio_static"] <= TARGET_STATIC_RATIO,
        }
    )
    targets.append(
        {
            "target": f"70B t=8: plan + one rank's emission (auto_shard before loading) <= {TARGET_STATIC_RATIO}x "
                      "plain static torch.export (issue 15)",
            "value": None if r70 is None else round(r70["ratio_static"], 3),
            "ok": None if r70 is None else r70["ratio_static"] <= TARGET_STATIC_RATIO,
        }
    )

    targets += _depth_targets(rows)
    if r70 is not None:
        _judge_noise(targets, r70)

    compile_res: dict[str, Any] | None = None
    if not args.no_compile:
        spec = {"model": {"num_hidden_layers": 2} if args.quick else {}, "batch": [2, 32]}
        console.print("  torch.compile of a small sharded Llama on 2 ranks ...")
        try:
            per_rank = C.launch(compile_rank, 2, spec)
            keys = [k for k in per_rank[0] if k != "rank"]
            compile_res = {
                "model": {**COMPILE_MODEL, **spec["model"]},
                "batch": spec["batch"],
                "world": 2,
                "per_rank": per_rank,
                **{k: max(r[k] for r in per_rank) for k in keys},
            }
        except Exception as e:  # noqa: BLE001 - report, do not hide the rest of the results
            compile_res = {"error": f"{type(e).__name__}: {e}"[:2000]}
        ct = Table(
            title="torch.compile on 2 ranks (seconds, max over ranks; small Llama "
            f"{'2' if args.quick else '4'} layers, hidden 256, batch 2x32)"
        )
        ct.add_column("what")
        ct.add_column("tpfx eager", justify="right")
        ct.add_column("tpfx compile=True", justify="right")
        ct.add_column("unsharded torch.compile", justify="right")
        if "error" in compile_res:
            console.print(f"[red]compile benchmark failed:[/] {compile_res['error']}")
        else:
            c = compile_res
            ct.add_row(
                "auto_shard (capture+plan+emit)",
                C.fmt_s(c["eager_shard_s"]),
                C.fmt_s(c["compiled_shard_s"]),
                "–",
            )
            ct.add_row(
                "first call (compiles)",
                C.fmt_s(c["eager_first_s"]),
                C.fmt_s(c["compiled_first_s"]),
                C.fmt_s(c["unsharded_compile_first_s"]),
            )
            ct.add_row(
                "steady call",
                C.fmt_s(c["eager_steady_s"], 4),
                C.fmt_s(c["compiled_steady_s"], 4),
                C.fmt_s(c["unsharded_compiled_steady_s"], 4),
            )
            console.print(ct)
            console.print(
                f"compiled sharded logits vs unsharded eager: max rel err {c['compiled_rel_err']:.2e}"
            )

    tt = Table(title="targets")
    for col in ("target", "value", "verdict"):
        tt.add_column(col)
    for t in targets:
        tt.add_row(t["target"], "not measured" if t["value"] is None else str(t["value"]), C.verdict(t["ok"]))
    console.print(tt)
    path = C.write_json("plan_time", {"rows": rows, "compile": compile_res, "targets": targets}, args.quick)
    console.print(f"wrote {path.relative_to(C.ROOT)}")


if __name__ == "__main__":
    main()
