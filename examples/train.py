"""Train a causal LM with tensor parallelism x data parallelism on a 2-D DeviceMesh.

    torchrun --nproc-per-node 4 examples/train.py            # dp=2 x tp=2: gloo on CPU, NCCL on 4+ GPUs
    TP=4 torchrun --nproc-per-node 8 examples/train.py       # dp=2 x tp=4
    SP=1 torchrun --nproc-per-node 4 examples/train.py       # with sequence parallelism over the tp axis
    torchrun --nnodes 2 --nproc-per-node 8 --rdzv-backend c10d --rdzv-endpoint HOST:29500 examples/train.py

tpfx shards the model over the mesh's "tp" axis (its parameters become DTensors on it); torch's FSDP2
(fully_shard) shards them again over the "dp" axis and averages gradients there (DP=replicate: torch's
composable DDP instead). Every rank of one tp group reads the same batch (tpfx.dp_sampler); torch's own
clip_grad_norm_ returns the unsharded model's norm. Put the tp axis inside a node (its all-reduces are per
layer) and dp across nodes. Prints the loss and gradient norm per step on rank 0.
"""

import os

import torch
import torch.distributed as dist
from torch.distributed._composable.replicate_with_fsdp import replicate
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.utils.data import DataLoader
from transformers import LlamaConfig, LlamaForCausalLM

import tpfx

STEPS, BATCH, SEQ, VOCAB = int(os.environ.get("STEPS", 5)), 2, 32, 1000


def main() -> None:
    world = int(os.environ["WORLD_SIZE"])
    cuda = torch.cuda.is_available() and torch.cuda.device_count() >= int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if cuda:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    else:
        torch.set_num_threads(1)
    dist.init_process_group("nccl" if cuda else "gloo")
    tp = int(os.environ.get("TP", 2))
    mesh = init_device_mesh("cuda" if cuda else "cpu", (world // tp, tp), mesh_dim_names=("dp", "tp"))

    torch.manual_seed(0)  # the same initial weights on every rank
    model = LlamaForCausalLM(LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=VOCAB))
    model.to("cuda" if cuda else "cpu")
    sharded = tpfx.auto_shard(model, mesh=mesh, tp_axis="tp", sequence_parallel=os.environ.get("SP") == "1")
    data_parallel = replicate if os.environ.get("DP") == "replicate" else fully_shard
    data_parallel(sharded, mesh=mesh["dp"])
    opt = torch.optim.AdamW(sharded.parameters(), lr=1e-3)  # after wrapping: the optimizer sees its shards

    data = torch.randint(0, VOCAB, (64, SEQ), generator=torch.Generator().manual_seed(1))
    loader = DataLoader(data, batch_size=BATCH, sampler=tpfx.dp_sampler(data, mesh, shuffle=True, seed=0))
    for step, batch in zip(range(STEPS), loader):
        batch = batch.to(next(sharded.parameters()).device)
        loss = sharded(input_ids=batch, labels=batch).loss
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(sharded.parameters(), max_norm=1.0).full_tensor()
        opt.step()
        opt.zero_grad()
        mean = loss.detach().clone()
        dist.all_reduce(mean, group=mesh["dp"].get_group())  # the global batch's loss
        if dist.get_rank() == 0:
            print(f"step {step}: loss {mean.item() / mesh['dp'].size():.6f} grad_norm {norm.item():.6f}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
