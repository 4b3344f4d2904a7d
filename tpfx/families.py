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
    "num_attention_heads": 8, "n_head": 8, "num_heads": 8, "n_heads": 8, "decoder_attention_heads": 8,
    "num_key_value_heads": 4, "num_kv_heads": 4, "multi_query_group_num": 4,
    "head_dim": 8, "d_kv": 8, "qk_rope_head_dim": 8, "qk_nope_head_dim": 8, "v_head_dim": 8,
    "rotary_dim": 4, "word_embed_proj_dim": 64, "kv_lora_rank": 16, "q_lora_rank": 16,
    "vocab_size": 128, "max_position_embeddings": 128, "n_positions": 128,
    "num_local_experts": 4, "num_experts": 4, "n_routed_experts": 4, "num_experts_per_tok": 2,
}
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


def tiny_config(model_type: str, keep: tuple[str, ...] = (), **overrides: Any) -> Any:
    from transformers import AutoConfig, PretrainedConfig

    cfg = AutoConfig.for_model(model_type)
    text = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    shrink = {k: v for k, v in SHRINK.items() if k not in keep}
    targets = {id(cfg): cfg, id(text): text}
    for c in (cfg, text):  # nested sub-configs too (vision/audio towers of multimodal families)
        for v in vars(c).values():
            if isinstance(v, PretrainedConfig):
                targets.setdefault(id(v), v)
    for target in targets.values():
        for k, v in shrink.items():
            if hasattr(target, k) and getattr(target, k) is not None:
                try:
                    setattr(target, k, v)
                except (AttributeError, TypeError, ValueError):
                    pass
        types = getattr(target, "layer_types", None)
        if isinstance(types, (list, tuple)):
            try:
                target.layer_types = list(types)[: SHRINK["num_hidden_layers"]]
            except (AttributeError, TypeError, ValueError):
                pass
        for k, v in list(vars(target).items()):  # every dropout probability (names vary by family)
            if ("drop" in k or k in DROPOUTS) and isinstance(v, float):
                setattr(target, k, 0.0)
        for k, v in overrides.items():
            setattr(target, k, v)
        target.use_cache = False
        for tok in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if isinstance(getattr(target, tok, None), int) and getattr(target, tok) >= 128:
                setattr(target, tok, 1)
    return cfg


def tiny_causal_lm(model_type: str, seed: int = 0, device: str | None = None, **overrides: Any) -> torch.nn.Module:
    """A tiny random-init causal LM: the first of the generic shrinks whose unsharded forward runs."""
    from transformers import AutoModelForCausalLM

    error: Exception | None = None
    for keep in ((), HEAD_GEOMETRY):
        cfg = tiny_config(model_type, keep, **overrides)
        torch.manual_seed(seed)
        try:
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
            if keep:  # rebuild so the weights do not depend on how many attempts ran
                torch.manual_seed(seed)
                with torch.device(device or "cpu"):
                    model = AutoModelForCausalLM.from_config(cfg)
            return model
        except Exception as e:  # noqa: BLE001 - try the next, gentler shrink
            error = e
    assert error is not None
    raise error
