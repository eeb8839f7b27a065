"""Formats, dataset_info.json compatibility, load_examples and split_eval, on real files."""
from __future__ import annotations

import json

import pytest

from conftest import write_jsonl
from posttrain.config import DataSource
from posttrain.data.examples import Conversation, Labeled, Text
from posttrain.data.formats import detect_format, load_examples, split_eval, to_example
from posttrain.data.sources import Row, read_rows
from posttrain.errors import DataError

USER, ASSISTANT = {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}


def load_one(tmp_path, rows, kind="conversation", name="d.jsonl", **kwargs):
    path = write_jsonl(tmp_path / name, rows)
    examples, report = load_examples(str(path), kind=kind, **kwargs)
    return examples, report, path


def test_alpaca_with_input_system_and_history(tmp_path):
    row = {"instruction": "Add", "input": "2 and 3", "output": "5", "system": "Be brief.",
           "history": [["hi", "hello"]]}
    examples, _, _ = load_one(tmp_path, [row, {"instruction": "x", "output": "y", "input": ""}])
    example = examples[0]
    assert isinstance(example, Conversation) and examples[1].messages[0] == {"role": "user", "content": "x"}
    assert example.messages == [{"role": "system", "content": "Be brief."}, USER, ASSISTANT,
                                {"role": "user", "content": "Add\n2 and 3"}, {"role": "assistant", "content": "5"}]
    assert example.source.endswith("d.jsonl:1")


def test_sharegpt_with_tools_function_call_and_observation(tmp_path):
    tools = [{"name": "add", "description": "add numbers", "parameters": {"type": "object"}}]
    row = {"conversations": [
        {"from": "human", "value": "2+3?"},
        {"from": "function_call", "value": json.dumps({"name": "add", "arguments": {"a": 2, "b": 3}})},
        {"from": "observation", "value": "5"},
        {"from": "gpt", "value": "It is 5."}], "system": "You add.", "tools": json.dumps(tools)}
    (example,), report, _ = load_one(tmp_path, [row])
    assert report.sources[0]["format"] == "sharegpt"
    assert [m["role"] for m in example.messages] == ["system", "user", "assistant", "tool", "assistant"]
    assert example.messages[2] == {"role": "assistant", "content": "", "tool_calls": [
        {"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]}
    assert example.tools == [{"type": "function", "function": tools[0]}]


def test_sharegpt_accepts_role_content_turns(tmp_path):
    (example,), _, _ = load_one(tmp_path, [{"conversations": [USER, ASSISTANT]}])
    assert example.messages == [USER, ASSISTANT]


def test_messages_with_content_parts_tool_calls_and_function_role(tmp_path):
    call = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}
    row = {"messages": [{"role": "system", "content": "S"},
                        {"role": "user", "content": [{"type": "text", "text": "one "},
                                                     {"type": "text", "text": "two"}]},
                        {"role": "assistant", "content": None, "tool_calls": [call]},
                        {"role": "function", "content": "1", "name": "add"},
                        {"role": "assistant", "content": "done"}],
           "tools": [{"type": "function", "function": {"name": "add"}}]}
    (example,), _, _ = load_one(tmp_path, [row])
    assert example.messages[1] == {"role": "user", "content": "one two"}
    assert example.messages[2]["tool_calls"] == [{"type": "function", "id": "c1",
                                                  "function": {"name": "add", "arguments": {"a": 1}}}]
    assert example.messages[3] == {"role": "tool", "content": "1", "name": "add"}
    assert example.tools == [{"type": "function", "function": {"name": "add"}}]


def test_prompt_completion_strings_and_lists(tmp_path):
    rows = [{"prompt": "hi", "completion": "hello"},
            {"prompt": [{"role": "system", "content": "S"}, USER], "completion": [ASSISTANT]}]
    examples, _, _ = load_one(tmp_path, rows)
    assert examples[0].messages == [USER, ASSISTANT]
    assert examples[1].messages == [{"role": "system", "content": "S"}, USER, ASSISTANT]


def test_text_and_classification_decided_by_kind(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\ngood food,1\nslow service,neg\n")
    labeled, report = load_examples(str(path), kind="labeled")
    assert labeled[0] == Labeled("good food", "1", f"{path}:2") and report.sources[0]["format"] == "classification"
    texts, report = load_examples(str(path), kind="text")
    assert texts[1] == Text("slow service", f"{path}:3") and report.sources[0]["format"] == "text"
    rows = read_rows(str(path))
    assert detect_format(rows, str(path)) == "classification"


def test_txt_for_pretraining(tmp_path):
    (tmp_path / "c.txt").write_text("one\n\ntwo\n")
    examples, _ = load_examples(str(tmp_path / "c.txt"), kind="text")
    assert [e.text for e in examples] == ["one", "two"]


def test_conversation_data_for_pt_and_text_for_sft_are_errors(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"messages": [USER, ASSISTANT]}])
    with pytest.raises(DataError, match=rf"{path}: stage pt needs raw text .* but this is messages data"):
        load_examples(str(path), kind="text")
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "x"}])
    with pytest.raises(DataError, match=rf"{path}: stage sft needs conversations"):
        load_examples(str(path), kind="conversation", skip_invalid=True)


def test_unknown_columns_list_what_was_seen(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"question": "q", "answer": "a"}])
    with pytest.raises(DataError) as info:
        load_examples(str(path), kind="conversation")
    message = str(info.value)
    assert str(path) in message and "['answer', 'question']" in message and "sharegpt" in message


def test_columns_rename_with_auto_detection(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [{"q": "2+2?", "a": "4"}])
    source = DataSource(path=str(path), columns={"prompt": "q", "response": "a"})
    (example,), report = load_examples(source, kind="conversation")
    assert report.sources[0]["format"] == "alpaca"
    assert example.messages[-1] == {"role": "assistant", "content": "4"}


BAD_ROWS = [  # (row, format, field named in the error, words in the reason)
    ({"instruction": "x"}, "alpaca", "output", "required field is missing"),
    ({"instruction": "x", "output": None}, "alpaca", "output", "is null"),
    ({"instruction": "x", "output": 5}, "alpaca", "output", "must be a string"),
    ({"instruction": "x", "output": "y", "history": [["only one"]]}, "alpaca", "history[0]", "pair"),
    ({"conversations": [{"from": "bot", "value": "x"}]}, "sharegpt", "conversations[0].from",
     "unknown role 'bot' (allowed: human, gpt, observation, function_call, system)"),
    ({"conversations": [{"from": "human", "value": "x"}, {"from": "function_call", "value": "{oops"}]},
     "sharegpt", "conversations[1].value", "not valid JSON"),
    ({"conversations": []}, "sharegpt", "conversations", "empty"),
    ({"conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}]}, "sharegpt",
     "conversations", "first non-system message is from the assistant"),
    ({"messages": [USER, {"role": "assistant", "content": "  "}]}, "messages", "messages", "no assistant turn"),
    ({"messages": [USER, {"role": "assistant"}]}, "messages", "messages[1].content", "missing"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}, ASSISTANT]}, "messages",
     "messages[0].content[0]", "'image_url' part: images are read only by a vision-language model"),
    ({"messages": [USER, ASSISTANT], "tools": "[{"}, "messages", "tools", "not valid JSON"),
    ({"prompt": "p", "completion": ""}, "prompt_completion", "completion", "is empty"),
    ({"text": "  "}, "text", "text", "is empty"),
    ({"text": "t", "label": None}, "classification", "label", "is null"),
    ({"text": "t", "label": [1]}, "classification", "label", "must be a string or an integer"),
]


@pytest.mark.parametrize("row, fmt, field, reason", BAD_ROWS)
def test_bad_rows_name_path_line_and_field(tmp_path, row, fmt, field, reason):
    kind = {"text": "text", "classification": "labeled"}.get(fmt, "conversation")
    path = write_jsonl(tmp_path / "d.jsonl", [row])
    with pytest.raises(DataError) as info:
        load_examples(DataSource(path=str(path), format=fmt), kind=kind)
    assert str(info.value).startswith(f"{path}:1: field '{field}': ")
    assert reason in str(info.value)


def test_bad_row_in_json_and_csv_names_row(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(json.dumps([{"instruction": "a", "output": "b"}, {"instruction": "a", "output": 1}]))
    with pytest.raises(DataError, match=rf"{path}:row 1: field 'output': must be a string"):
        load_examples(str(path), kind="conversation")
    path = tmp_path / "d.csv"
    path.write_text('text,label\n"multi\nline",a\nok,\n')
    with pytest.raises(DataError, match=rf"{path}:4: field 'label': is empty"):
        load_examples(str(path), kind="labeled")


def test_skip_invalid_counts_by_reason(tmp_path):
    path = tmp_path / "d.jsonl"
    good = json.dumps({"instruction": "a", "output": "b"})
    path.write_text("\n".join([good, '{"instruction": "a"}', "not json", '{"instruction": "a"}', good]) + "\n")
    examples, report = load_examples(str(path), kind="conversation", skip_invalid=True)
    assert len(examples) == 2
    assert report.skipped == {"field 'output': required field is missing": 2,
                              "not valid JSON (Expecting value)": 1}
    assert report.sources == [{"path": str(path), "format": "alpaca", "rows": 5, "used": 2}]
    assert "skipped 3 invalid rows" in report.summary() and "2 x field 'output'" in report.summary()


def test_empty_dataset_and_all_skipped(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match="no usable examples in .*e.jsonl"):
        load_examples(str(tmp_path / "e.jsonl"), kind="conversation")
    path = write_jsonl(tmp_path / "bad.jsonl", [{"instruction": "a"}])
    with pytest.raises(DataError, match=r"no usable examples .*1 invalid rows skipped"):
        load_examples(str(path), kind="conversation", skip_invalid=True)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match=rf"{tmp_path}/missing.jsonl: file not found"):
        load_examples(str(tmp_path / "missing.jsonl"), kind="text")


def test_mixing_sources_and_max_samples(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"instruction": f"a{i}", "output": "x"} for i in range(3)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"messages": [USER, ASSISTANT]}] * 4)
    examples, report = load_examples([str(a), DataSource(path=str(b), max_samples=2)], kind="conversation")
    assert [e.source for e in examples] == [f"{a}:1", f"{a}:2", f"{a}:3", f"{b}:1", f"{b}:2"]
    assert [(s["format"], s["used"]) for s in report.sources] == [("alpaca", 3), ("messages", 2)]
    examples, report = load_examples([str(a), str(b)], kind="conversation", max_samples=4)
    assert len(examples) == 4 and [s["used"] for s in report.sources] == [3, 1]


def write_info(tmp_path, info):
    path = tmp_path / "dataset_info.json"
    path.write_text(json.dumps(info))
    return str(path)


def test_dataset_info_alpaca_with_custom_columns(tmp_path):
    write_jsonl(tmp_path / "qa.jsonl", [{"q": "Q", "ctx": "C", "a": "A", "sys": "S", "hist": [["u", "v"]]}])
    info = write_info(tmp_path, {"my_qa": {"file_name": "qa.jsonl", "columns": {
        "prompt": "q", "query": "ctx", "response": "a", "system": "sys", "history": "hist"}}})
    (example,), report = load_examples("my_qa", kind="conversation", dataset_info=info)
    assert example.messages == [{"role": "system", "content": "S"}, {"role": "user", "content": "u"},
                                {"role": "assistant", "content": "v"}, {"role": "user", "content": "Q\nC"},
                                {"role": "assistant", "content": "A"}]
    assert report.sources[0]["path"] == str(tmp_path / "qa.jsonl")


def test_dataset_info_alpaca_errors_name_the_file_column(tmp_path):
    write_jsonl(tmp_path / "qa.jsonl", [{"q": "Q", "a": 3}])
    info = write_info(tmp_path, {"my_qa": {"file_name": "qa.jsonl", "columns": {"prompt": "q", "response": "a"}}})
    with pytest.raises(DataError, match=r"qa.jsonl:1: field 'a': must be a string"):
        load_examples("my_qa", kind="conversation", dataset_info=info)


def test_dataset_info_sharegpt_with_tags(tmp_path):
    turns = [{"speaker": "system", "text": "S"}, {"speaker": "me", "text": "hi"},
             {"speaker": "call", "text": '{"name": "f", "arguments": {}}'}, {"speaker": "result", "text": "ok"},
             {"speaker": "bot", "text": "hello"}]
    (tmp_path / "chat.json").write_text(json.dumps([{"dialog": turns, "fns": '[{"name": "f"}]'}]))
    info = write_info(tmp_path, {"chat": {
        "file_name": "chat.json", "formatting": "sharegpt", "columns": {"messages": "dialog", "tools": "fns"},
        "tags": {"role_tag": "speaker", "content_tag": "text", "user_tag": "me", "assistant_tag": "bot",
                 "observation_tag": "result", "function_tag": "call"}}})
    (example,), _ = load_examples("chat", kind="conversation", dataset_info=info)
    assert [m["role"] for m in example.messages] == ["system", "user", "assistant", "tool", "assistant"]
    assert example.tools == [{"type": "function", "function": {"name": "f"}}]
    (tmp_path / "chat.json").write_text(json.dumps([{"dialog": [{"speaker": "human", "text": "x"}]}]))
    with pytest.raises(DataError, match=r"chat.json:row 0: field 'dialog\[0\].speaker': unknown role 'human' "
                                        r"\(allowed: me, bot, result, call, system\)"):
        load_examples("chat", kind="conversation", dataset_info=info)


def test_dataset_info_pretraining_prompt_column(tmp_path):
    write_jsonl(tmp_path / "c4.jsonl", [{"text": "doc one"}, {"text": "doc two"}])
    info = write_info(tmp_path, {"c4_demo": {"file_name": "c4.jsonl", "columns": {"prompt": "text"}}})
    examples, _ = load_examples("c4_demo", kind="text", dataset_info=info)
    assert [e.text for e in examples] == ["doc one", "doc two"]


def test_dataset_info_ranking_and_unknown_name(tmp_path):
    write_jsonl(tmp_path / "p.jsonl", [{"instruction": "a", "chosen": "b", "rejected": "c"}])
    info = write_info(tmp_path, {"prefs": {"file_name": "p.jsonl", "ranking": True},
                                 "alpaca_en": {"file_name": "x.json"}, "glaive": {"file_name": "g.json"}})
    with pytest.raises(DataError, match="dataset 'prefs': is preference data"):
        load_examples("prefs", kind="conversation", dataset_info=info)
    with pytest.raises(DataError, match=r"unknown dataset 'alpaca_e' .*did you mean 'alpaca_en'\? "
                                        r"\(known: alpaca_en, glaive, prefs\)"):
        load_examples("alpaca_e", kind="conversation", dataset_info=info)


def test_default_system_prompt(tmp_path):
    row = Row({"messages": [USER, ASSISTANT]}, "x:1")
    example = to_example(row, "messages", kind="conversation", system="Sys")
    assert example.messages[0] == {"role": "system", "content": "Sys"} and example.source == "x:1"


def test_split_eval_is_deterministic():
    data = list(range(10))
    train, held = split_eval(data, 0.2, seed=1)
    assert len(held) == 2 and sorted(train + held) == data
    assert split_eval(data, 0.2, seed=1) == (train, held)
    assert split_eval(data, 0.2, seed=2) != (train, held)
    assert split_eval([1, 2], 0.01, seed=0)[1] != [] and split_eval(data, 0.0, seed=0) == (data, [])


def test_detection_follows_most_rows_and_refuses_preference_data(tmp_path):
    rows = [Row({"conversations": []}, "x:1")]
    rows += [Row({"instruction": "a", "output": "b"}, f"x:{n}") for n in (2, 3)]
    assert detect_format(rows, "x") == "alpaca"
    with pytest.raises(DataError, match="x: preference data"):
        detect_format([Row({"prompt": "p", "chosen": "a", "rejected": "b"}, "x:1")], "x")


def test_prompt_response_rows_read_as_alpaca_without_a_mapping(tmp_path):
    from posttrain.data.formats import load_examples

    path = tmp_path / "pr.jsonl"
    path.write_text('{"prompt": "Say hi.", "query": "Politely.", "response": "Hello there."}\n')
    examples, _ = load_examples(str(path), kind="conversation")
    assert examples[0].messages[-2:] == [{"role": "user", "content": "Say hi.\nPolitely."},
                                         {"role": "assistant", "content": "Hello there."}]
