"""Models that need no hand-made inputs (tpfx/inputs.py): the example call comes from the model's own
description, for vision, audio, text-image and adapter-wrapped models as for causal LMs. Tier 2: planned
with no example inputs, run on 2 simulated ranks against the unsharded model."""

from __future__ import annotations

from typing import Any

import models
import pytest
import torch
from simulate import emit_all, run_ranks
from torch.utils._pytree import tree_flatten

import tpfx
from tpfx.inputs import prepare, synthesize


def _vit() -> torch.nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    return ViTForImageClassification(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                               intermediate_size=64, image_size=16, patch_size=4, num_labels=3))


def _clip() -> torch.nn.Module:
    from transformers import CLIPConfig, CLIPModel

    text = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                max_position_embeddings=16)
    vision = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                  image_size=16, patch_size=4)
    return CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))


def _whisper() -> torch.nn.Module:
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    return WhisperForConditionalGeneration(WhisperConfig(
        vocab_size=64, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64, num_mel_bins=8, max_source_positions=16,
        max_target_positions=16, decoder_start_token_id=0, pad_token_id=0))


def _wav2vec2() -> torch.nn.Module:
    from transformers import Wav2Vec2Config, Wav2Vec2ForCTC

    return Wav2Vec2ForCTC(Wav2Vec2Config(vocab_size=32, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                         intermediate_size=64, conv_dim=(16, 16), conv_stride=(5, 2),
                                         conv_kernel=(10, 3), num_conv_pos_embeddings=16,
                                         num_conv_pos_embedding_groups=4))


def _lora_llama() -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"], lora_dropout=0.0)
    return get_peft_model(models.llama(layers=2), config)


BUILDERS = {"vit": (_vit, {"pixel_values"}), "clip": (_clip, {"input_ids", "pixel_values"}),
            "whisper": (_whisper, {"input_features", "decoder_input_ids", "use_cache"}), "wav2vec2": (_wav2vec2, {"input_values"}),
            "peft_lora_llama": (_lora_llama, {"input_ids", "use_cache"})}


def _tensors(out: Any) -> list[torch.Tensor]:
    return [t.detach() for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_a_model_shards_with_no_example_inputs_and_is_exact(name: str) -> None:
    build, expected = BUILDERS[name]
    torch.manual_seed(0)
    model = build().eval()
    args, kwargs = synthesize(model)
    kwargs = prepare(model, kwargs)
    assert set(kwargs) == expected, sorted(kwargs)
    plan = tpfx.plan(model, 2)  # no example inputs
    assert any(p.style != "replicate" for p in plan.placements.values())  # its weights really split
    ranks = emit_all(plan)
    ref = _tensors(model(*args, **kwargs))
    for out in run_ranks(2, lambda r: _tensors(ranks[r][0](*args, **kwargs))):
        assert len(out) == len(ref)
        for a, b in zip(out, ref, strict=True):
            assert float((a - b).abs().max() / b.abs().max().clamp_min(1e-6)) <= 1e-5


def test_an_input_that_cannot_be_made_names_example_kwargs() -> None:
    model = _vit()
    model.main_input_name = "audio_codes"  # an input tpfx knows no shape for
    with pytest.raises(ValueError, match=r"cannot make an example 'audio_codes'.*example_kwargs"):
        tpfx.plan(model, 2)
    with pytest.raises(ValueError, match="example_inputs"):
        tpfx.plan(torch.nn.Linear(4, 4), 2)
