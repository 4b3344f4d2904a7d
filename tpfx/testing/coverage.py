"""Family coverage check: shard every transformers causal-LM family and compare with the unsharded model.

``check_family(model_type, rank, world)`` runs on a gloo rank (inside ``tpfx.launch``): builds the tiny
random-init model twice, shards one (``sequence_parallel=True``: with Megatron sequence parallelism), and
returns forward/loss/gradient relative errors, the plan's collective counts and fallbacks, or the error that
stopped it (reported, never dropped).
"""

from __future__ import annotations

import math
import time
import traceback
import warnings
from typing import Any

import torch

from tpfx.dtensor_params import local as _local_of


def _rel(a: torch.Tensor | None, b: torch.Tensor | None, floor: float = 1e-7) -> float:
    if a is None or b is None or a.shape != b.shape:
        return math.inf
    return float((a.detach().double() - b.detach().double()).abs().max() / max(float(b.abs().max()), floor))


def check_family(model_type: str, rank: int, world: int, seq: int = 6, batch: int = 3,
                 sequence_parallel: bool = False) -> dict[str, Any]:
    import tpfx
    from tpfx.testing.families import default_config_error, tiny_causal_lm

    t0 = time.perf_counter()
    res: dict[str, Any] = {"family": model_type, "world": world, "sequence_parallel": sequence_parallel}
    try:
        # eval mode: no dropout, no sampled routing (e.g. PhiMoE's sparsemixer); gradients still flow
        ref = tiny_causal_lm(model_type).eval()
        model = tiny_causal_lm(model_type).eval()
    except Exception as e:  # noqa: BLE001
        default = default_config_error(model_type)
        if default is not None:  # transformers' own default config fails: nothing tpfx could shrink
            res["status"] = "default-config-error"
            res["error"] = f"transformers' default config does not build the model either: {default}"
        else:
            res["status"] = "build-error"
            res["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        return res
    try:
        cfg: Any = ref.config
        vocab = cfg.get_text_config().vocab_size
        g = torch.Generator().manual_seed(7)
        ids = torch.randint(2, vocab, (batch, seq), generator=g)
        labels = torch.randint(2, vocab, (batch, seq), generator=g)
        ref_out = ref(input_ids=ids, labels=labels, use_cache=False)
        ref_out.loss.backward()
    except Exception as e:  # noqa: BLE001
        res["status"] = "model-error"
        res["error"] = f"unsharded model fails: {type(e).__name__}: {str(e)[:300]}"
        return res
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sharded = tpfx.auto_shard(model, world, sequence_parallel=sequence_parallel)
            out = sharded(input_ids=ids, labels=labels)
        out.loss.backward()
    except Exception as e:  # noqa: BLE001
        res["status"] = "tpfx-error"
        res["error"] = f"{type(e).__name__}: {str(e)[:300]}"
        res["trace"] = traceback.format_exc()[-2000:]
        return res
    plan = sharded.plan
    grad_err, worst = _grad_err(dict(sharded.named_parameters()), ref,
                                lambda name, g: tpfx.shard_tensor(plan, name, g, rank))
    hf = hf_agreement(plan, ref)
    local = sum(_local_of(p).numel() for p in sharded.parameters())
    total = sum(p.numel() for p in ref.parameters())
    res.update(
        status="ok",
        logits=_rel(out.logits, ref_out.logits),
        loss=_rel(out.loss, ref_out.loss),
        grad=grad_err,
        grad_worst=worst,
        all_reduce=plan.count("all_reduce"),
        all_gather=plan.count("all_gather"),
        reduce_scatter=plan.count("reduce_scatter"),
        fallbacks=[f for f in plan.fallbacks if not f["reason"].startswith("segments")],
        unknown_ops=plan.unknown_ops,
        param_ratio=local / total,
        hf_agree=hf["agree"],
        hf_differ=hf["differ"],
        layers=getattr(cfg.get_text_config(), "num_hidden_layers", None),
        # the same on every rank (same seeds): measured once, on rank 0
        fp32_floor=_fp32_floor(model_type, ref, ref_out.logits, ids, labels) if rank == 0 else 0.0,
        seconds=time.perf_counter() - t0,
    )
    return res


TOL = 1e-5  # fp32 relative error of logits, loss and every gradient against the unsharded model


def tolerance(result: dict[str, Any]) -> float:
    """A family's bar: ``TOL``, or twice its own fp32 rounding (unsharded fp32 vs fp64, ``fp32_floor``) where
    that is larger (e.g. Gemma 4, whose unsharded fp32 gradients are 1e-5 away from fp64)."""
    return max(TOL, 2 * result.get("fp32_floor", 0.0))


def _grad_err(params: dict[str, torch.Tensor], ref: torch.nn.Module, local: Any) -> tuple[float, str]:
    """Largest gradient error of ``params`` against ``ref``'s (``local(name, grad)``: this rank's part), each
    relative to its tensor's largest gradient, floored at 1% of the model's largest gradient."""
    full = dict(ref.named_parameters())
    scale = max(float(p.grad.abs().max()) for p in ref.parameters() if p.grad is not None)
    err, worst = 0.0, ""
    for name, p in params.items():
        fg = full[name].grad
        if fg is None and p.grad is None:
            continue
        fg = fg if fg is not None else torch.zeros_like(full[name])
        e = _rel(_local_of(p.grad) if p.grad is not None else torch.zeros_like(_local_of(p)), local(name, fg),
                 floor=max(1e-7, 1e-2 * scale))
        if e > err:
            err, worst = e, name
    return err, worst


def _fp32_floor(model_type: str, ref: torch.nn.Module, logits: torch.Tensor, ids: torch.Tensor,
                labels: torch.Tensor) -> float:
    """How far the unsharded fp32 model itself is from its fp64 twin (same metric as the sharded check):
    the rounding noise fp32 adds for this family. Ill-conditioned families (e.g. Gemma 4) exceed 1e-5."""
    from tpfx.testing.families import tiny_causal_lm

    try:
        twin = tiny_causal_lm(model_type).eval().double()
        out = twin(input_ids=ids, labels=labels, use_cache=False)
        out.loss.backward()
    except Exception:  # noqa: BLE001 - a family that cannot run in fp64 has no floor estimate
        return 0.0
    err, _ = _grad_err(dict(ref.named_parameters()), twin, lambda name, g: g)
    return max(err, _rel(logits, out.logits))


def hf_agreement(plan: Any, model: torch.nn.Module) -> dict[str, list[str]]:
    """Entries where HF's ``base_model_tp_plan`` says plain colwise/rowwise, and whether ours agrees."""
    import fnmatch

    mc: Any = model.config
    cfg = mc.get_text_config() if hasattr(mc, "get_text_config") else mc
    theirs = dict(getattr(cfg, "base_model_tp_plan", None) or {})
    ours = plan.to_tp_plan()
    agree: list[str] = []
    differ: list[str] = []
    for key, style in theirs.items():
        if style not in ("colwise", "rowwise"):
            continue
        hits = [v for k, v in ours.items() if fnmatch.fnmatchcase(k, "*" + key) and k.endswith(key.split(".")[-1])]
        mods = [n for n, _ in model.named_modules() if fnmatch.fnmatchcase(n, "*" + key.replace("*", "[0-9]*"))]
        if not mods:
            continue  # this config has no such module (e.g. optional shared experts)
        (agree if hits and all(h == style for h in hits) else differ).append(f"{key}: HF {style}, tpfx "
                                                                            f"{'/'.join(hits) or 'replicate'}")
    return {"agree": agree, "differ": differ}


def run_families(rank: int, world: int, families: list[str], sequence_parallel: bool = False) -> list[dict[str, Any]]:
    torch.set_num_threads(1)
    seq = 6 if 6 % world == 0 or not sequence_parallel else 2 * world  # SP splits the sequence evenly
    return [check_family(f, rank, world, seq, sequence_parallel=sequence_parallel) for f in families]


def combine_ranks(per_rank: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per family from every rank's rows: rank 0's, with the worst error over ranks (each rank checks
    its own shards' gradients) and the first failure any rank saw."""
    out = []
    for rows in zip(*per_rank, strict=True):
        failed = next((r for r in rows if r.get("status") != "ok"), None)
        row = dict(failed if failed is not None else rows[0])
        if failed is None:
            for key in ("logits", "loss", "grad"):
                row[key] = max(r[key] for r in rows)
            worst = max(range(len(rows)), key=lambda i: rows[i]["grad"])
            row["grad_worst"] = f"{rows[worst]['grad_worst']} (rank {worst})"
        out.append(row)
    return out
