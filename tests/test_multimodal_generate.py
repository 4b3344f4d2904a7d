"""Vision-language models generate on a sharded model (LLaVA with a CLIP tower, Gemma 3 with a SigLIP tower and
sliding-window layers): the image features come from a graph of their own with the vision tower split, the
prompt step merges them, the decode steps are the text model's. Tokens equal the unsharded model's in greedy,
beam search and seeded sampling; Megatron's collectives in the decode graph. Ranks on threads (``devices=``)."""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable
from typing import Any

import pytest
import torch
from tpfx.passes.emit import collective_nodes
from transformers import (
    CLIPVisionConfig,
    Gemma3Config,
    Gemma3ForConditionalGeneration,
    Gemma3TextConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    SiglipVisionConfig,
)

import tpfx

_TOWER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=16,
              patch_size=4)
_TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)


def _llava() -> torch.nn.Module:
    return LlavaForConditionalGeneration(LlavaConfig(
        vision_config=CLIPVisionConfig(**_TOWER), text_config=LlamaConfig(vocab_size=128, **_TEXT),
        image_token_id=120, vision_feature_layer=-1, vision_feature_select_strategy="default"))


def _gemma3() -> torch.nn.Module:
    return Gemma3ForConditionalGeneration(Gemma3Config(
        vision_config=SiglipVisionConfig(**_TOWER),
        text_config=Gemma3TextConfig(vocab_size=300, head_dim=16, sliding_window=8, **_TEXT),
        mm_tokens_per_image=4, image_token_index=290, boi_token_index=291, eoi_token_index=292))


# family -> (model, image token, image tokens per image)
FAMILIES: dict[str, tuple[Callable[[], torch.nn.Module], int, int]] = {
    "llava": (_llava, 120, 16), "gemma3": (_gemma3, 290, 4)}


def _prompt(token: int, per_image: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(2)
    text = torch.randint(1, 100, (2, 6), generator=g)
    ids = torch.cat([text[:, :2], torch.full((2, per_image), token), text[:, 2:]], 1)  # (B, S): the image inside
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": torch.randn(2, 3, 16, 16,
                                                                                                  generator=g)}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_vision_language_models_generate_the_unsharded_tokens(family: str) -> None:
    build, token, per_image = FAMILIES[family]
    torch.manual_seed(0)
    model = build().eval()
    inputs = _prompt(token, per_image)
    sharded = tpfx.auto_shard(copy.deepcopy(model), devices=["cpu"] * 2)  # inputs made from the config: an image
    try:
        modes: tuple[dict[str, Any], ...] = ({}, {"num_beams": 3}, {"do_sample": True, "top_k": 10})
        for options in modes[:1] if family == "gemma3" else modes:
            runs = []
            for m in (model, sharded):
                torch.manual_seed(1)
                runs.append(m.generate(**inputs, max_new_tokens=6, **options))
            assert torch.equal(runs[1], runs[0]), options
        layers = model.config.get_text_config().num_hidden_layers
        for key, gm in sharded.feature_graphs("generate").items():
            kinds = Counter(k for k, _ in collective_nodes(gm))
            if key[0] == "decode":  # the text model's: 2 all-reduces per layer + the embedding's, one logits gather
                assert kinds["all_reduce"] == 2 * layers + 1 and kinds["all_gather"] == 1, (key, kinds)
            if key[0] == "features":  # the vision tower split: its layer's attention and MLP, the projector
                assert kinds["all_reduce"] >= 3 and not kinds["all_gather"], (key, kinds)
        assert {k[0] for k in sharded.feature_graphs("generate")} == {"features", "prefill", "decode"}
    finally:
        sharded.close()
