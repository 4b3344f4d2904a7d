"""Non-transformer models and the rank function for ``tests/test_nn_modules.py`` (module level so spawned
ranks can import them).

``nn_check(rank, world, names)`` shards each named model with ``tpfx.auto_shard`` and compares it with an
unsharded copy built from the same seed: forward on an input shape different from the example, gradients of
every parameter (``tpfx.shard_tensor`` of the reference gradient), one SGD step and a second forward, and the
batch-norm running statistics this rank owns. It returns plain numbers for the pytest side to assert on.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from numerics import grad_errors, rel_err
from torch import nn

import tpfx


class CNN(nn.Module):
    """Conv2d(3,16,3) -> ReLU -> Conv2d(16,32,3) -> ReLU -> AdaptiveAvgPool2d(1) -> Flatten -> Linear(32,10)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 16, 3), nn.ReLU(), nn.Conv2d(16, 32, 3), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class Depthwise(nn.Module):
    """Pointwise Conv1d(8,16) -> depthwise Conv1d(16,16,3,groups=16) -> ReLU -> pointwise Conv1d(16,8)."""

    def __init__(self) -> None:
        super().__init__()
        self.pw = nn.Conv1d(8, 16, 1)
        self.dw = nn.Conv1d(16, 16, 3, padding=1, groups=16)
        self.out = nn.Conv1d(16, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(torch.relu(self.dw(self.pw(x))))


class ConvNorm(nn.Module):
    """Conv -> BatchNorm -> ReLU -> MaxPool -> GroupNorm -> grouped Conv -> AvgPool -> Conv (no bias) -> mean."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1, bias=False)  # a bias before BatchNorm is a no-op
        self.bn = nn.BatchNorm2d(16)
        self.gn = nn.GroupNorm(4, 16)
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.c2 = nn.Conv2d(16, 8, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.max_pool2d(torch.relu(self.bn(self.c1(x))), 2)
        x = nn.functional.avg_pool2d(self.grouped(self.gn(x)), 2)
        return self.c2(x).mean((2, 3))


class Upsampler(nn.Module):
    """Conv -> InstanceNorm (affine) -> ReLU -> nearest upsampling -> reflection pad -> ConvTranspose2d."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)  # a bias before InstanceNorm is a no-op
        self.inorm = nn.InstanceNorm2d(8, affine=True)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.inorm(self.c1(x)))
        x = nn.functional.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.up(nn.functional.pad(x, (1, 1, 1, 1), mode="reflect"))


class MHAEncoder(nn.Module):
    """Pre-norm block: nn.MultiheadAttention (embed 32, 4 heads, batch_first) + LayerNorm + GELU MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(32), nn.LayerNorm(32)
        self.attn = nn.MultiheadAttention(32, 4, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class NoGradCycles(nn.Module):
    """HRM-style one-step gradient: two refinement cycles under ``torch.no_grad()``, then one with gradients,
    all through the same MLP (its weights are used inside and outside the no-grad region)."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(16, 32), nn.Linear(32, 16)

    def step(self, z: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return z + self.down(torch.relu(self.up(z + x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = torch.zeros_like(x)
        with torch.no_grad():
            z = self.step(self.step(z, x), x)
        return self.step(z, x)


class FoldedHeadsAttention(nn.Module):
    """BLOOM-style attention: fused qkv, heads folded into the batch (``[B*n, S, d]``) for ``baddbmm`` with a
    per-head bias tiled over the batch (``repeat``, like BLOOM's alibi) and ``bmm``, then unfolded; an MLP."""

    def __init__(self, hidden: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.n, self.d = heads, hidden // heads
        self.qkv, self.dense = nn.Linear(hidden, 3 * hidden), nn.Linear(hidden, hidden)
        self.up, self.down = nn.Linear(hidden, 2 * hidden), nn.Linear(2 * hidden, hidden)
        self.register_buffer("slopes", torch.linspace(0.5, 0.05, heads))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        qkv = self.qkv(x).view(b, s, self.n, 3, self.d)  # (B, S, n, 3, d), per-head interleaved
        q, k, v = (qkv[..., i, :].transpose(1, 2).reshape(b * self.n, s, self.d) for i in range(3))  # (B*n, S, d)
        bias = (self.slopes[:, None, None] * torch.arange(s, dtype=x.dtype)).repeat(b, 1, 1)  # (B*n, 1, S)
        scores = torch.baddbmm(bias, q, k.transpose(1, 2), beta=1.0, alpha=self.d ** -0.5)  # (B*n, S, S)
        probs = scores.view(b, self.n, s, s).softmax(-1)  # (B, n, S, S)
        ctx = torch.bmm(probs.view(b * self.n, s, s), v).view(b, self.n, s, self.d)  # (B, n, S, d)
        x = x + self.dense(ctx.permute(0, 2, 1, 3).reshape(b, s, -1))
        return x + self.down(torch.relu(self.up(x)))


class MultiQueryAttention(nn.Module):
    """Falcon-7B-style multi-query attention: one fused projection ``[n*d | d | d]`` (n query heads, one key and
    one value head), viewed as ``n + 2`` heads and taken apart by a slice and two list indexes (``[-2]``,
    ``[-1]``); the single key/value head broadcasts against the query heads; an MLP."""

    def __init__(self, hidden: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.n, self.d = heads, hidden // heads
        self.qkv, self.dense = nn.Linear(hidden, hidden + 2 * self.d), nn.Linear(hidden, hidden)
        self.up, self.down = nn.Linear(hidden, 2 * hidden), nn.Linear(2 * hidden, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        qkv = self.qkv(x).view(b, s, self.n + 2, self.d)  # (B, S, n+2, d): n/t query heads + k + v per rank
        q, k, v = (t.transpose(1, 2) for t in (qkv[:, :, :-2], qkv[:, :, [-2]], qkv[:, :, [-1]]))  # k, v: (B, 1, S, d)
        ctx = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, n/t, S, d)
        x = x + self.dense(ctx.transpose(1, 2).reshape(b, s, -1))
        return x + self.down(torch.relu(self.up(x)))


class SparseMLP(nn.Module):
    """Gemma-3n-style activation sparsity: keep the gate activations above mean + 1.65 std of the intermediate
    dim (``torch.std`` over the dim a column split shards), written with ``torch.multiply`` (an ATen alias)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate, self.up, self.down = nn.Linear(16, 32), nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = self.gate(x)  # (B, S, I/t)
        cut = g.mean(-1, keepdim=True) + 1.65 * torch.std(g, dim=-1, keepdim=True, unbiased=False)  # (B, S, 1)
        g = torch.relu(g - cut)
        return x + self.down(torch.multiply(torch.nn.functional.gelu(g), self.up(x)))


def _conv_norm_eval() -> nn.Module:
    m = ConvNorm()
    with torch.no_grad():  # non-trivial running statistics, so eval mode reads them
        m.bn.running_mean.uniform_(-0.5, 0.5)
        m.bn.running_var.uniform_(0.5, 2.0)
    return m.eval()


def _encoder_layer() -> nn.Module:
    return nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)


@dataclass(frozen=True)
class NNCase:
    build: Callable[[], nn.Module]
    example: tuple[int, ...]  # input shape handed to auto_shard
    check: tuple[int, ...]  # another shape for the checked calls (dynamic batch / spatial dims)
    static: bool = False  # capture without dynamic dims (MHA's batch*heads view then has static sizes)


CASES: dict[str, NNCase] = {
    "cnn": NNCase(CNN, (2, 3, 12, 12), (3, 3, 10, 10)),
    "depthwise": NNCase(Depthwise, (2, 8, 10), (3, 8, 7)),
    "conv_norm": NNCase(ConvNorm, (2, 3, 12, 12), (3, 3, 8, 8)),
    "conv_norm_eval": NNCase(_conv_norm_eval, (2, 3, 12, 12), (3, 3, 8, 8)),
    "upsampler": NNCase(Upsampler, (2, 3, 6, 6), (3, 3, 5, 7)),
    "mha_encoder": NNCase(MHAEncoder, (2, 6, 32), (3, 5, 32)),
    "encoder_layer": NNCase(_encoder_layer, (2, 6, 32), (3, 5, 32)),
    "mha_encoder_static": NNCase(MHAEncoder, (2, 6, 32), (2, 6, 32), static=True),
    "no_grad_cycles": NNCase(NoGradCycles, (2, 6, 16), (3, 5, 16)),
    "folded_heads": NNCase(FoldedHeadsAttention, (2, 6, 32), (3, 5, 32)),
    "sparse_mlp": NNCase(SparseMLP, (2, 6, 16), (3, 5, 16)),
    "multi_query": NNCase(MultiQueryAttention, (2, 6, 32), (3, 5, 32)),
}


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return CASES[name].build()


def inputs(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


@contextmanager
def static_capture(on: bool) -> Any:
    """Make ``tpfx`` capture without dynamic dims (its capture tries dynamic dims first)."""
    import tpfx.passes.capture

    if not hasattr(tpfx.passes.capture, "dynamic_spec"):
        raise RuntimeError("tpfx.passes.capture.dynamic_spec is gone: update nn_cases.static_capture")
    saved = tpfx.passes.capture.dynamic_spec
    if on:
        tpfx.passes.capture.dynamic_spec = lambda *a, **k: None  # type: ignore[assignment]
    try:
        yield
    finally:
        tpfx.passes.capture.dynamic_spec = saved  # type: ignore[assignment]


def _objective(y: torch.Tensor, seed: int = 1234) -> torch.Tensor:
    proj = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed))
    return (y * proj).sum() / y.numel()


def _buffer_errors(sharded: nn.Module, ref: nn.Module, x: torch.Tensor, rank: int) -> dict[str, float]:
    """Each running statistic of the sharded module (whole on every rank) vs the reference."""
    mine = dict(sharded.named_buffers())
    return {name: rel_err(mine[name], buf) for name, buf in ref.named_buffers()
            if name.endswith(("running_mean", "running_var"))}


def check_one(rank: int, world: int, name: str) -> dict[str, Any]:
    case = CASES[name]
    ref, model = build(name), build(name)
    with static_capture(case.static):
        sharded = tpfx.auto_shard(model, world, example_inputs=(inputs(case.example, 1),))
        x = inputs(case.check, 2)
        y, ref_y = sharded(x), ref(x)
        res: dict[str, Any] = {"forward": rel_err(y, ref_y)}
        _objective(y).backward()
        _objective(ref_y).backward()
        grads = grad_errors(sharded, ref, rank)
        res["grad"] = max(grads.values())
        res["grad_worst"] = max(grads, key=lambda k: grads[k])
        res["buffers"] = _buffer_errors(sharded, ref, x, rank)
        for m in (sharded, ref):
            with torch.no_grad():
                for p in m.parameters():
                    p -= 0.1 * p.grad
        x2 = inputs(case.check, 3)
        res["after_step"] = rel_err(sharded(x2), ref(x2))
    plan = sharded.plan
    res["styles"] = {k: v.style for k, v in plan.placements.items()}
    res["local_numel"] = sum(tpfx.local(p).numel() for p in sharded.parameters())
    res["full_numel"] = sum(p.numel() for p in ref.parameters())
    return res


def nn_check(rank: int, world: int, names: list[str]) -> dict[str, Any]:
    """``check_one`` for each model; an exception is reported for its model (plans agree across ranks, so
    every rank fails the same model and the others still run)."""
    torch.set_num_threads(1)
    out: dict[str, Any] = {}
    for name in names:
        try:
            out[name] = check_one(rank, world, name)
        except Exception:  # noqa: BLE001 - reported to the pytest side
            out[name] = traceback.format_exc()
    return out


__all__ = ["CASES", "CNN", "ConvNorm", "Depthwise", "FoldedHeadsAttention", "MHAEncoder", "MultiQueryAttention", "SparseMLP", "Upsampler", "build",
           "inputs", "nn_check"]
