"""Two gloo processes under `accelerate launch` give the same update as one process with the same step batch."""
from __future__ import annotations

import os
import subprocess
import sys

import torch
import yaml
from safetensors.torch import load_file

from conftest import run_cli, write_jsonl
from test_train import base_config, sft_rows


def test_two_process_ddp_matches_single_process(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows(32))
    train = {"max_steps": 3, "batch_size": 2, "grad_accum": 2, "group_by_length": False}
    ddp = base_config(tiny_model, data, tmp_path / "ddp", train=train)
    single = base_config(tiny_model, data, tmp_path / "single", train={**train, "batch_size": 4})
    for name, body in (("ddp", ddp), ("single", single)):
        (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump(body))
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
                "-m", "posttrain.cli", "train", str(tmp_path / "ddp.yaml")]
    result = subprocess.run(launcher, capture_output=True, text=True, timeout=600, env=os.environ.copy())
    assert result.returncode == 0, result.stderr[-3000:]
    run_cli("train", tmp_path / "single.yaml")
    a = load_file(str(tmp_path / "ddp" / "model.safetensors"))
    b = load_file(str(tmp_path / "single" / "model.safetensors"))
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=2e-5, rtol=1e-4, msg=key)
