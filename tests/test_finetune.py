"""Fine-tuning as people run it (tier 3, real gloo ranks): each model's default attention implementation and
default dropout, 3 AdamW steps against the unsharded model seeded alike."""

from __future__ import annotations

import finetune_cases
import pytest
import torch
from numerics import TOL, rel_err

from tpfx.launch import launch

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("world", [2, 4])
def test_dropout_under_the_default_attention_trains_as_the_unsharded_model(world: int) -> None:
    # transformers' default attention is sdpa, whose dropout is drawn inside the kernel: each rank's heads get
    # their chunk of the noise the unsharded kernel draws (on CPU: mask for mask)
    for res in launch(finetune_cases.dropout_default_attentions, world, timeout_s=500):
        assert set(res) == set(finetune_cases.BUILDERS)
        for name, r in res.items():
            assert r["impl"] in ("sdpa", "F.sdpa"), (name, r["impl"])  # the default, not eager
            assert min(abs(r["ref_losses"][i] - r["ref_losses"][i + 1]) for i in range(2)) > 0, (name, r)
            assert rel_err(torch.tensor(r["losses"]), torch.tensor(r["ref_losses"])) <= TOL, (name, r)
            assert r["grad_err"] <= TOL, (name, r)
