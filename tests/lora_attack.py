"""Attack cases for the planner's adapter steps (``passes/propagate.py`` steps 5 and 6: ``_split_partials``,
``_partial_joins``/``_carry_partial``, and ``_cost`` counting P->S moves).

Each case builder returns ``(model, args, kwargs)``, optionally with a base model (no adapter) to compare plans
with. ``check(case, t)``:

- captures the model once and plans it three ways: ``new`` (the planner as it is), ``old`` (steps 5-P->S and 6
  disabled, ``_cost`` as before: the planner before commit 5fc77d5), and the base model without adapters;
- runs the ``new`` plan on simulated ranks (tests/simulate.py): outputs and every local gradient against the
  unsharded model (float32, rel 1e-5; a failure is rechecked in float64 to tell rounding from a wrong plan);
- compares forward collective counts/bytes: new vs old (a regression if more) and new vs base.

``python tests/lora_attack.py [name-substring ...] [--worlds=2,4] [-v]`` prints a table (verdicts: ok, rounding (fp32
above 1e-5 but float64-exact), WRONG, CRASH, EXTRA-COMM (more forward collectives or bytes than the old planner),
DESHARD (the new plan replicates 2-D base weights the old plan split, and holds more parameter bytes per rank)).
Other modes: ``--families [a,b|all] [--no-lora]`` (plan-only sweep of transformers families, new vs old planner,
plain and sequence parallel), ``--dropout`` (LoRA dropout training on 2 real gloo ranks), ``--save`` (peft files
from ``sharded.save_pretrained`` vs peft's own), ``--pretrained [plain,dora,...,dir:dora,...]``
(``tpfx.from_pretrained(adapter=...)`` vs peft unsharded), ``--clip`` (clip_grad_norm_ under FSDP2/replicate,
dp=2 x tp=2).
"""

from __future__ import annotations

import copy
import importlib
import math
import sys
import time
import traceback
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

sys.path.insert(0, __file__.rsplit("/", 1)[0])

import models  # noqa: E402
from numerics import ABS_FLOOR, GRAD_FLOOR_FRACTION, TOL, output_tensors, rel_err  # noqa: E402
from simulate import emit_all, run_ranks  # noqa: E402

import tpfx  # noqa: E402
from tpfx.derive import capture  # noqa: E402
from tpfx.derive import examples as _examples  # noqa: E402
from tpfx.derive import plan_graph as _plan_graph  # noqa: E402

PROP = importlib.import_module("tpfx.passes.propagate")
EXACT64 = 1e-9

Built = tuple[nn.Module, tuple, dict[str, Any]]


# ------------------------------------------------------------------------------------------------ planners


def _old_cost(prop: Any) -> tuple[int, int]:
    """``_cost`` before commit 5fc77d5 (P->S moves not counted)."""
    from tpfx.passes.placements import Replicate, Shard
    from tpfx.passes.redistribute import forward_collective

    comm = sum(PROP.nbytes(p) for (c, p), w in prop.wants.items()
               if isinstance(w, Replicate) and forward_collective(prop.placements.get(p), w, prop.world))
    comm += sum(PROP.nbytes(n) for n in prop.reduced_after)
    params = 0
    for node, fqn in prop.param_nodes.items():
        pl = prop.decided.get(fqn, ("replicate", PROP.R))[1]
        if isinstance(pl, Shard):
            params += PROP.nbytes(node) * sum(s // g for s, g in zip(pl.segs, pl.seg_groups)) // sum(pl.segs)
        else:
            params += PROP.nbytes(node)
    return comm, params


@contextmanager
def old_planner():
    """The planner without the new steps: no ``_split_partials`` trial, no step 6, the old ``_cost``."""
    saved = PROP._split_partials, PROP._partial_joins, PROP._cost
    PROP._split_partials = lambda prop, seeds: {}
    PROP._partial_joins = lambda prop: frozenset()
    PROP._cost = _old_cost
    try:
        yield
    finally:
        PROP._split_partials, PROP._partial_joins, PROP._cost = saved


def _quiet(fn: Callable[..., Any], *a: Any, **k: Any) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return fn(*a, **k)


def fwd_comm(plan: Any) -> tuple[int, int]:
    cs = [c for c in plan.collectives if c.pass_ == "forward"]
    return len(cs), sum(c.bytes for c in cs)


def _is_adapter(fqn: str) -> bool:
    return any(t in fqn for t in ("lora_", "magnitude", "ia3", ".A.", ".B.", ".B2.", ".s", ".g")) or \
        fqn.endswith((".A", ".B", ".alpha"))


def adapter_styles(plan: Any) -> dict[str, str]:
    return {f: f"{p.style}" for f, p in plan.placements.items()
            if any(t in f for t in ("lora_", ".A", ".B", "adapter", "magnitude", "ia3"))}


# ------------------------------------------------------------------------------------------------- running


def _objective(out: Any, probes: dict[str, torch.Tensor]) -> torch.Tensor:
    total = None
    for k, y in sorted(output_tensors(out).items()):
        term = y if k == "loss" else (y * probes[k].to(y.dtype)).sum() / y.numel()
        total = term if total is None else total + term
    assert total is not None
    return total


def _probes(out: Any) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    return {k: torch.randn(y.shape, generator=g) for k, y in sorted(output_tensors(out).items()) if k != "loss"}


def _to(x: Any, dtype: torch.dtype) -> Any:
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.to(dtype)
    if isinstance(x, dict):
        return {k: _to(v, dtype) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_to(v, dtype) for v in x)
    return x


@dataclass
class Numbers:
    fwd: float
    grad: float
    worst: str


def simulate(model: nn.Module, plan: Any, args: tuple, kwargs: dict[str, Any], dtype: torch.dtype) -> Numbers:
    """Outputs and local gradients of every simulated rank against the unsharded model (same inputs). The rank
    threads share the process's one random generator, and the reference forward draws first: a model that draws
    random numbers in its forward (train-mode dropout, PhiMoE's router) is compared on gloo ranks instead."""
    model.zero_grad(set_to_none=True)
    ref = model(*args, **kwargs)
    probes = _probes(ref)
    _objective(ref, probes).backward()
    want_out = {k: v.detach() for k, v in output_tensors(ref).items()}
    scale = max((float(p.grad.abs().max()) for p in model.parameters() if p.grad is not None), default=0.0)
    floor = max(ABS_FLOOR, GRAD_FLOOR_FRACTION * scale)
    ranks = emit_all(plan)

    def body(rank: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor | None]]:
        gm, store = ranks[rank]
        out = gm(*args, **kwargs)
        _objective(out, probes).backward()
        return {k: v.detach() for k, v in output_tensors(out).items()}, {f: p.grad for f, p in store.items()}

    params = dict(model.named_parameters(remove_duplicate=False))
    fwd, grad, worst = 0.0, 0.0, ""
    for rank, (outs, grads) in enumerate(run_ranks(plan.world_size, body)):
        for k, v in want_out.items():
            e = rel_err(outs.get(k), v)
            if e > fwd:
                fwd = e
                if e > grad:
                    worst = f"out {k} r{rank}"
        for fqn, g in grads.items():
            full = params[fqn].grad
            if full is None and g is None:
                continue
            full = full if full is not None else torch.zeros_like(params[fqn])
            g = g if g is not None else torch.zeros_like(tpfx.shard_tensor(plan, fqn, full, rank))
            e = rel_err(g, tpfx.shard_tensor(plan, fqn, full, rank), floor)
            if e > grad:
                grad = e
                if e >= fwd:
                    worst = f"grad {fqn} r{rank}"
    return Numbers(fwd, grad, worst)


# ------------------------------------------------------------------------------------------------- cases


@dataclass
class Case:
    name: str
    build: Callable[[], Built]  # (model with adapters, args, kwargs), seeded
    base: Callable[[], Built] | None = None  # the same model without adapters
    worlds: tuple[int, ...] = (2, 4)
    note: str = ""
    overrides: dict[str, str] | None = None
    sp: bool = False  # plan with sequence parallelism
    slow: bool = False  # minutes per check: run only when named


@dataclass
class Result:
    case: str
    world: int
    new: tuple[int, int] = (0, 0)
    old: tuple[int, int] = (0, 0)
    base: tuple[int, int] | None = None
    fwd: float = math.nan
    grad: float = math.nan
    worst: str = ""
    f64: tuple[float, float] | None = None
    error: str = ""
    styles: dict[str, str] = field(default_factory=dict)
    changed: bool = False  # the new steps changed the plan
    seconds: float = 0.0
    params: tuple[int, int] = (0, 0)  # parameter bytes per rank, new and old plan
    desharded: list[str] = field(default_factory=list)  # split in the old plan, replicated in the new one

    @property
    def wrong(self) -> bool:
        if self.f64 is not None:
            return max(self.f64) > EXACT64
        return not (self.fwd <= TOL and self.grad <= TOL)

    @property
    def extra(self) -> bool:
        return self.new[0] > self.old[0] or self.new[1] > self.old[1]

    @property
    def heavier(self) -> bool:
        """The new plan holds more parameter bytes per rank because it replicates base (non-adapter) weights."""
        return bool(self.desharded) and self.params[0] > self.params[1]

    @property
    def verdict(self) -> str:
        bad = []
        if self.error:
            bad.append("CRASH")
        elif self.wrong:
            bad.append("WRONG")
        elif self.fwd > TOL or self.grad > TOL:
            bad.append("rounding")
        if self.extra:
            bad.append("EXTRA-COMM")
        if self.heavier:
            bad.append("DESHARD")
        return ",".join(bad) or "ok"


def _plan(gm: Any, t: int, pins: Any, old: bool, sp: bool = False) -> Any:
    if old:
        with old_planner():
            return _quiet(_plan_graph, gm, t, pins, sequence_parallel=sp)
    return _quiet(_plan_graph, gm, t, pins, sequence_parallel=sp)


def _capture(model: nn.Module, args: tuple, kwargs: dict[str, Any]) -> tuple[Any, tuple, dict[str, Any]]:
    """The normalized graph, and the inputs as tpfx prepares them (``use_cache=False`` for transformers)."""
    a, k = _examples(model, args or None, kwargs or None)
    return _quiet(capture, model, a, k)[0], a, k


def check(case: Case, t: int, recheck64: bool = True) -> Result:
    """Plan ``case`` at ``t`` (new, old, base), simulate the new plan against the unsharded model."""
    res = Result(case.name, t)
    start = time.time()
    try:
        model, args, kwargs = case.build()
        pins = None
        if case.overrides:
            from tpfx.derive import override_pins as _override_pins
            pins = _override_pins(model, case.overrides)
        gm, args, kwargs = _capture(model, args, kwargs)
        try:
            old = _plan(gm, t, pins, old=True, sp=case.sp)
            res.old = fwd_comm(old)
        except Exception as e:  # noqa: BLE001
            res.old = (-1, -1)
            res.error = f"old planner: {type(e).__name__}: {str(e)[:200]}"
        new = _plan(gm, t, pins, old=False, sp=case.sp)
        res.new = fwd_comm(new)
        res.styles = adapter_styles(new)
        res.changed = {f: (p.style, p.placement) for f, p in new.placements.items()} != \
            {f: (p.style, p.placement) for f, p in old.placements.items()} if res.old[0] >= 0 else True
        if res.old[0] >= 0:
            res.params = (_old_cost(new.derivation.prop)[1], _old_cost(old.derivation.prop)[1])
            res.desharded = sorted(f for f, p in new.placements.items() if p.style == "replicate" and len(p.shape) >= 2
                                   and old.placements[f].style != "replicate" and not _is_adapter(f))
        if case.base is not None:
            bm, ba, bk = case.base()
            res.base = fwd_comm(_plan(_capture(bm, ba, bk)[0], t, None, old=False, sp=case.sp))
        n = simulate(model, new, args, kwargs, torch.float32)
        res.fwd, res.grad, res.worst = n.fwd, n.grad, n.worst
        if recheck64 and (n.fwd > TOL or n.grad > TOL):
            model64, args64, kwargs64 = copy.deepcopy(model).double(), _to(args, torch.float64), _to(kwargs, torch.float64)
            kwargs64.pop("labels", None)  # transformers' loss casts the logits to float32
            gm64 = _capture(model64, args64, kwargs64)[0]
            n64 = simulate(model64, _plan(gm64, t, pins, old=False, sp=case.sp), args64, kwargs64, torch.float64)
            res.f64 = (n64.fwd, n64.grad)
    except Exception as e:  # noqa: BLE001
        res.error = (res.error + " | " if res.error else "") + f"{type(e).__name__}: {str(e)[:300]}"
        if "-v" in sys.argv:
            traceback.print_exc()
    res.seconds = time.time() - start
    return res


# ------------------------------------------------------------------------------------------------ builders


def _ids(vocab: int, b: int = 2, s: int = 8, seed: int = 1) -> torch.Tensor:
    return models.token_inputs(vocab, b, s, seed=seed)


def _hf(model: nn.Module, labels: bool = True, vocab: int | None = None) -> Built:
    vocab = vocab or model.config.vocab_size
    ids = _ids(vocab)
    kw: dict[str, Any] = {"input_ids": ids}
    if labels:
        kw["labels"] = _ids(vocab, seed=7)
    return model, (), kw


def _peft(base: nn.Module, train: bool = False, seed: int = 1, **config: Any) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    config.setdefault("r", 4)
    config.setdefault("lora_dropout", 0.0)
    config.setdefault("init_lora_weights", False)  # B random: the adapter changes the output
    m = get_peft_model(base, LoraConfig(**config))
    return m.train() if train else m.eval()


def _eval(m: nn.Module) -> nn.Module:
    return m.eval()


CASES: list[Case] = []


def case(name: str, worlds: tuple[int, ...] = (2, 4), base: Callable[[], Built] | None = None, note: str = "",
         overrides: dict[str, str] | None = None, sp: bool = False, slow: bool = False
         ) -> Callable[[Callable[[], Built]], Callable[[], Built]]:
    def deco(fn: Callable[[], Built]) -> Callable[[], Built]:
        CASES.append(Case(name, fn, base, worlds, note, overrides, sp, slow))
        return fn
    return deco


def _llama_base() -> Built:
    return _hf(_eval(models.llama(layers=2)))


@case("llama_lora_all", base=_llama_base)
def _() -> Built:
    return _hf(_peft(models.llama(layers=2), target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                              "up_proj", "down_proj"]))



# ------------------------------------------------------------------------------------- hand-written adapters


class Adapter(nn.Module):
    """``base(x)`` combined with a low-rank path ``x -> A -> B`` as ``kind`` says (the attack variants)."""

    def __init__(self, base: nn.Linear, kind: str, r: int = 4) -> None:
        super().__init__()
        self.base, self.kind = base, kind
        i, o = base.in_features, base.out_features
        self.A = nn.Linear(i, r, bias=False)
        self.B = nn.Linear(r, o, bias=kind == "bias_B")
        nn.init.normal_(self.B.weight, std=0.3)
        if kind in ("two_B", "mulPP"):
            self.B2 = nn.Linear(r, o, bias=False)
        if kind in ("chan_scale", "chan_scale_buffer_and_param"):
            self.s = nn.Parameter(torch.rand(o) + 0.5)
        if kind == "chan_scale_buffer":
            self.register_buffer("s", torch.rand(o) + 0.5)
        if kind == "gate_act":
            self.g = nn.Parameter(torch.randn(o) * 0.5)
        if kind == "hyper":  # B's weight made by an op (a replicated activation, not a parameter)
            self.g = nn.Parameter(torch.randn(o, 1) * 0.5)
        if kind == "dropout_after":
            self.drop = nn.Dropout(0.0)
        if kind in ("param_product", "bmm_expand"):  # B as a product of two parameters (an activation)
            self.P1 = nn.Parameter(torch.randn(r, 3) * 0.5)
            self.P2 = nn.Parameter(torch.randn(3, o) * 0.5)
        if kind == "scalar_param":
            self.alpha = nn.Parameter(torch.tensor(1.7))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k, base = self.kind, self.base(x)
        if k in ("plain", "bias_B", "bias_base"):
            return base + self.B(self.A(x)) * 2.0
        if k == "sub":
            return base - self.B(self.A(x))
        if k == "gelu":
            return base + nn.functional.gelu(self.B(self.A(x)))
        if k == "dropout_after":
            return base + self.drop(self.B(self.A(x)))
        if k in ("chan_scale", "chan_scale_buffer"):
            return base + self.B(self.A(x)) * self.s
        if k == "gate_act":
            return base + self.B(self.A(x)) * torch.sigmoid(self.g)
        if k == "scalar_param":
            return base + self.B(self.A(x)) * self.alpha
        if k == "two_B":
            h = self.A(x)
            return base + self.B(h) + self.B2(h)
        if k == "mulPP":
            h = self.A(x)
            return base + self.B(h) * self.B2(h)
        if k == "h_reused_nonlinear":  # A's partial sum also enters a non-linear op
            h = self.A(x)
            return base + self.B(h) + h.pow(2).sum(-1, keepdim=True)
        if k == "B_out_reused":  # the product has two users
            y = self.B(self.A(x))
            return base + y + y.pow(2).mean(-1, keepdim=True)
        if k == "einsum":
            h = torch.einsum("bsi,ri->bsr", x, self.A.weight)
            return base + torch.einsum("bsr,or->bso", h, self.B.weight)
        if k == "matmul_T":
            return base + (x @ self.A.weight.t()) @ self.B.weight.t()
        if k == "hyper":
            w = self.B.weight * torch.sigmoid(self.g)  # (o, r): computed, replicated
            return base + self.A(x) @ w.t()
        if k == "param_product":
            return base + self.A(x) @ (self.P1 @ self.P2)
        if k == "bmm_expand":
            h = self.A(x)
            w = (self.P1 @ self.P2).unsqueeze(0).expand(h.shape[0], -1, -1)
            return base + torch.bmm(h, w)
        if k == "merged":  # x @ (B @ A)^T: the low-rank product formed first
            return base + x @ (self.B.weight @ self.A.weight).t()
        if k == "scale_before_B":
            return base + self.B(self.A(x) * 0.5)
        if k == "tanh_between":
            return base + self.B(torch.tanh(self.A(x)))
        if k == "add_then_scale":  # the sum of base and adapter scaled afterwards
            return (base + self.B(self.A(x))) * 0.5
        if k == "adapter_first":  # adapter term on the left of the add
            return self.B(self.A(x)) + base
        if k == "view_path":
            y = self.B(self.A(x))
            b, s, o = y.shape
            return base + y.view(b, s, 2, o // 2).transpose(-1, -2).reshape(b, s, o)
        if k == "view_path_same":
            y = self.B(self.A(x))
            b, s, o = y.shape
            return base + y.view(b, s, 2, o // 2).reshape(b, s, o)
        raise ValueError(k)


class Net(nn.Module):
    """Embedding, ``layers`` pre-norm residual MLP blocks (fc1 column-split, fc2 row-split) and a head; ``where``
    says which of fc1/fc2 carry an ``Adapter`` of ``kind`` (None: no adapters, the base model)."""

    def __init__(self, kind: str | None, where: str = "both", d: int = 32, hidden: int = 128, r: int = 4,
                 layers: int = 2, vocab: int = 64, freeze: bool = True) -> None:
        super().__init__()

        def wrap(m: nn.Linear, role: str) -> nn.Module:
            if kind is None or (where != "both" and where != role):
                return m
            return Adapter(m, kind, r)

        bias = kind == "bias_base"
        self.embed = nn.Embedding(vocab, d)
        self.fc1 = nn.ModuleList(wrap(nn.Linear(d, hidden, bias=bias), "fc1") for _ in range(layers))
        self.fc2 = nn.ModuleList(wrap(nn.Linear(hidden, d, bias=bias), "fc2") for _ in range(layers))
        self.norms = nn.ModuleList(nn.LayerNorm(d) for _ in range(layers))
        self.head = nn.Linear(d, vocab)
        if kind is not None and freeze:
            for name, p in self.named_parameters():
                p.requires_grad_(".base." not in name and not name.startswith(("embed", "head", "norms")))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        for fc1, fc2, norm in zip(self.fc1, self.fc2, self.norms, strict=True):
            x = x + fc2(nn.functional.gelu(fc1(norm(x))))
        return self.head(x)


def _net(kind: str | None, seed: int = 0, train: bool = False, **kw: Any) -> Built:
    torch.manual_seed(seed)
    m = Net(kind, **kw)
    m.train(train)
    return m, (_ids(kw.get("vocab", 64)),), {}


HAND = ["plain", "bias_B", "bias_base", "sub", "gelu", "dropout_after", "chan_scale", "chan_scale_buffer", "gate_act",
        "scalar_param", "two_B", "mulPP", "h_reused_nonlinear", "B_out_reused", "einsum", "matmul_T", "hyper",
        "merged", "scale_before_B", "tanh_between", "add_then_scale", "adapter_first", "view_path", "view_path_same",
        "param_product", "bmm_expand"]

for _kind in HAND:
    for _where in ("both", "fc2"):
        case(f"hand_{_kind}_{_where}", base=lambda: _net(None))(
            lambda k=_kind, w=_where: _net(k, where=w, train=k == "dropout_after"))

case("hand_plain_t3_r3", worlds=(3,), base=lambda: _net(None, d=48, hidden=96))(
    lambda: _net("plain", d=48, hidden=96, r=3))
case("hand_plain_t3_r4", worlds=(3,), base=lambda: _net(None, d=48, hidden=96))(
    lambda: _net("plain", d=48, hidden=96, r=4))
case("hand_plain_r1", worlds=(2, 4), base=lambda: _net(None))(lambda: _net("plain", r=1))
case("hand_plain_r2_t4", worlds=(4,), base=lambda: _net(None))(lambda: _net("plain", r=2))
case("hand_plain_r6_t4", worlds=(4,), base=lambda: _net(None))(lambda: _net("plain", r=6))
case("hand_plain_rbig", worlds=(2, 4), base=lambda: _net(None))(lambda: _net("plain", r=48))  # r > d: not narrowing
case("hand_plain_unfrozen", worlds=(2, 4), base=lambda: _net(None))(lambda: _net("plain", freeze=False))
case("hand_plain_pinB_col", worlds=(2,), base=lambda: _net(None), overrides={"fc2.*.B.weight": "colwise"})(
    lambda: _net("plain"))
case("hand_plain_pinB_row", worlds=(2,), base=lambda: _net(None), overrides={"fc2.*.B.weight": "rowwise"})(
    lambda: _net("plain"))
case("hand_plain_pinB_rep", worlds=(2,), base=lambda: _net(None), overrides={"fc2.*.B.weight": "replicate"})(
    lambda: _net("plain"))
case("peft_llama_pin_oB_col", worlds=(2, 4), base=_llama_base,
     overrides={"*o_proj.lora_B.default.weight": "colwise"})(lambda: _pl(target_modules=ALL7))
case("peft_llama_pin_downB_row", worlds=(2,), base=_llama_base,
     overrides={"*down_proj.lora_B.default.weight": "rowwise"})(lambda: _pl(target_modules=ALL7))
case("peft_llama_pin_qA_col", worlds=(2,), base=_llama_base,
     overrides={"*q_proj.lora_A.default.weight": "colwise"})(lambda: _pl(target_modules=ALL7))
case("hand_plain_pinA_col", worlds=(2,), base=lambda: _net(None), overrides={"fc1.*.A.weight": "colwise"})(
    lambda: _net("plain"))
case("hand_plain_pinA_row", worlds=(2,), base=lambda: _net(None), overrides={"fc2.*.A.weight": "rowwise"})(
    lambda: _net("plain"))



# ------------------------------------------------------------------------------------------------ peft cases

ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _llama(**cfg: Any) -> nn.Module:
    m = models.llama(layers=2)
    if cfg:
        from transformers import LlamaConfig, LlamaForCausalLM
        c = LlamaConfig(**{**m.config.to_dict(), **cfg})
        torch.manual_seed(0)
        m = LlamaForCausalLM(c).float()
    return m.eval()


def _pl(train: bool = False, cfg: dict[str, Any] | None = None, **config: Any) -> Built:
    return _hf(_peft(_llama(**(cfg or {})), train=train, **config))


LLAMA_PEFT: dict[str, dict[str, Any]] = {
    "row_only": dict(target_modules=["o_proj", "down_proj"]),
    "col_only": dict(target_modules=["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"]),
    "lora_bias": dict(target_modules=ALL7, lora_bias=True),
    "bias_all": dict(target_modules=ALL7, bias="all"),
    "rslora": dict(target_modules=ALL7, use_rslora=True, lora_alpha=16),
    "dora": dict(target_modules=ALL7, use_dora=True),
    "dora_row": dict(target_modules=["o_proj", "down_proj"], use_dora=True),
    "r1": dict(target_modules=ALL7, r=1),
    "r3": dict(target_modules=ALL7, r=3),
    "r16": dict(target_modules=ALL7, r=16),
    "r64": dict(target_modules=ALL7, r=64),  # r as wide as the layer: not low rank
    "rank_pattern": dict(target_modules=ALL7, rank_pattern={"o_proj": 2, "down_proj": 8}, alpha_pattern={"o_proj": 3}),
    "lm_head": dict(target_modules=ALL7 + ["lm_head"]),
    "embed": dict(target_modules=ALL7 + ["embed_tokens"]),
    "embed_only": dict(target_modules=["embed_tokens"]),
    "lm_head_only": dict(target_modules=["lm_head"]),
    "mts_lm_head": dict(target_modules=ALL7, modules_to_save=["lm_head"]),
    "mts_embed": dict(target_modules=ALL7, modules_to_save=["embed_tokens"]),
    "trainable_tokens": dict(target_modules=ALL7, trainable_token_indices=[3, 5, 7]),
    "layers_to_transform": dict(target_modules=ALL7, layers_to_transform=[1]),
    "all_linear": dict(target_modules="all-linear"),
}

for _n, _cfg in LLAMA_PEFT.items():
    case(f"peft_llama_{_n}", base=_llama_base)(lambda c=_cfg: _pl(**c))
case("peft_llama_dora_train", base=_llama_base)(lambda: _pl(train=True, target_modules=ALL7, use_dora=True))
case("peft_llama_train_nodrop", base=_llama_base)(lambda: _pl(train=True, target_modules=ALL7))
case("peft_llama_tied_embed_lm_head", base=lambda: _hf(_llama(tie_word_embeddings=True)))(
    lambda: _pl(cfg=dict(tie_word_embeddings=True), target_modules=ALL7 + ["embed_tokens", "lm_head"]))
case("peft_llama_kv4_t4", worlds=(4,), base=lambda: _hf(_llama(num_key_value_heads=4)))(
    lambda: _pl(cfg=dict(num_key_value_heads=4), target_modules=ALL7))
case("peft_llama_kv1_mqa", worlds=(2, 4), base=lambda: _hf(_llama(num_key_value_heads=1)))(
    lambda: _pl(cfg=dict(num_key_value_heads=1), target_modules=ALL7))
case("peft_llama_t3", worlds=(3,), base=lambda: _hf(_llama(hidden_size=48, num_attention_heads=6,
                                                            num_key_value_heads=3, intermediate_size=96)))(
    lambda: _pl(cfg=dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=3, intermediate_size=96),
                target_modules=ALL7, r=3))
case("peft_llama_t3_r4", worlds=(3,), base=lambda: _hf(_llama(hidden_size=48, num_attention_heads=6,
                                                               num_key_value_heads=3, intermediate_size=96)))(
    lambda: _pl(cfg=dict(hidden_size=48, num_attention_heads=6, num_key_value_heads=3, intermediate_size=96),
                target_modules=ALL7, r=4))


def _two_adapters(weighted: str | None = None) -> Built:
    from peft import LoraConfig

    m = _peft(_llama(), target_modules=ALL7)
    torch.manual_seed(3)
    m.add_adapter("other", LoraConfig(r=2, target_modules=["o_proj", "down_proj", "q_proj"], init_lora_weights=False,
                                      lora_alpha=5))
    if weighted is None:
        m.base_model.set_adapter(["default", "other"])
    else:
        m.add_weighted_adapter(["default", "other"], [0.7, 0.4], "mix", combination_type=weighted)
        m.set_adapter("mix")
    return _hf(m.eval())


case("peft_llama_two_active", base=_llama_base)(lambda: _two_adapters())
case("peft_llama_weighted_cat", base=_llama_base)(lambda: _two_adapters("cat"))
case("peft_llama_weighted_svd", base=_llama_base)(lambda: _two_adapters("svd"))


def _gpt2_base() -> nn.Module:
    return models.gpt2(layers=2).eval()


case("peft_gpt2_conv1d", base=lambda: _hf(_gpt2_base()))(
    lambda: _hf(_peft(_gpt2_base(), target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)))
case("peft_gpt2_attn_only", base=lambda: _hf(_gpt2_base()))(
    lambda: _hf(_peft(_gpt2_base(), target_modules=["c_attn"], fan_in_fan_out=True)))
case("peft_gpt2_proj_only", base=lambda: _hf(_gpt2_base()))(
    lambda: _hf(_peft(_gpt2_base(), target_modules=["attn.c_proj", "mlp.c_proj"], fan_in_fan_out=True)))
case("peft_gpt2_dora", base=lambda: _hf(_gpt2_base()))(
    lambda: _hf(_peft(_gpt2_base(), target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True,
                      use_dora=True)))
case("peft_gpt2_wte", base=lambda: _hf(_gpt2_base()))(
    lambda: _hf(_peft(_gpt2_base(), target_modules=["c_attn", "c_proj", "wte"], fan_in_fan_out=True)))


def _family(model_type: str, **overrides: Any) -> nn.Module:
    from tpfx.testing.families import tiny_causal_lm

    return tiny_causal_lm(model_type, seed=0, **overrides).float().eval()


FAMILY_TARGETS: dict[str, Any] = {
    "gemma": "all-linear", "gemma2": "all-linear", "gemma3_text": "all-linear", "qwen2": "all-linear",
    "qwen3": "all-linear", "phi3": ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"],
    "falcon": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"], "mistral": "all-linear",
    "bloom": "all-linear", "gpt_neox": "all-linear", "phi": "all-linear", "gptj": "all-linear",
    "codegen": "all-linear", "starcoder2": "all-linear", "olmo2": "all-linear", "cohere": "all-linear",
    "mixtral": "all-linear", "qwen2_moe": "all-linear", "qwen3_moe": "all-linear",
    "deepseek_v3": "all-linear", "deepseek_v2": "all-linear", "opt": "all-linear", "granite": "all-linear",
    "stablelm": "all-linear", "glm": "all-linear", "minicpm3": "all-linear",
}

for _fam, _tm in FAMILY_TARGETS.items():
    case(f"peft_{_fam}", base=lambda f=_fam: _hf(_family(f)))(
        lambda f=_fam, tm=_tm: _hf(_peft(_family(f), target_modules=tm)))

case("peft_opt_proj", base=lambda: _hf(_family("opt", word_embed_proj_dim=32)))(
    lambda: _hf(_peft(_family("opt", word_embed_proj_dim=32), target_modules="all-linear")))
case("base_opt_proj", base=lambda: _hf(_family("opt", word_embed_proj_dim=32)))(
    lambda: _hf(_family("opt", word_embed_proj_dim=32)))


def _moe_params(model_type: str, names: list[str]) -> Built:
    return _hf(_peft(_family(model_type), target_modules=[], target_parameters=names))


case("peft_mixtral_experts_params", base=lambda: _hf(_family("mixtral")))(
    lambda: _moe_params("mixtral", ["gate_up_proj", "down_proj"]))
case("peft_qwen3_moe_experts_params", base=lambda: _hf(_family("qwen3_moe")))(
    lambda: _moe_params("qwen3_moe", ["gate_up_proj", "down_proj"]))



class SharedAdapter(nn.Module):
    """q (column-split) and o (row-split) projections whose adapters share one A and one B (tied adapter weights)."""

    def __init__(self, d: int = 32, r: int = 4, vocab: int = 64, order: str = "q_first") -> None:
        super().__init__()
        self.order = order
        self.embed = nn.Embedding(vocab, d)
        self.q = nn.Linear(d, d, bias=False)
        self.o = nn.Linear(d, d, bias=False)
        self.A = nn.Parameter(torch.randn(r, d) / d ** 0.5)
        self.B = nn.Parameter(torch.randn(d, r) * 0.3)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def lora(self, lin: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        return lin(x) + (x @ self.A.t()) @ self.B.t()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        if self.order == "o_first":  # the row-split layer's adapter is B's first consumer
            y = self.lora(self.o, torch.relu(self.q(self.norm(x))))
        else:
            y = self.lora(self.o, torch.relu(self.lora(self.q, self.norm(x))))
        return self.head(x + y)


def _shared(order: str) -> Built:
    torch.manual_seed(0)
    return SharedAdapter(order=order), (_ids(64),), {}


case("hand_shared_AB_q_first")(lambda: _shared("q_first"))
case("hand_shared_AB_o_only")(lambda: _shared("o_first"))
case("hand_plain_t8", worlds=(8,), base=lambda: _net(None))(lambda: _net("plain", r=8))
case("peft_llama_all_t8", worlds=(8,), base=_llama_base)(lambda: _pl(target_modules=ALL7))
case("peft_llama_all_t3", worlds=(3,), base=_llama_base)(lambda: _pl(target_modules=ALL7))
case("peft_gpt2_t8", worlds=(8,), base=lambda: _hf(_gpt2_base()))(
    lambda: _hf(_peft(_gpt2_base(), target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)))


def _bert(peft_on: bool = True) -> Built:
    m = models.bert(layers=2).eval()
    if peft_on:
        m = _peft(m, target_modules=["query", "key", "value", "dense"])
    return _hf(m, labels=False)


case("peft_bert", base=lambda: _bert(False))(lambda: _bert(True))


def _t5(peft_on: bool = True) -> Built:
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    cfg = T5Config(vocab_size=128, d_model=64, d_kv=8, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=8,
                   dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0)
    m = T5ForConditionalGeneration(cfg).eval()
    if peft_on:
        m = _peft(m, target_modules=["q", "k", "v", "o", "wi", "wo"])
    return m, (), {"input_ids": _ids(128), "decoder_input_ids": _ids(128, seed=4)}


case("peft_t5", base=lambda: _t5(False))(lambda: _t5(True))


def _ckpt_llama() -> Built:
    m = _llama()
    m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    m = _peft(m, train=True, target_modules=ALL7)
    return _hf(m)


case("peft_llama_grad_ckpt", worlds=(2,), base=_llama_base)(_ckpt_llama)


class FusedAttn(nn.Module):
    """One attention block with a fused q/k/v projection (GPT-2's ``c_attn`` as an ``nn.Linear``) whose output is
    cut into q, k, v and heads; ``kind``: no adapter, an adapter added after the base (``base + lora``) or before
    (``lora + base``)."""

    def __init__(self, kind: str | None, d: int = 64, heads: int = 8, r: int = 4, vocab: int = 64) -> None:
        super().__init__()
        self.kind, self.h = kind, heads
        self.embed = nn.Embedding(vocab, d)
        self.c_attn = nn.Linear(d, 3 * d)
        self.c_proj = nn.Linear(d, d)
        self.norm = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)
        if kind:
            self.A = nn.Linear(d, r, bias=False)
            self.B = nn.Linear(r, 3 * d, bias=False)
            nn.init.normal_(self.B.weight, std=0.3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        y = self.norm(x)
        qkv = self.c_attn(y)
        if self.kind == "after":
            qkv = qkv + self.B(self.A(y))
        elif self.kind == "before":
            qkv = self.B(self.A(y)) + qkv
        b, s, _ = qkv.shape
        q, k, v = (t.view(b, s, self.h, -1).transpose(1, 2) for t in qkv.split(qkv.shape[-1] // 3, dim=-1))
        a = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.head(x + self.c_proj(a.transpose(1, 2).reshape(b, s, -1)))


def _fused(kind: str | None) -> Built:
    torch.manual_seed(0)
    return FusedAttn(kind).eval(), (_ids(64),), {}


case("hand_fused_qkv_after", base=lambda: _fused(None))(lambda: _fused("after"))
case("hand_fused_qkv_before", base=lambda: _fused(None))(lambda: _fused("before"))


def _other_peft(kind: str, targets: list[str], **kw: Any) -> Built:
    """A llama with a peft adapter of another type (``peft.<kind>Config``) on ``targets``, eval mode, its trainable
    parameters perturbed away from their identity init (so that the adapter changes the output)."""
    import peft

    cfg = getattr(peft, f"{kind}Config")(target_modules=targets, **kw)
    torch.manual_seed(1)
    m = peft.get_peft_model(_llama(), cfg).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.05)
    return _hf(m)


OTHER_PEFT: dict[str, tuple[str, dict[str, Any]]] = {
    "vera": ("Vera", dict(r=8)),
    "ia3": ("IA3", dict(feedforward_modules=["down_proj"])),
    "oft": ("OFT", dict(r=0, oft_block_size=8)),
    "boft": ("BOFT", dict(boft_block_size=8)),
    "fourierft": ("FourierFT", dict(n_frequency=32)),
    "randlora": ("RandLora", dict(r=8)),
    "hra": ("HRA", dict(r=4)),
    "miss": ("Miss", dict(r=8)),
    "shira": ("Shira", dict(r=4)),
    "road": ("Road", dict()),
    "c3a": ("C3A", dict(block_size=16)),
    "delora": ("Delora", dict(r=4)),
    "vblora": ("VBLoRA", dict(r=4, num_vectors=16, vector_length=16, topk=2)),
    "tinylora": ("TinyLora", dict()),
}

for _n, (_kind, _kw) in OTHER_PEFT.items():
    for _tgt, _mods in (("all", ALL7), ("row", ["o_proj", "down_proj"])):
        if _n == "ia3" and _tgt == "row":
            continue
        case(f"other_{_n}_{_tgt}", base=_llama_base)(
            lambda k=_kind, kw=_kw, m=_mods: _other_peft(k, m, **({"feedforward_modules": ["down_proj"]}
                                                                   if k == "IA3" and "down_proj" not in m else kw)))

# ------------------------------------------------------------------------------------- sequence parallelism


case("sp_hand_plain", sp=True, base=lambda: _net(None))(lambda: _net("plain"))
case("sp_hand_plain_fc2", sp=True, base=lambda: _net(None))(lambda: _net("plain", where="fc2"))
case("sp_hand_two_B", sp=True, base=lambda: _net(None))(lambda: _net("two_B"))
case("sp_peft_llama_all", sp=True, base=_llama_base)(lambda: _pl(target_modules=ALL7))
case("sp_peft_llama_row", sp=True, base=_llama_base)(lambda: _pl(target_modules=["o_proj", "down_proj"]))
case("sp_peft_llama_kv1", sp=True, base=lambda: _hf(_llama(num_key_value_heads=1)))(
    lambda: _pl(cfg=dict(num_key_value_heads=1), target_modules=ALL7))
case("sp_base_llama", sp=True, base=_llama_base)(_llama_base)
case("sp_peft_gpt2", sp=True, base=lambda: _hf(_gpt2_base()))(
    lambda: _hf(_peft(_gpt2_base(), target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)))
case("sp_peft_qwen3", sp=True, base=lambda: _hf(_family("qwen3")))(
    lambda: _hf(_peft(_family("qwen3"), target_modules="all-linear")))
case("sp_peft_deepseek_v3", sp=True, base=lambda: _hf(_family("deepseek_v3")))(
    lambda: _hf(_peft(_family("deepseek_v3"), target_modules="all-linear")))
case("sp_base_deepseek_v3", sp=True, base=lambda: _hf(_family("deepseek_v3")))(lambda: _hf(_family("deepseek_v3")))
case("base_deepseek_v3", base=lambda: _hf(_family("deepseek_v3")))(lambda: _hf(_family("deepseek_v3")))
for _fam in ("olmo2", "exaone4", "qwen4_exp_text"):  # the family sweep's plans with more bytes (sequence parallel)
    case(f"sp_peft_{_fam}", sp=True, base=lambda f=_fam: _hf(_family(f)), slow=_fam == "qwen4_exp_text")(
        lambda f=_fam: _hf(_peft(_family(f), target_modules="all-linear")))
    if _fam not in FAMILY_TARGETS:
        case(f"peft_{_fam}", base=lambda f=_fam: _hf(_family(f)), slow=_fam == "qwen4_exp_text")(
            lambda f=_fam: _hf(_peft(_family(f), target_modules="all-linear")))
    # inputs synthesized by tpfx (input_ids only, as tpfx.plan(model, t) does): the sweep's setting
    case(f"sp_peft_{_fam}_synth", sp=True, base=lambda f=_fam: (_family(f), (), {}), slow=_fam == "qwen4_exp_text")(
        lambda f=_fam: (_peft(_family(f), target_modules="all-linear"), (), {}))
case("sp_base_qwen3_narrow", sp=True, base=lambda: _hf(_family("qwen3", intermediate_size=32)))(
    lambda: _hf(_family("qwen3", intermediate_size=32)))  # a down-projection MLP (intermediate < hidden)
case("base_qwen3_narrow", base=lambda: _hf(_family("qwen3", intermediate_size=32)))(
    lambda: _hf(_family("qwen3", intermediate_size=32)))



# --------------------------------------------------------------------------------------- family plan sweep


def family_sweep(families: list[str], worlds: tuple[int, ...] = (2, 4), adapters: bool = True) -> list[str]:
    """Plans only (no numerics): every family, with and without ``all-linear`` LoRA, new vs old planner, plain and
    sequence parallel; a line for each plan whose forward collectives grew (count or bytes) under the new planner."""
    out = []
    for fam in families:
        for peft_on in ((False, True) if adapters else (False,)):
            tag = f"{fam}{'+lora' if peft_on else ''}"
            try:
                m = _family(fam)
                if peft_on:
                    m = _peft(m, target_modules="all-linear")
                gm, _, _ = _capture(m, (), {})
            except Exception as e:  # noqa: BLE001
                print(f"{tag:28s} skip ({type(e).__name__}: {str(e)[:80]})", flush=True)
                break
            for t in worlds:
                for sp in (False, True):
                    try:
                        new, old = fwd_comm(_plan(gm, t, None, False, sp)), fwd_comm(_plan(gm, t, None, True, sp))
                    except Exception as e:  # noqa: BLE001
                        line = f"{tag:28s} t={t} sp={sp:d} CRASH {type(e).__name__}: {str(e)[:150]}"
                        print(line, flush=True)
                        out.append(line)
                        continue
                    flag = "EXTRA" if new[0] > old[0] or new[1] > old[1] else ("fewer" if new != old else "same")
                    line = f"{tag:28s} t={t} sp={sp:d} new {new[0]:3d}/{new[1]:8d} old {old[0]:3d}/{old[1]:8d} {flag}"
                    print(line, flush=True)
                    if flag == "EXTRA":
                        out.append(line)
    return out



# ------------------------------------------------------------------------------ dropout: real gloo ranks

DROPOUT_MODELS: dict[str, Callable[[], nn.Module]] = {
    "gpt2_conv1d_drop": lambda: _peft(_gpt2_base(), train=True, target_modules=["c_attn", "c_proj", "c_fc"],
                                      fan_in_fan_out=True, lora_dropout=0.1),
    "llama_dora_drop": lambda: _peft(_llama(), train=True, target_modules=ALL7, use_dora=True, lora_dropout=0.1),
    "llama_lora_bias_drop": lambda: _peft(_llama(), train=True, target_modules=["o_proj", "down_proj"],
                                          lora_bias=True, lora_dropout=0.1),
    "llama_row_drop_r1": lambda: _peft(_llama(), train=True, target_modules=["o_proj", "down_proj"], r=1,
                                       lora_dropout=0.2),
}


def dropout_train(rank: int, world: int, names: list[str]) -> dict[str, dict[str, Any]]:
    """Each model sharded (synthesized example inputs) and trained 3 AdamW steps with its adapters' dropout on,
    against the unsharded model seeded alike (``lora_cases.train_like``)."""
    import lora_cases

    torch.set_num_threads(1)
    out = {}
    for name in names:
        try:
            sharded = tpfx.auto_shard(DROPOUT_MODELS[name](), world)
            r = lora_cases.train_like(rank, sharded, DROPOUT_MODELS[name](), models.HF_VOCAB)
            r["loss_err"] = rel_err(torch.tensor(r["losses"]), torch.tensor(r["ref_losses"]))
            r["fwd_comm"] = fwd_comm(sharded.plan)
            out[name] = r
        except Exception as e:  # noqa: BLE001
            out[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    return out


def run_dropout(names: list[str], world: int = 2) -> None:
    from tpfx.launch import launch

    res = launch(dropout_train, world, names, timeout_s=300)
    for name in names:
        r = res[0][name]
        if "error" in r:
            print(f"{name:28s} t={world} CRASH {r['error']}")
            continue
        worst = max(x[name]["grad_err"] for x in res)
        ok = r["loss_err"] <= TOL and worst <= TOL
        print(f"{name:28s} t={world} fwd comm {r['fwd_comm']} loss err {r['loss_err']:.1e} grad err {worst:.1e} "
              f"{'ok' if ok else 'WRONG'}")



# ------------------------------------------------------------------------- saved adapter files: real ranks


def _two(cfg: dict[str, Any]) -> nn.Module:
    from peft import LoraConfig

    m = _peft(_llama(), **cfg)
    torch.manual_seed(3)
    m.add_adapter("other", LoraConfig(r=2, target_modules=["o_proj", "q_proj"], init_lora_weights=False))
    return m


SAVE_MODELS: dict[str, Callable[[], nn.Module]] = {
    "dora": lambda: _peft(_llama(), target_modules=ALL7, use_dora=True),
    "trainable_tokens": lambda: _peft(_llama(), target_modules=ALL7, trainable_token_indices=[3, 5, 7]),
    "mts_lm_head": lambda: _peft(_llama(), target_modules=ALL7, modules_to_save=["lm_head"]),
    "embed": lambda: _peft(_llama(), target_modules=ALL7 + ["embed_tokens"]),
    "lora_bias": lambda: _peft(_llama(), target_modules=ALL7, lora_bias=True),
    "bias_all": lambda: _peft(_llama(), target_modules=ALL7, bias="all"),
    "two_adapters": lambda: _two(dict(target_modules=ALL7)),
    "gpt2_conv1d": lambda: _peft(_gpt2_base(), target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True),
}


def save_check(rank: int, world: int, names: list[str], root: str) -> dict[str, Any]:
    """Each peft model sharded, saved by ``sharded.save_pretrained`` and by peft from the unsharded model (rank 0):
    the files and every tensor compared."""
    import os

    from safetensors.torch import load_file

    torch.set_num_threads(1)
    out: dict[str, Any] = {}
    for name in names:
        try:
            ref = SAVE_MODELS[name]()
            sharded = tpfx.auto_shard(SAVE_MODELS[name](), world)
            mine, theirs = os.path.join(root, name, "tpfx"), os.path.join(root, name, "peft")
            sharded.save_pretrained(mine)
            if rank != 0:
                continue
            ref.save_pretrained(theirs)
            files = {}
            for d in (mine, theirs):
                files[d] = sorted(os.path.relpath(os.path.join(a, f), d) for a, _, fs in os.walk(d) for f in fs)
            diff = []
            for f in files[theirs]:
                if f.endswith(".safetensors"):
                    a = load_file(os.path.join(mine, f)) if f in files[mine] else {}
                    b = load_file(os.path.join(theirs, f))
                    diff += [f"{f}:{k} missing" for k in b if k not in a]
                    diff += [f"{f}:{k} extra" for k in a if k not in b]
                    diff += [f"{f}:{k} err {rel_err(a[k], b[k]):.1e}" for k in b if k in a and rel_err(a[k], b[k]) > 0]
            out[name] = {"files_tpfx": files[mine], "files_peft": files[theirs], "diff": diff}
        except Exception as e:  # noqa: BLE001
            out[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    return out


def run_save(names: list[str], world: int = 2) -> None:
    import tempfile

    from tpfx.launch import launch

    with tempfile.TemporaryDirectory() as root:
        res = launch(save_check, world, names, root, timeout_s=300)[0]
    for name in names:
        r = res.get(name, {})
        if "error" in r:
            print(f"{name:20s} CRASH {r['error']}")
            continue
        same_files = r["files_tpfx"] == r["files_peft"]
        ok = same_files and not r["diff"]
        print(f"{name:20s} {'ok' if ok else 'MISMATCH'} files tpfx {r['files_tpfx']} peft {r['files_peft']} "
              f"diff {r['diff'][:4]}{' ...' if len(r['diff']) > 4 else ''}")



# ------------------------------------------------- tpfx.from_pretrained(adapter=LoraConfig): real ranks

PRETRAINED_CONFIGS: dict[str, dict[str, Any]] = {
    "plain": dict(r=4, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"], init_lora_weights=False),
    "dora": dict(r=4, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"], use_dora=True,
                 init_lora_weights=False),
    "pissa": dict(r=4, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"], init_lora_weights="pissa"),
    "olora": dict(r=4, target_modules=["q_proj", "v_proj", "o_proj", "down_proj"], init_lora_weights="olora"),
    "embed": dict(r=4, target_modules=["embed_tokens", "o_proj"], init_lora_weights=False),
    "mts_lm_head": dict(r=4, target_modules=["o_proj"], modules_to_save=["lm_head"], init_lora_weights=False),
}


def pretrained_check(rank: int, world: int, root: str, names: list[str]) -> dict[str, Any]:
    """``tpfx.from_pretrained(base, adapter=LoraConfig(...))`` against peft's model on the unsharded base built
    alike (same seed): the logits (eval)."""
    import os

    from peft import LoraConfig, get_peft_model
    from transformers import LlamaForCausalLM

    torch.set_num_threads(1)
    out: dict[str, Any] = {}
    ids = models.token_inputs(models.HF_VOCAB, 2, 8, seed=3)
    for name in names:
        try:
            torch.manual_seed(5)
            if name.startswith("dir:"):  # a saved adapter directory (written by peft from the unsharded model)
                from peft import PeftModel

                path = os.path.join(root, "adapters", name[4:])
                sharded = tpfx.from_pretrained(root, adapter=path).eval()
                ref = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(root), path).eval()
            else:
                sharded = tpfx.from_pretrained(root, adapter=LoraConfig(**PRETRAINED_CONFIGS[name])).eval()
            from torch._subclasses.fake_tensor import FakeTensor

            fake = [n for n, p in sharded.named_parameters() if isinstance(tpfx.local(p), FakeTensor)]
            if fake:  # parameters without storage after loading: the forward computes on fake tensors
                raise RuntimeError(f"{len(fake)} parameters are fake tensors after loading: {fake[:3]}")
            torch.manual_seed(5)
            if not name.startswith("dir:"):
                ref = get_peft_model(LlamaForCausalLM.from_pretrained(root),
                                     LoraConfig(**PRETRAINED_CONFIGS[name])).eval()
            with torch.no_grad():
                out[name] = {"err": rel_err(sharded(input_ids=ids).logits, ref(input_ids=ids).logits)}
        except Exception as e:  # noqa: BLE001
            import traceback

            where = [ln.strip().replace("/root/.pyenv/versions/3.11.7/lib/python3.11/site-packages/", "")
                     for ln in traceback.format_exc().splitlines()
                     if ln.strip().startswith("File") and ("/work/" in ln or "peft" in ln)][-7:]
            out[name] = {"error": f"{type(e).__name__}: {str(e)[:300]} | at {' <- '.join(reversed(where))}"}
    return out


def run_pretrained(names: list[str], world: int = 2) -> None:
    import os
    import tempfile

    from peft import LoraConfig, get_peft_model

    from tpfx.launch import launch

    with tempfile.TemporaryDirectory() as root:
        models.llama(layers=2).save_pretrained(root)
        for name in names:
            if name.startswith("dir:"):  # peft's own files of an adapter trained nowhere (random B)
                torch.manual_seed(5)
                m = get_peft_model(models.llama(layers=2), LoraConfig(**PRETRAINED_CONFIGS[name[4:]]))
                m.save_pretrained(os.path.join(root, "adapters", name[4:]))
        res = launch(pretrained_check, world, root, names, timeout_s=300)
    for name in names:
        r = [x[name] for x in res]
        bad = [x["error"] for x in r if "error" in x]
        if bad:
            print(f"from_pretrained {name:12s} CRASH {bad[0]}")
        else:
            err = max(x["err"] for x in r)
            print(f"from_pretrained {name:12s} logits rel err {err:.1e} {'ok' if err <= TOL else 'WRONG'}")



# ------------------------------------------------------ clip_grad_norm_ under FSDP2 (dp=2 x tp=2): 4 ranks

CLIP_MODELS: dict[str, Callable[[], nn.Module]] = {
    "phi3_gqa_lora": lambda: _peft(_family("phi3", num_key_value_heads=2).train(), train=True,
                                   target_modules=["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]),
    "llama_dora": lambda: _peft(_llama().train(), train=True, target_modules=ALL7, use_dora=True),
}


def clip_lora_2d(rank: int, world: int, names: list[str], engine: str) -> dict[str, Any]:
    """``tpfx.clip_grad_norm_`` of a LoRA model sharded by tpfx (tp=2) and wrapped by FSDP2 or composable replicate
    (dp=2) against torch's on the unsharded model with the global batch: the norm and every clipped gradient."""
    from torch.distributed._composable.replicate_with_fsdp import replicate
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    dp_rank, tp_rank = mesh["dp"].get_local_rank(), mesh["tp"].get_local_rank()
    out: dict[str, Any] = {}
    for name in names:
        try:
            sharded, ref = tpfx.auto_shard(CLIP_MODELS[name](), mesh=mesh, tp_axis="tp"), CLIP_MODELS[name]()
            (fully_shard if engine == "fsdp" else replicate)(sharded, mesh=mesh["dp"])
            batch = torch.randint(0, 128, (4, 7), generator=torch.Generator().manual_seed(3))
            mine = batch[2 * dp_rank: 2 * dp_rank + 2]
            sharded(input_ids=mine, labels=mine).loss.backward()
            ref(input_ids=batch, labels=batch).loss.backward()
            want = torch.nn.utils.clip_grad_norm_([p for p in ref.parameters() if p.grad is not None], 0.1)
            got = tpfx.clip_grad_norm_(sharded, 0.1)
            full = dict(ref.named_parameters())
            errs = []
            for n, p in sharded.named_parameters():
                if p.grad is None:
                    continue
                tp_local = tpfx.shard_tensor(sharded.plan, n, full[n].grad, tp_rank)
                dp_sharded = not p.grad.placements[0].is_replicate()
                errs.append(rel_err(p.grad.to_local(), tp_local.chunk(2)[dp_rank] if dp_sharded else tp_local))
            out[name] = {"norm_err": rel_err(got, want), "grad_err": max(errs)}
        except Exception as e:  # noqa: BLE001
            out[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
    return out


def run_clip(names: list[str]) -> None:
    from tpfx.launch import launch

    for engine in ("fsdp", "replicate"):
        res = launch(clip_lora_2d, 4, names, engine, timeout_s=300)
        for name in names:
            r = [x[name] for x in res]
            bad = [x["error"] for x in r if "error" in x]
            if bad:
                print(f"clip {engine:9s} {name:14s} CRASH {bad[0]}")
                continue
            ne, ge = max(x["norm_err"] for x in r), max(x["grad_err"] for x in r)
            print(f"clip {engine:9s} {name:14s} norm err {ne:.1e} grad err {ge:.1e} {'ok' if max(ne, ge) <= TOL else 'WRONG'}")


# --------------------------------------------------------------------------------------------------- main


def _fmt(r: Result) -> str:
    f64 = f"{r.f64[0]:.1e}/{r.f64[1]:.1e}" if r.f64 else "-"
    base = f"{r.base[0]}/{r.base[1]}" if r.base else "-"
    return (f"{r.case:34s} t={r.world} new {r.new[0]:3d}/{r.new[1]:8d} old {r.old[0]:3d}/{r.old[1]:8d} "
            f"base {base:>12s} fwd {r.fwd:.1e} grad {r.grad:.1e} f64 {f64:15s} {'chg' if r.changed else '   '} "
            f"{r.verdict:14s} {r.seconds:5.1f}s {r.worst} {r.error}"
            + (f" params/rank new {r.params[0]} old {r.params[1]}; replicated base weights: {r.desharded[:3]}"
               + (f" (+{len(r.desharded) - 3})" if len(r.desharded) > 3 else "") if r.heavier else ""))


def main(argv: list[str]) -> list[Result]:
    torch.set_num_threads(1)
    if "--dropout" in argv:  # python tests/lora_attack.py --dropout [name,...]: real gloo ranks, t=2
        i = argv.index("--dropout")
        pick = argv[i + 1].split(",") if i + 1 < len(argv) and not argv[i + 1].startswith("-") else list(DROPOUT_MODELS)
        run_dropout(pick)
        return []
    if "--save" in argv:  # python tests/lora_attack.py --save [name,...]: peft files from real gloo ranks, t=2
        i = argv.index("--save")
        pick = argv[i + 1].split(",") if i + 1 < len(argv) and not argv[i + 1].startswith("-") else list(SAVE_MODELS)
        run_save(pick)
        return []
    if "--pretrained" in argv:  # python tests/lora_attack.py --pretrained [name,...]: real gloo ranks, t=2
        i = argv.index("--pretrained")
        pick = (argv[i + 1].split(",") if i + 1 < len(argv) and not argv[i + 1].startswith("-")
                else list(PRETRAINED_CONFIGS) + ["dir:plain", "dir:dora", "dir:mts_lm_head", "dir:embed"])
        run_pretrained(pick)
        return []
    if "--clip" in argv:  # python tests/lora_attack.py --clip: dp=2 x tp=2 on 4 gloo ranks
        run_clip(list(CLIP_MODELS))
        return []
    if "--families" in argv:  # python tests/lora_attack.py --families [fam,fam,...|all] [--no-lora]
        from tpfx.testing.families import causal_lm_families

        i = argv.index("--families")
        pick = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("-") else "all"
        fams = causal_lm_families() if pick == "all" else pick.split(",")
        bad = family_sweep(fams, adapters="--no-lora" not in argv)
        print(f"\n{len(bad)} plans with more forward collectives under the new planner:")
        print("\n".join(bad))
        return []
    worlds = None
    names = []
    start = None
    for a in argv:
        if a.startswith("--worlds"):
            worlds = tuple(int(w) for w in a.split("=", 1)[1].split(","))
        elif a.startswith("--from="):  # resume: skip the cases before this one
            start = a.split("=", 1)[1]
        elif not a.startswith("-"):
            names.append(a)
    results = []
    print("case  t  new/old/base: forward collectives count/bytes  fwd/grad rel err (fp32)  f64 recheck  verdict")
    for c in CASES:
        if start is not None:
            if c.name != start:
                continue
            start = None
        if names and not any(n in c.name for n in names):
            continue
        if c.slow and not any(n == c.name for n in names):
            continue
        for t in worlds or c.worlds:
            r = check(c, t)
            results.append(r)
            print(_fmt(r), flush=True)
    bad = [r for r in results if r.verdict not in ("ok", "rounding")]
    print(f"\n{len(results)} checks, {len(bad)} failing: " + ", ".join(f"{r.case}@t={r.world}:{r.verdict}" for r in bad))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
