"""Vision-language generation: the image (or video) encoder runs once as a graph of its own, its features feed
the prefill step, and the decode steps are the text model's, as for any causal LM.

transformers' ``generate`` encodes the pixels before the first step (``get_image_features`` on the model's base
model) and hands the result to the model's forward as ``mm_encoder_outputs``. On a sharded model:

- *features*: ``FeaturesStep`` captures ``get_<modality>_features`` with the module's weight placements (the
  vision tower and projector split like any other layers); its output fields leave whole on every rank;
- the proxy model's base model is a shallow copy whose ``get_<modality>_features`` runs that graph, so
  transformers' own generation code calls it;
- the prefill step (``generate.CacheStep``) takes the features as plain tensors (``mm``: modality -> field ->
  tensor) and rebuilds transformers' output objects inside the graph, where the model merges them into the
  token embeddings as it does unsharded.
"""

from __future__ import annotations

import copy
import functools
from typing import Any

import torch

from tpfx.agreement import refuse_random
from tpfx.derive import derive
from tpfx.passes import Stages

__all__ = ["FeaturesStep", "attach"]

MODALITIES = ("image", "video")
_CLASSES: dict[int, type] = {}  # id(FeaturesStep) -> the output class its capture saw


class FeaturesStep(torch.nn.Module):
    """``get_<modality>_features(**inputs)`` of the model's base model, its output as a dict of its fields.
    Shares the model's parameters and submodules (the same FQNs), as ``generate.CacheStep`` does."""

    _hf: Any

    def __init__(self, model: torch.nn.Module, modality: str) -> None:
        super().__init__()
        self.__dict__["_hf"] = model
        for attr in ("_modules", "_parameters", "_buffers", "_non_persistent_buffers_set"):
            self.__dict__[attr] = model.__dict__[attr]
        self.modality = modality
        self.output_class: Any = None  # transformers' output class (read from _CLASSES after a capture)

    def forward(self, inputs: dict[str, torch.Tensor]) -> dict[str, Any]:
        out = getattr(self._hf.base_model, f"get_{self.modality}_features")(**inputs, return_dict=True)
        _CLASSES[id(self)] = type(out)  # export restores the module's own attributes after tracing
        return {k: v for k, v in out.items() if v is not None}


def _features(sharded: Any, decoder: Any, modality: str, inputs: dict[str, torch.Tensor]) -> Any:
    """transformers' features output for ``inputs``, from the features graph (captured on first use)."""
    steps: dict[str, FeaturesStep] = decoder.__dict__.setdefault("features_steps", {})
    step = steps.setdefault(modality, FeaturesStep(sharded.tree, modality))
    shapes = tuple((k, tuple(v.shape), str(v.dtype)) for k, v in sorted(inputs.items()))
    key = ("generate", decoder.state, "features", modality, shapes)  # per shape: images are few per call
    entry = sharded.graph(key)
    if entry is None:
        with sharded.capturing():
            plan, _ = derive(step, (inputs,), {}, sharded.world_size, sharded.pins(), stages=Stages(blocks=False),
                             warn=False)
        sharded.add_graph(plan, key)
        entry = sharded.graph(key)
        step.output_class = _CLASSES.pop(id(step))
    refuse_random(sharded, entry[0])
    decoder.step.output_classes[modality] = step.output_class
    return step.output_class(**sharded.call(entry, (inputs,), {}))


def attach(proxy: torch.nn.Module, sharded: Any, decoder: Any) -> None:
    """Give ``proxy`` (a shallow copy of the model) a base model whose features functions run graphs; a no-op
    for a model without them."""
    model = sharded.tree
    names = [m for m in MODALITIES if m in getattr(model, "input_modalities", ()) and
             callable(getattr(model.base_model, f"get_{m}_features", None))]
    if not names:
        return
    base = copy.copy(model.base_model)
    prefix = model.base_model_prefix
    if base is model or prefix not in model._modules:
        raise NotImplementedError("tpfx.generate: a vision-language model whose features come from the model "
                                  "itself, not a base model, is not supported yet")
    proxy.__dict__["_modules"] = {**model._modules, prefix: base}  # the tree's own modules stay untouched
    for m in names:
        setattr(base, f"get_{m}_features", _runner(sharded, decoder, base, m))


def _runner(sharded: Any, decoder: Any, base: torch.nn.Module, modality: str) -> Any:
    """``get_<modality>_features`` running the features graph, with the original's signature (generate reads it
    to pick the inputs it passes)."""
    original = getattr(base, f"get_{modality}_features")

    @functools.wraps(original)
    def run(*args: Any, **kwargs: Any) -> Any:
        if args:
            raise NotImplementedError(f"tpfx.generate: get_{modality}_features called with positional arguments")
        inputs = {k: v for k, v in kwargs.items() if isinstance(v, torch.Tensor)}
        return _features(sharded, decoder, modality, inputs)

    return run


def step_inputs(mm: Any) -> dict[str, dict[str, Any]] | None:
    """The features transformers hands the forward (``mm_encoder_outputs``), as plain fields for a graph."""
    if not mm:
        return None
    return {m: {k: v for k, v in out.items() if v is not None} for m, out in mm.items() if out is not None} or None
