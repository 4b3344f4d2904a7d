"""The normalize stage's passes: plain ``GraphModule -> GraphModule`` functions, run in ``CLEANUPS`` order by
``run_passes``, which lints the graph after each and times it (``stages.Stages.normalize``)."""

from __future__ import annotations

import logging
import operator
import time
from collections.abc import Callable
from typing import Any

import sympy
import torch
import torch.fx as fx

from .shapes import hint, sym

log = logging.getLogger("tpfx.passes")
aten = torch.ops.aten
Pass = Callable[[fx.GraphModule], fx.GraphModule]


_CONVS = {aten.conv1d, aten.conv2d, aten.conv3d, aten.convolution, aten.conv_transpose1d, aten.conv_transpose2d,
          aten.conv_transpose3d}


def _conv_bias(gm: fx.GraphModule, node: fx.Node) -> bool:
    """``conv(x, W, b, ...)`` -> ``transpose(transpose(conv(x, W, None, ...), c, -1) + b, c, -1)``.

    The bias is added with the channel dim moved last, so it broadcasts as a plain 1-D ``[C]`` operand
    and the pointwise rule decides it directly (a ``b.view(1, C, 1, 1)`` would be decided
    ``replicate`` by the view before the add could shard it). The add's output keeps the permuted
    strides, so the transposed-back result is contiguous NCHW again."""
    if getattr(node.target, "overloadpacket", None) not in _CONVS:
        return False
    bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    val, wval = node.meta.get("val"), node.args[1].meta.get("val") if isinstance(node.args[1], fx.Node) else None
    if not isinstance(bias, fx.Node) or not isinstance(val, torch.Tensor) or not isinstance(wval, torch.Tensor):
        return False
    c = val.ndim - (wval.ndim - 2) - 1  # channel dim: 1 batched, 0 unbatched
    args, kwargs = list(node.args), dict(node.kwargs)
    if len(args) > 2:
        args[2] = None
    else:
        kwargs.pop("bias")
    with gm.graph.inserting_before(node):
        conv = gm.graph.call_function(node.target, tuple(args), kwargs)  # type: ignore[arg-type]
        conv.meta = dict(node.meta)
        moved = gm.graph.call_function(aten.transpose.int, (conv, c, -1))
        moved.meta = dict(node.meta) | {"val": val.transpose(c, -1)}
        add = gm.graph.call_function(aten.add.Tensor, (moved, bias))
        add.meta = dict(moved.meta)
        back = gm.graph.call_function(aten.transpose.int, (add, c, -1))
        back.meta = dict(node.meta)
    node.replace_all_uses_with(back)
    gm.graph.erase_node(node)
    return True


def decompose_bias(gm: fx.GraphModule) -> fx.GraphModule:
    """``linear(x, W, b)`` -> ``linear(x, W) + b``, ``addmm(b, x, W)`` -> ``mm(x, W) + b`` and a biased
    convolution -> convolution + channel bias (``_conv_bias``).

    A row-split matmul yields partial sums; its bias must be added once, after the all-reduce.
    Splitting the bias off lets the pointwise rule place it (sharded with a column split,
    after the reduction with a row split)."""
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function":
            continue
        if _conv_bias(gm, node):
            continue
        if node.target is aten.linear.default and len(node.args) > 2 and node.args[2] is not None:
            x, w, b = node.args[:3]
            mm_args, bias = (x, w), b
            mm_target = aten.linear.default
        elif node.target is aten.addmm.default and len(node.args) == 3 and not node.kwargs:
            b, x, w = node.args
            mm_args, bias, mm_target = (x, w), b, aten.mm.default
        else:
            continue
        with gm.graph.inserting_before(node):
            mm = gm.graph.call_function(mm_target, mm_args)
            mm.meta = dict(node.meta)
            add = gm.graph.call_function(aten.add.Tensor, (mm, bias))
            add.meta = dict(node.meta)
        node.replace_all_uses_with(add)
        gm.graph.erase_node(node)
        changed = True
    if changed:
        gm.recompile()
    return gm


def _same_size(a: int | torch.SymInt, b: int | torch.SymInt) -> bool:
    """Equal sizes: symbolically, or (forms sympy cannot simplify, e.g. chunked-sequence padding) by the
    traced sizes; ops after a wrongly equated size would fail on the shape, never compute silently."""
    ea, eb = sym(a), sym(b)
    if sympy.simplify(ea - eb) == 0:
        return True
    ha, hb = hint(a), hint(b)
    return ha is not None and hb is not None and int(ha) == int(hb) and int(ha) != 1


def inline_grad_regions(gm: fx.GraphModule) -> fx.GraphModule:
    """Inline export's ``wrap_with_set_grad_enabled`` regions between grad-mode switches.

    ``torch.no_grad()`` blocks (HF's rotary embedding, HRM's gradient-free reasoning cycles) export as a
    higher-order op whose body is a submodule: an op no rule could see into, so every weight used in it
    would stay replicated. Inlined, the body's ops are planned like any others and still run with the
    region's grad mode (``prev = is_grad_enabled(); set_grad_enabled(mode); ...; set_grad_enabled(prev)``)."""
    hop = torch.ops.higher_order.wrap_with_set_grad_enabled
    g = gm.graph
    changed = False
    for node in list(g.nodes):
        if node.op != "call_function" or node.target is not hop:
            continue
        enabled, body, *operands = node.args
        sub = getattr(gm, body.target)
        env: dict[fx.Node, Any] = {}
        with g.inserting_before(node):
            prev = g.call_function(torch.is_grad_enabled)
            g.call_function(torch.set_grad_enabled, (enabled,))
            params = [p for p in sub.graph.nodes if p.op == "placeholder"]
            env.update(zip(params, operands, strict=True))
            result: object = None
            for n in sub.graph.nodes:
                if n.op == "placeholder":
                    continue
                if n.op == "output":
                    result = fx.map_arg(n.args[0], env.__getitem__)
                    break
                if n.op in ("get_attr", "call_module"):
                    name = f"{body.target}_{n.target.replace('.', '_')}"
                    obj = sub
                    for part in n.target.split("."):
                        obj = getattr(obj, part)
                    setattr(gm, name, obj)
                    new = g.node_copy(n, env.__getitem__)
                    new.target = name
                else:
                    new = g.node_copy(n, env.__getitem__)
                env[n] = new
            g.call_function(torch.set_grad_enabled, (prev,))
        outs = result if isinstance(result, (tuple, list)) else (result,)
        for user in list(node.users):
            if user.target is operator.getitem:
                user.replace_all_uses_with(outs[user.args[1]])  # type: ignore[arg-type]
                g.erase_node(user)
        if node.users:
            node.replace_all_uses_with(result)  # type: ignore[arg-type]
        g.erase_node(node)
        if not body.users:
            g.erase_node(body)
            delattr(gm, body.target)
        changed = True
    if changed:
        gm.recompile()
        return inline_grad_regions(gm)  # regions nested in regions
    return gm


# ATen aliases (``torch.multiply`` is ``torch.mul``): same schema per overload name; rules are written once,
# for the canonical op
_ALIASES = {"multiply": "mul", "subtract": "sub", "divide": "div", "true_divide": "div", "greater": "gt",
            "greater_equal": "ge", "less": "lt", "less_equal": "le", "not_equal": "ne", "absolute": "abs",
            "negative": "neg", "clip": "clamp", "concat": "cat", "concatenate": "cat", "arctan2": "atan2",
            "fix": "trunc", "moveaxis": "movedim", "swapaxes": "transpose", "swapdims": "transpose"}


def _canonical(target: Any) -> Any:
    packet = getattr(target, "overloadpacket", None)
    canon = _ALIASES.get(getattr(packet, "__name__", ""))
    if canon is None:
        return None
    overload = "int" if canon == "transpose" else target._overloadname
    return getattr(getattr(aten, canon), overload, None)


def canonicalize_aliases(gm: fx.GraphModule) -> fx.GraphModule:
    """Retarget aliased ATen ops to their canonical op (``aten.multiply.Tensor`` -> ``aten.mul.Tensor``), so the
    sharding rules (registered for the canonical ops) see them instead of an unknown op."""
    changed = False
    for node in gm.graph.nodes:
        if node.op == "call_function" and (canon := _canonical(node.target)) is not None:
            node.target = canon
            changed = True
    if changed:
        gm.recompile()
    return gm


def _copy_value(node: fx.Node) -> tuple[fx.Node, torch.dtype | None] | None:
    """``aten.copy(dst, src)`` with ``src`` already of ``dst``'s shape: its value is ``src`` (in ``dst``'s dtype).

    Functionalizing ``x[..., :d].copy_(y)`` leaves ``copy(slice, y)`` feeding a ``slice_scatter``; only
    ``y``'s values matter, and eager autograd has no derivative for the functional ``copy``."""
    if len(node.args) < 2:
        return None
    dst, src = node.args[:2]
    dv = dst.meta.get("val") if isinstance(dst, fx.Node) else None
    sv = src.meta.get("val") if isinstance(src, fx.Node) else None
    if not isinstance(dv, torch.Tensor) or not isinstance(sv, torch.Tensor) or dv.device != sv.device \
            or dv.ndim != sv.ndim or not all(map(_same_size, dv.shape, sv.shape)):
        return None
    return src, (dv.dtype if dv.dtype != sv.dtype else None)  # type: ignore[return-value]


def _type_as_value(node: fx.Node) -> tuple[fx.Node, torch.dtype | None] | None:
    """``x.type_as(other)``: its value is x in other's dtype. ``other`` is read for its (static) dtype only, so it
    should not tie x's layout to its own (a rule would otherwise treat it as a pointwise operand)."""
    x, other = node.args[:2]
    ov = other.meta.get("val") if isinstance(other, fx.Node) else None
    return (x, ov.dtype) if isinstance(ov, torch.Tensor) else None  # type: ignore[return-value]


# op -> (node -> the value it stands for and the dtype to cast it to, or None to keep the node)
_VALUE_OPS: dict[Any, Callable[[fx.Node], tuple[fx.Node, torch.dtype | None] | None]] = {
    aten.copy.default: _copy_value,
    aten.type_as.default: _type_as_value,
}


def simplify_value_ops(gm: fx.GraphModule) -> fx.GraphModule:
    """Replace ops that only forward one operand's values (``_VALUE_OPS``) by that operand, cast if needed."""
    changed = False
    for node in list(gm.graph.nodes):
        rewrite = _VALUE_OPS.get(node.target) if node.op == "call_function" else None
        found = rewrite(node) if rewrite is not None else None
        if found is None:
            continue
        value, dtype = found
        if dtype is not None:
            with gm.graph.inserting_before(node):
                value = gm.graph.call_function(aten._to_copy.default, (value,), {"dtype": dtype})
                value.meta = dict(node.meta)
        node.replace_all_uses_with(value)
        gm.graph.erase_node(node)
        changed = True
    if changed:
        gm.recompile()
    return gm


_CONST_COPIES = {aten.clone.default, aten.lift_fresh_copy.default, aten._to_copy.default, aten.alias.default}


def _constant(gm: fx.GraphModule, node: Any) -> torch.Tensor | None:
    """The value of a constant tensor in the graph (a lifted constant, possibly copied), else None."""
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in _CONST_COPIES:
        node = node.args[0]
    if not isinstance(node, fx.Node) or node.op != "get_attr" or not isinstance(node.target, str):
        return None
    obj: Any = gm
    for part in node.target.split("."):
        obj = getattr(obj, part, None)
    return None if isinstance(obj, torch.nn.Parameter) or not isinstance(obj, torch.Tensor) else obj


def index_to_slice(gm: fx.GraphModule) -> fx.GraphModule:
    """``x[..., [a, a+1, ..], :]`` (advanced indexing of one dim by a constant run of positions) is the slice
    ``x[..., a:a+n, :]``. Falcon's multi-query attention picks its key and value heads out of the fused
    projection so (``[-2]``, ``[-1]``); as a slice, the shard rules see which segment of a split dim it takes."""
    changed = False
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not aten.index.Tensor:
            continue
        x, indices = node.args[:2]
        pos = [k for k, i in enumerate(indices) if i is not None]
        xv = _val(x)
        if len(pos) != 1 or xv is None or pos[0] >= xv.ndim:
            continue
        d = pos[0]
        c = _constant(gm, indices[d])
        size = xv.shape[d]
        if c is None or c.ndim != 1 or c.numel() == 0 or c.dtype not in (torch.int64, torch.int32):
            continue
        idx = c.tolist()
        if any(v < 0 for v in idx):  # negative positions count from a size that must then be static
            if not isinstance(size, int):
                continue
            idx = [v + size if v < 0 else v for v in idx]
        if any(v < 0 or (isinstance(size, int) and v >= size) for v in idx) \
                or idx != list(range(idx[0], idx[0] + len(idx))):
            continue
        with gm.graph.inserting_before(node):
            sl = gm.graph.call_function(aten.slice.Tensor, (x, d, idx[0], idx[0] + len(idx)))
        sl.meta = dict(node.meta)
        node.replace_all_uses_with(sl)
        gm.graph.erase_node(node)
        changed = True
    if changed:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return gm


def _call(g: fx.Graph, like: fx.Node, fake: Any, target: Any, *args: Any, **kwargs: Any) -> fx.Node:
    """A new node computing ``target(*args, **kwargs)``, its ``val`` from the fake tensors, its module path
    from ``like``."""
    node = g.call_function(target, args, kwargs)
    node.meta = {k: v for k, v in like.meta.items() if k in ("nn_module_stack", "stack_trace", "source_fn_stack")}
    with fake:
        node.meta["val"] = target(*fx.map_arg(args, lambda a: a.meta["val"]),
                                  **fx.map_arg(kwargs, lambda a: a.meta["val"]))
    return node


_BMM = {aten.bmm.default, aten.baddbmm.default}
_RESHAPES = {aten.reshape.default, aten.view.default, aten._unsafe_view.default}
_UNARY = {aten.to.dtype, aten._to_copy.default, aten.clone.default, aten.contiguous.default,
          aten.alias.default, aten.dropout.default}


def _val(node: Any) -> torch.Tensor | None:
    v = node.meta.get("val") if isinstance(node, fx.Node) else None
    return v if isinstance(v, torch.Tensor) else None


def _same_sizes(a: Any, b: Any) -> bool:
    return len(a) == len(b) and all(sympy.simplify(sym(x) - sym(y)) == 0 for x, y in zip(a, b, strict=True))


def _unmerged(node: Any, lead: tuple | None) -> tuple[list[Any], tuple] | None:
    """How to rebuild ``node`` (``[M, a, b]``, ``M`` a product of batch dims) with its batch dims unmerged:
    ``(ops, lead)`` where ``ops`` applied innermost-first to a source node give ``[*lead, a, b]`` (or a shape
    broadcasting to it). ``lead`` must equal the other operands' when given. None if ``node`` is not such a
    merge."""
    v = _val(node)
    if v is None or v.ndim != 3:
        return None
    if node.target in _RESHAPES:
        src = _val(node.args[0])
        if src is None or src.ndim < 4 or not _same_sizes(src.shape[-2:], v.shape[1:]):
            return None
        k = tuple(src.shape[:-2])
        if sympy.simplify(sympy.Mul(*map(sym, k)) - sym(v.shape[0])) != 0 or (lead and not _same_sizes(k, lead)):
            return None
        return [("src", node.args[0])], k
    if node.target is aten.transpose.int and {node.args[1] % 3, node.args[2] % 3} == {1, 2}:
        inner = _unmerged(node.args[0], lead)
        return (inner[0] + [("transpose", None)], inner[1]) if inner else None
    if node.target is aten.repeat.default and lead is not None and len(lead) == 2:
        # repeat(x [n, a, b], [B, 1, 1]) tiles x B times: [B*n, ...] is [B, n, ...] with x broadcast over B
        src, reps = _val(node.args[0]), node.args[1]
        if src is None or src.ndim != 3 or list(reps[1:]) != [1, 1] or not _same_sizes(src.shape[:1], lead[1:]):
            return None
        return [("src", node.args[0]), ("unsqueeze", None)], lead
    if node.target in _UNARY:
        inner = _unmerged(node.args[0], lead)
        return (inner[0] + [("unary", node)], inner[1]) if inner else None
    return None


def _build(g: fx.Graph, like: fx.Node, ops: list[Any], fake: Any) -> fx.Node:
    """Apply ``_unmerged``'s ops to its source node."""
    cur: fx.Node = ops[0][1]
    for kind, ref in ops[1:]:
        if kind == "transpose":
            cur = _call(g, like, fake, aten.transpose.int, cur, -2, -1)
        elif kind == "unsqueeze":
            cur = _call(g, like, fake, aten.unsqueeze.default, cur, 0)
        else:
            cur = _call(g, ref, fake, ref.target, cur, *ref.args[1:], **ref.kwargs)
    return cur


def unflatten_batched_matmuls(gm: fx.GraphModule) -> fx.GraphModule:
    """``bmm`` / ``baddbmm`` over batch dims merged into one (``[B*n, S, d]``, BLOOM's heads folded into the
    batch) -> ``matmul`` over the unmerged dims (``[B, n, S, d]``).

    With a run-time batch size the merged dim ``B*n`` has no static layout in which the head factor ``n`` could
    stay split, so every weight feeding it would be replicated. Unmerged, the heads are an ordinary dim.
    An operand qualifies if it is a reshape of a ``[*lead, a, b]`` value (through transposes of its last two
    dims and dtype casts), or ``x [n, a, b]`` repeated over the batch (tiled, BLOOM's alibi); every operand must
    unmerge to the same ``lead``. The result replaces reshapes of the output back to ``[*lead, m, p]``; other
    users get the merged shape."""
    from torch._guards import detect_fake_mode

    g = gm.graph
    changed = False
    for node in list(g.nodes):
        if node.op != "call_function" or node.target not in _BMM or node.kwargs.get("out") is not None:
            continue
        batched = node.target is aten.baddbmm.default
        a_i = 1 if batched else 0
        first = _unmerged(node.args[a_i], None)
        if first is None:
            continue
        lead = first[1]
        plans = [_unmerged(x, lead) for x in node.args[: a_i + 2]]
        if any(p is None for p in plans):
            continue
        beta = node.kwargs.get("beta", node.args[3] if len(node.args) > 3 else 1)
        alpha = node.kwargs.get("alpha", node.args[4] if len(node.args) > 4 else 1)
        fake = detect_fake_mode([_val(x) for x in node.args[: a_i + 2]])
        if fake is None:
            continue
        with g.inserting_before(node):
            ops = [_build(g, node, p[0], fake) for p in plans]  # type: ignore[index]
            out = _call(g, node, fake, aten.matmul.default, ops[a_i], ops[a_i + 1])
            if batched:  # baddbmm: beta * input + alpha * (b1 @ b2)
                if alpha != 1:
                    out = _call(g, node, fake, aten.mul.Tensor, out, alpha)
                c = ops[0] if beta == 1 else _call(g, node, fake, aten.mul.Tensor, ops[0], beta)
                out = _call(g, node, fake, aten.add.Tensor, c, out)
            full = tuple(out.meta["val"].shape)
            merged = None
            for user in list(node.users):
                uv = _val(user)
                if user.target in _RESHAPES and uv is not None and _same_sizes(uv.shape, full):
                    user.replace_all_uses_with(out)
                    g.erase_node(user)
                    continue
                if merged is None:
                    with g.inserting_after(out):
                        merged = g.call_function(aten.flatten.using_ints, (out, 0, len(lead) - 1))
                    merged.meta = dict(node.meta)
                user.replace_input_with(node, merged)
        olds = list(node.args)
        g.erase_node(node)
        _erase_unused(g, olds)
        changed = True
    if changed:
        gm.recompile()
    return gm


def _erase_unused(g: fx.Graph, nodes: list[Any]) -> None:
    """Erase the merged operands' reshape chains that nothing uses any more."""
    while nodes:
        n = nodes.pop()
        if isinstance(n, fx.Node) and n.op == "call_function" and not n.users \
                and (n.target in _UNARY or n.target in _RESHAPES or n.target is aten.transpose.int):
            nodes.extend(n.all_input_nodes)
            g.erase_node(n)


_VARIANCE = {aten.var.default, aten.var.dim, aten.var.correction, aten.std.default, aten.std.dim,
             aten.std.correction}


def decompose_variance(gm: fx.GraphModule) -> fx.GraphModule:
    """``var`` / ``std`` -> two passes of means: ``sum((x - mean(x))**2) / (N - correction)`` (``sqrt`` for std).

    A mean over a sharded dim is a partial sum (one all-reduce of the reduced values); a fused ``var`` over it
    has no such form and would replicate everything feeding it (Gemma 3n's top-k activation sparsity takes
    the std over the MLP's intermediate dim). Reduced sizes must be static; the two-pass form is as accurate
    as the fused kernel."""
    from torch._guards import detect_fake_mode

    g = gm.graph
    changed = False
    for node in list(g.nodes):
        if node.op != "call_function" or node.target not in _VARIANCE:
            continue
        x = node.args[0]
        xv = _val(x)
        fake = detect_fake_mode([xv]) if xv is not None else None
        if fake is None:
            continue
        overload = node.target._overloadname  # type: ignore[union-attr]
        if overload == "default":
            dims, corr, keepdim = None, 1 if (node.args[1] if len(node.args) > 1 else node.kwargs.get("unbiased", True)) else 0, False
        elif overload == "dim":
            a = list(node.args) + [None] * 4
            dims = a[1]
            unbiased = a[2] if a[2] is not None else node.kwargs.get("unbiased", True)
            keepdim = a[3] if a[3] is not None else node.kwargs.get("keepdim", False)
            corr = 1 if unbiased else 0
        else:
            dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
            c = node.kwargs.get("correction")
            corr, keepdim = (1 if c is None else c), bool(node.kwargs.get("keepdim", False))
        dims = list(range(xv.ndim)) if dims is None else [d % xv.ndim for d in dims]  # type: ignore[union-attr]
        sizes = [xv.shape[d] for d in dims]  # type: ignore[union-attr]
        if any(isinstance(s_, torch.SymInt) for s_ in sizes):
            continue
        n = 1
        for s_ in sizes:
            n *= int(s_)
        with g.inserting_before(node):
            mean = _call(g, node, fake, aten.mean.dim, x, dims, True)
            dev = _call(g, node, fake, aten.sub.Tensor, x, mean)
            sq = _call(g, node, fake, aten.mul.Tensor, dev, dev)
            total = _call(g, node, fake, aten.sum.dim_IntList, sq, dims, bool(keepdim))
            out = _call(g, node, fake, aten.div.Tensor, total, max(n - corr, 0))
            if node.target.overloadpacket is aten.std:  # type: ignore[union-attr]
                out = _call(g, node, fake, aten.sqrt.default, out)
        node.replace_all_uses_with(out)
        g.erase_node(node)
        changed = True
    if changed:
        gm.recompile()
    return gm


def relax_views(gm: fx.GraphModule) -> fx.GraphModule:
    """``view`` -> ``reshape`` in a functionalized graph (run only on those: see ``stages.normalize``).

    Functionalization turns reshapes into views where the traced strides allowed it; a rank's local tensors
    may be laid out otherwise, and with no writes left in the graph a view may as well be a reshape."""
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target in (aten.view.default, aten._unsafe_view.default):
            node.target = aten.reshape.default
    gm.recompile()
    return gm


def run_passes(gm: fx.GraphModule, passes: list[Pass], timings: dict[str, float] | None = None) -> fx.GraphModule:
    """Each pass in order, the graph linted after it; ``timings[pass name]`` += its seconds."""
    for p in passes:
        t0 = time.perf_counter()
        gm = p(gm)
        gm.graph.lint()
        dt = time.perf_counter() - t0
        if timings is not None:
            timings[p.__name__] = timings.get(p.__name__, 0.0) + dt
        log.debug("pass %s: %.3f s, %d nodes", p.__name__, dt, len(gm.graph.nodes))
    return gm


CLEANUPS: list[Pass] = [inline_grad_regions, canonicalize_aliases, simplify_value_ops, index_to_slice, decompose_bias,
                        decompose_variance, unflatten_batched_matmuls]
