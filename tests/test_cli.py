"""The ``tpfx`` command line, end to end: subprocesses for the main paths, ``main()`` in-process for the rest."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from transformers import LlamaConfig

import tpfx
from tpfx import cli

ROOT = Path(__file__).resolve().parents[1]
LLAMA_MATRICES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
                  "mlp.up_proj", "mlp.down_proj")
# default LlamaConfig: hidden 4096, vocab 32000; synthesized example input_ids (2, 8); fp32
ACT_7B = 2 * 8 * 4096 * 4
SMALL = ["--hidden", "256", "--heads", "8", "--kv-heads", "4", "--intermediate", "512", "--vocab", "1000"]


def run_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), str(cwd or ""),
                                                                       os.environ.get("PYTHONPATH", "")]))}
    return subprocess.run([sys.executable, "-m", "tpfx.cli", *args], capture_output=True, text=True, env=env,
                          cwd=cwd or ROOT, timeout=120)


def test_plan_llama_json_in_a_subprocess() -> None:
    res = run_cli("plan", "llama", "--world-size", "2", "--layers", "2", "--format", "json")
    assert res.returncode == 0, res.stderr
    plan = tpfx.ShardingPlan.from_json(res.stdout)
    assert plan.world_size == 2 and len(plan.placements) == 2 * 9 + 3
    styles = Counter(p.style for p in plan.placements.values())
    assert styles == Counter({"colwise": 2 * 5 + 1, "rowwise": 2 * 2, "vocab": 1, "replicate": 2 * 2 + 1})
    for i in range(2):
        for m in LLAMA_MATRICES:
            want = "rowwise" if m in ("self_attn.o_proj", "mlp.down_proj") else "colwise"
            assert plan.placements[f"model.layers.{i}.{m}.weight"].style == want
    assert plan.placements["model.layers.1.mlp.down_proj.weight"].local_shape() == (4096, 11008 // 2)
    assert Counter(c.kind for c in plan.forward_collectives()) == Counter({"all_reduce": 1 + 2 * 2, "all_gather": 1})
    assert {c.bytes for c in plan.collectives if c.kind == "all_reduce"} == {ACT_7B}
    assert json.loads(res.stdout)["context"]["layers"] == {"model.layers": 2}


def test_plan_table_in_a_subprocess() -> None:
    res = run_cli("plan", "llama", "--world-size", "4", "--layers", "3", *SMALL)
    assert res.returncode == 0, res.stderr
    out = res.stdout
    rows = [ln for ln in out.splitlines() if ln.startswith("│ model.layers.*.")]
    assert len(rows) == 9 and all("│  3 │" in r or "│ 3 │" in r for r in rows)
    assert "world size 4" in out and "model.layers.* ×3" in out
    assert "per layer (model.layers.* ×3): forward 2 collectives" in out
    assert "Megatron reference: 2 × 3 layers × b·s 16 × h 256 × 4 B" in out and "(1.00× the reference)" in out


def test_config_json_with_70b_widths_plans_on_meta(tmp_path: Path) -> None:
    """A config.json with Llama-70B values (2 of its 80 layers, to stay fast): no weights are allocated."""
    LlamaConfig(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8, vocab_size=128256).save_pretrained(tmp_path)
    res = run_cli("plan", str(tmp_path / "config.json"), "--world-size", "8", "--layers", "2", "--format", "json",
                  "--dtype", "bfloat16")
    assert res.returncode == 0, res.stderr
    plan = tpfx.ShardingPlan.from_json(res.stdout)
    q, k = plan.placements["model.layers.1.self_attn.q_proj.weight"], plan.placements["model.layers.1.self_attn.k_proj.weight"]
    assert q.local_shape() == (1024, 8192) and k.local_shape() == (128, 8192)  # 8 KV heads: one per rank
    assert plan.placements["model.embed_tokens.weight"].local_shape() == (128256 // 8, 8192)
    assert {c.bytes for c in plan.collectives if c.kind == "all_reduce"} == {2 * 8 * 8192 * 2}  # bf16 b·s·h
    # and the directory form of MODEL
    res = run_cli("plan", str(tmp_path), "--world-size", "8", "--layers", "1", "--format", "tp_plan")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["model.layers.*.mlp.down_proj"] == "rowwise"


FACTORY = '''
import torch

class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(32, 64), torch.nn.Linear(64, 32)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))

def build():
    return MLP(), (torch.randn(4, 32),)

def bare():
    return MLP()
'''


def test_module_factory_in_a_subprocess(tmp_path: Path) -> None:
    (tmp_path / "my_models.py").write_text(FACTORY)
    res = run_cli("plan", "my_models:build", "--world-size", "2", "--format", "json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    plan = tpfx.ShardingPlan.from_json(res.stdout)
    assert {k: v.style for k, v in plan.placements.items()} == {
        "fc1.weight": "colwise", "fc1.bias": "shard", "fc2.weight": "rowwise", "fc2.bias": "replicate"}
    assert [(c.kind, c.bytes) for c in plan.forward_collectives()] == [("all_reduce", 4 * 32 * 4)]
    res = run_cli("plan", "my_models:bare", "--world-size", "2", cwd=tmp_path)  # no example inputs
    assert res.returncode == 1 and "example_inputs" in res.stderr and "Traceback" not in res.stderr


def test_user_errors_are_one_line() -> None:
    res = run_cli("plan", "no-such-model-type", "--world-size", "2")
    assert res.returncode == 2 and res.stderr.startswith("tpfx: error:") and "Traceback" not in res.stderr
    assert "transformers model type" in res.stderr


def test_help_reads_well() -> None:
    res = run_cli("--help")
    assert res.returncode == 0
    assert "plan" in res.stdout and "demo" in res.stdout and "examples:" in res.stdout
    res = run_cli("plan", "--help")
    for flag in ("--world-size", "--layers", "--hidden", "--format", "--override", "--explain", "-o"):
        assert flag in res.stdout
    for fmt in ("table", "json", "dot", "html", "tp_plan"):
        assert fmt in res.stdout


# ----------------------------------------------------------------------------- in-process (faster)


def main_out(capsys: pytest.CaptureFixture, *args: str) -> str:
    assert cli.main(list(args)) == 0
    return capsys.readouterr().out


def test_tp_plan_and_override(capsys: pytest.CaptureFixture) -> None:
    base = ["plan", "llama", "--world-size", "2", "--layers", "2", *SMALL]
    tp = json.loads(main_out(capsys, *base, "--format", "tp_plan"))
    assert tp == {"lm_head": "colwise", "model.embed_tokens": "rowwise",
                  **{f"model.layers.*.{m}": ("rowwise" if m in ("self_attn.o_proj", "mlp.down_proj") else "colwise")
                     for m in LLAMA_MATRICES}}
    pinned = tpfx.ShardingPlan.from_json(main_out(capsys, *base, "--format", "json", "--override",
                                                  "lm_head=replicate"))
    assert pinned.placements["lm_head.weight"].style == "replicate" and pinned.count("all_gather") == 0
    sp = tpfx.ShardingPlan.from_json(main_out(capsys, *base, "--format", "json", "--sequence-parallel"))
    assert sp.sequence_parallel and sp.count("all_reduce") == 0 and sp.count("reduce_scatter") == 5, sp.collectives


def test_dot_html_and_explain(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    base = ["plan", "llama", "--world-size", "2", "--layers", "3", *SMALL]
    dot = main_out(capsys, *base, "--format", "dot")
    assert dot.startswith("digraph") and "model.layers.* ×3" in dot
    html = tmp_path / "plan.html"
    main_out(capsys, *base, "--format", "html", "-o", str(html))
    page = html.read_text()
    assert page.startswith("<!DOCTYPE html>") and "model.layers.*.mlp.down_proj.weight" in page
    assert ("<svg" in page) == (shutil.which("dot") is not None)
    out = main_out(capsys, *base, "--explain", "model.layers.0.mlp.down_proj")
    assert "model.layers.0.mlp.down_proj.weight: rowwise" in out and "partial sum" in out


def test_compare_with_the_models_own_hf_plan(capsys: pytest.CaptureFixture) -> None:
    out = main_out(capsys, "plan", "llama", "--world-size", "2", "--layers", "2", *SMALL, "--format", "compare")
    # every Llama matrix agrees (the embedding too where the installed transformers shards it)
    assert re.search(r"(9 agree, 0 differ, 0 missing_theirs|8 agree, 0 differ, 1 missing_theirs), 0 missing_ours",
                     out), out
    assert re.search(r"lm_head\s+│ colwise\s+│ colwise_gather_output\s+│ agree", out)  # ForCausalLM._tp_plan


@pytest.mark.skipif(shutil.which("dot") is None, reason="Graphviz `dot` is not installed")
def test_svg_output(capsys: pytest.CaptureFixture, tmp_path: Path) -> None:
    svg = tmp_path / "plan.svg"
    assert cli.main(["plan", "gpt2", "--world-size", "2", "--layers", "2", "--hidden", "128", "--heads", "4",
                     "--format", "svg", "-o", str(svg)]) == 0
    text = svg.read_text()
    assert "<svg" in text and "transformer.h.* ×2" in text and "all_reduce" in text
