"""Every bad-input case of the spec, through the real CLI: a clear message, exit code 2, no traceback,
and nothing written to output_dir."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from conftest import run_cli, write_jsonl


def chat(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"Reverse cat {i}"},
                         {"role": "assistant", "content": f"tac {i}"}]}


def write_config(tmp_path: Path, model: Path, train: Path, **top) -> Path:
    config = {"stage": "sft", "model": str(model), "output_dir": str(tmp_path / "out"),
              "data": {"train": str(train), "max_length": 64},
              "train": {"max_steps": 1, "batch_size": 2}, **top}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def fails(config, *overrides: str, expect: list[str], out: Path | None = None) -> str:
    """Run `posttrain train`; it must fail cleanly and leave no output behind."""
    result = run_cli("train", config, *overrides, check=False)
    assert result.returncode == 2, f"exit {result.returncode}\n{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr.count("error:") == 1
    for text in expect:
        assert text in result.stderr, f"{text!r} not in:\n{result.stderr}"
    if out is not None:
        assert not out.exists() or not any((out / name).exists()
                                           for name in ("config.yaml", "summary.json", "model.safetensors"))
    return result.stderr


def succeeds(config, *overrides: str) -> tuple[str, dict]:
    result = run_cli("train", config, *overrides, check=False)
    assert result.returncode == 0, f"{result.stdout}\n{result.stderr}"
    assert "Traceback" not in result.stderr
    out = Path(yaml.safe_load(Path(config).read_text())["output_dir"])
    for item in overrides:
        if item.startswith("output_dir="):
            out = Path(item.split("=", 1)[1])
    return result.stdout + result.stderr, json.loads((out / "summary.json").read_text())


@pytest.fixture
def bad_rows(tmp_path) -> Path:
    """Line 3: a message's content is null; line 5: not JSON; line 6: no `messages` at all."""
    broken = chat(2)
    broken["messages"][1]["content"] = None
    lines = [json.dumps(chat(0)), json.dumps(chat(1)), json.dumps(broken), json.dumps(chat(3)), "{oops",
             json.dumps({"text": "no messages here", "id": 6}), json.dumps(chat(4)), json.dumps(chat(5))]
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path


# ---------------------------------------------------------------- 1, 2: malformed rows

def test_malformed_row_names_file_line_and_field(tiny_model, tmp_path, bad_rows):
    out = tmp_path / "out"
    # the row-level error: only the null content (line 3) in the file
    lines = bad_rows.read_text().splitlines()
    only_null = tmp_path / "null.jsonl"
    only_null.write_text("\n".join(lines[:4]) + "\n")
    fails(write_config(tmp_path, tiny_model, only_null), out=out,
          expect=[f"{only_null}:3", "field 'messages[1].content'", "required field is missing"])
    # a line that is not JSON
    not_json = tmp_path / "notjson.jsonl"
    not_json.write_text("\n".join(lines[:2] + lines[4:5]) + "\n")
    fails(write_config(tmp_path, tiny_model, not_json), out=out, expect=[f"{not_json}:3", "not valid JSON"])
    # a row without `messages`
    missing = tmp_path / "missing.jsonl"
    missing.write_text("\n".join(lines[:2] + lines[5:6]) + "\n")
    fails(write_config(tmp_path, tiny_model, missing), out=out,
          expect=[f"{missing}:3", "field 'messages'", "required field is missing"])
    # all three in one file: stops at the first problem found, which names its line
    stderr = fails(write_config(tmp_path, tiny_model, bad_rows), out=out, expect=[f"{bad_rows}:"])
    assert any(f"{bad_rows}:{n}" in stderr for n in (3, 5, 6))


def test_skip_invalid_skips_counts_and_reports(tiny_model, tmp_path, bad_rows):
    config = write_config(tmp_path, tiny_model, bad_rows)
    logs, summary = succeeds(config, "data.skip_invalid=true")
    assert "skipped 3 invalid rows" in logs
    assert "not valid JSON" in logs and "required field is missing" in logs
    load = summary["data"]["train_load"]
    assert "5 examples from 8 rows" in load and "skipped 3 invalid rows" in load
    assert "1 x not valid JSON" in load
    assert "1 x field 'messages[].content': required field is missing" in load
    assert "1 x field 'messages': required field is missing" in load
    assert summary["data"]["train_examples"] == 5


# ---------------------------------------------------------------- 3, 4: model and tokenizer

def test_missing_model_path(tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", [chat(i) for i in range(4)])
    missing = tmp_path / "no-such-model"
    fails(write_config(tmp_path, missing, data), out=tmp_path / "out",
          expect=["model not found", str(missing), "init-model"])
    empty_dir = tmp_path / "empty-model"
    empty_dir.mkdir()
    fails(write_config(tmp_path, empty_dir, data), out=tmp_path / "out", expect=["no config.json"])


def test_no_chat_template_says_how_to_give_one(no_template_model, tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", [chat(i) for i in range(4)])
    config = write_config(tmp_path, no_template_model, data)
    fails(config, out=tmp_path / "out", expect=["no chat template", "chat_template:"])
    template = tmp_path / "chatml.jinja"
    template.write_text((tiny_model / "chat_template.jinja").read_text())
    _, summary = succeeds(config, f"chat_template={template}")
    assert summary["steps"] == 1
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path / "out").chat_template  # saved with the result


# ---------------------------------------------------------------- 5, 6, 7: labels, empty data, long prompts

def test_label_not_in_label_set(tiny_model, tmp_path):
    data = tmp_path / "reviews.csv"
    data.write_text("text,label\nthe soup was great,positive\nthe bread was cold,negative\n"
                    "the tea was fine,neutral\nlovely cake,positive\n")
    config = write_config(tmp_path, tiny_model, data, stage="classify")
    fails(config, "data.labels=[positive,negative]", out=tmp_path / "out",
          expect=[f"{data}:4", "field 'label'", "unknown label 'neutral'", "positive, negative"])


def test_empty_dataset(tiny_model, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    fails(write_config(tmp_path, tiny_model, empty), out=tmp_path / "out",
          expect=["no usable examples", str(empty)])
    all_bad = tmp_path / "all-bad.jsonl"
    all_bad.write_text('{"messages": null}\n{"messages": [{"role": "user", "content": "hi"}]}\nnot json\n')
    fails(write_config(tmp_path, tiny_model, all_bad), "data.skip_invalid=true", out=tmp_path / "out",
          expect=["no usable examples", "3 invalid rows skipped"])


def test_prompt_longer_than_max_length(tiny_model, tmp_path):
    long = {"messages": [{"role": "user", "content": "the kitchen opens at nine in the morning " * 4},
                         {"role": "assistant", "content": "ok"}]}
    data = write_jsonl(tmp_path / "long.jsonl", [long])
    config = write_config(tmp_path, tiny_model, data)
    fails(config, "data.max_length=16", out=tmp_path / "out",
          expect=[f"{data}:1", "prompt is longer than max_length", "> 16"])
    # skipping it leaves nothing to train on: still a clear error, not an empty run
    fails(config, "data.max_length=16", "data.skip_invalid=true", out=tmp_path / "out",
          expect=["no training examples left"])


# ---------------------------------------------------------------- 8, 9: the config itself

def test_unknown_key_suggests_closest(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", [chat(i) for i in range(4)])
    config = write_config(tmp_path, tiny_model, data)
    fails(config, "data.max_lenght=32", out=tmp_path / "out",
          expect=["unknown key 'data.max_lenght'", "did you mean 'data.max_length'"])
    raw = yaml.safe_load(config.read_text())
    raw["trian"] = raw.pop("train")
    config.write_text(yaml.safe_dump(raw))
    fails(config, out=tmp_path / "out", expect=["unknown key 'trian'", "did you mean 'train'"])


def test_wrong_type_names_the_key(tiny_model, tmp_path):
    data = write_jsonl(tmp_path / "sft.jsonl", [chat(i) for i in range(4)])
    config = write_config(tmp_path, tiny_model, data)
    fails(config, "train.lr=abc", out=tmp_path / "out", expect=["'train.lr'", "abc"])
    fails(config, "train.max_steps=many", out=tmp_path / "out", expect=["'train.max_steps'", "many"])
    fails(config, "stage=sftt", out=tmp_path / "out", expect=["'stage'", "sftt"])


def test_missing_or_invalid_config_file(tmp_path):
    fails(tmp_path / "nope.yaml", expect=["config file not found", "nope.yaml"])
    broken = tmp_path / "broken.yaml"
    broken.write_text("stage: sft\nmodel: [unclosed\n")
    fails(broken, expect=["broken.yaml", "not valid YAML"])
    listing = tmp_path / "list.yaml"
    listing.write_text("- stage\n- sft\n")
    fails(listing, expect=["list.yaml", "must be a mapping"])
    fails(broken, "nokeyvalue", expect=["not valid YAML"])


# ---------------------------------------------------------------- chat templates that cannot work

@pytest.mark.parametrize("template", ["missing.jinja", "{% bad %}", "strict"])
def test_bad_chat_template(no_template_model, tiny_model, tmp_path, template):
    data = write_jsonl(tmp_path / "sft.jsonl", [{"messages": [{"role": "system", "content": "Be brief."},
                                                              *chat(i)["messages"]]} for i in range(4)])
    if template == "missing.jinja":
        template, expect = str(tmp_path / "missing.jinja"), ["chat_template", "not found"]
    elif template == "strict":
        strict = tmp_path / "strict.jinja"
        strict.write_text("{% if messages[0].role == 'system' %}{{ raise_exception('System role not supported') }}"
                          "{% endif %}" + (tiny_model / "chat_template.jinja").read_text())
        template, expect = str(strict), [f"{data}:1", "System role not supported"]
    else:
        expect = ["chat_template", "bad"]
    fails(write_config(tmp_path, no_template_model, data), f"chat_template={template}", out=tmp_path / "out",
          expect=expect)
