"""Rank functions for ``tests/test_dist_cases.py`` (module level so spawned ranks can import them)."""

from __future__ import annotations

from typing import Any

import models
import torch
from numerics import grad_errors, rel_err
from transformers import LlamaConfig, LlamaForCausalLM

import tpfx


def llama_heads4_hidden96(layers: int = 1) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=96, intermediate_size=192, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=4, use_cache=False)
    return LlamaForCausalLM(cfg)


class FlipMLP(torch.nn.Module):
    """An MLP with an op no rule covers (flip) between its two linears."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.up, self.down = torch.nn.Linear(16, 32), torch.nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.flip(self.up(x), dims=[-1]))


def _grad_err(sharded: torch.nn.Module, ref: torch.nn.Module, rank: int) -> float:
    return max(grad_errors(sharded, ref, rank).values())


def lm_check(rank: int, world: int, build: str, compile: bool) -> dict[str, Any]:
    """Forward + backward of a causal LM, sharded vs unsharded."""
    factory = {"llama": lambda: models.llama(num_kv_heads=2), "heads4": llama_heads4_hidden96}[build]
    model, ref = factory(), factory()
    sharded = tpfx.auto_shard(model, world, compile=compile)
    vocab = ref.config.vocab_size
    ids = models.token_inputs(vocab, 3, 6, seed=5)
    labels = models.token_inputs(vocab, 3, 6, seed=6)
    out, ref_out = sharded(input_ids=ids, labels=labels), ref(input_ids=ids, labels=labels)
    out.loss.backward()
    ref_out.loss.backward()
    res = {"logits": rel_err(out.logits, ref_out.logits), "loss": rel_err(out.loss, ref_out.loss),
           "grad": _grad_err(sharded, ref, rank), "fallbacks": len(sharded.plan.fallbacks),
           "q_proj": sharded.plan.placements["model.layers.0.self_attn.q_proj.weight"].placement}
    if compile:
        import torch._dynamo

        # a second call with the same shapes must not recompile
        before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        sharded(input_ids=ids, labels=labels)
        res["recompiles"] = torch._dynamo.utils.counters["stats"]["unique_graphs"] - before
    return res


def unknown_op_check(rank: int, world: int) -> dict[str, Any]:
    import warnings

    model, ref = FlipMLP(), FlipMLP()
    x = torch.randn(4, 16, generator=torch.Generator().manual_seed(3))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sharded = tpfx.auto_shard(model, world, example_inputs=(x,))
    y = torch.randn(5, 16, generator=torch.Generator().manual_seed(4))
    out, ref_out = sharded(y), ref(y)
    out.square().mean().backward()
    ref_out.square().mean().backward()
    return {"out": rel_err(out, ref_out), "grad": _grad_err(sharded, ref, rank),
            "warned": any("aten.flip" in str(w.message) for w in caught)}


def disagreeing_ranks(rank: int, world: int) -> None:
    # rank 1 builds a different model: the plans differ and every rank must raise, not hang
    model = models.llama(layers=2 if rank == 0 else 1)
    tpfx.auto_shard(model, world)


def wrong_world_size(rank: int, world: int) -> str:
    try:
        tpfx.auto_shard(models.llama(), world + 2)
    except ValueError as e:
        return str(e)
    return ""


def gpt2_vocab(vocab: int) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=64, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False, attn_implementation="eager",
                     bos_token_id=1, eos_token_id=1)
    return GPT2LMHeadModel(cfg)


def parallel_loss_check(rank: int, world: int, build: str, gather_outputs: bool) -> dict[str, Any]:
    """Loss via vocab-parallel cross-entropy (some labels ignored), optionally without gathering logits."""
    from collections import Counter

    from tpfx.passes.emit import collective_nodes

    factory = {"llama": lambda: models.llama(num_kv_heads=2), "gpt2_50257": lambda: gpt2_vocab(50257)}[build]
    model, ref = factory(), factory()
    sharded = tpfx.auto_shard(model, world, gather_outputs=gather_outputs)
    vocab = ref.config.vocab_size
    ids = models.token_inputs(vocab, 3, 7, seed=8)
    labels = models.token_inputs(vocab, 3, 7, seed=9)
    labels[0, :3] = -100
    out, ref_out = sharded(input_ids=ids, labels=labels), ref(input_ids=ids, labels=labels)
    out.loss.backward()
    ref_out.loss.backward()
    kinds = Counter(k for k, _ in collective_nodes(sharded.graph_module(input_ids=ids, labels=labels)))
    wte = next(p for n, p in sharded.named_parameters() if n.endswith(("wte.weight", "embed_tokens.weight")))
    return {"loss": rel_err(out.loss, ref_out.loss), "grad": _grad_err(sharded, ref, rank),
            "logits_local": tuple(out.logits.shape), "logits_full": tuple(ref_out.logits.shape),
            "logits": rel_err(out.logits, ref_out.logits) if gather_outputs else None,
            "kinds": dict(kinds), "embed_rows": tpfx.local(wte).shape[0]}


def t5() -> torch.nn.Module:
    from transformers import T5ForConditionalGeneration

    from tpfx.testing.families import tiny_config

    cfg = tiny_config("t5")
    cfg.decoder_start_token_id = cfg.pad_token_id = 0
    torch.manual_seed(0)
    return T5ForConditionalGeneration(cfg)


def t5_check(rank: int, world: int) -> dict[str, Any]:
    """Encoder-decoder with cross-attention: loss, logits and gradients vs unsharded."""
    model, ref = t5(), t5()
    sharded = tpfx.auto_shard(model, world)
    ids, labels = models.token_inputs(128, 3, 7, seed=2), models.token_inputs(128, 3, 5, seed=3)
    out, ref_out = sharded(input_ids=ids, labels=labels), ref(input_ids=ids, labels=labels)
    out.loss.backward()
    ref_out.loss.backward()
    return {"logits": rel_err(out.logits, ref_out.logits), "loss": rel_err(out.loss, ref_out.loss),
            "grad": _grad_err(sharded, ref, rank), "all_reduce": sharded.plan.count("all_reduce"),
            "fallbacks": [f["reason"] for f in sharded.plan.fallbacks],
            "ratio": sum(tpfx.local(p).numel() for p in sharded.parameters()) / sum(p.numel() for p in ref.parameters())}
