"""Models and rank functions for ``tests/test_lora.py``: adapters (peft's LoRA and IA3, and a hand-written
low-rank adapter) trained sharded against the unsharded model, and peft's files written and read back."""

from __future__ import annotations

import os
from typing import Any

import models
import torch
from numerics import compare_parameters, rel_err
from torch import nn

import tpfx

LR, STEPS = 1e-3, 3  # a LoRA learning rate (peft examples use 1e-4 .. 1e-3)
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SUBSETS = {"all": ALL, "attention": ["q_proj", "v_proj"], "mlp": ["gate_proj", "down_proj"]}
ROW = {"o_proj", "down_proj", "fc2"}  # the base layers a Megatron plan splits by rows


class LowRank(nn.Module):
    """A hand-written low-rank adapter beside a frozen linear layer: ``base(x) + B(A(x)) * scale``."""

    def __init__(self, base: nn.Linear, r: int = 4, scale: float = 2.0) -> None:
        super().__init__()
        self.base, self.scale = base, scale
        self.base.weight.requires_grad_(False)
        self.A = nn.Parameter(torch.randn(r, base.in_features) / base.in_features ** 0.5)  # (r, in)
        self.B = nn.Parameter(torch.randn(base.out_features, r) * 0.1)  # (out, r)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + (x @ self.A.t()) @ self.B.t() * self.scale  # (B, S, out)


class AdaptedMLP(nn.Module):
    """Two pre-norm residual MLP blocks whose fc1 and fc2 carry a ``LowRank`` adapter, and a head."""

    def __init__(self, d: int = 32, layers: int = 2, adapter: bool = True) -> None:
        super().__init__()
        wrap: Any = LowRank if adapter else (lambda m: m)  # without: the same model, no adapters
        self.embed = nn.Embedding(models.TINY_VOCAB, d)
        self.fc1 = nn.ModuleList(wrap(nn.Linear(d, 4 * d, bias=False)) for _ in range(layers))
        self.fc2 = nn.ModuleList(wrap(nn.Linear(4 * d, d, bias=False)) for _ in range(layers))
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(layers))
        self.head = nn.Linear(d, models.TINY_VOCAB)
        for name, p in self.named_parameters():
            p.requires_grad_(not adapter or name.endswith((".A", ".B")))  # only the adapters train

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)  # (B, S, D)
        for fc1, fc2, norm in zip(self.fc1, self.fc2, self.norms, strict=True):
            x = x + fc2(torch.nn.functional.gelu(fc1(norm(x))))  # pre-norm residual MLP blocks
        return self.head(x)  # (B, S, V)


def peft_llama(kind: str = "all", seed: int = 0, dropout: float = 0.1) -> nn.Module:
    from peft import IA3Config, LoraConfig, get_peft_model

    base = models.llama(layers=2, seed=seed)
    torch.manual_seed(seed + 1)
    if kind == "ia3":
        config: Any = IA3Config(target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"],
                                init_ia3_weights=False)
    else:
        config = LoraConfig(r=4, target_modules=SUBSETS[kind], lora_dropout=dropout)
    return get_peft_model(base, config)


def adapted_mlp(seed: int = 0, adapter: bool = True) -> nn.Module:
    torch.manual_seed(seed)
    return AdaptedMLP(adapter=adapter)


def _loss(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    if isinstance(model, AdaptedMLP) or isinstance(getattr(model, "tree", None), AdaptedMLP):
        logits = model(ids)
        return nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    return model(input_ids=ids, labels=ids).loss


def train_like(rank: int, sharded: nn.Module, ref: nn.Module, vocab: int) -> dict[str, Any]:
    """3 AdamW steps over the trainable parameters of both, seeded alike before each forward (dropout): the
    losses, the worst gradient error over the steps, and what trained."""
    sharded.train(), ref.train()
    ids = models.token_inputs(vocab, 2, 8, seed=1)
    opts = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=LR) for m in (sharded, ref)]
    losses: list[list[float]] = [[], []]
    grad_err = 0.0
    for step in range(STEPS):
        for i, m in enumerate((sharded, ref)):
            torch.manual_seed(10 + step)
            loss = _loss(m, ids)
            loss.backward()
            losses[i].append(loss.item())
        cmp = compare_parameters(sharded, ref, sharded.plan, rank, grads=True)  # type: ignore[attr-defined]
        assert not cmp["missing"] and not cmp["extra"], cmp
        grad_err = max(grad_err, max(cmp["errors"].values()))
        for opt in opts:
            opt.step()
            opt.zero_grad()
    trained = sorted(n for n, p in sharded.named_parameters() if p.requires_grad)
    return {"losses": losses[0], "ref_losses": losses[1], "grad_err": grad_err, "trained": trained,
            "ref_trained": sorted(n for n, p in ref.named_parameters() if p.requires_grad)}


def adapters_train(rank: int, world: int) -> dict[str, dict[str, Any]]:
    """peft LoRA (every projection, dropout 0.1), peft IA3 and the hand-written adapter, each sharded with no
    inputs given (the hand-written one with its ids), against the unsharded model."""
    out = {}
    for name in ("all", "ia3"):
        sharded = tpfx.auto_shard(peft_llama(name))
        out[name] = train_like(rank, sharded, peft_llama(name), models.HF_VOCAB)
    sharded = tpfx.auto_shard(adapted_mlp(), example_inputs=(models.token_inputs(models.TINY_VOCAB),))
    out["hand"] = train_like(rank, sharded, adapted_mlp(), models.TINY_VOCAB)
    return out


CONFIG = dict(r=4, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"], lora_dropout=0.0,
              init_lora_weights=False)  # B random too: the adapter changes the output from the first step


def from_pretrained_adapter(rank: int, world: int, root: str) -> dict[str, Any]:
    """A base checkpoint loaded by slices with a new adapter (``adapter=LoraConfig``), trained, saved as peft's
    files, read back by peft unsharded and by tpfx (``adapter=<dir>``)."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import LlamaForCausalLM

    base_dir, out_dir = os.path.join(root, "base"), os.path.join(root, "adapter")
    torch.manual_seed(5)
    sharded = tpfx.from_pretrained(base_dir, adapter=LoraConfig(**CONFIG))
    local = {n: tpfx.local(p).numel() for n, p in sharded.named_parameters()}
    full = {n: p.numel() for n, p in sharded.named_parameters()}
    base_local = sum(v for n, v in local.items() if "lora_" not in n)
    base_full = sum(v for n, v in full.items() if "lora_" not in n)
    torch.manual_seed(5)
    ref = get_peft_model(LlamaForCausalLM.from_pretrained(base_dir), LoraConfig(**CONFIG))
    trained = train_like(rank, sharded, ref, models.HF_VOCAB)
    sharded.save_pretrained(out_dir)
    files = sorted(os.listdir(out_dir))
    ids = models.token_inputs(models.HF_VOCAB, 2, 8, seed=3)
    sharded.eval(), ref.eval()
    with torch.no_grad():
        want = ref(input_ids=ids).logits
        back = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base_dir), out_dir).eval()
        again = tpfx.from_pretrained(base_dir, adapter=out_dir, adapter_kwargs={"is_trainable": True}).eval()
        errs = {"sharded": rel_err(sharded(input_ids=ids).logits, want),
                "peft_reloaded": rel_err(back(input_ids=ids).logits, want),
                "tpfx_reloaded": rel_err(again(input_ids=ids).logits, want)}
    return {**trained, "files": files, "errs": errs, "base_fraction": base_local / base_full,
            "again_trained": sum(1 for p in again.parameters() if p.requires_grad),
            **adapters_made_from_the_base(base_dir, os.path.join(root, "dora_mts"), ids)}


DORA_MTS = dict(r=4, target_modules=["q_proj", "down_proj"], use_dora=True, modules_to_save=["lm_head"],
                init_lora_weights=False)


def adapters_made_from_the_base(base_dir: str, dora_dir: str, ids: torch.Tensor) -> dict[str, Any]:
    """Adapter parameters peft computes from the base weights: a saved DoRA + modules_to_save adapter (magnitude
    and the lm_head copy read from its file), a new modules_to_save copy (read from the base checkpoint), and the
    refusals of new adapters whose initial values need the full base (DoRA, PiSSA, OLoRA)."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import LlamaForCausalLM

    out: dict[str, Any] = {}
    with torch.no_grad():
        saved = tpfx.from_pretrained(base_dir, adapter=dora_dir).eval()
        ref = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(base_dir), dora_dir).eval()
        out["dora_mts_dir"] = rel_err(saved(input_ids=ids).logits, ref(input_ids=ids).logits)
        mts = dict(r=4, target_modules=["o_proj"], modules_to_save=["lm_head"], init_lora_weights=False)
        torch.manual_seed(6)
        new = tpfx.from_pretrained(base_dir, adapter=LoraConfig(**mts)).eval()
        torch.manual_seed(6)
        ref = get_peft_model(LlamaForCausalLM.from_pretrained(base_dir), LoraConfig(**mts)).eval()
        out["mts_new"] = rel_err(new(input_ids=ids).logits, ref(input_ids=ids).logits)
    for kw in (dict(use_dora=True), dict(init_lora_weights="pissa"), dict(init_lora_weights="olora")):
        try:
            tpfx.from_pretrained(base_dir, adapter=LoraConfig(r=4, target_modules=["q_proj"], **kw))
            out[str(kw)] = "accepted"
        except ValueError as e:
            out[str(kw)] = str(e)
    return out
