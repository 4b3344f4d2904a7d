"""Activation checkpointing kept in the per-rank graphs (passes/checkpoint.py). Tier 2: simulated ranks; the
memory and the dropout-with-recompute numbers on real gloo ranks are in tests/test_finetune.py."""

from __future__ import annotations

import finetune_cases
import models
import pytest
import torch
from simulate import emit_all, run_ranks

import tpfx


@pytest.mark.parametrize("variant", ["nonreentrant", "reentrant"])
def test_each_checkpointed_layer_is_one_checkpoint_call_per_rank_and_exact(variant: str) -> None:
    model = finetune_cases._checkpointed(variant)
    model.config.attention_dropout = 0.0
    ids = models.token_inputs(model.config.vocab_size, 2, 8, seed=1)
    kwargs = {"input_ids": ids, "labels": ids, "use_cache": False}
    plan = tpfx.plan(model, 2, example_kwargs=kwargs)
    ranks = emit_all(plan)
    for gm, _ in ranks:
        calls = [n for n in gm.graph.nodes if getattr(n.target, "__name__", "") == "_checkpointed"]
        assert len(calls) == 4  # one per layer (4), the stitched copy included
    ref = model(**kwargs).loss
    ref.backward()

    def body(rank: int) -> tuple[float, dict[str, torch.Tensor]]:
        gm, store = ranks[rank]
        loss = gm(**kwargs).loss
        loss.backward()
        return float(loss), {f: p.grad for f, p in store.items()}

    for rank, (loss, grads) in enumerate(run_ranks(2, body)):
        assert abs(loss - float(ref)) <= 1e-5 * abs(float(ref))
        for fqn, g in grads.items():
            want = tpfx.shard_tensor(plan, fqn, model.get_parameter(fqn).grad, rank)
            assert float((g - want).abs().max() / want.abs().max()) <= 1e-5, fqn


def test_a_checkpoint_policy_tpfx_cannot_carry_is_refused_at_planning() -> None:
    from torch.utils.checkpoint import checkpoint, create_selective_checkpoint_contexts
    from tpfx.passes.checkpoint import CheckpointPolicyError

    class Selective(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = torch.nn.Linear(16, 16)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            policy = lambda: create_selective_checkpoint_contexts([torch.ops.aten.mm.default])  # noqa: E731
            return checkpoint(self.a, x, use_reentrant=False, context_fn=policy)

    with pytest.raises(CheckpointPolicyError, match="selective activation checkpointing"):
        tpfx.plan(Selective(), 2, example_inputs=(torch.randn(2, 16),))


def test_activation_checkpointing_option_makes_each_stack_layer_a_region() -> None:
    # auto_shard(..., activation_checkpointing=True) for a model that does not checkpoint itself: the stages
    # capture each layer of its longest ModuleList as a checkpointed region (block capture's copies included),
    # the model left as it was; a model with no stack is refused
    from tpfx.passes import Stages
    from tpfx.passes.checkpoint import KEY, CheckpointPolicyError

    from tpfx.derive import derive

    model = models.llama(layers=5)
    ids = models.token_inputs(model.config.vocab_size, 2, 8, seed=1)
    kwargs = {"input_ids": ids, "labels": ids, "use_cache": False}
    plan, _ = derive(model, (), kwargs, 2, None, stages=Stages(checkpoint_layers=True))
    assert plan.derivation is not None
    regions = {n.meta.get("custom", {}).get(KEY) for n in plan.derivation.gm.graph.nodes} - {None}
    assert len(regions) == 5, regions
    assert all("forward" not in vars(layer) for layer in model.model.layers)  # unwrapped after the capture
    for gm, _ in emit_all(plan):
        assert sum(getattr(n.target, "__name__", "") == "_checkpointed" for n in gm.graph.nodes) == 5
    plain, _ = derive(model, (), kwargs, 2, None)  # without the option: no region
    assert plain.derivation is not None and not any(n.meta.get("custom", {}).get(KEY) is not None
                                                    for n in plain.derivation.gm.graph.nodes)
    with pytest.raises(CheckpointPolicyError, match="longest nn.ModuleList"):
        derive(models.mlp(), (models.mlp_inputs(),), {}, 2, None, stages=Stages(checkpoint_layers=True))
