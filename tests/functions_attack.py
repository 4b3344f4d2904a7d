"""Adversarial cases for custom autograd Functions (passes/eager_functions.py, ``tpfx::function``).

Each case: a model calling a user-defined ``torch.autograd.Function`` (and, where one exists, the same model
with a plain equivalent), captured and planned at t = 1, 2 (4 where sizes allow), simulated against the
unsharded model. Prints a table: verdict ok / WRONG / CRASH / EXTRA-COMM (forward collectives above the plain
equivalent's), fwd / grad relative errors, forward collectives (count, bytes) with the plain model's beside.

    python tests/functions_attack.py [name-substring ...] [-v]
"""

from __future__ import annotations

import math
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, __file__.rsplit("/", 1)[0])
torch.set_num_threads(1)

import models  # noqa: E402
from lora_attack import _capture, _family, _plan, fwd_comm, simulate  # noqa: E402
from numerics import TOL  # noqa: E402
from tpfx.passes import blocks as _blocks  # noqa: E402
from tpfx.passes.eager_functions import FUNCTION_OP  # noqa: E402

import tpfx  # noqa: E402,F401

Built = tuple[nn.Module, tuple, dict[str, Any]]
H = 16


# ------------------------------------------------------------------------------------------------ Functions


class STE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.round(x * 4) / 4

    @staticmethod
    def backward(ctx, g):
        return g * 0.5


class ScaledArgs(torch.autograd.Function):
    """Non-tensor args: float, int, None, tuple; backward not the derivative."""

    @staticmethod
    def forward(ctx, x, scale, n, none, pair):
        assert none is None
        ctx.scale = scale
        return x * scale * n + pair[0] - pair[1]

    @staticmethod
    def backward(ctx, g):
        return g * ctx.scale, None, None, None, None


class KwScale(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale=1.0):
        ctx.scale = scale
        return torch.tanh(x) * scale

    @staticmethod
    def backward(ctx, g):
        return g * ctx.scale * 0.3, None


class TwoOut(torch.autograd.Function):
    """Two same-shape outputs, elementwise."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.sigmoid(x), torch.tanh(x)

    @staticmethod
    def backward(ctx, ga, gb):
        (x,) = ctx.saved_tensors
        return ga * 0.25 + gb * 0.7


class OutNone(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return torch.relu(x) * 1.5, None

    @staticmethod
    def backward(ctx, g, _):
        return g * 0.9


class NonDiffMask(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        mask = x > 0
        ctx.mark_non_differentiable(mask)
        ctx.save_for_backward(mask)
        return x * mask, mask

    @staticmethod
    def backward(ctx, g, gm):
        (mask,) = ctx.saved_tensors
        return g * mask * 0.8 + g * 0.1


class NeedsGrad(torch.autograd.Function):
    """x * w (w a bias-shaped parameter), grads only where needed; w not of x's shape."""

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x * w

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        gx = g * w * 0.5 if ctx.needs_input_grad[0] else None
        gw = (g * x).sum(dim=tuple(range(g.dim() - 1))) if ctx.needs_input_grad[1] else None
        return gx, gw


class NoMaterialize(torch.autograd.Function):
    """Two outputs, grads not materialized: a None grad (unused output) takes another branch than zeros."""

    @staticmethod
    def forward(ctx, x):
        ctx.set_materialize_grads(False)
        return x * 2, x * 3

    @staticmethod
    def backward(ctx, ga, gb):
        out = torch.zeros(()) if ga is None else ga
        # an author's shortcut: an unused second output adds a constant nudge (None only)
        return out + (0.01 if gb is None else gb)


class OnceDiff(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.clamp(-1, 1) ** 2

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * 2 * x  # ignores the clamp: not the derivative


class QuantW(torch.autograd.Function):
    """QAT fake-quantization of a weight, straight-through (elementwise)."""

    @staticmethod
    def forward(ctx, w):
        return torch.round(w * 16) / 16

    @staticmethod
    def backward(ctx, g):
        return g


class AbsMeanQuantW(torch.autograd.Function):
    """BitNet-style ternary weight with a per-tensor absmean scale, straight-through: a reduction."""

    @staticmethod
    def forward(ctx, w):
        s = w.abs().mean().clamp(min=1e-5)
        return (w / s).round().clamp(-1, 1) * s

    @staticmethod
    def backward(ctx, g):
        return g


class BiasAct(torch.autograd.Function):
    """Fused bias + GeLU: operands of different shapes (broadcast)."""

    @staticmethod
    def forward(ctx, x, b):
        ctx.save_for_backward(x, b)
        return F.gelu(x + b, approximate="tanh")

    @staticmethod
    def backward(ctx, g):
        x, b = ctx.saved_tensors
        y = x + b
        d = torch.sigmoid(1.702 * y)
        gx = g * d
        return gx, gx.sum(dim=tuple(range(gx.dim() - 1)))


class FwdPointBwdRow(torch.autograd.Function):
    """Elementwise forward, backward centers each row's gradient (not elementwise)."""

    @staticmethod
    def forward(ctx, x):
        return torch.tanh(x)

    @staticmethod
    def backward(ctx, g):
        return g - g.mean(-1, keepdim=True)


class FwdRowBwdPoint(torch.autograd.Function):
    """Softmax forward, straight-through backward."""

    @staticmethod
    def forward(ctx, x):
        return torch.softmax(x, -1)

    @staticmethod
    def backward(ctx, g):
        return g * 0.5


class InplaceRelu(torch.autograd.Function):
    """In-place activation marked dirty (InplaceABN-style)."""

    @staticmethod
    def forward(ctx, x):
        x.relu_()
        ctx.mark_dirty(x)
        ctx.save_for_backward(x)
        return x

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (y > 0) * 0.7 + g * 0.05


class InplaceTemp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        y = x.clone()
        y.mul_(2).sin_()
        ctx.save_for_backward(x)
        return y

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * torch.cos(2 * x) * 2 * 0.5


class GradReverse(torch.autograd.Function):
    """Gradient reversal layer (DANN): returns a view of its input."""

    @staticmethod
    def forward(ctx, x, lam):
        ctx.lam = lam
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return -ctx.lam * g, None


class GradReverseClone(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lam):
        ctx.lam = lam
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return -ctx.lam * g, None


class IntOut(torch.autograd.Function):
    """A float output and an integer one (argmax)."""

    @staticmethod
    def forward(ctx, x):
        return torch.relu(x), x.argmax(-1)

    @staticmethod
    def backward(ctx, g, _):
        return g * 0.6


class IntOutPointwise(torch.autograd.Function):
    """A float output and an elementwise integer one."""

    @staticmethod
    def forward(ctx, x):
        return torch.relu(x) * 1.1, (x > 0).to(torch.int64)

    @staticmethod
    def backward(ctx, g, _):
        return g * 0.6


class Inner(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 3

    @staticmethod
    def backward(ctx, g):
        return g * 0.1


class Outer(torch.autograd.Function):
    """Calls another Function's apply inside its forward."""

    @staticmethod
    def forward(ctx, x):
        return torch.tanh(Inner.apply(x))

    @staticmethod
    def backward(ctx, g):
        return g * 0.4


class OuterGrad(torch.autograd.Function):
    """Nested, and the backward differentiates through the inner Function (enable_grad + autograd.grad)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.tanh(Inner.apply(x))

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        with torch.enable_grad():
            xx = x.detach().requires_grad_()
            y = torch.tanh(Inner.apply(xx))
            (gx,) = torch.autograd.grad(y, xx, g)
        return gx


class GlobalDropout(torch.autograd.Function):
    """Custom dropout on the global RNG (mask saved for backward)."""

    @staticmethod
    def forward(ctx, x, p):
        mask = (torch.rand_like(x) > p).to(x.dtype) / (1 - p)
        ctx.save_for_backward(mask)
        return x * mask

    @staticmethod
    def backward(ctx, g):
        (mask,) = ctx.saved_tensors
        return g * mask, None


class StochRound(torch.autograd.Function):
    """Stochastic rounding with an explicit generator; backward scales by the noise it drew (saved)."""

    @staticmethod
    def forward(ctx, x, gen):
        noise = torch.empty_like(x).uniform_(generator=gen)  # (torch.rand(x.shape, generator=) fails export)
        ctx.save_for_backward(noise)
        return torch.floor(x * 8 + noise) / 8

    @staticmethod
    def backward(ctx, g):
        (noise,) = ctx.saved_tensors
        return g * (0.5 + noise), None


class ShapeScaled(torch.autograd.Function):
    """Elementwise ops, but a scale read off the input's shape (1/sqrt(width))."""

    @staticmethod
    def forward(ctx, x):
        return torch.tanh(x) * x.shape[-1] ** -0.5

    @staticmethod
    def backward(ctx, g):
        return g * x_width(g) ** -0.5 * 0.5


def x_width(t: torch.Tensor) -> int:
    return t.shape[-1]


class GradMeanScale(torch.autograd.Function):
    """Identity forward, gradient divided by the tensor's element count (a 'mean' gradient)."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, g):
        return g * (64.0 / g.numel())


class Bf16Act(torch.autograd.Function):
    """Computes in bf16 internally (a low-precision kernel), returns float32."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return F.silu(x.to(torch.bfloat16)).to(x.dtype)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return (g.to(torch.bfloat16) * torch.sigmoid(x.to(torch.bfloat16))).to(g.dtype)


class Softcap(torch.autograd.Function):
    """Attention-logit soft-capping (elementwise), with a clipped gradient."""

    @staticmethod
    def forward(ctx, s, cap):
        y = torch.tanh(s / cap) * cap
        ctx.save_for_backward(y)
        ctx.cap = cap
        return y

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return g * (1 - (y / ctx.cap) ** 2).clamp(min=0.2), None


class ModuleArg(torch.autograd.Function):
    """A frozen projection passed as a module (bitsandbytes' quant_state style: tensors behind a non-tensor)."""

    @staticmethod
    def forward(ctx, x, mod):
        ctx.mod = mod
        return F.linear(x, mod.weight)

    @staticmethod
    def backward(ctx, g):
        return g @ ctx.mod.weight, None


class Mul2(torch.autograd.Function):
    """a * b elementwise with a custom backward (called with one tensor twice)."""

    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return a * b

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        return g * b * 0.5, g * a * 0.25


class ReturnsInput(torch.autograd.Function):
    """Returns its input object itself (a gradient-scaling identity)."""

    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, g):
        return g * 0.2


_TABLE = torch.linspace(0.5, 1.5, 4 * H)  # a per-channel constant the Function reads from its module's globals


class ChannelTable(torch.autograd.Function):
    """Elementwise-looking, but multiplies by a per-channel table that is not an argument."""

    @staticmethod
    def forward(ctx, x):
        return torch.tanh(x) * _TABLE

    @staticmethod
    def backward(ctx, g):
        return g * _TABLE * 0.5


class DataDepBranch(torch.autograd.Function):
    """Python control flow on a tensor value (rescale when the max is large)."""

    @staticmethod
    def forward(ctx, x):
        m = x.abs().max()
        ctx.s = 1.0 / float(m) if m > 1 else 1.0
        return x * ctx.s

    @staticmethod
    def backward(ctx, g):
        return g * ctx.s * 0.5


class NumpyFwd(torch.autograd.Function):
    """A forward computed outside torch (numpy), a hand-written backward."""

    @staticmethod
    def forward(ctx, x):
        import numpy as np

        ctx.save_for_backward(x)
        return torch.from_numpy(np.tanh(x.detach().cpu().numpy())).to(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * (1 - torch.tanh(x) ** 2)


class ScaleByTensorKw(torch.autograd.Function):
    """A tensor passed by keyword (elementwise both ways)."""

    @staticmethod
    def forward(ctx, x, gate=None):
        ctx.save_for_backward(gate)
        return x * torch.sigmoid(gate)

    @staticmethod
    def backward(ctx, g):
        (gate,) = ctx.saved_tensors
        return g * 0.5, g * 0.25


class EmbedFn(torch.autograd.Function):
    """A custom embedding lookup with a hand-written (scaled) weight gradient."""

    @staticmethod
    def forward(ctx, w, ids):
        ctx.save_for_backward(ids)
        ctx.n = w.shape[0]
        return w[ids]

    @staticmethod
    def backward(ctx, g):
        (ids,) = ctx.saved_tensors
        gw = torch.zeros(ctx.n, g.shape[-1], dtype=g.dtype).index_add_(0, ids.reshape(-1), g.reshape(-1, g.shape[-1]))
        return gw * 0.5, None


class EmbedNet(nn.Module):
    def __init__(self, use_fn: bool) -> None:
        super().__init__()
        self.emb, self.use_fn = nn.Embedding(64, H), use_fn
        self.body = Net(_gelu_act)
        self.head = nn.Linear(H, 64, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = EmbedFn.apply(self.emb.weight, ids) if self.use_fn else self.emb(ids)
        return self.head(self.body(x))


def embed(use_fn: bool) -> Callable[[], Built]:
    def build() -> Built:
        torch.manual_seed(1)
        return EmbedNet(use_fn).eval(), (torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(0)),), {}
    return build


ste_bound = STE.apply  # module-level alias bound at import (mamba_inner_fn = MambaInnerFn.apply style)


class PartialIn(torch.autograd.Function):
    """Elementwise nonlinear Function applied right after a row-parallel projection (a partial sum)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.sigmoid(x) * 2

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * torch.sigmoid(x) * 0.3


# ------------------------------------------------------------------------------------------------ models


class Block(nn.Module):
    """up (colwise) -> act(y) -> down (rowwise), residual."""

    def __init__(self, act: Callable[[nn.Module, torch.Tensor], torch.Tensor], h: int = H) -> None:
        super().__init__()
        self.up, self.down, self._act = nn.Linear(h, 4 * h), nn.Linear(4 * h, h), act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(self._act(self, self.up(x)))


class Net(nn.Module):
    def __init__(self, act: Callable[[nn.Module, torch.Tensor], torch.Tensor], layers: int = 2, h: int = H) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Block(act, h) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def _x(h: int = H) -> torch.Tensor:
    return torch.randn(2, 8, h, generator=torch.Generator().manual_seed(0))


def mlp(act: Callable[[nn.Module, torch.Tensor], torch.Tensor], layers: int = 2, setup: Callable | None = None
        ) -> Callable[[], Built]:
    def build() -> Built:
        torch.manual_seed(1)
        m = Net(act, layers)
        if setup is not None:
            setup(m)
        return m.eval(), (_x(),), {}
    return build


PLAIN_GELU = mlp(lambda m, y: F.gelu(y, approximate="tanh"))


def _bias_setup(m: nn.Module) -> None:
    for b in m.layers:
        b.b2 = nn.Parameter(torch.randn(4 * H) * 0.1)


def _proj_setup(m: nn.Module) -> None:
    for b in m.layers:
        b.frozen = nn.Linear(4 * H, 4 * H, bias=False).requires_grad_(False)


class QATLinearNet(nn.Module):
    def __init__(self, fn: type | None) -> None:
        super().__init__()
        self.fn = fn
        self.layers = nn.ModuleList(nn.ModuleDict({"up": nn.Linear(H, 4 * H), "down": nn.Linear(4 * H, H)})
                                    for _ in range(2))

    def _w(self, lin: nn.Linear) -> torch.Tensor:
        return self.fn.apply(lin.weight) if self.fn is not None else lin.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for d in self.layers:
            y = F.gelu(F.linear(x, self._w(d["up"]), d["up"].bias))
            x = x + F.linear(y, self._w(d["down"]), d["down"].bias)
        return x


def qat(fn: type | None) -> Callable[[], Built]:
    def build() -> Built:
        torch.manual_seed(1)
        return QATLinearNet(fn).eval(), (_x(),), {}
    return build


class Attn(nn.Module):
    def __init__(self, score_fn: Callable[[torch.Tensor], torch.Tensor] | None, h: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.q, self.k, self.v, self.o = (nn.Linear(h, h) for _ in range(4))
        self.heads, self.score_fn = heads, score_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, h = x.shape
        sh = lambda t: t.view(b, s, self.heads, h // self.heads).transpose(1, 2)  # noqa: E731
        q, k, v = sh(self.q(x)), sh(self.k(x)), sh(self.v(x))
        sc = q @ k.transpose(-1, -2) / math.sqrt(h // self.heads)
        if self.score_fn is not None:
            sc = self.score_fn(sc)
        p = torch.softmax(sc, -1)
        return x + self.o((p @ v).transpose(1, 2).reshape(b, s, h))


def attn(score_fn: Callable[[torch.Tensor], torch.Tensor] | None) -> Callable[[], Built]:
    def build() -> Built:
        torch.manual_seed(1)
        m = nn.Sequential(Attn(score_fn), Attn(score_fn))
        return m.eval(), (torch.randn(2, 8, 32, generator=torch.Generator().manual_seed(0)),), {}
    return build


class CustomSoftmax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, s):
        p = torch.softmax(s, -1)
        ctx.save_for_backward(p)
        return p.log()

    @staticmethod
    def backward(ctx, g):
        (p,) = ctx.saved_tensors
        return (g - p * g.sum(-1, keepdim=True)) * 0.8


# a deep stack whose layers pass a per-layer constant (from their index, which block capture allows to differ)
class IdxBlock(nn.Module):
    def __init__(self, idx: int, use_fn: bool) -> None:
        super().__init__()
        self.layer_idx, self.use_fn = idx, use_fn
        self.up, self.down = nn.Linear(H, 4 * H), nn.Linear(4 * H, H)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = 1.0 / (self.layer_idx + 1)  # GPT-2's scale_attn_by_inverse_layer_idx-like per-layer constant
        y = self.up(x)
        y = KwScale.apply(y, scale) if self.use_fn else torch.tanh(y) * scale
        return x + self.down(y)


class IdxNet(nn.Module):
    def __init__(self, use_fn: bool, layers: int = 6) -> None:
        super().__init__()
        self.layers = nn.ModuleList(IdxBlock(i, use_fn) for i in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def idx_stack(use_fn: bool) -> Callable[[], Built]:
    def build() -> Built:
        torch.manual_seed(1)
        return IdxNet(use_fn).eval(), (_x(),), {}
    return build


def _ste_act(m: nn.Module, y: torch.Tensor) -> torch.Tensor:
    return STE.apply(y)


def _gelu_act(m: nn.Module, y: torch.Tensor) -> torch.Tensor:
    return F.gelu(y, approximate="tanh")


class SameStack(nn.Module):
    """A deep stack whose layers call one Function with the same args: block capture should apply."""

    def __init__(self, use_fn: bool, layers: int = 6) -> None:
        super().__init__()
        act = _ste_act if use_fn else _gelu_act
        self.layers = nn.ModuleList(Block(act) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def same_stack(use_fn: bool) -> Callable[[], Built]:
    def build() -> Built:
        torch.manual_seed(1)
        return SameStack(use_fn).eval(), (_x(),), {}
    return build


# transformers
class FnAct(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return TwoOutAct.apply(x)


class TwoOutAct(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return F.silu(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * torch.sigmoid(x).clamp(max=0.8)


def llama_fn(ckpt: bool, fn: bool = True, layers: int = 2) -> Callable[[], Built]:
    def build() -> Built:
        m = models.llama(layers=layers)
        if fn:
            for layer in m.model.layers:
                layer.mlp.act_fn = FnAct()
        if ckpt:
            m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            m.train()
        else:
            m.eval()
        ids = models.token_inputs(m.config.vocab_size, 2, 8, seed=1)
        return m, (), {"input_ids": ids, "labels": models.token_inputs(m.config.vocab_size, 2, 8, seed=7)}
    return build


def family_train(name: str, **over: Any) -> Callable[[], Built]:
    def build() -> Built:
        m = _family(name, **over).train()
        for mod in m.modules():  # deterministic: dropout off, train mode kept
            if isinstance(mod, nn.Dropout):
                mod.p = 0.0
        ids = models.token_inputs(m.config.vocab_size, 2, 8, seed=1)
        return m, (), {"input_ids": ids, "labels": models.token_inputs(m.config.vocab_size, 2, 8, seed=7)}
    return build


def _hook_setup(m: nn.Module) -> None:
    for b in m.layers:
        b.register_forward_hook(lambda mod, a, out: out * 1.1)
        b.up.register_forward_hook(lambda mod, a, out: STE.apply(out))


# ------------------------------------------------------------------------------------------------ cases


@dataclass
class Case:
    name: str
    build: Callable[[], Built]
    plain: Callable[[], Built] | None = None
    worlds: tuple[int, ...] = (1, 2, 4)
    note: str = ""
    seeded: bool = False  # random forward: reseed the global RNG before the reference and the rank (t=1 only)
    fwd_only: bool = False  # compare forward outputs only (no_grad), the ranks' graphs called twice
    expect_ops: bool = True  # the model's graph should hold tpfx::function ops (else NOT-HONOURED)


CASES: list[Case] = [
    Case("ste_baseline", mlp(lambda m, y: STE.apply(y)), PLAIN_GELU),
    Case("nontensor_args", mlp(lambda m, y: ScaledArgs.apply(y, 0.7, 3, None, (0.1, 0.2))), PLAIN_GELU),
    Case("kwargs", mlp(lambda m, y: KwScale.apply(y, scale=0.5)), PLAIN_GELU),
    Case("tuple_out", mlp(lambda m, y: (lambda a: a[0] * a[1])(TwoOut.apply(y))), PLAIN_GELU),
    Case("tuple_out_one_used", mlp(lambda m, y: TwoOut.apply(y)[1]), PLAIN_GELU),
    Case("out_tensor_none", mlp(lambda m, y: OutNone.apply(y)[0]), PLAIN_GELU),
    Case("mark_non_differentiable", mlp(lambda m, y: (lambda a: a[0] + a[1].float())(NonDiffMask.apply(y))),
         PLAIN_GELU),
    Case("needs_input_grad_bias", mlp(lambda m, y: NeedsGrad.apply(y, m.b2), setup=_bias_setup), PLAIN_GELU),
    Case("needs_input_grad_frozen", mlp(lambda m, y: NeedsGrad.apply(y, m.b2), setup=lambda m: (
        _bias_setup(m), [b.b2.requires_grad_(False) for b in m.layers])), PLAIN_GELU),
    Case("materialize_false_one_used", mlp(lambda m, y: NoMaterialize.apply(y)[0]), PLAIN_GELU,
         note="backward branches on None vs zeros"),
    Case("once_differentiable", mlp(lambda m, y: OnceDiff.apply(y)), PLAIN_GELU),
    Case("qat_weight_elementwise", qat(QuantW), qat(None)),
    Case("qat_weight_absmean", qat(AbsMeanQuantW), qat(None)),
    Case("called_twice", mlp(lambda m, y: STE.apply(STE.apply(y) * 1.3)), PLAIN_GELU),
    Case("broadcast_bias_act", mlp(lambda m, y: BiasAct.apply(y, m.b2), setup=_bias_setup), PLAIN_GELU),
    Case("fwd_point_bwd_row", mlp(lambda m, y: FwdPointBwdRow.apply(y)), PLAIN_GELU),
    Case("fwd_row_bwd_point", mlp(lambda m, y: FwdRowBwdPoint.apply(y)), PLAIN_GELU),
    Case("inplace_mark_dirty", mlp(lambda m, y: InplaceRelu.apply(y * 1.0)), PLAIN_GELU),
    Case("inplace_mark_dirty_reread", mlp(lambda m, y: (lambda z: InplaceRelu.apply(z) + z)(y * 1.0)), PLAIN_GELU,
         note="caller reads the mutated input"),
    Case("inplace_temp", mlp(lambda m, y: InplaceTemp.apply(y)), PLAIN_GELU),
    Case("grad_reverse_view", mlp(lambda m, y: GradReverse.apply(y, 0.3)), mlp(lambda m, y: y * 1.0),
         note="gradient reversal returns x.view_as(x)"),
    Case("grad_reverse_clone", mlp(lambda m, y: GradReverseClone.apply(y, 0.3)), mlp(lambda m, y: y * 1.0)),
    Case("int_out_argmax", mlp(lambda m, y: (lambda a: a[0] + a[1].unsqueeze(-1).float() * 0.01)(IntOut.apply(y))),
         PLAIN_GELU),
    Case("int_out_pointwise", mlp(lambda m, y: (lambda a: a[0] + a[1].float() * 0.01)(IntOutPointwise.apply(y))),
         PLAIN_GELU),
    Case("forward_hooks", mlp(lambda m, y: F.gelu(y), setup=_hook_setup), PLAIN_GELU, expect_ops=False,
         note="the Function runs inside tpfx::hook (eager_hooks); its extra gather is the hook's"),
    Case("nested", mlp(lambda m, y: Outer.apply(y)), PLAIN_GELU),
    Case("nested_grad_through_inner", mlp(lambda m, y: OuterGrad.apply(y)), PLAIN_GELU),
    Case("global_rng_dropout_t1", mlp(lambda m, y: GlobalDropout.apply(y, 0.3)), PLAIN_GELU, worlds=(1,),
         seeded=True, note="same seed before reference and rank; mask saved for backward"),
    Case("generator_stochround", mlp(lambda m, y: StochRound.apply(y, torch.Generator().manual_seed(5))),
         PLAIN_GELU, worlds=(1, 2), note="fresh generator made in forward each call"),
    Case("shape_scalar_fwd", mlp(lambda m, y: ShapeScaled.apply(y)), PLAIN_GELU, note="1/sqrt(x.shape[-1])"),
    Case("numel_scalar_bwd", mlp(lambda m, y: F.gelu(GradMeanScale.apply(y))), PLAIN_GELU, note="g*64/g.numel()"),
    Case("bf16_inside", mlp(lambda m, y: Bf16Act.apply(y)), PLAIN_GELU),
    Case("attn_softcap", attn(lambda s: Softcap.apply(s, 5.0)), attn(lambda s: torch.tanh(s / 5.0) * 5.0)),
    Case("attn_custom_softmax", attn(CustomSoftmax.apply), attn(lambda s: torch.log_softmax(s, -1))),
    Case("module_arg_frozen", mlp(lambda m, y: ModuleArg.apply(y, m.frozen), setup=_proj_setup),
         mlp(lambda m, y: m.frozen(y), setup=_proj_setup)),
    Case("prebound_apply_alias", mlp(lambda m, y: ste_bound(y)), PLAIN_GELU,
         note="ste_bound = STE.apply at import"),
    Case("same_tensor_twice", mlp(lambda m, y: Mul2.apply(y, y)), PLAIN_GELU),
    Case("returns_input_itself", mlp(lambda m, y: ReturnsInput.apply(y)), mlp(lambda m, y: y * 1.0)),
    Case("inplace_reread_fwd_only", mlp(lambda m, y: (lambda z: InplaceRelu.apply(z) + z)(y * 1.0)), PLAIN_GELU,
         fwd_only=True, note="forward only (the backward re-run crashes, see inplace_mark_dirty)"),
    Case("generator_twice_fwd_only", mlp(lambda m, y: StochRound.apply(y, torch.Generator().manual_seed(5))),
         PLAIN_GELU, worlds=(1,), fwd_only=True, note="forward twice; a fresh generator each call unsharded"),
    Case("closure_channel_table", mlp(lambda m, y: ChannelTable.apply(y)), PLAIN_GELU),
    Case("data_dependent_branch", mlp(lambda m, y: DataDepBranch.apply(y)), PLAIN_GELU),
    Case("numpy_forward", mlp(lambda m, y: NumpyFwd.apply(y)), PLAIN_GELU),
    Case("tensor_kwarg", mlp(lambda m, y: ScaleByTensorKw.apply(y, gate=y * 0.5 + 1)), PLAIN_GELU),
    Case("custom_embedding", embed(True), embed(False)),
    Case("partial_operand", mlp(lambda m, y: y), PLAIN_GELU, note="placeholder, replaced below"),
    Case("block_stack_same_args", same_stack(True), same_stack(False), worlds=(1, 2)),
    Case("block_stack_per_layer_scale", idx_stack(True), idx_stack(False), worlds=(1, 2)),
    Case("llama_mlp_act_fn", llama_fn(False), llama_fn(False, fn=False), worlds=(1, 2)),
    Case("llama_grad_ckpt_act_fn", llama_fn(True), llama_fn(True, fn=False), worlds=(1, 2)),
    Case("llama_deep_act_fn_blocks", llama_fn(False, layers=5), llama_fn(False, fn=False, layers=5), worlds=(2,)),
    Case("bloom_train", family_train("bloom"), None, worlds=(1, 2)),
    Case("recurrent_gemma_train", family_train("recurrent_gemma"), None, worlds=(1, 2)),
    Case("rwkv_train", family_train("rwkv"), None, worlds=(1, 2), expect_ops=False,
         note="RWKV's WKV Function is CUDA-only; the CPU path is plain ops"),
]


class PartialNet(nn.Module):
    def __init__(self, use_fn: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.ModuleDict({"up": nn.Linear(H, 4 * H), "down": nn.Linear(4 * H, H, bias=False)})
                                    for _ in range(2))
        self.use_fn = use_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for d in self.layers:
            z = d["down"](F.gelu(d["up"](x)))  # partial sum per rank before its reduction
            x = x + (PartialIn.apply(z) if self.use_fn else torch.sigmoid(z) * 2)
        return x


def _partial(use_fn: bool) -> Callable[[], Built]:
    def build() -> Built:
        torch.manual_seed(1)
        return PartialNet(use_fn).eval(), (_x(),), {}
    return build


for _i, _c in enumerate(CASES):
    if _c.name == "partial_operand":
        CASES[_i] = Case("partial_operand", _partial(True), _partial(False))


# ------------------------------------------------------------------------------------------------ running


@dataclass
class Row:
    case: str
    t: int
    verdict: str = ""
    fwd: float = math.nan
    grad: float = math.nan
    comm: tuple[int, int] | None = None
    plain: tuple[int, int] | None = None
    ops: int = -1
    blocks: str = ""
    error: str = ""
    seconds: float = 0.0


_BLOCKS_LOG: list[str] = []
_orig_capture_blocks = _blocks.capture_blocks


def _logged_capture_blocks(*a: Any, **k: Any) -> Any:
    got = _orig_capture_blocks(*a, **k)
    _BLOCKS_LOG.append("stitched" if not isinstance(got, str) else f"whole: {got[:90]}")
    return got


_blocks.capture_blocks = _logged_capture_blocks


def _seeded_simulate(model: nn.Module, plan: Any, args: tuple, kwargs: dict[str, Any]) -> Any:
    """simulate at t=1 with the global RNG reseeded before the reference and before the rank's forward."""
    import lora_attack
    import simulate as sim

    orig_emit = sim.emit_all

    def emit_seeded(p: Any) -> Any:
        ranks = orig_emit(p)
        out = []
        for gm, store in ranks:
            class G:
                def __init__(self, gm: Any) -> None:
                    self.gm = gm

                def __call__(self, *a: Any, **k: Any) -> Any:
                    torch.manual_seed(123)
                    return self.gm(*a, **k)
            out.append((G(gm), store))
        return out

    orig_model_call = model.forward

    def fwd(*a: Any, **k: Any) -> Any:
        torch.manual_seed(123)
        return orig_model_call(*a, **k)

    lora_attack.emit_all = emit_seeded
    model.forward = fwd  # type: ignore[method-assign]
    try:
        return simulate(model, plan, args, kwargs, torch.float32)
    finally:
        lora_attack.emit_all = orig_emit
        del model.forward


def _fwd_only(model: nn.Module, plan: Any, args: tuple, kwargs: dict[str, Any]) -> Any:
    from types import SimpleNamespace

    from numerics import rel_err
    from simulate import emit_all, run_ranks

    with torch.no_grad():
        want = [model(*args, **kwargs) for _ in range(2)]
        ranks = emit_all(plan)
        got = run_ranks(plan.world_size, lambda r: [ranks[r][0](*args, **kwargs) for _ in range(2)])
    err = max(rel_err(g[i], w) for g in got for i, w in enumerate(want))
    return SimpleNamespace(fwd=err, grad=0.0)


def run(case: Case, t: int) -> Row:
    row = Row(case.name, t)
    start = time.time()
    try:
        model, args, kwargs = case.build()
        _BLOCKS_LOG.clear()
        gm, a, k = _capture(model, args, kwargs)
        row.blocks = _BLOCKS_LOG[-1] if _BLOCKS_LOG else ""
        row.ops = sum(n.target is FUNCTION_OP for n in gm.graph.nodes)
        plan = _plan(gm, t, None, old=False)
        row.comm = fwd_comm(plan)
        if case.plain is not None:
            try:
                pm, pa, pk = case.plain()
                row.plain = fwd_comm(_plan(_capture(pm, pa, pk)[0], t, None, old=False))
            except Exception as e:  # noqa: BLE001
                row.plain = None
                row.error = f"(plain failed: {type(e).__name__}: {str(e)[:80]}) "
        if case.fwd_only:
            n = _fwd_only(model, plan, a, k)
        else:
            n = _seeded_simulate(model, plan, a, k) if case.seeded else simulate(model, plan, a, k, torch.float32)
        row.fwd, row.grad = n.fwd, n.grad
        bad = []
        if not (n.fwd <= TOL and n.grad <= TOL):
            bad.append("WRONG")
        if row.plain is not None and row.comm[0] > row.plain[0]:
            bad.append("EXTRA-COMM")
        if row.ops == 0 and case.expect_ops:
            bad.append("NOT-HONOURED")
        row.verdict = ",".join(bad) or "ok"
    except Exception as e:  # noqa: BLE001
        row.verdict = "CRASH"
        row.error += f"{type(e).__name__}: {str(e)[:240]}".replace("\n", " ")
        if "-v" in sys.argv:
            traceback.print_exc()
    row.seconds = time.time() - start
    return row


def _fmt(r: Row) -> str:
    c = f"{r.comm[0]}/{r.comm[1]}" if r.comm else "-"
    p = f"{r.plain[0]}/{r.plain[1]}" if r.plain else "-"
    return (f"{r.case:30s} t={r.t} {r.verdict:18s} fwd={r.fwd:9.2e} grad={r.grad:9.2e} ops={r.ops:2d} "
            f"comm={c:10s} plain={p:10s} {r.seconds:5.1f}s {r.blocks[:60]} {r.error}")


def main() -> None:
    names = [a for a in sys.argv[1:] if not a.startswith("-")]
    rows = []
    for case in CASES:
        if names and not any(n in case.name for n in names):
            continue
        for t in case.worlds:
            r = run(case, t)
            rows.append(r)
            print(_fmt(r), flush=True)
    print("\nsummary:")
    for r in rows:
        if r.verdict != "ok":
            print("  ", _fmt(r))


if __name__ == "__main__":
    main()
