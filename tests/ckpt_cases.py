"""Rank functions for ``tests/test_checkpoint.py`` (module level so spawned ranks can import them)."""

from __future__ import annotations

import os
from typing import Any

import torch
from numerics import rel_err
from torch.distributed.tensor import DTensor
from transformers import (
    AutoModelForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
)

import tpfx

LR = 1e-2


def llama(**kw: Any) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = dict(vocab_size=250, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, use_cache=False)
    return LlamaForCausalLM(LlamaConfig(**{**cfg, **kw}))


def gpt2() -> GPT2LMHeadModel:
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(vocab_size=251, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False))


def llama_classifier() -> LlamaForSequenceClassification:
    torch.manual_seed(0)
    return LlamaForSequenceClassification(LlamaConfig(
        vocab_size=250, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_labels=3, pad_token_id=0, use_cache=False))


def mixtral() -> torch.nn.Module:
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    return MixtralForCausalLM(MixtralConfig(vocab_size=250, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2, num_local_experts=4,
                                            use_cache=False))


BUILDERS = {"llama": llama, "gpt2": gpt2, "classifier": llama_classifier, "mixtral": mixtral}


def ids(vocab: int, shape: tuple[int, int] = (2, 7), seed: int = 1) -> torch.Tensor:
    return torch.randint(1, vocab, shape, generator=torch.Generator().manual_seed(seed))


def load_check(rank: int, world: int, path: str) -> dict[str, Any]:
    """from_pretrained vs transformers' unsharded from_pretrained: logits and every local slice (exact)."""
    sharded = tpfx.from_pretrained(path)
    ref = AutoModelForCausalLM.from_pretrained(path)
    x = ids(ref.config.vocab_size)
    full = dict(ref.named_parameters())
    exact = all(torch.equal(tpfx.local(p), sharded.plan.shard(n, full[n].detach(), rank)) for n, p in sharded.named_parameters())
    split = sum(1 for p in sharded.plan.placements.values() if p.dim is not None)
    tied = [n for n, _ in sharded.named_parameters() if "lm_head" in n]
    return {"logits": rel_err(sharded(input_ids=x).logits, ref(input_ids=x).logits), "exact": exact,
            "split": split, "tied_lm_head_params": tied, "training": sharded._model.training}


def bf16_classifier_check(rank: int, world: int, path: str) -> dict[str, Any]:
    from transformers import AutoModelForSequenceClassification

    sharded = tpfx.from_pretrained(path, model_cls=AutoModelForSequenceClassification, torch_dtype=torch.bfloat16)
    ref = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.bfloat16)
    full = dict(ref.named_parameters())
    exact = all(torch.equal(tpfx.local(p), sharded.plan.shard(n, full[n].detach(), rank)) for n, p in sharded.named_parameters())
    x = ids(ref.config.vocab_size)
    out, want = sharded(input_ids=x).logits, ref(input_ids=x).logits
    return {"exact": exact, "dtypes": sorted({str(p.dtype) for p in sharded.parameters()}),
            "out_dtype": str(out.dtype), "logits": rel_err(out.float(), want.float()),
            "shape": tuple(out.shape)}


def _train(sharded: torch.nn.Module, opt: torch.optim.Optimizer, vocab: int, steps: range) -> list[float]:
    losses = []
    for step in steps:
        x = ids(vocab, (2, 6), seed=100 + step)
        loss = sharded(input_ids=x, labels=x).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def train_and_save_pretrained(rank: int, world: int, path: str, out: str, max_shard_size: str) -> dict[str, Any]:
    """3 AdamW steps on the sharded model, then save_pretrained; returns local slices and final logits."""
    sharded = tpfx.from_pretrained(path)
    vocab = sharded.config.vocab_size
    opt = torch.optim.AdamW(sharded.parameters(), lr=LR)
    sharded.train()
    _train(sharded, opt, vocab, range(3))
    sharded.save_pretrained(out, max_shard_size=max_shard_size)
    with torch.no_grad():
        logits = sharded(input_ids=ids(vocab)).logits
    return {"local": {n: tpfx.local(p.detach()).clone() for n, p in sharded.named_parameters()},
            "plan": sharded.plan.to_json(), "logits": logits}


def dcp_phase(rank: int, world: int, name: str, ckpt: str, phase: str) -> dict[str, Any]:
    """``save``: 2 steps, tpfx.save, then step 3 (uninterrupted). ``load``: fresh model and optimizer,
    tpfx.load, then step 3."""
    model = BUILDERS[name]()
    vocab = model.config.vocab_size
    if phase == "load":  # start from other weights: everything must come from the checkpoint
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(0.5)
    sharded = tpfx.auto_shard(model, world)
    opt = torch.optim.AdamW(sharded.parameters(), lr=LR)
    if phase == "save":
        _train(sharded, opt, vocab, range(2))
        tpfx.save(sharded, ckpt, optimizer=opt)
    else:
        tpfx.load(sharded, ckpt, optimizer=opt)
    files = sorted(os.listdir(ckpt))
    return {"next": _train(sharded, opt, vocab, range(2, 4)), "files": files,
            "steps": sorted({float(s["step"]) for s in opt.state.values()})}


def _vm(field: str) -> int:
    """A /proc/self/status field in bytes (VmRSS: resident now, VmHWM: peak since the last reset)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def memory_check(rank: int, world: int, path: str) -> dict[str, Any]:
    """Peak resident-memory growth of from_pretrained on this rank, measured exactly: the kernel's high-water
    mark is reset (``clear_refs`` 5) after a warm-up export of a tiny model (torch.export's one-time cost is
    not the model's) and read after the load."""
    warm = llama(num_hidden_layers=1, hidden_size=32, intermediate_size=64, vocab_size=64)
    tpfx.plan(warm, world)
    del warm
    import gc

    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = _vm("VmRSS")
    sharded = tpfx.from_pretrained(path)
    peak = _vm("VmHWM") - before  # the slices are copies in anonymous memory (resident), not file maps
    local = sum(tpfx.local(p).numel() * p.element_size() for p in sharded.parameters())
    return {"peak_growth": peak, "local_bytes": local}


def _expect_error(fn: Any) -> str:
    try:
        fn()
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    return "no error"


def bad_inputs(rank: int, world: int, cases: dict[str, str]) -> dict[str, str]:
    """Every broken checkpoint must raise on every rank, before any collective (no hang)."""
    return {name: _expect_error(lambda p=path: tpfx.from_pretrained(p)) for name, path in cases.items()}


def save_failures(rank: int, world: int, blocked: str, out: str) -> dict[str, str]:
    """save_pretrained where rank 0 cannot write (a file where the directory's parent should be), and where
    one rank does not call it (its peers must fail within the timeout, naming it)."""
    sharded = tpfx.auto_shard(llama(), world)
    res = {"blocked": _expect_error(lambda: sharded.save_pretrained(blocked)),
           "load_missing": _expect_error(lambda: tpfx.load(sharded, out + "_missing"))}
    if rank == 0:
        res["missing_rank"] = _expect_error(lambda: sharded.save_pretrained(out, timeout_s=3))
    else:
        import time

        time.sleep(8)  # alive, but not saving: rank 0's barrier must time out naming this rank
        res["missing_rank"] = "did not call"
    return res


def full_state_dict_check(rank: int, world: int) -> dict[str, Any]:
    """``ShardedModule.load_state_dict`` with the unsharded model's state dict, into a sharded module of other
    weights: GPT-2 (fused ``c_attn``, a _StridedShard DTensor; the tied LM head under its alias) and Falcon
    (a plain per-part parameter). Each must then hold exactly the slices ``auto_shard`` cuts from that model,
    and give its outputs; strict mode reports a missing key, and a wrong shape raises."""
    from tpfx.testing.families import tiny_causal_lm

    out: dict[str, Any] = {}
    for name, make in (("gpt2", lambda seed: tiny_causal_lm("gpt2", seed=seed)),
                       ("falcon", lambda seed: tiny_causal_lm("falcon", seed=seed))):
        source = make(0)
        full = source.state_dict()
        target = tpfx.auto_shard(make(5), world)
        result = target.load_state_dict(full)
        expected = tpfx.auto_shard(source, world)
        x = ids(source.config.vocab_size)
        with torch.no_grad():
            err = rel_err(target(input_ids=x).logits, expected(input_ids=x).logits)
        first = next(k for k in full if ".0." in k)  # a layer weight (no tied alias loads it)
        partial = {k: v for k, v in full.items() if k != first}
        wrong = {first: torch.zeros(3, 3)}
        out[name] = {
            "keys": (result.missing_keys, result.unexpected_keys),
            "equal": all(torch.equal(tpfx.local(a), tpfx.local(b))
                         for a, b in zip(target.parameters(), expected.parameters(), strict=True)),
            "logits_err": err,
            "plain": [n for n, p in target.named_parameters() if not isinstance(p, DTensor)],
            "strict_missing": _expect_error(lambda t=target, p=partial: t.load_state_dict(p)),
            "lenient_missing": target.load_state_dict(partial, strict=False).missing_keys,
            "wrong_shape": _expect_error(lambda t=target, w=wrong: t.load_state_dict(w, strict=False)),
        }
    return out


def blocks_load_check(rank: int, world: int, path: str) -> dict[str, Any]:
    """``tpfx.from_pretrained`` of a 5-layer Llama: its parameters are fake tensors, and block capture runs its
    layers in their fake mode; the plan must come from the stitched capture (no capture fallback)."""
    sharded = tpfx.from_pretrained(path, world)
    x = ids(sharded.config.vocab_size)
    out = sharded(input_ids=x, labels=x)
    return {"fallbacks": sharded.plan.fallbacks, "logits": out.logits.detach(), "loss": float(out.loss)}
