"""Collect ``benchmarks/results/*.json`` into ``benchmarks/RESULTS.md`` and ``benchmarks/results.png``.

For each benchmark the full run's JSON is used when present, else the ``--quick`` one (marked as such).
RESULTS.md gets the tables, the targets with PASS/FAIL, the machine each result came from (``nproc``, CPU
model, torch version, load average at the end), the date, and the exact commands; the plot shows plan time vs
model size per t (with torch.export alone for reference) and step time by tool per runtime model.

    python benchmarks/report.py [--quick]   # --quick: prefer the quick results even if full ones exist
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path
from typing import Any

import _common as C

OUT_MD = Path(__file__).resolve().parent / "RESULTS.md"
OUT_PNG = Path(__file__).resolve().parent / "results.png"
NAMES = ("plan_time", "plan_quality", "runtime", "train_2d", "finetune", "sequence_parallel", "checkpoint", "generate",
         "generate_prefix", "call_check", "blocks_check", "inprocess", "decode_limits")


def load(name: str, prefer_quick: bool) -> dict[str, Any] | None:
    order = [f"{name}_quick.json", f"{name}.json"] if prefer_quick else [f"{name}.json", f"{name}_quick.json"]
    for fn in order:
        p = C.RESULTS / fn
        if p.exists():
            return json.loads(p.read_text())
    return None


def md_table(headers: list[str], rows: list[list[Any]]) -> str:
    def cell(x: Any) -> str:
        return str(x).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def fmt_targets(targets: list[dict[str, Any]]) -> str:
    return md_table(
        ["target", "value", "verdict"],
        [
            [t["target"], "not measured" if t["value"] is None else t["value"], t.get("verdict") or C.verdict(t["ok"])]
            for t in targets
        ],
    )


def machine_line(d: dict[str, Any]) -> str:
    m = d["machine"]
    gpu = f", GPU {m['cuda']} x{m['gpus']}" if m.get("cuda") else ""
    load = m.get("loadavg")
    load_s = f", load avg {load[0]:.2f}" if load else ""
    return (
        f"{m['date']} on `{m['host']}`: nproc {m['nproc']}, {m['cpu']}{gpu}, Python {m['python']}, torch "
        f"{m['torch']}, transformers {m['transformers']}, tpfx git {m['git']}{load_s}"
    )


def header(d: dict[str, Any]) -> str:
    quick = " **(quick smoke run: small settings, noisy — not the benchmark)**" if d["quick"] else ""
    return f"Run{quick}: {machine_line(d)}\n\nCommand: `{d['command']}`\n"


# ----------------------------------------------------------------------------------------------- sections


def section_plan_time(d: dict[str, Any] | None) -> str:
    if d is None:
        return "## Plan time\n\nNot run (`python benchmarks/plan_time.py`).\n"
    rows = [C.plan_time_cells(r) for r in d["rows"]]
    out = [
        "## Plan time (compile time of the planner)\n",
        header(d),
        "Llama shapes on the meta device; seconds. `export alone` = `torch.export.export` with the same "
        "dynamic dims (median of the runs interleaved with the plans); `static export` = plain "
        "`torch.export.export` without dims, what a user who calls it pays (issue 15's reference); `traced` = "
        "the layers block capture exports (3 of each kind; the others are stitched in as copies, "
        "`passes/blocks.py`); `capture` = tpfx's export of those layers + the proof and stitching; "
        "`emit/rank` = one rank's `emit_rank`; total/export = (capture + passes + propagate + emit) / export "
        "alone; total/static = the same over static export (auto_shard's planning before weights are "
        "loaded); `plan` = the wall time of `tpfx.plan`. Every model and t is planned "
        f"{len(d['rows'][0].get('plan_samples', [1]))} times; the row is the median plan's, as export's "
        "figures are medians (one run of the same plan varies by +-30% on this box). All plan times: "
        + "; ".join(f"{r['model']} t={r['t']} {r['plan_samples']}" for r in d["rows"] if "plan_samples" in r)
        + ".\n",
        md_table(
            C.PLAN_TIME_COLUMNS,
            rows,
        ),
        "",
    ]
    c = d.get("compile")
    if c and "error" not in c:
        m = c["model"]
        out += [
            f"\n`torch.compile` on {c['world']} ranks (seconds, max over ranks; Llama hidden "
            f"{m['hidden_size']}, {m['num_hidden_layers']} layers, vocab {m['vocab_size']}, batch "
            f"{c['batch'][0]}x{c['batch'][1]}); "
            f"compiled sharded logits vs unsharded: max rel err {c['compiled_rel_err']:.1e}\n",
            md_table(
                ["", "tpfx eager", "tpfx compile=True", "unsharded torch.compile"],
                [
                    [
                        "auto_shard (capture + plan + emit)",
                        f"{c['eager_shard_s']:.2f}",
                        f"{c['compiled_shard_s']:.2f}",
                        "–",
                    ],
                    [
                        "first call (inductor compiles here)",
                        f"{c['eager_first_s']:.2f}",
                        f"{c['compiled_first_s']:.2f}",
                        f"{c['unsharded_compile_first_s']:.2f}",
                    ],
                    [
                        "steady call",
                        f"{c['eager_steady_s']:.4f}",
                        f"{c['compiled_steady_s']:.4f}",
                        f"{c['unsharded_compiled_steady_s']:.4f}",
                    ],
                ],
            ),
            "",
        ]
    elif c:
        out.append(f"\n`torch.compile` part failed: `{c['error']}`\n")
    out += ["\n### Targets\n", fmt_targets(d["targets"]), ""]
    return "\n".join(out)


def section_plan_quality(d: dict[str, Any] | None) -> str:
    if d is None:
        return "## Plan quality\n\nNot run (`python benchmarks/plan_quality.py`).\n"
    abbrev = {
        "all_reduce": "AR",
        "all_gather": "AG",
        "all_gather_into_tensor": "AG",
        "reduce_scatter": "RS",
        "reduce_scatter_tensor": "RS",
    }

    def ran(r: dict[str, Any], part: str) -> str:
        rt = r.get("runtime") or {}
        if "error" in rt:
            return "error"
        if part not in rt:
            return "–"
        return " + ".join(f"{v} {abbrev.get(k, k)}" for k, v in sorted(rt[part]["counts"].items())) or "0"

    rows, failed = [], []
    for r in d["rows"] + ([d["llama_7b"]] if d.get("llama_7b") else []):
        if r["status"] != "ok":
            failed.append(r)
            rows.append([r["family"], r["t"], "–", r["status"]] + ["–"] * 9)
            continue
        others = (
            " + ".join(
                f"{abbrev.get(g['kind'], g['kind'])} {C.fmt_bytes(g['bytes'])}"
                for g in r["outside_layers"]
                if g["kind"] != "all_reduce"
            )
            or "0"
        )
        per = f"{r['per_layer_count_mean']:.2g}"
        if r["per_layer_count_min"] != r["per_layer_count_max"]:
            per += f" ({r['per_layer_count_min']}–{r['per_layer_count_max']})"
        rows.append(
            [
                r["family"],
                r["t"],
                r["layers"],
                per,
                f"{r['per_layer_bytes_ratio']:.2f}",
                f"{r['step_fwd_all_reduce']} ({r['megatron']['fwd_all_reduce']})",
                others,
                f"{r['step_ar_bytes_ratio']:.2f}",
                f"{r['step_bytes_ratio']:.2f}",
                ran(r, "fwd"),
                ran(r, "bwd"),
                f"{r['param_bytes_ratio']:.3f}",
                len(r["fallbacks"]),
            ]
        )
    out = [
        "## Plan quality (communication and memory vs Megatron-LM)\n",
        header(d),
        f"Tiny random-init models (hidden 256, 2 layers, 8 heads / 4 KV heads, vocab 1024), example "
        f"batch {d['batch']}x{d['seq']}, fp32. Megatron: 2 all-reduces of b·s·h per layer (3 in a decoder "
        "layer with cross-attention), 2L + 1 per step (vocab-parallel embedding; +1 per decoder layer and +1 "
        "for the decoder embedding in encoder-decoders). `AR/layer`: forward all-reduces attributed to the "
        "numbered layer whose weights' shard or partial sum they resolve. `other fwd colls`: non-all-reduce collectives outside the layers (the logits "
        "gather; Megatron's parallel cross-entropy has none). `ran fwd/bwd`: collectives that actually "
        "ran in one forward / backward of rank 0's module (fake process group of size t). Params: bytes "
        "per rank ÷ (total / t).\n",
        md_table(
            [
                "family",
                "t",
                "L",
                "AR/layer",
                "bytes/layer ÷ Megatron's",
                "step AR (Megatron)",
                "other fwd colls",
                "AR bytes ÷ Megatron",
                "all bytes ÷ Megatron",
                "ran fwd",
                "ran bwd",
                "params/rank ÷ (total/t)",
                "fallbacks",
            ],
            rows,
        ),
        "",
    ]
    if failed:
        out.append("\nFamilies that failed:\n")
        out += [f"- **{r['family']}** t={r['t']} ({r['status']}): `{r.get('error')}`" for r in failed]
        out.append("")
    notes = [r for r in d["rows"] if r.get("status") == "ok" and (r["fallbacks"] or r["unknown_ops"])]
    if notes:
        out.append("\nFallbacks and ops with no sharding rule (replicated regions):\n")
        for r in notes:
            reasons = sorted({f.get("reason", "") for f in r["fallbacks"]})
            ops = ", ".join(r["unknown_ops"])
            out.append(
                f"- {r['family']} t={r['t']}: {len(r['fallbacks'])} fallbacks"
                + (f" ({'; '.join(x[:120] for x in reasons[:3])})" if reasons else "")
                + (f"; no-rule ops: {ops}" if ops else "")
            )
        out.append("")
    if d.get("heads"):
        out += ["\n### Head counts the world size does not divide, and one key/value head\n",
                "Full-size Llama shapes on the meta device (32 layers, plan only). `q heads/rank`: whole query "
                "heads per rank; `q/o ÷ ideal`: q and o rows on the fullest rank ÷ ceil(heads/t) heads; `k/v ÷ "
                "ideal`: k rows on the fullest rank ÷ the key/value heads its query heads read (key/value heads "
                "held whole on every rank where the query split does not nest in them).\n",
                md_table(["shape", "t", "q heads/rank", "k/v heads/rank", "k/v placement", "q/o ÷ ideal",
                          "k/v ÷ ideal", "AR/layer (Megatron 2)", "gathers/step"],
                         [[h["name"], h["t"], "/".join(map(str, h["q_heads_per_rank"])),
                           "/".join(map(str, h["kv_heads_per_rank"])), f"`{h['kv_placement']}`",
                           f"{h['q_o_vs_ideal']:.3f}", f"{h['kv_vs_ideal']:.3f}", f"{h['per_layer_all_reduce']:.2g}",
                           h["gathers"]] for h in d["heads"]]), ""]
    if d.get("fused"):
        out += ["Fused q|k|v projections (full-size configs, meta device), every part split in whole heads:\n",
                md_table(["model", "t", "fused q|k|v placement", "params on the fullest rank ÷ (total/t)",
                          "AR/layer (Megatron 2)"],
                         [[f["name"], f["t"], f"`{f['fused_placement']}`", f"{f['params_vs_total_over_t']:.3f}",
                           f"{f['per_layer_all_reduce']:.2g}"] for f in d["fused"]]), ""]
    out += ["\n### Targets\n", fmt_targets(d["targets"]), ""]
    return "\n".join(out)


def section_runtime(d: dict[str, Any] | None) -> str:
    if d is None:
        return "## Runtime\n\nNot run (`python benchmarks/runtime.py`).\n"
    measures = {
        "body_fwd": "body fwd",
        "body_step": "body fwd+bwd",
        "full_fwd": "full fwd (logits)",
        "full_step": "full fwd+bwd (loss)",
    }
    out = [
        "## Runtime vs peers\n",
        header(d),
        f"{d['world']} ranks, {d['backend']}, {d['threads_per_rank']} thread per rank, all tools in one run "
        "(interleaved round-robin). ms, median over iterations, max over ranks; `x`: speedup vs the "
        "unsharded model on 1 thread; `hf`: time ÷ HF tp_plan's time. Body = `model.model` (embeddings, "
        "layers, final norm); full = the causal LM. Errors: max relative error of logits / loss / body "
        "output vs the unsharded model.\n",
    ]
    for name, s in d["models"].items():
        cfg = s["config"]
        out.append(
            f"\n### {name}: hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, intermediate "
            f"{cfg['intermediate_size']}, {cfg['num_attention_heads']} heads, vocab {cfg['vocab_size']}, "
            f"batch {s['batch'][0]}x{s['batch'][1]} ({s['iters']} iterations after {s['warmup']} warm-up)\n"
        )
        rows = []
        for tool in ("unsharded", "tpfx", "tpfx-compiled", "hf-tp_plan", "dtensor"):
            if tool in s["skipped"]:
                rows.append([tool] + ["skipped"] * len(measures) + [s["skipped"][tool][:200]])
                continue
            if tool not in s["times"]:
                continue
            cells = []
            for m in measures:
                v = s["times"][tool].get(m, {})
                if "median_s" not in v:
                    cells.append("error" if "error" in v else "–")
                    continue
                r = s["ratios"][tool][m]
                extra = [f"{r['speedup_vs_unsharded']:.2f}x"] if r.get("speedup_vs_unsharded") else []
                if r.get("time_vs_hf") and tool != "hf-tp_plan":
                    extra.append(f"hf {r['time_vs_hf']:.2f}")
                cells.append(
                    f"{v['median_s'] * 1e3:.1f} ({', '.join(extra)})"
                    if extra
                    else f"{v['median_s'] * 1e3:.1f}"
                )
            e = s["errors"].get(tool, {})
            err = (
                ("error: " + e["error"][:200])
                if "error" in e
                else " / ".join(f"{e[k]:.1e}" for k in ("logits", "loss", "body") if k in e)
            )
            rows.append([tool, *cells, err])
        out.append(md_table(["tool", *measures.values(), "max rel err (logits / loss / body)"], rows))
        for tool, why in s["skipped"].items():
            out.append(f"\n- {tool} skipped: `{why}`")
        out.append("")
    out += ["\n### Targets\n", fmt_targets(d["targets"]), ""]
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------- plot


def plot(pt: dict[str, Any] | None, rt: dict[str, Any] | None, gen: dict[str, Any] | None = None) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install -e '.[bench]'): no plot")
        return False
    models = list(rt["models"].items()) if rt else []
    panels = 1 + len(models) + (1 if gen else 0)
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4.5), squeeze=False)
    ax = axes[0][0]
    if pt:
        rows = pt["rows"]
        for t in sorted({r["t"] for r in rows}):
            rs = sorted((r for r in rows if r["t"] == t), key=lambda r: r["params"])
            ax.plot(
                [r["params"] / 1e9 for r in rs], [r["total"] for r in rs], "o-", label=f"tpfx plan, t={t}"
            )
        ex = sorted({(r["params"], r["export"]) for r in rows})
        ax.plot([p / 1e9 for p, _ in ex], [e for _, e in ex], "ks--", label="torch.export alone")
        ax.set_ylim(bottom=0)
        ax.set_xscale("log")
        ax.set_xlabel("model parameters (billions, Llama shapes on meta)")
        ax.set_ylabel("seconds")
        ax.set_title("plan time" + (" (quick)" if pt["quick"] else ""))
        ax.legend()
    else:
        ax.set_title("plan time: not run")
    measures = [
        ("body_fwd", "body fwd"),
        ("body_step", "body fwd+bwd"),
        ("full_fwd", "full fwd"),
        ("full_step", "full fwd+bwd"),
    ]
    for i, (name, s) in enumerate(models, start=1):
        ax = axes[0][i]
        tools = [
            t for t in ("unsharded", "tpfx", "tpfx-compiled", "hf-tp_plan", "dtensor") if t in s["times"]
        ]
        width = 0.8 / max(len(tools), 1)
        for j, tool in enumerate(tools):
            ys = [s["times"][tool].get(m, {}).get("median_s", float("nan")) * 1e3 for m, _ in measures]
            ax.bar([k + j * width for k in range(len(measures))], ys, width, label=tool)
        ax.set_xticks(
            [k + width * (len(tools) - 1) / 2 for k in range(len(measures))], [m for _, m in measures]
        )
        ax.set_ylabel("ms per step (median, max over ranks)")
        cfg = s["config"]
        ax.set_title(
            f"{name}: hidden {cfg['hidden_size']}, {rt['world'] if rt else '?'} ranks "  # type: ignore[index]
            f"{rt['backend'] if rt else ''}" + (" (quick)" if rt and rt["quick"] else "")
        )
        ax.legend(fontsize=8)
    if gen:
        _plot_generate(axes[0][-1], gen)
    fig.tight_layout()
    fig.savefig(OUT_PNG, dpi=110)
    return True


def _plot_generate(ax: Any, gen: dict[str, Any]) -> None:
    cases = [(m, b) for m, rows in gen["results"].items() for b in rows]
    tools = ("unsharded", "tpfx", "tpfx-compiled", "hf-tp_plan")
    width = 0.8 / len(tools)
    for j, tool in enumerate(tools):
        ys = [gen["results"][m][b][tool]["ms_per_token"] for m, b in cases]
        ax.bar([k + j * width for k in range(len(cases))], ys, width, label=tool)
    ax.set_xticks([k + width * (len(tools) - 1) / 2 for k in range(len(cases))],
                  [f"{m}\n{b}" for m, b in cases], fontsize=8)
    ax.set_ylabel("ms per generated token (median)")
    ax.set_title(f"generate: {gen['world']} gloo ranks x 1 thread" + (" (quick)" if gen.get("quick") else ""))
    ax.legend(fontsize=8)


def section_train_2d(d: dict[str, Any] | None) -> str:
    if d is None:
        return "## Training step at dp=2 x tp=2\n\nNot run (`python benchmarks/train_2d.py`).\n"
    cfg, med = d["config"], d["median_s"]
    noise = d.get("noise", {})
    rows = [[name, C.fmt_ms(s), f"±{noise[name]:.0%}" if name in noise else "–", f"{d['params_local'][name]:,}"]
            for name, s in med.items()]
    return "\n".join([
        "## Training step at dp=2 x tp=2 (FSDP2 over dp)\n",
        header(d),
        f"Llama hidden {cfg['hidden_size']}, {d['layers']} layers, vocab {cfg['vocab_size']}, batch "
        f"{d['batch'][0]}x{d['batch'][1]} per dp group; 4 gloo ranks, 1 thread each; one step = forward with "
        "labels, backward, clipping at 1.0, AdamW; ms, median of "
        f"{d['iters']} steps, max over ranks. `tpfx+fsdp2`: `auto_shard(mesh=..., tp_axis='tp')` then one "
        "`fully_shard` over dp. `torch-recipe`: torchtitan's `parallelize_module` Megatron plan over tp, then "
        "`fully_shard` per decoder layer and at the root; `torch-recipe-root`: the same with one root `fully_shard`, "
        "as tpfx is wrapped (on gloo the number of collectives dominates: the target is judged against the faster "
        "torch variant, and \"not resolved\" where the ratio is within the tools' combined noise, half the IQR "
        "of the timed steps over their median, of the bar). Losses agree to rel "
        f"{d['loss_rel_err']:.1e}. The torch recipe all-gathers per layer (on GPUs that overlaps with compute "
        "and bounds the unsharded parameters to one layer); tpfx's one FSDP2 group all-gathers every parameter "
        "before the step, so its peak parameter memory is the tp-sharded model's, not one layer's.\n",
        md_table(["tool", "step ms", "noise", "parameters / rank"], rows),
        "\n### Targets\n", fmt_targets(d["targets"]), ""])


def section_finetune(d: dict[str, Any] | None) -> str:
    if d is None:
        return "## Fine-tuning recipes\n\nNot run (`python benchmarks/finetune.py`).\n"
    cfg, step, saved = d["config"], d["step_s"], d["saved_bytes"]
    recipes = ["plain", "checkpointed", "lora"]
    rows = []
    for r in recipes:
        row = [r]
        for tool in ("tpfx", "hf-tp_plan"):
            k = f"{tool}/{r}"
            row += [C.fmt_ms(step.get(k)), C.fmt_bytes(saved.get(k))] if k in step else ["skipped", "-"]
        rows.append(row)
    skipped = "".join(f"\n- `{k}` skipped: {why[:160]}" for k, why in d["skipped"].items())
    errs = [v for v in d["loss_err"].values() if v == v]
    return "\n".join([
        "## Fine-tuning recipes at t=2\n",
        header(d),
        f"Llama hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, vocab {cfg['vocab_size']}, batch "
        f"{d['batch'][0]}x{d['batch'][1]}; {d['world']} ranks, 1 thread each. One step = forward with labels, "
        f"backward, AdamW on the trainable parameters; ms, median of {d['iters']} steps, max over ranks. Saved: "
        "bytes autograd keeps for backward per rank over one forward (parameters excluded). `checkpointed`: "
        "`gradient_checkpointing_enable()` before sharding; `lora`: peft LoRA r=8 on every projection "
        "(tpfx: `from_pretrained(adapter=...)`; HF: `get_peft_model` on the `tp_plan` model). First losses "
        f"against the unsharded model's, rel {max(errs):.1e} at most. One run, no verdicts.\n",
        md_table(["recipe", "tpfx step ms", "tpfx saved", "HF tp_plan step ms", "HF tp_plan saved"], rows),
        skipped, ""])


def section_sequence_parallel(d: dict[str, Any] | None) -> str:
    if d is None:
        return "## Sequence parallelism\n\nNot run (`python benchmarks/sequence_parallel.py`).\n"
    cfg, mem, med, r = d["config"], d["memory"], d["median_s"], d["ratios"]
    rows = [[n, C.fmt_bytes(m["between_layers"]), C.fmt_bytes(m["live"]), C.fmt_bytes(m["saved"]), C.fmt_ms(med[n])]
            for n, m in mem.items()]
    rows.append(["ratio", f"{r['between_layers']:.3f}", f"{r['live']:.3f}", f"{r['saved']:.3f}", f"{r['step']:.3f}"])
    return "\n".join([
        "## Sequence parallelism (activation memory per rank)\n",
        header(d),
        f"Llama hidden {cfg['hidden_size']}, {d['layers']} layers, batch {d['batch'][0]}x{d['batch'][1]}, "
        f"t={d['world']} gloo ranks, 1 thread each; `auto_shard(..., sequence_parallel=True)` against plain "
        "`auto_shard`; max over ranks; losses agree to rel "
        f"{d['loss_rel_err']:.1e}. *Between layers*: what a decoder layer hands to the next (the residual "
        "stream), measured by running the emitted per-rank graph node by node. *All live*: everything held at a "
        "layer boundary, with the causal mask `(B, 1, S, S)` and the rotary tables, which no layer produces and "
        "both tools hold whole. *Saved for backward*: what autograd keeps from one training forward (parameters "
        "excluded); with sequence parallelism the gathered inputs of the column-split matmuls are kept as this "
        "rank's chunk and re-gathered in backward (as Megatron-SP does); attention's head-split internals and the "
        "MLP's column-split intermediates are the same size in both tools, so this falls less than 1/t. Step = "
        "forward, backward, AdamW, median ms, one run each on a noisy 2-core box.\n",
        md_table(["tool", "between layers", "all live", "saved for backward", "step ms"], rows),
        "\n### Targets\n", fmt_targets(d["targets"]), ""])


def section_checkpoint(d: dict[str, Any] | None) -> str:
    if d is None:
        return "## Checkpoints\n\nNot run (`python benchmarks/checkpoint.py`).\n"
    cfg, tools = d["config"], d["tools"]

    def cell(r: dict[str, Any], k: str) -> str:
        if k not in r:
            return "–"
        return C.fmt_bytes(r[k]) if "growth" in k or k in ("hwm", "local_bytes") else f"{r[k]:.2f}"

    keys = [("load_s", "load s"), ("peak_growth", "peak growth / rank"), ("hwm", "process VmHWM"),
            ("local_bytes", "weights held / rank"), ("save_pretrained_s", "save_pretrained s"),
            ("save_peak_growth", "save_pretrained peak growth (rank 0)"), ("dcp_save_s", "tpfx.save (DCP) s")]
    rows = [[name] + [cell(r, k) for k, _ in keys] for name, r in tools.items()]
    return "\n".join([
        "## Checkpoints (load memory per rank)\n",
        header(d),
        f"Llama hidden {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers, MLP {cfg['intermediate_size']}, "
        f"vocab {cfg['vocab_size']}: {C.fmt_bytes(d['model_bytes'])} fp32 (largest tensor "
        f"{C.fmt_bytes(d['largest_tensor'])}), t={d['world']} gloo ranks; max over ranks. Peak growth = the "
        "kernel's VmHWM after loading and reading every weight once, minus VmRSS before loading (measured after "
        "a warm-up on a tiny model). `load s` runs until every weight has been read once; tpfx's includes "
        "capturing and planning the model (torch.export on the meta device, about 1-2 s here: see Plan time), "
        "which transformers does not do, so tpfx loads slower than HF tp_plan while holding less memory.\n",
        md_table(["tool"] + [h for _, h in keys], rows),
        "\n### Targets\n", fmt_targets(d["targets"]), ""])


def section_generate(d: dict[str, Any] | None, prefix: dict[str, Any] | None = None,
                     lim: dict[str, Any] | None = None) -> str:
    if d is None:
        return "## Generation\n\nNot run (`python benchmarks/generate.py`).\n"
    rows = []
    for model, by_batch in d["results"].items():
        cfg = d["models"][model]
        for batch, row in by_batch.items():
            equal = row.get("tokens_equal_unsharded", {})
            for tool in ("unsharded", "tpfx", "tpfx-compiled", "hf-tp_plan"):
                r = row[tool]
                rows.append([f"{model} (h {cfg['hidden_size']}, {cfg['num_hidden_layers']} layers)", batch, tool,
                             f"{1000 * r['ttft_s']:.1f}", f"{r['ms_per_token']:.2f}",
                             f"{row['hf-tp_plan']['ms_per_token'] / r['ms_per_token']:.2f}x",
                             "–" if tool == "unsharded" else ("yes" if equal.get(tool) else "NO")])
    return "\n".join([
        "## Generation (time to first token, ms per token)\n",
        header(d),
        f"Llama, vocab 32000, greedy, prompt {d['prompt']}, {d['new_tokens']} new tokens; t={d['world']} gloo "
        "ranks x 1 thread (unsharded: 1 process, 1 thread); all tools in the same two processes, interleaved, "
        f"median of {d['repeats']} repeats. TTFT = `generate(max_new_tokens=1)`; ms/token = (time of all new "
        "tokens - TTFT) / (new tokens - 1). Capture and compilation are in a warm-up.\n",
        md_table(["model", "batch", "tool", "TTFT ms", "ms / token", "HF tp_plan / tool (per token)",
                  "tokens = unsharded"], rows),
        "\n### Targets\n", fmt_targets(d["targets"] + (prefix["targets"] if prefix else [])),
        _prefix_text(prefix), _limits_generate(d, lim), ""])


def _batch_size(key: str) -> int:
    return int(key.split()[-1])  # "batch 8"


def _limits_generate(d: dict[str, Any], lim: dict[str, Any] | None) -> str:
    """"What limits decode here", every figure from generate.json and decode_limits.json."""
    name = max(d["models"], key=lambda m: d["models"][m]["hidden_size"])
    big, layers = d["results"][name], d["models"][name]["num_hidden_layers"]
    per_step = 2 * layers + 2  # 2 all-reduces per layer, the embedding's all-reduce, the logits' all-gather
    lo, hi = (min(big, key=_batch_size), max(big, key=_batch_size))
    ttft = big[hi]["unsharded"]["ttft_s"] / big[hi]["tpfx"]["ttft_s"]
    n_lo, n_hi = _batch_size(lo), _batch_size(hi)

    def vs_hf(tool: str) -> str:
        rs = [row[tool]["ms_per_token"] / row["hf-tp_plan"]["ms_per_token"] for by in d["results"].values()
              for row in by.values()]
        return f"{min(rs):.2f}-{max(rs):.2f}x"

    out = ["### What decode costs here\n",
           "From the table above and `benchmarks/decode_limits.py` (decode_limits.json); the collective count is "
           "the plan's, the times are measured:",
           f"- **Collectives.** A decode step has {per_step} collectives at any width ({name}: 2 all-reduces "
           f"per layer for {layers} layers, the vocab-parallel embedding's all-reduce and the logits' all-gather); "
           "HF tp_plan has as many."]
    if lim:
        step_ms = (per_step - 1) * lim["all_reduce_ms"] + lim["all_gather_ms"]
        out += [f"  - On 2 gloo ranks with nothing else running, one all-reduce of a batch-8 activation takes "
                f"{lim['all_reduce_ms']:.2f} ms and the logits' all-gather {lim['all_gather_ms']:.2f} ms (medians of "
                f"{lim['iters']}): "
                f"{step_ms:.1f} ms per token, against the unsharded model's whole token at batch {n_hi}: "
                f"{big[hi]['unsharded']['ms_per_token']:.1f} ms (at batch {n_lo}: "
                f"{big[lo]['unsharded']['ms_per_token']:.1f} ms). Inside `generate` the collectives share the 2 "
                "cores with the compute, so they may take longer than here.",
                f"- **Memory bandwidth.** Decode reads every weight once per token. One core streams a "
                f"{lim['matrix_mb']:.0f} MB matrix-vector product at {lim['alone_gbs']:.1f} GB/s alone and at "
                f"{lim['both_gbs']:.1f} GB/s each when both cores do it at once, so halving the weights per rank "
                f"buys at most {2 * lim['both_gbs'] / lim['alone_gbs']:.1f}x before any communication."]
    else:
        out += ["  - Collective latency and bandwidth: not measured (`python benchmarks/decode_limits.py`)."]
    out += [f"- Prefill is compute-bound, and there TP pays: TTFT at batch {n_hi} is {ttft:.2f}x faster than "
            "unsharded.",
            f"- Per token, tpfx eager is {vs_hf('tpfx')} HF tp_plan's time and compiled {vs_hf('tpfx-compiled')} "
            "(tool / HF over every model and batch).\n"]
    return "\n".join(out)


def _prefix_text(prefix: dict[str, Any] | None) -> str:
    if prefix is None:
        return "Per-token cost vs prompt length: not run (`python benchmarks/generate.py --prefix`).\n"
    rows = [[p, f"{prefix['results'][str(p)]['tpfx']:.2f}", f"{prefix['results'][str(p)]['unsharded']:.2f}"]
            for p in prefix["prefixes"]]
    return "\n".join([
        "\n### Per-token cost vs prompt length\n",
        header(prefix),
        f"hidden-1024, batch 1, {prefix['new_tokens']} new tokens, ms per token (median of {prefix['repeats']}). "
        "Growth from the short to the long prompt: tpfx "
        f"{prefix['growth']['tpfx']:.2f}x, unsharded {prefix['growth']['unsharded']:.2f}x (attention reading a "
        "longer cache, and the cache concatenation both share).\n",
        md_table(["prompt", "tpfx ms / token", "unsharded ms / token"], rows), ""])


def _ci(r: dict[str, Any]) -> str:
    return f"{r['ratio_ci'][0]:.3f}-{r['ratio_ci'][1]:.3f}" if "ratio_ci" in r else "not measured"


def section_call_check(d: dict[str, Any] | None) -> str:
    if d is None:
        return "## Per-call agreement check\n\nNot run (`python benchmarks/call_check.py`).\n"
    rows = [[r["model"], f"{r['batch'][0]}x{r['batch'][1]}", r["what"], C.fmt_ms(r["on_s"]), C.fmt_ms(r["off_s"]),
             f"{r['cost_ms']:+.2f}", f"{r['ratio']:.3f}x", _ci(r), f"{r['noise_ms']:.2f}"] for r in d["rows"]]
    return "\n".join([
        "## Per-call agreement check (what `check_calls` costs)\n",
        header(d),
        "Llama models on 2 ranks (gloo, 1 thread each, on this machine); the same `auto_shard` module with "
        "`check_calls` on and off, interleaved in an order that rotates every iteration, a barrier before each "
        "call; ms, median of "
        f"{d['iters']} calls (a call's time: its slowest rank's). `cost` = median over iterations of the checked "
        "minus the unchecked call of one iteration (back to back), `ratio` = 1 + cost / unchecked; `noise` = the "
        "same median between two checked calls; `95% interval`: the bootstrap interval of the median ratio, which "
        "the verdict is judged on (\"not resolved\" when the bar lies inside it). "
        "The check all-reduces two integers per call, issued when the call starts and settled before the "
        "forward's first collective (tpfx/agreement.py).\n",
        md_table(["model", "batch", "call", "with check ms", "without ms", "cost ms", "ratio", "95% interval",
                  "noise ms"], rows),
        "\n### Targets\n", fmt_targets(d["targets"]), ""])


def section_blocks_check(d: dict[str, Any] | None) -> str:
    if d is None:
        return "## Block capture, every family\n\nNot run (`python benchmarks/blocks_check.py --numerics`).\n"
    fams = d["families"]
    odd = [[f, r.get("fallback") or r.get("numerics_error") or r.get("harness_error") or r.get("capture_error")
            or f"{r['diffs']} nodes differ"] for f, r in sorted(fams.items())
           if "diffs" not in r or r["diffs"] or r.get("logits_err", 0.0) > 1e-5 or "numerics_error" in r]
    errs = [r["logits_err"] for r in fams.values() if "logits_err" in r]
    return "\n".join([
        "## Block capture, every family (issue 15's \"nothing else changes\")\n",
        header(d),
        "Commands, merged: " + ", ".join(f"`{c}`" for c in d["commands"]) + "\n",
        f"Every causal-LM family's tiny model with {d['layers']} layers, captured whole and through block capture; "
        "where block capture stitches, the two graphs compared node by node (op, name, target, arguments, module "
        "path, shape)" + (", and the stitched plan run at t=2 on simulated ranks against the unsharded logits"
                          if d["numerics"] else "") + ".\n",
        f"**{d['summary']}**" + (f"; logits error {min(errs):.1e} .. {max(errs):.1e}" if errs else "") + ".\n",
        "Stitched families whose graph serves its example shapes alone (a kind's template read its own index; "
        "results before the replay proof list the kinds whose layers were run one by one instead): "
        + (", ".join(f"{f} ({r['op_logged']} of {r['kinds']})" if "op_logged" in r else f
                     for f, r in sorted(fams.items()) if "diffs" in r and (r.get("op_logged") or r.get("per_shape")))
           or "none") + ".\n",
        "Families captured whole or not built, and why:\n",
        md_table(["family", "reason"], odd), ""])


def section_inprocess(d: dict[str, Any] | None) -> str:
    if d is None:
        return "## One process, several devices\n\nNot run (`python benchmarks/inprocess.py`).\n"
    rows = [[name, f"{r['step_s'] * 1e3:.1f}", f"{r['ms_per_token']:.2f}"] for name, r in d["rows"].items()]
    shape = d["shape"]
    gil = d["threads_over_processes"]
    return "\n".join([
        "## One process, several devices (`devices=`)\n",
        header(d),
        f"Llama, hidden {shape['hidden_size']}, {shape['num_hidden_layers']} layers, vocab {shape['vocab_size']}; "
        f"training step = forward with labels, backward, AdamW on batch {d['batch']} x {d['seq']}; generate = "
        f"greedy, batch 1, prompt {d['prompt']}, ms/token = (time of {d['new_tokens']} new tokens - time of 1) / "
        f"{d['new_tokens'] - 1}; medians of {d['repeats']} repeats. The threads (`auto_shard(model, devices=['cpu'] "
        f"* {d['world']})`, 1 intra-op thread per rank) and the unsharded model run one after the other in one "
        f"process; the gloo ranks ({d['world']} processes x 1 thread) in their own run.\n",
        md_table(["run", "step ms", "generate ms / token"], rows),
        f"\nThreads / processes: step {gil['step_s']:.2f}x, generate {gil['ms_per_token']:.2f}x. What threads of one "
        "Python process add is the GIL over the per-op Python work, a rendezvous of threads per collective and a "
        "hand-off per call; what they save is gloo's loopback TCP (their collectives are tensor copies). A ratio "
        "below 1 says the saving is the larger here. One run of each: a few percent is within this machine's "
        "noise.\n"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="prefer the *_quick.json results")
    args = ap.parse_args()
    data = {n: load(n, args.quick) for n in NAMES}
    commands = [d["command"] for d in data.values() if d]
    now = datetime.datetime.now().astimezone().isoformat(timespec="seconds")
    parts = [
        "# tpfx benchmark results\n",
        f"Generated {now} by `{C.command_line()}` from `benchmarks/results/*.json`. "
        "Each section names the machine and the date of its own run. Targets are reported as measured.\n",
        "Commands:\n\n```bash\n" + "\n".join([*commands, C.command_line()]) + "\n```\n",
        "![plan time and step time](results.png)\n",
        section_plan_time(data["plan_time"]),
        section_plan_quality(data["plan_quality"]),
        section_runtime(data["runtime"]),
        section_train_2d(data["train_2d"]),
        section_finetune(data["finetune"]),
        section_sequence_parallel(data["sequence_parallel"]),
        section_checkpoint(data["checkpoint"]),
        section_generate(data["generate"], data["generate_prefix"], data["decode_limits"]),
        section_call_check(data["call_check"]),
        section_blocks_check(data["blocks_check"]),
        section_inprocess(data["inprocess"]),
    ]
    OUT_MD.write_text("\n".join(parts))
    plotted = plot(data["plan_time"], data["runtime"], data["generate"])
    print(f"wrote {OUT_MD.relative_to(C.ROOT)}" + (f" and {OUT_PNG.relative_to(C.ROOT)}" if plotted else ""))


if __name__ == "__main__":
    main()
