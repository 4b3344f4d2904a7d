"""Encoder-decoders generate on a sharded model: T5 (text in) and Whisper (log-mel features in), 2 ranks in this
process, checked against the unsharded model's ``generate`` (``python examples/seq2seq_generate.py``)."""

from __future__ import annotations

import copy

import torch
from transformers import T5Config, T5ForConditionalGeneration, WhisperConfig, WhisperForConditionalGeneration

import tpfx


def models() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)  # random weights (a real run: tpfx.from_pretrained(path, devices=[...]))
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=2,
                                             num_heads=4, feed_forward_proj="gated-gelu", decoder_start_token_id=0, initializer_factor=8.0,
                                             pad_token_id=0, eos_token_id=1))
    whisper = WhisperForConditionalGeneration(WhisperConfig(
        vocab_size=128, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=16,
        max_source_positions=32, max_target_positions=64, decoder_start_token_id=1, pad_token_id=0,
        eos_token_id=2, bos_token_id=1, init_std=0.3))
    return {"t5": t5.eval(), "whisper": whisper.eval()}


def main() -> None:
    g = torch.Generator().manual_seed(1)
    inputs = {"t5": {"input_ids": torch.randint(3, 128, (2, 10), generator=g)},
              "whisper": {"input_features": torch.randn(2, 16, 64, generator=g)}}   # (B, mel bins, frames)
    for name, model in models().items():
        sharded = tpfx.auto_shard(copy.deepcopy(model), devices=["cpu"] * 2)
        for mode, options in {"greedy": {}, "beam search": {"num_beams": 3}}.items():
            out = sharded.generate(**inputs[name], max_new_tokens=8, **options)
            ref = model.generate(**inputs[name], max_new_tokens=8, **options)
            print(f"{name:8s} {mode:12s} {out[0].tolist()}  equal to unsharded: {torch.equal(out, ref)}")
        sharded.close()


if __name__ == "__main__":
    main()
