"""Shared helpers for the benchmark scripts: imports from this checkout, machine facts, JSON output,
Llama shapes, a launcher that picks NCCL on GPUs and gloo on CPU, and timing utilities.

Importing this module puts the repository root first on ``sys.path`` and loads ``tpfx.passes`` from this
checkout's ``passes/`` directory, so the scripts measure the code next to them even when another checkout is
``pip install -e``'d (the editable finder would otherwise map ``tpfx.passes`` to that other tree).
"""

from __future__ import annotations

import datetime
import importlib.util
import json
import os
import platform
import re
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"


def _load(name: str, path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(name, path / "__init__.py", submodule_search_locations=[str(path)])
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod
    return spec, mod


def _use_checkout() -> None:
    """``tpfx`` and ``tpfx.passes`` (from ``passes/``) of this checkout, whatever is installed: the compiler
    first (it imports nothing of ``tpfx``), then the package, which imports the compiler's surface."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    if "tpfx" in sys.modules or "tpfx.passes" in sys.modules or not (ROOT / "passes" / "__init__.py").exists():
        return
    tpfx_spec, tpfx_mod = _load("tpfx", ROOT / "tpfx")
    passes_spec, passes_mod = _load("tpfx.passes", ROOT / "passes")
    tpfx_mod.passes = passes_mod
    passes_spec.loader.exec_module(passes_mod)
    tpfx_spec.loader.exec_module(tpfx_mod)


_use_checkout()
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402

try:
    from transformers.utils import logging as _hf_logging

    _hf_logging.disable_progress_bar()
except ImportError:  # pragma: no cover
    pass

# --------------------------------------------------------------------------------------------- machine


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_rev() -> str:
    try:
        rev = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return rev + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def machine_info() -> dict[str, Any]:
    import transformers

    import tpfx

    info: dict[str, Any] = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "nproc": os.cpu_count(),
        "cpu": cpu_model(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "tpfx": str(Path(tpfx.__file__).parent),
        "tpfx_passes": str(Path(sys.modules["tpfx.passes"].__file__ or "?").parent),
        "git": git_rev(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "gpus": torch.cuda.device_count(),
    }
    try:
        info["loadavg"] = os.getloadavg()
    except OSError:
        pass
    return info


def command_line() -> str:
    return "python " + " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0], ROOT), *sys.argv[1:]])


def write_json(name: str, data: dict[str, Any], quick: bool) -> Path:
    """Write ``benchmarks/results/<name>[_quick].json`` with the machine facts and the command added."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}{'_quick' if quick else ''}.json"
    payload = {
        "benchmark": name,
        "quick": quick,
        "command": command_line(),
        "machine": machine_info(),
        **data,
    }
    path.write_text(json.dumps(payload, indent=1, default=str) + "\n")
    return path


# ------------------------------------------------------------------------------------- plan-time rows

PLAN_TIME_COLUMNS = ["model", "params", "t", "nodes", "layers", "unique layers", "traced", "export alone",
                     "static export",
                     "capture", "other passes", "propagate", "emit/rank", "prop+emit", "total", "total/export",
                     "total/static", "plan", "plan/static"]


def plan_time_cells(r: dict[str, Any]) -> list[str]:
    """One plan-time result row as strings, in ``PLAN_TIME_COLUMNS`` order (console table and RESULTS.md)."""
    return [r["model"], f"{r['params'] / 1e9:.1f}B", str(r["t"]), str(r["nodes"]), str(r["layers"]),
            str(r["unique_layers"]), _opt(r.get("traced_layers"), "{}"), f"{r['export']:.2f}", _opt(r.get("static_export"), "{:.2f}"),
            f"{r['capture']:.2f}", f"{sum(r['passes'].values()):.3f}", f"{r['propagate']:.3f}", f"{r['emit']:.3f}",
            f"{r['prop_emit']:.3f}", f"{r['total']:.2f}", f"{r['ratio']:.2f}x", _opt(r.get("ratio_static"), "{:.2f}x"),
            _opt(r.get("plan_wall"), "{:.2f}"), _opt(r.get("plan_ratio_static"), "{:.2f}x")]


def _opt(v: float | None, fmt: str) -> str:
    return "–" if v is None else fmt.format(v)


# --------------------------------------------------------------------------------------------- models

# Shapes of the released checkpoints (Llama-3.2-1B, Llama-2-7B/13B/70B).
LLAMA_SHAPES: dict[str, dict[str, Any]] = {
    "1B": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
        tie_word_embeddings=True,
        rope_theta=500000.0,
    ),
    "7B": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32000,
    ),
    "13B": dict(
        hidden_size=5120,
        intermediate_size=13824,
        num_hidden_layers=40,
        num_attention_heads=40,
        num_key_value_heads=40,
        vocab_size=32000,
    ),
    "70B": dict(
        hidden_size=8192,
        intermediate_size=28672,
        num_hidden_layers=80,
        num_attention_heads=64,
        num_key_value_heads=8,
        vocab_size=32000,
    ),
}


def meta_llama(size: str, **overrides: Any) -> torch.nn.Module:
    """A full-size Llama built on the meta device (no memory for weights)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**{**LLAMA_SHAPES[size], "use_cache": False, **overrides})
    with torch.device("meta"):
        return LlamaForCausalLM(cfg)


def llama_params(size: str) -> int:
    s = LLAMA_SHAPES[size]
    h, i, n, v = s["hidden_size"], s["intermediate_size"], s["num_hidden_layers"], s["vocab_size"]
    kv = h * s["num_key_value_heads"] // s["num_attention_heads"]
    layer = 2 * h * h + 2 * h * kv + 3 * h * i + 2 * h
    return n * layer + v * h * (1 if s.get("tie_word_embeddings") else 2) + h


# --------------------------------------------------------------------------------------------- launch


def use_gpu(world: int) -> bool:
    """NCCL needs one GPU per rank; otherwise the ranks run on CPU with gloo."""
    return torch.cuda.is_available() and torch.cuda.device_count() >= world


def device_for(rank: int, world: int) -> torch.device:
    return torch.device("cuda", rank) if use_gpu(world) else torch.device("cpu")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _worker(
    rank: int, fn: Callable[..., Any], world: int, port: int, tmpdir: str, args: tuple[Any, ...], threads: int
) -> None:
    torch.set_num_threads(threads)
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_WORLD_SIZE=str(world),
    )
    gpu = use_gpu(world)
    if gpu:
        torch.cuda.set_device(rank)
    dist.init_process_group(
        "nccl" if gpu else "gloo",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(minutes=30),
        **({"device_id": torch.device("cuda", rank)} if gpu else {}),
    )
    try:
        result = fn(rank, world, *args)
        torch.save(result, os.path.join(tmpdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def launch(fn: Callable[..., Any], world: int, *args: Any, threads: int = 1) -> list[Any]:
    """Run ``fn(rank, world, *args)`` on ``world`` spawned processes (NCCL with one GPU per rank when there
    are enough GPUs, else gloo on CPU with ``threads`` intra-op threads each) and return results by rank.

    Like ``tpfx.launch``, but picks the backend and sets RANK/LOCAL_RANK/WORLD_SIZE, which HF's ``tp_plan``
    loader reads. A failing rank raises ``torch.multiprocessing.ProcessRaisedException`` (with its
    traceback)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory(prefix="tpfx_bench_") as tmpdir:
        mp.start_processes(
            _worker,
            args=(fn, world, port, tmpdir, args, threads),
            nprocs=world,
            join=True,
            start_method="spawn",
        )
        return [torch.load(os.path.join(tmpdir, f"rank{r}.pt"), weights_only=False) for r in range(world)]


# --------------------------------------------------------------------------------------------- numbers


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().float().cpu(), b.detach().float().cpu()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


class Timer:
    """``with Timer() as t: ...; t.s`` — wall seconds."""

    def __enter__(self) -> Timer:
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.s = time.perf_counter() - self.t0


def fmt_s(x: float | None, digits: int = 2) -> str:
    if x is None or x != x:
        return "–"
    return f"{x:.{digits}f}"


def fmt_ms(x: float | None) -> str:
    if x is None or x != x:
        return "–"
    return f"{x * 1e3:.1f}"


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "–"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.3g} {unit}"
        n /= 1024
    return str(n)


def verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("PASS" if ok else "FAIL")


def spread(xs: list[float]) -> float:
    """Half the interquartile range over the median: the relative noise of one tool's timed runs."""
    q = statistics.quantiles(xs, n=4) if len(xs) >= 2 else [xs[0]] * 3
    return (q[2] - q[0]) / 2 / statistics.median(xs)


def median_ci(xs: list[float], level: float = 0.95, resamples: int = 2000) -> tuple[float, float]:
    """A bootstrap interval of the median of ``xs`` (resampled with a fixed seed: the same data give the same
    interval)."""
    import random

    rng = random.Random(0)
    meds = sorted(statistics.median(rng.choices(xs, k=len(xs))) for _ in range(resamples))
    lo = int((1 - level) / 2 * resamples)
    return meds[lo], meds[resamples - 1 - lo]


def interval_verdict(lo: float, hi: float, target: float) -> str:
    """``value <= target`` judged on an interval: PASS when all of it is at or below, FAIL when all above, else
    "not resolved" (the machine's noise cannot tell)."""
    return "PASS" if hi <= target else "FAIL" if lo > target else "not resolved"


def ratio_verdict(ratio: float, target: float, noise: float) -> str:
    """PASS / FAIL for ``ratio <= target``, or "not resolved" when the ratio lies within ``noise`` (relative)
    of the target: the machine cannot tell the two sides of the bar apart."""
    return interval_verdict(ratio * (1 - noise), ratio * (1 + noise), target)


# --------------------------------------------------------------------------------------------- graphs

_NUMBERED = re.compile(r"^(?:.*\.)?[A-Za-z_]\w*\.(\d+)$")


def layer_of(node: Any) -> str | None:
    """The outermost numbered module (``model.layers.3``, ``transformer.h.0``) a graph node belongs to."""
    stack = node.meta.get("nn_module_stack") or {}
    for path, _ in stack.values():
        if _NUMBERED.match(path):
            return str(path)
    return None


def layer_signatures(gm: Any) -> dict[str, tuple[Any, ...]]:
    """Per numbered layer, the sequence of (op, output shape) of its nodes: equal signatures = same layer."""
    ops: dict[str, list[Any]] = {}
    for n in gm.graph.nodes:
        key = layer_of(n)
        if key is None or n.op not in ("call_function", "call_method", "call_module"):
            continue
        val = n.meta.get("val")
        shape = tuple(str(s) for s in val.shape) if isinstance(val, torch.Tensor) else None
        ops.setdefault(key, []).append((str(n.target), shape))
    return {k: tuple(v) for k, v in ops.items()}


def console() -> Any:
    """A rich console wide enough for the tables even when stdout is a pipe (``COLUMNS`` overrides)."""
    from rich.console import Console

    return Console(width=int(os.environ.get("COLUMNS") or 0) or 170)
