"""Family coverage table: every transformers causal-LM family with a ``base_model_tp_plan``, sharded on gloo
ranks by ``tpfx.coverage`` and compared with the unsharded model.

    python benchmarks/coverage.py [--world 2] [--families a,b]      # run the sweep (~15-20 min on 2 cores)
    python benchmarks/coverage.py --from-json results/coverage_t2.json   # only render the table
    python benchmarks/coverage.py --families a,b --merge   # re-run some families, keep the other rows

Writes ``benchmarks/results/coverage_t{world}.json`` and ``benchmarks/COVERAGE.md`` (every world size run). Columns: errors vs
unsharded (logits, loss, gradients; fp32 relative), forward all-reduces per layer vs Megatron's 2 (the step
count minus the vocab-parallel embedding's 1, over the layer count), all-gathers, parameter bytes per rank over
total/t, HF ``base_model_tp_plan`` colwise/rowwise entries agreeing, and the fallbacks' reasons.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def run(world: int, families: list[str]) -> list[dict[str, Any]]:
    import tpfx
    from tpfx.coverage import run_families

    out: list[dict[str, Any]] = []
    for i in range(0, len(families), 10):  # chunks bound one process's memory
        out += tpfx.launch(run_families, world, families[i:i + 10], timeout_s=3000)[0]
        print(f"{len(out)}/{len(families)} families", flush=True)
    return out


def render(results: list[dict[str, Any]], world: int) -> str:
    from tpfx.coverage import tolerance

    ok = [r for r in results if r["status"] == "ok"]
    exact = [r for r in ok if max(r["logits"], r["loss"], r["grad"]) <= tolerance(r)]
    strict = [r for r in ok if max(r["logits"], r["loss"], r["grad"]) <= 1e-5]
    megatron = [r for r in ok if r.get("layers") and r["all_reduce"] == 1 + 2 * r["layers"]]
    agree = sum(len(r["hf_agree"]) for r in ok)
    differ = sum(len(r["hf_differ"]) for r in ok)
    lines = [f"# Family coverage at t={world}", "",
             f"{len(results)} families enumerated from transformers; {len(ok)} sharded, {len(exact)} of them equal "
             f"to the unsharded model (forward, loss and every gradient within fp32 relative error 1e-5, or within "
             f"twice the family's own fp32-vs-fp64 rounding where that is larger: {len(strict)} within 1e-5 "
             f"itself); {len(megatron)} with exactly Megatron's 1 + 2L forward all-reduces; "
             f"{len(results) - len(ok)} not run (reason below). HF `base_model_tp_plan` colwise/rowwise entries: "
             f"{agree} agree, {differ} differ.", "",
             "| family | logits | loss | grad | fp32 floor | all-reduce / layer (Megatron 2) | all-gather "
             "| params / (total/t) | HF colwise/rowwise agree | fallbacks |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if r["status"] != "ok":
            lines.append(f"| {r['family']} | {r['status']}: {r['error'][:100].replace('|', '/')} | | | | | | | | |")
            continue
        per_layer = (r["all_reduce"] - 1) / r["layers"] if r.get("layers") else float("nan")
        fb = "; ".join(sorted({f["reason"].split(": ", 2)[-1][:60] for f in r["fallbacks"]}))[:160]
        hf = f"{len(r['hf_agree'])}/{len(r['hf_agree']) + len(r['hf_differ'])}"
        lines.append(f"| {r['family']} | {r['logits']:.1e} | {r['loss']:.1e} | {r['grad']:.1e} "
                     f"| {r.get('fp32_floor', 0.0):.1e} | {per_layer:.1f} | {r['all_gather']} "
                     f"| {r['param_ratio'] * world:.2f} | {hf} | {fb.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--families", default=None)
    ap.add_argument("--from-json", default=None)
    ap.add_argument("--merge", action="store_true", help="re-run --families and replace their rows in the JSON")
    args = ap.parse_args()
    if args.from_json:
        results = json.loads(Path(args.from_json).read_text())
    else:
        from tpfx.families import causal_lm_families

        fams = args.families.split(",") if args.families else causal_lm_families()
        t0 = time.time()
        results = run(args.world, fams)
        print(f"{time.time() - t0:.0f} s")
        if args.merge:
            fresh = {r["family"]: r for r in results}
            old = json.loads((HERE / "results" / f"coverage_t{args.world}.json").read_text())
            results = [fresh.get(r["family"], r) for r in old]
    out = HERE / "results" / f"coverage_t{args.world}.json"
    out.parent.mkdir(exist_ok=True)
    if not args.from_json:
        out.write_text(json.dumps(results, indent=1, default=str))
    # COVERAGE.md holds every world size that has results, smallest first
    runs = sorted(HERE.glob("results/coverage_t*.json"), key=lambda p: int(p.stem.split("_t")[1]))
    (HERE / "COVERAGE.md").write_text("\n".join(
        render(json.loads(p.read_text()), int(p.stem.split("_t")[1])) for p in runs))
    print(render(results, args.world))


if __name__ == "__main__":
    main()
