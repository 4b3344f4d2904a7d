"""HF Trainer, unchanged, on a sharded model: 2 gloo ranks, 5 clipped AdamW steps, checked against the
unsharded model trained by the same Trainer; Trainer's checkpoints (``tpfx.TrainerCheckpoints``), resumed by a
fresh sharded model; then the trained model saved and reloaded with transformers (``python examples/trainer.py``)."""

from __future__ import annotations

import tempfile

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

import tpfx


def build() -> LlamaForCausalLM:
    torch.manual_seed(0)  # the same random weights on every rank (a real run: tpfx.from_pretrained(path))
    config = LlamaConfig(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=8, num_key_value_heads=4)
    return LlamaForCausalLM(config)


class Tokens(torch.utils.data.Dataset):
    def __init__(self) -> None:
        self.ids = torch.randint(0, 256, (64, 16), generator=torch.Generator().manual_seed(1))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def train(model: torch.nn.Module, out: str, resume: str | None = None) -> list[dict[str, float]]:
    sharded = isinstance(model, tpfx.ShardedModule)
    args = TrainingArguments(output_dir=out, max_steps=5, per_device_train_batch_size=4, learning_rate=1e-2,
                             max_grad_norm=0.5, logging_steps=1, report_to=[], use_cpu=True, seed=0,
                             disable_tqdm=True, log_level="error",
                             save_strategy="steps" if sharded else "no", save_steps=3)
    callbacks = [tpfx.TrainerCheckpoints()] if sharded else []  # Trainer's checkpoints of a sharded model
    trainer = Trainer(model=model, args=args, train_dataset=Tokens(), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    return [h for h in trainer.state.log_history if "loss" in h]


def main(rank: int, world_size: int, out: str) -> None:
    sharded = tpfx.auto_shard(build(), world_size)
    log = train(sharded, f"{out}/tp")                         # every rank runs Trainer: one tp group
    unsharded = build()
    ref = train(unsharded, f"{out}/ref{rank}")
    torch.manual_seed(1)
    fresh = tpfx.auto_shard(build(), world_size)              # resumed from Trainer's checkpoint at step 3
    resumed = train(fresh, f"{out}/tp", resume=f"{out}/tp/checkpoint-3")
    sharded.save_pretrained(f"{out}/trained")                 # collective: the full model, transformers' layout
    ids = Tokens().ids[:2]
    with torch.no_grad():
        logits = sharded(input_ids=ids).logits                  # collective too
    if rank == 0:
        for h, r in zip(log, ref):
            print(f"step {h['step']}: loss {h['loss']:.6f} (unsharded {r['loss']:.6f})  "
                  f"grad_norm {h['grad_norm']:.6f} (unsharded {r['grad_norm']:.6f})")
        with torch.no_grad():
            reloaded = LlamaForCausalLM.from_pretrained(f"{out}/trained")(input_ids=ids).logits
        err = float((reloaded - logits).abs().max() / logits.abs().max())
        print(f"reloaded checkpoint vs the trained sharded model: rel err {err:.1e}")
        print(f"resumed from checkpoint-3: steps 4-5 as the uninterrupted run: {resumed[3:] == log[3:]}")

if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as out:
        tpfx.launch(main, 2, out)
