"""Rank functions for ``tests/test_train.py``: tensor parallelism x data parallelism on a 2-D mesh."""

from __future__ import annotations

import os
from typing import Any

import models
import torch
import torch.distributed as dist
from torch.distributed._composable.replicate_with_fsdp import replicate
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

import tpfx

LR, MAX_NORM, STEPS = 1e-2, 0.5, 3


def dp_2d_check(rank: int, world: int, engine: str) -> dict[str, Any]:
    """dp=2 x tp=2: torch's data parallelism over the dp axis (``fully_shard``: FSDP2, or its composable DDP
    ``replicate``) around tpfx over the tp axis, clipped with torch's own clip_grad_norm_, against one
    unsharded model on the concatenated global batch."""
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    dp_rank, dp = mesh["dp"].get_local_rank(), mesh["dp"].size()
    model, ref = models.llama(num_kv_heads=2), models.llama(num_kv_heads=2)
    engine, _, sp = engine.partition("+")  # "fsdp+sp": with sequence parallelism over the tp axis
    sharded = tpfx.auto_shard(model, mesh=mesh, tp_axis="tp", sequence_parallel=sp == "sp")
    tp_bytes = sum(tpfx.local(p).numel() * p.element_size() for p in sharded.parameters())
    (fully_shard if engine == "fsdp" else replicate)(sharded, mesh=mesh["dp"])
    local_bytes = sum(tpfx.local(p).numel() * p.element_size() for p in sharded.parameters())
    opt = torch.optim.AdamW(sharded.parameters(), lr=LR)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=LR)
    losses, ref_losses, norms, ref_norms = [], [], [], []
    for step in range(STEPS):
        batch = torch.randint(0, ref.config.vocab_size, (2 * dp, 6), generator=torch.Generator().manual_seed(step))
        mine = batch[2 * dp_rank: 2 * dp_rank + 2]  # this dp group's half; both tp ranks read the same rows
        loss = sharded(input_ids=mine, labels=mine).loss
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(sharded.parameters(), MAX_NORM)
        norms.append(float(norm.full_tensor()))
        opt.step()
        opt.zero_grad()
        mean = loss.detach().clone()
        dist.all_reduce(mean, group=mesh["dp"].get_group())
        losses.append(float(mean) / dp)
        ref_loss = ref(input_ids=batch, labels=batch).loss
        ref_loss.backward()
        ref_norms.append(float(torch.nn.utils.clip_grad_norm_(ref.parameters(), MAX_NORM)))
        ref_opt.step()
        ref_opt.zero_grad()
        ref_losses.append(float(ref_loss))
    errors = {}
    for what, fn in {"save": lambda: tpfx.save(sharded, "/nonexistent/never-written")}.items():
        try:
            fn()
            errors[what] = "no error"
        except RuntimeError as e:
            errors[what] = str(e)
    held = torch.randint(0, ref.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(99))
    with torch.no_grad():  # after the 3 updates: the weights agree where it counts
        final, ref_final = float(sharded(input_ids=held, labels=held).loss), float(ref(input_ids=held, labels=held).loss)
    sampler = list(tpfx.dp_sampler(list(range(10)), mesh, shuffle=True, seed=0))
    total = sum(p.numel() * p.element_size() for p in ref.parameters())
    return {"sampler": sampler, "coords": (dp_rank, mesh["tp"].get_local_rank()), "losses": losses + [final],
            "ref_losses": ref_losses + [ref_final], "norms": norms, "ref_norms": ref_norms,
            "tp_world": sharded.world_size, "dp": dp, "bytes": (local_bytes, tp_bytes, total), "errors": errors}


def mesh_errors(rank: int, world: int) -> dict[str, str]:
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("dp",))
    out = {}
    for name, fn in {"no_axis": lambda: tpfx.auto_shard(models.llama(), mesh=mesh, tp_axis="tp"),
                     "wrapped": lambda: tpfx.auto_shard(DistributedDataParallel(models.llama()), 2)}.items():
        try:
            fn()
            out[name] = "no error"
        except Exception as e:  # noqa: BLE001
            out[name] = f"{type(e).__name__}: {e}"
    return out


def ddp_class_refused(rank: int, world: int) -> str:
    """torch's DistributedDataParallel class does not reduce DTensor gradients: refused, not silently wrong
    (``init_sync=False`` gets it past its own first broadcast, which fails on DTensors)."""
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    sharded = tpfx.auto_shard(models.llama(num_kv_heads=2), mesh=mesh, tp_axis="tp")
    ddp = DistributedDataParallel(sharded, process_group=mesh["dp"].get_group(), init_sync=False)
    ids = torch.randint(0, 64, (2, 6))
    try:
        ddp(input_ids=ids, labels=ids)
    except RuntimeError as e:
        return str(e)
    return "no error"


def different_batches(rank: int, world: int) -> dict[str, str]:
    """Tensor-parallel ranks fed different batches in the first step (a loader not keyed by the dp axis):
    every rank raises; later calls pay no check."""
    out = {}
    sharded = tpfx.auto_shard(models.llama(), world)
    batch = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(rank))  # differs per rank
    try:
        sharded(input_ids=batch, labels=batch)
        out["first"] = "no error"
    except RuntimeError as e:
        out["first"] = str(e)
    same = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(0))
    loss = sharded(input_ids=same, labels=same).loss  # checked once: the next calls run unchecked
    out["checked_once"] = str(sharded.__dict__.get("_first_checked") and bool(torch.isfinite(loss)))
    return out


class _Tokens(torch.utils.data.Dataset):
    """A causal-LM dataset of random token rows (labels = inputs, as Trainer's causal-LM collators give)."""

    def __init__(self, vocab: int, rows: int = 40, seq: int = 12) -> None:
        self.ids = torch.randint(0, vocab, (rows, seq), generator=torch.Generator().manual_seed(7))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _trainer_run(model: torch.nn.Module, out: str, max_grad_norm: float, callbacks: list | None = None,
                 resume: str | None = None, **kw: Any) -> Any:
    from transformers import Trainer, TrainingArguments

    options = {"max_steps": 5, "save_strategy": "no", **kw}
    args = TrainingArguments(output_dir=out, per_device_train_batch_size=4, learning_rate=1e-2,
                             max_grad_norm=max_grad_norm, logging_steps=1, report_to=[], use_cpu=True, seed=0,
                             data_seed=0, disable_tqdm=True, **options)
    trainer = Trainer(model=model, args=args, train_dataset=_Tokens(model.config.vocab_size), callbacks=callbacks)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def _losses(trainer: Any) -> list[dict[str, float]]:
    return [h for h in trainer.state.log_history if "loss" in h]


def hf_trainer_check(rank: int, world: int, family: str, out: str) -> dict[str, Any]:
    """transformers' Trainer, unchanged, on the unsharded model and on the sharded one (each tp rank runs it as
    one process of the group: same batches), clipping engaged (``max_grad_norm`` below the norms)."""
    make = {"llama": models.llama, "gpt2": models.gpt2}[family]
    ref_log = _losses(_trainer_run(ref := make(), f"{out}/ref{rank}", MAX_NORM / 2))
    sharded = tpfx.auto_shard(make(), world)
    trainer = _trainer_run(sharded, f"{out}/tp{rank}", MAX_NORM / 2)
    log = _losses(trainer)
    # the README's save path after Trainer: tpfx.save with Trainer's optimizer, loaded into a fresh module
    tpfx.save(sharded, f"{out}/ckpt", optimizer=trainer.optimizer)
    fresh = tpfx.auto_shard(make(seed=3), world)
    opt = torch.optim.AdamW(fresh.parameters())
    tpfx.load(fresh, f"{out}/ckpt", optimizer=opt)
    loaded = (all(torch.equal(tpfx.local(a).detach(), tpfx.local(b).detach())
                  for a, b in zip(sharded.parameters(), fresh.parameters(), strict=True))
              and {int(st["step"]) for st in opt.state.values()} == {5})
    # the trained models (element-wise, AdamW turns fp32 rounding of near-zero gradients into lr-sized updates)
    held = torch.randint(0, ref.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(99))
    with torch.no_grad():
        held_loss, ref_held = (float(m(input_ids=held, labels=held).loss) for m in (sharded, ref))
    return {"log": log, "ref_log": ref_log, "held": held_loss, "ref_held": ref_held, "loaded": loaded}


def trainer_resume_check(rank: int, world: int, out: str) -> dict[str, Any]:
    """Trainer checkpoints through ``tpfx.TrainerCheckpoints`` (every 2 of 6 steps, 2 kept), GPT-2 with its
    dropouts; then a fresh sharded model (other weights) resumed by Trainer from checkpoint-4 trains steps 5
    and 6: their losses, grad norms and the final weights against the uninterrupted run's, and the checkpoint
    read back by ``from_pretrained``."""
    from transformers import GPT2LMHeadModel

    options = {"max_steps": 6, "save_strategy": "steps", "save_steps": 2, "save_total_limit": 2}
    run = _trainer_run(sharded := tpfx.auto_shard(dropout_gpt2()), f"{out}/run", MAX_NORM / 2,
                       [tpfx.TrainerCheckpoints()], **options)
    kept = sorted(os.listdir(f"{out}/run"))
    fresh = tpfx.auto_shard(dropout_gpt2(seed=3))
    resumed = _trainer_run(fresh, f"{out}/run", MAX_NORM / 2, [tpfx.TrainerCheckpoints()],
                           resume=f"{out}/run/checkpoint-4", **options)
    same = all(torch.equal(tpfx.local(a), tpfx.local(b))
               for a, b in zip(sharded.parameters(), fresh.parameters(), strict=True))
    ours = {n: p.detach().full_tensor() for n, p in sharded.named_parameters()}  # collective
    reloaded = GPT2LMHeadModel.from_pretrained(f"{out}/run/checkpoint-6").state_dict()
    reload_err = max(float((reloaded[n] - p).abs().max()) for n, p in ours.items())
    return {"log": _losses(run), "resumed": _losses(resumed), "kept": kept, "same_weights": same,
            "reload_err": reload_err}


def dropout_gpt2(seed: int = 0) -> Any:
    """GPT-2 with its default dropouts (0.1 on embeddings, attention probabilities and the residual stream)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=models.TINY_VOCAB, n_positions=32, n_embd=32, n_layer=2, n_head=4)
    config._attn_implementation = "eager"
    return GPT2LMHeadModel(config).train()


def dropout_check(rank: int, world: int, sp: bool) -> dict[str, Any]:
    """Training with dropout > 0: ranks seeded differently (the first call gives them rank 0's random state);
    then, seeded alike with the unsharded model, 3 AdamW steps' losses and the first step's gradients; then an
    eval-mode call (no dropout) and a train-mode one again (each mode has its graph)."""
    torch.manual_seed(100 + rank)
    sharded, ref = tpfx.auto_shard(dropout_gpt2(), sequence_parallel=sp), dropout_gpt2()
    ids = models.token_inputs(models.TINY_VOCAB, 2, 8, seed=1)
    sharded(input_ids=ids)  # the first call: every rank now draws what rank 0 draws
    first = torch.get_rng_state()
    opt, ref_opt = torch.optim.AdamW(sharded.parameters(), lr=LR), torch.optim.AdamW(ref.parameters(), lr=LR)
    losses, ref_losses, grad_err, full = [], [], 0.0, {}
    for step in range(STEPS):
        for model, optim, out in ((sharded, opt, losses), (ref, ref_opt, ref_losses)):
            torch.manual_seed(10 + step)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            out.append(float(loss))
            if step == 0 and model is sharded:
                full = {n: p.grad.full_tensor() for n, p in sharded.named_parameters(remove_duplicate=False)
                        if p.grad is not None}  # tied weights under either name
            elif step == 0:
                grads = {n: p.grad for n, p in ref.named_parameters(remove_duplicate=False) if p.grad is not None}
                common = full.keys() & grads.keys()  # all but a tied alias one side lists under one name
                assert len(common) >= len(grads) - 1, sorted(full.keys() ^ grads.keys())
                grad_err = max(float((full[n] - grads[n]).abs().max() / grads[n].abs().max()) for n in common)
            optim.step()
            optim.zero_grad()
    modes = {}
    for mode in ("eval", "train"):
        sharded.train(mode == "train")
        ref.train(mode == "train")
        got = []
        for model in (sharded, ref):
            torch.manual_seed(20)
            with torch.no_grad():
                got.append(model(input_ids=ids).logits)
        modes[mode] = float((got[0] - got[1]).abs().max() / got[1].abs().max())
    return {"first_state": first, "losses": losses, "ref_losses": ref_losses, "grad_err": grad_err, **modes}


def dropout_checks(rank: int, world: int) -> list[dict[str, Any]]:
    """``dropout_check`` with plain tensor parallelism, then with sequence parallelism."""
    return [dropout_check(rank, world, sp) for sp in (False, True)]
