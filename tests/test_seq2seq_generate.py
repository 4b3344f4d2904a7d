"""Encoder-decoders generate on a sharded model (T5 v1.1-gated with relative attention bias, BART, Marian,
Whisper from log-mel features): the encoder once, the decoder per token with self- and cross-attention caches
split by heads. Tokens equal the unsharded model's in greedy, beam search and seeded sampling; scores within
the suite's tolerance; one decode graph serves every step, with Megatron's collectives. Ranks on threads of this process (``devices=``)."""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import torch
from example_runs import run_example
from numerics import TOL, rel_err
from tpfx.passes.emit import collective_nodes
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    MarianConfig,
    MarianMTModel,
    T5Config,
    T5ForConditionalGeneration,
    WhisperConfig,
    WhisperForConditionalGeneration,
)

import tpfx

_BART = dict(vocab_size=96, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
             decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64)

FAMILIES: dict[str, Callable[[], torch.nn.Module]] = {
    "t5_gated": lambda: T5ForConditionalGeneration(T5Config(
        vocab_size=96, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
        feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0, pad_token_id=0,
        eos_token_id=1)),
    "bart": lambda: BartForConditionalGeneration(BartConfig(**_BART, max_position_embeddings=64)),
    "marian": lambda: MarianMTModel(MarianConfig(**_BART, max_position_embeddings=64, pad_token_id=95,
                                                 decoder_start_token_id=95, eos_token_id=0)),
    "whisper": lambda: WhisperForConditionalGeneration(WhisperConfig(
        **_BART, num_mel_bins=8, max_source_positions=16, max_target_positions=32, decoder_start_token_id=1,
        pad_token_id=0, eos_token_id=2, bos_token_id=1)),
}


def _inputs(kind: str) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    if kind == "whisper":
        return {"input_features": torch.randn(2, 8, 32, generator=g)}  # (B, mel bins, 2 x source positions)
    ids = torch.randint(3, 90, (2, 7), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def _scores_match(got: tuple[torch.Tensor, ...], want: tuple[torch.Tensor, ...]) -> None:
    """Per-step scores: the same positions masked to -inf (top-k, suppressed tokens), the rest within TOL."""
    assert len(got) == len(want)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(torch.isinf(a), torch.isinf(b))
        finite = ~torch.isinf(b)
        assert rel_err(a[finite], b[finite]) <= TOL


def _generate_like_unsharded(kind: str, world: int, modes: tuple[dict[str, Any], ...]) -> None:
    torch.manual_seed(0)
    model = FAMILIES[kind]().eval()
    sharded = tpfx.auto_shard(copy.deepcopy(model), devices=["cpu"] * world)
    inputs = _inputs(kind)
    try:
        for options in modes:
            runs = []
            for m in (model, sharded):
                torch.manual_seed(1)
                runs.append(m.generate(**inputs, max_new_tokens=6, output_scores=True, return_dict_in_generate=True,
                                       **options))
            want, got = runs
            assert torch.equal(got.sequences, want.sequences), options
            _scores_match(got.scores, want.scores)
            if not options:  # each rank holds its heads of both caches
                assert _cache_bytes(got.cache) * world == _cache_bytes(want.cache)
        graphs = sharded.feature_graphs("generate")  # per batch size (beams make 6 rows): a prefill and a decode
        assert sorted(k[0] for k in graphs) == sorted(["encode"] + ["prefill", "decode"] * len(modes[:2])), graphs
        layers = model.config.decoder_layers if kind != "t5_gated" else model.config.num_decoder_layers
        for key, gm in graphs.items():  # Megatron's: self-attention, cross-attention and MLP each end in one
            kinds = Counter(k for k, _ in collective_nodes(gm))  # all-reduce, + the vocab-parallel embedding's
            if key[0] == "decode":
                assert kinds["all_reduce"] == 3 * layers + 1 and kinds["all_gather"] == 1, (key, kinds)
    finally:
        sharded.close()


def _cache_bytes(cache: Any) -> int:
    return sum(t.numel() * t.element_size() for part in (cache.self_attention_cache, cache.cross_attention_cache)
               for layer in part.layers for t in (layer.keys, layer.values))


@pytest.mark.parametrize("kind", sorted(FAMILIES))
def test_encoder_decoders_generate_the_unsharded_tokens(kind: str) -> None:
    _generate_like_unsharded(kind, 2, ({}, {"num_beams": 3}, {"do_sample": True, "top_k": 10}))


@pytest.mark.slow
@pytest.mark.one_process
def test_one_head_per_rank() -> None:
    _generate_like_unsharded("t5_gated", 4, ({},))


def test_from_a_checkpoint_and_what_is_refused(tmp_path: Any) -> None:
    torch.manual_seed(0)
    model = FAMILIES["bart"]().eval()
    model.save_pretrained(str(tmp_path))
    sharded = tpfx.from_pretrained(str(tmp_path), devices=["cpu"] * 2)  # the class config.json names
    inputs = _inputs("bart")
    try:
        want = model.generate(**inputs, max_new_tokens=5, do_sample=False)
        assert torch.equal(sharded.generate(**inputs, max_new_tokens=5, do_sample=False), want)
        with pytest.raises(NotImplementedError, match="output_attentions"):
            sharded.generate(**inputs, max_new_tokens=2, output_attentions=True, return_dict_in_generate=True)
        with pytest.raises(NotImplementedError, match="decoder_attention_mask"):
            sharded.generate(**inputs, max_new_tokens=2, decoder_input_ids=torch.full((2, 2), 2),
                             decoder_attention_mask=torch.ones(2, 2, dtype=torch.long))
    finally:
        sharded.close()


@pytest.mark.slow
@pytest.mark.one_process
def test_the_example_runs() -> None:
    lines = [line for line in run_example("seq2seq_generate.py").splitlines() if "equal to unsharded" in line]
    assert len(lines) == 4 and all(line.endswith("equal to unsharded: True") for line in lines), lines
