"""The plan fuzzer's check: one random model (tests/fuzz_models.py), captured once, planned for each world size,
emitted per rank and run on simulated ranks (tests/simulate.py); forward and gradients against the unsharded
model. ``python tests/fuzz.py [N] [--sp]`` runs the large profile and prints the figure (``make fuzz``; ``--sp``:
plans with sequence parallelism)."""

from __future__ import annotations

import sys
import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from fuzz_models import SEQ, FuzzModel, Spec, inputs
from numerics import ABS_FLOOR, GRAD_FLOOR_FRACTION, TOL, rel_err
from simulate import emit_all, run_ranks

from tpfx.derive import capture, plan_graph

WORLDS = tuple(range(2, 9))


@dataclass
class Outcome:
    world: int
    forward: float
    grads: float
    worst: str
    fallbacks: int
    split: bool  # some weight is split (not a fully replicated plan)

    @property
    def ok(self) -> bool:
        return self.forward <= TOL and self.grads <= TOL


def _objective(out: torch.Tensor, probe: torch.Tensor | None) -> torch.Tensor:
    return out if out.ndim == 0 else (out * probe).sum()


def check(spec: Spec, worlds: tuple[int, ...] = WORLDS, dtype: torch.dtype = torch.float32,
          sequence_parallel: bool = False) -> list[Outcome]:
    """Plan, emit and run ``spec`` at each world size; errors of every rank's output and local gradients.
    ``dtype=torch.float64`` tells a rounding difference (vanishes) from a wrong plan (stays).
    ``sequence_parallel``: plans split the residual stream by sequence (length 2t, so that t divides it)."""
    torch.set_num_threads(1)
    model = FuzzModel(spec).to(dtype)
    ex_args, ex_kwargs = inputs(spec, 1, dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gm, dynamic = capture(model, ex_args, ex_kwargs)
    outcomes = []
    for world in worlds:
        seq = 2 * world if sequence_parallel else SEQ
        args, kwargs, ref, probe, floor = _reference(model, spec, seq, dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if not dynamic and seq != SEQ:  # a static capture serves only its own shapes
                gm = capture(model, *inputs(spec, 1, dtype, seq))[0]
            plan = plan_graph(gm, world, None, sequence_parallel=sequence_parallel)
        fwd, grad, worst = 0.0, 0.0, ""
        params = dict(model.named_parameters())
        for rank, (out, grads) in enumerate(_run(plan, args, kwargs, probe)):
            fwd = max(fwd, rel_err(out, ref))
            for fqn, g in grads.items():
                full = params[fqn].grad if params[fqn].grad is not None else torch.zeros_like(params[fqn])
                err = rel_err(g, plan.shard(fqn, full, rank), floor)
                if err > grad:
                    grad, worst = err, f"{fqn} rank {rank}"
        split = any(p.style != "replicate" for p in plan.placements.values())
        outcomes.append(Outcome(world, fwd, grad, worst, len(plan.fallbacks), split))
    return outcomes


def _reference(model: torch.nn.Module, spec: Spec, seq: int, dtype: torch.dtype
               ) -> tuple[tuple, dict[str, Any], torch.Tensor, torch.Tensor | None, float]:
    """Fresh inputs of length ``seq``, the unsharded output and gradients (left in ``.grad``), the objective's
    probe and the gradient error floor."""
    args, kwargs = inputs(spec, 2, dtype, seq)
    model.zero_grad(set_to_none=True)
    ref = model(*args, **kwargs)
    probe = torch.randn(ref.shape, generator=torch.Generator().manual_seed(3), dtype=dtype) if ref.ndim else None
    _objective(ref, probe).backward()
    scale = max(float(p.grad.abs().max()) for p in model.parameters() if p.grad is not None)
    return args, kwargs, ref.detach(), probe, max(ABS_FLOOR, GRAD_FLOOR_FRACTION * scale)


def _run(plan: Any, args: tuple, kwargs: dict[str, Any], probe: torch.Tensor | None
         ) -> list[tuple[torch.Tensor, dict[str, torch.Tensor]]]:
    """Every rank's output and local gradients (zeros where none arrived), on simulated ranks."""
    ranks = emit_all(plan)

    def body(rank: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        local, store = ranks[rank]
        out = local(*args, **kwargs)
        _objective(out, probe).backward()
        return out.detach(), {f: p.grad if p.grad is not None else torch.zeros_like(p) for f, p in store.items()}

    return run_ranks(plan.world_size, body)


EXACT64 = 1e-9  # float64: what is left of a rounding difference; a wrong plan stays O(1)


@dataclass
class Verdict:
    """Plans tried for one model; ``wrong``: outcomes still off in float64; ``rounding``: fp32 errors above
    TOL that vanish in float64 (summation order over ranks against a gradient that cancels)."""

    plans: int
    split: int  # plans that split some weight
    wrong: list[str]
    rounding: list[str]


def verdict(spec: Spec, worlds: tuple[int, ...] = WORLDS, sequence_parallel: bool = False) -> Verdict:
    outcomes = check(spec, worlds, sequence_parallel=sequence_parallel)
    off = [o for o in outcomes if not o.ok]
    recheck = {o.world: o for o in check(spec, tuple(o.world for o in off), torch.float64,
                                         sequence_parallel)} if off else {}
    wrong, rounding = [], []
    for o in off:
        o64 = recheck[o.world]
        line = (f"{spec.describe()}: t={o.world} fp32 fwd {o.forward:.1e} grad {o.grads:.1e} ({o.worst}); "
                f"float64 fwd {o64.forward:.1e} grad {o64.grads:.1e}")
        (wrong if max(o64.forward, o64.grads) > EXACT64 else rounding).append(line)
    return Verdict(len(worlds), sum(o.split for o in outcomes), wrong, rounding)


def figure(models: int, plans: int, split: int, wrong: int, rounding: int) -> str:
    return (f"fuzz: {models} models × world sizes {WORLDS[0]}..{WORLDS[-1]} ({plans} plans, {split} splitting weights), "
            f"{wrong} mismatches; {rounding} fp32 results above {TOL:g} that are float64-exact (summation order)")


def main(n: int, sequence_parallel: bool = False) -> None:
    from fuzz_models import specs
    from hypothesis import HealthCheck, given, settings

    tried, plans, split, bad, rounding = [0], [0], [0], [], []

    @settings(max_examples=n, deadline=None, database=None, suppress_health_check=list(HealthCheck))
    @given(specs())
    def one(spec: Spec) -> None:
        tried[0] += 1
        try:
            v = verdict(spec, sequence_parallel=sequence_parallel)
        except Exception as e:  # noqa: BLE001  (a crash is a finding too)
            bad.append(f"{spec.describe()}: {type(e).__name__}: {e}")
            return
        plans[0] += v.plans
        split[0] += v.split
        bad.extend(v.wrong)
        rounding.extend(v.rounding)

    t0 = time.perf_counter()
    one()
    for line in bad:
        print("MISMATCH", line)
    for line in rounding:
        print("ROUNDING", line)
    sp = " (sequence parallel)" if sequence_parallel else ""
    print(figure(tried[0], plans[0], split[0], len(bad), len(rounding)) + f"{sp} in {time.perf_counter() - t0:.0f} s")
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    numbers = [a for a in sys.argv[1:] if a.isdigit()]
    main(int(numbers[0]) if numbers else 500, sequence_parallel="--sp" in sys.argv)


def run_on_ranks(rank: int, world_size: int, sample: list[Spec]) -> list[dict[str, Any]]:
    """Tier 3 (launched on real gloo ranks): ``auto_shard`` each model, forward and backward on fresh inputs,
    against a local unsharded copy. Returns per-model errors."""
    from numerics import compare_parameters

    import tpfx

    torch.set_num_threads(1)
    out = []
    for spec in sample:
        model, ref = FuzzModel(spec), FuzzModel(spec)  # identical weights (seeded)
        ex_args, ex_kwargs = inputs(spec, 1)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            sharded = tpfx.auto_shard(model, world_size, example_inputs=ex_args, example_kwargs=ex_kwargs or None)
        args, kwargs = inputs(spec, 2)
        got, want = sharded(*args, **kwargs), ref(*args, **kwargs)
        probe = torch.randn(want.shape, generator=torch.Generator().manual_seed(3)) if want.ndim else None
        _objective(got, probe).backward()
        _objective(want, probe).backward()
        grads = compare_parameters(sharded, ref, sharded.plan, rank, grads=True)
        out.append({"spec": spec.describe(), "forward": rel_err(got, want.detach()),
                    "grads": max(grads["errors"].values(), default=0.0), "missing": grads["missing"]})
    return out
