"""`posttrain export --format vllm`: a trained LoRA adapter in the layout vLLM's LoRA loader accepts, and a
one-line refusal naming what vLLM would reject (modules_to_save, DoRA, adapter bias, non-projection targets)."""
from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from conftest import run_cli, write_jsonl
from posttrain.config import build_config
from posttrain.train import run_training


@pytest.fixture(scope="module")
def adapter(make_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm")
    rows = [{"messages": [{"role": "user", "content": f"Reverse cat {i}"},
                          {"role": "assistant", "content": f"tac {i}"}]} for i in range(16)]
    data = write_jsonl(root / "sft.jsonl", rows)
    base = make_model("qwen2")
    run_training(build_config({"stage": "sft", "model": str(base), "output_dir": str(root / "lora"),
                               "data": {"train": str(data), "max_length": 48},
                               "adapter": {"type": "lora", "r": 4, "alpha": 8},
                               "train": {"max_steps": 3, "batch_size": 4, "lr": 3e-3}}))
    return base, root / "lora"


def test_posttrain_adapter_is_vllm_ready(adapter, tmp_path):
    base, lora = adapter
    out = tmp_path / "reverser"
    result = run_cli("export", "--model", base, "--adapter", lora, "--format", "vllm", "--out", out)
    assert f"vllm serve {base} --enable-lora --lora-modules reverser={out}" in result.stdout
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 8
    assert config["base_model_name_or_path"] == str(base)
    assert not config.get("modules_to_save") and not config.get("use_dora") and config.get("bias") == "none"
    assert {t.rsplit(".", 1)[-1] for t in config["target_modules"]} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                             "down_proj"}
    keys = load_file(out / "adapter_model.safetensors").keys()
    assert keys and all(k.startswith("base_model.model.model.layers.") and k.endswith(("lora_A.weight",
                                                                                       "lora_B.weight"))
                        for k in keys)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


def test_what_vllm_rejects_is_named_and_nothing_is_written(adapter, tmp_path):
    from posttrain.export.vllm import check_adapter

    base, lora = adapter
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_model.safetensors").write_bytes((lora / "adapter_model.safetensors").read_bytes())
    config = json.loads((lora / "adapter_config.json").read_text())
    config.update(modules_to_save=["embed_tokens"], bias="all", target_modules=["q_proj", "embed_tokens"])
    (bad / "adapter_config.json").write_text(json.dumps(config))
    problems = check_adapter(str(bad))
    assert any("modules_to_save" in p for p in problems) and any("bias 'all'" in p for p in problems)
    assert any("embed_tokens" in p and "not projections" in p for p in problems)
    out = tmp_path / "v"
    result = run_cli("export", "--model", base, "--adapter", bad, "--format", "vllm", "--out", out, check=False)
    assert result.returncode == 2 and result.stderr.count("error:") == 1 and "modules_to_save" in result.stderr
    assert not out.exists() and not list(tmp_path.glob(".v.partial"))
