"""Sharded vs. unsharded numerics of ``tpfx.auto_shard`` on real gloo processes (forward, grads, training).

One ``tpfx.launch`` per (model, world size) runs forward, backward and three AdamW steps together
(``numerics.run_case``); the three tests below assert on different parts of that cached result.
"""

from __future__ import annotations

from typing import Any

import pytest
from numerics import CASES, TOL, run_case

from tpfx.launch import launch

pytestmark = pytest.mark.slow

WORLD_SIZES = [2, 4]
LAUNCH_TIMEOUT_S = 900.0

_results: dict[tuple[str, int], list[dict[str, Any]] | str] = {}


def _run(name: str, world_size: int) -> list[dict[str, Any]]:
    """Per-rank results of ``run_case``, launched once per (model, world size) and cached (failures too)."""
    key = (name, world_size)
    if key not in _results:
        try:
            _results[key] = launch(run_case, world_size, name, timeout_s=LAUNCH_TIMEOUT_S)
        except RuntimeError as e:
            _results[key] = str(e)
    res = _results[key]
    if isinstance(res, str):
        pytest.fail(f"{name} at world size {world_size} failed:\n{res}", pytrace=False)
    return res


params = pytest.mark.parametrize(
    ("name", "world_size"), [(n, t) for n in CASES for t in WORLD_SIZES], ids=lambda v: str(v)
)


@params
def test_forward(name: str, world_size: int) -> None:
    for res in _run(name, world_size):
        r = res["rank"]
        assert res["missing"] == [] and res["extra"] == [], f"rank {r}: parameter FQNs differ"
        assert res["param_err"] == 0.0, f"rank {r}: {res['param_worst']} is not shard_tensor of the original"
        assert res["local_numel"] < res["full_numel"], (
            f"rank {r}: nothing is sharded (styles {res['styles']})"
        )
        for field, err in res["forward"].items():
            assert err <= TOL, f"rank {r}: {field} rel err {err:.3g}"


@params
def test_backward(name: str, world_size: int) -> None:
    for res in _run(name, world_size):
        r = res["rank"]
        assert res["grad_missing"] == [], f"rank {r}: no gradient compared for {res['grad_missing']}"
        assert res["grad_err"] <= TOL, f"rank {r}: {res['grad_worst']}.grad rel err {res['grad_err']:.3g}"


@params
def test_training(name: str, world_size: int) -> None:
    for res in _run(name, world_size):
        assert len(res["train_losses"]) == 3
        assert res["train_err"] <= TOL, (
            f"rank {res['rank']}: losses {res['train_losses']} vs reference {res['ref_train_losses']}"
        )
