"""Family coverage table: every transformers causal-LM family with a ``base_model_tp_plan``, sharded on gloo
ranks by ``tpfx.testing.coverage`` and compared with the unsharded model.

    python benchmarks/coverage.py [--world 2] [--families a,b]      # run the sweep (~15-20 min on 2 cores)
    python benchmarks/coverage.py --from-json results/coverage_t2.json   # only render the table
    python benchmarks/coverage.py --families a,b --merge   # re-run some families, keep the other rows
    python benchmarks/coverage.py --sequence-parallel      # the same sweep with Megatron sequence parallelism

Writes ``benchmarks/results/coverage_t{world}[_sp].json`` and ``benchmarks/COVERAGE.md`` (every run). Columns:
errors vs unsharded (logits, loss, gradients; fp32 relative), forward all-reduces per layer vs Megatron's 2 (the
step count minus the vocab-parallel embedding's 1, over the layer count; with sequence parallelism:
reduce-scatters and all-gathers per layer vs Megatron-SP's 2 each, and all-reduces left), all-gathers, parameter
bytes per rank over total/t, HF ``base_model_tp_plan`` colwise/rowwise entries agreeing, and the fallbacks'
reasons.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def run(world: int, families: list[str], save: Any = None, chunk: int = 10,
        sequence_parallel: bool = False) -> list[dict[str, Any]]:
    """Every family on ``world`` gloo ranks, ``chunk`` per launch (bounds one process's memory); ``save(rows)``
    after each chunk with the families not reached yet marked ``not-run``, so a stopped sweep keeps its rows."""
    import tpfx
    from tpfx.testing.coverage import combine_ranks, run_families

    out: list[dict[str, Any]] = []
    for i in range(0, len(families), chunk):
        out += combine_ranks(tpfx.launch(run_families, world, families[i:i + chunk], sequence_parallel,
                                         timeout_s=3000))
        print(f"{len(out)}/{len(families)} families", flush=True)
        if save is not None:
            save(out + [{"family": f, "world": world, "status": "not-run",
                         "error": "the sweep was stopped before this family"} for f in families[len(out):]])
    return out


def _per_layer(r: dict[str, Any], kind: str, outside: int) -> float:
    return (r.get(kind, 0) - outside) / r["layers"] if r.get("layers") else float("nan")


def render(results: list[dict[str, Any]], world: int, sp: bool = False) -> str:
    from tpfx.testing.coverage import tolerance

    ok = [r for r in results if r["status"] == "ok"]
    stopped = [r for r in results if r["status"] == "not-run"]
    exact = [r for r in ok if max(r["logits"], r["loss"], r["grad"]) <= tolerance(r)]
    strict = [r for r in ok if max(r["logits"], r["loss"], r["grad"]) <= 1e-5]
    megatron = [r for r in ok if r.get("layers") and r["all_reduce"] == 1 + 2 * r["layers"]]
    if sp:  # Megatron-SP: 2 reduce-scatters and 2 all-gathers per layer; outside them a reduce-scatter after the
        # embedding, an all-gather before the LM head and the logits' gather (outputs are gathered); no all-reduce
        megatron = [r for r in ok if r.get("layers") and r.get("reduce_scatter") == 1 + 2 * r["layers"]
                    and r["all_gather"] == 2 + 2 * r["layers"] and r["all_reduce"] == 0]
    agree = sum(len(r["hf_agree"]) for r in ok)
    differ = sum(len(r["hf_differ"]) for r in ok)
    title = f"# Family coverage at t={world}" + (" with sequence parallelism" if sp else "")
    reference = ("Megatron-SP's 1 + 2L reduce-scatters and 2 + 2L all-gathers, no all-reduce" if sp
                 else "Megatron's 1 + 2L forward all-reduces")
    lines = [title, "",
             f"{len(results)} families enumerated from transformers; {len(ok)} sharded, {len(exact)} of them equal "
             f"to the unsharded model (forward, loss and every gradient within fp32 relative error 1e-5, or within "
             f"twice the family's own fp32-vs-fp64 rounding where that is larger: {len(strict)} within 1e-5 "
             f"itself); {len(megatron)} with exactly {reference}; "
             f"{len(results) - len(ok) - len(stopped)} not run (reason below)"
             + (f"; {len(stopped)} not reached (the sweep was stopped)" if stopped else "")
             + f". HF `base_model_tp_plan` colwise/rowwise entries: {agree} agree, {differ} differ.", "",
             "| family | logits | loss | grad | fp32 floor | "
             + ("reduce-scatter / layer (2) | all-gather / layer (2) | all-reduce " if sp
                else "all-reduce / layer (Megatron 2) | all-gather ")
             + "| params / (total/t) | HF colwise/rowwise agree | fallbacks |",
             "|---|---|---|---|---|---|---|---|---|---|" + ("---|" if sp else "")]
    for r in results:
        if r["status"] != "ok":
            error = " ".join(r["error"].split())[:100].replace("|", "/")  # one table row: no newlines
            lines.append(f"| {r['family']} | {r['status']}: {error} | | | | | | | | |"
                         + (" |" if sp else ""))
            continue
        counts = (f"{_per_layer(r, 'reduce_scatter', 1):.1f} | {_per_layer(r, 'all_gather', 2):.1f} | {r['all_reduce']}"
                  if sp else f"{_per_layer(r, 'all_reduce', 1):.1f} | {r['all_gather']}")
        fb = "; ".join(sorted({f["reason"].split(": ", 2)[-1][:60] for f in r["fallbacks"]}))[:160]
        hf = f"{len(r['hf_agree'])}/{len(r['hf_agree']) + len(r['hf_differ'])}"
        lines.append(f"| {r['family']} | {r['logits']:.1e} | {r['loss']:.1e} | {r['grad']:.1e} "
                     f"| {r.get('fp32_floor', 0.0):.1e} | {counts} "
                     f"| {r['param_ratio'] * world:.2f} | {hf} | {fb.replace('|', '/')} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--families", default=None)
    ap.add_argument("--from-json", default=None)
    ap.add_argument("--merge", action="store_true", help="re-run --families and replace their rows in the JSON")
    ap.add_argument("--chunk", type=int, default=10, help="families per launch of the ranks")
    ap.add_argument("--sequence-parallel", action="store_true", help="shard with sequence_parallel=True")
    args = ap.parse_args()
    if args.from_json:
        results = json.loads(Path(args.from_json).read_text())
    else:
        from tpfx.testing.families import causal_lm_families

        fams = args.families.split(",") if args.families else causal_lm_families()
        out = HERE / "results" / f"coverage_t{args.world}{'_sp' if args.sequence_parallel else ''}.json"
        out.parent.mkdir(exist_ok=True)
        old = json.loads(out.read_text()) if args.merge else []

        def save(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
            if args.merge:  # replace the re-run families' rows, keep the others (new families appended)
                fresh = {r["family"]: r for r in rows if r["status"] != "not-run"}
                rows = [fresh.pop(r["family"], r) for r in old] + list(fresh.values())
            out.write_text(json.dumps(rows, indent=1, default=str))
            return rows

        t0 = time.time()
        results = save(run(args.world, fams, save, args.chunk, args.sequence_parallel))
        print(f"{time.time() - t0:.0f} s")
    # COVERAGE.md holds every run that has results: smallest world size first, plain TP before SP
    runs = sorted((_run_key(p), p) for p in HERE.glob("results/coverage_t*.json"))
    (HERE / "COVERAGE.md").write_text("\n".join(render(json.loads(p.read_text()), *key) for key, p in runs))
    print(render(results, args.world, args.sequence_parallel))


def _run_key(path: Path) -> tuple[int, bool]:
    """``coverage_t4_sp.json`` -> (4, True)."""
    world, _, sp = path.stem.split("_t")[1].partition("_")
    return int(world), sp == "sp"


if __name__ == "__main__":
    main()
