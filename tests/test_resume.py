"""Checkpoints are atomic and `resume: auto` reaches the same weights as an uninterrupted run."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import run_cli, write_jsonl
from posttrain.checkpoint import find_resume_checkpoint, list_checkpoints
from test_train import base_config, sft_rows


def test_killed_run_resumes_to_identical_weights(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows(40))
    configs = {}
    for name in ("straight", "killed"):
        body = base_config(tiny_model, data, tmp_path / name, train={"max_steps": 60, "save_steps": 5,
                                                                      "save_total_limit": 2, "batch_size": 4},
                           data={"eval_fraction": 0.1}, resume="auto")
        configs[name] = tmp_path / f"{name}.yaml"
        configs[name].write_text(yaml.safe_dump(body))

    run_cli("train", configs["straight"])

    killed_out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "posttrain.cli", "train", str(configs["killed"])],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=os.environ.copy())
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if len(list_checkpoints(killed_out / "checkpoints")) and \
                list_checkpoints(killed_out / "checkpoints")[-1].name != "step-5":
            break
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (killed_out / "summary.json").exists()
    newest = find_resume_checkpoint("auto", killed_out)
    assert newest is not None and int(newest.name.split("-")[1]) < 60

    result = run_cli("train", configs["killed"])
    assert "resuming from" in result.stderr

    straight = load_file(str(tmp_path / "straight" / "model.safetensors"))
    resumed = load_file(str(killed_out / "model.safetensors"))
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], atol=1e-6, rtol=1e-5, msg=key)
    steps = [json.loads(line)["step"] for line in (killed_out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 61))
    assert len(list_checkpoints(killed_out / "checkpoints")) <= 2


def test_partial_checkpoint_is_never_picked(tmp_path):
    root = tmp_path / "out" / "checkpoints"
    (root / "step-4").mkdir(parents=True)
    (root / "step-4" / "trainer_state.json").write_text("{}")
    (root / ".partial-step-8").mkdir()
    (root / ".partial-step-8" / "trainer_state.json").write_text("{}")
    (root / "step-12").mkdir()  # renamed without its state file: not complete either
    assert find_resume_checkpoint("auto", tmp_path / "out").name == "step-4"
    assert find_resume_checkpoint(None, tmp_path / "out") is None


def test_resume_refuses_a_different_batch_plan(tiny_model, tmp_path):
    from posttrain.config import build_config
    from posttrain.errors import ConfigError
    from posttrain.train import run_training

    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows(16))
    body = base_config(tiny_model, data, tmp_path / "out", train={"max_steps": 4, "save_steps": 2},
                       resume="auto")
    run_training(build_config(body))
    for item in (tmp_path / "out").iterdir():  # back to a run that died after its step-2 checkpoint
        if item.name not in ("checkpoints", "config.yaml", "metrics.jsonl"):
            item.unlink() if item.is_file() else shutil.rmtree(item)
    changed = base_config(tiny_model, data, tmp_path / "out", train={"max_steps": 4, "save_steps": 2,
                                                                     "batch_size": 2}, resume="auto")
    try:
        run_training(build_config(changed))
    except ConfigError as exc:
        assert "different batch plan" in str(exc)
    else:
        raise AssertionError("resuming with another batch size must be refused")
    assert build_config({**body, "resume": False}).resume is None


@pytest.mark.parametrize("variant", ["lora_dropout", "gradual_unfreeze", "grad_accum"])
def test_resume_matches_an_uninterrupted_run(tiny_model, tmp_path, variant):
    """Resume from a mid-run checkpoint (the final output removed) and compare with a straight run."""
    import shutil

    from posttrain.config import build_config
    from posttrain.train import run_training

    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows(16))
    sections = {"lora_dropout": {"adapter": {"type": "lora", "r": 4, "dropout": 0.1}},
                "gradual_unfreeze": {"freeze": {"trainable_layers": 1, "gradual_unfreeze": True}},
                "grad_accum": {"train": {"grad_accum": 2, "batch_size": 2}}}[variant]
    train = {"max_steps": 8, "save_steps": 3, "save_total_limit": 5, **sections.get("train", {})}
    extra = {k: v for k, v in sections.items() if k != "train"}
    outputs = {}
    for name in ("straight", "resumed"):
        body = base_config(tiny_model, data, tmp_path / name, train=train, resume="auto", **extra)
        run_training(build_config(body))
        outputs[name] = tmp_path / name
    resumed = outputs["resumed"]
    weights_file = "adapter_model.safetensors" if variant == "lora_dropout" else "model.safetensors"
    for item in resumed.iterdir():  # back to the state of a run that died after its step-6 checkpoint
        if item.name != "checkpoints":
            shutil.rmtree(item) if item.is_dir() else item.unlink()
    assert [p.name for p in list_checkpoints(resumed / "checkpoints")][-1] == "step-6"
    run_training(build_config(base_config(tiny_model, data, resumed, train=train, resume="auto", **extra)))
    straight = load_file(str(outputs["straight"] / weights_file))
    again = load_file(str(resumed / weights_file))
    for key in straight:
        torch.testing.assert_close(again[key], straight[key], atol=1e-6, rtol=1e-5, msg=key)
