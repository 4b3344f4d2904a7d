"""A sample of tests/inprocess_attack.py (a helper's generator of what notebook users do with ``devices=``),
chosen from what it found silently different at first: optimizer updates that bump no version counter (fused
AdamW, ``p.data``), out-of-range ids, autocast in the caller's thread, a streamer heard once per rank, a frozen
model's backward, 8 heads / 2 key-value heads at t=4 (a lock held across a collective), two models called from
two threads at once, rank threads released with their module; and a dropout sample. Each case compares with the
unsharded model (or expects the unsharded model's error)."""

from __future__ import annotations

import inprocess_attack as attack
import pytest

SAMPLE = ["adamw_fused_clip_3steps_qwen2_t3", "manual_sgd_via_p_data_llama_t2", "weight_assignment_p_data_equals_llama_t2",
          "out_of_range_token_id_raises_llama_t2", "negative_token_id_raises_llama_t2", "autocast_bf16_cpu_llama_t2",
          "generate_with_streamer_llama_t2", "generate_custom_logits_processor_counter_llama_t2",
          "frozen_all_then_backward_raises_like_unsharded_llama_t2", "llama_h8_kv2_t4",
          "two_models_concurrently_from_two_threads_mlp_t2", "deleted_models_release_threads",
          "bert_seqcls_dropout_seeded_uneven_t3"]


@pytest.mark.slow
@pytest.mark.one_process
@pytest.mark.parametrize("name", SAMPLE)
def test_attack_case(name: str) -> None:
    line = attack._run_one(name, attack.CASES[name])
    assert " PASS" in line, line
