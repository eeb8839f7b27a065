"""The first hour of a new user (issue 20), through the real CLI: no silent empty runs, fast clear errors for
missing models and tokenizers, safe output folders, adapters on the wrong base, Ctrl-C, help and noise."""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import run_cli, write_jsonl


def chats(n: int) -> list[dict]:
    words = ["cat", "dog", "tea", "fish", "cake", "lamp", "soup", "bread"]
    return [{"messages": [{"role": "user", "content": f"Reverse {words[i % 8]} {i}"},
                          {"role": "assistant", "content": f"{words[i % 8][::-1]} {i}"}]} for i in range(n)]


def config(tmp_path: Path, model, out, name: str = "config.yaml", **sections) -> Path:
    data = write_jsonl(tmp_path / "sft.jsonl", chats(16))
    body = {"stage": "sft", "model": str(model), "output_dir": str(out),
            "data": {"train": str(data), "max_length": 64}, "train": {"max_steps": 2, "batch_size": 4}}
    for key, value in sections.items():
        body[key] = {**body.get(key, {}), **value} if isinstance(value, dict) else value
    path = tmp_path / name
    path.write_text(yaml.safe_dump(body))
    return path


def one_line_error(result: subprocess.CompletedProcess, *expected: str) -> str:
    assert result.returncode == 2, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    for text in expected:
        assert text in errors[0], f"{text!r} not in {errors[0]!r}"
    return errors[0]


# ---------------------------------------------------------------- 1: a model folder without tokenizer files

def test_model_without_tokenizer_files_is_one_line_with_the_fix(tiny_model, tmp_path):
    bare = tmp_path / "weights-only"
    bare.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copy2(tiny_model / name, bare / name)
    text = tmp_path / "pt.txt"
    text.write_text("The kitchen opens at nine.\n\nThe soup is tomato with basil.\n\nTwo plus three is five.\n")
    pt = config(tmp_path, bare, tmp_path / "pt-out", "pt.yaml", stage="pt", data={"train": str(text)})
    # before: pt trained on 0 tokens and exited 0 ("eval_perplexity 1"); sft blamed the chat template
    for path in (pt, config(tmp_path, bare, tmp_path / "sft-out")):
        one_line_error(run_cli("train", path, check=False), f"{bare} has no tokenizer files", "cp BASE/tokenizer*")
    assert not (tmp_path / "pt-out").exists() and not (tmp_path / "sft-out").exists()

    # tokenizer files that give no vocabulary (tokenizer_config.json alone): unusable, not a 1-token tokenizer
    shutil.copy2(tiny_model / "tokenizer_config.json", bare / "tokenizer_config.json")
    one_line_error(run_cli("train", pt, check=False), "tokenizer of", "is unusable", "copy the tokenizer files")


def test_data_that_trains_no_token_is_an_error(tiny_model, tmp_path):
    """The general guard behind the tokenizer check: encoded data with no trained token never trains."""
    from transformers import AutoTokenizer

    from posttrain.data.encode import encode_all
    from posttrain.data.examples import Text
    from posttrain.errors import DataError
    from posttrain.train import check_trained_tokens

    bare = tmp_path / "weights-only"
    bare.mkdir()
    shutil.copy2(tiny_model / "config.json", bare / "config.json")
    empty = AutoTokenizer.from_pretrained(bare)  # what transformers returns without tokenizer files
    features, stats = encode_all([Text(f"text number {i}") for i in range(8)], empty, "pt", max_length=64)
    assert stats.trained_tokens == 0 and len(features) == 8
    with pytest.raises(DataError, match="almost nothing to train on"):
        check_trained_tokens("pt.txt", features, stats)
    good = AutoTokenizer.from_pretrained(tiny_model)
    check_trained_tokens("pt.txt", *encode_all([Text(f"text number {i}") for i in range(8)], good, "pt",
                                               max_length=64))


# ---------------------------------------------------------------- 2: a model path that does not exist

def test_missing_model_directory_fails_at_once_without_the_hub(tiny_model, tmp_path):
    (tmp_path / "out" / "sft").mkdir(parents=True)
    path = config(tmp_path, "out/sftt", "out/x")
    online = {"HF_HUB_OFFLINE": "0"}  # before: 5 hub retries (89 s) and an error that never named the folder
    error = one_line_error(run_cli("train", path, cwd=tmp_path, check=False, env=online),
                           "model not found: out/sftt: no such directory", "did you mean out/sft?")
    assert "huggingface.co" not in error
    for command in (["chat", "--model", "out/sftt"], ["eval", "--model", "out/sftt", "--data", "sft.jsonl"],
                    ["serve", "--model", "out/sftt"]):
        result = run_cli(*command, cwd=tmp_path, check=False, env=online)
        one_line_error(result, "no such directory")
        assert "Retrying" not in result.stderr
    # a hub id in offline mode: looked up in the cache only
    one_line_error(run_cli("train", path, "model=nobody-here/no-model", cwd=tmp_path, check=False,
                           env={"HF_HUB_OFFLINE": "1"}), "not in the hub cache", "offline mode")
    assert not (tmp_path / "out" / "x").exists()


# ---------------------------------------------------------------- 3 and 7: output folders, Ctrl-C, stale locks

def wait_for_checkpoint(out: Path, proc: subprocess.Popen) -> None:
    from posttrain.checkpoint import list_checkpoints

    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not list_checkpoints(out / "checkpoints"):
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before the test could interrupt it"


def start(path: Path, *overrides: str, log: Path | None = None) -> subprocess.Popen:
    stderr = open(log, "w") if log else subprocess.PIPE  # noqa: SIM115 - closed with the process
    # Ctrl-C as a terminal delivers it: a suite started in the background (`make test &`, nohup) has SIGINT
    # ignored, and an ignored disposition is inherited by every process it starts
    return subprocess.Popen([sys.executable, "-m", "posttrain.cli", "train", str(path), *overrides], text=True,
                            stdout=subprocess.PIPE, stderr=stderr, env=os.environ.copy(),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def test_finished_run_is_kept_unless_overwrite(tiny_model, tmp_path):
    out = tmp_path / "out"
    path = config(tmp_path, tiny_model, out, train={"save_steps": 1})
    run_cli("train", path)
    model = (out / "model.safetensors").read_bytes()
    checkpoints = sorted(p.name for p in (out / "checkpoints").iterdir())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["precision"] == "fp32" and summary["machine"].startswith(("cpu: ", "cuda: "))

    # before: a rerun silently replaced the model and deleted its checkpoints
    one_line_error(run_cli("train", path, "train.max_steps=1", check=False), "already holds a finished sft run",
                   "(2 steps", "--overwrite")
    finished = run_cli("train", path, "resume=auto")  # before: it trained again
    assert "already holds a finished run" in finished.stdout and "nothing to do" in finished.stdout
    assert (out / "model.safetensors").read_bytes() == model
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == checkpoints

    run_cli("train", path, "train.max_steps=3", "--overwrite")
    assert json.loads((out / "summary.json").read_text())["steps"] == 3
    assert (out / ".posttrain.lock").read_text() == ""  # released


def test_second_run_is_refused_ctrl_c_says_how_to_resume_and_a_stale_lock_is_taken_over(tiny_model, tmp_path):
    out = tmp_path / "out"
    # far more steps than the test lets it run: it is always interrupted, however slow the machine
    path = config(tmp_path, tiny_model, out, train={"max_steps": 100_000, "save_steps": 2, "batch_size": 2})
    first = start(path)
    try:
        wait_for_checkpoint(out, first)
        # before: both ran and interleaved their metrics
        one_line_error(run_cli("train", path, check=False), "is in use by another run", f"pid {first.pid}")
        assert first.poll() is None, "the run finished before the test could interrupt it"
        first.send_signal(signal.SIGINT)
        _, stderr = first.communicate(timeout=120)
    finally:
        first.kill()
    assert first.returncode == 130 and "Traceback" not in stderr, stderr
    last = [line for line in stderr.splitlines() if line.startswith("interrupted:")]
    assert len(last) == 1 and "the last checkpoint is " + str(out / "checkpoints" / "step-") in last[0], stderr
    assert last[0].endswith(f"posttrain train {path} resume=auto"), last[0]
    assert (out / ".posttrain.lock").read_text() == ""  # released by the interrupted run
    # without resume, the checkpoints are not thrown away
    one_line_error(run_cli("train", path, check=False), "holds checkpoints of an unfinished run", "resume=auto")

    # the command it printed continues the run; killed by SIGKILL it leaves its lock file, not its lock
    log = tmp_path / "second.log"
    second = start(path, "resume=auto", log=log)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and second.poll() is None and "resuming from" not in log.read_text():
            time.sleep(0.05)
        assert second.poll() is None and "resuming from" in log.read_text(), log.read_text()
        second.send_signal(signal.SIGKILL)
        second.wait(timeout=60)
    finally:
        second.kill()
    assert f"pid {second.pid}" in (out / ".posttrain.lock").read_text()
    third = start(path, "resume=auto", log=log)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and third.poll() is None and "resuming from" not in log.read_text():
            time.sleep(0.05)
        third.send_signal(signal.SIGINT)
        third.wait(timeout=120)
    finally:
        third.kill()
    assert f"took over the lock of a run that ended without releasing it (pid {second.pid}" in log.read_text()
    assert third.returncode == 130 and (out / ".posttrain.lock").read_text() == ""


# ---------------------------------------------------------------- 4: an adapter on the wrong base

def test_adapter_on_another_base_warns_or_is_refused(make_model, tiny_model, tmp_path, caplog):
    adapter = tmp_path / "lora"
    trained = run_cli("train", config(tmp_path, tiny_model, adapter, adapter={"type": "lora", "r": 4},
                                      train={"max_steps": 1}))
    assert "is deprecated" not in trained.stderr  # transformers' FutureWarning about a name peft calls
    other_size = make_model("qwen2", "mini")  # other shapes: refused by serve, chat, eval and export alike
    data = tmp_path / "sft.jsonl"
    for command in (["serve", "--model", other_size, "--lora", f"mine={adapter}"],
                    ["chat", "--model", other_size, "--adapter", adapter],
                    ["eval", "--model", other_size, "--adapter", adapter, "--data", data],
                    ["export", "--model", other_size, "--adapter", adapter, "--out", tmp_path / "merged"]):
        one_line_error(run_cli(*command, check=False), f"adapter {adapter} does not fit --model {other_size}",
                       f"trained on {tiny_model}", "in the model,", "in the adapter")
    assert not (tmp_path / "merged").exists()

    same_shapes = tmp_path / "copy-of-tiny"  # another model of the same shapes: it runs, with a warning
    shutil.copytree(tiny_model, same_shapes)
    result = run_cli("eval", "--model", same_shapes, "--adapter", adapter, "--data", data)
    assert f"was trained on {tiny_model}, not on {same_shapes}" in result.stderr
    from transformers import AutoModelForCausalLM

    from posttrain.modeling import check_adapter

    with caplog.at_level(logging.WARNING, logger="posttrain"):  # on its own base: nothing to say
        check_adapter(AutoModelForCausalLM.from_pretrained(tiny_model), adapter, str(tiny_model))
    assert not caplog.records


# ---------------------------------------------------------------- 7: version, help, YAML tabs, third-party noise

def test_version_help_and_yaml_tabs(tmp_path):
    from posttrain import __version__

    assert run_cli("--version").stdout.startswith(f"posttrain {__version__} (torch ")
    usage = run_cli("train", "--help").stdout
    assert "posttrain train [-h] [--overwrite] CONFIG [KEY=VALUE ...]" in " ".join(usage.split())
    assert "(default: 64)" in run_cli("eval", "--help").stdout  # --max-new-tokens
    tabbed = tmp_path / "tabs.yaml"
    tabbed.write_text("stage: sft\ndata:\n\ttrain: x.jsonl\n")
    one_line_error(run_cli("train", tabbed, check=False), f"{tabbed}:3:1", "indent with spaces")


def test_reward_model_start_is_said_once_in_our_words(tiny_model, tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"Reverse cat {i}", "chosen": f"tac {i}",
                                                    "rejected": f"cat {i}"} for i in range(8)])
    path = config(tmp_path, tiny_model, tmp_path / "rm", stage="rm", data={"train": str(pairs)},
                  train={"max_steps": 1})
    stderr = run_cli("train", path).stderr
    assert "LOAD REPORT" not in stderr and "MISSING" not in stderr  # before: transformers' table
    assert stderr.count("the task head (score.weight) is new") == 1
    for noise in ("torchao", "_pytree", "unable to detect it", "kernels-community"):  # the last two: DeepSpeed's
        assert noise not in stderr, noise                                             # and bitsandbytes' on CPU


# ---------------------------------------------------------------- 6: plots people can read

def test_overfitting_is_said_in_words_and_plots_read_well(tiny_model, tmp_path):
    # the held-out pairs prefer the opposite answers: the better the reward model learns its training pairs,
    # the worse its eval loss, while the train loss falls
    train = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": f"Reverse {w} {i}", "chosen": f"{w[::-1]} {i}",
                                                    "rejected": f"{w} {i}"}
                                                   for i, w in enumerate(["cat", "dog", "tea", "fish"] * 4)])
    held_out = write_jsonl(tmp_path / "flipped.jsonl", [{"prompt": f"Reverse {w} {i}", "chosen": f"{w} {i}",
                                                         "rejected": f"{w[::-1]} {i}"}
                                                        for i, w in enumerate(["lamp", "cake", "soup", "tree"])])
    out = tmp_path / "rm"
    path = config(tmp_path, tiny_model, out, stage="rm", data={"train": str(train), "eval": str(held_out)},
                  train={"max_steps": 24, "eval_steps": 6, "lr": 3e-3})
    result = run_cli("train", path)
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["notes"]) == 1 and summary["notes"][0].startswith("overfitting: eval loss rose from")
    assert "while train loss fell" in summary["notes"][0] and summary["notes"][0] in result.stderr
    assert {"loss.png", "eval_accuracy.png"} <= set(summary["plots"])

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from posttrain.plots import draw, read_metrics, smooth

    rows = read_metrics(out / "metrics.jsonl")
    steps, losses = [r["step"] for r in rows], [r["loss"] for r in rows]
    fig, ax = plt.subplots()
    draw(ax, "loss", steps, losses)  # 24 noisy points: raw markers under a smoothed line
    raw, line = ax.lines
    assert raw.get_linestyle() == "None" and list(raw.get_ydata()) == losses
    assert list(line.get_ydata()) == smooth(losses) and line.get_linestyle() == "-"
    plt.close(fig)
    fig, ax = plt.subplots()
    draw(ax, "eval_margin", [12, 24], [0.69312, 0.69314])  # two points: labelled, on a sensible axis
    assert [text.get_text() for text in ax.texts] == ["0.6931", "0.6931"]
    assert ax.lines[0].get_linestyle() == "None" and ax.get_ylim()[1] - ax.get_ylim()[0] > 0.05
    plt.close(fig)
    fig, ax = plt.subplots()
    draw(ax, "eval_accuracy", [12, 24], [0.25, 0.0], chance=0.5)
    assert ax.get_ylim() == (0, 1.05) and any(list(l.get_ydata()) == [0.5, 0.5] for l in ax.lines)
    plt.close(fig)
