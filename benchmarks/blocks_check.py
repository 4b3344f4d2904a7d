"""Block capture against whole capture, every causal-LM family: the stitched graph must be the whole one.

For every family of ``tpfx.testing.families.causal_lm_families()``: its tiny random-init model with 10 layers (per-layer
config lists such as ``layer_types`` repeated to 10, so a hybrid's kinds each have 3 traced layers before some of
their layers stand in), captured whole (``passes.capture.capture``) and through
block capture (``passes.blocks.capture_blocks``). Where block capture stitches, every node is compared (op,
name, target, arguments by name, module path, shape): ``diffs`` counts the nodes that differ (goal 0). Where it
falls back, the reason is recorded; where the harness cannot build the model, the error. ``per_shape`` marks a
stitched graph that serves its example shapes alone (a kind's template read its own index or a state that
differs between its layers: ``blocks._replay``).

With ``--numerics``, every stitched family is also planned through block capture at t=2 (``tpfx.plan``), its two
ranks' graphs run on simulated ranks in one process (``tests/simulate.py``: the real emitted code, collectives
swapped for an exchange between threads), and the logits compared with the unsharded model's (``logits_err``,
fp32 relative; bar 1e-5): the deep models the coverage sweep's 2-layer ones do not reach.

    python benchmarks/blocks_check.py [--families a,b] [--layers 10] [--numerics] [--part K/N | --join N]

Writes ``benchmarks/results/blocks_check.json`` (after every family) and prints the counts.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path
from typing import Any

import _common as C
import torch

HERE = Path(__file__).resolve().parent


def build(family: str, layers: int) -> torch.nn.Module:
    """The family's tiny model with ``layers`` layers (its per-layer config lists repeated to that length)."""
    from tpfx.testing.families import LAYER_COUNTS, tiny_causal_lm

    tiny = tiny_causal_lm(family)
    key = next((k for k in LAYER_COUNTS if isinstance(getattr(tiny.config, k, None), int)), None)
    if key is None:
        return tiny
    n = getattr(tiny.config, key)
    lists = {k: list(v) for k, v in vars(tiny.config).items() if isinstance(v, list | tuple) and len(v) == n > 1}
    return tiny_causal_lm(family, **{key: layers, **{k: (v * layers)[:layers] for k, v in lists.items()}})


def numerics(model: torch.nn.Module, kwargs: dict[str, Any]) -> float:
    """Max relative error of the logits of 2 simulated ranks against the unsharded model's."""
    import sys

    sys.path.insert(0, str(HERE.parent / "tests"))
    from simulate import emit_all, run_ranks

    import tpfx

    model.eval()
    plan = tpfx.plan(model, 2, example_kwargs=kwargs, blocks=True)
    with torch.no_grad():
        ref = model(**kwargs).logits
    ranks = emit_all(plan)
    outs = run_ranks(2, lambda r: ranks[r][0](**kwargs).logits.detach())
    return max(float((o - ref).abs().max() / ref.abs().max()) for o in outs)


def check(family: str, layers: int, with_numerics: bool = False) -> dict[str, Any]:
    from tpfx.passes import blocks
    from tpfx.passes import capture as whole

    t0 = time.perf_counter()
    try:
        model = build(family, layers)
    except Exception as e:  # noqa: BLE001 - the harness could not build it: recorded, not a verdict
        return {"harness_error": f"{type(e).__name__}: {str(e)[:160]}"}
    kwargs = {"input_ids": torch.randint(0, 50, (2, 8), generator=torch.Generator().manual_seed(0)),
              "use_cache": False}
    try:
        full = whole.capture(model, (), kwargs)
    except Exception as e:  # noqa: BLE001 - a model tpfx cannot capture at all
        return {"capture_error": f"{type(e).__name__}: {str(e)[:160]}"}
    got = blocks.capture_blocks(model, (), kwargs)
    if isinstance(got, str):
        return {"fallback": got, "s": round(time.perf_counter() - t0, 1)}
    a, b = blocks.graph_rows(full.gm), blocks.graph_rows(got.gm)
    diffs = sum(x != y for x, y in zip(a, b, strict=False)) + abs(len(a) - len(b))
    found = blocks.find_stack(model)
    kinds = 0 if isinstance(found, str) else len(found.templates)
    out: dict[str, Any] = {"nodes": len(a), "diffs": diffs, "kinds": kinds, "per_shape": not got.dynamic}
    if with_numerics:
        try:
            out["logits_err"] = numerics(model, kwargs)
        except Exception as e:  # noqa: BLE001 - recorded: a sharding failure is a finding, not a harness error
            out["numerics_error"] = f"{type(e).__name__}: {str(e)[:160]}"
    return {**out, "s": round(time.perf_counter() - t0, 1)}


def main() -> None:
    from tpfx.testing.families import causal_lm_families

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", default=None)
    ap.add_argument("--layers", type=int, default=10)
    ap.add_argument("--numerics", action="store_true", help="also run the stitched plans on 2 simulated ranks")
    ap.add_argument("--merge", action="store_true", help="re-run --families, keep the other families' rows")
    ap.add_argument("--part", default=None, help="K/N: every N-th family from the K-th (one process of N, each "
                    "writing blocks_check_partK.json); --join N then merges the parts into blocks_check.json")
    ap.add_argument("--join", type=int, default=0)
    args = ap.parse_args()
    if args.join:
        parts = [json.loads((C.RESULTS / f"blocks_check_part{k}.json").read_text()) for k in range(args.join)]
        out = {f: r for p in parts for f, r in p["families"].items()}
        first = parts[0]
        C.write_json("blocks_check", {"layers": first["layers"], "numerics": first["numerics"],
                                      "commands": [c for p in parts for c in p["commands"]], "families": out,
                                      "summary": summary(out, first["layers"], first["numerics"])}, False)
        print(summary(out, first["layers"], first["numerics"]))
        return
    families = args.families.split(",") if args.families else causal_lm_families()
    name = "blocks_check"
    if args.part:
        k, n = (int(v) for v in args.part.split("/"))
        families, name = families[k::n], f"blocks_check_part{k}"
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    path = C.RESULTS / f"{name}.json"  # where C.write_json writes it
    prev = json.loads(path.read_text()) if args.merge and path.exists() else {}
    out: dict[str, Any] = dict(prev.get("families", {}))
    commands = [*prev.get("commands", []), C.command_line()]
    for family in families:
        out[family] = check(family, args.layers, args.numerics)
        print(family, out[family], flush=True)
        C.write_json(name, {"layers": args.layers, "numerics": args.numerics, "commands": commands,
                            "families": out, "summary": summary(out, args.layers, args.numerics)}, False)
    print(summary(out, args.layers, args.numerics))


def summary(out: dict[str, Any], layers: int, with_numerics: bool) -> str:
    """The counts, as one line."""
    stitched = [f for f, r in out.items() if "diffs" in r]
    return (f"blocks: {len(out)} families x {layers} layers: {len(stitched)} stitched, "
            f"{sum(out[f]['diffs'] > 0 for f in stitched)} with a differing graph, "
            f"{sum(bool(out[f].get('per_shape')) for f in stitched)} of them serving their example shapes alone "
            "(a template read its index), "
            f"{sum('fallback' in r for r in out.values())} captured whole (reason recorded), "
            f"{sum('harness_error' in r or 'capture_error' in r for r in out.values())} not built or not capturable"
            + (f"; numerics: {sum(r.get('logits_err', 1.0) <= 1e-5 for r in out.values())} of {len(stitched)} "
               "stitched families exact at t=2" if with_numerics else ""))

if __name__ == "__main__":
    main()
