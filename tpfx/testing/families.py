"""Tiny random-init configs for transformers families, built generically from each family's defaults.

Used by the coverage tests and benchmarks: no per-model code, only a list of common size attributes that
are shrunk when a config has them.
"""

from __future__ import annotations

from typing import Any

import torch

SHRINK: dict[str, Any] = {
    "num_hidden_layers": 2, "n_layer": 2, "num_layers": 2, "n_layers": 2, "num_decoder_layers": 2,
    "hidden_size": 64, "n_embd": 64, "d_model": 64, "dim": 64, "n_embed": 64,
    "intermediate_size": 128, "ffn_dim": 128, "n_inner": 128, "d_ff": 128, "ffn_hidden_size": 128,
    "moe_intermediate_size": 64, "shared_expert_intermediate_size": 128, "expert_intermediate_size": 64,
    "shared_intermediate_size": 128, "shared_experts_intermediate_size": 64,
    "num_attention_heads": 8, "n_head": 8, "num_heads": 8, "n_heads": 8, "decoder_attention_heads": 8,
    "num_key_value_heads": 4, "num_kv_heads": 4, "multi_query_group_num": 4,
    "head_dim": 8, "d_kv": 8, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8,
    "rotary_dim": 4, "word_embed_proj_dim": 64, "kv_lora_rank": 16, "q_lora_rank": 16,
    "vocab_size": 128, "max_position_embeddings": 128, "n_positions": 128,
    "num_local_experts": 4, "num_experts": 4, "n_routed_experts": 4, "num_experts_per_tok": 2,
    "n_group": 2, "topk_group": 1, "num_expert_group": 2, "num_experts_per_token": 2, "moe_topk": 2,
    "n_shared_experts": 1, "num_shared_experts": 1, "zero_expert_num": 2, "expert_ffn_hidden_size": 64,
    # layer counts inside the model: keep one dense / unshared layer and one of the other kind
    "first_k_dense_replace": 1, "num_dense_layers": 1, "num_kv_shared_layers": 0,
    # per-layer-input embeddings (Gemma 3n/4), sparse-attention indexers (DSA), Mamba mixers
    "vocab_size_per_layer_input": 128, "hidden_size_per_layer_input": 16,
    "index_n_heads": 4, "index_num_heads": 2, "index_head_dim": 16, "index_topk": 8,
    "mamba_n_heads": 8, "mamba_d_head": 16, "mamba_d_state": 16, "mamba_chunk_size": 16, "mamba_d_ssm": 128,
    # linear-attention mixers (Gated DeltaNet, KDA, ...)
    "linear_num_heads": 8, "linear_head_dim": 8, "linear_num_key_heads": 4, "linear_num_value_heads": 8,
    "linear_key_head_dim": 8, "linear_value_head_dim": 8,
}
LAYER_COUNTS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "num_decoder_layers")
MAX_TINY_LAYERS = 4
# key/value head counts and the query head count they are related to
KV_HEADS = {"num_key_value_heads": "num_attention_heads", "num_kv_heads": "num_attention_heads",
            "multi_query_group_num": "num_attention_heads", "linear_num_key_heads": "linear_num_value_heads"}
DROPOUTS = ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop", "dropout",
            "hidden_dropout_prob", "attention_probs_dropout_prob", "dropout_rate", "activation_dropout",
            "classifier_dropout", "ffn_dropout", "summary_first_dropout")


def causal_lm_families() -> list[str]:
    """Model types whose config class declares a ``base_model_tp_plan`` and that have a causal-LM head."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    out = []
    for model_type in sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES):
        try:
            cls = CONFIG_MAPPING[model_type]
        except KeyError:
            continue
        if getattr(cls, "base_model_tp_plan", None):
            out.append(model_type)
    return out


MAX_PARAMS = 20_000_000
# attributes whose relations differ between attention variants (MLA, MQA, ...): the second attempt leaves them
HEAD_GEOMETRY = ("num_key_value_heads", "num_kv_heads", "multi_query_group_num", "head_dim", "d_kv",
                 "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "kv_lora_rank", "q_lora_rank")


def _shrink_kwargs(raw: dict[str, Any], keep: tuple[str, ...], fill_none: bool,
                   kinds_first: bool = True, sizes: dict[str, Any] = SHRINK) -> dict[str, Any]:
    """Constructor kwargs that shrink one config (given as its ``__dict__``), sub-configs as nested dicts.

    Sizes go through the constructor, not ``setattr``, so values a config derives in ``__init__`` (head_dim,
    layer_types, qk_head_dim, ...) follow. A ``None`` size means "derived" or "absent" and is left alone unless
    ``fill_none``. Head-count relations of the default survive: multi-head stays multi-head (MLA needs it),
    multi-query stays multi-query."""
    from transformers import PretrainedConfig

    kw: dict[str, Any] = {}
    for k, v in sizes.items():
        if k in raw and k not in keep and (raw[k] is not None or fill_none):
            kw[k] = v
    for kv, q in KV_HEADS.items():
        if kv in kw and q in raw and q in sizes:
            if raw[kv] is None or raw[kv] == raw[q]:
                kw[kv] = sizes[q]
            elif raw[kv] == 1:
                kw[kv] = 1
    _pick_layers(raw, kw, kinds_first, sizes["num_hidden_layers"])
    for k, v in raw.items():
        if ("drop" in k or k in DROPOUTS) and isinstance(v, float):  # every dropout (names vary by family)
            kw[k] = 0.0
        elif k in ("bos_token_id", "eos_token_id", "pad_token_id", "eod_token_id", "sep_token_id"):
            if isinstance(v, int) and v >= sizes["vocab_size"]:
                kw[k] = 1
        elif isinstance(v, PretrainedConfig):
            kw[k] = {**_shrink_kwargs(vars(v), keep, fill_none, kinds_first, sizes), "model_type": v.model_type}
    kw["use_cache"] = False
    return kw


def _pick_layers(raw: dict[str, Any], kw: dict[str, Any], kinds_first: bool = True, least: int = 2) -> None:
    """Shrink per-layer lists (``layer_types``, ``mlp_layer_types``, ...: lists as long as the default layer
    count) to the first layer of each distinct kind, so a hybrid keeps one layer of every kind it has
    (``kinds_first``), or else to the first layers."""
    n = next((raw[k] for k in LAYER_COUNTS if k in kw and isinstance(raw.get(k), int)), None)
    if not n:
        return
    lists = {k: list(v) for k, v in raw.items()
             if isinstance(v, (list, tuple)) and len(v) == n and k not in kw and n > 1}
    if not lists:
        return
    kinds = [tuple(str(v[i]) for v in lists.values()) for i in range(n)]
    idx = sorted({kinds.index(k) for k in kinds})[:MAX_TINY_LAYERS] if kinds_first else []
    idx += [i for i in range(n) if i not in idx][: max(0, least - len(idx))]
    idx.sort()
    for k in LAYER_COUNTS:
        if k in kw:
            kw[k] = len(idx)
    for k, v in lists.items():
        kw[k] = [v[i] for i in idx]


def tiny_config(model_type: str, keep: tuple[str, ...] = (), fill_none: bool = False, kinds_first: bool = True,
                sizes: dict[str, Any] | None = None, **overrides: Any) -> Any:
    """The family's default config with every known size attribute shrunk (see ``_shrink_kwargs``);
    ``sizes`` replaces entries of ``SHRINK`` (e.g. a wider model for the plan-quality benchmark)."""
    from transformers import AutoConfig

    default = AutoConfig.for_model(model_type)
    kw = _shrink_kwargs(vars(default), keep, fill_none, kinds_first, {**SHRINK, **(sizes or {})})
    for k, v in kw.items():  # sub-configs: rebuilt from their class defaults plus the shrunk sizes
        if isinstance(v, dict):
            sub = getattr(default, k)
            kw[k] = type(sub)(**{n: x for n, x in v.items() if n != "model_type"})
    return AutoConfig.for_model(model_type, **{**kw, **overrides})


# attempts, in order: (head-geometry attributes kept, None sizes filled, one layer of each kind first)
SHRINK_LADDER = (((), False, True), (HEAD_GEOMETRY, False, True), ((), True, True), ((), False, False))


def tiny_causal_lm(model_type: str, seed: int = 0, device: str | None = None, **overrides: Any) -> torch.nn.Module:
    """A tiny random-init causal LM: the first of the generic shrinks whose unsharded forward runs."""
    from transformers import AutoModelForCausalLM

    errors: list[Exception] = []
    for keep, fill_none, kinds_first in SHRINK_LADDER:
        try:
            cfg = tiny_config(model_type, keep, fill_none, kinds_first, **overrides)
            torch.manual_seed(seed)
            with torch.device("meta"):
                n = sum(p.numel() for p in AutoModelForCausalLM.from_config(cfg).parameters())
            if n > MAX_PARAMS:
                raise ValueError(f"the generically shrunk config still has {n / 1e6:.0f}M parameters "
                                 f"(limit {MAX_PARAMS / 1e6:.0f}M for a tiny test model)")
            with torch.device(device or "cpu"):
                model = AutoModelForCausalLM.from_config(cfg)
            if device in (None, "cpu"):
                with torch.no_grad():
                    model(input_ids=torch.ones(1, 4, dtype=torch.long), use_cache=False)
            if errors:  # rebuild so the weights do not depend on how many attempts ran
                torch.manual_seed(seed)
                with torch.device(device or "cpu"):
                    model = AutoModelForCausalLM.from_config(cfg)
            return model
        except Exception as e:  # noqa: BLE001 - try the next, gentler shrink
            errors.append(e)
    raise errors[0]  # the plain shrink's error says most about what the generic shrinker lacks


def default_config_error(model_type: str) -> str | None:
    """Why transformers' own default config for ``model_type`` cannot build its causal LM (on meta), or None."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        with torch.device("meta"):
            AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type))
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {str(e)[:200]}"
    return None
