"""Adversarial generator for the module-ops contract (tests/module_ops_cases.py): "every nn.Module operation a
user applies to a sharded model either has the effect it has on the unsharded model (same numbers, same saved
files) or raises at once with what to do".

Each ``Attack`` names a model factory and up to three user actions, each applied to the unsharded model and to
the sharded one alike:

- ``before``: on the unsharded model before it is deep-copied and sharded (hooks registered ahead of time);
- ``setup``: on both after sharding, before a warm-up call (so a graph is cached in that state);
- ``op``: on both after the warm-up call.

The next call (same call structure as the warm-up: a cached graph may serve it) is compared: forward logits,
then loss.backward() gradients, then an optional ``extra(model)`` value. ``custom`` attacks are whole rank
functions returning their own comparison dicts.

Run: ``HF_HUB_OFFLINE=1 python tests/module_ops_attack.py [group ...]`` (world size 2, gloo).
"""

from __future__ import annotations

import copy
import math
import os
import sys
import tempfile
import traceback
import types
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import models  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402

import tpfx  # noqa: E402

Op = Callable[[nn.Module], Any]
IDS = models.token_inputs(models.HF_VOCAB)


# ------------------------------------------------------------------------------------------ plain modules


class Net(nn.Module):
    """A plain MLP stack with knobs plain code commonly has: a function attribute, a list of skipped blocks,
    a tensor attribute, a numpy-typed scale."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 16)) for _ in range(3))
        self.head = nn.Linear(16, 8)
        self.act = torch.tanh  # a function attribute
        self.skip: list[int] = []  # blocks to skip (layer dropping)
        self.gain = torch.tensor(1.0)  # a plain tensor attribute (not a buffer)
        self.scale = 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, b in enumerate(self.blocks):
            if i in self.skip:
                continue
            x = x + self.act(b(x)) * self.gain
        return self.head(x) * self.scale


class Knobs(nn.Module):
    """A submodule holding the same kinds of knobs as ``Net`` (so the root's attribute handling is not involved)."""

    def __init__(self) -> None:
        super().__init__()
        self.up, self.down = nn.Linear(16, 64), nn.Linear(64, 16)
        self.act = torch.tanh
        self.gain = torch.tensor(1.0)
        self.cfg = {"scale": 1.0}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.up(x))) * self.gain * self.cfg["scale"]


class Net2(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.knobs = Knobs()
        self.head = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x + self.knobs(x))


class Net3(nn.Module):
    """A Linear reused through a plain-list reference (kept out of ``_modules`` to avoid registering it twice)."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(16, 64)
        self.dec = nn.Linear(64, 16)
        self.reuse = [self.enc]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.enc(x))
        return self.dec(h) + self.reuse[0](x).sum(-1, keepdim=True)


def net3() -> Net3:
    torch.manual_seed(0)
    return Net3()


def net2() -> Net2:
    torch.manual_seed(0)
    return Net2()


X = torch.randn(4, 16, generator=torch.Generator().manual_seed(3))


def net() -> Net:
    torch.manual_seed(0)
    return Net()


def encoder_layer() -> nn.Module:
    torch.manual_seed(0)
    return nn.TransformerEncoderLayer(64, 4, 128, dropout=0.0, batch_first=True)


XE = torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(4))

FACTORIES: dict[str, tuple[Callable[[], nn.Module], dict[str, Any]]] = {
    "llama": (lambda: models.llama(layers=2), {"input_ids": IDS, "labels": IDS}),
    "gpt2": (lambda: models.gpt2(layers=2), {"input_ids": IDS, "labels": IDS}),
    "net": (net, {"x": X}),
    "enc": (encoder_layer, {"src": XE}),
    "net2": (net2, {"x": X}),
    "net3": (net3, {"x": X}),
}


def _shard(name: str, model: nn.Module) -> Any:
    _, call = FACTORIES[name]
    if name in ("net", "enc", "net2", "net3"):
        return tpfx.auto_shard(model, example_inputs=tuple(call.values()))
    return tpfx.auto_shard(model)


def _out(o: Any) -> torch.Tensor:
    if hasattr(o, "logits"):
        return o.logits
    return o


def _loss(m: nn.Module, o: Any) -> torch.Tensor:
    """The model's loss, else a fixed random projection of the output (not a norm of a LayerNorm's output,
    whose input gradient is zero up to rounding)."""
    if getattr(o, "loss", None) is not None:
        return o.loss
    out = _out(o).float()
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(99))
    return (out * w).sum()


def _full(t: Any) -> Any:
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def rel(a: Any, b: Any) -> float:
    if a is None and b is None:
        return 0.0
    if a is None or b is None:
        return math.inf
    a, b = _full(a).detach().double(), _full(b).detach().double()
    if a.shape != b.shape:
        return math.inf
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-6)).item() if b.numel() else 0.0


def grad_errs(ref: nn.Module, sh: Any) -> tuple[float, str]:
    """Max relative gradient error over the unsharded model's parameters (sharded: DTensor grads in full,
    plain sliced grads compared with the unsharded grad's slice); and the worst parameter's name."""
    rank = dist.get_rank()
    sp = dict(sh.named_parameters())
    worst, name = 0.0, ""
    for n, p in ref.named_parameters():
        q = sp.get(n)
        if q is None:
            e = math.inf if p.grad is not None else 0.0
        else:
            g, want = q.grad, p.grad
            if g is not None and not hasattr(g, "full_tensor") and want is not None and g.shape != want.shape:
                want = tpfx.shard_tensor(sh.plan, n, want, rank)
            e = rel(g, want)
        if e > worst:
            worst, name = e, n
    return worst, name


@dataclass
class Attack:
    factory: str
    op: Op | None = None
    setup: Op | None = None
    before: Op | None = None
    extra: Callable[[nn.Module], Any] | None = None  # a value compared after the step (rel error)
    backward: bool = True
    custom: Callable[[int, int], dict[str, Any]] | None = None
    seed: int | None = None  # re-seed the global RNG before each compared forward (dropout)


# --------------------------------------------------------------------------------------- the actions

GLOBAL_SCALE = 1.0
STEER = torch.zeros(64)


class Steering:
    """A hook object with state (activation steering): its ``alpha`` is tuned between calls."""

    def __init__(self) -> None:
        self.alpha = 0.0

    def __call__(self, mod: nn.Module, args: tuple, out: Any) -> Any:
        return (out[0] + self.alpha,) + tuple(out[1:]) if isinstance(out, tuple) else out + self.alpha


_STEERERS: dict[int, Steering] = {}


def _llama_layer_out(mod: nn.Module) -> nn.Module:
    return mod.model.layers[1]


def act_swap(m: nn.Module) -> None:
    from transformers.activations import GELUActivation

    m.model.layers[0].mlp.act_fn = GELUActivation()


def linear_replace(m: nn.Module) -> None:
    torch.manual_seed(7)
    m.model.layers[0].mlp.down_proj = nn.Linear(128, 64, bias=False)


def donor_mlp(m: nn.Module) -> None:
    """Transplant layer 0's MLP from another (fine-tuned) model of the same class."""
    donor = models.llama(layers=2, seed=1)
    m.model.layers[0].mlp = copy.deepcopy(donor.model.layers[0].mlp)


def donor_linear(m: nn.Module) -> None:
    donor = models.llama(layers=2, seed=1)
    m.model.layers[0].mlp.down_proj = copy.deepcopy(donor.model.layers[0].mlp.down_proj)


def donor_act(m: nn.Module) -> None:
    """Swap in another HF model's activation module (GPT-2's gelu_new)."""
    donor = models.gpt2(layers=1)
    m.model.layers[0].mlp.act_fn = donor.transformer.h[0].mlp.act


def layer_deepcopy(m: nn.Module) -> None:
    m.model.layers[1] = copy.deepcopy(m.model.layers[0])


def layer_shared(m: nn.Module) -> None:
    m.model.layers[1] = m.model.layers[0]


def layer_delete(m: nn.Module) -> None:
    del m.model.layers[1]


def layer_append(m: nn.Module) -> None:
    m.model.layers.append(copy.deepcopy(m.model.layers[1]))
    m.config.num_hidden_layers = 3


def unused_linear(m: nn.Module) -> None:
    torch.manual_seed(8)
    m.model.extra = nn.Linear(64, 64)


def used_linear_adapter(m: nn.Module) -> None:
    """A new (unsharded) adapter submodule the forward uses: a wrapper around q_proj."""
    torch.manual_seed(9)
    attn = m.model.layers[0].self_attn

    class WithAdapter(nn.Module):
        def __init__(self, base: nn.Module) -> None:
            super().__init__()
            self.base, self.adapter = base, nn.Linear(64, 64, bias=False)
            nn.init.normal_(self.adapter.weight, std=0.1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.base(x) + self.adapter(x)

    attn.q_proj = WithAdapter(attn.q_proj)


def forward_patch_instance(m: nn.Module) -> None:
    mlp = m.model.layers[0].mlp
    mlp.forward = types.MethodType(lambda self, x: self.down_proj(self.act_fn(self.up_proj(x))), mlp)


def hook_closure_tensor(m: nn.Module) -> None:
    m.model.layers[1].register_forward_hook(lambda mod, a, out: out + STEER if torch.is_tensor(out)
                                            else (out[0] + STEER,) + tuple(out[1:]))


def mutate_closure_tensor(m: nn.Module) -> None:
    if STEER.abs().sum() == 0:  # once for both models (shared tensor)
        STEER.add_(0.5)


def reset_closure_tensor(m: nn.Module) -> None:
    STEER.zero_()


def hook_global(m: nn.Module) -> None:
    m.model.layers[1].register_forward_hook(lambda mod, a, out: out * GLOBAL_SCALE if torch.is_tensor(out)
                                            else (out[0] * GLOBAL_SCALE,) + tuple(out[1:]))


def set_global(m: nn.Module) -> None:
    global GLOBAL_SCALE
    GLOBAL_SCALE = 0.5


def hook_object(m: nn.Module) -> None:
    s = Steering()
    _STEERERS[id(m)] = s
    m.model.layers[1].register_forward_hook(s)


def tune_hook_object(m: nn.Module) -> None:
    _STEERERS[id(m)].alpha = 0.7


def root_hook_unsharded(m: nn.Module) -> None:
    def scale_logits(mod: nn.Module, args: tuple, out: Any) -> Any:
        out.logits = out.logits * 2.0
        return out

    m.register_forward_hook(scale_logits)


def root_pre_hook_kwargs(m: nn.Module) -> None:
    def shift(mod: nn.Module, args: tuple, kwargs: dict) -> Any:
        kwargs = dict(kwargs)
        kwargs["input_ids"] = (kwargs["input_ids"] + 1) % models.HF_VOCAB
        return args, kwargs

    m.register_forward_pre_hook(shift, with_kwargs=True)


def sub_hook_kwargs_always(m: nn.Module) -> None:
    def h(mod: nn.Module, args: tuple, kwargs: dict, out: Any) -> Any:
        return out * 1.5

    m.model.layers[0].mlp.register_forward_hook(h, with_kwargs=True, always_call=True)


def prepend_pre_hooks(m: nn.Module) -> None:
    mlp = m.model.layers[0].mlp
    mlp.register_forward_pre_hook(lambda mod, a: (a[0] * 2.0,))
    mlp.register_forward_pre_hook(lambda mod, a: (a[0] + 1.0,), prepend=True)


def np_scale_1(m: nn.Module) -> None:
    import numpy as np

    for mod in m.modules():
        if hasattr(mod, "scaling"):
            mod.scaling = np.float64(0.3)


def np_scale_2(m: nn.Module) -> None:
    import numpy as np

    for mod in m.modules():
        if hasattr(mod, "scaling"):
            mod.scaling = np.float64(0.05)


def net_act(m: nn.Module) -> None:
    m.act = torch.sin


def net_skip(m: nn.Module) -> None:
    m.skip.append(1)


def net_gain_inplace(m: nn.Module) -> None:
    m.gain.fill_(2.0)


def net_gain_assign(m: nn.Module) -> None:
    m.gain = torch.tensor(3.0)


def net_root_scale(m: nn.Module) -> None:
    m.scale = 0.5


def sub_act(m: nn.Module) -> None:
    m.knobs.act = torch.sin


def sub_gain_inplace(m: nn.Module) -> None:
    m.knobs.gain.fill_(2.0)


def sub_gain_assign(m: nn.Module) -> None:
    m.knobs.gain = torch.tensor(3.0)


def sub_dict(m: nn.Module) -> None:
    m.knobs.cfg["scale"] = 0.25


def scale_enc(m: nn.Module) -> None:
    with torch.no_grad():
        m.enc.weight.mul_(3.0)


def sgd_step(m: nn.Module) -> None:
    m.zero_grad()
    m(X).pow(2).mean().backward()
    torch.optim.SGD(m.parameters(), lr=0.5).step()
    m.zero_grad()


def bf16_head_fp32(m: nn.Module) -> None:
    m.to(torch.bfloat16)
    m.lm_head.float()


def sub_to_double(m: nn.Module) -> None:
    m.model.to(torch.float64)
    m.lm_head.to(torch.float64)


def enc_activation(m: nn.Module) -> None:
    import torch.nn.functional as F

    m.activation = F.gelu


def requires_grad_off(m: nn.Module) -> None:
    m.model.layers[0].requires_grad_(False)


def parametrize_scale(m: nn.Module) -> None:
    import torch.nn.utils.parametrize as P

    class Double(nn.Module):
        def forward(self, w: torch.Tensor) -> torch.Tensor:
            return w * 2.0

    P.register_parametrization(m.model.layers[0].mlp.up_proj, "weight", Double())


def weight_norm_new(m: nn.Module) -> None:
    torch.nn.utils.parametrizations.weight_norm(m.model.layers[0].mlp.up_proj)


def weight_norm_old(m: nn.Module) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.nn.utils.weight_norm(m.model.layers[0].mlp.up_proj)


def register_buffer_used(m: nn.Module) -> None:
    """A buffer registered after sharding replacing a plain attribute read by forward (attention scaling)."""
    attn = m.model.layers[0].self_attn
    attn.register_buffer("extra_bias", torch.full((64,), 0.25))
    mlp = m.model.layers[0].mlp
    mlp.register_forward_hook(lambda mod, a, out: out + attn.extra_bias)


def mutate_buffer_used(m: nn.Module) -> None:
    m.model.layers[0].self_attn.extra_bias.fill_(-1.0)


def inv_freq_inplace(m: nn.Module) -> None:
    m.model.rotary_emb.inv_freq.mul_(0.5)


def inv_freq_assign(m: nn.Module) -> None:
    m.model.rotary_emb.inv_freq = m.model.rotary_emb.inv_freq * 0.25


def to_double(m: nn.Module) -> None:
    m.double()


def to_half(m: nn.Module) -> None:
    m.half()


def to_bf16(m: nn.Module) -> None:
    m.bfloat16()


def sub_double_then_data(m: nn.Module) -> None:
    """A cast through a submodule (not the root), then ``.data =`` of a split weight."""
    m.model.to(torch.float64)
    m.lm_head.to(torch.float64)
    w = m.model.layers[0].self_attn.q_proj.weight
    w.data = torch.randn(tuple(w.shape), generator=torch.Generator().manual_seed(5), dtype=torch.float64)


def sub_float_then_data(m: nn.Module) -> None:
    """``.to(float32)`` of a submodule (a no-op cast), then ``.data =`` of a split weight."""
    m.model.layers[0].to(torch.float32)
    w = m.model.layers[0].self_attn.q_proj.weight
    w.data = torch.randn(tuple(w.shape), generator=torch.Generator().manual_seed(5))


def sub_eval(m: nn.Module) -> None:
    m.transformer.h[0].eval()


def dropout_on(m: nn.Module) -> None:
    for mod in m.modules():
        if isinstance(mod, nn.Dropout):
            mod.p = 0.2
    torch.manual_seed(11)


def reseed(m: nn.Module) -> None:
    torch.manual_seed(12)


def gpt2_tied_data(m: nn.Module) -> None:
    w = m.lm_head.weight
    w.data = torch.randn(tuple(w.shape), generator=torch.Generator().manual_seed(5)) * 0.02


def gpt2_tied_inplace(m: nn.Module) -> None:
    with torch.no_grad():
        m.transformer.wte.weight.mul_(3.0)


def gpt2_untie(m: nn.Module) -> None:
    m.lm_head.weight = nn.Parameter(m.transformer.wte.weight.detach().clone() * 0.5)


def param_assign(m: nn.Module) -> None:
    lin = m.model.layers[0].self_attn.q_proj
    lin.weight = nn.Parameter(torch.randn(64, 64, generator=torch.Generator().manual_seed(5)) * 0.02)


def init_replicated_seeded(m: nn.Module) -> None:
    torch.manual_seed(21)
    nn.init.normal_(m.model.norm.weight)


def init_split_seeded(m: nn.Module) -> None:
    torch.manual_seed(21)
    nn.init.normal_(m.model.layers[0].mlp.up_proj.weight, std=0.02)


def rng_after_init(m: nn.Module) -> torch.Tensor:
    return torch.rand(4)  # the global RNG's next draw after the init (data shuffling, dropout)


def attn_impl(m: nn.Module) -> None:
    m.config._attn_implementation = "eager"


ATTACKS: dict[str, Attack] = {
    # module replacement / structure
    "swap act_fn to a same-key class (SiLU->GELUActivation)": Attack("llama", op=act_swap),
    "replace Linear by a fresh Linear of same shape": Attack("llama", op=linear_replace),
    "layers[1] = deepcopy(layers[0])": Attack("llama", op=layer_deepcopy),
    "transplant layer0.mlp from a donor model": Attack("llama", op=donor_mlp),
    "transplant down_proj Linear from a donor model": Attack("llama", op=donor_linear),
    "act_fn = GPT-2's NewGELUActivation module": Attack("llama", op=donor_act),
    "layers[1] = layers[0] (shared)": Attack("llama", op=layer_shared),
    "del layers[1]": Attack("llama", op=layer_delete),
    "append deepcopy layer + num_hidden_layers=3": Attack("llama", op=layer_append),
    "add unused nn.Linear": Attack("llama", op=unused_linear),
    "wrap q_proj with a used adapter Linear": Attack("llama", op=used_linear_adapter),
    "monkeypatch mlp.forward on instance": Attack("llama", op=forward_patch_instance),
    # hooks
    "hook reads closure tensor, tensor changed in place": Attack("llama", setup=hook_closure_tensor,
                                                                  op=mutate_closure_tensor),
    "hook reads python global, global changed": Attack("llama", setup=hook_global, op=set_global),
    "hook object with state (alpha) tuned": Attack("llama", setup=hook_object, op=tune_hook_object),
    "fwd hook on unsharded ROOT before sharding": Attack("llama", before=root_hook_unsharded),
    "pre-hook with_kwargs on unsharded ROOT before sharding": Attack("llama", before=root_pre_hook_kwargs),
    "fwd hook on sharded root (after)": Attack("llama", op=root_hook_unsharded),
    "fwd hook with_kwargs always_call on submodule": Attack("llama", op=sub_hook_kwargs_always),
    "two pre-hooks, one prepend": Attack("llama", op=prepend_pre_hooks),
    # attributes
    "attention scaling = np.float64 twice": Attack("llama", setup=np_scale_1, op=np_scale_2),
    "plain: function attribute act=torch.sin": Attack("net", op=net_act),
    "plain: list attribute skip.append(1)": Attack("net", op=net_skip),
    "plain: tensor attribute fill_ in place": Attack("net", op=net_gain_inplace),
    "plain: tensor attribute reassigned": Attack("net", op=net_gain_assign),
    "TransformerEncoderLayer.activation = F.gelu": Attack("enc", op=enc_activation),
    "plain: root float attribute scale=0.5": Attack("net", op=net_root_scale),
    "plain: Linear reused via plain list, weight mul_": Attack("net3", op=scale_enc),
    "plain: Linear reused via plain list, SGD step": Attack("net3", op=sgd_step),
    "to(bf16) then lm_head.float()": Attack("llama", op=bf16_head_fp32, backward=False),
    "submodule .to(float64) (model + lm_head)": Attack("llama", op=sub_to_double),
    "plain: submodule function attribute": Attack("net2", op=sub_act),
    "plain: submodule tensor attribute fill_": Attack("net2", op=sub_gain_inplace),
    "plain: submodule tensor attribute reassigned": Attack("net2", op=sub_gain_assign),
    "plain: submodule dict attribute item set": Attack("net2", op=sub_dict),
    "config._attn_implementation = eager": Attack("llama", op=attn_impl),
    # params / buffers
    "requires_grad_(False) on layer 0 then train": Attack("llama", op=requires_grad_off),
    "parametrize (w*2) after sharding": Attack("llama", op=parametrize_scale),
    "parametrizations.weight_norm after sharding": Attack("llama", op=weight_norm_new),
    "old torch.nn.utils.weight_norm after sharding": Attack("llama", op=weight_norm_old),
    "register_buffer used by a hook, then fill_": Attack("llama", setup=register_buffer_used, op=mutate_buffer_used),
    "rotary inv_freq mul_ in place": Attack("llama", op=inv_freq_inplace),
    "rotary inv_freq reassigned": Attack("llama", op=inv_freq_assign),
    "nn.Parameter reassigned on q_proj": Attack("llama", op=param_assign),
    # casts
    "double()": Attack("llama", op=to_double),
    "sharded.to('cpu') / .float() on an fp32 CPU model (no-op)": Attack("llama", op=lambda m: m.to("cpu").float()),
    "submodule .to(float64) then .data=": Attack("llama", op=sub_double_then_data),
    "submodule .to(float32) no-op then .data=": Attack("llama", op=sub_float_then_data),
    # gpt2 / dropout / tied
    "gpt2 dropout p=0.2 train, same seed": Attack("gpt2", setup=dropout_on, seed=12),
    "gpt2 dropout on, h[0].eval()": Attack("gpt2", setup=dropout_on, op=sub_eval, seed=12),
    "gpt2 dropout p changed 0.2 -> 0.5 on h[1]": Attack("gpt2", setup=dropout_on, op=lambda m: [setattr(d, "p", 0.5) for d in m.transformer.h[1].modules() if isinstance(d, nn.Dropout)], seed=12),
    "gpt2 tied lm_head.weight.data =": Attack("gpt2", op=gpt2_tied_data),
    "gpt2 tied wte.weight.mul_": Attack("gpt2", op=gpt2_tied_inplace),
    "gpt2 untie lm_head (new Parameter)": Attack("gpt2", op=gpt2_untie),
    # init / RNG
    "nn.init.normal_ replicated (seeded)": Attack("llama", op=init_replicated_seeded, extra=rng_after_init),
    "nn.init.normal_ split (seeded)": Attack("llama", op=init_split_seeded, extra=rng_after_init),
}



def _short(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e)[:600]}"


def run_attack(name: str, rank: int) -> dict[str, Any]:
    global GLOBAL_SCALE
    a = ATTACKS[name]
    GLOBAL_SCALE = 1.0
    STEER.zero_()
    make, call = FACTORIES[a.factory]
    ref = make()
    if a.before:
        a.before(ref)
    sh = _shard(a.factory, copy.deepcopy(ref))
    res: dict[str, Any] = {}
    stage = "setup"
    try:
        for m in (ref, sh):
            if a.setup:
                a.setup(m)
        stage = "warm-up call"
        with torch.no_grad():
            base = _out(ref(**call)).detach().clone()
            _out(sh(**call))
        stage = "op"
        for m in (ref, sh):
            if a.op:
                a.op(m)
        stage = "forward after op"
        if a.seed is not None:
            torch.manual_seed(a.seed)
        want = ref(**call)
        stage = "forward after op (sharded)"
        if a.seed is not None:
            torch.manual_seed(a.seed)
        got = sh(**call)
        res["fwd"] = rel(_out(got), _out(want))
        res["changed"] = (_out(want).detach().double() - base.double()).abs().max().item()
        if a.backward:
            stage = "backward"
            _loss(ref, want).backward()
            _loss(sh, got).backward()
            res["grad"], res["worst"] = grad_errs(ref, sh)
        if a.extra:
            res["extra"] = rel(a.extra(sh), a.extra(ref))
    except Exception as e:  # noqa: BLE001
        res["error"] = f"[{stage}] " + _short(e)
        if os.environ.get("ATTACK_TB"):
            traceback.print_exc()
    return res


def attack_check(rank: int, world: int, names: list[str]) -> dict[str, Any]:
    warnings.filterwarnings("ignore")
    out: dict[str, Any] = {}
    for name in names:
        if name in ATTACKS:
            out[name] = run_attack(name, rank)
        else:
            out[name] = CUSTOM[name](rank, world)
    return out


# ------------------------------------------------------------------------------------------ custom attacks


def global_hook_check(rank: int, world: int) -> dict[str, Any]:
    """A global forward hook (torch.nn.modules.module.register_module_forward_hook) doubling every Linear's
    output, on the plain Net (whose root returns a tensor)."""
    from torch.nn.modules.module import register_module_forward_hook

    ref = net()
    sh = _shard("net", copy.deepcopy(ref))
    with torch.no_grad():
        sh(X)
    h = register_module_forward_hook(lambda m, a, o: o * 2.0 if isinstance(m, (nn.Linear, Net)) else None)
    try:
        want, got = ref(X), sh(X)
        return {"fwd": rel(got, want)}
    except Exception as e:  # noqa: BLE001
        return {"error": _short(e)}
    finally:
        h.remove()


def class_patch_check(rank: int, world: int) -> dict[str, Any]:
    """Monkeypatching the class's forward (LlamaMLP.forward) after a graph was cached."""
    from transformers.models.llama import modeling_llama as ml

    ref = models.llama(layers=2)
    sh = _shard("llama", copy.deepcopy(ref))
    with torch.no_grad():
        sh(IDS)
    orig = ml.LlamaMLP.forward
    ml.LlamaMLP.forward = lambda self, x: self.down_proj(self.act_fn(self.up_proj(x)))
    try:
        return {"fwd": rel(sh(IDS).logits, ref(IDS).logits)}
    finally:
        ml.LlamaMLP.forward = orig


def autocast_check(rank: int, world: int) -> dict[str, Any]:
    """First call under torch.autocast(bf16), then a plain fp32 call; and the reverse on a second pair."""
    res: dict[str, Any] = {}
    ref = models.llama(layers=2)
    sh = _shard("llama", copy.deepcopy(ref))
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            a, b = sh(IDS).logits.float(), ref(IDS).logits.float()
        res["autocast_fwd"] = rel(a, b)
        res["fp32_after"] = rel(sh(IDS).logits, ref(IDS).logits)
    except Exception as e:  # noqa: BLE001
        res["error1"] = _short(e)
    ref2 = models.llama(layers=2)
    sh2 = _shard("llama", copy.deepcopy(ref2))
    try:
        sh2(IDS)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            a, b = sh2(IDS).logits, ref2(IDS).logits
        res["autocast_after_fp32_dtypes"] = (str(a.dtype), str(b.dtype))
        res["autocast_after_fp32_fwd"] = rel(a.float(), b.float())
    except Exception as e:  # noqa: BLE001
        res["error2"] = _short(e)
    return res


def zero_grad_accum_check(rank: int, world: int) -> dict[str, Any]:
    """Two accumulated backward passes after zero_grad(set_to_none=False), then clip_grad_norm_ (torch's),
    then an AdamW step."""
    res: dict[str, Any] = {}
    for fam in ("llama", "gpt2"):
        make, call = FACTORIES[fam]
        ref = make()
        sh = _shard(fam, copy.deepcopy(ref))
        try:
            for m in (ref, sh):
                m(**call).loss.backward()
                m.zero_grad(set_to_none=False)
                m(**call).loss.backward()
                m(**call).loss.backward()
            res[f"{fam}_accum_grad"] = grad_errs(ref, sh)[0]
            n_ref = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.05)
            n_sh = torch.nn.utils.clip_grad_norm_(sh.parameters(), 0.05)
            res[f"{fam}_norm"] = rel(n_sh, n_ref)
            res[f"{fam}_clipped_grad"] = grad_errs(ref, sh)[0]
            for m in (ref, sh):
                torch.optim.AdamW(m.parameters(), lr=1e-2).step()
            res[f"{fam}_after_step_fwd"] = rel(sh(**call).logits, ref(**call).logits)
        except Exception as e:  # noqa: BLE001
            res[f"{fam}_error"] = _short(e)
    return res


def names_check(rank: int, world: int) -> dict[str, Any]:
    """named_parameters order, state_dict keys and order, named_buffers, vs the unsharded model."""
    res: dict[str, Any] = {}
    for fam in ("llama", "gpt2"):
        ref = FACTORIES[fam][0]()
        sh = _shard(fam, copy.deepcopy(ref))
        res[f"{fam}_named_parameters"] = [n for n, _ in ref.named_parameters()] == [n for n, _ in sh.named_parameters()]
        res[f"{fam}_state_dict_keys"] = list(ref.state_dict()) == list(sh.state_dict())
        res[f"{fam}_named_buffers"] = [n for n, _ in ref.named_buffers()] == [n for n, _ in sh.named_buffers()]
        res[f"{fam}_modules"] = [n for n, _ in ref.named_modules()] == [n for n, _ in sh.named_modules()]
        res[f"{fam}_param_count"] = (sum(p.numel() for p in ref.parameters()), sum(p.numel() for p in sh.parameters()))
        sh.register_buffer("new_buf", torch.ones(3))
        ref.register_buffer("new_buf", torch.ones(3))
        res[f"{fam}_buffer_in_sd"] = list(ref.state_dict()) == list(sh.state_dict())
    return res


def optimizer_load_check(rank: int, world: int) -> dict[str, Any]:
    """Resume: the unsharded model's AdamW state_dict loaded into the sharded model's AdamW."""
    res: dict[str, Any] = {}
    call = FACTORIES["llama"][1]
    ref = models.llama(layers=2)
    sh = _shard("llama", copy.deepcopy(ref))
    o_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    ref(**call).loss.backward()
    o_ref.step()
    o_ref.zero_grad()
    sh.load_state_dict(ref.state_dict())
    o_sh = torch.optim.AdamW(sh.parameters(), lr=1e-2)
    try:
        o_sh.load_state_dict(copy.deepcopy(o_ref.state_dict()))
        res["loaded"] = "no error"
        for m, o in ((ref, o_ref), (sh, o_sh)):
            m(**call).loss.backward()
            o.step()
        res["fwd_after_resumed_step"] = rel(sh(**call).logits, ref(**call).logits)
    except Exception as e:  # noqa: BLE001
        res["error"] = _short(e)
    return res


def save_after_mods_check(rank: int, world: int, tmp: str) -> dict[str, Any]:
    """save_pretrained after user modifications, reloaded with transformers, vs the unsharded model's own
    save_pretrained + reload."""
    from transformers import AutoModelForCausalLM

    res: dict[str, Any] = {}
    mods = {"linear_replace": linear_replace, "parametrize": parametrize_scale, "half": to_half,
            "requires_grad_off": requires_grad_off, "layer_deepcopy": layer_deepcopy,
            "act_swap": act_swap}
    for k, op in mods.items():
        ref = models.llama(layers=2)
        sh = _shard("llama", copy.deepcopy(ref))
        with torch.no_grad():
            sh(IDS)
        try:
            op(ref)
            op(sh)
            d = os.path.join(tmp, k)
            sh.save_pretrained(d)
            dist.barrier()
            back = AutoModelForCausalLM.from_pretrained(d)
            want_dir = os.path.join(tmp, k + "_ref")
            if rank == 0:
                ref.save_pretrained(want_dir)
            dist.barrier()
            want = AutoModelForCausalLM.from_pretrained(want_dir)
            sd_b, sd_w = back.state_dict(), want.state_dict()
            res[k] = {"keys_equal": sorted(sd_b) == sorted(sd_w),
                      "max_err": max((rel(sd_b[n], sd_w[n]) for n in sd_w if n in sd_b), default=math.nan),
                      "reload_fwd": rel(back(IDS).logits.float(), want(IDS).logits.float())}
        except Exception as e:  # noqa: BLE001
            res[k] = {"error": _short(e)}
        dist.barrier()
    return res


def load_assign_check(rank: int, world: int) -> dict[str, Any]:
    """load_state_dict(assign=True) with the unsharded model's (modified) tensors; strict=False partial."""
    res: dict[str, Any] = {}
    call = FACTORIES["llama"][1]
    ref = models.llama(layers=2)
    sh = _shard("llama", copy.deepcopy(ref))
    with torch.no_grad():
        sh(IDS)
    sd = {k: v * 0.5 for k, v in ref.state_dict().items()}
    try:
        ref.load_state_dict(sd, assign=True)
        sh.load_state_dict(sd, assign=True)
        want, got = ref(**call), sh(**call)
        res["assign_fwd"] = rel(got.logits, want.logits)
        want.loss.backward(), got.loss.backward()
        res["assign_grad"] = grad_errs(ref, sh)[0]
    except Exception as e:  # noqa: BLE001
        res["assign_error"] = _short(e)
    part = {k: v * 2 for k, v in ref.state_dict().items() if "mlp" in k}
    try:
        r1 = ref.load_state_dict(part, strict=False)
        r2 = sh.load_state_dict(part, strict=False)
        res["partial_missing_equal"] = sorted(r1.missing_keys) == sorted(r2.missing_keys)
        res["partial_fwd"] = rel(sh(IDS).logits, ref(IDS).logits)
    except Exception as e:  # noqa: BLE001
        res["partial_error"] = _short(e)
    return res


def sharded_deepcopy_submodule_check(rank: int, world: int) -> dict[str, Any]:
    """copy.deepcopy of a sharded submodule (layer), used standalone: its params."""
    ref = models.llama(layers=2)
    sh = _shard("llama", copy.deepcopy(ref))
    try:
        lay = copy.deepcopy(sh.model.layers[0].mlp)
        x = torch.randn(2, 8, 64, generator=torch.Generator().manual_seed(1))
        return {"standalone_mlp": rel(lay(x), ref.model.layers[0].mlp(x))}
    except Exception as e:  # noqa: BLE001
        return {"error": _short(e)}


def requires_grad_before_shard_check(rank: int, world: int) -> dict[str, Any]:
    """requires_grad flipped back on after sharding a model frozen before sharding (LoRA-style unfreeze)."""
    ref = models.llama(layers=2)
    ref.requires_grad_(False)
    sh = _shard("llama", copy.deepcopy(ref))
    call = FACTORIES["llama"][1]
    with torch.no_grad():
        sh(**call)
    for m in (ref, sh):
        m.model.layers[1].mlp.requires_grad_(True)
    try:
        want, got = ref(**call), sh(**call)
        want.loss.backward(), got.loss.backward()
        return {"fwd": rel(got.logits, want.logits), "grad": grad_errs(ref, sh)[0]}
    except Exception as e:  # noqa: BLE001
        return {"error": _short(e)}


def grad_mode_fastpath_check(rank: int, world: int) -> dict[str, Any]:
    """nn.TransformerEncoderLayer in eval mode: its fast path depends on torch.is_grad_enabled(). First call under
    no_grad (a graph is cached), then a call with grad enabled and backward (eval-mode fine-tuning)."""
    ref = encoder_layer().eval()
    sh = _shard("enc", copy.deepcopy(ref))
    sh.eval()
    try:
        with torch.no_grad():
            a, b = sh(XE), ref(XE)
        res: dict[str, Any] = {"nograd_fwd": rel(a, b)}
        want, got = ref(XE), sh(XE)
        res["grad_fwd"] = rel(got, want)
        _loss(ref, want).backward()
        _loss(sh, got).backward()
        res["grad"] = grad_errs(ref, sh)[0]
        return res
    except Exception as e:  # noqa: BLE001
        return {"error": _short(e)}


def activation_recording_check(rank: int, world: int) -> dict[str, Any]:
    """The most common hook: record a layer's output on every call (interpretability, feature extraction)."""
    ref = models.llama(layers=2)
    sh = _shard("llama", copy.deepcopy(ref))
    store: dict[str, list] = {"ref": [], "sh": []}
    ref.model.layers[0].register_forward_hook(lambda m, a, o: store["ref"].append(o.detach()))
    sh.model.layers[0].register_forward_hook(lambda m, a, o: store["sh"].append(o.detach()))
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for k in range(3):
            ref((IDS + k) % models.HF_VOCAB)
            sh((IDS + k) % models.HF_VOCAB)
    return {"recorded_ref": len(store["ref"]), "recorded_sh": len(store["sh"]),
            "warned": any("side effects" in str(x.message) for x in w) if rank == 0 else None}


CUSTOM: dict[str, Callable[..., dict[str, Any]]] = {
    "TransformerEncoderLayer eval: no_grad call then grad call": grad_mode_fastpath_check,
    "forward hook recording activations, 3 calls": activation_recording_check,
    "global module forward hook (Linear outputs x2)": global_hook_check,
    "monkeypatch LlamaMLP.forward on the class": class_patch_check,
    "autocast bf16 first call / after fp32": autocast_check,
    "zero_grad(set_to_none=False) accum + clip_grad_norm_ + AdamW": zero_grad_accum_check,
    "names: params/state_dict/buffers/modules": names_check,
    "optimizer.load_state_dict from unsharded": optimizer_load_check,
    "load_state_dict assign=True / strict=False": load_assign_check,
    "deepcopy of a sharded submodule": sharded_deepcopy_submodule_check,
    "frozen before sharding, unfrozen after": requires_grad_before_shard_check,
}
_ALL = list(ATTACKS) + list(CUSTOM)
GROUPS = {f"g{i // 6}": _ALL[i:i + 6] for i in range(0, len(_ALL), 6)}  # ~1-2 minutes each on 2 cores


def _fmt(r: dict[str, Any], tol: float = 1e-5) -> str:
    if "error" in r:
        return "ERROR  " + r["error"]
    bad = [k for k, v in r.items() if isinstance(v, float) and k not in ("changed",) and v > tol]
    verdict = "SILENT" if bad else "OK"
    return f"{verdict:6s} " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items())


if __name__ == "__main__":
    from tpfx.launch import launch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    groups = sys.argv[1:] or list(GROUPS) + ["save"]
    for g in groups:
        if g == "save":
            with tempfile.TemporaryDirectory() as tmp:
                res = launch(save_after_mods_check, 2, tmp, timeout_s=300)[0]
            for k, v in res.items():
                print(f"save_pretrained after {k:28s} | {_fmt(v)}")
            continue
        names = GROUPS.get(g, [g])
        res = launch(attack_check, 2, names, timeout_s=300)[0]
        for k, v in res.items():
            print(f"{k:60s} | {_fmt(v)}", flush=True)
