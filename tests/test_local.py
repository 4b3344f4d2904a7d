"""One process, several devices (``auto_shard(model, devices=["cpu"] * t)``): the ranks' graphs on threads of
this process, joined to the caller's autograd graph. Compared with the unsharded model on the same inputs:
forward, gradients of every exposed piece, 3 AdamW steps with torch's clipping, generate, state_dict,
save_pretrained; and the calls it refuses."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from models import llama, token_inputs
from numerics import GRAD_FLOOR_FRACTION, TOL, rel_err
from train_cases import dropout_gpt2
from transformers import LlamaConfig, LlamaForCausalLM

import tpfx


def _uneven() -> LlamaForCausalLM:
    """8 query heads of 8 and 2 key/value heads: on 3 ranks 3/3/2 query heads, key/value heads held by groups."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, use_cache=False)
    return LlamaForCausalLM(cfg)


@pytest.fixture(scope="module")
def llama_t2() -> tuple[Any, torch.nn.Module]:
    model = llama(num_kv_heads=2)
    model.train()
    return tpfx.auto_shard(copy.deepcopy(model), devices=["cpu"] * 2), model


def _twin(sharded: Any, model: torch.nn.Module) -> torch.nn.Module:
    """The unsharded model with the sharded one's weights now (its ``state_dict``: the fixture trains)."""
    ref = copy.deepcopy(model)
    ref.load_state_dict(sharded.state_dict())
    return ref


def _grads_match(sharded: Any, ref: torch.nn.Module, got: list[torch.Tensor] | None = None) -> None:
    """Every exposed piece's gradient (or ``got``, in ``named_parameters`` order) is the unsharded gradient's
    slice (mathematically zero gradients, noise of ~1e-11, compared with the suite's floor)."""
    scale = max(p.grad.abs().max().item() for p in ref.parameters() if p.grad is not None)
    names = [n for n, _ in sharded.named_parameters()]
    grads = got if got is not None else [p.grad for _, p in sharded.named_parameters()]
    for name, g in zip(names, grads, strict=True):
        assert rel_err(g, _piece_grad(name, ref), floor=GRAD_FLOOR_FRACTION * scale) <= TOL, name


def _piece_grad(name: str, ref: torch.nn.Module) -> torch.Tensor:
    """The unsharded gradient of the piece an exposed parameter name spells (``fqn[:, a:b]`` or ``fqn``)."""
    fqn, _, cut = name.partition("[")
    g = ref.get_parameter(fqn).grad
    if not cut:
        return g
    *_, span = cut.rstrip("]").split(", ")
    a, b = map(int, span.split(":"))
    return g.narrow(cut.count(":, "), a, b - a)


@pytest.mark.parametrize("case", ["llama_t2", "uneven_t3"])
def test_three_adamw_steps_with_clipping_match_unsharded(case: str, llama_t2: tuple[Any, torch.nn.Module]) -> None:
    if case == "llama_t2":
        sharded, model = llama_t2
        ref = _twin(sharded, model)
    else:
        model = _uneven()
        model.train()
        ref = copy.deepcopy(model)
        sharded = tpfx.auto_shard(model, devices=["cpu"] * 3)
    assert sum(p.numel() for p in sharded.parameters()) == sum(p.numel() for p in ref.parameters())
    opt = torch.optim.AdamW(sharded.parameters(), lr=1e-2)
    ropt = torch.optim.AdamW(ref.parameters(), lr=1e-2)
    for step in range(3):
        ids = token_inputs(ref.config.vocab_size, seed=10 + step)
        out = sharded(input_ids=ids, labels=ids)
        want = ref(input_ids=ids, labels=ids)
        assert rel_err(out.logits, want.logits) <= TOL
        assert rel_err(out.loss, want.loss) <= TOL
        out.loss.backward()
        want.loss.backward()
        if step == 0:
            _grads_match(sharded, ref)
        norm = torch.nn.utils.clip_grad_norm_(sharded.parameters(), 0.5)
        rnorm = torch.nn.utils.clip_grad_norm_(ref.parameters(), 0.5)
        assert rel_err(norm, rnorm) <= TOL
        opt.step()
        ropt.step()
        opt.zero_grad()
        ropt.zero_grad()
    full, want_sd = sharded.state_dict(), ref.state_dict()
    assert list(full) == list(want_sd)
    ids = token_inputs(ref.config.vocab_size, seed=99)
    with torch.no_grad():  # the trained models agree (Adam's step amplifies fp32 noise of near-zero gradients)
        assert rel_err(sharded(input_ids=ids).logits, ref(input_ids=ids).logits) <= TOL


def test_parameters_are_the_unsharded_elements_once(llama_t2: tuple[Any, torch.nn.Module]) -> None:
    sharded, model = llama_t2
    names = dict(sharded.named_parameters())
    # a replicated weight is one parameter; a split one a piece per rank, named by its rows
    assert "model.norm.weight" in names
    q = [n for n in names if n.startswith("model.layers.0.self_attn.q_proj.weight")]
    assert q == ["model.layers.0.self_attn.q_proj.weight[0:32]", "model.layers.0.self_attn.q_proj.weight[32:64]"]
    o = [n for n in names if n.startswith("model.layers.0.self_attn.o_proj.weight")]
    assert o == ["model.layers.0.self_attn.o_proj.weight[:, 0:32]", "model.layers.0.self_attn.o_proj.weight[:, 32:64]"]
    ids = token_inputs(model.config.vocab_size, seed=3)
    loss = sharded(input_ids=ids, labels=ids).loss
    got = torch.autograd.grad(loss, list(names.values()))  # torch.autograd.grad reaches the pieces too
    ref = _twin(sharded, model)
    ref(input_ids=ids, labels=ids).loss.backward()
    _grads_match(sharded, ref, list(got))


def test_differentiable_inputs_and_no_grad(llama_t2: tuple[Any, torch.nn.Module]) -> None:
    sharded, model = llama_t2
    ref = _twin(sharded, model)
    torch.manual_seed(5)
    emb = torch.randn(2, 8, model.config.hidden_size, requires_grad=True)
    remb = emb.detach().clone().requires_grad_()
    out = sharded(inputs_embeds=emb).logits
    want = ref(inputs_embeds=remb).logits
    assert rel_err(out, want) <= TOL
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    (want * torch.linspace(-1, 1, want.shape[-1])).sum().backward()
    assert rel_err(emb.grad, remb.grad) <= TOL
    with torch.no_grad():
        plain = sharded(inputs_embeds=emb).logits
    assert not plain.requires_grad and rel_err(plain, want) <= TOL


def test_generate_and_save_pretrained(llama_t2: tuple[Any, torch.nn.Module], tmp_path: Any) -> None:
    sharded, model = llama_t2
    ref = _twin(sharded, model).eval()
    sharded.eval()
    try:
        ids = token_inputs(model.config.vocab_size, seed=7)
        with torch.no_grad():
            got = sharded.generate(ids, max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(ids))
            want = ref.generate(ids, max_new_tokens=6, do_sample=False, attention_mask=torch.ones_like(ids))
        assert torch.equal(got, want)
        sharded.save_pretrained(str(tmp_path))
        back = LlamaForCausalLM.from_pretrained(str(tmp_path))
        for k, v in ref.state_dict().items():
            assert rel_err(back.state_dict()[k], v) <= TOL, k
        loaded = tpfx.from_pretrained(str(tmp_path), devices=["cpu"] * 3)  # each rank reads its slices
        with torch.no_grad():
            assert rel_err(loaded(input_ids=ids).logits, ref(input_ids=ids).logits) <= TOL
        assert sum(p.numel() for p in loaded.parameters()) == sum(p.numel() for p in ref.parameters())
        loaded.close()
    finally:
        sharded.train()


def test_a_failing_rank_raises_and_the_ranks_stay_usable(llama_t2: tuple[Any, torch.nn.Module]) -> None:
    sharded, model = llama_t2
    ids = token_inputs(model.config.vocab_size, seed=2)
    with pytest.raises(Exception, match="index|out of range|labels"):
        sharded(input_ids=ids, labels=ids[:, :3])  # labels of another length: every rank's loss fails
    out = sharded(input_ids=ids, labels=ids)
    assert rel_err(out.loss, _twin(sharded, model)(input_ids=ids, labels=ids).loss) <= TOL


def test_dropout_and_sampling_draw_the_unsharded_numbers() -> None:
    """Ranks on threads share torch's generator: each draws from its own copy of the caller's state, as
    processes seeded alike do, and the caller's generator ends where the unsharded model's would."""
    model = dropout_gpt2()  # resid/attn/embd dropout 0.1
    model.train()
    ref = copy.deepcopy(model)
    sharded = tpfx.auto_shard(copy.deepcopy(model), devices=["cpu"] * 2)
    ids = token_inputs(model.config.vocab_size)
    for seed in (0, 1):
        torch.manual_seed(seed)
        out = sharded(input_ids=ids, labels=ids)
        after = torch.rand(3)
        torch.manual_seed(seed)
        want = ref(input_ids=ids, labels=ids)
        assert torch.equal(after, torch.rand(3))
        assert rel_err(out.logits, want.logits) <= TOL
        out.loss.backward()
        want.loss.backward()
    _grads_match(sharded, ref)
    sharded.eval()
    ref.eval()
    prompt = token_inputs(model.config.vocab_size, seq=4, seed=8)
    torch.manual_seed(4)
    got = sharded.generate(prompt, max_new_tokens=6, do_sample=True, attention_mask=torch.ones_like(prompt))
    torch.manual_seed(4)
    want_tokens = ref.generate(prompt, max_new_tokens=6, do_sample=True, attention_mask=torch.ones_like(prompt))
    assert torch.equal(got, want_tokens)


@pytest.mark.parametrize("devices, error, match", [
    ("cpu", ValueError, "a list of devices"),
    (["cpu", "meta"], ValueError, "mixes device kinds"),
    (["cuda:0", "cuda:1"], ValueError, "is_available"),
    (["xla:0"], NotImplementedError, "CPU or CUDA"),
    (["nodevice:0"], ValueError, "nodevice"),
])
def test_bad_devices_are_refused(devices: Any, error: type, match: str) -> None:
    with pytest.raises(error, match=match):
        tpfx.auto_shard(llama(), devices=devices)


def test_world_size_and_group_must_agree_with_devices() -> None:
    with pytest.raises(ValueError, match="world_size=3 but devices= names 2"):
        tpfx.auto_shard(llama(), 3, devices=["cpu"] * 2)


def test_verify_reports_per_layer_and_catches_a_wrong_collective(monkeypatch: pytest.MonkeyPatch) -> None:
    model = llama(num_kv_heads=1)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    report = tpfx.verify(model, 4)
    assert report.ok and report.worst <= TOL
    rows = {r.name: r for r in report.rows}
    assert rows["model.layers.0"].collectives == {"all_reduce": 2}  # Megatron's two per layer, kv=1 at t=4
    assert all(r.grad_error is not None and r.grad_error <= TOL for r in report.rows if r.params)
    assert all(torch.equal(p, before[n]) and p.grad is None for n, p in model.named_parameters())
    assert "ok" in str(report) and "model.layers.1" in str(report)
    from torch.testing._internal.distributed import multi_threaded_pg

    work = multi_threaded_pg.AllReduce.work

    def off_by_a_little(self: Any, data: Any) -> Any:  # an all-reduce that is 0.1% off
        out = work(self, data)
        for tensors in data:
            for t in tensors:
                t.mul_(1 + 1e-3)
        return out

    monkeypatch.setattr(multi_threaded_pg.AllReduce, "work", off_by_a_little)
    bad = tpfx.verify(model, 2)
    assert not bad.ok and bad.worst > 1e-4
    assert "FAILED" in str(bad)


def test_verify_on_the_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    from tpfx.cli import main

    shape = ["llama", "-t", "3", "--layers", "1", "--hidden", "48", "--heads", "6", "--kv-heads", "2",
             "--intermediate", "64", "--vocab", "64"]
    assert main(["verify", *shape]) == 0
    out = capsys.readouterr().out
    assert "grads model.layers.0" in out and ": ok;" in out
    assert main(["verify", *shape, "--tol", "1e-12"]) == 1  # fp32 noise exceeds it: a non-zero exit
    assert "FAILED" in capsys.readouterr().out


def _one_step_matches(**shard_kwargs: Any) -> Any:
    """A Llama sharded on 2 threads with ``shard_kwargs``: logits and every piece's gradient as unsharded."""
    model = llama()
    model.train()
    ref = copy.deepcopy(model)
    sharded = tpfx.auto_shard(copy.deepcopy(model), devices=["cpu"] * 2, **shard_kwargs)
    ids = token_inputs(model.config.vocab_size)
    out = sharded(input_ids=ids, labels=ids)
    want = ref(input_ids=ids, labels=ids)
    assert rel_err(out.logits, want.logits) <= TOL
    out.loss.backward()
    want.loss.backward()
    _grads_match(sharded, ref)
    sharded.close()
    return sharded


@pytest.mark.slow
@pytest.mark.one_process
def test_compile_on_threads_matches_unsharded() -> None:
    """compile=True: each rank thread compiles its graph (torch.compile's lock and tpfx's keep tracing one at a
    time)."""
    _one_step_matches(compile=True)


def test_sequence_parallel_on_threads() -> None:
    assert _one_step_matches(sequence_parallel=True).plan.count("reduce_scatter") > 0


def test_gpu_check_skips_cleanly_without_a_gpu() -> None:
    import subprocess
    import sys
    from pathlib import Path

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: scripts/gpu_check.sh runs its checks (not a test dependency)")
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run(["bash", str(root / "scripts" / "gpu_check.sh")], capture_output=True, text=True,
                          timeout=120, env={**__import__("os").environ, "PYTHON": sys.executable})
    assert done.returncode == 0 and "no CUDA device: skipped" in done.stdout, done.stderr[-1000:]


def test_devices_inside_a_launched_rank_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.distributed as dist

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    with pytest.raises(RuntimeError, match="already initialised"):
        tpfx.auto_shard(llama(), devices=["cpu"] * 2)
    with pytest.raises(ValueError, match="cannot be combined with group="):
        tpfx.auto_shard(llama(), devices=["cpu"] * 2, group=object())


def test_moving_or_casting_is_refused_not_ignored(llama_t2: tuple[Any, torch.nn.Module]) -> None:
    sharded, _ = llama_t2
    for call in (lambda: sharded.half(), lambda: sharded.to(torch.float64), lambda: sharded.cpu()):
        with pytest.raises(NotImplementedError, match="convert the model first"):
            call()


def test_what_would_reach_one_rank_only_is_refused() -> None:
    """Module loops (one rank's modules), generate in training with dropout, checkpointed dropout: loud."""
    model = dropout_gpt2()  # dropout 0.1 (tests/models' gpt2 has none)
    model.train()
    sharded = tpfx.auto_shard(copy.deepcopy(model), devices=["cpu"] * 2)
    with pytest.raises(NotImplementedError, match="sharded.apply"):
        list(sharded.modules())
    prompt = token_inputs(model.config.vocab_size, seq=4)
    with pytest.raises(NotImplementedError, match="call .eval"):
        sharded.generate(prompt, max_new_tokens=2)

    def no_dropout(m: torch.nn.Module) -> None:
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0

    sharded.apply(no_dropout)  # every rank's modules: now the same as the unsharded model without dropout
    model.apply(no_dropout)
    ids = token_inputs(model.config.vocab_size)
    assert rel_err(sharded(input_ids=ids).logits, model(input_ids=ids).logits) <= TOL
    sharded.close()
    checkpointed = tpfx.auto_shard(dropout_gpt2(), devices=["cpu"] * 2, activation_checkpointing=True)
    checkpointed.train()
    with pytest.raises(NotImplementedError, match="checkpointed"):
        checkpointed(input_ids=ids, labels=ids)
