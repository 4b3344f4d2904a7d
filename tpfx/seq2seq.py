"""Generation for encoder-decoders (T5, BART, Marian, Pegasus, Whisper): the encoder runs once, the decoder per
token, both as per-rank graphs planned with the module's one set of weight placements.

transformers' ``generate`` calls the model's ``get_encoder()`` once, then the model with ``encoder_outputs`` and
an ``EncoderDecoderCache`` per step. The proxy model (``generate._proxy``'s twin) answers both:

- *encode*: the encoder as a graph of its own (``EncodeStep``): the main input (ids, log-mel features, pixels)
  and its mask in, the last hidden state out, whole on every rank;
- *decode steps*: ``DecodeStep`` feeds the decoder the encoder's states and the cache as explicit tensors —
  each layer's self-attention keys and values, then its cross-attention keys and values. The first step computes
  the cross-attention keys and values from the encoder's states (the cross cache is empty, so transformers'
  ``is_updated`` is false); later steps read them from the cache. Both caches leave split by heads, as
  propagation places them (``generate.Decoder``), and return in the layout they came in.

The cache object is ``SplitEncoderDecoderCache``: transformers' ``EncoderDecoderCache`` of two ``SplitCache``s,
so beam search reorders both with transformers' own code and assisted decoding crops the self-attention part.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import torch
from transformers.cache_utils import EncoderDecoderCache
from transformers.modeling_outputs import BaseModelOutput, Seq2SeqLMOutput

from tpfx.agreement import refuse_random
from tpfx.derive import derive
from tpfx.generate import (
    CacheStep,
    Decoder,
    SplitCache,
    logits_kept,
    refuse_unsupported,
    signature,
)
from tpfx.passes import Stages

__all__ = ["DecodeStep", "EncodeStep", "SplitEncoderDecoderCache", "proxy", "step"]


def decoder_layers(config: Any) -> int:
    """The decoder's layer count, from the config's own field for it (T5: ``num_decoder_layers``, BART and
    Whisper: ``decoder_layers``)."""
    for cfg in (config, config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config):
        for name in ("num_decoder_layers", "decoder_layers"):
            if isinstance(getattr(cfg, name, None), int):
                return int(getattr(cfg, name))
    return int(config.num_hidden_layers)


class SplitEncoderDecoderCache(EncoderDecoderCache):
    """Self- and cross-attention caches of this rank's heads, one layer of each per decoder layer."""

    def __init__(self, layers: int) -> None:
        self.mine, self.cross = SplitCache([None] * layers), SplitCache([None] * layers)
        super().__init__(self.mine, self.cross)

    @property
    def seen(self) -> Any:
        return self.mine.seen

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """Self-attention keys and values of every layer, then cross-attention ones; empty before the first step."""
        mine = self.mine.tensors()
        return mine + self.cross.tensors() if mine else ()

    def fill(self, tensors: tuple[torch.Tensor, ...], new_tokens: int) -> None:
        half = len(tensors) // 2
        self.mine.fill(tensors[:half], new_tokens)
        cross = self.cross
        cross.fill(tensors[half:], 0)
        cross.seen = int(tensors[half].shape[-2])  # the encoder's positions
        self.is_updated = dict.fromkeys(range(len(cross.split)), True)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())


class EncodeStep(torch.nn.Module):
    """The model's encoder: ``(main input, its mask)`` -> the last hidden state ``(B, S, H)``. Shares the model's
    parameters and submodules (the same FQNs), as ``CacheStep`` does."""

    _hf: Any

    def __init__(self, model: torch.nn.Module, name: str) -> None:
        super().__init__()
        self.__dict__["_hf"] = model
        for attr in ("_modules", "_parameters", "_buffers", "_non_persistent_buffers_set"):
            self.__dict__[attr] = model.__dict__[attr]
        self.name = name

    def forward(self, inputs: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        mask = {} if attention_mask is None else {"attention_mask": attention_mask}
        return self._hf.get_encoder()(**{self.name: inputs}, **mask, return_dict=True).last_hidden_state


class DecodeStep(CacheStep):
    """One decoder step with the caches as explicit tensors: ``(logits, (self k0, v0, ..., cross k0, v0, ...))``."""

    def growing(self, n: int) -> range:
        """The self-attention half (the cross-attention keys and values keep the encoder's length)."""
        return range(n // 2)

    def forward(self, input_ids: torch.Tensor, past: tuple[torch.Tensor, ...],  # type: ignore[override]
                encoder_hidden: torch.Tensor, attention_mask: torch.Tensor | None = None,
                ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        n = 2 * len(self.windows)
        mine, cross = past[:n], past[n:]
        caches = (SplitCache(self.windows, mine, mine[0].shape[-2] if mine else 0),
                  SplitCache(self.windows, cross, cross[0].shape[-2] if cross else 0))
        cache = EncoderDecoderCache(*caches)
        extra: dict[str, Any] = {"logits_to_keep": self.logits} if self.keep else {}  # 0: every position
        out = self._hf(decoder_input_ids=input_ids, encoder_outputs=BaseModelOutput(last_hidden_state=encoder_hidden),
                       attention_mask=attention_mask, use_cache=True, **{self.cache_arg: cache}, **extra)
        logits = out.logits if self.keep or not self.logits else out.logits[:, -self.logits:]  # (B, logits, V)
        tensors = caches[0].tensors(), caches[1].tensors()
        if not all(tensors):
            raise NotImplementedError("tpfx.generate: a decoder layer of this model keeps no keys/values of its own")
        return logits, tensors[0] + tensors[1]


def step(sharded: Any) -> DecodeStep:
    decode = DecodeStep(sharded.tree, [None] * decoder_layers(sharded.config))
    decode.mask_spans_cache = False  # attention_mask is the encoder's
    return decode


def _encode(sharded: Any, decoder: Decoder, inputs: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """The encoder's last hidden state ``(B, S, H)`` on every rank, from its graph (captured on first use)."""
    main = sharded.tree.main_input_name
    key = ("generate", decoder.state, "encode", main, tuple(inputs.shape[:1]),
           *signature({"inputs": inputs, "attention_mask": mask}))
    exact = (*key, tuple(inputs.shape))
    entry = sharded.graph(key) or sharded.graph(exact)
    args: tuple = (inputs,) if mask is None else (inputs, mask)
    if entry is None:
        with sharded.capturing():
            plan, dynamic = derive(EncodeStep(sharded.tree, main), args, {}, sharded.world_size, sharded.pins(),
                                   stages=Stages(blocks=False), warn=False)
        sharded.add_graph(plan, key if dynamic else exact)
        entry = sharded.graph(key if dynamic else exact)
    refuse_random(sharded, entry[0])
    return sharded.call(entry, args, {})


def _encoder(sharded: Any, decoder: Decoder) -> torch.nn.Module:
    """A shallow copy of the model's encoder whose forward runs the encode graph (generate reads its signature)."""
    encoder = sharded.tree.get_encoder()
    copied = copy.copy(encoder)
    main = sharded.tree.main_input_name

    @functools.wraps(encoder.forward)
    def forward(*args: Any, **kwargs: Any) -> Any:
        refuse_unsupported(kwargs, ("inputs_embeds", "output_attentions", "output_hidden_states", "head_mask"))
        inputs, mask = kwargs.pop(main, args[0] if args else None), kwargs.pop("attention_mask", None)
        other = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
        if inputs is None or other:
            raise NotImplementedError(f"tpfx.generate: the encoder takes {main}= and attention_mask= only "
                                      f"(got {other or 'no ' + main})")
        return BaseModelOutput(last_hidden_state=_encode(sharded, decoder, inputs, mask))

    copied.forward = forward  # type: ignore[method-assign]
    return copied


def proxy(sharded: Any, decoder: Decoder) -> tuple[torch.nn.Module, SplitEncoderDecoderCache]:
    """A shallow copy of the model whose encoder and forward run the per-rank graphs, and an empty cache."""
    model = sharded.tree
    copied = copy.copy(model)
    encoder = _encoder(sharded, decoder)

    @functools.wraps(model.forward)
    def forward(input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                decoder_input_ids: torch.Tensor | None = None, encoder_outputs: Any = None, **kwargs: Any) -> Any:
        cache = kwargs.pop("cache", None) or kwargs.pop("past_key_values", None)
        refuse_unsupported(kwargs, ("inputs_embeds", "decoder_inputs_embeds", "decoder_attention_mask",
                                    "output_attentions", "output_hidden_states"))
        if not isinstance(cache, SplitEncoderDecoderCache) or decoder_input_ids is None or encoder_outputs is None:
            raise RuntimeError("tpfx.generate: the sharded model's forward runs only inside generate, with its "
                               "own SplitEncoderDecoderCache")
        hidden = encoder_outputs[0]  # (B, S_enc, H)
        steps = {"encoder_hidden": hidden, "attention_mask": attention_mask}
        logits = decoder.run(decoder_input_ids, cache, steps, logits_kept(kwargs, decoder_input_ids, decoder.step))
        return Seq2SeqLMOutput(logits=logits, cache=cache)

    copied.forward = forward  # type: ignore[method-assign]
    copied.get_encoder = lambda *a, **k: encoder  # type: ignore[method-assign]
    return copied, SplitEncoderDecoderCache(len(decoder.windows))
