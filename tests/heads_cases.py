"""Rank functions for ``tests/test_heads.py``: head counts the world size does not divide, and one key/value
head, through the whole lifecycle on gloo ranks (module level so spawned ranks can import them)."""

from __future__ import annotations

import os
from typing import Any

import torch
from numerics import rel_err
from transformers import LlamaConfig, LlamaForCausalLM

import tpfx

LR = 1e-2
CLIP = 0.5


def llama(hidden: int = 64, heads: int = 8, kv: int = 8, layers: int = 2, seed: int = 0) -> LlamaForCausalLM:
    """A tiny Llama with ``heads`` query heads of 8 and ``kv`` key/value heads."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=250, hidden_size=hidden, intermediate_size=96, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv, head_dim=hidden // heads, use_cache=False))


SHAPES = {  # name -> (hidden, heads, kv)
    "mha8": (64, 8, 8),  # 8 heads: uneven at t=3 (3, 3, 2)
    "mha12": (96, 12, 12),  # 12 heads: uneven at t=5 (3, 3, 2, 2, 2)
    "gqa12_4": (96, 12, 4),  # 12 query heads over 4 key/value heads: uneven at t=5
    "mqa8": (64, 8, 1),  # one key/value head
}


def build(name: str, seed: int = 0) -> LlamaForCausalLM:
    hidden, heads, kv = SHAPES[name]
    return llama(hidden, heads, kv, seed=seed)


def ids(shape: tuple[int, int] = (2, 7), seed: int = 1) -> torch.Tensor:
    return torch.randint(1, 250, shape, generator=torch.Generator().manual_seed(seed))


def _steps(model: torch.nn.Module, clip: Any, steps: int = 3) -> list[float]:
    """``steps`` AdamW steps with gradient clipping at ``CLIP`` (``clip(model)`` clips)."""
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    losses = []
    for step in range(steps):
        x = ids((2, 6), seed=100 + step)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        clip(model)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def lifecycle(rank: int, world: int, name: str, path: str, out: str, ckpt: str) -> dict[str, Any]:
    """From a saved checkpoint: every local slice read exactly, logits and gradients against the unsharded
    model, greedy tokens, 3 AdamW steps with clipping (tpfx's exact norm), save_pretrained and tpfx.save."""
    torch.set_num_threads(1)
    sharded, ref = tpfx.from_pretrained(path), LlamaForCausalLM.from_pretrained(path)
    full = dict(ref.named_parameters())
    exact = all(torch.equal(tpfx.local(p), sharded.plan.shard(n, full[n].detach(), rank))
                for n, p in sharded.named_parameters())
    x = ids()
    res: dict[str, Any] = {"exact_slices": exact}
    with torch.no_grad():
        res["logits"] = rel_err(sharded(input_ids=x).logits, ref(input_ids=x).logits)
    prompt = ids((2, 5), seed=7)
    res["tokens"] = sharded.generate(input_ids=prompt, max_new_tokens=6, do_sample=False).tolist()
    res["ref_tokens"] = ref.generate(input_ids=prompt, max_new_tokens=6, do_sample=False).tolist()
    sharded.train()
    ref.train()
    sharded(input_ids=x, labels=x).loss.backward()
    ref(input_ids=x, labels=x).loss.backward()
    res["grads"] = max(rel_err(tpfx.local(p.grad), sharded.plan.shard(n, full[n].grad, rank))
                       for n, p in sharded.named_parameters())
    sharded.zero_grad()
    ref.zero_grad()
    res["losses"] = _steps(sharded, lambda m: tpfx.clip_grad_norm_(m, CLIP))
    res["ref_losses"] = _steps(ref, lambda m: torch.nn.utils.clip_grad_norm_(m.parameters(), CLIP))
    sharded.eval()
    with torch.no_grad():
        res["trained_logits"] = sharded(input_ids=x).logits
        res["trained"] = rel_err(res["trained_logits"], ref.eval()(input_ids=x).logits)
    sharded.save_pretrained(out)
    tpfx.save(sharded, ckpt)
    res["attn_local"] = sum(tpfx.local(p).numel() for n, p in sharded.named_parameters() if ".self_attn." in n)
    res["attn_full"] = sum(full[n].numel() for n, _ in sharded.named_parameters() if ".self_attn." in n)
    res["forward"] = {k: sharded.plan.count(k) for k in ("all_reduce", "all_gather")}
    res["files"] = sorted(os.listdir(ckpt))
    return res


def resume(rank: int, world: int, name: str, ckpt: str) -> dict[str, Any]:
    """A fresh model at another world size (other weights), ``tpfx.load``: its logits."""
    torch.set_num_threads(1)
    model = build(name, seed=1)
    sharded = tpfx.auto_shard(model, world).eval()
    tpfx.load(sharded, ckpt)
    with torch.no_grad():
        return {"logits": sharded(input_ids=ids()).logits}
