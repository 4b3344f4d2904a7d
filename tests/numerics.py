"""Rank-side helpers for the multi-process numerics tests (``tests/test_numerics.py``).

``run_case(rank, world_size, name)`` is launched on every rank by ``tpfx.launch``. It builds the model twice
from the same seeded factory (a local unsharded reference and the one handed to ``tpfx.auto_shard``), then
checks forward outputs, gradients and three AdamW steps against the reference and returns plain numbers
(errors, losses) for the pytest side to assert on.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import models
import torch
from torch import nn
from tpfx.passes.emit import collective_nodes

import tpfx

Inputs = tuple[tuple[Any, ...], dict[str, Any]]

TOL = 1e-5
ABS_FLOOR = 1e-7
# Some gradients are mathematically zero but numerically noise: the key-projection bias of softmax
# attention (adding a constant to all scores of a query row changes nothing) has fp32 gradients of ~1e-10
# whose value depends on summation order (TinyTransformer at t=4: sharded and unsharded 1.7e-10 apart, the
# largest gradient entry of the model being 1.6e-2). Gradient errors are therefore measured relative to
# max(|expected|.max(), GRAD_FLOOR_FRACTION * largest gradient entry of the model).
GRAD_FLOOR_FRACTION = 1e-2

EXAMPLE_SHAPE = (2, 8)  # batch, seq handed to auto_shard as example inputs
CHECK_SHAPE = (3, 6)  # a different shape for the checked call (dynamic batch and seq)
TRAIN_SHAPES = ((2, 8), (3, 5), (2, 7))
TRAIN_LR = 1e-2


@dataclass(frozen=True)
class Case:
    """A model under test and how to make its inputs."""

    build: Callable[[], nn.Module]
    make_inputs: Callable[[int, int, int], Inputs]  # (seed, batch, seq) -> (args, kwargs)
    pass_example: bool  # non-HF modules get example inputs; HF models let auto_shard synthesize them
    lm_loss: bool  # the model computes its own loss from ``labels``


def _dense_inputs(seed: int, batch: int, seq: int) -> Inputs:
    return (models.mlp_inputs(batch=batch, seed=seed),), {}


def _tiny_inputs(seed: int, batch: int, seq: int) -> Inputs:
    return (models.token_inputs(models.TINY_VOCAB, batch, seq, seed=seed),), {}


def _hf_inputs(seed: int, batch: int, seq: int) -> Inputs:
    return (), {"input_ids": models.token_inputs(models.HF_VOCAB, batch, seq, seed=seed)}


def _hf_lm_inputs(seed: int, batch: int, seq: int) -> Inputs:
    # labels is a separate tensor, never the input_ids object itself.
    ids = models.token_inputs(models.HF_VOCAB, batch, seq, seed=seed)
    labels = models.token_inputs(models.HF_VOCAB, batch, seq, seed=seed + 1000)
    return (), {"input_ids": ids, "labels": labels}


CASES: dict[str, Case] = {
    "mlp": Case(models.mlp, _dense_inputs, pass_example=True, lm_loss=False),
    "tiny_transformer": Case(models.tiny_transformer, _tiny_inputs, pass_example=True, lm_loss=False),
    "llama": Case(lambda: models.llama(num_kv_heads=2), _hf_lm_inputs, pass_example=False, lm_loss=True),
    "gpt2": Case(models.gpt2, _hf_lm_inputs, pass_example=False, lm_loss=True),
    "bert": Case(models.bert, _hf_inputs, pass_example=False, lm_loss=False),
}


# --------------------------------------------------------------------------------------------- metrics


def rel_err(actual: torch.Tensor | None, expected: torch.Tensor, floor: float = ABS_FLOOR) -> float:
    """``max|actual - expected| / max(max|expected|, floor)``; ``inf`` on a missing tensor or shape mismatch.
    DTensors (sharded parameters, their gradients) are compared by this rank's slice."""
    actual, expected = tpfx.local(actual), tpfx.local(expected)
    if actual is None or actual.shape != expected.shape:
        return math.inf
    a, b = actual.detach().double(), expected.detach().double()
    if b.numel() == 0:
        return 0.0
    return float((a - b).abs().max() / max(float(b.abs().max()), floor))


def output_tensors(out: Any) -> dict[str, torch.Tensor]:
    """The tensors of a model output to compare: a plain tensor, or the known fields of an HF ModelOutput."""
    if isinstance(out, torch.Tensor):
        return {"out": out}
    fields = ("loss", "logits", "last_hidden_state", "pooler_output")
    found = {k: getattr(out, k, None) for k in fields}
    return {k: v for k, v in found.items() if isinstance(v, torch.Tensor)}


def projection_loss(out: Any, seed: int = 1234) -> torch.Tensor:
    """A fixed random linear functional of all outputs (same projection on every rank and model)."""
    total: torch.Tensor | None = None
    for i, (name, y) in enumerate(sorted(output_tensors(out).items())):
        if name == "loss":
            continue
        g = torch.Generator().manual_seed(seed + i)
        proj = torch.randn(y.shape, generator=g).to(y.dtype)
        term = (y * proj).sum() / y.numel()
        total = term if total is None else total + term
    assert total is not None, "model produced no output tensor"
    return total


def loss_of(case: Case, out: Any) -> torch.Tensor:
    return out.loss if case.lm_loss else projection_loss(out)


def _max(values: Iterable[float]) -> float:
    return max(values, default=0.0)


# -------------------------------------------------------------------------------------------- checks


def compare_outputs(out: Any, ref_out: Any) -> dict[str, float]:
    """Relative error per output field; a field missing from the sharded output counts as ``inf``."""
    got, want = output_tensors(out), output_tensors(ref_out)
    return {k: rel_err(got.get(k), v) for k, v in want.items()}


def grad_errors(sharded: nn.Module, ref: nn.Module, rank: int) -> dict[str, float]:
    """Each sharded parameter's gradient against ``tpfx.shard_tensor`` of the reference's (floored as
    ``compare_parameters``): the one tier-1 helper the gloo cases share."""
    return compare_parameters(sharded, ref, sharded.plan, rank, grads=True)["errors"]  # type: ignore[attr-defined]


def compare_parameters(
    sharded: nn.Module, ref: nn.Module, plan: Any, rank: int, *, grads: bool
) -> dict[str, Any]:
    """Compare each sharded parameter (or its ``.grad``) with ``tpfx.shard_tensor`` of the reference's.

    Returns per-name errors, the reference names (tied aliases collapsed) absent from the sharded module,
    sharded names unknown to the reference, and the local/full element counts.
    """
    ref_params = dict(ref.named_parameters(remove_duplicate=False))
    floor = ABS_FLOOR
    if grads:
        scale = _max(float(p.grad.abs().max()) for p in ref.parameters() if p.grad is not None)
        floor = max(ABS_FLOOR, GRAD_FLOOR_FRACTION * scale)
    errors: dict[str, float] = {}
    extra: list[str] = []
    seen: set[int] = set()
    local_numel = 0
    for name, p in sharded.named_parameters():
        local_numel += tpfx.local(p).numel()
        rp = ref_params.get(name)
        if rp is None:
            extra.append(name)
            continue
        seen.add(id(rp))
        if grads:
            full = rp.grad if rp.grad is not None else torch.zeros_like(rp)
            actual = p.grad if p.grad is not None else torch.zeros_like(p)
        else:
            full, actual = rp.detach(), p.detach()
        expected = tpfx.shard_tensor(plan, name, full, rank)
        errors[name] = rel_err(actual, expected, floor)
    missing = [n for n, rp in ref.named_parameters() if id(rp) not in seen]
    full_numel = sum(p.numel() for p in ref.parameters())
    return {
        "errors": errors,
        "missing": missing,
        "extra": extra,
        "local_numel": local_numel,
        "full_numel": full_numel,
    }


def _worst(errors: dict[str, float]) -> tuple[float, str]:
    if not errors:
        return math.inf, "<no parameters>"
    name = max(errors, key=lambda k: errors[k])
    return errors[name], name


# sequence parallelism needs the sequence length divisible by t (2 and 4 here)
SP_CHECK_SHAPE = (3, 8)
SP_TRAIN_SHAPES = ((2, 8), (3, 4), (2, 12))


def in_layer(node: Any) -> bool:
    return any(re.search(r"\.\d+(\.|$)", str(v[0])) for v in node.meta.get("nn_module_stack", {}).values())


def run_case(rank: int, world_size: int, name: str, sequence_parallel: bool = False) -> dict[str, Any]:
    """Forward, backward and 3 AdamW steps of ``CASES[name]``, sharded vs. a local unsharded reference."""
    torch.set_num_threads(1)
    case = CASES[name]
    ref = case.build()
    model = case.build()  # identical weights (seeded factory); auto_shard may consume this one

    sp = {"sequence_parallel": True} if sequence_parallel else {}
    if case.pass_example:
        ex_args, ex_kwargs = case.make_inputs(1, *EXAMPLE_SHAPE)
        sharded = tpfx.auto_shard(model, world_size, example_inputs=ex_args, example_kwargs=ex_kwargs or None, **sp)
    else:
        sharded = tpfx.auto_shard(model, world_size, **sp)
    plan = sharded.plan

    params = compare_parameters(sharded, ref, plan, rank, grads=False)

    # Forward on a shape different from the example, then backward of the same loss.
    args, kwargs = case.make_inputs(2, *(SP_CHECK_SHAPE if sequence_parallel else CHECK_SHAPE))
    emitted = collective_nodes(sharded.graph_module(*args, **kwargs))
    collectives = Counter(kind for kind, _ in emitted)
    in_layers = Counter(kind for kind, n in emitted if in_layer(n))  # inside a repeated block (``layers.3``)
    out = sharded(*args, **kwargs)
    ref_out = ref(*args, **kwargs)
    forward = compare_outputs(out, ref_out)
    loss, ref_loss = loss_of(case, out), loss_of(case, ref_out)
    forward["objective"] = rel_err(loss, ref_loss)
    loss.backward()
    ref_loss.backward()
    grads = compare_parameters(sharded, ref, plan, rank, grads=True)

    # Training: same batches, AdamW on both.
    opt = torch.optim.AdamW(sharded.parameters(), lr=TRAIN_LR)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=TRAIN_LR)
    losses: list[float] = []
    ref_losses: list[float] = []
    for step, shape in enumerate(SP_TRAIN_SHAPES if sequence_parallel else TRAIN_SHAPES):
        args, kwargs = case.make_inputs(10 + step, *shape)
        for m, o, record in ((sharded, opt, losses), (ref, ref_opt, ref_losses)):
            o.zero_grad(set_to_none=True)
            step_loss = loss_of(case, m(*args, **kwargs))
            step_loss.backward()
            o.step()
            record.append(float(step_loss.detach()))
    train_err = _max(abs(a - b) / max(abs(b), ABS_FLOOR) for a, b in zip(losses, ref_losses))
    indivisible = None
    if sequence_parallel:  # a sequence length t does not divide: an error on every rank, not a hang
        args, kwargs = case.make_inputs(3, 2, 4 * world_size + 1)
        try:
            sharded(*args, **kwargs)
        except ValueError as e:
            indivisible = str(e)

    param_err, param_worst = _worst(params["errors"])
    grad_err, grad_worst = _worst(grads["errors"])
    styles = Counter(str(getattr(p, "style", None)) for p in getattr(plan, "placements", {}).values())
    return {
        "rank": rank,
        "styles": dict(styles),
        "param_err": param_err,
        "param_worst": param_worst,
        "missing": params["missing"],
        "extra": params["extra"],
        "local_numel": params["local_numel"],
        "full_numel": params["full_numel"],
        "forward": forward,
        "grad_err": grad_err,
        "grad_worst": grad_worst,
        "grad_missing": grads["missing"],
        "train_losses": losses,
        "ref_train_losses": ref_losses,
        "train_err": train_err,
        "collectives": dict(collectives),
        "in_layers": dict(in_layers),
        "indivisible": indivisible,
    }
