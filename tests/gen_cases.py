"""Rank functions for ``tests/test_generate.py``: ``sharded.generate`` against the unsharded model's
``generate`` on the same prompts (batch 2, left padding, 16 new tokens)."""

from __future__ import annotations

import re
from collections import Counter
from typing import Any

import models
import torch
from tpfx.passes.emit import collective_nodes
from transformers import DynamicCache

import tpfx
from tpfx.testing.families import tiny_causal_lm

NEW_TOKENS = 16
MODES: dict[str, dict[str, Any]] = {"greedy": {}, "beam": {"num_beams": 3},
                                    "sample": {"do_sample": True, "top_p": 0.9}}
# the families of the CI sample that have a KV cache in transformers; sliding windows small enough to slide:
# Mistral's shorter than the prompt, Gemma 2's longer (it slides during generation)
FAMILIES: dict[str, dict[str, Any]] = {"mistral": {"sliding_window": 8}, "qwen2_moe": {}, "phi3": {},
                                       "gemma2": {"sliding_window": 16}}


def build(name: str) -> torch.nn.Module:
    if name == "llama_gqa":  # 8 query heads, 2 KV heads: replicated within pairs at t=4
        return models.llama(num_kv_heads=2).eval()
    if name == "gpt2":  # fused c_attn (Conv1D), tied LM head; eager attention (sdpa does not export)
        model = models.gpt2()
        model.config._attn_implementation = "eager"
        return model.eval()
    return tiny_causal_lm(name, **FAMILIES[name]).eval()


def prompts(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, vocab, (2, 10), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(2, 10, dtype=torch.long)
    ids[0, :3], mask[0, :3] = 0, 0  # left padding
    return ids, mask


def _cache_bytes(cache: Any) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def _counts(gm: torch.fx.GraphModule) -> dict[str, Any]:
    """Collectives of an emitted graph: per kind, and all-gathers inside decoder layers."""
    kinds = Counter(kind for kind, _ in collective_nodes(gm))
    in_layers = [n.name for kind, n in collective_nodes(gm) if kind == "all_gather"
                 and any(re.search(r"\blayers\b|\bh\b", str(path)) for path, _ in n.meta.get("nn_module_stack", {}).values())]
    return {"kinds": dict(kinds), "gathers_in_layers": in_layers}


def families_check(rank: int, world: int, names: list[str]) -> dict[str, Any]:
    """Tokens of every mode equal the unsharded model's; cache bytes; the decode graph's collectives."""
    out: dict[str, Any] = {}
    for name in names:
        model, ref = build(name), build(name)
        ids, mask = prompts(model.config.vocab_size)
        sharded = tpfx.auto_shard(model, world)
        res: dict[str, Any] = {"equal": {}}
        for mode, kw in MODES.items():
            torch.manual_seed(5)
            got = sharded.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, pad_token_id=0, **kw)
            torch.manual_seed(5)
            want = ref.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, pad_token_id=0,
                                use_cache=True, **kw)
            res["equal"][mode] = bool(torch.equal(got, want)) and got.shape[1] == ids.shape[1] + NEW_TOKENS
            if mode == "greedy":  # stop at an end-of-sequence token: the 5th greedy token of row 1
                eos = int(want[1, ids.shape[1] + 4])
                got = sharded.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, pad_token_id=0,
                                       eos_token_id=eos)
                want = ref.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, pad_token_id=0,
                                    eos_token_id=eos, use_cache=True)
                res["equal"]["eos"] = bool(torch.equal(got, want)) and bool((got[1, ids.shape[1]:] == eos).any())
        mine = sharded.generate(ids, attention_mask=mask, max_new_tokens=4, pad_token_id=0,
                                return_dict_in_generate=True, output_scores=True)
        full = DynamicCache(config=ref.config)  # transformers' own: sliding-window layers keep their window
        with torch.no_grad():
            ref(input_ids=mine.sequences[:, :-1], attention_mask=torch.ones_like(mine.sequences[:, :-1]),
                cache=full, use_cache=True)
        res["cache_bytes"], res["ref_cache_bytes"] = mine.cache.nbytes, _cache_bytes(full)
        res["cache_len"] = mine.cache.get_seq_length()
        res["scores"] = len(mine.scores)
        res["layers"] = ref.config.get_text_config().num_hidden_layers
        res["decode"] = _counts(next(gm for k, gm in sharded.feature_graphs("generate").items()
                                     if k[:2] == ("decode", 2)))
        res["graphs"] = sorted(str(k) for k in sharded.graph_keys("generate"))
        out[name] = res
    return out


def compiled_check(rank: int, world: int) -> dict[str, Any]:
    """compile=True: greedy tokens equal; the decode graph is compiled once, not once per token."""
    from torch._dynamo.utils import counters

    model, ref = build("llama_gqa"), build("llama_gqa")
    ids, mask = prompts(model.config.vocab_size)
    sharded = tpfx.auto_shard(model, world, compile=True)
    start = counters["stats"]["unique_graphs"]
    sharded.generate(ids, attention_mask=mask, max_new_tokens=3, pad_token_id=0)  # compiles prefill and decode
    warm = counters["stats"]["unique_graphs"]
    got = sharded.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, pad_token_id=0)
    want = ref.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, pad_token_id=0, use_cache=True)
    return {"equal": bool(torch.equal(got, want)), "warm_graphs": warm - start,
            "later_graphs": counters["stats"]["unique_graphs"] - warm}


def module_check(rank: int, world: int, path: str) -> dict[str, Any]:
    """A model loaded by tpfx.from_pretrained (its full weights never exist on a rank): what a transformers user
    reads off it, a streamer, beam search against transformers' own from_pretrained, and a rank asked for more
    tokens than its peer (every rank must raise, none may hang)."""
    from transformers import AutoModelForCausalLM
    from transformers.generation.streamers import BaseStreamer

    class Collect(BaseStreamer):
        def __init__(self) -> None:
            self.chunks: list[list[int]] = []
            self.ended = False

        def put(self, value: torch.Tensor) -> None:
            self.chunks.append(value.flatten().tolist())

        def end(self) -> None:
            self.ended = True

    sharded = tpfx.from_pretrained(path)
    ref = AutoModelForCausalLM.from_pretrained(path).eval()
    ids, mask = prompts(ref.config.vocab_size)
    out: dict[str, Any] = {
        "config": sharded.config is sharded._model.config and sharded.config.to_diff_dict() == ref.config.to_diff_dict(),
        "generation_config": sharded.generation_config.to_diff_dict() == ref.generation_config.to_diff_dict(),
        "device": str(sharded.device), "can_generate": sharded.can_generate()}
    streamer = Collect()
    got = sharded.generate(ids[1:], max_new_tokens=5, pad_token_id=0, streamer=streamer)
    want = ref.generate(ids[1:], max_new_tokens=5, pad_token_id=0, use_cache=True)
    streamed = [t for chunk in streamer.chunks[1:] for t in chunk]  # the first put is the prompt
    out["streamed"] = torch.equal(got, want) and streamed == got[0, 10:].tolist() and streamer.ended
    got = sharded.generate(ids, attention_mask=mask, max_new_tokens=8, pad_token_id=0, num_beams=2)
    want = ref.generate(ids, attention_mask=mask, max_new_tokens=8, pad_token_id=0, num_beams=2, use_cache=True)
    out["beam"] = bool(torch.equal(got, want))
    try:
        sharded.generate(ids, attention_mask=mask, max_new_tokens=4 + rank, pad_token_id=0)
        out["disagree"] = "no error"
    except RuntimeError as e:
        out["disagree"] = str(e)
    return out
