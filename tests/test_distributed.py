"""Two gloo processes under `accelerate launch` with the shipped configs give what one process gives with the same
global batch: DDP and FSDP2, SFT and DPO; FSDP2's final model is gathered into ordinary safetensors, its sharded
checkpoints resume a killed run to the same weights, and a resume under another world size says so.

Tolerances: losses within 1e-5 relative, weights within 2e-5 absolute (1e-4 relative) of the single process:
fp32 sums reduced over 2 processes round differently from one process's sums, nothing more."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import run_cli, write_jsonl
from test_preference_stages import pair_rows
from test_train import base_config, read_metrics, sft_rows

CONFIGS = Path(__file__).resolve().parent.parent / "examples" / "accelerate"
PORTS = iter(range(29517, 29600))


def launcher(config: Path, accelerate_config: str) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / accelerate_config),
            "--num_processes", "2", "--main_process_port", str(next(PORTS)), "-m", "posttrain.cli", "train",
            str(config)]


def launch(config: Path, accelerate_config: str) -> None:
    result = subprocess.run(launcher(config, accelerate_config), capture_output=True, text=True, timeout=900,
                            env=os.environ.copy())
    assert result.returncode == 0, result.stderr[-4000:]


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL the launcher and every process under it (torchrun starts its workers in sessions of their own)."""
    import psutil

    family = [process.pid] + [child.pid for child in psutil.Process(process.pid).children(recursive=True)]
    for pid in family:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait()
    psutil.wait_procs([p for p in map(_process, family[1:]) if p is not None], timeout=30)


def _process(pid: int):
    import psutil

    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None


def write(tmp_path: Path, name: str, body: dict) -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


def assert_same_curves(a: Path, b: Path, keys: tuple[str, ...] = ("loss",)) -> None:
    rows_a, rows_b = read_metrics(a), read_metrics(b)
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b]
    for key in keys:
        torch.testing.assert_close(torch.tensor([r[key] for r in rows_a], dtype=torch.float64),
                                   torch.tensor([r[key] for r in rows_b], dtype=torch.float64), rtol=1e-5, atol=1e-6,
                                   msg=key)


def assert_same_weights(a: dict, b: dict, exact: bool = False) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if exact:
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(a[key], b[key], atol=2e-5, rtol=1e-4, msg=key)


def test_two_process_ddp_matches_single_process(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows(32))
    train = {"max_steps": 3, "batch_size": 2, "grad_accum": 2, "group_by_length": False}
    ddp = write(tmp_path, "ddp", base_config(tiny_model, data, tmp_path / "ddp", train=train))
    single = write(tmp_path, "single", base_config(tiny_model, data, tmp_path / "single",
                                                    train={**train, "batch_size": 4}))
    launch(ddp, "ddp.yaml")
    run_cli("train", single)
    assert_same_curves(tmp_path / "ddp", tmp_path / "single")
    assert_same_weights(load_file(str(tmp_path / "ddp" / "model.safetensors")),
                        load_file(str(tmp_path / "single" / "model.safetensors")))


def test_fsdp2_sft_matches_single_process_saves_whole_weights_and_resumes_a_killed_run(tiny_model, tmp_path):
    from transformers import AutoModelForCausalLM

    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows(48))
    train = {"max_steps": 6, "batch_size": 2, "grad_accum": 2, "group_by_length": False, "save_steps": 2}
    sharded = write(tmp_path, "fsdp", base_config(tiny_model, data, tmp_path / "fsdp", train=train))
    single = write(tmp_path, "single", base_config(tiny_model, data, tmp_path / "single",
                                                    train={**train, "batch_size": 4}))
    launch(sharded, "fsdp2.yaml")
    run_cli("train", single)
    assert_same_curves(tmp_path / "fsdp", tmp_path / "single")
    summary = (tmp_path / "fsdp" / "summary.json").read_text()
    assert '"distributed": "FSDP2 x 2"' in summary
    # the final model is whole (gathered from both processes' shards), and from_pretrained reads it
    gathered = load_file(str(tmp_path / "fsdp" / "model.safetensors"))
    assert_same_weights(gathered, load_file(str(tmp_path / "single" / "model.safetensors")))
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "fsdp", dtype=torch.float32)
    for name, value in loaded.state_dict().items():
        if name in gathered:
            assert torch.equal(value, gathered[name]), name
    assert sorted(p.name for p in (tmp_path / "fsdp" / "checkpoints").iterdir()) == ["step-2", "step-4"]
    assert (tmp_path / "fsdp" / "checkpoints" / "step-4" / "sharded").is_dir()

    # the same run killed (SIGKILL, both processes) after its step-2 checkpoint, then resumed, ends with the
    # uninterrupted run's weights; evaluating every step keeps it busy long enough to be killed mid-run
    eval_data = write_jsonl(tmp_path / "eval.jsonl", sft_rows(160))
    killed = base_config(tiny_model, data, tmp_path / "killed", train={**train, "eval_steps": 1})
    killed["data"]["eval"] = str(eval_data)
    killed = write(tmp_path, "killed", killed)
    process = subprocess.Popen(launcher(killed, "fsdp2.yaml"), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    checkpoint = tmp_path / "killed" / "checkpoints" / "step-2" / "trainer_state.json"
    deadline = time.time() + 600
    while not checkpoint.exists() and process.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    kill_tree(process)
    assert checkpoint.exists() and not (tmp_path / "killed" / "summary.json").exists(), "not killed mid-run"

    # resuming under another world size or strategy is refused in one line
    result = run_cli("train", killed, "resume=auto", check=False)
    assert result.returncode == 2
    assert "was written by 2 process(es) under FSDP2; this run has 1 under single process" in result.stderr

    launch_resumed = launcher(killed, "fsdp2.yaml")[:-1] + [str(killed), "resume=auto"]
    resumed = subprocess.run(launch_resumed, capture_output=True, text=True, timeout=900)
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert_same_weights(load_file(str(tmp_path / "killed" / "model.safetensors")), gathered, exact=True)
    assert [r["step"] for r in read_metrics(tmp_path / "killed")] == list(range(1, 7))


def test_fsdp2_dpo_with_the_reference_pass_split_across_processes_matches_single_process(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(24))
    train = {"max_steps": 3, "batch_size": 2, "grad_accum": 2, "group_by_length": False, "lr": 1e-3}
    body = {"stage": "dpo", "data": {"train": str(data), "max_length": 64}, "dpo": {"reference": "precompute"}}
    sharded = write(tmp_path, "fsdp", base_config(tiny_model, data, tmp_path / "fsdp", train=train, **body))
    single = write(tmp_path, "single", base_config(tiny_model, data, tmp_path / "single",
                                                    train={**train, "batch_size": 4}, **body))
    launch(sharded, "fsdp2.yaml")
    run_cli("train", single)
    assert_same_curves(tmp_path / "fsdp", tmp_path / "single", ("loss", "margin", "logps_chosen"))
    assert_same_weights(load_file(str(tmp_path / "fsdp" / "model.safetensors")),
                        load_file(str(tmp_path / "single" / "model.safetensors")))


def test_deepspeed_zero2_and_zero3_sft_match_single_process_and_save_whole_weights(tiny_model, tmp_path):
    """DeepSpeed's CPU accelerator over gloo: ZeRO-2 (optimizer and gradients sharded) and ZeRO-3 (weights too,
    gathered for the final save) step once per accumulated update, like one process with the same batch."""
    from transformers import AutoModelForCausalLM

    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows(32))
    train = {"max_steps": 3, "batch_size": 2, "grad_accum": 2, "group_by_length": False}
    single = write(tmp_path, "single", base_config(tiny_model, data, tmp_path / "single",
                                                    train={**train, "batch_size": 4}))
    run_cli("train", single)
    expected = load_file(str(tmp_path / "single" / "model.safetensors"))
    for stage in ("zero2", "zero3"):
        launch(write(tmp_path, stage, base_config(tiny_model, data, tmp_path / stage, train=train)), f"{stage}.yaml")
        assert_same_curves(tmp_path / stage, tmp_path / "single", ("loss", ))
        saved = load_file(str(tmp_path / stage / "model.safetensors"))
        assert_same_weights(saved, expected)
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path / stage, dtype=torch.float32).state_dict()
        assert all(torch.equal(loaded[name], value) for name, value in saved.items())


def test_rl_under_fsdp2_is_refused_in_one_line(tiny_model, tmp_path):
    """Sampling needs the whole policy on every process: FSDP2 (and ZeRO-3) runs of grpo/ppo say what to use."""
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "Two plus three is"}] * 8)
    body = {"stage": "grpo", "model": str(tiny_model), "output_dir": str(tmp_path / "out"),
            "data": {"train": str(prompts)}, "rewards": [{"builtin": "length", "target": 5}],
            "train": {"max_steps": 1, "batch_size": 1}}
    result = subprocess.run(launcher(write(tmp_path, "grpo", body), "fsdp2.yaml"), capture_output=True, text=True,
                            timeout=900)
    assert result.returncode != 0
    assert ("error: stage grpo samples with the whole policy on every process, which FSDP and DeepSpeed ZeRO-3 "
            "shard; launch it with examples/accelerate/ddp.yaml or zero2.yaml") in result.stderr
