"""Load a transformers checkpoint sharded over 2 CPU processes, train, save, resume at another world size, and
save it back as a plain transformers checkpoint: ``python examples/checkpoint.py [WORKDIR]``."""

import os
import sys
import tempfile

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

import tpfx


def train(rank: int, world_size: int, work: str) -> float:
    sharded = tpfx.from_pretrained(f"{work}/ckpt")             # each rank reads only its own slices
    opt = torch.optim.AdamW(sharded.parameters(), lr=1e-3)
    ids = torch.randint(0, sharded.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        sharded(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()
    tpfx.save(sharded, f"{work}/run/step3", optimizer=opt)     # per rank (DCP): resumable at any world size
    return sharded(input_ids=ids, labels=ids).loss.item()


def resume(rank: int, world_size: int, work: str) -> float:
    sharded = tpfx.from_pretrained(f"{work}/ckpt")
    opt = torch.optim.AdamW(sharded.parameters(), lr=1e-3)
    tpfx.load(sharded, f"{work}/run/step3", optimizer=opt)     # saved at t=2, loaded at t=4
    sharded.save_pretrained(f"{work}/trained")                 # collective: every rank calls it
    ids = torch.randint(0, sharded.config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    return sharded(input_ids=ids, labels=ids).loss.item()


if __name__ == "__main__":
    work = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp()
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, vocab_size=1000)).save_pretrained(f"{work}/ckpt")
    after_training = tpfx.launch(train, 2, work)[0]
    resumed = tpfx.launch(resume, 4, work)[0]
    plain = AutoModelForCausalLM.from_pretrained(f"{work}/trained")  # plain transformers, no tpfx
    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))
    reloaded = plain(input_ids=ids, labels=ids).loss.item()
    print(f"loss after 3 steps at t=2: {after_training:.6f}; resumed at t=4: {resumed:.6f}; "
          f"reloaded unsharded: {reloaded:.6f}; files: {sorted(os.listdir(f'{work}/trained'))}")
