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


# ---------------------------------------------------------------- preference stages and rankings

PAIRS = [{"prompt": "Reverse cat", "chosen": "tac", "rejected": "cat"},
         {"prompt": "Add 2 and 3", "chosen": "5", "rejected": "6", "margin": 1.0},
         {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Sort 3 1 2"}],
          "chosen": "1 2 3", "rejected": "3 2 1"}]


def one_line_error(*args) -> str:
    result = run_cli("data", "inspect", *map(str, args), check=False)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    return result.stderr


def test_pairs_without_model_guesses_dpo(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    out = inspect(path)
    assert "format: preference (detected from the columns)" in out
    assert "stage: dpo (guessed from the format: rm or dpo; --stage to choose)" in out
    assert "rows: 3 read, 3 usable, 0 invalid" in out
    assert "prompt:\n    user: Reverse cat\n  chosen:\n    assistant: tac\n  rejected:\n    assistant: cat" in out
    assert "problems" not in out and "warnings" not in out
    assert "stage: rm\n" in inspect(path, "--stage", "rm")


def test_pairs_with_model_lengths_truncation_and_marked_render(tmp_path, tiny_model):
    from posttrain.data.formats import load_examples
    from posttrain.data.pairs import encode_preferences
    from posttrain.modeling import load_tokenizer

    path = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    out = inspect(path, "--model", tiny_model)
    for name in ("prompt", "chosen", "rejected"):
        assert re.search(rf"tokens \({name}\): min \d+ / mean [\d.]+ / p50 \d+ / p95 \d+ / max \d+", out), out
    assert "truncated at max_length 1024: 0 of 3" in out
    # the prompt through the template (not trained), then each response marked as trained text
    assert "prompt:\n<|im_start|>user\nReverse cat<|im_end|>\n<|im_start|>assistant\n" in out
    assert "chosen:\n[[tac<|im_end|>]]" in out and "rejected:\n[[cat<|im_end|>]]" in out
    assert "[[Reverse" not in out and "\x1b[" not in out
    # a small max_length: the same count as training's encoding (prompt keeps its last max_length // 2)
    examples, _ = load_examples(str(path), kind="preference")
    _, stats = encode_preferences(examples, load_tokenizer(str(tiny_model)), max_length=12)
    assert stats.truncated > 0
    small = inspect(path, "--model", tiny_model, "--max-length", 12)
    assert f"truncated at max_length 12: {stats.truncated} of 3 (the prompt keeps its last 6 tokens" in small
    assert f"{stats.truncated} of 3 examples are longer than max_length 12" in small


def test_kto_file(tmp_path, tiny_model):
    rows = [{"prompt": "Reverse cat", "completion": "tac", "label": True},
            {"prompt": "Reverse dog", "completion": "dog", "label": False},
            {"messages": [{"role": "user", "content": "Add 2 and 3"}, {"role": "assistant", "content": "5"}],
             "label": "true"}]
    path = write_jsonl(tmp_path / "kto.jsonl", rows)
    out = inspect(path)
    assert "format: feedback" in out and "stage: kto (guessed from the format" in out
    assert "rows: 3 read, 3 usable, 0 invalid" in out
    assert "desirable: 2 (66.7%)" in out and "undesirable: 1 (33.3%)" in out
    assert "completion (desirable):\n    assistant: tac" in out
    with_model = inspect(path, "--stage", "kto", "--model", tiny_model)
    assert "stage: kto\n" in with_model
    assert re.search(r"tokens \(prompt\): min \d+", with_model) and re.search(r"tokens \(completion\): min", with_model)
    assert "completion (desirable):\n[[tac<|im_end|>]]" in with_model
    only_good = write_jsonl(tmp_path / "good.jsonl", rows[:1])
    assert "only desirable completions" in inspect(only_good)


def test_rankings_file_counts_the_pairs_it_expands_to(tmp_path, tiny_model):
    rows = [{"prompt": "Add 2 and 3", "responses": ["5", "five", "6", "7"], "ranks": [1, 1, 2, 3]},
            {"prompt": "Reverse cat", "responses": ["tac", "act", "cat"]}]
    path = write_jsonl(tmp_path / "rankings.jsonl", rows)
    out = inspect(path)
    assert "format: ranking" in out and "stage: rankings (no stage trains on rankings" in out
    assert "rows: 2 read, 2 usable, 0 invalid" in out
    assert "rankings: 2; responses per ranking: min 3 / mean 3.5 / max 4" in out
    assert "expands them to 8 pairs (1 tied pairs skipped)" in out  # 5 + 3 pairs, 5 and five tie
    assert "response 1 (rank 1):\n    assistant: five" in out
    pairs = run_cli("data", "pairs", path, "--out", tmp_path / "pairs.jsonl").stdout
    assert "2 rankings -> 8 pairs (1 tied pairs skipped)" in pairs  # the same counts as `data pairs`
    with_model = inspect(path, "--model", tiny_model)
    assert "truncated at max_length 1024: 0 of 8" in with_model
    assert "chosen:\n[[5<|im_end|>]]" in with_model and "rejected:\n[[6<|im_end|>]]" in with_model


def test_identical_pair_and_missing_field(tmp_path):
    rows = PAIRS + [{"prompt": "Say hi", "chosen": "hi", "rejected": "hi"}, {"prompt": "Say bye", "chosen": "bye"}]
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = inspect(path)
    assert "stage: dpo" in out
    assert "rows: 5 read, 3 usable, 1 invalid, 1 skipped (chosen equals rejected; training skips them too)" in out
    assert "1 x field 'rejected': required field is missing" in out
    assert f"{path}:5: field 'rejected': required field is missing" in out


def test_preference_errors_exit_2_with_one_line(tmp_path):
    pairs = write_jsonl(tmp_path / "pairs.jsonl", PAIRS)
    rankings = write_jsonl(tmp_path / "rankings.jsonl", [{"prompt": "p", "responses": ["a", "b"]}])
    assert "stage kto needs labelled completions" in one_line_error(pairs, "--stage", "kto")
    assert "preference data (chosen/rejected) is for stages rm and dpo" in one_line_error(pairs, "--stage", "sft")
    assert "stages rm and dpo need preference pairs" in one_line_error(rankings, "--stage", "dpo")
    assert "--max-length must be at least 2" in one_line_error(pairs, "--max-length", "1")


def test_dataset_info_ranking_entry_without_stage(tmp_path):
    write_jsonl(tmp_path / "rank.jsonl", [{"instruction": "Say hi", "chosen": "hi", "rejected": "bye"}])
    info = tmp_path / "dataset_info.json"
    info.write_text(json.dumps({"prefs": {"file_name": "rank.jsonl", "ranking": True}}))
    out = inspect("prefs", "--dataset-info", info)
    assert "format: preference_alpaca" in out and "stage: dpo (guessed" in out and "rows: 1 read, 1 usable" in out
