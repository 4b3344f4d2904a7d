"""Rank functions for ``tests/test_module_ops.py``: what users do to a model after sharding it, done to the
sharded model and to the unsharded one alike, and compared (issue: a sharded model is still an nn.Module).

``OPERATIONS`` is the adversarial generator: each entry acts on a model through the module API only (never
through tpfx), and ``operations_check`` applies every entry to a fresh pair (unsharded, sharded) and compares
the next forward's logits and a training step's gradients."""

from __future__ import annotations

import copy
import pickle
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import models
import torch
import torch.distributed as dist
from numerics import rel_err
from torch import nn
from tpfx.passes import CaptureError

import tpfx
from tpfx.agreement import Disagreement

Op = Callable[[nn.Module], Any]


def _zero_down(m: nn.Module) -> None:
    m.apply(lambda mod: nn.init.zeros_(mod.weight) if isinstance(mod, nn.Linear) and mod.in_features == 128 else None)


def _steer(m: nn.Module) -> None:
    m.model.layers[1].register_forward_pre_hook(lambda mod, args: (args[0] * 1.5 + 0.25,) + tuple(args[1:]))


def _steer_removed(m: nn.Module) -> None:
    handle = m.model.layers[1].register_forward_hook(lambda mod, args, out: out * 0.5)
    m(models.token_inputs(models.HF_VOCAB))  # a graph with the hook
    handle.remove()


def _scale_norm(m: nn.Module) -> None:
    with torch.no_grad():
        for mod in m.modules():
            if type(mod).__name__.endswith("RMSNorm"):
                mod.weight.mul_(2.0)


def _eps(m: nn.Module) -> None:
    for mod in m.modules():
        if hasattr(mod, "variance_epsilon"):
            mod.variance_epsilon = 0.5


def _hidden_states(m: nn.Module) -> None:
    m.config.output_hidden_states = True


def _fewer_layers(m: nn.Module) -> None:
    m.config.num_hidden_layers = 1


def _freeze_embeddings(m: nn.Module) -> None:
    for mod in m.modules():
        if isinstance(mod, nn.Embedding):
            mod.requires_grad_(False)


def _load_full(m: nn.Module) -> None:
    full = {k: v * 0.5 for k, v in _REF_STATE.items()}
    m.load_state_dict(full)


def _subclass_swap(m: nn.Module) -> None:
    m.model.layers[0].mlp.act_fn = nn.Tanh()


def _attn_scaling(m: nn.Module) -> None:
    for mod in m.modules():
        if hasattr(mod, "scaling"):
            mod.scaling = 0.3


def _data_assign(m: nn.Module) -> None:
    w = m.model.layers[0].self_attn.q_proj.weight  # split by rows
    w.data = torch.randn(tuple(w.shape), generator=torch.Generator().manual_seed(5))


def _vector_to_parameters(m: nn.Module) -> None:
    ps = list(m.parameters())
    vec = torch.randn(sum(p.numel() for p in ps), generator=torch.Generator().manual_seed(6)) * 0.05
    torch.nn.utils.vector_to_parameters(vec, ps)


def _new_linear(m: nn.Module) -> None:
    torch.manual_seed(7)
    m.model.layers[0].mlp.down_proj = nn.Linear(128, 64, bias=False)  # a fresh module, full weights


def _new_parameter(m: nn.Module) -> None:
    w = m.model.layers[1].self_attn.o_proj.weight
    m.model.layers[1].self_attn.o_proj.weight = nn.Parameter(
        torch.randn(tuple(w.shape), generator=torch.Generator().manual_seed(8)) * 0.05)


def _copy_layer(m: nn.Module) -> None:
    m.model.layers[1] = copy.deepcopy(m.model.layers[0])


UNCHANGED = ("forward hook added then removed", "freeze embeddings by type", "config.output_hidden_states")  # the forward is the base one
OPERATIONS: dict[str, Op] = {
    "apply zero-init by type": _zero_down,
    "forward pre-hook (steering)": _steer,
    "forward hook added then removed": _steer_removed,
    "in-place weight update by type": _scale_norm,
    "module attribute (RMSNorm eps)": _eps,
    "attention scaling attribute": _attn_scaling,
    "config.output_hidden_states": _hidden_states,
    "config.num_hidden_layers": _fewer_layers,
    "freeze embeddings by type": _freeze_embeddings,
    "load_state_dict of full tensors": _load_full,
    "replace a submodule (act_fn)": _subclass_swap,
    "p.data = full tensor": _data_assign,
    "vector_to_parameters": _vector_to_parameters,
    "replace a Linear by a new one": _new_linear,
    "assign a new Parameter": _new_parameter,
    "deepcopy a layer over another": _copy_layer,
}
_REF_STATE: dict[str, torch.Tensor] = {}


def _logits(out: Any) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


def _grads(m: nn.Module) -> dict[str, torch.Tensor]:
    return {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).detach().clone()
            for n, p in m.named_parameters() if p.grad is not None}


def operations_check(rank: int, world: int) -> dict[str, Any]:
    """Each operation on a fresh (unsharded, sharded) pair of tiny Llamas: the forward after it, a training
    step's loss and gradients, and what each graph captured (a new capture per changed state)."""
    warnings.filterwarnings("ignore")
    ids = models.token_inputs(models.HF_VOCAB)
    out: dict[str, Any] = {}
    for name, op in OPERATIONS.items():
        ref = models.llama(layers=2)
        _REF_STATE.clear()
        _REF_STATE.update({k: v.detach().clone() for k, v in ref.state_dict().items()})
        sharded = tpfx.auto_shard(copy.deepcopy(ref))
        base = sharded(ids).logits.detach()
        op(ref), op(sharded)
        want, got = ref(input_ids=ids, labels=ids), sharded(input_ids=ids, labels=ids)
        hs = getattr(want, "hidden_states", None)
        res = {"fwd": rel_err(_logits(got), _logits(want)), "changed": (base - want.logits).abs().max().item(),
               "hidden": None if hs is None else (len(hs), len(got.hidden_states or ()))}
        want.loss.backward(), got.loss.backward()
        g_ref, g_sh = _grads(ref), _grads(sharded)
        res["grad_names"] = sorted(g_ref) == sorted(g_sh)
        res["grad"] = max((rel_err(g_sh[n], g_ref[n]) for n in g_ref if n in g_sh), default=0.0)
        out[name] = res
    return out


def casts_check(rank: int, world: int, tmp: str) -> dict[str, Any]:
    """bf16 after sharding runs in bf16; back to fp32, a training step, save_pretrained: the checkpoint holds
    the trained weights (transformers reloads it equal to the unsharded model trained alike)."""
    from transformers import AutoModelForCausalLM

    warnings.filterwarnings("ignore")
    ids = models.token_inputs(models.HF_VOCAB)
    ref = models.llama(layers=2)
    sharded = tpfx.auto_shard(copy.deepcopy(ref))
    res: dict[str, Any] = {}
    fp32 = ref(ids).logits
    ref.to(torch.bfloat16), sharded.to(torch.bfloat16)
    got, want = sharded(ids).logits, ref(ids).logits
    res["bf16_dtype"] = str(got.dtype)
    res["bf16_err"] = rel_err(got.float(), want.float())
    res["bf16_vs_fp32"] = rel_err(want.float(), fp32)  # bf16's own noise, for scale
    ref.float(), sharded.float()
    for m in (ref, sharded):
        opt = torch.optim.SGD(m.parameters(), lr=0.5)
        m(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    res["trained_fwd"] = rel_err(sharded(ids).logits, ref(ids).logits)
    sharded.save_pretrained(tmp)
    dist.barrier()
    back = AutoModelForCausalLM.from_pretrained(tmp)
    res["saved_err"] = max(rel_err(back.state_dict()[k], v) for k, v in ref.state_dict().items())
    res["saved_moved"] = max(rel_err(back.state_dict()[k], v) for k, v in models.llama(layers=2).state_dict().items())
    return res


class BatchNormNet(nn.Module):
    """A plain module with running statistics (persistent buffers) and a split-able MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.bn, self.down = nn.Linear(16, 64), nn.BatchNorm1d(64), nn.Linear(64, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(torch.relu(self.bn(self.up(x))))  # (B, 8)


def buffers_check(rank: int, world: int, tmp: str) -> dict[str, Any]:
    """BatchNorm statistics: in state_dict and named_buffers, updated by training steps as the unsharded
    model's, saved by tpfx.save and resumed by tpfx.load (eval output as the uninterrupted run's)."""
    torch.manual_seed(0)
    ref = BatchNormNet()
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(1))
    sharded = tpfx.auto_shard(copy.deepcopy(ref), example_inputs=(x,))
    for m in (ref, sharded):
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        for k in range(3):
            m(x + k).pow(2).mean().backward()
            opt.step()
            opt.zero_grad()
    res: dict[str, Any] = {"buffers": sorted(n for n, _ in sharded.named_buffers()),
                           "in_state_dict": "bn.running_mean" in sharded.state_dict(),
                           "running_mean": rel_err(sharded.bn.running_mean, ref.bn.running_mean),
                           "moved": ref.bn.running_mean.abs().max().item()}
    tpfx.save(sharded, tmp)
    fresh = tpfx.auto_shard(BatchNormNet(), example_inputs=(x,))
    tpfx.load(fresh, tmp)
    fresh.eval(), ref.eval()
    res["resumed_eval"] = rel_err(fresh(x), ref(x))
    return res


def randomness_check(rank: int, world: int) -> dict[str, Any]:
    """torch.nn.init on sharded parameters: a split weight gets independent slices (not t copies of one), with
    the init's distribution; a replicated weight re-initialised under per-rank seeds stays equal across ranks;
    a rank's extra random draw after the first call cannot desynchronise dropout silently."""
    warnings.filterwarnings("ignore")
    sharded = tpfx.auto_shard(models.llama(layers=2))
    w = sharded.model.layers[0].mlp.up_proj.weight  # split (column-parallel)
    torch.manual_seed(123)
    nn.init.normal_(w, std=0.02)
    full = w.full_tensor()
    half = full.shape[0] // 2
    norm = sharded.model.norm.weight  # replicated
    torch.manual_seed(100 + rank)  # per-rank seeds
    nn.init.normal_(norm)
    norms = [torch.empty_like(norm.to_local()) for _ in range(world)]
    dist.all_gather(norms, norm.to_local().contiguous())
    res = {"slices_differ": not torch.equal(full[:half], full[half:]), "std": full.std().item(),
           "mean": full.mean().item(), "replicas_equal": all(torch.equal(n, norms[0]) for n in norms)}
    dropped = models.gpt2()
    for mod in dropped.modules():
        if isinstance(mod, nn.Dropout):
            mod.p = 0.1
    gpt = tpfx.auto_shard(dropped)
    gpt.train()
    ids = models.token_inputs(models.HF_VOCAB)
    gpt(ids)
    gpt(ids)
    if rank == 0:
        torch.randint(0, 10, (1,))  # a rank-0-only draw (logging, sampling)
    res["desync"] = _message(lambda: gpt(ids), Disagreement)
    return res


def _message(fn: Callable[[], Any], *errors: type[Exception]) -> str:
    """The message of the error ``fn()`` raises (one of ``errors``), or "no error"."""
    try:
        fn()
    except errors as e:
        return str(e)
    return "no error"


def refusals_check(rank: int, world: int) -> dict[str, Any]:
    """What cannot be honoured raises at once, saying what to do."""
    warnings.filterwarnings("ignore")
    ids = models.token_inputs(models.HF_VOCAB)
    sharded = tpfx.auto_shard(models.llama(layers=2))
    res: dict[str, Any] = {}
    for name, fn in {"deepcopy": lambda: copy.deepcopy(sharded), "pickle": lambda: pickle.dumps(sharded),
                     "torch.save": lambda: torch.save(sharded, Path("/dev/null")),
                     "use_cache": lambda: sharded(ids, use_cache=True)}.items():
        res[name] = _message(fn, TypeError, ValueError)
    sharded.model.layers[0].register_full_backward_hook(lambda *a: None)
    res["backward_hook"] = _message(lambda: sharded(ids), CaptureError)
    return res


def dropout_modes_check(rank: int, world: int) -> dict[str, Any]:
    """GPT-2 with dropout, in train mode: ``Dropout.p = 0`` on every dropout module, or ``eval()`` of the
    transformer submodule, makes the sharded forward deterministic and equal to the unsharded one's."""
    warnings.filterwarnings("ignore")
    ids = models.token_inputs(models.HF_VOCAB)
    out: dict[str, Any] = {}
    for name in ("Dropout.p = 0", "get_submodule('transformer').eval()"):
        ref = models.gpt2()
        for mod in ref.modules():
            if isinstance(mod, nn.Dropout):
                mod.p = 0.3
        ref.train()
        sharded = tpfx.auto_shard(copy.deepcopy(ref))
        noisy = sharded(ids).logits.detach()
        for m in (ref, sharded):
            if name.startswith("Dropout"):
                for mod in m.modules():
                    if isinstance(mod, nn.Dropout):
                        mod.p = 0.0
            else:
                m.get_submodule("transformer").eval()
        want = ref(ids).logits
        out[name] = {"fwd": rel_err(sharded(ids).logits, want), "noisy": rel_err(noisy, want)}
    return out


def generate_after_ops_check(rank: int, world: int) -> dict[str, Any]:
    """generate() after a steering hook and a config change: the tokens of the unsharded model doing the same."""
    warnings.filterwarnings("ignore")
    ids = models.token_inputs(models.HF_VOCAB, batch=1)
    ref = models.llama(layers=2)
    sharded = tpfx.auto_shard(copy.deepcopy(ref))
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    before = sharded.generate(ids, **kw)
    for m in (ref, sharded):
        m.model.layers[0].register_forward_hook(lambda mod, args, out: out * 3.0)
    got, want = sharded.generate(ids, **kw), ref.generate(ids, use_cache=True, **kw)
    return {"equal": bool(torch.equal(got, want)), "changed": not torch.equal(before, want)}


def tied_check(rank: int, world: int) -> dict[str, Any]:
    """Tied weights answer as on the model: one parameter under both names; re-initialising it through one
    name changes the other, as in the unsharded GPT-2."""
    warnings.filterwarnings("ignore")
    ids = models.token_inputs(models.HF_VOCAB)
    ref = models.gpt2()
    sharded = tpfx.auto_shard(copy.deepcopy(ref))
    res: dict[str, Any] = {"same": sharded.lm_head.weight is sharded.transformer.wte.weight,
                           "ref_same": ref.lm_head.weight is ref.transformer.wte.weight,
                           "names": [n for n, _ in sharded.named_parameters()] == [n for n, _ in ref.named_parameters()]}
    for m in (ref, sharded):
        m.lm_head.weight.data = torch.randn(tuple(m.lm_head.weight.shape), generator=torch.Generator().manual_seed(3))
    res["fwd"] = rel_err(sharded(ids).logits, ref(ids).logits)
    return res


SCALE = {"v": 1.0}  # a global a hook reads


def hooks_check(rank: int, world: int) -> dict[str, Any]:
    """Hooks run on every call with the unsharded model's values: a recording hook stores each call's
    activation, a pre-hook reading a global follows it, a hook on a split output (q_proj) sees it whole and
    changes it; forward and gradients as the unsharded model's."""
    warnings.filterwarnings("ignore")
    ids = models.token_inputs(models.HF_VOCAB)
    ref = models.llama(layers=2)
    sharded = tpfx.auto_shard(copy.deepcopy(ref))
    seen: dict[str, list[torch.Tensor]] = {"ref": [], "sharded": []}
    for name, m in (("ref", ref), ("sharded", sharded)):
        m.model.layers[0].register_forward_hook(lambda mod, a, o, name=name: seen[name].append(o.detach().clone()))
        m.model.layers[1].register_forward_pre_hook(lambda mod, a: (a[0] * SCALE["v"],) + tuple(a[1:]))
        m.model.layers[0].self_attn.q_proj.register_forward_hook(lambda mod, a, o: o + 0.1)
    res: dict[str, Any] = {"fwd": 0.0}
    for k in range(3):
        SCALE["v"] = 1.0 + k
        got, want = sharded(input_ids=(ids + k) % models.HF_VOCAB, labels=ids), ref(input_ids=(ids + k) % models.HF_VOCAB, labels=ids)
        res["fwd"] = max(res["fwd"], rel_err(got.logits, want.logits))
    got.loss.backward(), want.loss.backward()
    g_ref, g_sh = _grads(ref), _grads(sharded)
    res["grad"] = max(rel_err(g_sh[n], g_ref[n]) for n in g_ref)
    res["recorded"] = (len(seen["ref"]), len(seen["sharded"]))
    res["recorded_err"] = max(rel_err(a, b) for a, b in zip(seen["sharded"], seen["ref"], strict=True))
    res["graphs"] = len(sharded._graphs)
    res["removed_before"] = _removed_before_sharding(ids)
    res["ablation"], res["stored_graphs"] = _ablation_and_stored(ids)
    return res


def _ablation_and_stored(ids: torch.Tensor) -> tuple[float, int]:
    """A zero-ablation hook (its result needs no gradient) trains as the unsharded model; a hook storing the
    activation on its module (``m.out = o``) does not make every call capture anew."""
    ref = models.llama(layers=2)
    sharded = tpfx.auto_shard(copy.deepcopy(ref))

    def store(mod: nn.Module, a: Any, o: torch.Tensor) -> None:
        mod.out = o.detach()

    for m in (ref, sharded):
        m.model.layers[1].mlp.register_forward_hook(lambda mod, a, o: torch.zeros_like(o).detach())
        m.model.layers[0].register_forward_hook(store)
    for _ in range(3):
        got, want = sharded(input_ids=ids, labels=ids), ref(input_ids=ids, labels=ids)
    got.loss.backward(), want.loss.backward()
    g_ref, g_sh = _grads(ref), _grads(sharded)
    err = max([rel_err(got.logits, want.logits)] + [rel_err(g_sh[n], g_ref[n]) for n in g_ref])
    return err, len(sharded._graphs)


def _removed_before_sharding(ids: torch.Tensor) -> float:
    """A hook registered on the model before sharding, removed after through its handle: the sharded model's
    copy of it goes too (its output is the hook-free model's)."""
    ref = models.llama(layers=2)
    model = copy.deepcopy(ref)
    handle = model.model.layers[1].register_forward_hook(lambda mod, a, o: o * 2.0)
    sharded = tpfx.auto_shard(model)
    sharded(ids)
    handle.remove()
    return rel_err(sharded(ids).logits, ref(ids).logits)


def steering_vector_check(rank: int, world: int) -> dict[str, Any]:
    """A trained steering vector held outside the model, added by a hook: its gradient is the unsharded one."""
    warnings.filterwarnings("ignore")
    ids = models.token_inputs(models.HF_VOCAB)
    ref = models.llama(layers=2)
    sharded = tpfx.auto_shard(copy.deepcopy(ref))
    vecs = {}
    for name, m in (("ref", ref), ("sharded", sharded)):
        v = nn.Parameter(torch.full((64,), 0.1))
        vecs[name] = v
        m.model.layers[0].register_forward_hook(lambda mod, a, o, v=v: o + v * 2)
    got, want = sharded(input_ids=ids, labels=ids), ref(input_ids=ids, labels=ids)
    got.loss.backward(), want.loss.backward()
    return {"fwd": rel_err(got.logits, want.logits),
            "vec_grad": rel_err(vecs["sharded"].grad, vecs["ref"].grad) if vecs["sharded"].grad is not None else 1.0}


CHECKS: dict[str, Callable[..., dict[str, Any]]] = {
    "hooks": hooks_check, "steering_vector": steering_vector_check,
    "operations": operations_check, "casts": casts_check, "buffers": buffers_check, "tied": tied_check,
    "dropout_modes": dropout_modes_check, "generate": generate_after_ops_check, "refusals": refusals_check,
    "randomness": randomness_check}  # last: it leaves the ranks' random states apart on purpose
WITH_DIR = ("casts", "buffers")


def all_checks(rank: int, world: int, tmp: str) -> dict[str, Any]:
    """Every check above in one spawn of the ranks (a failing check is reported, the others still run)."""
    import traceback

    out: dict[str, Any] = {}
    for name, fn in CHECKS.items():
        try:
            out[name] = fn(rank, world, f"{tmp}/{name}") if name in WITH_DIR else fn(rank, world)
        except Exception as e:  # noqa: BLE001 - reported to the test
            out[name] = f"{type(e).__name__}: {e}\n{traceback.format_exc()[-2000:]}"
    return out

