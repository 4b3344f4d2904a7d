"""Rank functions for ``tests/test_clip.py`` (module level so spawned ranks can import them)."""

from __future__ import annotations

from typing import Any

import models
import torch
from numerics import grad_errors, rel_err
from torch.distributed.tensor import DTensor

import tpfx
from tpfx.testing.families import tiny_causal_lm

BUILDERS = {"llama": lambda: models.llama(num_kv_heads=2), "gpt2": lambda: models.gpt2(),
            "falcon": lambda: tiny_causal_lm("falcon", seed=0)}


def clip_check(rank: int, world: int, name: str, norm_type: float) -> dict[str, Any]:
    """tpfx.clip_grad_norm_ vs torch's on the unsharded model: the norm and every clipped gradient slice."""
    model, ref = BUILDERS[name](), BUILDERS[name]()
    sharded = tpfx.auto_shard(model, world)
    vocab = ref.config.vocab_size
    ids = torch.randint(0, vocab, (2, 7), generator=torch.Generator().manual_seed(3))
    sharded(input_ids=ids, labels=ids).loss.backward()
    ref(input_ids=ids, labels=ids).loss.backward()
    local_norm = float(torch.nn.utils.get_total_norm([tpfx.local(p.grad) for p in sharded.parameters()], norm_type))
    want = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.1, norm_type)

    def grad_err() -> float:
        return max(grad_errors(sharded, ref, rank).values())

    saved = [tpfx.local(p.grad).clone() for p in sharded.parameters()]
    try:  # torch's own call: exact where every parameter is a DTensor, else it raises on the mix
        norm = torch.nn.utils.clip_grad_norm_(sharded.parameters(), 0.1, norm_type)
        torch_call: dict[str, Any] = {"norm_err": rel_err(norm.full_tensor(), want), "grad_err": grad_err()}
    except RuntimeError as e:
        torch_call = {"error": str(e)[:200]}
    for p, g in zip(sharded.parameters(), saved):
        tpfx.local(p.grad).copy_(g)
    # transformers' Trainer (and accelerate) on DTensors over several meshes: one norm per mesh, no clipping
    from transformers import Trainer

    trainer_norm = Trainer._mixed_mesh_grad_norm(None, sharded, float("inf"))  # type: ignore[arg-type]
    got = tpfx.clip_grad_norm_(sharded, 0.1, norm_type)
    errs = [grad_err()]
    layouts = sorted({p.placement for p in sharded.plan.placements.values()})
    return {"norm": float(got), "want": float(want), "norm_err": rel_err(got, want), "grad_err": max(errs),
            "local_norm": local_norm, "layouts": layouts, "dtype": str(got.dtype), "torch": torch_call,
            "trainer_norm_err": rel_err(trainer_norm, want),
            "meshes": len({p.device_mesh for p in sharded.parameters() if isinstance(p, DTensor)}),
            "plain": [n for n, p in sharded.named_parameters() if not isinstance(p, DTensor)]}


PLAIN_2D = {"phi3_gqa": lambda: tiny_causal_lm("phi3", seed=0, num_key_value_heads=2),  # packed qkv 64+16+16
            "falcon": lambda: tiny_causal_lm("falcon", seed=0)}  # per-part q/k/v, one KV head held whole


def clip_2d(rank: int, world: int) -> dict[str, Any]:
    """dp=2 x tp=2, FSDP2 and composable DDP over dp, models with plain-tensor parameters: tpfx.clip_grad_norm_
    on the wrapped model vs torch's on one unsharded process with the global batch (the norm and every clipped
    gradient), and torch's own call on the mix (it raises)."""
    from torch.distributed._composable.replicate_with_fsdp import replicate
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    dp_rank, tp_rank = mesh["dp"].get_local_rank(), mesh["tp"].get_local_rank()
    out: dict[str, Any] = {}
    for engine, wrap, names in (("fsdp", fully_shard, PLAIN_2D), ("replicate", replicate, ["phi3_gqa"])):
        for name in names:
            build = PLAIN_2D[name]
            sharded, ref = tpfx.auto_shard(build(), mesh=mesh, tp_axis="tp"), build()
            plain = [n for n, p in sharded.named_parameters() if not isinstance(p, DTensor)]
            wrap(sharded, mesh=mesh["dp"])
            batch = torch.randint(0, ref.config.vocab_size, (4, 7), generator=torch.Generator().manual_seed(3))
            mine = batch[2 * dp_rank: 2 * dp_rank + 2]
            sharded(input_ids=mine, labels=mine).loss.backward()
            ref(input_ids=batch, labels=batch).loss.backward()
            want = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.1)
            try:
                torch.nn.utils.get_total_norm([p.grad for p in sharded.parameters()])
                torch_call = "no error"
            except Exception as e:  # noqa: BLE001 - torch's own call on the mix of meshes
                torch_call = f"{type(e).__name__}: {str(e)[:120]}"
            got = tpfx.clip_grad_norm_(sharded, 0.1)
            full = dict(ref.named_parameters())
            errs = []
            for n, p in sharded.named_parameters():  # this rank's tp slice, as the wrapper holds it over dp
                tp_local = tpfx.shard_tensor(sharded.plan, n, full[n].grad, tp_rank)
                dp_sharded = not p.grad.placements[0].is_replicate()  # FSDP2: dim 0 in chunks; replicate: whole
                errs.append(rel_err(p.grad.to_local(), tp_local.chunk(2)[dp_rank] if dp_sharded else tp_local))
            out[f"{engine}/{name}"] = {"norm_err": rel_err(got, want), "grad_err": max(errs), "want": float(want),
                                       "plain": plain, "torch": torch_call}
    return out
