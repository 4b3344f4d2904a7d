"""LoRA fine-tuning of a sharded model: the base read by slices, a new peft adapter on it, trained next to the
unsharded peft model, saved as peft's files. ``python examples/lora.py [dir]`` prints both runs' losses, the
forward collectives with and without the adapter, and the reloaded adapter's logits difference."""

import sys
import tempfile
from collections import Counter
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

import tpfx

LORA = dict(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                    "gate_proj", "up_proj", "down_proj"])


def main(rank: int, world_size: int, root: str) -> dict:
    torch.manual_seed(0)
    sharded = tpfx.from_pretrained(f"{root}/base", adapter=LoraConfig(**LORA))  # each rank reads its slices
    torch.manual_seed(0)
    model = get_peft_model(LlamaForCausalLM.from_pretrained(f"{root}/base"), LoraConfig(**LORA))  # unsharded
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    losses: dict[str, list[float]] = {"tpfx": [], "unsharded": []}
    for name, m in (("tpfx", sharded), ("unsharded", model)):
        m.train()
        opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3)  # the adapters only
        for step in range(3):
            torch.manual_seed(step)                                    # the same LoRA dropout masks
            loss = m(input_ids=ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses[name].append(round(loss.item(), 6))
    sharded.save_pretrained(f"{root}/adapter")                         # collective: peft's adapter files
    reloaded = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(f"{root}/base"), f"{root}/adapter")
    with torch.no_grad():
        diff = (reloaded.eval()(input_ids=ids).logits - model.eval()(input_ids=ids).logits).abs().max().item()
    return {"losses": losses, "reloaded_diff": diff, "files": sorted(p.name for p in Path(f"{root}/adapter").iterdir())}


if __name__ == "__main__":
    root = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp()
    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=256)
    base = LlamaForCausalLM(config)
    base.save_pretrained(f"{root}/base")                               # a base checkpoint
    plain, adapted = tpfx.plan(base, 2), tpfx.plan(get_peft_model(base, LoraConfig(**LORA)), 2)
    print("forward collectives without adapters:", dict(Counter(c.kind for c in plain.collectives)))
    print("forward collectives with LoRA:       ", dict(Counter(c.kind for c in adapted.collectives)))
    out = tpfx.launch(main, 2, root)[0]
    for name, values in out["losses"].items():
        print(f"{name} losses: {values}")
    print("adapter files:", out["files"])
    print(f"reloaded by peft, unsharded: max logits difference {out['reloaded_diff']:.2e}")
