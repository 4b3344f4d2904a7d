"""Random models in plain PyTorch for the plan fuzzer (tests/test_fuzz.py), drawn by hypothesis.

A model is an input stage (token embedding with an uneven vocabulary, or a linear from dense features), a
stack of random blocks over a hidden size ``h``, and a head (a linear, tied to the embedding or not, with an
optional in-model cross-entropy). Blocks:

- ``mlp``: two linears (bias or not), an activation, optionally gated (a second up projection, separate or
  fused and cut by ``chunk`` / ``split`` / slices);
- ``attn``: q/k/v as three linears or one fused projection cut by ``split`` / slices / ``chunk``; MHA, GQA or
  MQA with random head counts (key/value heads 1-7, often prime to the world size) and head dims (2-16);
  heads made by ``view`` / ``reshape`` / ``unflatten`` and ``transpose`` / ``permute``; key/value heads
  repeated by ``repeat_interleave`` or ``expand`` + ``reshape``; ``scaled_dot_product_attention``, softmax
  written out with ``@`` or ``einsum``; heads merged by ``reshape`` / ``flatten`` /
  ``.contiguous().view(b, s, -1)``;
- ``parts``: one projection cut into 2-4 parts of random sizes, each part activated, then concatenated
  into one down projection or each given its own down projection (summed);
- ``parallel``: attention and MLP on the same normed input, both added to the residual;
- ``mix``: features regrouped by ``view`` + ``transpose`` + ``reshape`` (a permutation of the hidden dim);
- ``pointwise``: elementwise ops with per-feature scale and shift parameters;
- ``unknown``: an op with no sharding rule (``roll``, ``flip`` along features, ``sinc``, ``atan2``).

Each block has a pre-norm (``LayerNorm``, an RMSNorm written by hand, or none) and a residual add.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from hypothesis import strategies as st
from torch import nn

BATCH, SEQ = 2, 5
ACTS = ("gelu", "silu", "relu", "tanh")
UNKNOWN = ("roll", "flip", "sinc", "atan2")


@dataclass(frozen=True)
class Block:
    kind: str
    norm: str  # "layer" | "rms" | "none"
    opts: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Spec:
    hidden: int
    vocab: int  # 0: dense inputs of ``features`` features
    features: int
    tied: bool
    in_model_loss: bool
    blocks: tuple[Block, ...]
    seed: int

    def describe(self) -> str:
        inp = f"vocab {self.vocab}{' tied' if self.tied else ''}" if self.vocab else f"dense {self.features}"
        body = ", ".join(f"{b.kind}({b.norm}; " + " ".join(f"{k}={v}" for k, v in b.opts.items()) + ")"
                         for b in self.blocks)
        return f"h={self.hidden} {inp}{' +loss' if self.in_model_loss else ''}: {body}"


# ----------------------------------------------------------------------------- strategies


@st.composite
def _attn_opts(draw: Any, hidden: int) -> dict[str, Any]:
    kv = draw(st.sampled_from((1, 2, 3, 4, 5, 7)))  # head counts prime to most world sizes
    heads = kv * draw(st.sampled_from((1, 2, 3)))  # MHA when the factor is 1, MQA when kv == 1
    fused = draw(st.sampled_from(("none", "split", "slice") + (("chunk",) if heads == kv else ())))
    return {"heads": heads, "kv": kv, "head_dim": draw(st.sampled_from((2, 3, 4, 8, 16))),
            "bias": draw(st.booleans()),
            "fused": fused, "split_heads": draw(st.sampled_from(("view", "reshape", "unflatten"))),
            "order": draw(st.sampled_from(("transpose", "permute"))),
            "repeat": draw(st.sampled_from(("repeat_interleave", "expand"))),
            "core": draw(st.sampled_from(("sdpa", "manual", "einsum"))), "causal": draw(st.booleans()),
            "merge": draw(st.sampled_from(("reshape", "flatten", "contiguous_view")))}


@st.composite
def _mlp_opts(draw: Any, hidden: int) -> dict[str, Any]:
    return {"ffn": draw(st.sampled_from((4, 6, 8, 12, 16, 20))), "act": draw(st.sampled_from(ACTS)),
            "bias": draw(st.booleans()), "gate": draw(st.sampled_from(("none", "separate", "chunk", "split", "slice")))}


@st.composite
def _parts_opts(draw: Any, hidden: int) -> dict[str, Any]:
    parts = draw(st.lists(st.integers(1, 12), min_size=2, max_size=4))
    return {"parts": tuple(parts), "cut": draw(st.sampled_from(("split", "slice"))),
            "down": draw(st.sampled_from(("cat", "each"))), "act": draw(st.sampled_from(ACTS)),
            "bias": draw(st.booleans())}


@st.composite
def _block(draw: Any, hidden: int) -> Block:
    kind = draw(st.sampled_from(("mlp", "attn", "parts", "parallel", "mix", "pointwise", "unknown")))
    norm = draw(st.sampled_from(("layer", "rms", "none")))
    if kind == "mlp":
        opts = draw(_mlp_opts(hidden))
    elif kind == "attn":
        opts = draw(_attn_opts(hidden))
    elif kind == "parts":
        opts = draw(_parts_opts(hidden))
    elif kind == "parallel":
        opts = {"attn": draw(_attn_opts(hidden)), "mlp": draw(_mlp_opts(hidden))}
    elif kind == "mix":
        divs = [g for g in range(2, hidden) if hidden % g == 0]
        opts = {"groups": draw(st.sampled_from(divs))} if divs else {"groups": 1}
    elif kind == "unknown":
        opts = {"op": draw(st.sampled_from(UNKNOWN))}
    else:
        opts = {"act": draw(st.sampled_from(ACTS))}
    return Block(kind, norm, opts)


@st.composite
def specs(draw: Any) -> Spec:
    hidden = draw(st.sampled_from((8, 12, 16, 24)))
    vocab = draw(st.sampled_from((0, 0, 17, 33, 50, 64)))
    blocks = draw(st.lists(_block(hidden), min_size=1, max_size=4))
    return Spec(hidden=hidden, vocab=vocab, features=draw(st.sampled_from((6, 8, 10))),
                tied=vocab > 0 and draw(st.booleans()), in_model_loss=vocab > 0 and draw(st.booleans()),
                blocks=tuple(blocks), seed=draw(st.integers(0, 2**16)))


# ----------------------------------------------------------------------------- modules


class RMSNorm(nn.Module):
    def __init__(self, h: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(1 + 0.1 * torch.randn(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


def _norm(kind: str, h: int) -> nn.Module:
    if kind == "layer":
        return nn.LayerNorm(h)
    return RMSNorm(h) if kind == "rms" else nn.Identity()


def _act(name: str, x: torch.Tensor) -> torch.Tensor:
    return {"gelu": F.gelu, "silu": F.silu, "relu": F.relu, "tanh": torch.tanh}[name](x)


def _cut(x: torch.Tensor, sizes: tuple[int, ...], how: str) -> list[torch.Tensor]:
    """Cut the last dim into parts of ``sizes``: by ``split``, ``chunk`` (equal sizes) or slices."""
    if how == "split":
        return list(x.split(list(sizes), -1))
    if how == "chunk":
        return list(x.chunk(len(sizes), -1))
    offs = [0] + [sum(sizes[: i + 1]) for i in range(len(sizes))]
    return [x[..., a:b] for a, b in zip(offs, offs[1:])]


class MLP(nn.Module):
    def __init__(self, h: int, o: dict[str, Any]) -> None:
        super().__init__()
        self.o, f = o, o["ffn"]
        fused = o["gate"] in ("chunk", "split", "slice")
        self.up = nn.Linear(h, 2 * f if fused else f, bias=o["bias"])
        self.gate = nn.Linear(h, f, bias=o["bias"]) if o["gate"] == "separate" else None
        self.down = nn.Linear(f, h, bias=o["bias"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, S, h)
        u = self.up(x)  # (B, S, f) or (B, S, 2f)
        if self.gate is not None:
            u = _act(self.o["act"], self.gate(x)) * u
        elif self.o["gate"] != "none":
            g, u = _cut(u, (self.o["ffn"],) * 2, self.o["gate"])
            u = _act(self.o["act"], g) * u
        else:
            u = _act(self.o["act"], u)
        return self.down(u)


class Attention(nn.Module):
    def __init__(self, h: int, o: dict[str, Any]) -> None:
        super().__init__()
        self.o = o
        nq, nkv = o["heads"] * o["head_dim"], o["kv"] * o["head_dim"]
        self.sizes = (nq, nkv, nkv)
        if o["fused"] == "none":
            self.q, self.k, self.v = (nn.Linear(h, n, bias=o["bias"]) for n in self.sizes)
        else:
            self.qkv = nn.Linear(h, sum(self.sizes), bias=o["bias"])
        self.out = nn.Linear(nq, h, bias=o["bias"])

    def _heads(self, x: torch.Tensor, n: int) -> torch.Tensor:  # (B, S, n*d) -> (B, n, S, d)
        b, s, d = x.shape[0], x.shape[1], self.o["head_dim"]
        how = self.o["split_heads"]
        x = x.view(b, s, n, d) if how == "view" else x.reshape(b, s, n, d) if how == "reshape" \
            else x.unflatten(-1, (n, d))
        return x.transpose(1, 2) if self.o["order"] == "transpose" else x.permute(0, 2, 1, 3)

    def _repeat(self, x: torch.Tensor) -> torch.Tensor:  # (B, kv, S, d) -> (B, heads, S, d)
        r = self.o["heads"] // self.o["kv"]
        if r == 1:
            return x
        if self.o["repeat"] == "repeat_interleave":
            return x.repeat_interleave(r, dim=1)
        b, kv, s, d = x.shape
        return x[:, :, None].expand(b, kv, r, s, d).reshape(b, kv * r, s, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, S, h)
        if self.o["fused"] == "none":
            q, k, v = self.q(x), self.k(x), self.v(x)
        else:
            q, k, v = _cut(self.qkv(x), self.sizes, self.o["fused"])
        q = self._heads(q, self.o["heads"])  # (B, heads, S, d)
        k = self._repeat(self._heads(k, self.o["kv"]))
        v = self._repeat(self._heads(v, self.o["kv"]))
        if self.o["core"] == "sdpa":
            a = F.scaled_dot_product_attention(q, k, v, is_causal=self.o["causal"])
        else:
            scores = q @ k.transpose(-1, -2) if self.o["core"] == "manual" \
                else torch.einsum("bhsd,bhud->bhsu", q, k)  # (B, heads, S, S)
            scores = scores / math.sqrt(self.o["head_dim"])
            if self.o["causal"]:
                s = x.shape[1]
                mask = torch.ones(s, s, dtype=torch.bool).tril()
                scores = scores.masked_fill(~mask, float("-inf"))
            a = scores.softmax(-1) @ v if self.o["core"] == "manual" else torch.einsum("bhsu,bhud->bhsd", scores.softmax(-1), v)
        a = a.transpose(1, 2)  # (B, S, heads, d)
        if self.o["merge"] == "contiguous_view":
            return self.out(a.contiguous().view(a.shape[0], a.shape[1], -1))
        a = a.reshape(a.shape[0], a.shape[1], -1) if self.o["merge"] == "reshape" else a.flatten(2)
        return self.out(a)


class Parts(nn.Module):
    def __init__(self, h: int, o: dict[str, Any]) -> None:
        super().__init__()
        self.o = o
        self.proj = nn.Linear(h, sum(o["parts"]), bias=o["bias"])
        if o["down"] == "cat":
            self.down = nn.Linear(sum(o["parts"]), h, bias=o["bias"])
        else:
            self.downs = nn.ModuleList(nn.Linear(p, h, bias=o["bias"]) for p in o["parts"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = [_act(self.o["act"], p) for p in _cut(self.proj(x), self.o["parts"], self.o["cut"])]
        if self.o["down"] == "cat":
            return self.down(torch.cat(parts, -1))
        return sum((d(p) for d, p in zip(self.downs, parts)), torch.zeros_like(x))


class BlockModule(nn.Module):
    def __init__(self, h: int, b: Block) -> None:
        super().__init__()
        self.kind, self.o = b.kind, b.opts
        self.norm = _norm(b.norm, h)
        if b.kind == "mlp":
            self.mlp = MLP(h, b.opts)
        elif b.kind == "attn":
            self.attn = Attention(h, b.opts)
        elif b.kind == "parts":
            self.parts = Parts(h, b.opts)
        elif b.kind == "parallel":
            self.attn, self.mlp = Attention(h, b.opts["attn"]), MLP(h, b.opts["mlp"])
        elif b.kind == "pointwise":
            self.scale = nn.Parameter(1 + 0.1 * torch.randn(h))
            self.shift = nn.Parameter(0.1 * torch.randn(h))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, S, h)
        y = self.norm(x)
        if self.kind in ("mlp", "attn", "parts"):
            return x + getattr(self, self.kind)(y)
        if self.kind == "parallel":
            return x + self.attn(y) + self.mlp(y)
        if self.kind == "mix":
            b, s, h = y.shape
            g = self.o["groups"]
            return x + y.view(b, s, g, h // g).transpose(-1, -2).reshape(b, s, h)
        if self.kind == "pointwise":
            return x + _act(self.o["act"], y) * self.scale + self.shift
        op = self.o["op"]
        if op == "roll":
            return x + torch.roll(y, 1, -1)
        if op == "flip":
            return x + torch.flip(y, [-1])
        return x + (torch.special.sinc(y) if op == "sinc" else torch.atan2(y, y.abs() + 1))


class FuzzModel(nn.Module):
    def __init__(self, spec: Spec) -> None:
        super().__init__()
        torch.manual_seed(spec.seed)
        h = spec.hidden
        self.spec = spec
        self.embed: nn.Module = nn.Embedding(spec.vocab, h) if spec.vocab else nn.Linear(spec.features, h)
        self.blocks = nn.ModuleList(BlockModule(h, b) for b in spec.blocks)
        self.norm = nn.LayerNorm(h)
        out = spec.vocab or 7
        self.head = nn.Linear(h, out, bias=not spec.tied)
        if spec.tied:
            self.head.weight = self.embed.weight  # type: ignore[assignment]

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        hdn = self.embed(x)  # (B, S, h)
        for blk in self.blocks:
            hdn = blk(hdn)
        logits = self.head(self.norm(hdn))  # (B, S, V)
        if labels is None:
            return logits
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten())


def inputs(spec: Spec, seed: int, dtype: torch.dtype = torch.float32, seq: int = SEQ
           ) -> tuple[tuple[torch.Tensor, ...], dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    if spec.vocab:
        ids = torch.randint(0, spec.vocab, (BATCH, seq), generator=g)
        labels = torch.randint(0, spec.vocab, (BATCH, seq), generator=g)
        return (ids,), ({"labels": labels} if spec.in_model_loss else {})
    return (torch.randn(BATCH, seq, spec.features, generator=g, dtype=dtype),), {}
