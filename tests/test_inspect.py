"""`posttrain data inspect` through the real CLI on real files."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from conftest import run_cli, write_jsonl


def chat(i: int) -> dict:
    return {"messages": [{"role": "system", "content": "You reverse words."},
                         {"role": "user", "content": f"Reverse cat {i}"},
                         {"role": "assistant", "content": f"tac {i}"}]}


@pytest.fixture
def sft_file(tmp_path) -> Path:
    return write_jsonl(tmp_path / "sft.jsonl", [chat(i) for i in range(6)])


@pytest.fixture
def bad_file(tmp_path) -> Path:
    """Line 3: content null; line 5: not JSON; line 6: no messages at all; 4 good rows."""
    lines = [json.dumps(chat(0)), json.dumps(chat(1))]
    broken = chat(2)
    broken["messages"][2]["content"] = None
    lines += [json.dumps(broken), json.dumps(chat(3)), "{not json", json.dumps({"text": "hi", "other": 1}),
              json.dumps(chat(4))]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


def inspect(*args) -> str:
    result = run_cli("data", "inspect", *map(str, args))
    assert "Traceback" not in result.stderr
    return result.stdout


def test_sft_messages_without_model_shows_normalised_example(sft_file):
    out = inspect(sft_file)
    assert f"file: {sft_file}" in out
    assert "format: messages" in out
    assert "stage: sft (guessed" in out
    assert "rows: 6 read, 6 usable, 0 invalid" in out
    assert "system: You reverse words." in out
    assert "user: Reverse cat 0" in out and "assistant: tac 0" in out
    assert "problems" not in out and "warnings" not in out


def test_sft_messages_with_model_token_stats_and_marked_render(sft_file, tiny_model):
    out = inspect(sft_file, "--model", tiny_model, "--max-length", 64)
    stats = re.search(r"tokens per example: min (\d+) / mean ([\d.]+) / p50 (\d+) / p95 (\d+) / max (\d+)", out)
    assert stats, out
    low, mean, p50, p95, high = (float(g) for g in stats.groups())
    assert 0 < low <= p50 <= p95 <= high and low <= mean <= high
    assert "truncated at max_length 64: 0 of 6" in out
    trained = int(re.search(r"trained tokens at max_length 64: (\d+)", out).group(1))
    assert trained > 0
    # the assistant answer (and its end-of-turn marker) is marked, the prompt is not
    assert "[[tac 0<|im_end|>]]" in out
    assert "Reverse cat 0" in out and "[[Reverse" not in out and "\x1b[" not in out
    # too small a max_length: everything is truncated and nothing of the answer is left
    small = inspect(sft_file, "--model", tiny_model, "--max-length", 8)
    assert "truncated at max_length 8: 6 of 6" in small
    assert "prompt longer than max_length: 6" in small and "warnings:" in small


def test_alpaca_json(tmp_path, tiny_model):
    path = tmp_path / "alpaca.json"
    path.write_text(json.dumps([{"instruction": "Say hi", "input": "", "output": "hi"},
                                {"instruction": "Add", "input": "2 3", "output": "5", "system": "Be brief."}]))
    out = inspect(path)
    assert "format: alpaca" in out and "stage: sft" in out and "rows: 2 read, 2 usable, 0 invalid" in out
    assert "user: Say hi" in out and "assistant: hi" in out
    rendered = inspect(path, "--model", tiny_model)
    assert "[[hi<|im_end|>]]" in rendered and "alpaca.json:row 0" in rendered


def test_classification_csv_label_distribution_and_lengths(tmp_path, tiny_model):
    path = tmp_path / "reviews.csv"
    path.write_text("text,label\nthe soup was great,positive\nthe bread was cold,negative\n"
                    "lovely tea,positive\nthe tea was great and the bread was lovely,positive\n")
    out = inspect(path, "--model", tiny_model, "--max-length", 8)
    assert "format: classification" in out and "stage: classify (guessed" in out
    assert "rows: 4 read, 4 usable, 0 invalid" in out
    assert "positive: 3 (75.0%)" in out and "negative: 1 (25.0%)" in out
    assert re.search(r"truncated at max_length 8: [1-9] of 4", out)
    assert "label positive" in out and "the soup was great" in out
    # --stage changes how the same columns are read: as raw text for pt
    assert "stage: pt" in inspect(path, "--stage", "pt")


def test_bad_rows_are_all_collected_with_locations(bad_file):
    out = inspect(bad_file)
    assert "rows: 7 read, 4 usable, 3 invalid" in out
    assert "1 x not valid JSON" in out
    assert "1 x field 'messages[].content': required field is missing" in out
    assert "1 x field 'messages': required field is missing" in out
    assert f"{bad_file}:3: field 'messages[2].content': required field is missing" in out
    assert f"{bad_file}:5: not valid JSON" in out
    assert f"{bad_file}:6: field 'messages'" in out
    first = out.index(f"{bad_file}:3:")
    assert first < out.index(f"{bad_file}:5:") < out.index(f"{bad_file}:6:")  # in file order
    assert "data.skip_invalid=true" in out


def test_no_chat_template_warns_and_override_renders(sft_file, no_template_model, tiny_model):
    out = inspect(sft_file, "--model", no_template_model)
    assert "no chat template" in out and "--chat-template" in out and "chat_template:" in out
    assert "assistant: tac 0" in out  # still shows the example, normalised
    fixed = inspect(sft_file, "--model", no_template_model, "--chat-template", tiny_model / "chat_template.jinja")
    assert "no chat template" not in fixed and "[[tac 0<|im_end|>]]" in fixed


def test_dataset_info_name(tmp_path):
    write_jsonl(tmp_path / "alpaca.jsonl", [{"q": "Say hi", "a": "hi"}, {"q": "Say bye", "a": "bye"}])
    info = tmp_path / "dataset_info.json"
    info.write_text(json.dumps({"greet": {"file_name": "alpaca.jsonl",
                                          "columns": {"prompt": "q", "response": "a"}}}))
    out = inspect("greet", "--dataset-info", info)
    assert "dataset 'greet'" in out and "format: alpaca" in out and "rows: 2 read, 2 usable" in out
    assert "user: Say hi" in out
    typo = run_cli("data", "inspect", "gret", "--dataset-info", info, check=False)
    assert typo.returncode == 2 and "did you mean 'greet'" in typo.stderr and "Traceback" not in typo.stderr


def test_text_file_for_pt(tmp_path, tiny_model):
    path = tmp_path / "corpus.txt"
    path.write_text("The kitchen opens at nine in the morning.\n\nOur soup of the day is tomato with basil.\n")
    out = inspect(path, "--model", tiny_model, "--max-length", 8)
    assert "format: text" in out and "stage: pt" in out and "rows: 2 read, 2 usable" in out
    assert re.search(r"2 texts -> \d+ sequences", out)


def test_errors_exit_2_without_traceback(tmp_path, sft_file):
    for args, expected in [((tmp_path / "missing.jsonl",), "file not found"),
                           ((sft_file, "--stage", "pt"), "stage pt needs raw text"),
                           ((sft_file, "--model", tmp_path / "no-model"), "model not found")]:
        result = run_cli("data", "inspect", *map(str, args), check=False)
        assert result.returncode == 2, result.stderr
        assert expected in result.stderr and "Traceback" not in result.stderr
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert "no usable examples" in inspect(empty)
