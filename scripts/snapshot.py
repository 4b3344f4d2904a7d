"""Behaviour snapshot for refactors: plans, collective lists, every rank's emitted code and the plan report of
a fixed set of models, written as one JSON file; two snapshots must be byte-identical.

    python scripts/snapshot.py OUT.json [--quick]

Models: tests/models.py's llama, gpt2 and bert with and without sequence parallelism at t=2 and t=4, the first
fuzz models (tests/fuzz_models.py) at t=3, 4 and 6, 15 causal-LM families' tiny models at t=2 and t=4, and on 2
gloo ranks a round trip through from_pretrained, generate, a training step, tpfx.save and tpfx.load.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import models  # noqa: E402
import torch  # noqa: E402
from fuzz_models import FuzzModel, inputs  # noqa: E402

import tpfx  # noqa: E402
from tpfx.testing.families import tiny_causal_lm  # noqa: E402

FAMILIES = ["llama", "mistral", "qwen2", "mixtral", "qwen2_moe", "olmo2", "phi3", "gemma", "gemma2", "gpt2",
            "falcon", "opt", "bloom", "gptj", "gpt_neox"]


def entry(model: torch.nn.Module, t: int, sp: bool = False, **kw: Any) -> dict[str, Any]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plan = tpfx.plan(model, t, sequence_parallel=sp, **kw)
        return {"plan": plan.to_json(), "collectives": [str(c) for c in plan.collectives], "report": str(plan),
                "ranks": [tpfx.emit_rank(plan, r).code for r in range(t)]}


def fuzz_specs(n: int) -> list[Any]:
    """The plan fuzzer's first ``n`` models, the same on every run (hypothesis derandomized)."""
    from fuzz_models import specs
    from hypothesis import HealthCheck, given, settings

    got: list[Any] = []

    @settings(max_examples=n, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(specs())
    def collect(spec: Any) -> None:
        got.append(spec)

    collect()
    return got


def round_trips(rank: int, world: int, root: str) -> dict[str, Any]:
    """On 2 gloo ranks: a tiny Llama from a saved checkpoint (``tpfx.from_pretrained``) generates greedily, takes
    one SGD step, is saved with ``tpfx.save`` and read back into a fresh copy with ``tpfx.load``; the tokens, the
    loss and the reloaded logits (rounded) go into the snapshot."""
    import os

    torch.set_num_threads(1)
    ids = models.token_inputs(models.HF_VOCAB, 2, 6, seed=3)
    sharded = tpfx.from_pretrained(os.path.join(root, "base")).eval()
    tokens = sharded.generate(input_ids=ids, max_new_tokens=4, do_sample=False)
    sharded.train()
    loss = sharded(input_ids=ids, labels=ids).loss
    loss.backward()
    with torch.no_grad():
        for p in sharded.parameters():
            tpfx.local(p).sub_(0.1 * tpfx.local(p.grad))
    tpfx.save(sharded, os.path.join(root, "ckpt"))
    again = tpfx.from_pretrained(os.path.join(root, "base")).eval()
    tpfx.load(again, os.path.join(root, "ckpt"))
    with torch.no_grad():
        logits = again(input_ids=ids).logits
    return {"tokens": tokens.tolist(), "loss": round(float(loss.detach()), 5),
            "reloaded_logits": [round(float(v), 4) for v in logits.flatten()[:16]]}


def main() -> None:
    out, quick = sys.argv[1], "--quick" in sys.argv
    snap: dict[str, Any] = {}
    for name, build in (("llama", lambda: models.llama(layers=2)), ("gpt2", models.gpt2), ("bert", models.bert)):
        for t in (2, 4):
            for sp in (False, True):
                snap[f"{name}/t{t}/sp{int(sp)}"] = entry(build(), t, sp)
    for i, spec in enumerate(fuzz_specs(4 if quick else 12)):
        args, kwargs = inputs(spec, 1)
        for t in (3, 4, 6):
            try:
                snap[f"fuzz{i}/t{t}"] = entry(FuzzModel(spec), t, example_inputs=args, example_kwargs=kwargs)
            except Exception as e:  # noqa: BLE001 - an error is part of the behaviour
                snap[f"fuzz{i}/t{t}"] = {"error": f"{type(e).__name__}: {e}"}
    for fam in FAMILIES[: 5 if quick else None]:
        for t in (2, 4):
            try:
                snap[f"{fam}/t{t}"] = entry(tiny_causal_lm(fam, seed=0), t)
            except Exception as e:  # noqa: BLE001
                snap[f"{fam}/t{t}"] = {"error": f"{type(e).__name__}: {e}"}
    import tempfile

    from tpfx.launch import launch

    with tempfile.TemporaryDirectory() as root:
        models.llama(layers=2).save_pretrained(Path(root) / "base")
        snap["round_trips/t2"] = launch(round_trips, 2, root, timeout_s=300)
    Path(out).write_text(json.dumps(snap, indent=0, sort_keys=True))
    print(f"wrote {out}: {len(snap)} cases")


if __name__ == "__main__":
    main()
