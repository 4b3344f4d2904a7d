"""A sharded model is still an nn.Module (tier 3, real gloo ranks): what users do to modules after sharding
acts as on the unsharded model, or raises saying what to do (``tests/module_ops_cases.py``)."""

from __future__ import annotations

from typing import Any

import module_ops_cases as cases
import pytest
from example_runs import run_example
from numerics import TOL

from tpfx.launch import launch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """Every check of tests/module_ops_cases.py, in one spawn of 2 gloo ranks."""
    return launch(cases.all_checks, 2, str(tmp_path_factory.mktemp("module_ops")), timeout_s=900)


def _check(ranks: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    out = [r[name] for r in ranks]
    for r in out:
        if isinstance(r, str):
            pytest.fail(f"{name} raised:\n{r}", pytrace=False)
    return out


def test_module_operations_act_as_on_the_unsharded_model(ranks: list[dict[str, Any]]) -> None:
    for res in _check(ranks, "operations"):
        assert set(res) == set(cases.OPERATIONS)
        for name, r in res.items():
            assert r["fwd"] <= TOL and r["grad"] <= TOL and r["grad_names"], (name, r)
            if name not in cases.UNCHANGED:
                assert r["changed"] > 1e-3, (name, r)  # the operation changed the output: a test that can fail
            if name == "config.output_hidden_states":
                assert r["hidden"] == (3, 3), r
            if name == "config.num_hidden_layers":
                assert r["changed"] > 1e-3


def test_casts_after_sharding_run_and_save_the_current_weights(ranks: list[dict[str, Any]]) -> None:
    for r in _check(ranks, "casts"):
        assert r["bf16_dtype"] == "torch.bfloat16" and r["bf16_err"] <= 2 * r["bf16_vs_fp32"], r
        assert r["trained_fwd"] <= TOL and r["saved_err"] <= TOL and r["saved_moved"] > 1e-3, r


def test_buffers_are_state_saved_and_resumed(ranks: list[dict[str, Any]]) -> None:
    for r in _check(ranks, "buffers"):
        assert r["buffers"] == ["bn.num_batches_tracked", "bn.running_mean", "bn.running_var"], r
        assert r["in_state_dict"] and r["running_mean"] <= TOL and r["moved"] > 1e-3, r
        assert r["resumed_eval"] <= TOL, r


def test_randomness_init_slices_and_dropout_agreement(ranks: list[dict[str, Any]]) -> None:
    for r in _check(ranks, "randomness"):
        assert r["slices_differ"] and abs(r["std"] - 0.02) < 0.002 and abs(r["mean"]) < 0.002, r
        assert r["replicas_equal"], r
        assert "random state" in r["desync"], r


def test_what_cannot_be_honoured_raises_saying_what_to_do(ranks: list[dict[str, Any]]) -> None:
    for r in _check(ranks, "refusals"):
        for name in ("deepcopy", "pickle", "torch.save"):
            assert "save_pretrained" in r[name] and "tpfx.save" in r[name], (name, r[name])
        assert "generate" in r["use_cache"], r
        assert "backward hook" in r["backward_hook"] and "register_hook" in r["backward_hook"], r


def test_readme_module_ops_example_runs() -> None:
    lines = dict(line.rsplit(": ", 1) for line in run_example("module_ops.py").strip().splitlines())
    assert len(lines) == 6, lines
    for name, diff in lines.items():
        assert float(diff) <= (1e-2 if "bfloat16" in name else 1e-5), (name, diff)  # bf16: its own rounding


def test_dropout_modes_and_generate_follow_the_tree(ranks: list[dict[str, Any]]) -> None:
    for r in _check(ranks, "dropout_modes"):
        for name, v in r.items():
            assert v["fwd"] <= TOL and v["noisy"] > 1e-3, (name, v)
    for r in _check(ranks, "generate"):
        assert r["equal"] and r["changed"], r


def test_tied_weights_are_one_parameter(ranks: list[dict[str, Any]]) -> None:
    for r in _check(ranks, "tied"):
        assert r["same"] and r["ref_same"] and r["names"] and r["fwd"] <= TOL, r


# what a helper's attack on the module tree found silently different (tests/module_ops_attack.py), now honoured
ATTACKED = ["replace Linear by a fresh Linear of same shape", "transplant layer0.mlp from a donor model",
            "monkeypatch mlp.forward on instance", "hook object with state (alpha) tuned",
            "plain: list attribute skip.append(1)", "plain: tensor attribute reassigned",
            "TransformerEncoderLayer.activation = F.gelu", "plain: root float attribute scale=0.5",
            "plain: Linear reused via plain list, SGD step", "plain: submodule dict attribute item set",
            "attention scaling = np.float64 twice", "submodule .to(float64) then .data=",
            "sharded.to('cpu') / .float() on an fp32 CPU model (no-op)", "monkeypatch LlamaMLP.forward on the class",
            "parametrizations.weight_norm after sharding", "gpt2 untie lm_head (new Parameter)",
            "hook reads python global, global changed"]
REFUSED = {"parametrizations.weight_norm after sharding": "no longer where the plan has it",
           "gpt2 untie lm_head (new Parameter)": "shard it anew"}  # loud, saying what to do


def test_the_module_tree_attacks_are_honoured_or_refused() -> None:
    import module_ops_attack as attack

    for res in launch(attack.attack_check, 2, ATTACKED, timeout_s=900):
        for name in ATTACKED:
            r = res[name]
            if name in REFUSED:
                assert REFUSED[name] in r.get("error", ""), (name, r)
                continue
            assert "error" not in r, (name, r)
            errs = {k: v for k, v in r.items() if isinstance(v, float) and k != "changed"}
            assert errs and max(errs.values()) <= TOL, (name, r)
            if "no-op" not in name:
                assert r.get("changed", 1.0) > 1e-3, (name, r)  # the action changed the model: the test can fail


def test_hooks_run_on_every_call_with_the_unsharded_values(ranks: list[dict[str, Any]]) -> None:
    for r in _check(ranks, "hooks"):
        assert r["fwd"] <= TOL and r["grad"] <= TOL, r
        assert r["recorded"] == (3, 3) and r["recorded_err"] <= TOL, r  # one activation per call, full values
        assert r["graphs"] == 2, r  # the plain call and the call with labels: the global needs no re-capture
        assert r["removed_before"] <= TOL, r
        assert r["ablation"] <= TOL and r["stored_graphs"] == 2, r  # first call, then the call with labels


def test_a_hooks_own_trained_tensor_gets_its_gradient(ranks: list[dict[str, Any]]) -> None:
    for r in _check(ranks, "steering_vector"):
        assert r["fwd"] <= TOL and r["vec_grad"] <= TOL, r
