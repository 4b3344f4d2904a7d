"""Custom autograd Functions keep their own backward (passes/eager_functions.py): torch.export would trace the
forward and differentiate it instead. Simulated ranks against the unsharded model; collectives counted."""

from __future__ import annotations

import lora_attack
import pytest
import torch
from lora_attack import _capture, _plan, fwd_comm, simulate
from numerics import TOL
from torch import nn
from tpfx.passes.eager_functions import FUNCTION_OP


class StraightThrough(torch.autograd.Function):
    """Round forward, a scaled straight-through gradient: not the derivative of its forward (which is 0)."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[no-untyped-def]
        return torch.round(x * 4) / 4

    @staticmethod
    def backward(ctx, g):  # type: ignore[no-untyped-def]
        return g * 0.5


class ClippedGelu(torch.autograd.Function):
    """tanh GeLU whose backward clips the gradient: elementwise both ways."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[no-untyped-def]
        ctx.save_for_backward(x)
        return 0.5 * x * (1 + torch.tanh(0.79788456 * (x + 0.044715 * x ** 3)))

    @staticmethod
    def backward(ctx, g):  # type: ignore[no-untyped-def]
        (x,) = ctx.saved_tensors
        return g * torch.sigmoid(1.702 * x).clamp(max=0.9)


class RowNormalize(torch.autograd.Function):
    """x / ||x|| over the last dim with a hand-written backward that drops the radial part's scale: a whole-row
    op, so it needs the full rows."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[no-untyped-def]
        n = x.norm(dim=-1, keepdim=True)
        ctx.save_for_backward(x, n)
        return x / n

    @staticmethod
    def backward(ctx, g):  # type: ignore[no-untyped-def]
        x, n = ctx.saved_tensors
        y = x / n
        return (g - y * (g * y).sum(-1, keepdim=True)) / n * 1.5


class Block(nn.Module):
    def __init__(self, fn: type | None, h: int = 16) -> None:
        super().__init__()
        self.up, self.down, self.fn = nn.Linear(h, 4 * h), nn.Linear(4 * h, h), fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.up(x)  # (B, S, 4H/t)
        y = self.fn.apply(y) if self.fn is not None else torch.nn.functional.gelu(y, approximate="tanh")
        return x + self.down(y)


class Net(nn.Module):
    def __init__(self, fn: type | None, layers: int = 2) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block(fn) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def _run(model: nn.Module, t: int) -> tuple[object, tuple[int, int], object]:
    torch.manual_seed(0)
    x = torch.randn(2, 8, 16)
    gm, args, kwargs = _capture(model, (x,), {})
    plan = _plan(gm, t, None, old=False)
    return gm, fwd_comm(plan), simulate(model, plan, args, kwargs, torch.float32)


@pytest.mark.parametrize("fn", [StraightThrough, ClippedGelu, RowNormalize])
@pytest.mark.parametrize("t", [1, 2])
def test_a_functions_own_backward_is_kept(fn: type, t: int) -> None:
    torch.manual_seed(1)
    gm, _, n = _run(Net(fn), t)
    assert sum(node.target is FUNCTION_OP for node in gm.graph.nodes) == 2  # one op per call site
    assert n.fwd <= TOL and n.grad <= TOL, (n.fwd, n.grad, n.worst)


def test_traced_backward_would_differ() -> None:
    # what the op prevents: export's graph differentiates round() (gradient 0), not the Function's g/2
    torch.manual_seed(1)
    model, x = Net(StraightThrough), torch.randn(2, 8, 16)
    model(x).sum().backward()
    want = model.layers[0].up.weight.grad.clone()
    model.zero_grad()
    torch.export.export(model, (x,), strict=False).module()(x).sum().backward()  # shares model's parameters
    assert (model.layers[0].up.weight.grad - want).abs().max() > 1e-2


def test_elementwise_functions_keep_the_split_others_see_full_rows() -> None:
    torch.manual_seed(1)
    _, plain, _ = _run(Net(None), 2)
    _, gelu, _ = _run(Net(ClippedGelu), 2)
    _, rows, _ = _run(Net(RowNormalize), 2)
    assert gelu == plain  # elementwise both ways: on each rank's slice, Megatron's 1 all-reduce per block
    assert rows[0] > plain[0]  # the row op gathers its split input first (exact, not free)


def test_a_function_marked_traced_is_traced() -> None:
    class Traced(ClippedGelu):
        tpfx_traced = True

    torch.manual_seed(1)
    gm, _, _ = _run(Net(Traced), 2)
    assert not any(node.target is FUNCTION_OP for node in gm.graph.nodes)


def test_peft_c3a_trains_as_unsharded() -> None:
    # peft's C3A (an FFT convolution with its own backward) was silently wrong even at t=1 before the op
    case = next(c for c in lora_attack.CASES if c.name == "other_c3a_row")
    r = lora_attack.check(case, 2, recheck64=False)
    assert r.verdict == "ok", lora_attack._fmt(r)


# from the attack generator (tests/functions_attack.py, 48 cases: `python tests/functions_attack.py` prints them):
# each was silently wrong or needlessly replicated on the first version; now exact (or refused, below)
ATTACKS = ["prebound_apply_alias",  # `act = MyFn.apply` bound at import: intercepted in torch's apply itself
           "shape_scalar_fwd", "numel_scalar_bwd",  # a scalar from a shape: not elementwise on a slice
           "global_rng_dropout_t1",  # the backward re-run draws what the forward drew (state from before it)
           "materialize_false_one_used",  # an unused output's gradient stays None
           "block_stack_same_args", "block_stack_per_layer_scale",  # block capture: equal constants share a key
           "same_tensor_twice", "grad_reverse_view", "tuple_out", "nested"]


@pytest.mark.parametrize("name", ATTACKS)
def test_adversarial_functions_are_exact(name: str) -> None:
    import functions_attack

    case = next(c for c in functions_attack.CASES if c.name == name)
    for t in case.worlds:
        r = functions_attack.run(case, t)
        assert r.verdict in ("ok", "EXTRA-COMM") and r.ops > 0, functions_attack._fmt(r)
        if name == "block_stack_same_args":
            assert r.blocks.startswith("stitched"), r.blocks  # identical layers stay one block
        if name in ("same_tensor_twice", "grad_reverse_view"):
            assert r.verdict == "ok", functions_attack._fmt(r)  # elementwise: no collective beyond the plain model's


@pytest.mark.parametrize("name", ["inplace_mark_dirty", "generator_stochround"])
def test_functions_tpfx_cannot_carry_are_refused_by_name(name: str) -> None:
    import functions_attack

    case = next(c for c in functions_attack.CASES if c.name == name)
    r = functions_attack.run(case, case.worlds[0])
    assert r.verdict == "CRASH" and ("mark_dirty" in r.error or "torch.Generator" in r.error), r.error


class SizeSwitch(torch.autograd.Function):
    """Pointwise ops, but a constant chosen by the width: on a rank's slice it would be the other one."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[no-untyped-def]
        return x * (2.0 if x.shape[-1] >= 64 else 3.0)

    @staticmethod
    def backward(ctx, g):  # type: ignore[no-untyped-def]
        return g * (2.0 if g.shape[-1] >= 64 else 3.0)


def test_a_constant_that_depends_on_the_slice_is_not_elementwise() -> None:
    torch.manual_seed(1)
    _, plain, _ = _run(Net(None), 2)
    _, switch, n = _run(Net(SizeSwitch), 2)  # full width 64: the same at 65, not at a rank's 32
    assert n.fwd <= TOL and n.grad <= TOL, (n.fwd, n.grad, n.worst)
    assert switch[0] > plain[0]  # given the full tensors


class Scale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, c):  # type: ignore[no-untyped-def]
        return x * torch.copysign(torch.tensor(1.0), torch.tensor(c))  # -0.0 and 0.0 give other signs

    @staticmethod
    def backward(ctx, g):  # type: ignore[no-untyped-def]
        return g, None


def test_calls_with_equal_constants_share_a_key_and_minus_zero_is_not_zero() -> None:
    from tpfx.passes.eager_functions import _key
    from tpfx.passes.eager_hooks import Slot as _Slot

    same = _key(Scale, "spec", [_Slot(), 0.5]), _key(Scale, "spec", [_Slot(), 0.5])
    assert same[0] == same[1]
    assert _key(Scale, "spec", [_Slot(), 0.0]) != _key(Scale, "spec", [_Slot(), -0.0])
    assert _key(Scale, "spec", [_Slot(), 1]) != _key(Scale, "spec", [_Slot(), True])


def test_torch_apply_is_put_back_after_a_refused_capture_and_functions_count_as_random() -> None:
    import functions_attack
    from tpfx.passes.eager_functions import _APPLY

    from tpfx.agreement import draws_random

    torch_apply = torch.autograd.Function.__dict__["apply"].__func__
    case = next(c for c in functions_attack.CASES if c.name == "generator_stochround")
    assert functions_attack.run(case, 2).verdict == "CRASH"
    assert torch_apply.__code__ is _APPLY.__code__  # torch's own code again
    gm, _, _ = _run(Net(StraightThrough), 2)
    assert draws_random(gm)  # a Function may draw: train-mode calls check the ranks' random states agree
