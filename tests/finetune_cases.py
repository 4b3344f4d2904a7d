"""Rank functions for ``tests/test_finetune.py``: training as people run it, with each model's default
attention implementation (transformers' sdpa) and default dropout, against the unsharded model."""

from __future__ import annotations

from typing import Any

import models
import torch
import torch.nn.functional as F
from numerics import compare_parameters
from torch import nn

import tpfx

LR, STEPS = 1e-2, 3
V = models.TINY_VOCAB


class NanoGPT(nn.Module):
    """A hand-written GPT whose attention is ``F.scaled_dot_product_attention(dropout_p=...)`` (nanoGPT's)."""

    def __init__(self, d: int = 32, heads: int = 4, layers: int = 2, p: float = 0.1) -> None:
        super().__init__()
        self.heads, self.p = heads, p
        self.embed = nn.Embedding(V, d)
        self.qkv = nn.ModuleList(nn.Linear(d, 3 * d) for _ in range(layers))
        self.proj = nn.ModuleList(nn.Linear(d, d) for _ in range(layers))
        self.head = nn.Linear(d, V)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)  # (B, S, D)
        b, s, d = x.shape
        for qkv, proj in zip(self.qkv, self.proj, strict=True):
            q, k, v = qkv(x).split(d, dim=2)
            q, k, v = (t.view(b, s, self.heads, d // self.heads).transpose(1, 2) for t in (q, k, v))  # (B, H, S, hd)
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.p if self.training else 0.0, is_causal=True)
            x = x + proj(y.transpose(1, 2).contiguous().view(b, s, d))
        return self.head(x)


def _gpt2() -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=V, n_positions=32, n_embd=32, n_layer=2, n_head=4))


def _bert() -> nn.Module:
    from transformers import BertConfig, BertForMaskedLM

    return BertForMaskedLM(BertConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=64, max_position_embeddings=32))


def _t5() -> nn.Module:
    from transformers import T5Config, T5ForConditionalGeneration

    return T5ForConditionalGeneration(T5Config(vocab_size=V, d_model=32, d_kv=8, d_ff=64, num_layers=2,
                                               num_heads=4, decoder_start_token_id=0))


BUILDERS = {"gpt2": _gpt2, "bert": _bert, "t5": _t5, "nanogpt": NanoGPT}


def _build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return BUILDERS[name]().train()  # the defaults: attention implementation and dropout as configured


def _loss(name: str, model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    if name == "nanogpt":
        logits = model(ids)
        return F.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))
    return model(input_ids=ids, labels=ids).loss


def dropout_default_attention(rank: int, world: int, name: str) -> dict[str, Any]:
    """3 AdamW steps of the sharded and the unsharded model, seeded alike before each step: losses and the
    first step's gradients; and which attention implementation and dropout the model ran with."""
    model = _build(name)
    impl = getattr(getattr(model, "config", None), "_attn_implementation", "F.sdpa")
    sharded, ref = tpfx.auto_shard(model, example_inputs=(models.token_inputs(V),) if name == "nanogpt"
                                   else None), _build(name)
    ids = models.token_inputs(V, 2, 8, seed=1)
    opt, ref_opt = torch.optim.AdamW(sharded.parameters(), lr=LR), torch.optim.AdamW(ref.parameters(), lr=LR)
    losses: list[list[float]] = [[], []]
    grad_err = 0.0
    for step in range(STEPS):
        for i, m in enumerate((sharded, ref)):
            torch.manual_seed(10 + step)  # both draw their dropouts from one state
            loss = _loss(name, m, ids)
            loss.backward()
            losses[i].append(float(loss))
        if step == 0:
            cmp = compare_parameters(sharded, ref, sharded.plan, rank, grads=True)
            assert not cmp["missing"] and not cmp["extra"], cmp
            grad_err = max(cmp["errors"].values())
        for optim in (opt, ref_opt):
            optim.step()
            optim.zero_grad()
    return {"impl": impl, "losses": losses[0], "ref_losses": losses[1], "grad_err": grad_err}


def dropout_default_attentions(rank: int, world: int) -> dict[str, dict[str, Any]]:
    return {name: dropout_default_attention(rank, world, name) for name in BUILDERS}


class Block(nn.Module):
    def __init__(self, d: int, heads: int, p: float) -> None:
        super().__init__()
        self.heads, self.p = heads, p
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.up, self.down = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        q, k, v = (t.view(b, s, self.heads, d // self.heads).transpose(1, 2) for t in self.qkv(x).split(d, 2))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.p if self.training else 0.0, is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(b, s, d))  # (B, S, D)
        return x + F.dropout(self.down(F.gelu(self.up(x))), self.p, self.training)


class CheckpointedGPT(nn.Module):
    """A hand-written model that checkpoints each block itself (``torch.utils.checkpoint``)."""

    def __init__(self, d: int = 64, heads: int = 4, layers: int = 4, p: float = 0.1) -> None:
        super().__init__()
        self.embed, self.head = nn.Embedding(V, d), nn.Linear(d, V)
        self.blocks = nn.ModuleList(Block(d, heads, p) for _ in range(layers))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for block in self.blocks:
            x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False) if self.training else block(x)
        return self.head(x)


def _checkpointed(variant: str) -> nn.Module:
    torch.manual_seed(0)
    if variant == "torch":
        return CheckpointedGPT().train()
    model = models.llama(layers=4)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": variant == "reentrant"})
    return model.train()


def saved_bytes(step: Any, model: nn.Module) -> int:
    """Activation bytes autograd keeps for backward while ``step()`` runs its forward (a ``saved_tensors_hooks``
    count, each storage once; the model's own (local) parameters, kept anyway, not counted)."""
    seen: dict[Any, int] = {}
    params = {tpfx.local(p).untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = tpfx.local(t).untyped_storage()
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = step()
    loss.backward()
    return sum(seen.values())


def checkpointing(rank: int, world: int, variant: str, sp: bool) -> dict[str, Any]:
    """A checkpointed model sharded (``variant``: transformers' non-reentrant or reentrant checkpointing of a
    Llama, or a model calling ``torch.utils.checkpoint`` itself): loss and gradients against the unsharded
    checkpointed model seeded alike, and the bytes each keeps for backward (measured on a later call)."""
    ids = models.token_inputs(V, 4, 96, seed=1)

    def loss_of(m: nn.Module) -> Any:
        torch.manual_seed(5)
        if variant == "torch":
            logits = m(ids)
            return F.cross_entropy(logits[:, :-1].reshape(-1, V), ids[:, 1:].reshape(-1))
        return m(input_ids=ids, labels=ids, use_cache=False).loss

    ref, model = _checkpointed(variant), _checkpointed(variant)
    if variant == "option":  # a model that does not checkpoint, sharded with activation_checkpointing=True
        model.gradient_checkpointing_disable()
    sharded = tpfx.auto_shard(model, sequence_parallel=sp, example_inputs=(ids,) if variant == "torch" else None,
                              activation_checkpointing=variant == "option")
    loss_of(sharded).backward()  # the first call captures
    sharded.zero_grad()
    plain = _checkpointed(variant)
    plain.gradient_checkpointing_disable() if variant != "torch" else None
    out = {"sharded": saved_bytes(lambda: loss_of(sharded), sharded), "ref": saved_bytes(lambda: loss_of(ref), ref)}
    out["plain_ref"] = saved_bytes(lambda: loss_of(plain), plain) if variant != "torch" else None
    cmp = compare_parameters(sharded, ref, sharded.plan, rank, grads=True)
    assert not cmp["missing"] and not cmp["extra"], cmp
    torch.manual_seed(5)
    out["loss"] = abs(float(loss_of(sharded)) - float(loss_of(ref))) / abs(float(loss_of(ref)))
    out["grad_err"] = max(cmp["errors"].values())
    gm = sharded.graph_module(ids) if variant == "torch" else sharded.graph_module(input_ids=ids, labels=ids,
                                                                                   use_cache=False)
    out["checkpointed_calls"] = sum(getattr(n.target, "__name__", "") == "_checkpointed" for n in gm.graph.nodes)
    return out


def checkpointings(rank: int, world: int) -> dict[str, dict[str, Any]]:
    runs = {v: checkpointing(rank, world, v, False) for v in ("nonreentrant", "reentrant", "torch", "option")}
    if world == 2:
        runs["sp"] = checkpointing(rank, world, "nonreentrant", True)
    return runs


def _split_k(model: nn.Module, plan: Any, t: int) -> nn.Module:
    """The unsharded model with each row-split linear layer's contraction summed in ``t`` parts, as the ranks
    sum it: the rounding a split contraction has in any precision, with no sharding at all."""
    for name, m in model.named_modules():
        pp = plan.placements.get(f"{name}.weight")
        if isinstance(m, nn.Linear) and pp is not None and pp.style == "rowwise":
            def forward(x: torch.Tensor, m: nn.Linear = m) -> torch.Tensor:
                out = sum(F.linear(a, w) for a, w in zip(x.chunk(t, -1), m.weight.chunk(t, 1), strict=True))
                return out if m.bias is None else out + m.bias  # (..., out)
            m.forward = forward  # type: ignore[method-assign]
    return model


def bf16_check(rank: int, world: int) -> dict[str, dict[str, float]]:
    """bf16 autocast over fp32 weights, and bf16 weights: the sharded model's loss and gradients against the
    unsharded model's, next to the same distance for the unsharded model with split contractions (the
    rounding noise of a split-K sum in bf16)."""
    import contextlib

    from numerics import rel_err

    out = {}
    for mode in ("autocast", "bf16"):
        def build(mode: str = mode) -> nn.Module:
            m = models.llama(layers=2)
            return m.to(torch.bfloat16) if mode == "bf16" else m

        sharded, ref, split = tpfx.auto_shard(build()), build(), build()
        _split_k(split, sharded.plan, world)
        ids = models.token_inputs(models.HF_VOCAB, 4, 16, seed=1)
        losses = []
        for m in (sharded, ref, split):
            with torch.autocast("cpu", dtype=torch.bfloat16) if mode == "autocast" else contextlib.nullcontext():
                loss = m(input_ids=ids, labels=ids).loss
            loss.backward()
            losses.append(loss.detach().float())
        cmp = compare_parameters(sharded, ref, sharded.plan, rank, grads=True)
        full = dict(ref.named_parameters())
        noise = max(rel_err(p.grad.float(), full[n].grad.float()) for n, p in split.named_parameters())
        out[mode] = {"loss": rel_err(losses[0], losses[1]), "loss_noise": rel_err(losses[2], losses[1]),
                     "grad": max(cmp["errors"].values()), "grad_noise": noise,
                     "dtype": str(next(iter(sharded.parameters())).dtype)}
    return out
