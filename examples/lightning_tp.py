"""Lightning's ModelParallelStrategy with tpfx: ``configure_model`` shards the model over the tensor-parallel
axis of Lightning's device mesh and FSDP2 wraps it over the data-parallel axis. ``python examples/lightning_tp.py
[out.json]`` trains 3 steps on 4 CPU processes (dp=2 x tp=2) and, on rank 0, the unsharded model on the same
global batches, both clipped at 0.5; it prints both runs' losses."""

import json
import sys

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader, Dataset
from transformers import LlamaConfig, LlamaForCausalLM

import tpfx

STEPS, BATCH, SEQ, CLIP = 3, 2, 16, 0.5


def build() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, vocab_size=256))


class Tokens(Dataset):
    def __len__(self) -> int:
        return STEPS * BATCH * 2  # 2 data-parallel groups

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.randint(0, 256, (SEQ,), generator=torch.Generator().manual_seed(i))


class LitLM(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.model = build()
        self.losses: list[float] = []

    def configure_model(self) -> None:
        self.model = tpfx.auto_shard(self.model, mesh=self.device_mesh, tp_axis="tensor_parallel")
        fully_shard(self.model, mesh=self.device_mesh["data_parallel"])

    def training_step(self, batch: torch.Tensor) -> torch.Tensor:
        loss = self.model(input_ids=batch, labels=batch).loss
        mean = loss.detach().clone()
        torch.distributed.all_reduce(mean, group=self.device_mesh["data_parallel"].get_group())
        self.losses.append(mean.item() / self.device_mesh["data_parallel"].size())
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.model.parameters(), lr=1e-2)


def unsharded_losses(order: list[list[int]]) -> list[float]:
    """The same model trained on one process with the global batches (both dp groups' rows together)."""
    model, data = build(), Tokens()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for rows in order:
        batch = torch.stack([data[i] for i in rows])
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


if __name__ == "__main__":
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=2)
    trainer = L.Trainer(accelerator="cpu", devices=4, strategy=strategy, max_steps=STEPS, logger=False, gradient_clip_val=CLIP,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)
    lit = LitLM()
    loader = DataLoader(Tokens(), batch_size=BATCH, shuffle=False)  # Lightning adds a sampler over the dp axis
    trainer.fit(lit, loader)
    sampler = trainer.train_dataloader.sampler  # which rows each dp group read, step by step
    mine = list(iter(sampler))
    rows = [None] * 2
    torch.distributed.all_gather_object(rows, mine, group=lit.device_mesh["data_parallel"].get_group())
    if trainer.global_rank == 0:
        order = [sum((r[s * BATCH:(s + 1) * BATCH] for r in rows), []) for s in range(STEPS)]
        result = {"tpfx": lit.losses, "unsharded": unsharded_losses(order)}
        for name, values in result.items():
            print(f"{name} losses: {[round(v, 6) for v in values]}")
        if len(sys.argv) > 1:
            with open(sys.argv[1], "w") as f:
                json.dump(result, f)
