"""One process, several devices: ``auto_shard(model, devices=["cpu"] * t)`` runs a plan's t ranks on threads.

The idea: nothing about a rank changes. Each rank is the ``ShardedModule`` a launched process would build (the
same plan, the same emitted graph, the same features), built and called on a thread of its own (``Ranks``).
torch's threaded process group (``multi_threaded_pg``: a ``torch.distributed`` world per thread, its collectives
a rendezvous of the threads' tensors) is each thread's world, so the graphs' functional collectives and every
``torch.distributed`` call of tpfx's features (agreement checks, saving, generation) run unchanged. The executor
is the only new part; what the user holds is ``LocalSharded``:

    parameters   every element once: each rank's ``owned_pieces`` of a split weight (views into its slice), a
                 replicated weight as rank 0's; a piece other ranks hold too is copied to them before every
                 call (optimizer steps update the owners), so torch's optimizers and ``clip_grad_norm_`` over
                 ``parameters()`` act on the unsharded model's elements, once each
    forward      every rank runs its graph on its thread (in the caller's grad mode); rank 0's outputs are
                 returned, joined to the caller's autograd graph by one node (``_Bridge``) whose inputs are the
                 exposed parameters and the caller's differentiable inputs. Its backward runs every rank's
                 backward at once (their collectives pair up across the threads, Megatron's conjugates as on
                 processes) and returns the owners' gradients, so ``loss.backward()``, ``torch.autograd.grad``
                 and gradient hooks on ``parameters()`` work as on the unsharded model
    features     ``generate``, ``save_pretrained``, ``load_state_dict``: every rank calls its own, together;
                 ``state_dict()`` is the unsharded model's, assembled from the pieces

Random numbers: processes each draw from their own generator, seeded alike (the ranks draw the unsharded model's
noise and keep their slice). Threads share torch's default generator, so a call that draws (dropout in training,
sampling in ``generate``) gives every rank a generator of its own with the caller's state (``_RankRandom``: a
dispatch mode, which is per thread, passes it to every random op), and leaves the caller's generator where rank
0's ended, as the unsharded model's draws would. Torch's checkpoint restores the shared generator for its
recompute, so dropout inside checkpointed regions is refused, as is generate in training mode with dropout.

What would reach one rank only is refused, never ignored: ``modules()`` loops (``apply(fn)`` reaches every rank),
``.to()`` / ``.half()``, ``load_state_dict(assign=True)``.
"""

from __future__ import annotations

import contextlib
import copy
import queue
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import FIRST_EXCEPTION, Future, wait
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_unflatten

from tpfx.dtensor_params import local
from tpfx.passes import Replicate, Shard
from tpfx.plan import ShardingPlan

R = TypeVar("R")

_installed = threading.Lock()
_done: list[bool] = []
# torch's threaded group keys a pending collective by group name, alike in every world ("0"): calls of two
# modules sharded with devices= take turns, whichever threads make them
_ONE_CALL = threading.Lock()


def _install_threaded_worlds() -> None:
    """torch's threaded process group: a ``torch.distributed`` world per thread (installed once per process)."""
    with _installed:
        if _done:
            return
        from torch.testing._internal.distributed import multi_threaded_pg

        multi_threaded_pg._install_threaded_pg()
        torch._C._distributed_c10d._set_thread_isolation_mode(True)  # type: ignore[attr-defined]  # groups per thread
        _done.append(True)


class _RankRandom(TorchDispatchMode):
    """Random ops of this thread draw from ``gens`` (by the device they draw on), those not given a generator."""

    _takes: dict[Any, bool] = {}

    def __init__(self, gens: dict[str, torch.Generator]) -> None:
        super().__init__()
        self.gens = gens

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        takes = self._takes.get(func)
        if takes is None:
            names = [a.name for a in func._schema.arguments]
            takes = self._takes[func] = "generator" in names and names.index("generator") >= len(args)
        if takes and kwargs.get("generator") is None:
            where = kwargs.get("device") or next((a.device for a in args if isinstance(a, torch.Tensor)), None)
            gen = self.gens.get(torch.device(where).type if where is not None else "cpu")
            if gen is not None:
                kwargs = {**kwargs, "generator": gen}
        return func(*args, **kwargs)


def _rng_states(device: torch.device) -> dict[str, torch.Tensor]:
    """The caller's generator states: the CPU one, and ``device``'s."""
    states = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def _set_rng_states(states: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(states["cpu"])
    if "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)


def _modes(device: torch.device) -> dict[str, Any]:
    """The caller's thread-local modes a rank's thread takes on: grad, inference, autocast."""
    kinds = ["cpu"] + ([device.type] if device.type != "cpu" else [])
    return {"grad": torch.is_grad_enabled(), "inference": torch.is_inference_mode_enabled(),
            "autocast": {k: (torch.get_autocast_dtype(k), torch.is_autocast_enabled(k)) for k in kinds}}


@contextlib.contextmanager
def _caller_modes(modes: dict[str, Any], device: torch.device) -> Iterator[None]:
    with contextlib.ExitStack() as stack:
        stack.enter_context(torch.set_grad_enabled(modes["grad"]))
        if modes["inference"]:
            stack.enter_context(torch.inference_mode())
        for kind, (dtype, on) in modes["autocast"].items():
            if on:
                stack.enter_context(torch.autocast(device.type if kind != "cpu" else "cpu", dtype=dtype))
        yield


class Ranks:
    """``t`` threads, rank ``r`` on thread ``r`` with its own process-group world; ``run(fn)`` calls ``fn(r)`` on
    every rank at once and returns the results by rank."""

    def __init__(self, devices: list[torch.device], name: str = "tpfx") -> None:
        _install_threaded_worlds()
        self.t = t = len(devices)
        self.devices = devices
        self._jobs: list[queue.Queue] = [queue.Queue() for _ in range(t)]
        store = dist.HashStore()
        self._threads = [threading.Thread(target=self._serve, args=(r, store), daemon=True, name=f"{name}-rank{r}")
                         for r in range(t)]
        for th in self._threads:
            th.start()
        self.run(lambda r: None)  # every world initialised

    def _serve(self, rank: int, store: Any) -> None:
        torch.set_num_threads(1)
        device = self.devices[rank]
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("threaded", rank=rank, world_size=self.t, store=store)
        jobs = self._jobs[rank]
        while (job := jobs.get()) is not None:
            fn, modes, state, fut = job
            try:
                with _caller_modes(modes, device):
                    if state is None:
                        fut.set_result((fn(rank), None))
                    else:
                        gens = {k: torch.Generator(device if k != "cpu" else "cpu").set_state(v)
                                for k, v in state.items()}
                        with _RankRandom(gens):
                            fut.set_result((fn(rank), {k: g.get_state() for k, g in gens.items()}))
            except BaseException as e:  # noqa: BLE001 - handed to the caller (SystemExit: released by a failure)
                fut.set_exception(e)
            del job, fn, fut  # nothing of a finished call stays reachable from the thread
        dist.destroy_process_group()

    def run(self, fn: Callable[[int], R], random: bool = False) -> list[R]:
        """``fn(rank)`` on every rank (in the caller's grad mode); the first failure is raised, the others are
        released from the collectives they wait in. ``random``: every rank draws from a generator with the
        caller's state, which is left where rank 0's ended."""

        if not self._jobs:
            raise RuntimeError("tpfx: this sharded module's rank threads were closed (close()); shard the model anew")
        with _ONE_CALL:
            return self._run(fn, random)

    def _run(self, fn: Callable[[int], R], random: bool) -> list[R]:
        from torch.testing._internal.distributed.multi_threaded_pg import ProcessLocalGroup

        futs: list[Future] = [Future() for _ in range(self.t)]
        state = _rng_states(self.devices[0]) if random else None
        modes = _modes(self.devices[0])
        for r in range(self.t):
            self._jobs[r].put((fn, modes, state, futs[r]))
        done, pending = wait(futs, return_when=FIRST_EXCEPTION)
        if not pending and all(f.exception() is None for f in futs):
            results = [f.result() for f in futs]
            if random:
                _set_rng_states(results[0][1], self.devices[0])
            return [out for out, _ in results]
        wait(futs, timeout=1.0)  # peers that fail on their own (the same error) say so first
        if any(not f.done() for f in futs):
            ProcessLocalGroup.exception_handle(next(f.exception() for f in futs if f.done() and f.exception()))
        wait(futs)
        ProcessLocalGroup.reset()
        errors = [f.exception() for f in futs]
        first = next(e for e in errors if e is not None and not isinstance(e, SystemExit))
        raise first

    def close(self) -> None:
        """End the threads (each leaves its world), waiting for them."""
        for q in self._jobs:
            q.put(None)
        self._jobs = []
        for th in self._threads:
            if th is not threading.current_thread():
                th.join(timeout=10.0)


@dataclass(frozen=True)
class Piece:
    """An exposed parameter: rank ``rank``'s owned piece of parameter ``fqn`` (rows ``start:start+n`` of the
    full tensor along ``dim``, at ``at`` in the rank's slice); ``dim`` None: the whole tensor."""
    fqn: str
    rank: int
    dim: int | None = None
    start: int = 0
    n: int = 0
    at: int = 0

    @property
    def name(self) -> str:
        if self.dim is None:
            return self.fqn
        return f"{self.fqn}[{':, ' * self.dim}{self.start}:{self.start + self.n}]"

    def of(self, t: torch.Tensor) -> torch.Tensor:
        return t if self.dim is None else t.narrow(self.dim, self.at, self.n)


def pieces(fqn: str, placement: Any, world: int) -> list[Piece]:
    """Every element of parameter ``fqn`` once, as the ranks hold it."""
    if isinstance(placement, Shard):
        return [Piece(fqn, r, placement.dim, s, n, at) for r in range(world)
                for s, n, at in placement.owned_pieces(r, world)]
    if isinstance(placement, Replicate):
        return [Piece(fqn, 0)]
    raise NotImplementedError(f"tpfx: devices= cannot expose {fqn} laid out as {placement}")


class LocalSharded(torch.nn.Module):
    """A model sharded over ``devices`` in this process: the ranks' ``ShardedModule``s behind one module that
    computes what the unsharded model computes (see the module docstring)."""

    # kept in ``__dict__`` (not registered as submodules or parameters): declared for the type checker
    _ranks: Ranks
    _mods: list[Any]
    _names: dict[str, str]
    _buffer_names: list[str]
    _exposed: dict[str, torch.nn.Parameter]
    _owners: list[Piece]
    _replicas: list[tuple[torch.Tensor, torch.Tensor]]
    _pieces_of: dict[str, list[Piece]]
    _rank_params: list[dict[str, Any]]

    def __init__(self, ranks: Ranks, mods: list[Any], names: dict[str, str], buffers: list[str]) -> None:
        super().__init__()
        vars(self).update(_ranks=ranks, _mods=mods, _names=names, _buffer_names=buffers)
        self.training = mods[0].training
        rank_params = [dict(m.named_parameters()) for m in mods]
        exposed: dict[str, torch.nn.Parameter] = {}
        owners: list[Piece] = []
        replicas: list[tuple[torch.Tensor, torch.Tensor]] = []  # (owner's view, a copy's view) kept equal
        for fqn in rank_params[0]:
            pl = mods[0].placement(fqn)
            ps = pieces(fqn, pl, len(mods))
            for p in ps:
                own = p.of(local(rank_params[p.rank][fqn]).detach())
                exposed[p.name] = torch.nn.Parameter(own, requires_grad=rank_params[p.rank][fqn].requires_grad)
                owners.append(p)
            for r in range(len(mods)):  # the same elements on other ranks follow their owner
                mine = local(rank_params[r][fqn]).detach()
                for p in ps:
                    if p.rank != r and (p.dim is None or any(s == p.start for s, _, _ in pl.pieces(r, len(mods)))):
                        at = p.at if p.dim is None else next(a for s, _, a in pl.pieces(r, len(mods)) if s == p.start)
                        copy = mine if p.dim is None else mine.narrow(p.dim, at, p.n)
                        replicas.append((exposed[p.name], copy))
        pieces_of: dict[str, list[Piece]] = {}
        for p in owners:
            pieces_of.setdefault(p.fqn, []).append(p)
        vars(self).update(_exposed=exposed, _owners=owners, _replicas=replicas, _rank_params=rank_params,
                          _pieces_of=pieces_of)
        weakref.finalize(self, ranks.close)  # the rank threads end with the module

    def close(self) -> None:
        """End the rank threads (also done when the module is garbage-collected)."""
        self._ranks.close()

    # --- what torch sees: every element once -------------------------------------------------------------
    def named_parameters(self, prefix: str = "", recurse: bool = True,
                         remove_duplicate: bool = True) -> Iterator[tuple[str, torch.nn.Parameter]]:
        for name, p in self._exposed.items():
            yield (f"{prefix}.{name}" if prefix else name), p

    def parameters(self, recurse: bool = True) -> Iterator[torch.nn.Parameter]:
        for _, p in self.named_parameters():
            yield p

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        """``.to()``, ``.half()``, ``.cuda()``: each rank's slices live on its device, in the dtype they were
        sharded in; refused rather than silently doing nothing."""
        raise NotImplementedError("tpfx: a model sharded with devices= keeps each rank's slices on its device; "
                                  ".to()/.half()/.cuda() would not reach them: convert the model first, then "
                                  "tpfx.auto_shard(model, devices=[...])")

    def named_modules(self, *args: Any, **kwargs: Any) -> Any:
        """Refused: a change to one rank's module would not reach the others (``apply`` acts on every rank)."""
        raise NotImplementedError("tpfx: a model sharded with devices= is t ranks' modules; a loop over "
                                  "modules() would change only one of them. Use sharded.apply(fn) (fn runs on every "
                                  "rank's modules), or change the model before tpfx.auto_shard")

    def named_children(self) -> Any:
        return self.named_modules()

    def apply(self, fn: Callable[[torch.nn.Module], None]) -> LocalSharded:  # type: ignore[override]
        """``fn`` on every module of every rank's tree (as ``nn.Module.apply``: children first)."""
        for m in self._mods:
            m.tree.apply(fn)
        return self

    def train(self, mode: bool = True) -> LocalSharded:
        self.training = mode
        for m in self._mods:
            m.train(mode)
        return self

    @property
    def plan(self) -> ShardingPlan:
        return self._mods[0].plan

    @property
    def world_size(self) -> int:
        return len(self._mods)

    @property
    def ranks(self) -> list[Any]:
        """The ranks' ``ShardedModule``s (rank ``r``'s graphs run on thread ``r``: call them through ``run``)."""
        return list(self._mods)

    def run(self, fn: Callable[[Any], R]) -> list[R]:
        """``fn(rank_module)`` on every rank at once, on its thread; the results by rank."""
        self._sync_replicas()
        return self._ranks.run(lambda r: fn(self._mods[r]))

    @property
    def config(self) -> Any:
        return self._mods[0].config

    @property
    def generation_config(self) -> Any:
        return self._mods[0].generation_config

    def graph_keys(self, feature: str) -> list[tuple]:
        """Rank 0's ``ShardedModule.graph_keys`` (every rank captures the same graphs)."""
        return self._mods[0].graph_keys(feature)

    def feature_graphs(self, feature: str) -> dict[tuple, Any]:
        """Rank 0's ``ShardedModule.feature_graphs``."""
        return self._mods[0].feature_graphs(feature)

    @property
    def device(self) -> torch.device:
        return self._mods[0].device

    def can_generate(self) -> bool:
        return bool(self._mods[0].can_generate())

    def _sync_replicas(self) -> None:
        """Before every call: an exposed piece whose ``.data`` was replaced is copied into its rank's tensor
        (and aliases it again); every copy of a piece on other ranks takes its owner's values (optimizers update
        the owners: fused and ``.data`` updates bump no version counter, so the copy is unconditional); a
        parameter frozen or unfrozen through its pieces is so on every rank."""
        with torch.no_grad():
            for p in self._owners:
                exposed = self._exposed[p.name]
                own = p.of(local(self._rank_params[p.rank][p.fqn]).detach())
                if exposed.data_ptr() != own.data_ptr() or exposed.shape != own.shape:
                    own.copy_(exposed.data)
                    exposed.data = own
            for own, copy in self._replicas:
                if own.data_ptr() != copy.data_ptr():
                    copy.copy_(own)
        for fqn, ps in self._pieces_of.items():
            wanted = {self._exposed[p.name].requires_grad for p in ps}
            if len(wanted) > 1:
                raise RuntimeError(f"tpfx: the pieces of {fqn} disagree on requires_grad; freeze or unfreeze a "
                                   "parameter as a whole (every piece of it)")
            flag = wanted.pop()
            for rp in self._rank_params:
                if rp[fqn].requires_grad != flag:
                    rp[fqn].requires_grad_(flag)

    # --- calls ------------------------------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        self._sync_replicas()
        flat, spec = tree_flatten((args, kwargs))
        diff = [i for i, v in enumerate(flat) if isinstance(v, torch.Tensor) and v.requires_grad]

        devices = self._ranks.devices

        def call(r: int) -> tuple[Any, list[torch.Tensor]]:
            mine = [x.to(devices[r]) if isinstance(x, torch.Tensor) else x for x in flat]
            for i in diff:
                mine[i] = flat[i].detach().to(devices[r]).requires_grad_()
            a, k = tree_unflatten(mine, spec)
            return self._mods[r](*a, **k), [mine[i] for i in diff]

        results = self._ranks.run(call, random=self._draws(args, kwargs))
        oflat, ospec = tree_flatten(results[0][0])
        idx = [i for i, v in enumerate(oflat) if isinstance(v, torch.Tensor) and v.requires_grad]
        leaves = [p for p in self._exposed.values() if p.requires_grad] + [flat[i] for i in diff]
        if not idx or not leaves or not torch.is_grad_enabled():  # nothing of the ranks' graphs reachable
            return tree_unflatten([v.detach() if isinstance(v, torch.Tensor) else v for v in oflat], ospec)
        back = _Backward(self, [(tree_flatten(o)[0], ins) for o, ins in results], idx,
                         [flat[i].device for i in diff])
        for i, b in zip(idx, _Bridge.apply(back, *leaves), strict=True):
            oflat[i] = b
        return tree_unflatten(oflat, ospec)

    def _draws(self, args: tuple, kwargs: dict[str, Any]) -> bool:
        """Whether this call's graph draws random numbers (dropout in training), decided by rank 0's graph.
        Checkpointed regions recompute in backward, where torch's checkpoint restores the shared generator, not
        a rank's: refused with dropout."""
        if not self.training:
            return False
        return bool(self._ranks.run(lambda r: r == 0 and _random_graph(self._mods[r].graph_module(*args, **kwargs)))[0])

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """transformers' ``generate`` on every rank together (a head-split cache each); rank 0's result. Rank 0
        gets the caller's streamer and logits processors / stopping criteria; other ranks a copy of the
        processors, criteria and assistant model (a stateful one is then called once per rank, each on its own
        copy; assisted decoding tunes its assistant's generation config as it goes)."""
        self._sync_replicas()  # (generate refuses graphs that draw dropout in training mode: tpfx.generate)
        config = kwargs.get("generation_config") or next((a for a in args if hasattr(a, "do_sample")), None) \
            or self.generation_config
        drafted = kwargs.get("assistant_model") is not None  # (prompt lookup's candidates come without logits)
        if drafted and kwargs.get("do_sample", getattr(config, "do_sample", False)):
            raise NotImplementedError("tpfx.generate: assisted decoding with sampling on ranks in one process: "
                                      "its draws (torch.rand_like) take no generator, so the ranks' threads would "
                                      "share one; launch one process per rank, or decode greedily")
        theirs = dict(kwargs)
        if kwargs.get("streamer") is not None:  # the caller's streamer hears rank 0 only
            theirs["streamer"] = _quiet(kwargs["streamer"])
        from tpfx.runtime import ShardedModule

        if isinstance(kwargs.get("assistant_model"), (LocalSharded, ShardedModule)):
            raise NotImplementedError("tpfx.generate: assistant_model= must be an unsharded model (each rank runs "
                                      "its own copy of the draft)")
        for k in ("logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn", "assistant_model"):
            if k in theirs:
                theirs[k] = copy.deepcopy(theirs[k])
        # every rank draws from its own copy of the caller's generator (sampling may be on without do_sample=:
        # a positional generation config, Whisper's temperature=); greedy draws nothing, so it costs nothing
        return self._ranks.run(lambda r: self._mods[r].generate(*args, **(kwargs if r == 0 else theirs)),
                               random=True)[0]

    def save_pretrained(self, save_directory: str, **kwargs: Any) -> None:
        """The unsharded model in transformers' layout, as ``ShardedModule.save_pretrained`` writes it."""
        self.run(lambda m: m.save_pretrained(save_directory, **kwargs))

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """The unsharded model's tensors, each rank taking its slices."""
        if assign:
            raise ValueError("tpfx: devices= keeps each rank's tensors in place; load_state_dict(assign=True) "
                             "would replace the parameters that parameters() exposes")
        return self.run(lambda m: m.load_state_dict(state_dict, strict=strict))[0]

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:  # type: ignore[override]
        """The unsharded model's state dict (full tensors under the model's names), assembled from the pieces."""
        self._sync_replicas()
        full: dict[str, torch.Tensor] = {}
        plan = self.plan
        for fqn in self._rank_params[0]:
            pp = plan.placements.get(fqn)
            ps = [p for p in self._owners if p.fqn == fqn]
            if ps[0].dim is None:
                full[fqn] = self._exposed[ps[0].name].detach().clone()
                continue
            t = torch.empty(tuple(pp.shape) if pp is not None else (), dtype=self._exposed[ps[0].name].dtype)
            for p in ps:
                t.narrow(p.dim, p.start, p.n).copy_(self._exposed[p.name].detach())  # type: ignore[arg-type]
            full[fqn] = t
        bufs = self._mods[0].persistent_buffers()
        return {name: (full[fqn] if fqn in full else bufs[fqn].detach().clone())
                for name, fqn in self._names.items() if fqn in full or fqn in bufs}

    def __repr__(self) -> str:
        return f"LocalSharded({type(self._mods[0].tree).__name__}, {self.world_size} ranks on threads)"


class _Backward:
    """What one forward left for its backward: each rank's flattened outputs and differentiable inputs."""

    def __init__(self, front: LocalSharded, results: list[tuple[list[Any], list[torch.Tensor]]],
                 idx: list[int], input_devices: list[torch.device]) -> None:
        self.front, self.results, self.idx, self.input_devices = front, results, idx, input_devices

    def __call__(self, grads: tuple[torch.Tensor | None, ...]) -> list[torch.Tensor | None]:
        front, results = self.front, self.results
        if results is None:
            raise RuntimeError("tpfx: a second backward through the same outputs (retain_graph=True, or a "
                               "create_graph=True gradient of a gradient) is not supported with devices=; "
                               "compute the outputs anew for each backward")
        self.results = None  # type: ignore[assignment]
        names = [[f for f, p in rp.items() if p.requires_grad] for rp in front._rank_params]

        def backward(r: int) -> dict[str, torch.Tensor | None]:
            outs, ins = results[r]
            device = front._ranks.devices[r]
            pairs = [(outs[i], g.to(device)) for i, g in zip(self.idx, grads, strict=True) if g is not None]
            leaves = [front._rank_params[r][f] for f in names[r]] + ins
            got = torch.autograd.grad([o for o, _ in pairs], leaves, [g for _, g in pairs], allow_unused=True)
            return dict(zip(names[r] + [f"input:{k}" for k in range(len(ins))], got, strict=True))

        per_rank = front._ranks.run(backward)
        out: list[torch.Tensor | None] = []
        for p in front._owners:
            if front._exposed[p.name].requires_grad:
                g = per_rank[p.rank].get(p.fqn)
                out.append(None if g is None else p.of(local(g)))
        ins = [per_rank[0][f"input:{k}"] for k in range(len(results[0][1]))]
        out += [None if g is None else g.to(d) for g, d in zip(ins, self.input_devices, strict=True)]
        return out


class _Bridge(torch.autograd.Function):
    """Rank 0's outputs, as one node of the caller's graph over the exposed parameters and inputs."""

    @staticmethod
    def forward(ctx: Any, back: _Backward, *leaves: torch.Tensor) -> tuple[torch.Tensor, ...]:  # type: ignore[override]
        ctx.back = back
        outs0 = back.results[0][0]
        return tuple(outs0[i].detach() for i in back.idx)

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[Any, ...]:  # type: ignore[override]
        return (None, *ctx.back(grads))


def _quiet(streamer: Any) -> Any:
    """A streamer that hears nothing, under the caller's streamer's class name (the ranks compare arguments)."""
    from transformers.generation.streamers import BaseStreamer

    cls = type(type(streamer).__name__, (BaseStreamer,), {"put": lambda self, value: None, "end": lambda self: None})
    return cls()


def _random_graph(gm: Any) -> bool:
    from tpfx.agreement import draws_random
    from tpfx.passes import region

    if not draws_random(gm):
        return False
    if any(region(n) is not None for n in gm.graph.nodes) or any(
            "checkpoint" in str(getattr(n.target, "__name__", "")) for n in gm.graph.nodes):
        raise NotImplementedError(
            "tpfx: this training call draws random numbers (dropout) inside activation-checkpointed regions; with "
            "devices=, their recompute in backward would not draw the forward's masks (torch's checkpoint restores "
            "the generator ranks on threads share). Set the dropout probabilities to 0, turn checkpointing off, or "
            "launch one process per rank (tpfx.launch, torchrun)")
    return True


def check_devices(devices: Any, world_size: int | None, **given: Any) -> list[torch.device]:
    """The devices of ``auto_shard(devices=...)``, or a clear error."""
    if isinstance(devices, (str, torch.device, int)) or not devices:
        raise ValueError(f"tpfx: devices= takes a list of devices, one per rank (e.g. ['cpu'] * 2), got {devices!r}")
    try:
        devs = [torch.device(d) for d in devices]
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"tpfx: devices={devices!r}: {e}") from e
    if len({d.type for d in devs}) > 1:
        raise ValueError(f"tpfx: devices= mixes device kinds ({sorted({d.type for d in devs})}); every rank must "
                         "run on the same kind")
    if devs[0].type not in ("cpu", "cuda"):
        raise NotImplementedError(f"tpfx: devices= runs ranks on CPU or CUDA devices, not {devs[0].type}")
    if devs[0].type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"tpfx: devices={devices!r} names CUDA devices, but torch.cuda.is_available() is False")
        devs = [torch.device("cuda", d.index or 0) for d in devs]
        missing = [str(d) for d in devs if (d.index or 0) >= torch.cuda.device_count()]
        if missing:
            raise ValueError(f"tpfx: devices= names {missing[0]}, but this machine has {torch.cuda.device_count()} "
                             "CUDA devices")
    if world_size is not None and world_size != len(devs):
        raise ValueError(f"tpfx: world_size={world_size} but devices= names {len(devs)} devices (one rank each)")
    bad = [k for k, v in given.items() if v is not None]
    if bad:
        raise ValueError(f"tpfx: devices= runs every rank in this process; it cannot be combined with {bad[0]}=")
    if dist.is_available() and dist.is_initialized():
        raise RuntimeError("tpfx: devices= runs every rank in this process, but a process group is already "
                           "initialised (a launched rank): call auto_shard(model) without devices= there")
    return devs


def _on(mod: Any, device: torch.device) -> Any:
    """A rank's module with its buffers on its device (its parameters were loaded there)."""
    if device.type != "cpu":
        for m in mod.tree.modules():
            for k, b in m._buffers.items():
                if b is not None:
                    m._buffers[k] = b.to(device)
    return mod


def _state_names(model: torch.nn.Module) -> tuple[dict[str, str], list[str]]:
    """The model's state-dict names, each with the first name of its tensor (tied weights share one)."""
    first: dict[int, str] = {}
    names: dict[str, str] = {}
    for name, t in model.state_dict(keep_vars=True).items():
        names[name] = first.setdefault(id(t), name)
    return names, [n for n, _ in model.named_buffers()]


def shard_locally(model: torch.nn.Module | None, devices: Any, world_size: int | None,
                  shard: Callable[[int, int, torch.device], Any], **given: Any) -> LocalSharded:
    """``shard(rank, t, device)`` (a rank's ``auto_shard`` or ``from_pretrained``, on its thread's world) on
    ``len(devices)`` threads; ``model``: the model being sharded, if any (checked to be on one device)."""
    devs = check_devices(devices, world_size, **given)
    if model is not None and len({p.device for p in model.parameters()}) > 1:
        raise ValueError("tpfx: the model's parameters are on several devices; devices= shards a model held on "
                         "one device (build it on CPU)")
    ranks = Ranks(devs)
    try:
        mods = ranks.run(lambda r: _on(shard(r, len(devs), devs[r]), devs[r]))
    except BaseException:
        ranks.close()
        raise
    names, buffers = _state_names(mods[0].tree)
    return LocalSharded(ranks, mods, names, buffers)
