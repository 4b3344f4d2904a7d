"""Adversarial cases for uneven head splits (``Shard.unit``, ``S(0/3x128)``) and single / non-nesting key/value
heads held whole (``S(0/1)``): realistic transformers families and hand-written attention modules with head
counts prime to t, planned and simulated against the unsharded model.

One line per case: name, t, verdict (OK / WRONG / CRASH / EXTRA-COMM), forward / gradient relative errors,
forward all-reduces / all-gathers against Megatron's, and the attention placements.

    python tests/heads_attack.py [name-substring ...] [-v] [--sp] [--dyn] [--mask]

WRONG in fp32 is re-checked in float64 (printed as f64=...). EXTRA-COMM: forward all-reduces or all-gathers above
Megatron's (2 per layer + 1 for the vocab embedding, 1 logits gather for LMs; 1 all-reduce for a bare attention
block), or a head-carrying projection (query / output) replicated.
"""

from __future__ import annotations

import math
import os
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

torch.set_num_threads(1)

import transformers  # noqa: E402
from numerics import GRAD_FLOOR_FRACTION, TOL, rel_err  # noqa: E402
from simulate import emit_all, run_ranks  # noqa: E402

import tpfx  # noqa: E402
from tpfx.derive import examples  # noqa: E402

VOCAB = 160
VERBOSE = "-v" in sys.argv


# ------------------------------------------------------------------------------------------------ cases


@dataclass
class Case:
    name: str
    build: Callable[[], nn.Module]  # seeded: two calls give identical models
    ts: tuple[int, ...]
    lm: bool = True  # HF causal LM (input_ids + labels) vs a bare block (x) -> tensor
    layers: int = 1
    heads_params: tuple[str, ...] = ()  # substrings of params that carry heads and must be split
    seq: int = 7
    sp: bool = False  # also try sequence_parallel
    extra_ok: int = 0  # forward collectives beyond Megatron's that are inherent (e.g. a norm over all heads)


def hf(cls: str, cfg_cls: str, seed: int = 0, **kw: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(seed)
        cfg = getattr(transformers, cfg_cls)(**kw)
        cfg.use_cache = False
        if hasattr(cfg, "_attn_implementation"):
            cfg._attn_implementation = "eager"
        m = getattr(transformers, cls)(cfg)
        with torch.no_grad():  # non-trivial norms / biases so bugs in their slicing show
            for n, p in m.named_parameters():
                if "norm" in n or "bias" in n or "ln" in n:
                    p.add_(0.1 * torch.randn_like(p))
        return m.eval()

    return build


def _common(hidden: int, heads: int, kv: int | None, d: int | None, layers: int = 1) -> dict[str, Any]:
    kw: dict[str, Any] = dict(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                              num_hidden_layers=layers, num_attention_heads=heads)
    if kv is not None:
        kw["num_key_value_heads"] = kv
    if d is not None:
        kw["head_dim"] = d
    return kw


# ---------------------------------------------------------------- hand-written attention blocks


class Attn(nn.Module):
    """Configurable attention: separate or fused qkv, einsum or matmul or sdpa, GQA by repeat_interleave /
    expand / enable_gqa, merge by flatten(2) / reshape(-1) / view, biases, per-head parameters."""

    def __init__(self, hidden: int, heads: int, kv: int, d: int, *, fused: str = "", core: str = "matmul",
                 gqa: str = "repeat_interleave", merge: str = "reshape", bias: bool = False, head_scale: bool = False,
                 qk_norm: str = "", split_view: str = "explicit", train: bool = False) -> None:
        super().__init__()
        self.h, self.kv, self.d, self.fused, self.core, self.gqa, self.merge = heads, kv, d, fused, core, gqa, merge
        self.split_view, self.qk_norm = split_view, qk_norm
        if fused == "parts":  # [q | k | v] of unequal sizes
            self.qkv = nn.Linear(hidden, (heads + 2 * kv) * d, bias=bias)
        elif fused == "per_head":  # NeoX-style: per head [q_h k_h v_h] (needs kv == heads)
            assert kv == heads
            self.qkv = nn.Linear(hidden, 3 * heads * d, bias=bias)
        elif fused == "per_group":  # per kv group [q.. (g of them) k v]
            self.qkv = nn.Linear(hidden, (heads + 2 * kv) * d, bias=bias)
        else:
            self.q = nn.Linear(hidden, heads * d, bias=bias)
            self.k = nn.Linear(hidden, kv * d, bias=bias)
            self.v = nn.Linear(hidden, kv * d, bias=bias)
        self.o = nn.Linear(heads * d, hidden, bias=bias)
        self.scale = nn.Parameter(torch.rand(heads) + 0.5) if head_scale else None
        if qk_norm == "head":
            self.qn, self.kn = nn.RMSNorm(d), nn.RMSNorm(d)
        elif qk_norm == "proj":
            self.qn, self.kn = nn.RMSNorm(heads * d), nn.RMSNorm(kv * d)
        if qk_norm:
            with torch.no_grad():
                self.qn.weight.add_(0.1 * torch.randn(self.qn.weight.shape))
                self.kn.weight.add_(0.1 * torch.randn(self.kn.weight.shape))
        if train:
            self.train()
        else:
            self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        h, kv, d = self.h, self.kv, self.d
        if self.fused == "parts":
            q, k, v = self.qkv(x).split([h * d, kv * d, kv * d], dim=-1)
        elif self.fused == "per_head":
            q, k, v = self.qkv(x).view(b, s, h, 3 * d).chunk(3, dim=-1)
        elif self.fused == "per_group":
            g = h // kv
            qkv = self.qkv(x).view(b, s, kv, g + 2, d)
            q, k, v = qkv[:, :, :, :g], qkv[:, :, :, g:g + 1], qkv[:, :, :, g + 1:]
            q = q.reshape(b, s, h * d)
            k, v = k.reshape(b, s, kv * d), v.reshape(b, s, kv * d)
        else:
            q, k, v = self.q(x), self.k(x), self.v(x)
        if self.qk_norm == "proj":
            q, k = self.qn(q.reshape(b, s, h * d)), self.kn(k.reshape(b, s, kv * d))
        if self.split_view == "minus1":
            q, k, v = (z.reshape(b, s, -1, d) for z in (q, k, v))
        elif self.split_view == "unflatten":
            q, k, v = q.unflatten(-1, (h, d)), k.unflatten(-1, (kv, d)), v.unflatten(-1, (kv, d))
        else:
            q, k, v = q.reshape(b, s, h, d), k.reshape(b, s, kv, d), v.reshape(b, s, kv, d)
        if self.qk_norm == "head":
            q, k = self.qn(q), self.kn(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # b, heads, s, d
        if self.gqa == "repeat_interleave" and kv != h:
            k, v = k.repeat_interleave(h // kv, dim=1), v.repeat_interleave(h // kv, dim=1)
        elif self.gqa == "expand" and kv != h:
            k = k[:, :, None].expand(b, kv, h // kv, s, d).reshape(b, h, s, d)
            v = v[:, :, None].expand(b, kv, h // kv, s, d).reshape(b, h, s, d)
        if self.core == "sdpa":
            o = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=0.0,
                                               enable_gqa=self.gqa == "sdpa" and kv != h)
        elif self.core == "einsum":
            sc = torch.einsum("bhqd,bhkd->bhqk", q, k) / math.sqrt(d)
            if self.scale is not None:
                sc = sc * self.scale[None, :, None, None]
            o = torch.einsum("bhqk,bhkd->bhqd", F.dropout(sc.softmax(-1), 0.0, self.training), v)
        else:
            sc = q @ k.transpose(-1, -2) / math.sqrt(d)
            if self.scale is not None:
                sc = sc * self.scale.view(1, h, 1, 1)
            mask = torch.ones(s, s, dtype=torch.bool).tril()
            sc = sc.masked_fill(~mask, float("-inf"))
            o = F.dropout(sc.softmax(-1), 0.0, self.training) @ v
        o = o.transpose(1, 2)
        if self.merge == "flatten":
            o = o.flatten(2)
        elif self.merge == "view":
            o = o.contiguous().view(b, s, h * d)
        else:
            o = o.reshape(b, s, -1)
        return self.o(o)


class Block(nn.Module):
    """Pre-norm block around Attn with an MLP, so the residual stream is replicated."""

    def __init__(self, hidden: int, heads: int, kv: int, d: int, **kw: Any) -> None:
        super().__init__()
        self.n1, self.n2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.attn = Attn(hidden, heads, kv, d, **kw)
        self.up, self.down = nn.Linear(hidden, 2 * hidden), nn.Linear(2 * hidden, hidden)
        if kw.get("train"):
            self.train()
        else:
            self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.n1(x))
        return x + self.down(F.gelu(self.up(self.n2(x))))


class Odd(nn.Module):
    """Attention variants that touch the head dim in unusual ways: heads merged into batch for bmm, GQA as a 5-d
    (kv, group) view, a mean / max / softmax across heads."""

    def __init__(self, hidden: int, heads: int, kv: int, d: int, mode: str) -> None:
        super().__init__()
        self.h, self.kv, self.d, self.mode = heads, kv, d, mode
        self.n1 = nn.LayerNorm(hidden)
        self.q, self.k, self.v = nn.Linear(hidden, heads * d), nn.Linear(hidden, kv * d), nn.Linear(hidden, kv * d)
        merged = {"mean": d, "max": d, "std": d, "lse": d, "slice": (heads - 1) * d, "sel": 3 * d,
                  "sliceq": (heads - 1) * d}
        self.o = nn.Linear(merged.get(mode, heads * d), hidden)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        h, kv, d = self.h, self.kv, self.d
        y = self.n1(x)
        q, k, v = self.q(y), self.k(y), self.v(y)
        if self.mode == "gqa5d":
            g = h // kv
            q = q.view(b, s, kv, g, d).permute(0, 2, 3, 1, 4)  # b kv g s d
            k = k.view(b, s, kv, 1, d).permute(0, 2, 3, 1, 4)
            v = v.view(b, s, kv, 1, d).permute(0, 2, 3, 1, 4)
            a = (q @ k.transpose(-1, -2) / math.sqrt(d)).softmax(-1) @ v  # b kv g s d
            o = a.permute(0, 3, 1, 2, 4).reshape(b, s, h * d)
            return x + self.o(o)
        q = q.view(b, s, h, d).transpose(1, 2)
        k = k.view(b, s, kv, d).transpose(1, 2).repeat_interleave(h // kv, 1) if kv != h else k.view(b, s, h, d).transpose(1, 2)
        v = v.view(b, s, kv, d).transpose(1, 2).repeat_interleave(h // kv, 1) if kv != h else v.view(b, s, h, d).transpose(1, 2)
        if self.mode == "sliceq":  # drop the first query head before attention
            q, k, v = q[:, 1:], k[:, 1:], v[:, 1:]
            a = (q @ k.transpose(-1, -2) / math.sqrt(d)).softmax(-1) @ v
            return x + self.o(a.transpose(1, 2).reshape(b, s, -1))
        if self.mode == "bmm":
            qb, kb, vb = (z.reshape(b * h, s, d) for z in (q, k, v))
            a = torch.bmm(torch.bmm(qb, kb.transpose(1, 2)).div(math.sqrt(d)).softmax(-1), vb).view(b, h, s, d)
            return x + self.o(a.transpose(1, 2).reshape(b, s, h * d))
        sc = q @ k.transpose(-1, -2) / math.sqrt(d)
        if self.mode == "headsoftmax":
            sc = sc + sc.softmax(dim=1)  # across heads
        a = sc.softmax(-1) @ v  # b h s d
        if self.mode == "mean":
            return x + self.o(a.mean(1))
        if self.mode == "std":
            return x + self.o(a.std(1))
        if self.mode == "lse":
            return x + self.o(a.logsumexp(1))
        if self.mode == "flip":
            a = a.flip(1)
        elif self.mode == "roll":
            a = a.roll(2, 1)
        elif self.mode == "cumsum":
            a = a.cumsum(1)
        elif self.mode == "slice":
            a = a[:, 1:]
        elif self.mode == "sel":
            a = a[:, [h - 1, 0, 2]]
        elif self.mode == "perm":
            a = a[:, torch.arange(h - 1, -1, -1)]
        if self.mode in ("slice", "sel"):
            return x + self.o(a.transpose(1, 2).reshape(b, s, -1))
        if self.mode == "max":
            return x + self.o(a.amax(1))
        return x + self.o(a.transpose(1, 2).reshape(b, s, h * d))


def odd(hidden: int, heads: int, kv: int, d: int, mode: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(0)
        return Odd(hidden, heads, kv, d, mode)

    return build


def blk(hidden: int, heads: int, kv: int, d: int, seed: int = 0, **kw: Any) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        torch.manual_seed(seed)
        return Block(hidden, heads, kv, d, **kw)

    return build


def cases() -> list[Case]:
    C: list[Case] = []
    QO = ("q_proj.weight", "o_proj.weight")
    # --- Llama-like families
    for heads, kv, t in [(5, 5, 2), (5, 1, 3), (7, 7, 3), (7, 1, 4), (11, 11, 4), (13, 13, 5), (13, 1, 8)]:
        C.append(Case(f"qwen2_h{heads}kv{kv}", hf("Qwen2ForCausalLM", "Qwen2Config", **_common(8 * heads, heads, kv, 8)),
                      (t,), heads_params=QO))
    C.append(Case("qwen2_h6kv2_d16", hf("Qwen2ForCausalLM", "Qwen2Config", **_common(96, 6, 2, 16, layers=2)),
                  (4, 5), layers=2, heads_params=QO, sp=True, seq=8))
    C.append(Case("qwen2_h10kv5", hf("Qwen2ForCausalLM", "Qwen2Config", **_common(80, 10, 5, 8)), (3, 4, 6),
                  heads_params=QO))
    C.append(Case("qwen2_h12kv3", hf("Qwen2ForCausalLM", "Qwen2Config", **_common(96, 12, 3, 8)), (5, 7, 8),
                  heads_params=QO))
    C.append(Case("mistral_h7kv7_d24", hf("MistralForCausalLM", "MistralConfig", **_common(64, 7, 7, 24)), (2, 3, 6),
                  heads_params=QO))
    C.append(Case("mistral_h15kv3_d8", hf("MistralForCausalLM", "MistralConfig", sliding_window=4,
                                          **_common(64, 15, 3, 8)), (4, 7), heads_params=QO))
    C.append(Case("gemma_h5kv1_d32", hf("GemmaForCausalLM", "GemmaConfig", **_common(64, 5, 1, 32)), (2, 3, 4),
                  heads_params=QO))
    C.append(Case("gemma_h7kv1_2L", hf("GemmaForCausalLM", "GemmaConfig", **_common(56, 7, 1, 16, layers=2)),
                  (3, 8), layers=2, heads_params=QO, sp=True, seq=8))
    C.append(Case("gemma2_h5kv5_cap", hf("Gemma2ForCausalLM", "Gemma2Config", attn_logit_softcapping=5.0,
                                         final_logit_softcapping=3.0, query_pre_attn_scalar=16,
                                         sliding_window=4, **_common(80, 5, 5, 16, layers=2)),
                  (3,), layers=2, heads_params=QO))
    C.append(Case("gemma2_h7kv1_cap", hf("Gemma2ForCausalLM", "Gemma2Config", attn_logit_softcapping=5.0,
                                         final_logit_softcapping=3.0, query_pre_attn_scalar=16,
                                         **_common(112, 7, 1, 16)), (4,), heads_params=QO))
    C.append(Case("qwen3_h5kv5", hf("Qwen3ForCausalLM", "Qwen3Config", **_common(64, 5, 5, 16)), (2, 3),
                  heads_params=QO))
    C.append(Case("qwen3_h7kv1", hf("Qwen3ForCausalLM", "Qwen3Config", **_common(64, 7, 1, 16)), (3, 5),
                  heads_params=QO))
    C.append(Case("qwen3_h9kv3", hf("Qwen3ForCausalLM", "Qwen3Config", **_common(72, 9, 3, 8)), (2, 4),
                  heads_params=QO))
    C.append(Case("olmo2_h5kv5", hf("Olmo2ForCausalLM", "Olmo2Config", **_common(80, 5, 5, None)), (3,),
                  heads_params=QO, extra_ok=2))
    C.append(Case("olmo2_h6kv2", hf("Olmo2ForCausalLM", "Olmo2Config", **_common(96, 6, 2, None)), (4,),
                  heads_params=QO, extra_ok=2))
    C.append(Case("phi3_h5kv5", hf("Phi3ForCausalLM", "Phi3Config", pad_token_id=0, **_common(80, 5, 5, None)),
                  (2, 3), heads_params=("qkv_proj.weight", "o_proj.weight")))
    C.append(Case("phi3_h7kv1", hf("Phi3ForCausalLM", "Phi3Config", pad_token_id=0, **_common(112, 7, 1, None)),
                  (3, 4), heads_params=("qkv_proj.weight", "o_proj.weight")))
    C.append(Case("phi3_h10kv2", hf("Phi3ForCausalLM", "Phi3Config", pad_token_id=0, **_common(80, 10, 2, None)),
                  (3, 4), heads_params=("qkv_proj.weight", "o_proj.weight")))
    C.append(Case("base_phi3_h6kv6", hf("Phi3ForCausalLM", "Phi3Config", pad_token_id=0, **_common(96, 6, 6, None)),
                  (2, 3), heads_params=("qkv_proj.weight", "o_proj.weight")))
    C.append(Case("base_qwen2_h10kv5", hf("Qwen2ForCausalLM", "Qwen2Config", **_common(80, 10, 5, 8)), (2, 5),
                  heads_params=QO))
    C.append(Case("qwen2_h15kv5", hf("Qwen2ForCausalLM", "Qwen2Config", **_common(120, 15, 5, 8)), (2, 4, 7),
                  heads_params=QO))
    C.append(Case("qwen2_h14kv7", hf("Qwen2ForCausalLM", "Qwen2Config", **_common(112, 14, 7, 8)), (3, 4, 5),
                  heads_params=QO))
    C.append(Case("qwen2_h10kv5_d16", hf("Qwen2ForCausalLM", "Qwen2Config", **_common(160, 10, 5, 16)), (3, 4),
                  heads_params=QO))
    C.append(Case("qwen2_h6kv2_d32", hf("Qwen2ForCausalLM", "Qwen2Config", **_common(192, 6, 2, 32)), (4,),
                  heads_params=QO))
    for heads, kv, ts in [(4, 2, (3,)), (6, 3, (4, 5)), (8, 4, (3, 5, 6)), (12, 4, (5, 7)), (10, 2, (4,)),
                          (15, 3, (2, 4)), (12, 6, (5, 8))]:  # query heads nesting / not nesting in kv groups
        C.append(Case(f"nest_h{heads}kv{kv}", hf("Qwen2ForCausalLM", "Qwen2Config", **_common(8 * heads, heads, kv, 8)),
                      ts, heads_params=QO))
    C.append(Case("cohere_h5kv5", hf("CohereForCausalLM", "CohereConfig", pad_token_id=0, **_common(80, 5, 5, None)),
                  (3,), heads_params=QO))
    C.append(Case("cohere_h7kv1_qknorm", hf("CohereForCausalLM", "CohereConfig", pad_token_id=0, use_qk_norm=True,
                                            **_common(112, 7, 1, None)), (3,), heads_params=QO))
    C.append(Case("stablelm_h5_partial", hf("StableLmForCausalLM", "StableLmConfig", partial_rotary_factor=0.25,
                                            use_qkv_bias=True, **_common(80, 5, 5, None)), (2, 3), heads_params=QO))
    C.append(Case("stablelm_h7kv1_qkln", hf("StableLmForCausalLM", "StableLmConfig", qk_layernorm=True,
                                            **_common(112, 7, 1, None)), (3,), heads_params=QO))
    C.append(Case("base_stablelm_h6kv6_qkln", hf("StableLmForCausalLM", "StableLmConfig", qk_layernorm=True,
                                                 **_common(96, 6, 6, None)), (3,), heads_params=QO))
    C.append(Case("phi_h5_partial", hf("PhiForCausalLM", "PhiConfig", partial_rotary_factor=0.5,
                                       **_common(80, 5, None, None)), (2, 3),
                  heads_params=("q_proj.weight", "dense.weight")))
    C.append(Case("phi_h7kv1_qkln", hf("PhiForCausalLM", "PhiConfig", qk_layernorm=True,
                                       **_common(112, 7, 1, None)), (4,), heads_params=("q_proj.weight", "dense.weight")))
    # --- fused / multi-query families
    C.append(Case("bigcode_mqa_h5", hf("GPTBigCodeForCausalLM", "GPTBigCodeConfig", vocab_size=VOCAB, n_embd=80,
                                       n_layer=1, n_head=5, multi_query=True, n_positions=64,
                                       attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0), (2, 3, 4),
                  heads_params=("c_attn.weight", "c_proj.weight")))
    C.append(Case("bigcode_mha_h7", hf("GPTBigCodeForCausalLM", "GPTBigCodeConfig", vocab_size=VOCAB, n_embd=56,
                                       n_layer=1, n_head=7, multi_query=False, n_positions=64,
                                       attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0), (3,),
                  heads_params=("c_attn.weight", "attn.c_proj.weight")))
    C.append(Case("falcon_mq_h5", hf("FalconForCausalLM", "FalconConfig", vocab_size=VOCAB, hidden_size=80,
                                     num_hidden_layers=1, num_attention_heads=5, multi_query=True,
                                     new_decoder_architecture=False, parallel_attn=True, bias=False,
                                     alibi=False), (2, 3), heads_params=("query_key_value.weight", "dense.weight")))
    C.append(Case("falcon_newarch_h6kv2", hf("FalconForCausalLM", "FalconConfig", vocab_size=VOCAB, hidden_size=96,
                                             num_hidden_layers=1, num_attention_heads=6, num_kv_heads=2,
                                             new_decoder_architecture=True, bias=True, alibi=False), (4,),
                  heads_params=("query_key_value.weight", "dense.weight")))
    for heads, kv, ts in [(10, 5, (3,)), (9, 3, (2, 4)), (6, 3, (4,)), (14, 7, (3, 4))]:
        C.append(Case(f"falcon_newarch_h{heads}kv{kv}", hf(
            "FalconForCausalLM", "FalconConfig", vocab_size=VOCAB, hidden_size=8 * heads, num_hidden_layers=1,
            num_attention_heads=heads, num_kv_heads=kv, new_decoder_architecture=True, bias=True, alibi=False),
            ts, heads_params=("query_key_value.weight", "dense.weight")))
    C.append(Case("falcon_alibi_h5", hf("FalconForCausalLM", "FalconConfig", vocab_size=VOCAB, hidden_size=80,
                                        num_hidden_layers=1, num_attention_heads=5, multi_query=False,
                                        new_decoder_architecture=False, parallel_attn=False, bias=True,
                                        alibi=True), (3,), heads_params=("query_key_value.weight", "dense.weight")))
    C.append(Case("neox_h5_partial", hf("GPTNeoXForCausalLM", "GPTNeoXConfig", vocab_size=VOCAB, hidden_size=80,
                                        num_hidden_layers=1, num_attention_heads=5, intermediate_size=160,
                                        rotary_pct=0.25, attention_dropout=0.0, hidden_dropout=0.0), (2, 3, 4),
                  heads_params=("query_key_value.weight", "attention.dense.weight")))
    C.append(Case("neox_h7_2L_seq", hf("GPTNeoXForCausalLM", "GPTNeoXConfig", vocab_size=VOCAB, hidden_size=56,
                                       num_hidden_layers=2, num_attention_heads=7, intermediate_size=112,
                                       rotary_pct=0.5, use_parallel_residual=False), (3,), layers=2,
                  heads_params=("query_key_value.weight", "attention.dense.weight"), sp=True, seq=9))
    C.append(Case("bloom_h5_alibi", hf("BloomForCausalLM", "BloomConfig", vocab_size=VOCAB, hidden_size=80, n_layer=1,
                                       n_head=5), (2, 3), heads_params=("query_key_value.weight",
                                                                        "self_attention.dense.weight")))
    C.append(Case("base_bloom_h4_alibi", hf("BloomForCausalLM", "BloomConfig", vocab_size=VOCAB, hidden_size=64,
                                            n_layer=1, n_head=4), (2,), heads_params=("query_key_value.weight",
                                                                                     "self_attention.dense.weight")))
    C.append(Case("base_falcon_mq_h8", hf("FalconForCausalLM", "FalconConfig", vocab_size=VOCAB, hidden_size=64,
                                          num_hidden_layers=1, num_attention_heads=8, multi_query=True,
                                          new_decoder_architecture=False, parallel_attn=True, bias=False,
                                          alibi=False), (2, 4), heads_params=("query_key_value.weight", "dense.weight")))
    C.append(Case("bloom_h7_alibi", hf("BloomForCausalLM", "BloomConfig", vocab_size=VOCAB, hidden_size=56, n_layer=1,
                                       n_head=7), (4, 6), heads_params=("query_key_value.weight",
                                                                        "self_attention.dense.weight")))
    # --- MLA
    mla = dict(vocab_size=VOCAB, hidden_size=70, intermediate_size=128, moe_intermediate_size=32,
               num_hidden_layers=1, num_attention_heads=5, num_key_value_heads=5, q_lora_rank=24, kv_lora_rank=16,
               qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12, first_k_dense_replace=1, n_routed_experts=4,
               num_experts_per_tok=2, n_shared_experts=1)
    C.append(Case("deepseek_v2_h5", hf("DeepseekV2ForCausalLM", "DeepseekV2Config", **mla), (2, 3),
                  heads_params=("q_b_proj.weight", "kv_b_proj.weight", "o_proj.weight")))
    C.append(Case("deepseek_v3_h7", hf("DeepseekV3ForCausalLM", "DeepseekV3Config", **{**mla, "num_attention_heads": 7,
                                                                                    "num_key_value_heads": 7}),
                  (3, 4), heads_params=("q_b_proj.weight", "kv_b_proj.weight", "o_proj.weight")))
    C.append(Case("deepseek_v3_h7_noqlora", hf("DeepseekV3ForCausalLM", "DeepseekV3Config",
                                               **{**mla, "num_attention_heads": 7, "num_key_value_heads": 7,
                                                  "q_lora_rank": None}),
                  (3,), heads_params=("q_proj.weight", "kv_b_proj.weight", "o_proj.weight")))
    # --- hand-written blocks (a bare block: 1 all-reduce for attention, 1 for the MLP)
    W = ("attn.q.weight", "attn.o.weight")
    F_ = ("attn.qkv.weight", "attn.o.weight")
    hw: list[tuple[str, Callable[[], nn.Module], tuple[int, ...], tuple[str, ...]]] = [
        ("hw_einsum_h5", blk(40, 5, 5, 8, core="einsum"), (2, 3), W),
        ("hw_einsum_h7_scale", blk(56, 7, 7, 8, core="einsum", head_scale=True), (3, 4), W),
        ("hw_matmul_h5_scale", blk(40, 5, 5, 8, head_scale=True), (3,), W),
        ("hw_flatten_h7kv1_ri", blk(56, 7, 1, 8, merge="flatten"), (3, 4), W),
        ("hw_view_h6kv2_ri", blk(48, 6, 2, 8, merge="view"), (4, 5), W),
        ("hw_h6kv3_ri_t4", blk(48, 6, 3, 8), (4,), W),
        ("hw_h9kv3_expand", blk(72, 9, 3, 8, gqa="expand"), (2, 4), W),
        ("hw_sdpa_h10kv2_gqa", blk(80, 10, 2, 8, core="sdpa", gqa="sdpa"), (3, 4), W),
        ("hw_sdpa_h5kv1_gqa", blk(40, 5, 1, 8, core="sdpa", gqa="sdpa"), (2, 3), W),
        ("hw_minus1_h5", blk(40, 5, 5, 8, split_view="minus1"), (2, 3), W),
        ("hw_minus1_h6kv2", blk(48, 6, 2, 8, split_view="minus1"), (4,), W),
        ("hw_unflatten_h7", blk(56, 7, 7, 8, split_view="unflatten"), (3,), W),
        ("hw_fused_parts_h5kv1", blk(40, 5, 1, 8, fused="parts", bias=True), (2, 3), F_),
        ("hw_fused_parts_h6kv2", blk(48, 6, 2, 8, fused="parts", bias=True), (4, 5), F_),
        ("hw_fused_parts_h7kv7", blk(56, 7, 7, 8, fused="parts"), (3,), F_),
        ("hw_fused_perhead_h5", blk(40, 5, 5, 8, fused="per_head", bias=True), (2, 3), F_),
        ("hw_fused_pergroup_h6kv2", blk(48, 6, 2, 8, fused="per_group"), (4,), F_),
        ("hw_fused_pergroup_h6kv3", blk(48, 6, 3, 8, fused="per_group"), (4,), F_),
        ("hw_bias_train_h5", blk(40, 5, 5, 8, bias=True, train=True), (3,), W),
        ("hw_qknorm_head_h7kv1", blk(56, 7, 1, 8, qk_norm="head"), (3,), W),
        ("hw_qknorm_proj_h5", blk(40, 5, 5, 8, qk_norm="proj"), (3,), W),
        ("hw_d12_h5_hidden32", blk(32, 5, 5, 12), (3,), W),
        ("hw_d64_h3_t2", blk(64, 3, 3, 64), (2,), W),
        ("hw_h2kv2_t3", blk(32, 2, 2, 16), (3,), W),
        ("hw_h13kv1_t8", blk(104, 13, 1, 8, core="sdpa"), (8,), W),
        # even-split baselines for the patterns above (did it work before uneven heads?)
        ("base_fused_parts_h6kv6", blk(48, 6, 6, 8, fused="parts"), (3,), F_),
        ("base_fused_parts_h8kv2", blk(64, 8, 2, 8, fused="parts"), (2,), F_),
        ("base_sdpa_h8kv2_gqa", blk(64, 8, 2, 8, core="sdpa", gqa="sdpa"), (2,), W),
        ("base_sdpa_h8kv8", blk(64, 8, 8, 8, core="sdpa"), (2,), W),
        ("base_qknorm_proj_h6", blk(48, 6, 6, 8, qk_norm="proj"), (3,), W),
        ("base_h9kv3_expand", blk(72, 9, 3, 8, gqa="expand"), (3,), W),
        ("hw_fused_pergroup_h10kv5", blk(80, 10, 5, 8, fused="per_group"), (3,), F_),
        ("hw_h9kv3_ri_t2", blk(72, 9, 3, 8), (2,), W),
        ("hw_h9kv3_expand_sdpa", blk(72, 9, 3, 8, gqa="expand", core="sdpa"), (2,), W),
    ]
    hw += [
        ("odd_bmm_h5", odd(40, 5, 5, 8, "bmm"), (2, 3), W[:1] + ("o.weight",)),
        ("base_odd_bmm_h6", odd(48, 6, 6, 8, "bmm"), (3,), ("q.weight", "o.weight")),
        ("odd_bmm_h7kv1", odd(56, 7, 1, 8, "bmm"), (3,), ("q.weight", "o.weight")),
        ("odd_gqa5d_h6kv2", odd(48, 6, 2, 8, "gqa5d"), (4, 5), ("q.weight", "o.weight")),
        ("odd_gqa5d_h10kv5", odd(80, 10, 5, 8, "gqa5d"), (3, 4), ("q.weight", "o.weight")),
        ("odd_gqa5d_h9kv3", odd(72, 9, 3, 8, "gqa5d"), (2, 4), ("q.weight", "o.weight")),
        ("odd_mean_h5", odd(40, 5, 5, 8, "mean"), (2, 3), ()),
        ("odd_max_h7", odd(56, 7, 7, 8, "max"), (3,), ()),
        ("odd_headsoftmax_h5", odd(40, 5, 5, 8, "headsoftmax"), (3,), ()),
        ("odd_std_h5", odd(40, 5, 5, 8, "std"), (2, 3), ()),
        ("odd_lse_h7", odd(56, 7, 7, 8, "lse"), (3,), ()),
        ("odd_flip_h5", odd(40, 5, 5, 8, "flip"), (2, 3), ()),
        ("odd_flip_h7kv1", odd(56, 7, 1, 8, "flip"), (3, 4), ()),
        ("odd_roll_h5", odd(40, 5, 5, 8, "roll"), (2, 3), ()),
        ("odd_cumsum_h5", odd(40, 5, 5, 8, "cumsum"), (3,), ()),
        ("odd_slice_h6", odd(48, 6, 6, 8, "slice"), (2, 4), ()),
        ("odd_sliceq_h7", odd(56, 7, 7, 8, "sliceq"), (2, 3), ()),
        ("odd_sel_h5", odd(40, 5, 5, 8, "sel"), (2, 3), ()),
        ("odd_perm_h5", odd(40, 5, 5, 8, "perm"), (2, 3), ()),
    ]
    for name, b, ts, hp in hw:
        C.append(Case(name, b, ts, lm=False, heads_params=hp,
                      extra_ok=2 if "qknorm_proj" in name else 0))
    return C


# ------------------------------------------------------------------------------------------------ checking


MASK = "--mask" in sys.argv  # LM inputs carry an attention_mask with left padding
DYN = "--dyn" in sys.argv  # run the planned graphs on another batch and sequence length than planned


def _inputs(case: Case, model: nn.Module, seed: int, dtype: torch.dtype, shape: tuple[int, int] | None = None
            ) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    b, s = shape or (2, case.seq)
    if case.lm:
        x = torch.randint(1, VOCAB, (b, s), generator=g)
        out = {"input_ids": x, "labels": torch.randint(1, VOCAB, (b, s), generator=g)}
        if MASK:  # left padding on the first row
            m = torch.ones(b, s, dtype=torch.long)
            m[0, :2] = 0
            out["attention_mask"] = m
        return out
    hidden = model.n1.normalized_shape[0]
    return {"x": torch.randn(b, s, hidden, generator=g).to(dtype)}


def _loss_logits(case: Case, out: Any) -> tuple[torch.Tensor, torch.Tensor]:
    if case.lm:
        return out.loss, out.logits
    w = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)
    return (out * w).sum(), out


def check(case: Case, t: int, dtype: torch.dtype = torch.float32, sp: bool = False) -> dict[str, Any]:
    model, ref = case.build().to(dtype), case.build().to(dtype)
    inp = _inputs(case, ref, 3, dtype)
    if case.lm:
        plan = tpfx.plan(model, t, example_kwargs=inp, sequence_parallel=sp)
        args, kwargs = examples(model, None, inp)
    else:
        plan = tpfx.plan(model, t, example_inputs=(inp["x"],), sequence_parallel=sp)
        args, kwargs = (inp["x"],), {}
    ranks = emit_all(plan)
    if DYN:  # another batch and sequence length (sequence parallel: still divisible by t)
        seq = case.seq + (t if sp else 3)
        inp = _inputs(case, ref, 5, dtype, (3, seq))
        args, kwargs = (examples(model, None, inp) if case.lm else ((inp["x"],), {}))

    def body(rank: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        gm, store = ranks[rank]
        out = gm(*args, **kwargs)
        loss, logits = _loss_logits(case, out)
        loss.backward()
        return logits.detach(), {f: p.grad for f, p in store.items()}

    got = run_ranks(t, body)
    out = ref(**inp) if case.lm else ref(inp["x"])
    loss, logits = _loss_logits(case, out)
    loss.backward()
    full = dict(ref.named_parameters())
    big = max(float(p.grad.abs().max()) for p in full.values() if p.grad is not None)
    fwd, grad, worst = 0.0, 0.0, ""
    for rank, (lg, grads) in enumerate(got):
        fwd = max(fwd, rel_err(lg, logits))
        for fqn, g in grads.items():
            fg = full[fqn].grad
            if fg is None:
                fg = torch.zeros_like(full[fqn])
            e = rel_err(g, plan.shard(fqn, fg, rank), floor=GRAD_FLOOR_FRACTION * big)
            if e > grad:
                grad, worst = e, f"{fqn}@r{rank}"
    return {"plan": plan, "fwd": fwd, "grad": grad, "worst": worst}


def megatron(case: Case, sp: bool) -> dict[str, int]:
    if sp:
        return {}
    if case.lm:
        return {"all_reduce": 2 * case.layers + 1, "all_gather": 1}
    return {"all_reduce": 1 if case.name.startswith("odd_") else 2, "all_gather": 0}


def attn_placements(plan: Any) -> str:
    keys = ("q", "k", "v", "qkv", "o", "c_attn", "c_proj", "query_key_value", "dense", "q_b_proj", "kv_b_proj",
            "q_proj", "k_proj", "v_proj", "o_proj", "qkv_proj", "q_a_proj", "kv_a_proj_with_mqa", "scale",
            "q_norm", "k_norm", "q_layernorm", "k_layernorm", "qn", "kn")
    parts = []
    for fqn, p in plan.placements.items():
        if fqn.count(".") == 1 and fqn.split(".")[0] in ("q", "k", "v", "o"):
            parts.append(f"{fqn}={p.placement}")
            continue
        if ".0." not in fqn and not fqn.startswith("attn.") and "layers.0" not in fqn and ".h.0." not in fqn:
            continue
        leaf = fqn.split(".")
        mod = leaf[-2] if leaf[-1] in ("weight", "bias") else leaf[-1]
        if mod in keys or "attn" in fqn or "attention" in fqn:
            parts.append(f"{'.'.join(leaf[-2:])}={p.placement}")
    return " ".join(parts)


def run_case(case: Case, t: int, sp: bool = False) -> str:
    t0 = time.time()
    tag = f"{case.name:28s} t={t}{' sp' if sp else ''}"
    try:
        r = check(case, t, sp=sp)
    except Exception as e:  # noqa: BLE001
        if VERBOSE:
            traceback.print_exc()
        msg = f"{type(e).__name__}: {e}".replace("\n", " ")[:300]
        return f"{tag}  CRASH  {msg}"
    plan = r["plan"]
    counts = {k: plan.count(k) for k in ("all_reduce", "all_gather", "reduce_scatter")}
    want = megatron(case, sp)
    verdict = "OK"
    notes = []
    if r["fwd"] > TOL or r["grad"] > TOL:
        verdict = "WRONG"
        try:
            r64 = check(case, t, torch.float64, sp=sp)
            notes.append(f"f64 fwd={r64['fwd']:.1e} grad={r64['grad']:.1e} ({r64['worst']})")
            if r64["fwd"] <= 1e-10 and r64["grad"] <= 1e-10:
                verdict = "ROUNDING"
        except Exception as e:  # noqa: BLE001
            notes.append(f"f64 crash {type(e).__name__}: {e}"[:150])
    else:
        extra = sum(max(0, counts[k] - v) for k, v in want.items())
        if extra > case.extra_ok:
            verdict = "EXTRA-COMM"
            notes.append(f"want {want}")
        repl = [f for f in plan.placements if any(f.endswith(h) for h in case.heads_params)
                and plan.placements[f].placement == "R"]
        if repl:
            verdict = "EXTRA-COMM"
            notes.append(f"replicated: {repl[:3]}")
    comm = f"ar={counts['all_reduce']} ag={counts['all_gather']} rs={counts['reduce_scatter']}"
    line = (f"{tag}  {verdict:10s} fwd={r['fwd']:.1e} grad={r['grad']:.1e} {comm}  {attn_placements(plan)}"
            f"  [{time.time() - t0:.0f}s]")
    if verdict != "OK":
        line += f"  worst={r['worst']} " + " ".join(notes)
    return line


def main() -> None:
    sel = [a for a in sys.argv[1:] if not a.startswith("-")]
    sp_all = "--sp" in sys.argv
    for case in cases():
        if sel and not any(s in case.name for s in sel):
            continue
        for t in case.ts:
            print(run_case(case, t), flush=True)
        if case.sp or sp_all:
            t = case.ts[0]
            if case.seq % t:
                case.seq = t * math.ceil(case.seq / t)
            print(run_case(case, t, sp=True), flush=True)


if __name__ == "__main__":
    main()
