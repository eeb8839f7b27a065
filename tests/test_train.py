"""The one loop for real: tiny models, real steps, the real CLI in a subprocess."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from conftest import run_cli, write_jsonl
from posttrain.config import build_config
from posttrain.train import run_training

WORDS = ["cat", "dog", "soup", "bread", "tea", "rice", "fish", "cake", "lamp", "tree", "book", "door"]


def sft_rows(n: int = 48) -> list[dict]:
    rows = []
    for i in range(n):
        word = WORDS[i % len(WORDS)]
        rows.append({"messages": [
            {"role": "system", "content": "You reverse words."},
            {"role": "user", "content": f"Reverse {word} {i % 7}"},
            {"role": "assistant", "content": f"{word[::-1]} {i % 7}"}]})
    return rows


def base_config(model: Path, data_path: Path, out: Path, **sections) -> dict:
    config = {"stage": "sft", "model": str(model), "output_dir": str(out),
              "data": {"train": str(data_path), "max_length": 64},
              "train": {"max_steps": 8, "batch_size": 4, "lr": 3e-3, "seed": 1, "log_steps": 1}}
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


def test_sft_full_via_cli_writes_native_model_and_learns(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows())
    out = tmp_path / "out"
    config = tmp_path / "sft.yaml"
    config.write_text(yaml.safe_dump(base_config(tiny_model, data, out, data={"eval_fraction": 0.2})))
    run_cli("train", config, "train.max_steps=16", "train.eval_steps=8")
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, 17))
    for key in ("step", "epoch", "loss", "lr", "grad_norm", "tokens_per_s"):
        assert key in rows[0]
    assert "eval_loss" in rows[7] and "eval_loss" in rows[15]
    assert rows[-1]["loss"] < rows[0]["loss"] * 0.8
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["max_steps"] == 16
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 16 and summary["method"] == "full"
    assert (out / "plots" / "loss.png").is_file()
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn in model.generation_config.eos_token_id
    assert model.generation_config.pad_token_id == tokenizer.pad_token_id


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_lora_adapter_loads_with_peft_and_export_merges(make_model, tmp_path, arch):
    from peft import PeftModel

    base = make_model(arch)
    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows(16))
    out = tmp_path / "lora"
    run_training(build_config(base_config(base, data, out, adapter={"type": "lora", "r": 4, "alpha": 8})))
    assert (out / "adapter_config.json").is_file() and not (out / "model.safetensors").exists()
    adapter_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), out).eval()
    lora_b = [p for n, p in adapter_model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b), "training must move LoRA B away from zero"
    merged_dir = tmp_path / "merged"
    run_cli("export", "--model", base, "--adapter", out, "--out", merged_dir)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    ids = torch.tensor([[5, 17, 42, 9, 100, 3, 77]])
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, adapter_model(ids).logits, atol=1e-5, rtol=1e-4)


def test_gradual_unfreeze_trains_top_layer_first(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows(16))
    before = weights(tiny_model)
    layer0 = "model.layers.0.mlp.down_proj.weight"
    layer1 = "model.layers.1.mlp.down_proj.weight"
    one_epoch = tmp_path / "one"
    run_training(build_config(base_config(tiny_model, data, one_epoch, freeze={"trainable_layers": 1,
                                                                             "gradual_unfreeze": True},
                                          train={"max_steps": None, "epochs": 1})))
    after = weights(one_epoch)
    assert torch.equal(after[layer0], before[layer0])
    assert not torch.equal(after[layer1], before[layer1])
    assert torch.equal(after["model.embed_tokens.weight"], before["model.embed_tokens.weight"])
    two_epochs = tmp_path / "two"
    run_training(build_config(base_config(tiny_model, data, two_epochs, freeze={"trainable_layers": 1,
                                                                              "gradual_unfreeze": True},
                                          train={"max_steps": None, "epochs": 2})))
    assert not torch.equal(weights(two_epochs)[layer0], before[layer0])


def test_same_seed_same_weights_and_accumulation_matches_big_batch(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows(16))
    runs = {}
    for name, train in {"a": {"batch_size": 4, "grad_accum": 1}, "b": {"batch_size": 4, "grad_accum": 1},
                        "c": {"batch_size": 2, "grad_accum": 2}}.items():
        out = tmp_path / name
        run_training(build_config(base_config(tiny_model, data, out, train={**train, "max_steps": 3,
                                                                            "group_by_length": False})))
        runs[name] = weights(out)
    for key in runs["a"]:
        assert torch.equal(runs["a"][key], runs["b"][key]), key
    # same examples per optimizer step, so accumulation over two halves equals the full batch
    for key in runs["a"]:
        torch.testing.assert_close(runs["a"][key], runs["c"][key], atol=2e-5, rtol=1e-4)


def test_bf16_autocast_trains(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows(32))
    out = tmp_path / "bf16"
    run_training(build_config(base_config(tiny_model, data, out, train={"bf16": True, "max_steps": 12})))
    rows = read_metrics(out)
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert weights(out)["model.embed_tokens.weight"].dtype == torch.float32


def test_pt_on_txt_with_packing(tiny_model, tmp_path):
    text = "\n\n".join(f"The {w} is number {i}. It is a fine {w} indeed." for i, w in enumerate(WORDS * 4))
    (tmp_path / "corpus.txt").write_text(text)
    out = tmp_path / "pt"
    summary = run_training(build_config({"stage": "pt", "model": str(tiny_model), "output_dir": str(out),
                                         "data": {"train": str(tmp_path / "corpus.txt"), "packing": True,
                                                  "max_length": 64},
                                         "train": {"max_steps": 6, "batch_size": 2}}))
    assert summary["steps"] == 6
    assert AutoModelForCausalLM.from_pretrained(out) is not None


def classify_rows(n: int) -> list[dict]:
    good = ["great", "lovely", "tasty", "superb"]
    bad = ["awful", "cold", "rude", "bland"]
    rows = []
    for i in range(n):
        label = "positive" if i % 2 == 0 else "negative"
        word = (good if label == "positive" else bad)[i // 2 % 4]
        rows.append({"text": f"the {WORDS[i % len(WORDS)]} was {word}", "label": label})
    return rows


def write_csv(path: Path, rows: list[dict]) -> Path:
    import csv

    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["text", "label"])
        writer.writeheader()
        writer.writerows(rows)
    return path


def test_classify_reaches_high_accuracy_and_stops_early(tiny_model, tmp_path):
    train = write_csv(tmp_path / "train.csv", classify_rows(64))
    evaluation = write_csv(tmp_path / "eval.csv", classify_rows(24)[::-1])
    out = tmp_path / "cls"
    summary = run_training(build_config({
        "stage": "classify", "model": str(tiny_model), "output_dir": str(out),
        "data": {"train": str(train), "eval": str(evaluation), "max_length": 32},
        "train": {"max_steps": 200, "batch_size": 8, "lr": 5e-3, "eval_steps": 5, "early_stopping_patience": 3,
                  "metric_for_best": "eval_accuracy"}}))
    assert summary["stopped_early"] and summary["steps"] < 200
    assert summary["best_metric"] >= 0.95
    rows = read_metrics(out)
    assert any("eval_macro_f1" in r for r in rows)
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert set(model.config.id2label.values()) == {"positive", "negative"}


def test_classify_with_lora_writes_a_loadable_classifier(tiny_model, tmp_path):
    train = write_csv(tmp_path / "train.csv", classify_rows(32))
    out = tmp_path / "cls-lora"
    run_training(build_config({
        "stage": "classify", "model": str(tiny_model), "output_dir": str(out),
        "data": {"train": str(train), "eval_fraction": 0.25, "max_length": 32},
        "adapter": {"type": "lora", "r": 4}, "train": {"max_steps": 4, "batch_size": 8, "lr": 5e-3}}))
    model = AutoModelForSequenceClassification.from_pretrained(out)
    assert model.config.id2label == {0: "negative", 1: "positive"}
    assert (out / "adapter" / "adapter_config.json").is_file()
    result = run_cli("export", "--model", tiny_model, "--adapter", out / "adapter", "--out", tmp_path / "x",
                     check=False)
    assert result.returncode == 2 and "classification adapter" in result.stderr


def test_new_run_into_a_used_output_dir_leaves_nothing_stale(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows(16))
    out = tmp_path / "reused"
    run_training(build_config(base_config(tiny_model, data, out, adapter={"type": "lora", "r": 4},
                                          train={"max_steps": 2})))
    assert (out / "adapter_config.json").is_file()
    run_training(build_config(base_config(tiny_model, data, out, train={"max_steps": 2}, overwrite_output_dir=True)))
    assert not (out / "adapter_config.json").exists() and not (out / "adapter_model.safetensors").exists()
    loaded = AutoModelForCausalLM.from_pretrained(out)
    saved = weights(out)
    assert torch.equal(loaded.model.layers[0].mlp.down_proj.weight, saved["model.layers.0.mlp.down_proj.weight"])


def test_early_stopping_restores_the_best_weights_and_checks_the_metric(tiny_model, tmp_path):
    from posttrain.errors import ConfigError

    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows(32))
    out = tmp_path / "es"
    # a learning rate this high makes eval loss worse after the first evaluations (0.3 did not on an AVX2 CPU:
    # there training still converged, so early stopping never triggered)
    summary = run_training(build_config(base_config(
        tiny_model, data, out, data={"eval_fraction": 0.25},
        train={"max_steps": 40, "lr": 3.0, "eval_steps": 2, "early_stopping_patience": 2, "max_grad_norm": None})))
    assert summary["stopped_early"]
    evals = [r for r in read_metrics(out) if "eval_loss" in r]
    best = min(evals, key=lambda r: r["eval_loss"])
    assert summary["best_step"] == best["step"] and summary["best_step"] < summary["steps"]
    assert summary["final_eval"]["eval_loss"] == pytest.approx(best["eval_loss"])
    with pytest.raises(ConfigError, match="not an eval metric"):
        run_training(build_config(base_config(tiny_model, data, tmp_path / "typo", data={"eval_fraction": 0.25},
                                              train={"eval_steps": 2, "early_stopping_patience": 2,
                                                     "metric_for_best": "eval_acc"})))
    with pytest.raises(ConfigError, match="needs evaluation data"):
        run_training(build_config(base_config(tiny_model, data, tmp_path / "noeval",
                                              train={"early_stopping_patience": 2})))


def test_packed_training_loss_equals_unpacked(tiny_model):
    from posttrain.data.batching import collate, collate_packed
    from posttrain.stages.lm import lm_loss

    model = AutoModelForCausalLM.from_pretrained(tiny_model).eval()
    torch.manual_seed(0)
    docs = []
    for n in (7, 12, 5):
        ids = torch.randint(4, 300, (n,)).tolist()
        docs.append({"input_ids": ids, "labels": [-100] * 2 + ids[2:]})
    with torch.no_grad():
        packed_sum, packed_count, _ = lm_loss(model, collate_packed([docs], pad_id=1))
        plain_sum, plain_count, _ = lm_loss(model, collate(docs, pad_id=1))
    assert packed_count == plain_count
    torch.testing.assert_close(packed_sum, plain_sum, atol=1e-4, rtol=1e-5)
