"""User-facing errors of the public API that need no process group."""

from __future__ import annotations

import models
import pytest
import torch
import torch.distributed as dist
from simulate import emit_all, run_ranks

import tpfx
from tpfx.api import CaptureError
from tpfx.derive import capture, plan_graph


@pytest.mark.parametrize("world_size", [2, None])
def test_auto_shard_without_process_group(world_size: int | None) -> None:
    assert not dist.is_initialized()
    model = models.mlp()
    with pytest.raises(Exception, match=r"init_process_group|tpfx\.launch"):
        tpfx.auto_shard(model, world_size, example_inputs=(models.mlp_inputs(),))


def test_auto_shard_hf_without_process_group() -> None:
    assert not dist.is_initialized()
    with pytest.raises(Exception, match=r"init_process_group|tpfx\.launch"):
        tpfx.auto_shard(models.llama(), 2)


# ----------------------------------------------------------------------------- inputs tpfx refuses (README list)


class _Branchy(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.lin(x)
        return y * 2 if y.sum() > 0 else y  # a branch on a tensor's value


def test_data_dependent_control_flow_is_a_capture_error_with_advice() -> None:
    with pytest.raises(CaptureError, match=r"could not capture _Branchy .*data-dependent control flow.*torch\.cond"):
        tpfx.plan(_Branchy(), 2, example_inputs=(torch.randn(2, 8),))


def test_quantized_modules_are_refused() -> None:
    model = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(torch.nn.Linear(8, 8)), {torch.nn.Linear},
                                                   dtype=torch.qint8)
    with pytest.raises(ValueError, match=r"module '0' \(Linear\) is quantized"):
        tpfx.plan(model, 2, example_inputs=(torch.randn(2, 8),))


def test_parameters_on_several_devices_are_refused() -> None:
    model = models.mlp()
    with torch.device("meta"):
        model.extra = torch.nn.Linear(4, 4)  # the rest stays on the CPU
    with pytest.raises(ValueError, match=r"several devices \(\['cpu', 'meta'\]\)"):
        tpfx.plan(model, 2, example_inputs=(models.mlp_inputs(),))


def _simulated_error(plan: tpfx.ShardingPlan, model: torch.nn.Module, x: torch.Tensor) -> float:
    ref = model(x).detach()
    ranks = emit_all(plan)
    outs = run_ranks(plan.world_size, lambda r: ranks[r][0](x).detach())
    return max(float((o - ref).abs().max()) for o in outs)


def test_a_world_size_wider_than_every_weight_warns_and_stays_exact() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.ReLU(), torch.nn.Linear(3, 3))
    x = torch.randn(2, 3)
    with pytest.warns(UserWarning, match=r"no weight is split at world_size=8 \(the widest weight dim is 3") as got:
        plan = tpfx.plan(model, 8, example_inputs=(x,))
    assert got[0].filename == __file__  # the warning points at the caller's line
    gm, _ = capture(model, (x,), {})
    with pytest.warns(UserWarning, match="no weight is split") as got:
        plan_graph(gm, 8, None)
    assert got[0].filename == __file__
    assert {p.style for p in plan.placements.values()} == {"replicate"}
    assert _simulated_error(plan, model, x) == 0.0


class _IntWeights(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)
        self.table = torch.nn.Parameter(torch.arange(16, dtype=torch.int64), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.up(x)) * self.table.float())


def test_integer_weights_are_planned_like_float_ones_and_exact() -> None:
    model, x = _IntWeights(), torch.randn(2, 8)
    plan = tpfx.plan(model, 2, example_inputs=(x,))
    assert plan.placements["up.weight"].style == "colwise"  # the integer table does not block the split
    assert _simulated_error(plan, model, x) <= 1e-6
