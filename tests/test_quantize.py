"""Quantised weights: int8 weight-only serving/evaluation (torchao), QLoRA's one-line error on a CPU, DoRA."""
from __future__ import annotations

import json

import pytest
import torch

from conftest import run_cli, write_jsonl
from posttrain.config import build_config
from posttrain.train import run_training

WORDS = ["cat", "dog", "soup", "bread", "tea", "rice", "fish", "cake", "lamp", "tree", "book", "door"]


def chats(n: int, offset: int = 0) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"Reverse {WORDS[i % 12]} {i % 7}"},
                          {"role": "assistant", "content": f"{WORDS[i % 12][::-1]} {i % 7}"}]}
            for i in range(offset, offset + n)]


def train(model, out, data, steps=30, **adapter):
    run_training(build_config({"stage": "sft", "model": str(model), "output_dir": str(out),
                               "data": {"train": str(data), "max_length": 64},
                               "adapter": adapter or {"type": "none"},
                               "train": {"max_steps": steps, "batch_size": 8, "lr": 3e-3, "seed": 1}}))
    return out


@pytest.fixture(scope="module")
def trained(make_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    data = write_jsonl(root / "train.jsonl", chats(96))
    held_out = write_jsonl(root / "held_out.jsonl", chats(24, offset=500))
    base = make_model("qwen2")
    return {"model": train(base, root / "full", data), "base": base, "data": data, "held_out": held_out,
            "adapter": train(base, root / "lora", data, type="lora", r=4, target=["q_proj", "v_proj"])}


def test_int8_weights_keep_perplexity_and_halve_linear_memory(trained, tmp_path):
    """`posttrain eval --quantize int8` (the real CLI) gives a held-out perplexity within 2% of fp32, and the
    engine behind it holds int8 linear weights."""
    from posttrain.engine import Engine
    from posttrain.quantize import weight_bytes

    results = {}
    for quantize in (None, "int8"):
        out = tmp_path / f"{quantize}.json"
        run_cli("eval", "--model", trained["model"], "--data", trained["held_out"], "--out", out,
                *(["--quantize", quantize] if quantize else []))
        results[quantize] = json.loads(out.read_text())["perplexity"]
    assert results[None] < 60, results
    assert abs(results["int8"] / results[None] - 1) < 0.02, results
    fp32 = Engine.load(trained["model"])
    int8 = Engine.load(trained["model"], quantize="int8")
    q_proj = int8.model.model.layers[0].self_attn.q_proj.weight
    assert type(q_proj).__name__ == "Int8Tensor" and q_proj.qdata.dtype == torch.int8
    assert weight_bytes(int8.model) < 0.75 * weight_bytes(fp32.model)  # embeddings stay fp32


def test_int8_base_still_serves_lora_adapters(trained):
    """Serving loads (serve.load_engine) an int8 base with an adapter: the LoRA matrices stay float, the base
    projections are int8, and greedy answers match the fp32 engine's on held-out prompts."""
    from posttrain.engine import SamplingParams
    from posttrain.serve import load_engine

    fp32 = load_engine(str(trained["base"]), {"rev": str(trained["adapter"])})
    int8 = load_engine(str(trained["base"]), {"rev": str(trained["adapter"])}, quantize="int8")
    layer = int8.model.base_model.model.model.layers[0].self_attn.q_proj
    assert type(layer.base_layer.weight).__name__ == "Int8Tensor"
    assert layer.lora_A["rev"].weight.dtype == torch.float32
    prompts = [row["messages"][:1] for row in chats(6, offset=500)]
    params = SamplingParams(max_new_tokens=8, temperature=0)
    same = sum(a.token_ids == b.token_ids for a, b in zip(fp32.chat(prompts, params), int8.chat(prompts, params)))
    assert same >= 5, f"only {same} of 6 greedy answers agree"


def test_unknown_quantize_is_rejected(trained):
    result = run_cli("chat", "--model", trained["model"], "--quantize", "int4", check=False)
    assert result.returncode == 2 and "invalid choice: 'int4'" in result.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a CUDA machine QLoRA runs; this checks the CPU error")
def test_qlora_on_a_cpu_is_a_one_line_error(trained, tmp_path):
    config = tmp_path / "qlora.yaml"
    config.write_text(f"stage: sft\nmodel: {trained['base']}\noutput_dir: {tmp_path / 'out'}\n"
                      f"data: {{train: {trained['data']}}}\nadapter: {{type: lora, quantize: 4bit}}\n")
    result = run_cli("train", config, check=False)
    assert result.returncode == 2 and result.stderr.count("error:") == 1 and "Traceback" not in result.stderr
    assert "needs a CUDA GPU" in result.stderr and not (tmp_path / "out" / "adapter_config.json").exists()
    bad = run_cli("train", config, "adapter.type=none", check=False)
    assert bad.returncode == 2 and "need adapter.type: lora" in bad.stderr


def test_dora_trains_and_merges(trained, tmp_path):
    """adapter.use_dora: peft's DoRA (magnitude vectors next to lora_A/B) trains, and the merged HF export
    gives the adapter's logits; vLLM export refuses it with the reason."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = train(trained["base"], tmp_path / "dora", trained["data"], steps=6, type="lora", r=4, use_dora=True)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["use_dora"] is True
    adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(trained["base"]), out).eval()
    assert any("lora_magnitude_vector" in name for name, _ in adapter.named_parameters())
    run_cli("export", "--model", trained["base"], "--adapter", out, "--out", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = torch.tensor([[5, 17, 42, 9, 100, 3, 77]])
    with torch.no_grad():
        assert not torch.allclose(adapter(ids).logits, AutoModelForCausalLM.from_pretrained(trained["base"])(ids).logits)
        torch.testing.assert_close(merged(ids).logits, adapter(ids).logits, atol=1e-4, rtol=1e-4)
    refused = run_cli("export", "--model", trained["base"], "--adapter", out, "--format", "vllm", "--out",
                      tmp_path / "v", check=False)
    assert refused.returncode == 2 and "DoRA" in refused.stderr and not (tmp_path / "v").exists()
