"""Training at scale on real gloo ranks: tp x dp on a 2-D DeviceMesh with torch's FSDP2 / composable DDP,
exact clipping, the torchrun example, and HF Trainer."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import train_cases
from example_runs import run_example
from numerics import TOL, rel_err

from tpfx.launch import launch

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("engine", ["fsdp", "replicate", "fsdp+sp"])
def test_tp2_x_dp2_with_torch_clipping_matches_one_unsharded_process(engine: str) -> None:
    res = launch(train_cases.dp_2d_check, 4, engine, timeout_s=400)
    by_dp: dict[int, list[list[int]]] = {}
    for r in res:
        by_dp.setdefault(r["coords"][0], []).append(r["sampler"])
    assert all(a == b for a, b in by_dp.values()), by_dp  # tp ranks of one group read the same samples
    assert not set(by_dp[0][0]) & set(by_dp[1][0]), by_dp  # the dp groups read different ones
    for r in res:
        assert r["tp_world"] == 2 and r["dp"] == 2, r
        assert rel_err(torch.tensor(r["losses"]), torch.tensor(r["ref_losses"])) <= TOL, r
        assert rel_err(torch.tensor(r["norms"]), torch.tensor(r["ref_norms"])) <= TOL, r
        assert min(r["ref_norms"]) > train_cases.MAX_NORM, r  # clipping engaged at every step
        local, tp_only, total = r["bytes"]
        assert tp_only <= 0.51 * total, r["bytes"]  # tp alone: half (+ the replicated norms); docs/training.md
        if engine.startswith("fsdp"):  # FSDP2 shards every rank's tp slices again over dp: a quarter (+ padding)
            assert local <= 0.26 * total, r["bytes"]
        else:
            assert local == tp_only, r["bytes"]
        for what, msg in r["errors"].items():  # tpfx.save reads this rank's slices: it refuses the wrapper's shards
            assert "data-parallel wrapper" in msg and "torch.nn.utils.clip_grad_norm_" in msg, (what, msg)


def test_dropout_trains_as_the_unsharded_model() -> None:
    for mode, res in zip(("tp", "sp"), zip(*launch(train_cases.dropout_checks, 2, timeout_s=300))):
        assert torch.equal(res[0]["first_state"], res[1]["first_state"]), mode  # seeded apart, drawing alike
        for r in res:
            assert min(abs(r["ref_losses"][i] - r["ref_losses"][i + 1]) for i in range(2)) > 0, r  # steps move it
            assert rel_err(torch.tensor(r["losses"]), torch.tensor(r["ref_losses"])) <= TOL, (mode, r)
            assert r["grad_err"] <= TOL and r["eval"] <= TOL and r["train"] <= TOL, (mode, r)


def test_mesh_without_the_axis_and_wrapped_models_are_refused() -> None:
    for r in launch(train_cases.mesh_errors, 2, timeout_s=200):
        assert "no axis named 'tp'" in r["no_axis"] and "('dp',)" in r["no_axis"], r
        assert "already wrapped for data parallelism" in r["wrapped"], r


def test_tp_ranks_fed_different_batches_raise_on_every_rank() -> None:
    for r in launch(train_cases.different_batches, 2, timeout_s=300):
        assert "ranks disagree on the inputs of the first call" in r["first"] and "dp_sampler" in r["first"], r
        assert r["checked_once"] == "True", r


def test_the_ddp_class_is_refused_not_silently_unreduced() -> None:
    for msg in launch(train_cases.ddp_class_refused, 4, timeout_s=300):
        assert "does not average the gradients of DTensor parameters" in msg and "replicate(" in msg, msg


def test_torchrun_example_dp2_x_tp2() -> None:
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4",
                          str(root / "examples" / "train.py")], capture_output=True, text=True, timeout=500,
                         cwd=root, env={**__import__("os").environ, "STEPS": "3"})
    assert out.returncode == 0, out.stderr[-3000:]
    steps = [line for line in out.stdout.splitlines() if line.startswith("step ")]
    assert len(steps) == 3 and all("grad_norm" in s for s in steps), out.stdout


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_hf_trainer_matches_the_unsharded_trainer(family: str, tmp_path: Path) -> None:
    # Llama: GQA; GPT-2: fused c_attn (a _StridedShard DTensor) and tied embeddings
    for r in launch(train_cases.hf_trainer_check, 2, family, str(tmp_path), timeout_s=400):
        log, ref = r["log"], r["ref_log"]
        assert len(log) == len(ref) == 5, r
        assert all(h["grad_norm"] > train_cases.MAX_NORM / 2 for h in ref), ref  # clipping engaged every step
        for key in ("loss", "grad_norm"):
            assert rel_err(torch.tensor([h[key] for h in log]), torch.tensor([h[key] for h in ref])) <= TOL, r
        assert abs(r["held"] - r["ref_held"]) <= TOL * abs(r["ref_held"]), r  # the trained models too
        assert r["loaded"], r  # tpfx.save(sharded, optimizer=trainer.optimizer) reloads exactly


def test_trainer_checkpoints_resume_as_the_uninterrupted_run(tmp_path: Path) -> None:
    # tpfx.TrainerCheckpoints: Trainer's save steps (2 of 6, save_total_limit=2) write checkpoints Trainer resumes
    # from; GPT-2 with dropout 0.1, so the random state must come back too (without it steps 5-6 differ)
    for r in launch(train_cases.trainer_resume_check, 2, str(tmp_path), timeout_s=400):
        assert r["kept"] == ["checkpoint-4", "checkpoint-6"], r["kept"]
        log, resumed = r["log"], r["resumed"]
        assert [h["step"] for h in resumed] == [1, 2, 3, 4, 5, 6], resumed  # steps 1-4 from checkpoint-4's state
        assert all(h["grad_norm"] > train_cases.MAX_NORM / 2 for h in log), log  # clipping engaged
        assert resumed == log, (resumed, log)  # steps 5-6 trained again: the same losses, grad norms, lr
        assert r["same_weights"]  # bit for bit
        assert r["reload_err"] == 0.0  # checkpoint-6 read back by from_pretrained is the trained model


def test_readme_trainer_example_runs() -> None:
    stdout = run_example("trainer.py")
    steps = [line for line in stdout.splitlines() if line.startswith("step ")]
    assert len(steps) == 5, stdout
    for line in steps:  # "step k: loss A (unsharded B)  grad_norm C (unsharded D)"
        a, b, c, d = (float(x) for x in re.findall(r"\d+\.\d+", line))
        assert abs(a - b) <= 1e-5 * b and abs(c - d) <= 1e-5 * d, line
    assert "steps 4-5 as the uninterrupted run: True" in stdout, stdout
    assert float(re.findall(r"rel err (\S+)", stdout)[0]) <= 1e-5, stdout


def test_lightning_model_parallel_strategy_example_trains_as_unsharded(tmp_path) -> None:
    # Lightning's ModelParallelStrategy (dp=2 x tp=2 on 4 CPU processes), configure_model = tpfx.auto_shard over
    # its tensor_parallel axis + FSDP2 over data_parallel, gradient_clip_val=0.5: the unsharded model's losses
    # on the same global batches
    import json

    run_example("lightning_tp.py", str(tmp_path / "out.json"))
    res = json.loads((tmp_path / "out.json").read_text())
    assert len(res["tpfx"]) == len(res["unsharded"]) == 3, res
    assert rel_err(torch.tensor(res["tpfx"]), torch.tensor(res["unsharded"])) <= TOL, res
