"""Smaller CLI paths: init-model, config-reference, TensorBoard logging, gradient checkpointing with LoRA."""
from __future__ import annotations

import subprocess
import sys

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


def test_the_command_ends_without_module_teardown_but_loses_nothing(tmp_path):
    """`cli.finish` (the end of every `posttrain` command) skips the interpreter's module teardown; the exit
    code, exit handlers, temporary directories and unflushed output all survive, and a non-daemon thread still
    running is waited for."""
    handler, thread_file = tmp_path / "atexit.txt", tmp_path / "thread.txt"
    thread = (f"threading.Thread(target=lambda: (time.sleep(0.5), pathlib.Path({str(thread_file)!r})"
              f".write_text('done'))).start()")
    script = """
import atexit, pathlib, sys, tempfile, threading, time
from posttrain.cli import finish
atexit.register(lambda: pathlib.Path(HANDLER).write_text("ran"))
temporary = tempfile.TemporaryDirectory(dir=TMP)
pathlib.Path(temporary.name, "x").write_text("x")
THREAD
print("no newline, still buffered", end="")
sys.stderr.write("and stderr")
finish(3)
""".replace("HANDLER", repr(str(handler))).replace("TMP", repr(str(tmp_path)))
    result = subprocess.run([sys.executable, "-c", script.replace("THREAD", thread)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 3
    assert result.stdout == "no newline, still buffered" and result.stderr.endswith("and stderr")
    assert handler.read_text() == "ran" and thread_file.read_text() == "done"
    assert not [p for p in tmp_path.iterdir() if p.is_dir()], "the temporary directory was removed"
    # without the thread, the fast path itself (os._exit after the handlers)
    quick = script.replace("THREAD", "")
    handler.unlink()
    result = subprocess.run([sys.executable, "-c", quick], capture_output=True, text=True, timeout=120)
    assert result.returncode == 3 and result.stdout == "no newline, still buffered" and handler.read_text() == "ran"
    assert not [p for p in tmp_path.iterdir() if p.is_dir()]
