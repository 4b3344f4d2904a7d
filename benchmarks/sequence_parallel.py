"""Sequence parallelism: activation memory per rank and step time against plain tensor parallelism, one run.

Both tools are ``tpfx.auto_shard`` of the same Llama at t ranks (gloo, 1 thread each), with and without
``sequence_parallel=True``; they are checked first (losses agree, rel <= 1e-5). Per rank:

* **between layers**: the activations a decoder layer hands to the next (produced in the layer, read after
  it: the residual stream), measured by running the emitted per-rank graph node by node
  (``torch.fx.Interpreter``, no grad) and summing the tensors held at each layer boundary; the max over
  boundaries. Goal (issue 13): sequence-parallel <= 0.55x plain TP's at t=2. **All live** is everything held
  at a boundary, with what no layer produced (the causal mask ``(B, 1, S, S)`` and rotary tables, whole on
  every rank in both tools).
* **saved for backward**: the bytes autograd keeps from a training forward (``saved_tensors_hooks``, unique
  storages, parameters excluded): what a step's activation memory is.
* **step ms**: forward with labels, backward, AdamW; median, max over ranks, tools interleaved.

    python benchmarks/sequence_parallel.py [--quick] [--world T]
"""

from __future__ import annotations

import argparse
from typing import Any

import _common as C
import torch
import torch.distributed as dist
import torch.fx as fx

import tpfx
from tpfx.derive import prepare_kwargs as _prepare_kwargs

CONFIG = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
              num_key_value_heads=8, vocab_size=2048, max_position_embeddings=1024)
BATCH = (2, 512)
TARGET = 0.55
TOOLS = {"plain-tp": False, "sequence-parallel": True}


def _model(layers: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**{**CONFIG, "num_hidden_layers": layers}, use_cache=False))


class _Live(fx.Interpreter):
    """Runs a graph and records, at every layer boundary, the bytes of the activations still to be read."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.nodes = nodes = list(gm.graph.nodes)
        self.index = {n: i for i, n in enumerate(nodes)}
        self.last = {n: max((self.index[u] for u in n.users), default=self.index[n]) for n in nodes}
        layers = [C.layer_of(n) for n in nodes]
        self.starts = {i for i in range(1, len(nodes)) if layers[i] and layers[i] != layers[i - 1]
                       and layers[i - 1] is not None}
        self.layer = dict(zip(nodes, layers))
        self.held: dict[fx.Node, int] = {}
        self.peak = self.outputs = 0

    def run_node(self, n: fx.Node) -> Any:
        i = self.index[n]
        if i in self.starts:  # a boundary: what was produced earlier and is read from here on
            live = [(m, b) for m, b in self.held.items() if self.last[m] >= i]
            self.peak = max(self.peak, sum(b for _, b in live))
            before = self.layer[self.nodes[i - 1]]  # what the layer just finished hands on
            self.outputs = max(self.outputs, sum(b for m, b in live if self.layer[m] == before))
        out = super().run_node(n)
        if n.op in ("call_function", "call_method", "call_module", "placeholder"):
            vals = out if isinstance(out, (list, tuple)) else [out]
            self.held[n] = sum(v.numel() * v.element_size() for v in vals if isinstance(v, torch.Tensor))
        return out


def _between_layers(sharded: Any, ids: torch.Tensor) -> tuple[int, int]:
    kwargs = _prepare_kwargs(sharded._model, {"input_ids": ids, "labels": ids})
    gm = sharded.graph_module(**kwargs)
    live = _Live(gm)
    with torch.no_grad():
        live.run(*gm.graph._codegen.process_inputs((), kwargs))
    return live.outputs, live.peak


def _saved_for_backward(sharded: Any, ids: torch.Tensor) -> int:
    params = {tpfx.local(p).untyped_storage().data_ptr() for p in sharded.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = sharded(input_ids=ids, labels=ids).loss
    loss.backward()
    sharded.zero_grad(set_to_none=True)
    return sum(seen.values())


def bench_rank(rank: int, world: int, layers: int, iters: int, warmup: int) -> dict[str, Any]:
    tools = {n: tpfx.auto_shard(_model(layers), world, sequence_parallel=sp) for n, sp in TOOLS.items()}
    opts = {n: torch.optim.AdamW(m.parameters(), lr=1e-3) for n, m in tools.items()}
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, CONFIG["vocab_size"], BATCH, generator=g) for _ in range(warmup + iters)]
    memory = {}
    for n, m in tools.items():
        outputs, live = _between_layers(m, batches[0])
        memory[n] = {"between_layers": outputs, "live": live, "saved": _saved_for_backward(m, batches[0])}
    losses: dict[str, list[float]] = {n: [] for n in tools}
    times: dict[str, list[float]] = {n: [] for n in tools}
    for i, ids in enumerate(batches):
        for name, model in tools.items():
            dist.barrier()
            with C.Timer() as t:
                loss = model(input_ids=ids, labels=ids).loss
                loss.backward()
                opts[name].step()
                opts[name].zero_grad()
            losses[name].append(float(loss.detach()))
            if i >= warmup:
                times[name].append(t.s)
    return {"memory": memory, "losses": losses, "median_s": {n: C.median(v) for n, v in times.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 layers, 2 timed steps")
    ap.add_argument("--world", type=int, default=2)
    args = ap.parse_args()
    layers, iters, warmup = (2, 2, 1) if args.quick else (CONFIG["num_hidden_layers"], 5, 1)
    console = C.console()
    per_rank = C.launch(bench_rank, args.world, layers, iters, warmup)
    loss_err = max(C.rel_err(torch.tensor(r["losses"]["sequence-parallel"]), torch.tensor(r["losses"]["plain-tp"]))
                   for r in per_rank)
    keys = ("between_layers", "live", "saved")
    mem = {n: {k: max(r["memory"][n][k] for r in per_rank) for k in keys} for n in TOOLS}
    med = {n: max(r["median_s"][n] for r in per_rank) for n in TOOLS}
    ratio = {k: mem["sequence-parallel"][k] / mem["plain-tp"][k] for k in keys}
    step = med["sequence-parallel"] / med["plain-tp"]
    console.print(f"t={args.world} gloo ranks (1 thread each), Llama hidden {CONFIG['hidden_size']}, {layers} layers, "
                  f"batch {BATCH[0]}x{BATCH[1]}; max over ranks; losses agree to rel {loss_err:.1e}")
    for n in TOOLS:
        console.print(f"  {n:18s} between layers {C.fmt_bytes(mem[n]['between_layers'])}   all live at a boundary "
                      f"{C.fmt_bytes(mem[n]['live'])}   saved for backward {C.fmt_bytes(mem[n]['saved'])}   step "
                      f"{C.fmt_ms(med[n])} ms")
    ok = ratio["between_layers"] <= TARGET
    console.print(f"  sequence-parallel / plain-tp: between layers {ratio['between_layers']:.3f} (target <= {TARGET}: "
                  f"{C.verdict(ok)}), all live {ratio['live']:.3f}, saved for backward {ratio['saved']:.3f}, "
                  f"step time {step:.3f}")
    path = C.write_json("sequence_parallel", {
        "layers": layers, "iters": iters, "batch": list(BATCH), "config": CONFIG, "world": args.world,
        "memory": mem, "median_s": med, "ratios": {**ratio, "step": step}, "loss_rel_err": loss_err,
        "targets": [{"target": f"activations between layers <= {TARGET}x plain TP's (t={args.world})",
                     "value": round(ratio["between_layers"], 3), "ok": ok}]}, args.quick)
    console.print(f"wrote {path.relative_to(C.ROOT)}")


if __name__ == "__main__":
    main()
