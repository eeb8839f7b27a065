"""Smaller CLI paths: init-model, config-reference, TensorBoard logging, gradient checkpointing with LoRA."""
from __future__ import annotations

from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import CORPUS, run_cli, write_jsonl
from posttrain.config import build_config
from posttrain.train import run_training
from test_train import base_config, sft_rows


def test_init_model_cli_writes_a_loadable_model(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(CORPUS * 10))
    out = tmp_path / "m"
    result = run_cli("init-model", "--arch", "llama", "--size", "tiny", "--tokenizer-corpus", corpus,
                     "--vocab-size", "300", "--out", out)
    assert "llama/tiny" in result.stdout
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert AutoModelForCausalLM.from_pretrained(out).config.vocab_size == len(tokenizer)
    # digits are single tokens even where the corpus repeats a number ("0123456789" is in it ten times)
    assert tokenizer.tokenize("0123456789") == list("0123456789")
    assert tokenizer.decode(tokenizer("It costs 128.")["input_ids"]) == "It costs 128."
    missing = run_cli("init-model", "--tokenizer-corpus", tmp_path / "nope.txt", "--out", out, check=False)
    assert missing.returncode != 0 and "nope.txt" in missing.stderr


def test_config_reference_cli_prints_every_section():
    text = run_cli("config-reference").stdout
    for section in ("## `data`", "## `train`", "## `adapter`", "## `freeze`"):
        assert section in text


def test_tensorboard_and_gradient_checkpointing_with_lora(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows(16))
    out = tmp_path / "tb"
    summary = run_training(build_config(base_config(
        tiny_model, data, out, adapter={"type": "lora", "r": 4},
        train={"max_steps": 3, "tensorboard": True, "gradient_checkpointing": True})))
    assert summary["steps"] == 3
    assert list(out.rglob("events.out.tfevents.*")), "TensorBoard event file expected"
