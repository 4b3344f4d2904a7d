"""Generation on real gloo ranks: ``sharded.generate`` gives the unsharded model's tokens (greedy, beam search,
sampling) with a KV cache split by heads, Megatron's collectives in the decode graph, and errors instead of
hangs when ranks disagree."""

from __future__ import annotations

import gen_cases
import pytest
from example_runs import run_example

from tpfx.launch import launch

pytestmark = pytest.mark.slow

T2 = ["llama_gqa", "gpt2", "mistral", "qwen2_moe", "phi3", "gemma2"]
T4 = ["llama_gqa", "gemma2"]  # KV heads replicated in pairs; sliding windows (all six: t=2)


def _check(res: dict, world: int) -> None:
    for name, r in res.items():
        assert all(r["equal"].values()), (name, r["equal"])
        assert r["scores"] == 4 and r["cache_len"] == 10 + 3, (name, r)
        # one prefill and one decode graph per batch size (2; beams 3 x 2), whatever the cache length
        assert len(r["graphs"]) == 4, (name, r["graphs"])
        # each rank holds its share of transformers' own cache (sliding-window layers keep only their window):
        # 1/t, or 1/kv_heads where the KV heads are replicated in groups
        kv = {"llama_gqa": 2}.get(name, world)
        assert r["cache_bytes"] * min(world, kv) == r["ref_cache_bytes"], (name, r)
        kinds, layers = r["decode"]["kinds"], r["layers"]
        assert kinds.get("all_reduce") == 2 * layers + 1, (name, kinds)  # 2 per layer + the vocab embedding
        assert kinds.get("all_gather") == 1 and not r["decode"]["gathers_in_layers"], (name, r["decode"])


def test_generate_t2_greedy_beam_sample_equal_unsharded() -> None:
    for res in launch(gen_cases.families_check, 2, T2, timeout_s=900):
        _check(res, 2)


def test_generate_t4_greedy_beam_sample_equal_unsharded() -> None:
    for res in launch(gen_cases.families_check, 4, T4, timeout_s=900):
        _check(res, 4)


def test_from_pretrained_module_surface_streamer_beam_and_disagreeing_ranks(tmp_path) -> None:
    gen_cases.build("llama_gqa").save_pretrained(tmp_path)
    for r in launch(gen_cases.module_check, 2, str(tmp_path), timeout_s=400):
        assert "disagree on the arguments of generate" in r.pop("disagree"), r
        assert r == {"config": True, "generation_config": True, "device": "cpu", "can_generate": True,
                     "streamed": True, "beam": True}, r


def test_compiled_decode_step_compiles_once() -> None:
    for r in launch(gen_cases.compiled_check, 2, timeout_s=600):
        assert r["equal"], r
        assert r["warm_graphs"] <= 2 and r["later_graphs"] == 0, r  # prefill + decode, then nothing per token


def test_readme_generate_example_runs() -> None:
    stdout = run_example("generate.py")
    runs = [line for line in stdout.splitlines() if "equal to unsharded" in line]
    assert len(runs) == 3 and all(line.endswith("True") for line in runs), stdout
    assert "KV cache per rank" in stdout, stdout
