"""``tpfx`` command line: ``tpfx plan`` (read, draw, save, compare a plan) and ``tpfx demo``.

The idea: planning needs no weights and no processes, so any model shape can be planned from its config
on the meta device: a transformers model type built from its default config (shrunk or grown with
``--layers``, ``--hidden``, ... or any ``--set key=value``), a ``config.json`` / checkpoint directory, or
``module.path:factory`` for any user module. The plan is then printed in the requested format.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import sys
import warnings
from collections.abc import Iterator
from typing import Any

import torch

EPILOG = """\
examples:
  tpfx plan llama --world-size 8 --layers 2                      table of a 2-layer Llama-7B shape
  tpfx plan llama --world-size 8 --hidden 8192 --layers 80 --heads 64 --kv-heads 8 \\
       --intermediate 28672 --vocab 128256 --dtype bfloat16      a Llama-70B shape (meta device, ~1 min)
  tpfx plan ./Llama-3-8B/ --world-size 4 --format json -o plan.json   from a config.json / checkpoint dir
  tpfx plan mypkg.models:build --world-size 2 --format html -o plan.html   any module: factory() returns
                                                 a module, or (module, example_inputs)
  tpfx plan gpt2 --world-size 2 --explain transformer.h.0.mlp.c_proj   why a weight is split as it is
  tpfx plan llama --world-size 2 --layers 2 --format compare           vs the model's own HF tp_plan
  tpfx demo --world-size 2                                         shard a small Llama and check it

formats: table (default), json (lossless, reload with tpfx.ShardingPlan.from_json), tp_plan (HF
vocabulary), dot (Graphviz text), svg/png/pdf (needs Graphviz `dot` and -o), html (one self-contained
file), compare (against the HF tp_plan of the model, or --compare FILE.json).
"""

CONFIG_FLAGS = {  # CLI flag -> canonical transformers config attribute (attribute_map handles aliases)
    "layers": "num_hidden_layers",
    "hidden": "hidden_size",
    "heads": "num_attention_heads",
    "kv_heads": "num_key_value_heads",
    "intermediate": "intermediate_size",
    "vocab": "vocab_size",
    "experts": "num_local_experts",
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CliError(Exception):
    """A user error: printed as one line, exit status 2."""


# ----------------------------------------------------------------------------------------------- demo


def demo_model(layers: int = 4) -> torch.nn.Module:
    """The built-in default model: a small random-init Llama with grouped-query attention."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=1024, hidden_size=256, intermediate_size=688, num_hidden_layers=layers,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256, use_cache=False)
    return LlamaForCausalLM(cfg)


def _demo_rank(rank: int, world: int, layers: int) -> dict[str, Any]:
    import tpfx

    model, reference = demo_model(layers), demo_model(layers)
    sharded = tpfx.auto_shard(model, world)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 1024, (2, 32), generator=g)
    labels = torch.randint(0, 1024, (2, 32), generator=g)
    out, ref = sharded(input_ids=ids, labels=labels), reference(input_ids=ids, labels=labels)
    out.loss.backward()
    ref.loss.backward()
    full = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    grad_err = max(((tpfx.local(p.grad) - tpfx.shard_tensor(sharded.plan, n, full[n], rank)).abs().max()
                    / full[n].abs().max()).item() for n, p in sharded.named_parameters() if p.grad is not None)
    return {
        "plan": str(sharded.plan) if rank == 0 else "",
        "logits_err": ((out.logits - ref.logits).abs().max() / ref.logits.abs().max()).item(),
        "loss": (out.loss.item(), ref.loss.item()),
        "grad_err": grad_err,
        "params": (sum(tpfx.local(p).numel() for p in sharded.parameters()), sum(p.numel() for p in reference.parameters())),
    }


def demo(world: int, layers: int) -> int:
    import tpfx

    print(f"tpfx demo: random-init Llama ({layers} layers, hidden 256, 8 heads / 4 KV heads, vocab 1024) "
          f"on {world} CPU processes (gloo)\n")
    results = tpfx.launch(_demo_rank, world, layers)
    print(results[0]["plan"])
    worst = 0.0
    for r, res in enumerate(results):
        loss, ref = res["loss"]
        print(f"rank {r}: logits rel err {res['logits_err']:.2e}  loss {loss:.6f} (unsharded {ref:.6f})  "
              f"grad rel err {res['grad_err']:.2e}  params {res['params'][0]:,} of {res['params'][1]:,}")
        worst = max(worst, res["logits_err"], res["grad_err"], abs(loss - ref) / abs(ref))
    ok = worst <= 1e-5
    print(f"\nmax relative error vs the unsharded model: {worst:.2e}  ({'OK' if ok else 'FAIL'}, tolerance 1e-5)")
    return 0 if ok else 1


# ------------------------------------------------------------------------------------ model building


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _pairs(items: list[str] | None, what: str) -> dict[str, str]:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CliError(f"{what} expects KEY=VALUE, got {item!r}")
        out[key] = value
    return out


def config_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """Config attributes set on the command line (flags and ``--set``)."""
    out: dict[str, Any] = {attr: getattr(args, flag) for flag, attr in CONFIG_FLAGS.items()
                           if getattr(args, flag, None) is not None}
    out.update({k: _parse_value(v) for k, v in _pairs(args.set, "--set").items()})
    return out


def _actual_attr(cfg: Any, name: str) -> str | None:
    """The attribute ``name`` is stored as in this config class (``hidden_size`` -> ``n_embd``), if any."""
    name = getattr(cfg, "attribute_map", {}).get(name, name)
    if name == "num_local_experts" and not hasattr(cfg, name):
        name = "num_experts"
    return name if hasattr(cfg, name) else None


def _base_config(model: str) -> Any:
    from transformers import AutoConfig

    if os.path.exists(model):
        return AutoConfig.from_pretrained(model)
    try:
        return AutoConfig.for_model(model)
    except ValueError as e:
        raise CliError(f"{model!r} is neither a file, a directory, a `module:factory` nor a transformers model "
                       f"type (llama, gpt2, mixtral, ...): {e}") from None


def build_config(model: str, overrides: dict[str, Any]) -> Any:
    """A transformers config for a model type or a config path, with ``overrides`` applied through the config
    class so derived fields (``head_dim``) are recomputed."""
    cfg = _base_config(model)
    d = cfg.to_dict()
    changed = {}
    for key, value in overrides.items():
        actual = _actual_attr(cfg, key)
        if actual is None:
            raise CliError(f"{type(cfg).__name__} has no attribute {key!r} (flags and --set name config fields)")
        changed[actual] = value
    hidden, heads = _actual_attr(cfg, "hidden_size"), _actual_attr(cfg, "num_attention_heads")
    if d.get("head_dim") and hidden and heads and {hidden, heads} & set(changed) \
            and d["head_dim"] * d[heads] == d[hidden] and "head_dim" not in changed:
        d.pop("head_dim")  # it was derived: let the config recompute it from the new sizes
    d.update(changed)
    d["use_cache"] = False
    d.pop("transformers_version", None)
    return type(cfg)(**{k: v for k, v in d.items() if k != "model_type"})


def build_hf(cfg: Any, dtype: torch.dtype, attn: str | None) -> torch.nn.Module:
    """The model for ``cfg`` on the meta device: its causal-LM head if it has one, else the base model."""
    from transformers import AutoModel, AutoModelForCausalLM

    kwargs: dict[str, Any] = {"dtype": dtype}
    if attn:
        kwargs["attn_implementation"] = attn
    with torch.device("meta"):
        try:
            return AutoModelForCausalLM.from_config(cfg, **kwargs)
        except ValueError:
            return AutoModel.from_config(cfg, **kwargs)


def load_factory(spec: str) -> tuple[torch.nn.Module, tuple | None, dict[str, Any] | None]:
    """``module.path:factory`` -> (module, example args, example kwargs)."""
    mod_name, _, fn_name = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        factory = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise CliError(f"cannot load factory {spec!r}: {e}") from None
    made = factory()
    if isinstance(made, torch.nn.Module):
        return made, None, None
    if isinstance(made, tuple) and len(made) == 2 and isinstance(made[0], torch.nn.Module):
        module, example = made
        if isinstance(example, dict):
            return module, None, example
        return module, example if isinstance(example, tuple) else (example,), None
    raise CliError(f"factory {spec!r} must return a torch.nn.Module or a (module, example_inputs) pair, "
                   f"got {type(made).__name__}")


def _example_ids(cfg: Any, batch: int, seq: int) -> dict[str, Any]:
    ids = torch.zeros(batch, seq, dtype=torch.long, device="meta")
    kwargs = {"input_ids": ids}
    if getattr(cfg, "is_encoder_decoder", False):
        kwargs["decoder_input_ids"] = ids.clone()
    return kwargs


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Keep library deprecation chatter out of the output; tpfx's own warnings stay."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", message=".*torch_dtype.*")
        yield


def make_plan(args: argparse.Namespace) -> tuple[Any, Any]:
    """(plan, model) for the command line's MODEL."""
    import tpfx

    overrides = _pairs(args.override, "--override") or None
    if ":" in args.model and not os.path.exists(args.model):
        if config_overrides(args):
            raise CliError("--layers/--hidden/--set apply to transformers configs, not to a module:factory")
        model, ex_args, ex_kwargs = load_factory(args.model)
        return tpfx.plan(model, args.world_size, example_inputs=ex_args, example_kwargs=ex_kwargs,
                         overrides=overrides, sequence_parallel=args.sequence_parallel), model
    cfg = build_config(args.model, config_overrides(args))
    dtype = DTYPES[args.dtype]
    ex = _example_ids(cfg, args.batch, args.seq) if args.batch or args.seq else None
    if ex is not None and (not args.batch or not args.seq):
        raise CliError("--batch and --seq go together")
    attempts = [args.attn] if args.attn else [None, "eager"]
    for i, attn in enumerate(attempts):
        model = build_hf(cfg, dtype, attn)
        try:
            return tpfx.plan(model, args.world_size, example_kwargs=ex, overrides=overrides,
                             sequence_parallel=args.sequence_parallel), model
        except Exception as e:  # noqa: BLE001 - some attention kernels do not export; eager does
            if i + 1 == len(attempts) or isinstance(e, ValueError) and "override" in str(e):
                raise
            print(f"tpfx: capture with the default attention failed ({type(e).__name__}); retrying with "
                  f"attn_implementation='eager'", file=sys.stderr)
    raise AssertionError("unreachable")


# -------------------------------------------------------------------------------------------- output


def _their_plan(args: argparse.Namespace, model: Any) -> dict[str, str]:
    if args.compare and args.compare != "hf":
        with open(args.compare) as f:
            return json.load(f)
    base = dict(getattr(getattr(model, "config", None), "base_model_tp_plan", None) or {})
    prefix = getattr(model, "base_model_prefix", "")
    tp: dict[str, str] = {(f"{prefix}.{k}" if prefix and hasattr(model, prefix) else k): v for k, v in base.items()}
    tp.update(getattr(model, "_tp_plan", None) or {})
    if not tp:
        raise CliError("the model has no HF tp_plan to compare with; pass --compare FILE.json")
    return tp


def render_output(args: argparse.Namespace, plan: Any, model: Any) -> str | None:
    """The text to write, or None when the output was written directly (images)."""
    fmt = args.format
    if fmt == "json":
        return plan.to_json()
    if fmt == "tp_plan":
        return json.dumps(plan.to_tp_plan(), indent=1)
    if fmt == "dot":
        return plan.to_dot()
    if fmt == "html":
        return plan.to_html()
    if fmt in ("svg", "png", "pdf"):
        if not args.output:
            raise CliError(f"--format {fmt} needs -o FILE")
        plan.render(args.output)
        return None
    if fmt == "compare":
        import tpfx

        return str(tpfx.compare(plan, _their_plan(args, model)))
    return plan.summary(width=args.width)


def plan_cmd(args: argparse.Namespace) -> int:
    with _quiet():
        plan, model = make_plan(args)
        text = render_output(args, plan, model)
        notes = [str(plan.explain(name)) for name in args.explain or []]
    if text is not None and args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text if text.endswith("\n") else text + "\n")
        print(f"tpfx: wrote {args.output}", file=sys.stderr)
    elif text is not None:
        print(text.rstrip("\n"))
    for note in notes:
        print(note, file=sys.stdout if args.format == "table" and not args.output else sys.stderr)
    return 0


def verify_cmd(args: argparse.Namespace) -> int:
    """``tpfx verify``: 0 when the plan's ranks match the unsharded model within ``--tol``, else 1."""
    import tpfx

    with _quiet():
        if ":" in args.model and not os.path.exists(args.model):
            model, ex_args, ex_kwargs = load_factory(args.model)
        else:
            from transformers import AutoModel, AutoModelForCausalLM

            cfg = build_config(args.model, config_overrides(args))
            if args.attn:
                cfg._attn_implementation = args.attn
            torch.manual_seed(0)
            try:
                model = AutoModelForCausalLM.from_config(cfg, dtype=DTYPES[args.dtype])
            except ValueError:
                model = AutoModel.from_config(cfg, dtype=DTYPES[args.dtype])
            ex_args = None
            ex_kwargs = _example_ids(cfg, args.batch or 2, args.seq or 8)
            ex_kwargs = {k: torch.randint(0, int(getattr(cfg, "vocab_size", 2) or 2), tuple(v.shape))
                         for k, v in ex_kwargs.items()}
        overrides = _pairs(args.override, "--override") or None
        report = tpfx.verify(model, args.world_size, example_inputs=ex_args, example_kwargs=ex_kwargs, tol=args.tol,
                             overrides=overrides, sequence_parallel=args.sequence_parallel)
    print(report)
    return 0 if report.ok else 1


# ---------------------------------------------------------------------------------------------- main


def _model_args(p: argparse.ArgumentParser) -> None:
    """MODEL and its shape and example inputs (``plan`` and ``verify``)."""
    p.add_argument("model", metavar="MODEL",
                   help="a transformers model type (llama, gpt2, mixtral, ...), a config.json or checkpoint "
                        "directory, or module.path:factory")
    p.add_argument("--world-size", "-t", type=int, required=True, help="tensor-parallel ranks")
    p.add_argument("--sequence-parallel", action="store_true",
                   help="split the residual stream by sequence between blocks (Megatron-SP)")
    shape = p.add_argument_group("model shape (transformers configs)")
    shape.add_argument("--layers", type=int, help="num_hidden_layers")
    shape.add_argument("--hidden", type=int, help="hidden_size")
    shape.add_argument("--heads", type=int, help="num_attention_heads")
    shape.add_argument("--kv-heads", type=int, help="num_key_value_heads")
    shape.add_argument("--intermediate", type=int, help="intermediate_size")
    shape.add_argument("--vocab", type=int, help="vocab_size")
    shape.add_argument("--experts", type=int, help="number of experts (MoE models)")
    shape.add_argument("--set", action="append", metavar="KEY=VALUE", help="any config field (repeatable)")
    shape.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="parameter dtype for the bytes")
    shape.add_argument("--attn", default=None, help="attn_implementation (default: the model's, eager on failure)")
    ex = p.add_argument_group("example inputs (bytes of collectives are for these shapes)")
    ex.add_argument("--batch", type=int, help="batch size of the example input_ids (default 2)")
    ex.add_argument("--seq", type=int, help="sequence length of the example input_ids (default 8)")


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(
        prog="tpfx", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="Automatic tensor parallelism for PyTorch: derive, inspect and check Megatron-style "
                    "sharding plans.")
    sub = top.add_subparsers(dest="cmd", required=True, metavar="{plan,verify,demo}")
    d = sub.add_parser("demo", help="shard a small random-init Llama over CPU processes and check it")
    d.add_argument("--world-size", type=int, default=2, help="number of gloo processes (default 2)")
    d.add_argument("--layers", type=int, default=4, help="decoder layers (default 4)")
    p = sub.add_parser("plan", help="derive and print the sharding plan of a model (no weights, no processes)",
                       formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
                       description="Derive the sharding plan of MODEL for --world-size ranks on the meta device.")
    _model_args(p)
    v = sub.add_parser("verify", help="run the plan's ranks in this process on CPU and compare with the unsharded "
                                      "model (exit 1 if any error exceeds --tol)",
                       description="Build MODEL with random weights, run its --world-size rank plan on CPU threads "
                                   "of this process and the unsharded model on the same inputs; print the relative "
                                   "error of the outputs and of each layer's gradients, and the collectives.")
    _model_args(v)
    v.add_argument("--tol", type=float, default=1e-5, help="largest relative error accepted (default 1e-5)")
    v.add_argument("--override", action="append", metavar="PATTERN=STYLE", help="pin weights, as for plan")
    out = p.add_argument_group("output")
    out.add_argument("--format", "-f", default="table", metavar="FORMAT",
                     choices=["table", "json", "tp_plan", "dot", "svg", "png", "pdf", "html", "compare"],
                     help="table (default), json, tp_plan, dot, svg/png/pdf (with -o), html, compare")
    out.add_argument("-o", "--output", help="write to FILE instead of stdout")
    out.add_argument("--override", action="append", metavar="PATTERN=STYLE",
                     help="pin weights (fnmatch on FQNs / module names), e.g. lm_head=replicate (repeatable)")
    out.add_argument("--explain", action="append", metavar="NAME", help="explain a weight's placement (repeatable)")
    out.add_argument("--compare", metavar="hf|FILE.json", help="tp_plan to compare with (--format compare)")
    out.add_argument("--width", type=int, default=140, help="table width (default 140)")
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.cmd == "demo":
        return demo(args.world_size, args.layers)
    if args.cmd == "plan" and args.compare and args.format == "table":
        args.format = "compare"
    try:
        return verify_cmd(args) if args.cmd == "verify" else plan_cmd(args)
    except (CliError, KeyError, FileNotFoundError) as e:
        print(f"tpfx: error: {e.args[0] if e.args else e}", file=sys.stderr)
        return 2
    except (ValueError, RuntimeError) as e:
        print(f"tpfx: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
