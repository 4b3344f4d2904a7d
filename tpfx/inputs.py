"""Example inputs from a model's own description, for models that are (or wrap) a transformers model.

``synthesize`` reads the transformers model inside (a peft ``PeftModel`` or any wrapper with
``get_base_model()`` is unwrapped): its ``main_input_name`` and config give the inputs' shapes — token ids
(``vocab_size``), images (``image_size``, ``num_channels``, in the vision config where there is one), log-mel
features (``num_mel_bins`` x twice ``max_source_positions``), raw audio; an encoder-decoder gets
``decoder_input_ids``, a text-image model both ids and pixels. Where it cannot, one ``ValueError`` names the
input and ``example_kwargs``. ``prepare`` turns a transformers model's KV cache off (export cannot output one).
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any

import torch

BATCH, SEQ = 2, 8


def hf_model(model: torch.nn.Module) -> Any:
    """The transformers model ``model`` is or wraps (peft's ``get_base_model()``); None if none."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover
        return None
    seen = 0
    while not isinstance(model, PreTrainedModel) and seen < 4:
        inner = getattr(model, "get_base_model", None)
        if not callable(inner):
            return None
        model, seen = inner(), seen + 1
    return model if isinstance(model, PreTrainedModel) else None


def _forward_params(model: torch.nn.Module) -> dict[str, inspect.Parameter]:
    return dict(inspect.signature(model.forward).parameters)


def prepare(model: torch.nn.Module, kwargs: dict[str, Any]) -> dict[str, Any]:
    """transformers models return a KV cache by default, which export cannot output: ``use_cache=False``."""
    core = hf_model(model)
    if core is None:
        return kwargs
    params = _forward_params(core)
    takes_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if "use_cache" in params or (takes_kwargs and "cache" in params):  # (a VLM passes use_cache on in **kwargs)
        kwargs = {"use_cache": False, **kwargs}
    return kwargs


def _size(value: Any) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    if isinstance(value, dict):
        edge: Any = value.get("shortest_edge")
        return int(value.get("height", edge)), int(value.get("width", edge))
    return int(value[0]), int(value[-1])


def _pixels(cfg: Any, gen: torch.Generator) -> torch.Tensor:
    vc = getattr(cfg, "vision_config", None) or cfg
    h, w = _size(vc.image_size)
    return torch.randn(BATCH, getattr(vc, "num_channels", 3), h, w, generator=gen)  # (B, C, H, W)


def _ids(cfg: Any, gen: torch.Generator) -> torch.Tensor:
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    vocab = getattr(cfg, "vocab_size", None) or getattr(text, "vocab_size", None)
    if vocab is None:
        raise AttributeError("vocab_size")
    return torch.randint(0, vocab, (BATCH, SEQ), generator=gen)  # (B, S)


def _input(name: str, cfg: Any, gen: torch.Generator) -> torch.Tensor:
    if name in ("input_ids", "decoder_input_ids"):
        return _ids(cfg, gen)
    if name == "pixel_values":
        return _pixels(cfg, gen)
    if name == "input_features":  # log-mel frames (Whisper: the encoder's positions x its conv stride 2)
        return torch.randn(BATCH, cfg.num_mel_bins, 2 * cfg.max_source_positions, generator=gen)
    if name == "input_values":  # raw audio: enough samples for the feature extractor's strides
        return torch.randn(BATCH, 4000, generator=gen)
    raise AttributeError(name)


def _image_token(cfg: Any) -> int | None:
    for k in ("image_token_id", "image_token_index"):
        if isinstance(getattr(cfg, k, None), int):
            return int(getattr(cfg, k))
    return None


def _image_prompt(core: Any, cfg: Any, gen: torch.Generator) -> dict[str, torch.Tensor] | None:
    """A vision-language model's prompt: pixels, and token ids with as many image tokens per row as its image
    encoder yields features (counted on fake tensors: shapes only), the text ids below every special id."""
    token, encode = _image_token(cfg), getattr(core, "get_image_features", None)
    if token is None or not callable(encode) or "pixel_values" not in _forward_params(core):
        return None
    from torch._subclasses.fake_tensor import FakeTensorMode

    pixels = _pixels(cfg, gen)
    with torch.no_grad(), FakeTensorMode(allow_non_fake_inputs=True):
        out = encode(pixel_values=pixels, return_dict=True)
        feats = getattr(out, "pooler_output", None)
        feats = feats if feats is not None else out[0]
        count = sum(t.numel() for t in (feats if isinstance(feats, (list, tuple)) else [feats]))
    hidden = cfg.get_text_config().hidden_size
    per_row = int(count) // hidden // BATCH  # image tokens in one row
    specials = [v for k, v in cfg.to_dict().items() if k.endswith(("_token_id", "_token_index")) and
                isinstance(v, int) and v > 3]
    text = torch.randint(0, min([token, *specials]), (BATCH, SEQ), generator=gen)
    ids = torch.cat([text[:, :1], torch.full((BATCH, per_row), token), text[:, 1:]], 1)  # (B, 1 + n + S - 1)
    return {"input_ids": ids, "pixel_values": pixels}


def synthesize(model: torch.nn.Module) -> tuple[tuple, dict[str, Any]]:
    """(args, kwargs) for one example call of ``model``; see the module docstring."""
    core = hf_model(model)
    if core is None:
        raise ValueError("tpfx: example_inputs (or example_kwargs) are required for a module that is not a "
                         "transformers model")
    cfg, params = core.config, _forward_params(core)
    names = [core.main_input_name]
    image_tokens = any(hasattr(cfg, k) for k in ("image_token_id", "image_token_index"))
    if {"input_ids", "pixel_values"} <= params.keys() and not image_tokens:  # a dual encoder (CLIP) needs both
        names += [n for n in ("input_ids", "pixel_values") if n not in names]
    if getattr(cfg, "is_encoder_decoder", False) and "decoder_input_ids" in params:
        names.append("decoder_input_ids")
    gen = torch.Generator().manual_seed(0)
    device = next(iter(core.parameters())).device
    if names == ["input_ids"] and image_tokens:  # a vision-language model: an image in the prompt
        try:
            prompt = _image_prompt(core, cfg, gen)
        except Exception as e:  # noqa: BLE001 - a text-only example still plans the text model
            warnings.warn(f"tpfx: no example image for {type(core).__name__} ({type(e).__name__}: {e}); planned "
                          "from text alone, the vision tower is held whole (pass example_kwargs with pixel_values)",
                          stacklevel=3)
            prompt = None
        if prompt is not None:
            return (), {k: v.to(device) for k, v in prompt.items()}
    kwargs: dict[str, Any] = {}
    for name in names:
        try:
            same = name == "decoder_input_ids" and "input_ids" in kwargs  # the decoder reads the prompt again
            kwargs[name] = kwargs["input_ids"].clone() if same else _input(name, cfg, gen).to(device)
        except (AttributeError, TypeError, KeyError, IndexError) as e:
            raise ValueError(f"tpfx: cannot make an example {name!r} for {type(core).__name__} from its config "
                             f"({type(e).__name__}: {e}); pass example_kwargs={{{name!r}: ...}} (and the "
                             "model's other inputs)") from None
    return (), kwargs
