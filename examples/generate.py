"""Generate text with a sharded model: greedy, beam search and sampling on 2 gloo ranks, checked against the
unsharded model's ``generate`` (``python examples/generate.py``)."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

import tpfx


def build() -> LlamaForCausalLM:
    torch.manual_seed(0)  # the same random weights on every rank (a real run: tpfx.from_pretrained(path))
    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=4, pad_token_id=0)
    return LlamaForCausalLM(config).eval()


def main(rank: int, world_size: int) -> None:
    sharded, unsharded = tpfx.auto_shard(build(), world_size), build()
    ids = torch.randint(3, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    ids[0, :4], mask[0, :4] = 0, 0                                          # left padding
    runs = {"greedy": {}, "beam search": {"num_beams": 3}, "sampling": {"do_sample": True, "top_p": 0.9}}
    for name, kwargs in runs.items():
        torch.manual_seed(7)
        out = sharded.generate(ids, attention_mask=mask, max_new_tokens=16, **kwargs)   # the same on every rank
        torch.manual_seed(7)
        ref = unsharded.generate(ids, attention_mask=mask, max_new_tokens=16, **kwargs)
        if rank == 0:
            print(f"{name:12s} {out[1, -16:].tolist()}  equal to unsharded: {torch.equal(out, ref)}")
    res = sharded.generate(ids, attention_mask=mask, max_new_tokens=16, return_dict_in_generate=True)
    cfg, length = sharded.config, res.cache.get_seq_length()
    full = cfg.num_hidden_layers * 2 * ids.shape[0] * cfg.num_key_value_heads * length * cfg.head_dim * 4  # fp32
    if rank == 0:
        print(f"KV cache per rank: {res.cache.nbytes} bytes; unsharded: {full} bytes")


if __name__ == "__main__":
    tpfx.launch(main, 2)
