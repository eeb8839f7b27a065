"""Rows shaped like LLaMA-Factory's data (our own small rows in its formats, through dataset_info.json): alpaca,
sharegpt with function_call / observation, the newer "v1" messages, multimodal rows, one-document-per-line .txt."""
from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from conftest import write_jsonl
from posttrain.data.encode import encode_all
from posttrain.data.examples import Conversation, Preference, Text
from posttrain.data.formats import load_examples
from posttrain.data.inspect import inspect_data
from posttrain.data.sources import read_rows
from posttrain.errors import DataError

CALL = json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})
TOOLS = json.dumps([{"name": "get_weather", "description": "The weather in a city",
                     "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}])


def write_json(path, data):
    path.write_text(json.dumps(data, ensure_ascii=False, indent=2), encoding="utf-8")
    return path


@pytest.fixture
def lf_dir(tmp_path):
    """A folder like LLaMA-Factory's data/: a dataset_info.json and files in its formats."""
    write_json(tmp_path / "alpaca_demo.json", [
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
        {"instruction": "Name a colour.", "input": "", "output": "Blue.", "system": "Answer in one word.",
         "history": [["Hi", "Hello."]]}])
    write_json(tmp_path / "glaive_demo.json", [
        {"conversations": [{"from": "human", "value": "Weather in Paris?"},
                           {"from": "function_call", "value": CALL},
                           {"from": "observation", "value": "{\"sky\": \"sunny\"}"},
                           {"from": "gpt", "value": "It is sunny."}], "tools": TOOLS}])
    write_jsonl(tmp_path / "v1_sft_demo.jsonl", [
        {"messages": [{"role": "system", "content": [{"type": "text", "value": "Be brief."}], "loss_weight": 0.0},
                      {"role": "user", "content": [{"type": "text", "value": "Capital of France?"}],
                       "loss_weight": 0.0},
                      {"role": "assistant", "content": [{"type": "reasoning", "value": "It is Paris."},
                                                        {"type": "text", "value": "Paris."}], "loss_weight": 1.0}]},
        {"messages": [{"role": "user", "content": [{"type": "text", "value": "Weather in Paris?"}]},
                      {"role": "assistant", "content": [{"type": "tool_call", "value": CALL}]},
                      {"role": "tool", "content": [{"type": "text", "value": "sunny"}]},
                      {"role": "assistant", "content": [{"type": "text", "value": "Sunny."}]}]}])
    write_jsonl(tmp_path / "v1_dpo_demo.jsonl", [
        {"chosen_messages": [{"role": "user", "content": [{"type": "text", "value": "2+2?"}]},
                             {"role": "assistant", "content": [{"type": "text", "value": "4"}]}],
         "rejected_messages": [{"role": "user", "content": [{"type": "text", "value": "2+2?"}]},
                               {"role": "assistant", "content": [{"type": "text", "value": "5"}]}]}])
    write_json(tmp_path / "mllm_demo.json", [
        {"messages": [{"role": "user", "content": "What is this?"}, {"role": "assistant", "content": "A cat."}],
         "images": []},
        {"messages": [{"role": "user", "content": "<image>What is in the picture?"},
                      {"role": "assistant", "content": "A cat."}], "images": ["mllm_demo_data/1.jpg"]}])
    (tmp_path / "wiki_demo.txt").write_text("First article text.\nSecond article text.\nThird article text.\n")
    sharegpt_messages = {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                         "assistant_tag": "assistant"}
    write_json(tmp_path / "dataset_info.json", {
        "alpaca_demo": {"file_name": "alpaca_demo.json"},
        "glaive_demo": {"file_name": "glaive_demo.json", "formatting": "sharegpt",
                        "columns": {"messages": "conversations", "tools": "tools"}},
        "mllm_demo": {"file_name": "mllm_demo.json", "formatting": "sharegpt",
                      "columns": {"messages": "messages", "images": "images"}, "tags": sharegpt_messages},
        "mllm_renamed": {"file_name": "mllm_demo.json", "formatting": "sharegpt",
                         "columns": {"messages": "messages", "images": "pictures"}, "tags": sharegpt_messages},
        "wiki_demo": {"file_name": "wiki_demo.txt", "columns": {"prompt": "text"}},
    })
    return tmp_path


# ---------------------------------------------------------------- item 10: multimodal rows

def test_multimodal_rows_stop_with_the_column_and_row_named(lf_dir):
    info = str(lf_dir / "dataset_info.json")
    with pytest.raises(DataError, match=r"mllm_demo.json:row 1: field 'images': 1 image: images are read only "
                                        r"by a vision-language model") as error:
        load_examples("mllm_demo", kind="conversation", dataset_info=info)
    assert "<image>" in str(error.value)  # says why: its placeholders would be trained as text
    # the same file read directly, and through a mapping that names another column
    with pytest.raises(DataError, match=r"mllm_demo.json:row 1: field 'images'"):
        load_examples(str(lf_dir / "mllm_demo.json"), kind="conversation")
    renamed = [{**row, "pictures": row.pop("images")} for row in json.loads((lf_dir / "mllm_demo.json").read_text())]
    write_json(lf_dir / "mllm_demo.json", renamed)
    with pytest.raises(DataError, match=r"mllm_demo.json:row 1: field 'pictures'"):
        load_examples("mllm_renamed", kind="conversation", dataset_info=info)
    # with skip_invalid the row is left out and counted, never trained
    examples, report = load_examples("mllm_renamed", kind="conversation", dataset_info=info, skip_invalid=True)
    assert len(examples) == 1 and "<image>" not in json.dumps(examples[0].messages)
    assert "images are read only by a vision-language model" in report.summary()


@pytest.mark.parametrize("column", ["videos", "audios"])
def test_video_and_audio_columns_are_refused_too(tmp_path, column):
    row = {"messages": [{"role": "user", "content": "<video>Describe it."}, {"role": "assistant", "content": "Rain."}],
           column: ["clip.mp4"]}
    path = write_jsonl(tmp_path / "m.jsonl", [row])
    with pytest.raises(DataError, match=rf"m.jsonl:1: field '{column}': 1 {column[:-1]}: videos and audio are not "
                                        r"supported"):
        load_examples(str(path), kind="conversation")
    assert f"field '{column}': 1 {column[:-1]}: videos and audio are not supported" in inspect_data(str(path))


def test_multimodal_preference_rows_are_refused(tmp_path):
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "<image>Which?", "chosen": "A", "rejected": "B",
                                               "images": ["x.png"]}])
    with pytest.raises(DataError, match=r"p.jsonl:1: field 'images'"):
        load_examples(str(path), kind="preference")


# ---------------------------------------------------------------- item 11: LLaMA-Factory v1 files

def test_v1_messages_with_value_parts_reasoning_and_tool_calls(lf_dir):
    (first, second), report = load_examples(str(lf_dir / "v1_sft_demo.jsonl"), kind="conversation")
    assert report.sources[0]["format"] == "messages"
    assert first.messages == [{"role": "system", "content": "Be brief."},
                              {"role": "user", "content": "Capital of France?"},
                              {"role": "assistant", "content": "<think>\nIt is Paris.\n</think>\n\nParis."}]
    assert second.messages[1] == {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]}
    assert second.messages[2] == {"role": "tool", "content": "sunny"}


def test_v1_preference_columns(lf_dir):
    (pair,), report = load_examples(str(lf_dir / "v1_dpo_demo.jsonl"), kind="preference")
    assert isinstance(pair, Preference) and report.sources[0]["format"] == "preference"
    assert pair.prompt == [{"role": "user", "content": "2+2?"}]
    assert pair.chosen == [{"role": "assistant", "content": "4"}]
    assert pair.rejected == [{"role": "assistant", "content": "5"}]


def test_content_part_errors_name_the_missing_key(tmp_path):
    bad = {"messages": [{"role": "user", "content": [{"type": "text", "txt": "hi"}]},
                        {"role": "assistant", "content": "hello"}]}
    path = write_jsonl(tmp_path / "d.jsonl", [bad])
    with pytest.raises(DataError, match=r"d.jsonl:1: field 'messages\[0\].content\[0\]': a text part needs "
                                        r"its text under 'text' or 'value' \(its keys: type, txt\)"):
        load_examples(str(path), kind="conversation")
    image = {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x.png"}}]},
                          {"role": "assistant", "content": "a cat"}]}
    path = write_jsonl(tmp_path / "d.jsonl", [image])
    with pytest.raises(DataError, match=r"content\[0\]': 'image_url' part: images are read only by a "
                                        r"vision-language model"):
        load_examples(str(path), kind="conversation")
    weighted = {"messages": [{"role": "user", "content": "hi"},
                             {"role": "assistant", "content": "hello", "loss_weight": 0.0}]}
    path = write_jsonl(tmp_path / "d.jsonl", [weighted])
    with pytest.raises(DataError, match=r"messages\[1\].loss_weight': only the default loss weights are "
                                        r"supported"):
        load_examples(str(path), kind="conversation")


# ---------------------------------------------------------------- item 12: .txt with one document per line

def test_txt_without_blank_lines_is_one_document_per_line(lf_dir, tmp_path):
    path = lf_dir / "wiki_demo.txt"
    notes = []
    rows = read_rows(str(path), notes=notes)
    assert [r.data["text"] for r in rows] == ["First article text.", "Second article text.", "Third article text."]
    assert [r.location for r in rows] == [f"{path}:{n}" for n in (1, 2, 3)]
    assert notes == [f"{path}: no blank lines, so one document per line (data.text_split: auto)"]
    examples, report = load_examples("wiki_demo", kind="text", dataset_info=str(lf_dir / "dataset_info.json"))
    assert examples == [Text(t, f"{path}:{n}") for n, t in enumerate(
        ["First article text.", "Second article text.", "Third article text."], 1)]
    assert "one document per line" in report.summary()
    # paragraphs where the file has blank lines; an explicit split is followed as given
    (tmp_path / "p.txt").write_text("One\nstill one.\n\nTwo.\n")
    notes = []
    assert [r.data["text"] for r in read_rows(str(tmp_path / "p.txt"), notes=notes)] == ["One\nstill one.", "Two."]
    assert notes == []
    assert len(read_rows(str(path), text_split="paragraph")) == 1
    assert "one document per line" in inspect_data(str(path), stage="pt")


# ---------------------------------------------------------------- the demo rows under a real template

def test_lf_demo_rows_encode_under_qwen3(lf_dir, real_tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(real_tokenizer_dir("qwen3"))
    info = str(lf_dir / "dataset_info.json")
    examples, report = load_examples(["alpaca_demo", "glaive_demo", str(lf_dir / "v1_sft_demo.jsonl")],
                                     kind="conversation", dataset_info=info)
    assert [s["used"] for s in report.sources] == [2, 1, 2] and all(isinstance(e, Conversation) for e in examples)
    features, stats = encode_all(examples, tokenizer, "sft", max_length=4096)
    assert len(features) == 5 and not stats.skipped and not stats.left_out
    texts = [tokenizer.decode([t for t, label in zip(f["input_ids"], f["labels"]) if label != -100])
             for f in features]
    assert texts[0] == "<think>\n\n</think>\n\n5<|im_end|>"
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>' in texts[2]
    assert texts[3] == "<think>\nIt is Paris.\n</think>\n\nParis.<|im_end|>"
