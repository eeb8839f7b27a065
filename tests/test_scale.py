"""What a GPU user relies on, checked on the CPU: devices and dtypes resolved with one-line errors, log-probs
computed chunk by chunk (no [tokens, vocab] tensor) with the gradients of the plain computation, models placed
in the dtype asked for, the 8-bit optimizer, gradient checkpointing of a separate critic."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from posttrain import forward, modeling
from posttrain.errors import ConfigError
from posttrain.forward import HeadLogps, token_logps


# ------------------------------------------------------------------------------------------- devices, dtypes

def test_device_and_dtype_resolution():
    assert modeling.resolve_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu") or \
        modeling.resolve_device("auto").type == "mps"
    assert modeling.resolve_device("cpu") == torch.device("cpu")
    assert modeling.resolve_dtype("auto", "cpu") == torch.float32
    assert modeling.resolve_dtype("fp32", "cpu") == torch.float32
    assert modeling.resolve_dtype("float32", "cpu") == torch.float32  # the long names are accepted too
    for bad, words in (("gpu", "choose one of auto, cuda, cuda:N, mps, cpu"), ("cuda:x", "choose one of")):
        with pytest.raises(ConfigError, match=words):
            modeling.resolve_device(bad)
    with pytest.raises(ConfigError, match="^--dtype int8: choose one of auto, bf16, fp16, fp32$"):
        modeling.resolve_dtype("int8", "cpu")
    with pytest.raises(ConfigError, match="^--dtype fp16: fp16 is for GPUs"):
        modeling.resolve_dtype("fp16", "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU, so --device cuda is valid here")
def test_missing_cuda_is_one_line_naming_the_flag():
    with pytest.raises(ConfigError) as caught:
        modeling.resolve_device("cuda", flag="device:")
    message = str(caught.value)
    assert message.startswith("device: cuda: no CUDA GPU is visible here") and "\n" not in message


def test_bf16_on_a_cpu_without_it_is_refused(monkeypatch):
    """Whether this CPU has native bf16 is read from /proc/cpuinfo; both answers are checked."""
    monkeypatch.setattr(modeling, "fast_bf16", lambda: False)
    with pytest.raises(ConfigError, match="^--dtype bf16: this CPU has no native bf16"):
        modeling.resolve_dtype("bf16", "cpu")
    monkeypatch.setattr(modeling, "fast_bf16", lambda: True)
    assert modeling.resolve_dtype("bf16", "cpu") == torch.bfloat16


# ------------------------------------------------------------------------------------------- chunked log-probs

def plain_logps(hidden, weight, bias, targets, temperature):
    logits = F.linear(hidden, weight, bias).float() / temperature
    return -F.cross_entropy(logits, targets, reduction="none"), logits


@pytest.mark.parametrize("chunk_rows", [3, 1000])  # several chunks (recomputed in the backward) / one chunk (kept)
@pytest.mark.parametrize("with_bias", [False, True])
def test_head_logps_equal_plain_logits_and_gradients(monkeypatch, chunk_rows, with_bias):
    torch.manual_seed(0)
    rows, width, vocab, temperature = 10, 16, 50, 0.7
    monkeypatch.setattr(forward, "CHUNK_ELEMENTS", chunk_rows * vocab)
    hidden = torch.randn(rows, width, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(vocab, width, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(vocab, dtype=torch.float64, requires_grad=True) if with_bias else None
    targets = torch.randint(0, vocab, (rows,))
    upstream = torch.randn(rows, dtype=torch.float32)

    logps, entropy = HeadLogps.apply(hidden, weight, bias, targets, temperature, True)
    (logps * upstream).sum().backward()
    ours = [t.grad.clone() for t in (hidden, weight, bias) if t is not None]
    for t in (hidden, weight, bias):
        if t is not None:
            t.grad = None
    expected, logits = plain_logps(hidden, weight, bias, targets, temperature)
    (expected * upstream).sum().backward()
    theirs = [t.grad for t in (hidden, weight, bias) if t is not None]

    torch.testing.assert_close(logps, expected.float(), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(entropy, forward.entropy_of(logits.detach()).float(), atol=1e-5, rtol=1e-5)  # fp32 vs fp64
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    assert not entropy.requires_grad


def test_head_logps_under_bf16_autocast_match_the_models_own_head(monkeypatch):
    """Under autocast the chunked path multiplies in bf16 like the model's own head would, then works in fp32."""
    torch.manual_seed(0)
    monkeypatch.setattr(forward, "CHUNK_ELEMENTS", 4 * 64)
    head = torch.nn.Linear(32, 64, bias=False)
    hidden = torch.randn(9, 32, requires_grad=True)
    targets = torch.randint(0, 64, (9,))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logps, _ = HeadLogps.apply(hidden, head.weight, None, targets, 1.0, False)
        logits = head(hidden)
    assert logits.dtype == torch.bfloat16
    expected = -F.cross_entropy(logits.float(), targets, reduction="none")
    torch.testing.assert_close(logps, expected, atol=1e-6, rtol=1e-6)
    logps.sum().backward()
    assert hidden.grad.dtype == torch.float32 and head.weight.grad.dtype == torch.float32


def test_token_logps_of_a_model_never_builds_vocab_sized_rows_for_more_than_a_chunk(tiny_model, monkeypatch):
    """On a real model: the chunked log-probs and their gradients equal the full-logits computation, and the
    largest float tensor the forward and backward allocate is one chunk of logits, not [tokens, vocab]."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    vocab = model.config.vocab_size
    monkeypatch.setattr(forward, "CHUNK_ELEMENTS", 8 * vocab)
    torch.manual_seed(1)
    input_ids = torch.randint(5, vocab, (3, 20))
    labels = input_ids.clone()
    labels[:, :4] = -100
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    trained = int((labels[:, 1:] != -100).sum())

    reference = copy.deepcopy(model)
    logits = reference(input_ids=input_ids).logits[:, :-1].float()
    expected = -F.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), reduction="none", ignore_index=-100)
    expected = expected[labels[:, 1:].flatten() != -100]
    expected.sum().backward()

    largest = []

    def track(tensor):
        if tensor.is_floating_point() and tensor.dim() == 2 and tensor.shape[-1] == vocab:
            largest.append(tensor.shape[0])
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(track, lambda t: t):
        reference(input_ids=input_ids).logits.float().log_softmax(-1).sum()
    assert largest, "the hook sees the full forward's logits"
    largest.clear()
    with torch.autograd.graph.saved_tensors_hooks(track, lambda t: t):
        out = token_logps(model, batch)
    out["logps"].sum().backward()
    assert out["logps"].shape == (trained,) and out["logits"] is None
    torch.testing.assert_close(out["logps"], expected.detach(), atol=1e-5, rtol=1e-5)
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a.grad, b.grad, atol=1e-5, rtol=1e-4, msg=name)
    assert largest == []  # no [tokens, vocab] logits were kept for the backward (the full forward keeps several)


@pytest.mark.parametrize("chunk_rows", [None, 4])
def test_under_ddp_the_head_runs_on_trained_positions_only(tiny_model, tmp_path, monkeypatch, chunk_rows):
    """A DistributedDataParallel-wrapped model (one gloo process) goes through its wrapper and still applies the
    head to the 20 trained positions only (not the 32 of the batch); in chunks, it keeps no vocab-sized rows at
    all. The log-probs are those of the bare model."""
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32)
    vocab = model.config.vocab_size
    if chunk_rows:
        monkeypatch.setattr(forward, "CHUNK_ELEMENTS", chunk_rows * vocab)
    input_ids = torch.randint(5, vocab, (2, 16), generator=torch.Generator().manual_seed(0))
    labels = input_ids.clone()
    labels[:, :6] = -100
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": labels}
    expected = token_logps(model, batch)["logps"].detach()
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        wrapped = torch.nn.parallel.DistributedDataParallel(model)
        kept = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(tuple(t.shape)) or t, lambda t: t):
            out = token_logps(wrapped, batch)
        out["logps"].sum().backward()
    finally:
        dist.destroy_process_group()
    assert [shape for shape in kept if shape[-1] == vocab] == ([] if chunk_rows else [(20, vocab)])
    torch.testing.assert_close(out["logps"], expected)
    assert model.lm_head.weight.grad is not None or model.model.embed_tokens.weight.grad is not None


# ------------------------------------------------------------------------------------------- errors, CLI

@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU, so the devices asked for exist")
def test_the_cli_and_a_training_config_refuse_a_missing_device_in_one_line(tiny_model, tmp_path):
    from conftest import run_cli, write_jsonl
    from test_train import base_config, sft_rows

    result = run_cli("score", "--model", tiny_model, "--data", "none.jsonl", "--out", tmp_path / "s.jsonl",
                     "--device", "cuda", check=False)
    assert result.returncode == 2 and result.stderr.startswith("error: --device cuda: no CUDA GPU is visible here")
    result = run_cli("generate", "--model", tiny_model, "--prompts", "none.jsonl", "--out", tmp_path / "g.jsonl",
                     "--dtype", "fp16", check=False)
    assert result.returncode == 2 and result.stderr == ("error: --dtype fp16: fp16 is for GPUs; on a CPU use --dtype "
                                                        f"fp32{' or bf16' if modeling.fast_bf16() else ''}\n")
    import yaml

    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows(8))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({**base_config(tiny_model, data, tmp_path / "out"),
                                                     "device": "cuda"}))
    result = run_cli("train", tmp_path / "c.yaml", check=False)
    assert result.returncode == 2 and result.stderr.splitlines()[-1].startswith(
        "error: device: cuda: no CUDA GPU is visible here")


# ------------------------------------------------------------------------------------------- placement, dtypes

def reward_model_dir(tiny_model, tmp_path):
    """A reward-model directory (a sequence classifier with one output) made from the tiny model."""
    out = tmp_path / "rm"
    model = modeling.load_model(str(tiny_model), "reward")
    model.save_pretrained(out)
    modeling.load_tokenizer(str(tiny_model)).save_pretrained(out)
    return out


@pytest.mark.skipif(not modeling.fast_bf16(), reason="bf16 frozen models need a CPU (or GPU) with native bf16")
def test_frozen_models_take_the_compute_dtype_and_the_critic_is_checkpointed(tiny_model, tmp_path):
    """PPO with a separate critic, a reward model and a reference copy under train.bf16: the trained weights stay
    fp32 (the master copy), the frozen ones (reference, reward model) are bf16, all on the run's device, and
    gradient checkpointing covers the critic as well as the policy."""
    from conftest import write_jsonl
    from posttrain.config import build_config
    from posttrain.train import build_trainer

    rm = reward_model_dir(tiny_model, tmp_path)
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Two plus three is"}] * 4)
    config = build_config({
        "stage": "ppo", "model": str(tiny_model), "output_dir": str(tmp_path / "out"),
        "data": {"train": str(prompts)}, "rewards": [{"model": str(rm)}],
        "generation": {"max_new_tokens": 4}, "train": {"batch_size": 2, "bf16": True, "gradient_checkpointing": True},
        "ppo": {"value_model": "reward", "reference": "copy"}})
    trainer, _ = build_trainer(config, tmp_path / "out")
    actor, device = trainer.raw_model, trainer.accelerator.device
    assert actor.policy.is_gradient_checkpointing and actor.critic.is_gradient_checkpointing
    assert {p.dtype for p in actor.parameters()} == {torch.float32}
    reference = trainer.ctx.reference.model
    reward_model = trainer.ctx.sources[0].fn.model
    for frozen in (reference, reward_model):
        assert {(p.dtype, p.device) for p in frozen.parameters()} == {(torch.bfloat16, device)}
    result = trainer.stage.step(trainer, trainer.units[:2], trainer.ctx)  # one real rollout and update
    assert torch.isfinite(torch.tensor(result["loss"]))


def test_pure_bf16_and_the_8bit_optimizer_train(tiny_model, tmp_path):
    """`dtype: bf16` trains bf16 weights with no fp32 copy; `train.optim: adamw_8bit` keeps 8-bit moments."""
    from conftest import write_jsonl
    from posttrain.config import build_config
    from posttrain.train import build_trainer
    from test_train import base_config, sft_rows

    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows(16))
    cases = [({"dtype": "bf16"}, torch.bfloat16)] if modeling.fast_bf16() else []
    cases.append(({"train": {"optim": "adamw_8bit", "max_steps": 3, "batch_size": 4, "lr": 3e-3, "seed": 1}},
                  torch.float32))
    for extra, dtype in cases:
        out = tmp_path / f"out-{dtype}"
        trainer, _ = build_trainer(build_config({**base_config(tiny_model, data, out), **extra}), out)
        assert {p.dtype for p in trainer.raw_model.parameters()} == {dtype}
        losses = [trainer._train_step(step)["loss"] for step in trainer._epoch_steps(0)[:3]]
        assert losses[-1] < losses[0]
        if extra.get("train", {}).get("optim") == "adamw_8bit":
            state = trainer.optimizer.optimizer.state[trainer.raw_model.model.embed_tokens.weight]
            assert state["state1"].dtype == torch.uint8 and state["state2"].dtype == torch.uint8
        else:
            assert trainer.accelerator.mixed_precision == "no"


# ------------------------------------------------------------------------------------------- the GPU check

@pytest.mark.skipif(torch.cuda.is_available(), reason="on a CUDA machine run the real check: make gpu-check")
def test_gpu_check_dry_run_runs_every_stage_and_command(tmp_path):
    """`scripts/gpu_check.sh --cpu-smoke` (the GPU check's own code, a tiny model, on the CPU: bf16 where the
    CPU has it, fp32 otherwise) trains every stage, answers eval, generate and serve over HTTP, asserts each
    model's placement and dtype, and writes the table; so the check cannot rot while no GPU runs it."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([str(root / "scripts" / "gpu_check.sh"), "--cpu-smoke", "--out", str(tmp_path)],
                            env={**os.environ, "PYTHON": sys.executable}, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    table = (tmp_path / "gpu_check.md").read_text()
    half = "bf16" if modeling.fast_bf16() else "fp32"
    assert f"measured {half} matmul rate" in table
    for stage in ("sft", "sft-lora", "rm", "dpo", "grpo", "ppo", "eval", "generate", "serve"):
        assert f"\n| {stage} | " in table, stage
    assert "FAIL" not in result.stdout + result.stderr
