"""transformers checkpoints in and out of a sharded model: reading slices (``tpfx.loading.from_pretrained``
builds on it) and ``save_pretrained``.

Loading never materializes the whole model: the model is built from ``config.json`` with parameters that
hold no memory (fake tensors on the rank's device; buffers such as rotary ``inv_freq`` are computed for
real, as transformers' own constructor computes them), planned, and every rank reads only its own slices of
every weight with safetensors' ``get_slice``, copied out of the file's map in small blocks (the file opened
per block, so its pages are unmapped as soon as they are copied): a rank's peak memory is its own slices plus
a block. Checkpoints that transformers stores in another layout than the model's parameters (per-expert MoE
weights that the model holds fused, renamed modules) go through transformers' own conversion mapping, one
converted parameter at a time (its full tensor is built, sliced, and dropped).

Saving gathers one tensor at a time to rank 0 (point-to-point from the ranks that hold a part nobody before
them holds) and streams it into the safetensors file it belongs to, so rank 0 holds at most one full tensor
beyond its own slices (one conversion group where transformers converts on save: a fused MoE tensor and the
per-expert tensors it is written back as). safetensors' writer takes every tensor of a file in memory at once, so the file is
written as the safetensors format lays it out (an 8-byte header length, the JSON header, the tensors' bytes
in header order) and read back by ``safe_open`` and transformers unchanged. Files go to a temporary
directory that is renamed into place when complete: a crash never leaves a half-written checkpoint under
the final name.

Every check that can fail on one rank's view (a missing file or tensor, a wrong shape, a truncated file)
runs before the first collective, and the save ends with every rank learning whether rank 0's writes
succeeded, so an error reaches every rank instead of leaving peers blocked in a collective.
"""

from __future__ import annotations

import datetime
import json
import math
import os
import shutil
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from safetensors import SafetensorError, safe_open
from torch._subclasses.fake_tensor import maybe_get_fake_mode

from tpfx.dtensor_params import local as local_of
from tpfx.passes import Placement, Shard

if TYPE_CHECKING:
    from tpfx.runtime.interface import Sharded as ShardedModule

__all__ = ["save_pretrained", "CheckpointError", "index_checkpoint", "match_tensors", "read_slice"]

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"

# safetensors' dtype names (the format's header vocabulary)
_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as asked (names the file and the tensor)."""


# ----------------------------------------------------------------------------------------- reading


@dataclass(frozen=True)
class TensorEntry:
    file: str
    key: str
    shape: tuple[int, ...]
    dtype: str  # safetensors' name, e.g. "F32"


def index_checkpoint(path: str | os.PathLike) -> dict[str, TensorEntry]:
    """Every tensor of a safetensors checkpoint directory (one file or an index json with several) by name,
    from the files' headers alone. Raises ``CheckpointError`` naming the file that is missing or unreadable."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"tpfx.from_pretrained: {str(root)!r} is not a directory")
    if (root / SINGLE).is_file():  # transformers' order: the single file first, then the index
        files = [SINGLE]
    elif (root / INDEX).is_file():
        weight_map: dict[str, str] = json.loads((root / INDEX).read_text())["weight_map"]
        files = sorted(set(weight_map.values()))
    else:
        raise FileNotFoundError(f"tpfx.from_pretrained: no {SINGLE} or {INDEX} in {str(root)!r}")
    out: dict[str, TensorEntry] = {}
    for name in files:
        file = root / name
        if not file.is_file():
            raise CheckpointError(f"tpfx.from_pretrained: {INDEX} names {name!r}, which is not in {str(root)!r}")
        try:
            with safe_open(file, "pt") as f:
                for key in f.keys():
                    sl = f.get_slice(key)
                    out[key] = TensorEntry(str(file), key, tuple(sl.get_shape()), sl.get_dtype())
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"tpfx.from_pretrained: cannot read {str(file)!r} (truncated or not a "
                                  f"safetensors file): {e}") from e
    return out


def _pieces(pl: Placement, shape: tuple[int, ...], rank: int, world: int) -> tuple[int | None, list[tuple[int, int]]]:
    """(dim, [(global start, length), ...]) of ``rank``'s slice; dim ``None``: the whole tensor."""
    if not isinstance(pl, Shard):
        return None, []
    return pl.dim, [(start, n) for start, n, _ in pl.pieces(rank, world)]


BLOCK_BYTES = 4 << 20  # a read copies at most this much at a time out of the file's map


def _row_blocks(rows: int, row_bytes: int) -> list[tuple[int, int]]:
    step = max(1, BLOCK_BYTES // max(row_bytes, 1))
    return [(r, min(step, rows - r)) for r in range(0, rows, step)]


def read_slice(entry: TensorEntry, pl: Placement, rank: int, world: int, dtype: torch.dtype,
               device: torch.device) -> torch.Tensor:
    """``rank``'s slice of one checkpoint tensor under ``pl``, read with ``get_slice`` (only its bytes).

    safetensors' tensors live in a copy-on-write map of the file, whose pages stay resident while the map is
    open. The slice is copied into memory of its own block by block, the file opened per block, so at most
    one block of the map is resident at a time and a later rewrite of the file can never change the weights."""
    dim, pieces = _pieces(pl, entry.shape, rank, world)
    if dim is None:
        dim, pieces = 0, [(0, entry.shape[0])] if entry.shape else []
    if not entry.shape:  # a scalar
        with safe_open(entry.file, "pt") as f:
            return f.get_tensor(entry.key).to(device=device, dtype=dtype).clone()
    local = list(entry.shape)
    local[dim] = sum(n for _, n in pieces)
    out = torch.empty(local, dtype=dtype, device=device)
    row_bytes = math.prod(local[1:]) * dtype.itemsize
    at = 0
    for start, n in pieces:
        dst = out.narrow(dim, at, n)
        at += n
        rows = n if dim == 0 else local[0]
        for r, k in _row_blocks(rows, row_bytes):
            index: tuple[slice, ...] = (slice(start + r, start + r + k),) if dim == 0 else \
                (slice(r, r + k),) + (slice(None),) * (dim - 1) + (slice(start, start + n),)
            with safe_open(entry.file, "pt") as f:
                dst.narrow(0, r, k).copy_(f.get_slice(entry.key)[index])
    return out


def _tied_names(model: torch.nn.Module) -> dict[str, list[str]]:
    """Canonical parameter FQN -> every name it has (tied weights: the embedding and the LM head)."""
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    return {names[0]: names for names in by_id.values()}


def canonical_names(model: torch.nn.Module) -> dict[str, str]:
    """Every name of a parameter -> its first name (a tied alias -> the parameter the sharded module registers)."""
    return {n: names[0] for names in _tied_names(model).values() for n in names}


def _candidates(names: list[str], prefix: str) -> Iterator[str]:
    for n in names:
        yield n
        if prefix and n.startswith(prefix + "."):
            yield n[len(prefix) + 1:]  # a base-model checkpoint loaded into a model with a head
        elif prefix:
            yield f"{prefix}.{n}"


@dataclass
class Conversion:
    """Parameters that transformers builds from checkpoint tensors stored another way (per-expert weights
    stacked into one fused tensor, renamed modules): its own converter, with the source keys it collects."""

    converter: Any
    target: str  # the first target name, as transformers keys the conversion
    sources: list[tuple[str, str]]  # (checkpoint key, source pattern)


def conversions(model: torch.nn.Module, entries: dict[str, TensorEntry]) -> dict[str, Conversion]:
    """Target parameter FQN -> the transformers conversion that produces it from checkpoint tensors, for the
    checkpoint keys that are not the model's own names (transformers' checkpoint conversion mapping for the
    model, matched with transformers' own renaming; no model-specific code here)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            WeightConverter,
            WeightRenaming,
            dot_natural_key,
            rename_source_key,
        )
    except ImportError:  # an older transformers without conversions: checkpoints use the model's names
        return {}
    from copy import deepcopy

    try:
        mapping = get_model_conversion_mapping(model)  # type: ignore[arg-type]
    except Exception:  # noqa: BLE001 - not a transformers model, or one without a mapping
        return {}
    renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
    converters = [m for m in mapping if isinstance(m, WeightConverter)]
    by_pattern = {k: c for c in converters for k in c.source_patterns}
    meta = model.state_dict()
    prefix = getattr(model, "base_model_prefix", None)
    groups: dict[str, Conversion] = {}
    renamed_only: dict[str, Conversion] = {}
    for key in sorted(entries, key=dot_natural_key):
        if key in meta:
            continue
        target, pattern = rename_source_key(key, renamings, converters, prefix, meta)
        if target not in meta:
            continue
        if pattern is None:
            renamed_only[target] = Conversion(None, target, [(key, "")])
        else:
            groups.setdefault(target, Conversion(deepcopy(by_pattern[pattern]), target, [])).sources.append(
                (key, pattern))
    out = dict(renamed_only)
    for conv in groups.values():
        first = conv.converter.target_patterns[0]
        for target in conv.converter.target_patterns:  # every parameter the conversion yields
            name = conv.target.replace(first, target) if target else conv.target
            if name in meta:
                out[name] = conv
    return out


def convert_full(model: torch.nn.Module, conv: Conversion, entries: dict[str, TensorEntry],
                 dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Run one transformers conversion on the full source tensors: {target FQN: full tensor}."""
    if conv.converter is None:  # renamed only
        key = conv.sources[0][0]
        with safe_open(entries[key].file, "pt") as f:
            return {conv.target: f.get_tensor(key).to(dtype)}
    from copy import deepcopy

    converter = deepcopy(conv.converter)
    for key, pattern in conv.sources:
        def load(key: str = key) -> torch.Tensor:
            with safe_open(entries[key].file, "pt") as f:
                return f.get_tensor(key).to(dtype)

        converter.add_tensor(conv.target, key, pattern, load)
    out = converter.convert(conv.target, model=model, config=getattr(model, "config", None))
    return {k: (v[0] if isinstance(v, list) else v) for k, v in out.items()}


def match_tensors(model: torch.nn.Module, entries: dict[str, TensorEntry], where: str
                  ) -> tuple[dict[str, TensorEntry], dict[str, Conversion]]:
    """The checkpoint tensor of every parameter of ``model`` (by FQN, tied names and transformers' base-model
    prefix), its shape checked against the model's, or the transformers conversion that builds it. Raises
    before anything is read or communicated."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    found: dict[str, TensorEntry] = {}
    converted: dict[str, Conversion] = {}
    missing: list[str] = []
    convs: dict[str, Conversion] | None = None
    for fqn, names in _tied_names(model).items():
        key = next((k for k in _candidates(names, prefix) if k in entries), None)
        if key is None:
            convs = conversions(model, entries) if convs is None else convs
            conv = next((convs[n] for n in names if n in convs), None)
            if conv is None:
                missing.append(fqn)
            else:
                converted[fqn] = conv
            continue
        entry, shape = entries[key], tuple(model.get_parameter(fqn).shape)
        if entry.shape != shape:
            raise CheckpointError(
                f"tpfx.from_pretrained: tensor {key!r} in {entry.file!r} has shape {list(entry.shape)}, but the "
                f"model built from {where}/config.json expects {list(shape)} for {fqn!r} (does the config match "
                "the weights?)")
        found[fqn] = entry
    if missing:
        raise CheckpointError(f"tpfx.from_pretrained: the checkpoint in {where!r} has no tensor for "
                              f"{len(missing)} parameter(s): {', '.join(missing[:5])}"
                              + (" ..." if len(missing) > 5 else ""))
    used = {e.key for e in found.values()} | {k for c in converted.values() for k, _ in c.sources}
    extra = [k for k in entries if k not in used and not k.endswith("inv_freq")]
    buffers = {n for n, _ in model.named_buffers()}
    extra = [k for k in extra if k not in buffers]
    if extra:
        warnings.warn(f"tpfx.from_pretrained: {len(extra)} tensor(s) in {where!r} match no parameter of the model "
                      f"and are ignored: {', '.join(extra[:5])}" + (" ..." if len(extra) > 5 else ""), stacklevel=3)
    return found, converted


# ----------------------------------------------------------------------------------------- loading


def _local_tensors(sharded: ShardedModule) -> dict[str, torch.Tensor]:
    """What this rank holds of every tensor the checkpoint stores, by the model's own names (its state dict
    order, tied duplicates dropped): the tree's parameters (this rank's slices, as registered now) and
    persistent buffers."""
    tree = sharded.tree
    canonical = canonical_names(tree)
    out: dict[str, torch.Tensor] = {}
    for name, value in tree.state_dict(keep_vars=True).items():
        fqn = canonical.get(name, name)
        if fqn in out or name in (getattr(tree, "_keys_to_ignore_on_save", None) or ()):
            continue
        t = local_of(value)
        if t.device.type == "meta" or maybe_get_fake_mode(t) is not None:
            raise RuntimeError(f"tpfx.save_pretrained: {fqn!r} has no weights on this rank (meta device)")
        out[fqn] = t.detach()
    return out


def full_shape(sharded: ShardedModule, fqn: str, local: torch.Tensor) -> tuple[int, ...]:
    """The unsharded shape of ``fqn``, whose local tensor (slice, or whole where it is not split) is ``local``."""
    pp = sharded.plan.placements.get(fqn)
    return tuple(pp.shape) if pp is not None and sharded.holds(fqn) else tuple(local.shape)


def _senders(pl: Placement, world: int) -> list[int]:
    """The ranks other than 0 whose pieces rank 0 needs: those that are the first to hold some piece."""
    if not isinstance(pl, Shard):
        return []
    return [r for r in range(1, world) if pl.owned_pieces(r, world)]


def _global(group: dist.ProcessGroup | None, rank: int) -> int:
    return dist.get_global_rank(group or dist.group.WORLD, rank)  # type: ignore[arg-type]


def _gather_full(sharded: ShardedModule, fqn: str, local: torch.Tensor) -> torch.Tensor | None:
    """The full tensor on rank 0 (``None`` elsewhere), assembled piece by piece from the ranks that hold a
    piece no lower rank holds. A piece along dim 0 is received straight into its place; others go through a
    buffer of the piece's size."""
    group, rank, world = sharded.group, sharded.rank, sharded.world_size
    pl = sharded.placement(fqn)
    if not isinstance(pl, Shard):
        return local if rank == 0 else None
    senders = _senders(pl, world)
    if dist.get_backend(group) == "threaded":  # ranks on threads of one process (tpfx.inprocess): no send/recv
        return _broadcast_full(sharded, fqn, local, pl, senders)
    if rank != 0:
        if rank in senders:
            for _, n, lstart in pl.owned_pieces(rank, world):
                piece = local.narrow(pl.dim, lstart, n).contiguous()
                dist.send(piece.view(-1).view(torch.uint8), dst=_global(group, 0), group=group)
        return None
    full = torch.empty(full_shape(sharded, fqn, local), dtype=local.dtype, device=local.device)
    for start, n, lstart in pl.pieces(0, world):
        full.narrow(pl.dim, start, n).copy_(local.narrow(pl.dim, lstart, n))
    for r in senders:
        for start, n, _ in pl.owned_pieces(r, world):
            dst = full.narrow(pl.dim, start, n)
            buf = dst if dst.is_contiguous() else torch.empty(dst.shape, dtype=dst.dtype, device=dst.device)
            dist.recv(buf.view(-1).view(torch.uint8), src=_global(group, r), group=group)
            if buf is not dst:
                dst.copy_(buf)
    return full


def _broadcast_full(sharded: ShardedModule, fqn: str, local: torch.Tensor, pl: Shard,
                    senders: list[int]) -> torch.Tensor | None:
    """``_gather_full`` by broadcasts (a group with no point-to-point): each sender's owned pieces in turn."""
    group, rank, world = sharded.group, sharded.rank, sharded.world_size
    shape = full_shape(sharded, fqn, local)
    full = torch.empty(shape, dtype=local.dtype, device=local.device) if rank == 0 else None
    if full is not None:
        for start, n, lstart in pl.pieces(0, world):
            full.narrow(pl.dim, start, n).copy_(local.narrow(pl.dim, lstart, n))
    for r in senders:
        for start, n, lstart in pl.owned_pieces(r, world):
            size = list(shape)
            size[pl.dim] = n
            buf = local.narrow(pl.dim, lstart, n).contiguous() if rank == r else \
                torch.empty(size, dtype=local.dtype, device=local.device)
            dist.broadcast(buf, src=_global(sharded.group, r), group=group)
            if full is not None:
                full.narrow(pl.dim, start, n).copy_(buf)
    return full


def _shard_files(specs: list[tuple[str, tuple[int, ...], torch.dtype]], max_bytes: int) -> list[list[int]]:
    """Tensor indexes per file: consecutive tensors while a file stays under ``max_bytes`` (as transformers)."""
    files: list[list[int]] = [[]]
    size = 0
    for i, (_, shape, dtype) in enumerate(specs):
        nbytes = math.prod(shape) * dtype.itemsize
        if files[-1] and size + nbytes > max_bytes:
            files.append([])
            size = 0
        files[-1].append(i)
        size += nbytes
    return files


def _header(specs: list[tuple[str, tuple[int, ...], torch.dtype]]) -> bytes:
    """The safetensors header for tensors stored back to back in this order (padded to 8 bytes)."""
    meta: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    off = 0
    for name, shape, dtype in specs:
        n = math.prod(shape) * dtype.itemsize
        meta[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    text = json.dumps(meta, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text


def _temp_dir(final: Path) -> Path:
    tmp = final.parent / f".{final.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir(parents=True)
    return tmp


def _commit(tmp: Path, final: Path) -> None:
    """Rename the complete ``tmp`` to ``final`` (an existing ``final`` is replaced, removed only afterwards)."""
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:8]}"
        final.rename(old)
    tmp.rename(final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _barrier(group: dist.ProcessGroup | None, timeout_s: float, what: str) -> None:
    """Every rank must reach ``what``; on gloo a rank that does not is named within ``timeout_s``."""
    if dist.get_backend(group) == "gloo":
        try:
            dist.monitored_barrier(group, timeout=datetime.timedelta(seconds=timeout_s))
        except RuntimeError as e:
            raise RuntimeError(f"tpfx: every rank must call {what} (it is collective): {e}") from e
    else:
        dist.barrier(group)


def save_pretrained(sharded: ShardedModule, save_directory: str | os.PathLike, *,
                    max_shard_size: int | str = "5GB", timeout_s: float = 300.0) -> None:
    """Write ``sharded`` as an unsharded transformers checkpoint (collective: call it on every rank).

    config.json (and generation_config.json where the model has one) and safetensors files with the model's
    own FQNs and full shapes; more than one file gets ``model.safetensors.index.json``. Tensors are gathered
    one at a time to rank 0, which writes them; the directory appears complete or not at all."""
    from transformers.utils.hub import convert_file_size_to_int

    sharded.check_own_params("save_pretrained")
    sharded.sync()
    group = sharded.group
    _barrier(group, timeout_s, "save_pretrained")
    local = _local_tensors(sharded)
    groups = saved_layout(sharded.tree, [(k, full_shape(sharded, k, v), v.dtype) for k, v in local.items()])
    specs = [spec for _, outputs in groups for spec in outputs]
    files = _shard_files(specs, convert_file_size_to_int(max_shard_size))
    stream = _saved_tensors(sharded, local, groups)
    names = [SINGLE] if len(files) == 1 else \
        [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))]
    error: str | None = None
    tmp: Path | None = None
    if sharded.rank == 0:
        try:
            tmp = _temp_dir(Path(save_directory))
            _write_configs(sharded.tree, tmp)
        except Exception as e:  # noqa: BLE001 - reported to every rank below
            error = f"{type(e).__name__}: {e}"
    for name, idx in zip(names, files):  # every rank takes part in every gather, even after rank 0 failed
        path = tmp / name if tmp is not None and error is None else None
        error = _write_file(stream, [specs[i] for i in idx], path, error)
    if sharded.rank == 0 and tmp is not None:
        try:
            if error is None:
                if len(files) > 1:
                    total = sum(math.prod(s) * d.itemsize for _, s, d in specs)
                    weight_map = {specs[i][0]: n for n, idx in zip(names, files) for i in idx}
                    (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": total},
                                                         "weight_map": weight_map}, indent=2, sort_keys=True))
                _commit(tmp, Path(save_directory))
        except Exception as e:  # noqa: BLE001
            error = f"{type(e).__name__}: {e}"
        finally:
            shutil.rmtree(tmp, ignore_errors=True)  # gone after a commit; a failed save leaves nothing
    status = [error]
    dist.broadcast_object_list(status, src=_global(group, 0), group=group)
    if status[0] is not None:
        raise RuntimeError(f"tpfx.save_pretrained: rank 0 could not write {str(save_directory)!r}: {status[0]}")


def _write_configs(model: torch.nn.Module, out: Path) -> None:
    config = getattr(model, "config", None)
    if config is not None:
        config.save_pretrained(out)
    gen = getattr(model, "generation_config", None)
    can = getattr(model, "can_generate", None)
    if gen is not None and callable(can) and can():
        gen.save_pretrained(out)


Spec = tuple[str, tuple[int, ...], torch.dtype]


def saved_layout(model: torch.nn.Module, specs: list[Spec]) -> list[tuple[list[str], list[Spec]]]:
    """The checkpoint layout transformers' ``save_pretrained`` writes for these tensors, as groups of (model
    tensors, the checkpoint tensors they become): transformers reverts its loading conversions when saving
    (a fused MoE ``experts.gate_up_proj`` is written back as one tensor per expert and projection), so the
    layout is found by running transformers' own ``revert_weight_conversion`` on meta tensors, group by
    group. Models without conversions get one group per tensor, under its own name."""
    identity = [([n], [(n, shape, dtype)]) for n, shape, dtype in specs]
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import (
            PrefixChange,
            WeightConverter,
            apply_converters,
            revert_weight_conversion,
        )

        conversions = getattr(model, "_weight_conversions", None) or [
            c for c in get_model_conversion_mapping(model, add_legacy=False)  # type: ignore[arg-type]
            if not isinstance(c, PrefixChange)]
    except Exception:  # noqa: BLE001 - not a transformers model, or an older transformers
        return identity
    if not conversions:
        return identity
    reverse = [c.reverse_transform() for c in conversions[::-1]]
    converters = [c for c in reverse if isinstance(c, WeightConverter)]
    order: dict[str, list[Spec]] = {}
    for spec in specs:  # the tensors one reverse converter collects go together, as transformers groups them
        key, pattern = apply_converters(spec[0], converters)
        order.setdefault(key if pattern is not None else spec[0], []).append(spec)
    groups = []
    for members in order.values():
        meta = {n: torch.empty(shape, dtype=dtype, device="meta") for n, shape, dtype in members}
        out = revert_weight_conversion(model, meta)  # type: ignore[arg-type]
        groups.append(([n for n, _, _ in members], [(k, tuple(v.shape), v.dtype) for k, v in out.items()]))
    return groups


def _saved_tensors(sharded: ShardedModule, local: dict[str, torch.Tensor],
                   groups: list[tuple[list[str], list[Spec]]]) -> Iterator[tuple[str, torch.Tensor | None]]:
    """Every checkpoint tensor in layout order: on rank 0 the full tensor, elsewhere ``None``. Each group's
    model tensors are gathered (a collective every rank takes part in), then converted back on rank 0."""
    from transformers.core_model_loading import revert_weight_conversion

    for inputs, outputs in groups:
        fulls = {n: _gather_full(sharded, n, local[n]) for n in inputs}
        if sharded.rank != 0:
            yield from ((name, None) for name, _, _ in outputs)
            continue
        if [n for n, _, _ in outputs] == inputs:
            yield from fulls.items()  # type: ignore[misc]
            continue
        converted = revert_weight_conversion(sharded.tree, fulls)  # type: ignore[arg-type]
        del fulls
        for name, _, _ in outputs:
            yield name, converted.pop(name)


def _write_file(stream: Iterator[tuple[str, torch.Tensor | None]], specs: list[Spec], path: Path | None,
                error: str | None) -> str | None:
    """Take the file's tensors from ``stream`` in order; rank 0 streams each into ``path`` as it arrives. Every
    rank takes part in every gather even after rank 0 failed (it reports the error afterwards), so none
    hangs."""
    f = None
    try:
        if path is not None:
            f = open(path, "wb")  # noqa: SIM115 - closed below, after every gather
            f.write(_header(specs))
        for name, shape, _ in specs:
            got, full = next(stream)
            assert got == name, (got, name)
            if f is not None and full is not None and error is None:
                try:
                    if tuple(full.shape) != shape:
                        raise RuntimeError(f"{name}: converted to shape {list(full.shape)}, expected {list(shape)}")
                    f.write(full.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().data)
                except Exception as e:  # noqa: BLE001
                    error = f"{type(e).__name__}: {e}"
            del full
        if f is not None:
            f.flush()
            os.fsync(f.fileno())
    finally:
        if f is not None:
            f.close()
    return error
