"""A sharded model is still a module: what you do to the model after sharding acts on it as on the unsharded
model. ``python examples/module_ops.py`` prints, for each action, the largest logits difference from the
unsharded model doing the same."""

import copy

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

import tpfx


def steer(module: nn.Module, args: tuple) -> tuple:
    return (args[0] + 0.5,) + args[1:]                         # a steering vector on the residual stream


def main(rank: int, world_size: int) -> dict[str, float]:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=256))
    sharded = tpfx.auto_shard(copy.deepcopy(model))            # the unsharded `model` stays for comparison
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    actions = {
        "zero-init the MLP down projections": lambda m: m.apply(
            lambda mod: nn.init.zeros_(mod.down_proj.weight) if type(mod).__name__ == "LlamaMLP" else None),
        "freeze the embeddings by type": lambda m: [mod.requires_grad_(False) for mod in m.modules()
                                                    if isinstance(mod, nn.Embedding)],
        "a steering hook on layer 1": lambda m: m.model.layers[1].register_forward_pre_hook(steer),
        "eval() of one layer": lambda m: m.model.layers[0].eval(),
        "config.output_hidden_states": lambda m: setattr(m.config, "output_hidden_states", True),
        "cast to bfloat16": lambda m: m.to(torch.bfloat16),
    }
    diffs = {}
    for name, act in actions.items():
        act(model), act(sharded)                               # the same call on both
        diffs[name] = (sharded(ids).logits.float() - model(ids).logits.float()).abs().max().item()
    return diffs


if __name__ == "__main__":
    for name, diff in tpfx.launch(main, 2)[0].items():
        print(f"{name}: {diff:.2e}")
