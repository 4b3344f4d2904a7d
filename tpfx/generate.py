"""Text generation on a sharded model: transformers' ``GenerationMixin`` drives, tpfx runs the steps.

``sharded.generate(...)`` is transformers' own ``generate`` (greedy, beam search, sampling, stopping
criteria, streamers, ``return_dict_in_generate``) run on a shallow copy of the original model whose
``forward`` is replaced by two per-rank graphs, planned with the module's one set of weight placements:

- *prefill*: the prompt in; the logits of its last position and every layer's keys and values out;
- *decode*: one token and the cache in; its logits and the grown cache out. The cache length is a dynamic
  dim, so one graph serves every step (and ``compile=True`` compiles it once).

The cache stays split the way attention is. A layer's keys and values leave the prefill graph in the
placement propagation gave them (KV heads split over the ranks, or replicated within groups when the ranks
outnumber the KV heads) and are returned as this rank's slice (``emit(local_outputs=...)``); the decode
graph is planned with those inputs fed in the same placement (``propagate(fed=...)``), so its cache
concatenation is local and no rank ever holds another rank's heads. A decode graph whose cache would
leave in another layout than it came in is refused (an error, not a silent gather).

Every rank runs the same decoding loop on the same (gathered) logits. What keeps them in step:

- the arguments (shapes, token ids, options) are digested and compared across ranks before anything runs;
- the random state of rank 0 is given to every rank, so sampling draws the same tokens everywhere;
- the generated tokens are compared across ranks at the end (a divergence raises instead of a later hang).

The cache object is ``SplitCache``, a ``DynamicCache`` whose layers hold this rank's keys and values at full
length (sliding-window layers too: the window is applied by the attention mask, as in the unsharded model,
so the graph has no length-dependent branches). Beam search reorders it with ``DynamicCache``'s own
``reorder_cache`` (batch rows, which every rank holds whole).
"""

from __future__ import annotations

import copy
import functools
import inspect
from typing import Any

import torch
import torch.fx as fx
from torch.utils._pytree import tree_flatten
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from tpfx.agreement import agree, describe, refuse_random
from tpfx.derive import derive
from tpfx.multimodal import attach, step_inputs
from tpfx.passes import Placement, Replicate, Shard, Stages, is_guards

__all__ = ["SplitCache", "generate"]


class SplitLayer(DynamicLayer):
    """One layer's keys and values ``(B, n_kv/t, L, d)``, grown by concatenation.

    ``window``: a sliding-window layer keeps only its last ``window - 1`` positions (what the next query can
    see), as transformers' ``DynamicSlidingWindowLayer`` does; it is trimmed between steps (``SplitCache.fill``),
    never inside a graph, so the graphs have no length-dependent branch."""

    def __init__(self, keys: torch.Tensor | None = None, values: torch.Tensor | None = None,
                 window: int | None = None) -> None:
        super().__init__()
        self.keys, self.values = keys, values  # type: ignore[assignment]
        self.is_initialized = keys is not None
        self.window = window
        self.is_sliding = window is not None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if self.keys is not None and self.values is not None:
            key_states = torch.cat([self.keys, key_states], dim=-2)  # (B, n_kv/t, L + S, d)
            value_states = torch.cat([self.values, value_states], dim=-2)
        self.keys, self.values, self.is_initialized = key_states, value_states, True
        return key_states, value_states

    def get_seq_length(self) -> Any:
        """Positions held (a sliding-window layer holds fewer than were seen)."""
        return 0 if self.keys is None else self.keys.shape[-2]

    def trim(self) -> None:
        keys, values = self.keys, self.values
        if self.window is not None and keys is not None and values is not None and keys.shape[-2] > self.window - 1:
            self.keys, self.values = keys[..., -(self.window - 1):, :], values[..., -(self.window - 1):, :]


def _row_major(t: torch.Tensor) -> torch.Tensor:
    """``t`` with the strides ``torch.empty`` gives its shape (``contiguous()`` keeps the odd stride of a size-1
    dim, such as one local KV head)."""
    return t if t.stride() == torch.empty(t.shape, device="meta").stride() else t.clone(memory_format=torch.contiguous_format)


def layer_windows(config: Any) -> list[int | None]:
    """Each decoder layer's sliding window (``None``: full attention), from transformers' own layer typing."""
    from transformers.cache_utils import get_layer_types_and_kwargs

    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    types, kwargs = get_layer_types_and_kwargs(text)
    return [kw.get("sliding_window") if kind == "sliding_attention" else None for kind, kw in zip(types, kwargs)]


class SplitCache(DynamicCache):
    """The KV cache of a sharded model: one layer of this rank's heads per window in ``windows``."""

    def __init__(self, windows: list[int | None], tensors: tuple[torch.Tensor, ...] = (), seen: Any = 0) -> None:
        self.split = [SplitLayer(tensors[2 * i] if tensors else None, tensors[2 * i + 1] if tensors else None, w)
                      for i, w in enumerate(windows)]
        self.seen = seen  # tokens before this step: a symbolic size inside a graph
        Cache.__init__(self, layers=list(self.split))

    def get_seq_length(self, layer_idx: int = 0) -> Any:
        """Tokens seen so far (sliding-window layers keep fewer)."""
        return self.seen

    def get_mask_sizes(self, query_length: int, layer_idx: int) -> tuple[Any, Any]:
        """(keys attended, position of the first): a sliding-window layer's kept window, after the positions
        dropped from it; every position for the others."""
        held = self.split[layer_idx].get_seq_length()
        return held + query_length, (self.seen - held if self.split[layer_idx].window is not None else 0)

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """Keys and values of every layer, flattened ``(k0, v0, k1, v1, ...)``; empty before the prefill."""
        out = tuple(t for layer in self.split for t in (layer.keys, layer.values) if t is not None)
        return out if len(out) == 2 * len(self.split) else ()

    def fill(self, tensors: tuple[torch.Tensor, ...], new_tokens: int) -> None:
        """Hold a step's keys and values: sliding-window layers trimmed to their window, all with row-major
        strides (the prefill's are transposed views, and trimmed ones slices, whose strides a compiled decode
        step would otherwise be specialized to, and recompiled for once the cache grows)."""
        for i, layer in enumerate(self.split):
            layer.keys, layer.values = tensors[2 * i], tensors[2 * i + 1]
            layer.trim()
            layer.keys, layer.values = _row_major(layer.keys), _row_major(layer.values)
            layer.is_initialized = True
        self.seen += new_tokens

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last ``-tokens_to_remove`` positions (assisted decoding's rejected candidates), as
        ``DynamicCache.crop`` does; a sliding-window layer that already dropped positions cannot roll back."""
        n = abs(int(tokens_to_remove))
        if n == 0:
            return
        for layer in self.split:
            if layer.window is not None and layer.get_seq_length() < self.seen:
                raise NotImplementedError("tpfx.generate: assisted decoding (assistant_model=, "
                                          "prompt_lookup_num_tokens=) past a sliding window is not supported")
        for layer in self.split:
            if layer.keys is not None and layer.values is not None:
                layer.keys, layer.values = layer.keys[..., :-n, :], layer.values[..., :-n, :]
        self.seen -= n

    @property
    def nbytes(self) -> int:
        """Bytes this rank's cache holds."""
        return sum(t.numel() * t.element_size() for t in self.tensors())


class CacheStep(torch.nn.Module):
    """The model's forward with the cache as explicit tensors: ``(logits, (k0, v0, ...))``. Shares the model's
    parameters, buffers and submodules (the same FQNs), so its graph plans with the model's weight pins."""

    _hf: Any

    def __init__(self, model: torch.nn.Module, windows: list[int | None]) -> None:
        super().__init__()
        self.__dict__["_hf"] = model
        for attr in ("_modules", "_parameters", "_buffers", "_non_persistent_buffers_set"):
            self.__dict__[attr] = model.__dict__[attr]
        self.windows = windows
        self.cache_arg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.logits = 1  # positions whose logits a step returns (assisted decoding checks several): a constant
        self.mask_spans_cache = True  # attention_mask covers the cached positions and the new ones
        self.output_classes: dict[str, Any] = {}  # modality -> transformers' features output (tpfx.multimodal)

    def growing(self, n: int) -> range:
        """Which of the ``n`` cache tensors grow by a step's tokens (every one: keys and values per layer)."""
        return range(n)

    def forward(self, input_ids: torch.Tensor, past: tuple[torch.Tensor, ...], attention_mask: torch.Tensor,
                position_ids: torch.Tensor | None = None, mm: dict[str, dict[str, Any]] | None = None,
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        seen = attention_mask.shape[-1] - input_ids.shape[1]  # tokens before this step (a symbolic size)
        cache = SplitCache(self.windows, past, seen)
        extra: dict[str, Any] = {"logits_to_keep": self.logits} if self.keep else {}  # 0: every position
        if mm:  # image features for the prompt step (tpfx.multimodal), as transformers' output objects
            extra["mm_encoder_outputs"] = {m: self.output_classes[m](**fields) for m, fields in mm.items()}
        out = self._hf(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       use_cache=True, **{self.cache_arg: cache}, **extra)
        logits = out.logits if self.keep or not self.logits else out.logits[:, -self.logits:]  # (B, logits, V)
        if not cache.tensors():
            raise NotImplementedError("tpfx.generate: a layer of this model keeps no keys/values of its own "
                                      "(shared or linear-attention caches are not supported yet)")
        return logits, cache.tensors()


def _cache_outputs(gm: fx.GraphModule, prop: Any) -> tuple[list[Placement], frozenset[int], list[int | None]]:
    """For the graph's cache outputs (every output leaf after the logits): their placements, which of them leave
    as this rank's slice (the split ones; anything else is made ``Replicate`` by emission), and each split one's
    full size along its split dim (to rebuild full-shape examples for the next capture)."""
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    leaves, _ = tree_flatten(out.args[0])
    pls = [prop.placements.get(a, Replicate()) for a in leaves[1:]]
    pls = [p if isinstance(p, Shard) else Replicate() for p in pls]
    full = [int(a.meta["val"].shape[p.dim]) if isinstance(p, Shard) else None for a, p in zip(leaves[1:], pls)]
    return pls, frozenset(i + 1 for i, p in enumerate(pls) if isinstance(p, Shard)), full


def _full_like(local: torch.Tensor, placement: Placement, full: int | None, device: Any) -> torch.Tensor:
    """A zero tensor of the full shape that this rank's slice ``local`` is part of."""
    shape = list(local.shape)
    if isinstance(placement, Shard) and full is not None:
        shape[placement.dim] = full
    return torch.zeros(shape, dtype=local.dtype, device=device)


class Decoder:
    """The prefill and decode graphs of one ``ShardedModule``, captured per batch size on first use."""

    def __init__(self, sharded: Any, step: CacheStep | None = None) -> None:
        self.sharded = sharded
        self.step = step if step is not None else CacheStep(sharded.tree, layer_windows(sharded.config))
        self.windows = self.step.windows
        self.cache_layout: dict[int, list[Placement]] = {}  # batch size -> placement of each cache tensor
        self.full_sizes: dict[int, list[int | None]] = {}  # batch size -> full size of each along its split dim
        self.guards: dict[Any, tuple[Any, list[str]]] = {}  # graph key -> (export's guards, their inputs)
        self.state = 0  # the tree's state key, taken once per generate call (tpfx.tree)

    def _graph(self, phase: str, args: tuple, kwargs: dict[str, Any],
               exact_only: bool = False) -> tuple[Any, Any]:
        """The ``(graph, runner)`` serving these inputs and the export guards it must pass (captured on first
        use). ``exact_only``: a graph for these exact shapes (where the general one's guards refused them)."""
        sm, (ids, past) = self.sharded, args
        batch = int(ids.shape[0])
        base = ("generate", self.state, phase, batch, int(ids.shape[1]) == 1, self.step.logits, *signature(kwargs))
        exact = (*base, int(ids.shape[1]), int(past[0].shape[-2]) if past else 0)  # for a static capture
        for key in (exact,) if exact_only else (base, exact):
            if (entry := sm.graph(key)) is not None:
                return entry, self.guards.get(key)
        given, grown = (args, kwargs), False
        if phase == "decode":  # capture on full-shape stand-ins for this rank's slices of the cache
            args = (ids, self._full(past, past[0].device))
            if not exact_only:  # export treats sizes 0 and 1 as constants: a cache of 2 stands for every length
                args, kwargs, grown = self._grown(args, kwargs)
        fed = (lambda gm: self._fed(gm, batch)) if phase == "decode" else None
        stages = Stages(blocks=False)  # each layer reads its own cache inputs, which stitching does not map
        with sm.capturing():  # the tree, with full-shape stand-ins for its parameters
            plan, dynamic = derive(self.step, args, kwargs, sm.world_size, sm.pins(), stages=stages, fed=fed,
                                   warn=False)
        assert plan.derivation is not None
        if grown and not dynamic:  # a static graph of the stand-in's shapes serves nothing: capture the real ones
            return self._graph(phase, *given, exact_only=True)
        gm, prop = plan.derivation.gm, plan.derivation.prop
        key = base if dynamic and not exact_only else exact
        layout, local, full = _cache_outputs(gm, prop)
        if phase == "prefill":
            self.cache_layout[batch], self.full_sizes[batch] = layout, full
            agree(sm.group, [str(p) for p in layout], "the KV cache layout")
        elif layout != self.cache_layout[batch]:
            raise RuntimeError(f"tpfx.generate: the decode graph would return its cache as {layout} but takes it "
                               f"as {self.cache_layout[batch]}; refusing to generate with a cache that changes "
                               "layout between steps")
        guard = next((n for n in gm.graph.nodes if is_guards(n)), None)
        if fed and guard is not None:  # emission drops it (it reads full shapes): run it on meta stand-ins
            self.guards[key] = (gm.get_submodule("_guards_fn"), [a.name for a in guard.args])
        sm.add_graph(plan, key, local_outputs=local)
        return sm.graph(key), self.guards.get(key)

    def _grown(self, args: tuple, kwargs: dict[str, Any]) -> tuple[tuple, dict[str, Any], bool]:
        """Decode inputs whose cache holds at least 2 positions (a mask that spans the cache grown alike), and
        whether they were grown."""
        ids, past = args
        growing = self.step.growing(len(past))
        grow = 2 - min(int(past[i].shape[-2]) for i in growing)
        if grow <= 0:
            return args, kwargs, False
        pad = [0, 0, grow, 0]  # positions before the held ones, along dim -2
        past = tuple(torch.nn.functional.pad(t, pad) if i in growing else t for i, t in enumerate(past))
        mask = kwargs.get("attention_mask")
        if self.step.mask_spans_cache and mask is not None:
            kwargs = {**kwargs, "attention_mask": torch.nn.functional.pad(mask, [grow, 0], value=1)}
        return (ids, past), kwargs, True

    def _full(self, past: tuple[torch.Tensor, ...], device: Any) -> tuple[torch.Tensor, ...]:
        batch = int(past[0].shape[0])
        return tuple(_full_like(t, p, n, device) for t, p, n in zip(past, self.cache_layout[batch],
                                                                    self.full_sizes[batch], strict=True))

    def _fed(self, gm: fx.GraphModule, batch: int) -> dict[str, Placement]:
        """The decode graph's cache inputs (``past_<i>``), fed in the layout the prefill graph left them in."""
        layout = self.cache_layout[batch]
        cache_in = [n.name for n in gm.graph.nodes if n.op == "placeholder" and n.name.startswith("past_")]
        if len(cache_in) != len(layout):
            raise RuntimeError(f"tpfx.generate: the decode graph has {len(cache_in)} cache inputs, expected "
                               f"{len(layout)}")
        return dict(zip(cache_in, layout, strict=True))

    def _passes(self, guard: Any, input_ids: torch.Tensor, past: tuple[torch.Tensor, ...],
                kwargs: dict[str, Any]) -> bool:
        """Whether export's shape checks accept these inputs (on the full shapes this rank's slices stand for)."""
        if guard is None:
            return True
        fn, names = guard
        env = {"input_ids": input_ids, **kwargs, **{f"past_{i}": t for i, t in enumerate(self._full(past, "meta"))}}
        try:
            fn(*[env[n] for n in names])
        except AssertionError:
            return False
        return True

    def run(self, input_ids: torch.Tensor, cache: Any, kwargs: dict[str, Any], keep: int = 1) -> torch.Tensor:
        """One step: ``input_ids`` and the step's other inputs (``kwargs``) in, the logits of its last ``keep``
        positions out, ``cache`` (a ``SplitCache`` or another cache with ``tensors`` and ``fill``) grown."""
        past = cache.tensors()
        self.step.logits = keep  # read when a graph is captured; part of every graph's key
        phase = "decode" if past else "prefill"
        if phase == "decode" and input_ids.shape[0] not in self.cache_layout:
            raise RuntimeError("tpfx.generate: a decode step for a batch size that had no prefill")
        entry, guard = self._graph(phase, (input_ids, past), kwargs)
        if not self._passes(guard, input_ids, past, kwargs):  # sizes the general graph was specialized away from
            entry, guard = self._graph(phase, (input_ids, past), kwargs, exact_only=True)  # (a 1-token prompt)
            if not self._passes(guard, input_ids, past, kwargs):
                raise RuntimeError("tpfx.generate: a graph captured for these exact shapes refuses them")
        refuse_random(self.sharded, entry[0])
        # (B, keep, V) on every rank; this rank's KV heads
        logits, new = self.sharded.call(entry, (input_ids, past), kwargs)
        cache.fill(tuple(new), int(input_ids.shape[1]))
        return logits


_UNSUPPORTED = ("inputs_embeds", "token_type_ids", "output_attentions", "output_hidden_states")


def refuse_unsupported(kwargs: dict[str, Any], names: tuple[str, ...] = _UNSUPPORTED) -> None:
    """``NotImplementedError`` naming the first of ``names`` the call sets (to anything but None or False)."""
    for name in names:
        value = kwargs.get(name)
        if value is not None and value is not False:
            raise NotImplementedError(f"tpfx.generate: {name}= is not supported yet")


def logits_kept(kwargs: dict[str, Any], input_ids: torch.Tensor, step: CacheStep) -> int:
    """How many positions' logits a step returns (0: all of them): transformers' ``logits_to_keep`` where the
    model's forward takes it (assisted decoding checks its candidates' logits), else all, as the unsharded
    forward returns them (generate reads the last, assisted decoding its candidates')."""
    keep = kwargs.pop("logits_to_keep", None)
    if not step.keep:
        return 0
    if keep is None:
        return 1
    return keep if isinstance(keep, int) and 0 < keep <= input_ids.shape[1] else 0


def signature(kwargs: dict[str, Any]) -> tuple:
    """What a captured graph fixes about a step's other inputs: which are None, and each tensor's dtype and
    size-1 dims (export treats sizes 1 as constants)."""
    out: list[Any] = []
    for k, v in sorted(kwargs.items()):
        if v is None:
            out.append(k)
        elif isinstance(v, torch.Tensor):
            out.append((k, str(v.dtype), tuple(i for i, d in enumerate(v.shape) if d == 1)))
    return tuple(out)


def _proxy(sharded: Any, decoder: Decoder) -> torch.nn.Module:
    """A shallow copy of the original model whose forward runs the per-rank graphs (same generation code,
    config and generation config as the model)."""
    model = sharded.tree
    proxy = copy.copy(model)

    @functools.wraps(model.forward)
    def forward(input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None, **kwargs: Any) -> Any:
        from transformers.modeling_outputs import CausalLMOutputWithPast

        cache = kwargs.pop("cache", None) or kwargs.pop("past_key_values", None)
        refuse_unsupported(kwargs)
        if not isinstance(cache, SplitCache) or input_ids is None:
            raise RuntimeError("tpfx.generate: the sharded model's forward runs only inside generate, with its "
                               "own SplitCache")
        if attention_mask is None:  # the graphs read the number of tokens seen from the mask's length
            attention_mask = torch.ones(input_ids.shape[0], cache.seen + input_ids.shape[1], dtype=torch.long,
                                        device=input_ids.device)
        steps = {"attention_mask": attention_mask, "position_ids": position_ids,
                 "mm": step_inputs(kwargs.pop("mm_encoder_outputs", None))}
        logits = decoder.run(input_ids, cache, steps, logits_kept(kwargs, input_ids, decoder.step))
        return CausalLMOutputWithPast(logits=logits, cache=cache)

    proxy.forward = forward  # type: ignore[method-assign]
    attach(proxy, sharded, decoder)  # vision-language models: the features graph
    return proxy


def generate(sharded: Any, *args: Any, **kwargs: Any) -> Any:
    """transformers' ``generate`` on a ``ShardedModule``: the same arguments and return value, identical on
    every rank. Collective: every rank of the group calls it with the same arguments."""
    if kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None \
            or kwargs.get("cache_implementation") is not None:
        raise ValueError("tpfx.generate keeps its own head-split KV cache (SplitCache); pass no cache= or "
                         "cache_implementation=")
    config = kwargs.get("generation_config") or next((a for a in args if hasattr(a, "max_time")), None) \
        or sharded.generation_config
    from transformers import MaxTimeCriteria

    timed = any(isinstance(c, MaxTimeCriteria) for c in kwargs.get("stopping_criteria") or ())
    if timed or kwargs.get("max_time") is not None or getattr(config, "max_time", None) is not None:
        raise NotImplementedError("tpfx.generate: max_time= is not supported: each rank's clock would stop it at "
                                  "another step (use max_new_tokens)")
    seq2seq = bool(getattr(sharded.config, "is_encoder_decoder", False))
    if seq2seq:
        from tpfx import seq2seq as s2s
    decoder: Decoder = sharded.attachment("decoder", lambda: Decoder(sharded, s2s.step(sharded) if seq2seq
                                                                     else None))
    sharded.check_params()  # as forward does: the parameters the graphs will be fed are this rank's slices
    decoder.state = sharded.state_key()
    agree(sharded.group, (describe(args), describe(kwargs)), "the arguments of generate", share_rng=True)
    proxy, cache = s2s.proxy(sharded, decoder) if seq2seq else (_proxy(sharded, decoder), SplitCache(decoder.windows))
    with torch.no_grad():
        kwargs["use_cache"] = True  # the config may say otherwise (training configs); the cache is the point
        out = proxy.generate(*args, cache=cache, **kwargs)  # type: ignore[operator]
    tokens = out if isinstance(out, torch.Tensor) else out.sequences
    agree(sharded.group, describe(tokens), "the generated tokens")
    return out
