"""Generation exactly as transformers does it, off the greedy path: the checkpoint's own generation config (read,
honoured, written back), transformers' choice between a single weights file and an index, prompts of any length
after any earlier call, and assisted decoding (a draft model, prompt lookup). Ranks on threads of this process
(``devices=``): the generate code is the one every launched rank runs."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from models import llama, token_inputs
from numerics import TOL, rel_err
from transformers import GenerationConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

import tpfx


@pytest.fixture(scope="module")
def pair() -> tuple[Any, torch.nn.Module]:
    model = llama(num_kv_heads=2).eval()
    return tpfx.auto_shard(copy.deepcopy(model), devices=["cpu"] * 2), model


def _saved(model: torch.nn.Module, path: Path, gen: GenerationConfig) -> Path:
    model = copy.deepcopy(model)
    model.generation_config = gen
    model.save_pretrained(str(path))
    return path


def test_the_checkpoints_generation_config_is_honoured_and_written_back(pair: tuple[Any, torch.nn.Module],
                                                                       tmp_path: Path) -> None:
    _, model = pair
    prompt = token_inputs(model.config.vocab_size, batch=1, seq=5, seed=3)
    free = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0)[0, 5:]
    stop = int(free[2])  # a Llama-3-style eos list whose second id the greedy run reaches at its third token
    gen = GenerationConfig(max_new_tokens=6, eos_token_id=[model.config.vocab_size - 1, stop], pad_token_id=0,
                           bos_token_id=1)
    path = _saved(model, tmp_path / "greedy", gen)
    want = LlamaForCausalLM.from_pretrained(str(path)).eval().generate(prompt)
    sharded = tpfx.from_pretrained(str(path), devices=["cpu"] * 2)
    got = sharded.generate(prompt)
    assert torch.equal(got, want) and int(got[0, -1]) == stop and got.shape[1] < 5 + 6  # stopped at the list's eos
    sharded.save_pretrained(str(tmp_path / "back"))
    written = json.loads((tmp_path / "back" / "generation_config.json").read_text())
    assert written == gen.to_diff_dict()
    sharded.close()

    sampling = GenerationConfig(max_new_tokens=3, do_sample=True, temperature=0.7, top_k=5, pad_token_id=0)
    path = _saved(model, tmp_path / "sampling", sampling)
    ref = LlamaForCausalLM.from_pretrained(str(path)).eval()
    sharded = tpfx.from_pretrained(str(path), devices=["cpu"] * 2)
    assert sharded.generation_config.top_k == 5 and sharded.generation_config.do_sample
    for seed in (0, 1):
        torch.manual_seed(seed)
        got = sharded.generate(prompt)
        torch.manual_seed(seed)
        assert torch.equal(got, ref.generate(prompt)) and got.shape[1] == 5 + 3
    sharded.close()


def test_a_single_weights_file_wins_over_an_index_as_in_transformers(pair: tuple[Any, torch.nn.Module],
                                                                    tmp_path: Path) -> None:
    _, model = pair
    other = llama(num_kv_heads=2, seed=5)
    other.save_pretrained(str(tmp_path / "sharded"), max_shard_size="200KB")
    model.save_pretrained(str(tmp_path / "both"))
    for f in (tmp_path / "sharded").glob("model-*.safetensors"):
        shutil.copy(f, tmp_path / "both")
    shutil.copy(tmp_path / "sharded" / "model.safetensors.index.json", tmp_path / "both")
    ids = token_inputs(model.config.vocab_size, seed=4)
    want = LlamaForCausalLM.from_pretrained(str(tmp_path / "both")).eval()(input_ids=ids).logits
    assert rel_err(want, model(input_ids=ids).logits) <= TOL  # transformers read the single file
    sharded = tpfx.from_pretrained(str(tmp_path / "both"), devices=["cpu"] * 2)
    with torch.no_grad():
        assert rel_err(sharded(input_ids=ids).logits, want) <= TOL
    sharded.close()


def test_any_prompt_length_after_any_call(pair: tuple[Any, torch.nn.Module]) -> None:
    """A 1-token prompt (BOS only), longer prompts around it and plain forwards after generate: transformers'
    tokens and logits each time (a graph whose export guards refuse a shape is recaptured for it)."""
    sharded, model = pair
    vocab = model.config.vocab_size
    with torch.no_grad():
        for seq in (5, 1, 5, 1, 2):
            prompt = token_inputs(vocab, batch=1, seq=seq, seed=seq)
            want = model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
            assert torch.equal(sharded.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0), want), seq
        for shape in ((1, 1), (5, 6)):
            ids = token_inputs(vocab, batch=shape[0], seq=shape[1], seed=9)
            assert rel_err(sharded(input_ids=ids).logits, model(input_ids=ids).logits) <= TOL, shape


def test_assisted_decoding_gives_transformers_tokens(pair: tuple[Any, torch.nn.Module]) -> None:
    """A draft model's candidates (and prompt lookup's) are checked several positions at once, and the rejected
    ones are cropped from the cache: tokens equal the unsharded model's."""
    sharded, model = pair
    draft = llama(num_kv_heads=2, layers=1, seed=3).eval()
    prompt = torch.tensor([[5, 6, 7, 5, 6, 7, 5, 6]])  # repeats, so prompt lookup proposes candidates
    for options in ({"assistant_model": draft}, {"prompt_lookup_num_tokens": 3}):
        with torch.no_grad():
            want = model.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0, use_cache=True,
                                  **copy.deepcopy(options))
            got = sharded.generate(prompt, max_new_tokens=8, do_sample=False, pad_token_id=0, **options)
        assert torch.equal(got, want), options


def test_assisted_decoding_past_a_sliding_window_is_refused() -> None:
    torch.manual_seed(0)
    cfg = MistralConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, sliding_window=4, use_cache=False)
    sharded = tpfx.auto_shard(MistralForCausalLM(cfg).eval(), devices=["cpu"] * 2)
    with pytest.raises(NotImplementedError, match="assisted decoding"):
        sharded.generate(torch.tensor([[5, 6, 7, 5, 6, 7, 5, 6]]), max_new_tokens=6, do_sample=False,
                         pad_token_id=0, prompt_lookup_num_tokens=3)
    sharded.close()
