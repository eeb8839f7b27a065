"""Preference data: formats -> Preference/Feedback/Ranking, rankings -> pairs, encoding and collation."""
from __future__ import annotations

import json
import logging

import pytest
import torch

from conftest import write_jsonl
from posttrain.data.examples import Feedback, Preference, Ranking
from posttrain.data.formats import detect_format, load_examples
from posttrain.data.pairs import (collate_feedback, collate_pairs, encode_feedback, encode_feedbacks,
                                  encode_preference, encode_preferences)
from posttrain.data.preference import expand_ranking, pairs_command
from posttrain.data.sources import Row
from posttrain.errors import DataError

SYS, USER = {"role": "system", "content": "Be kind."}, {"role": "user", "content": "What is soup?"}


def say(text, role="assistant"):
    return {"role": role, "content": text}


def load(tmp_path, rows, kind="preference", name="d.jsonl", **kwargs):
    return load_examples(str(write_jsonl(tmp_path / name, rows)), kind=kind, **kwargs)


@pytest.fixture(scope="module")
def tok(tiny_model):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_model)


# ---------------------------------------------------------------- formats

def test_prompt_chosen_rejected_strings_messages_system_and_margin(tmp_path):
    rows = [{"prompt": "What is soup?", "chosen": "Food.", "rejected": "A car.", "system": "Be kind.",
             "margin": 2},
            {"prompt": [USER], "chosen": [say("Food.")], "rejected": [say("A car.")]}]
    (first, second), report = load(tmp_path, rows)
    assert isinstance(first, Preference) and report.sources[0]["format"] == "preference"
    assert first.prompt == [SYS, USER] and first.chosen == [say("Food.")] and first.rejected == [say("A car.")]
    assert first.margin == 2.0 and second.margin is None and second.prompt == [USER]
    assert first.source.endswith("d.jsonl:1")


def test_implicit_prompt_from_common_prefix(tmp_path):
    history = [SYS, USER, say("Food."), say("And more?", "user")]
    rows = [{"chosen": history + [say("Yes, bread.")], "rejected": history + [say("No.")]}]
    (example,), _ = load(tmp_path, rows)
    assert example.prompt == history and example.chosen == [say("Yes, bread.")] and example.rejected == [say("No.")]


def test_implicit_prompt_errors(tmp_path):
    tail = {"chosen": [USER, say("a")], "rejected": [USER, say("a"), say("more?", "user"), say("b")]}
    with pytest.raises(DataError, match=r"d.jsonl:1: field 'rejected': the response must be assistant turns"):
        load(tmp_path, [tail])
    with pytest.raises(DataError, match="share no prompt"):
        load(tmp_path, [{"chosen": [USER, say("a")], "rejected": [say("hi", "user"), say("b")]}])


def test_detection_per_kind():
    rows = lambda **kw: [Row(kw, "x:1")]  # noqa: E731
    assert detect_format(rows(prompt="p", chosen="a", rejected="b"), "x", kind="preference") == "preference"
    assert detect_format(rows(instruction="p", chosen="a", rejected="b"), "x", kind="preference") == \
        "preference_alpaca"
    assert detect_format(rows(conversations=[], chosen={}, rejected={}), "x", kind="preference") == \
        "preference_sharegpt"
    assert detect_format(rows(messages=[], label=True), "x", kind="feedback") == "feedback"
    assert detect_format(rows(prompt="p", responses=[]), "x", kind="ranking") == "ranking"
    with pytest.raises(DataError, match="stages rm and dpo need preference pairs"):
        detect_format(rows(instruction="p", output="o"), "x", kind="preference")


def test_llamafactory_ranking_alpaca_and_sharegpt(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"q": "Add", "extra": "2 and 3", "good": "5", "bad": "6"}])
    write_jsonl(tmp_path / "s.jsonl", [{"conversations": [{"from": "human", "value": "hi"},
                                                          {"from": "gpt", "value": "hello"},
                                                          {"from": "human", "value": "2+3?"}],
                                        "system": "Be kind.",
                                        "chosen": {"from": "gpt", "value": "5"},
                                        "rejected": {"from": "gpt", "value": "6"}}])
    info = tmp_path / "dataset_info.json"
    info.write_text(json.dumps({
        "alp": {"file_name": "a.jsonl", "ranking": True,
                "columns": {"prompt": "q", "query": "extra", "chosen": "good", "rejected": "bad"}},
        "sgpt": {"file_name": "s.jsonl", "formatting": "sharegpt", "ranking": True,
                 "columns": {"messages": "conversations", "system": "system", "chosen": "chosen",
                             "rejected": "rejected"}}}))
    (alp, sgpt), report = load_examples(["alp", "sgpt"], kind="preference", dataset_info=str(info))
    assert alp.prompt == [say("Add\n2 and 3", "user")] and alp.chosen == [say("5")] and alp.rejected == [say("6")]
    assert sgpt.prompt == [SYS, say("hi", "user"), say("hello"), say("2+3?", "user")]
    assert sgpt.chosen == [say("5")] and sgpt.rejected == [say("6")]
    assert [s["format"] for s in report.sources] == ["preference_alpaca", "preference_sharegpt"]
    with pytest.raises(DataError, match="dataset 'alp': is preference data"):
        load_examples("alp", kind="conversation", dataset_info=str(info))


def test_chosen_equal_rejected_is_skipped_and_counted(tmp_path, caplog):
    rows = [{"prompt": "p", "chosen": "same", "rejected": "same"}, {"prompt": "p", "chosen": "a", "rejected": "b"},
            {"chosen": [USER, say("x")], "rejected": [USER, say("x")]}]
    with caplog.at_level(logging.WARNING, logger="posttrain"):
        examples, report = load(tmp_path, rows)
    assert len(examples) == 1 and report.dropped["chosen equals rejected"] == 2
    assert "skipped 2 pairs: chosen equals rejected" in report.summary()
    assert "d.jsonl:1: field 'chosen': chosen equals rejected" in caplog.text


def test_missing_field_and_bad_margin_name_file_line_field(tmp_path):
    rows = [{"prompt": "p", "chosen": "a", "rejected": "b"}, {"prompt": "p", "chosen": "a"}]
    with pytest.raises(DataError, match=r"d.jsonl:2: field 'rejected': required field is missing"):
        load(tmp_path, rows)
    with pytest.raises(DataError, match=r"d.jsonl:1: field 'margin': must be a finite number"):
        load(tmp_path, [{"prompt": "p", "chosen": "a", "rejected": "b", "margin": "big"}])


# ---------------------------------------------------------------- KTO

def test_feedback_formats(tmp_path):
    rows = [{"messages": [SYS, USER, say("Food.")], "label": True},
            {"prompt": "What is soup?", "completion": "A car.", "label": False},
            {"prompt": [USER], "completion": [say("Food.")], "label": "true"}]
    (a, b, c), _ = load(tmp_path, rows, kind="feedback")
    assert isinstance(a, Feedback) and a.prompt == [SYS, USER] and a.completion == [say("Food.")] and a.desirable
    assert b.prompt == [USER] and b.completion == [say("A car.")] and b.desirable is False
    assert c.desirable is True
    (tmp_path / "k.csv").write_text("prompt,completion,label\nq,a,false\n")
    (d,), _ = load_examples(str(tmp_path / "k.csv"), kind="feedback")
    assert d.desirable is False


def test_feedback_label_must_be_boolean(tmp_path):
    with pytest.raises(DataError, match=r"d.jsonl:1: field 'label': must be a boolean \(true or false\), got 1"):
        load(tmp_path, [{"prompt": "q", "completion": "a", "label": 1}], kind="feedback")
    with pytest.raises(DataError, match=r"d.jsonl:1: field 'label': required field is missing"):
        load(tmp_path, [{"messages": [USER, say("a")]}], kind="feedback")


def test_llamafactory_kto_tag(tmp_path):
    write_jsonl(tmp_path / "k.jsonl", [{"instruction": "Add", "input": "", "output": "5", "kto_tag": False}])
    info = tmp_path / "dataset_info.json"
    info.write_text(json.dumps({"kto": {"file_name": "k.jsonl", "columns": {
        "prompt": "instruction", "query": "input", "response": "output", "kto_tag": "kto_tag"}}}))
    (example,), _ = load_examples("kto", kind="feedback", dataset_info=str(info))
    assert example.prompt == [say("Add", "user")] and example.completion == [say("5")] and not example.desirable


# ---------------------------------------------------------------- rankings

def ranking(*letters, ranks=None):
    return Ranking([USER], [[say(x)] for x in letters], list(ranks) if ranks else list(range(len(letters))))


def names(pairs):
    return [p.chosen[0]["content"] + p.rejected[0]["content"] for p in pairs]


def test_expand_ranking_order_and_ties():
    assert names(expand_ranking(ranking("A", "B", "C", "D", ranks=[1, 0, 2, 3]))) == \
        ["BA", "BC", "BD", "AC", "AD", "CD"]
    assert names(expand_ranking(ranking("A", "B", "C", ranks=[0, 0, 1]))) == ["AC", "BC"]
    assert expand_ranking(ranking("A", "B", ranks=[2, 2])) == []


def test_ranking_format_and_too_few_responses(tmp_path):
    rows = [{"prompt": "q", "responses": ["B", [say("A")]], "system": "Be kind."},
            {"prompt": [USER], "responses": ["A", "B", "C"], "ranks": [1, 0, 1]}]
    (first, second), _ = load(tmp_path, rows, kind="ranking")
    assert first.prompt == [SYS, say("q", "user")] and first.ranks == [0, 1] and first.responses[1] == [say("A")]
    assert second.ranks == [1, 0, 1]
    with pytest.raises(DataError, match=r"d.jsonl:1: field 'responses': a ranking needs at least 2 responses, got 1"):
        load(tmp_path, [{"prompt": "q", "responses": ["only"]}], kind="ranking")


def test_pairs_command_end_to_end(tmp_path):
    rows = [{"prompt": "q", "system": "Be kind.", "responses": ["A", "B", "C", "D"], "ranks": [1, 0, 2, 3]},
            {"prompt": "r", "responses": ["x", "y", "z"], "ranks": [0, 0, 1]}]
    src, out = write_jsonl(tmp_path / "rank.jsonl", rows), tmp_path / "out" / "pairs.jsonl"
    summary = pairs_command(str(src), str(out))
    assert summary == f"{src}: 2 rankings -> 8 pairs (1 tied pairs skipped) -> {out}"
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 8 and lines[0] == {"prompt": [SYS, say("q", "user")], "chosen": [say("B")],
                                            "rejected": [say("A")]}
    pairs, report = load_examples(str(out), kind="preference")
    assert names(pairs) == ["BA", "BC", "BD", "AC", "AD", "CD", "xz", "yz"]
    assert pairs[0].prompt == [SYS, say("q", "user")] and report.sources[0]["format"] == "preference"


def test_pairs_skip_a_response_sampled_twice_and_say_so(tmp_path):
    # "12" and "9" were each sampled twice: 2 x 2 = 4 expanded (12, 9) pairs, written once; (12, 7) and
    # (9, 7) repeat for the second "12" / "9". The same pair in another ranking (another rater) is kept.
    rows = [{"prompt": "3 + 9?", "responses": ["12", "9", "12", "9", "7"], "ranks": [0, 1, 0, 1, 2]},
            {"prompt": "3 + 9?", "responses": ["12", "9"], "ranks": [0, 1]}]
    src, out = write_jsonl(tmp_path / "rank.jsonl", rows), tmp_path / "pairs.jsonl"
    summary = pairs_command(str(src), str(out))
    assert summary == (f"{src}: 2 rankings -> 4 pairs (2 tied pairs skipped, 5 repeated pairs skipped)"
                       f" -> {out}")
    pairs, _ = load_examples(str(out), kind="preference")
    assert names(pairs) == ["129", "127", "97", "129"]


# ---------------------------------------------------------------- encoding

def test_encode_preference_spans_and_shared_prompt(tok):
    ex = Preference([SYS, USER], [say("Soup is food.")], [say("No idea.")], margin=1.5)
    feature = encode_preference(tok, ex, max_length=512)
    prompt_text = tok.apply_chat_template([SYS, USER], tokenize=False, add_generation_prompt=True)
    assert tok.decode(feature["prompt_ids"]) == prompt_text
    assert tok.decode(feature["chosen_ids"]) == "Soup is food.<|im_end|>"
    assert tok.decode(feature["rejected_ids"]) == "No idea.<|im_end|>"
    assert feature["margin"] == 1.5 and feature["truncated"] is False
    # the same prompt ids whatever the answer: tokenized on their own
    other = encode_preference(tok, Preference([SYS, USER], [say("x")], [say("y")]), max_length=512)
    assert other["prompt_ids"] == feature["prompt_ids"]
    full = tok.apply_chat_template([SYS, USER, say("Soup is food.")], tokenize=False)
    assert tok.decode(feature["prompt_ids"] + feature["chosen_ids"]) == full.rstrip()


def test_truncation_keeps_prompt_end_and_response_start(tok):
    long_prompt = [say(" ".join(["soup"] * 40), "user")]
    long, short = say(" ".join(["bread"] * 40)), say("ok")
    full = encode_preference(tok, Preference(long_prompt, [long], [short]), max_length=4096)
    cut = encode_preference(tok, Preference(long_prompt, [long], [short]), max_length=32, max_prompt_length=10)
    assert cut["truncated"] and cut["prompt_ids"] == full["prompt_ids"][-10:]
    assert cut["chosen_ids"] == full["chosen_ids"][:22] and cut["rejected_ids"] == full["rejected_ids"]
    # a short prompt is kept whole; the response gets the rest (default max_prompt_length = max_length // 2)
    short_prompt = [say("hi", "user")]
    whole = encode_preference(tok, Preference(short_prompt, [long], [short]), max_length=4096)
    cut = encode_preference(tok, Preference(short_prompt, [long], [short]), max_length=40)
    assert cut["truncated"] and cut["prompt_ids"] == whole["prompt_ids"] and len(whole["prompt_ids"]) < 20
    assert cut["chosen_ids"] == whole["chosen_ids"][:40 - len(whole["prompt_ids"])]
    features, stats = encode_preferences([Preference(long_prompt, [long], [short]),
                                          Preference(short_prompt, [short], [say("no")])], tok, max_length=32)
    assert stats.truncated == 1 and stats.examples == 2 and len(stats.lengths) == 4
    assert max(stats.lengths) <= 32 and "1 truncated" in stats.summary()


def test_encode_feedback(tok):
    feature = encode_feedback(tok, Feedback([USER], [say("Food.")], desirable=False), max_length=64)
    assert tok.decode(feature["completion_ids"]) == "Food.<|im_end|>" and feature["desirable"] is False
    features, stats = encode_feedbacks([Feedback([USER], [say("a")], True)] * 2, tok, max_length=64)
    assert len(features) == 2 and len(stats.lengths) == 2


# ---------------------------------------------------------------- collation

def test_collate_pairs_shapes_padding_labels_margins():
    features = [{"prompt_ids": [1, 2], "chosen_ids": [3, 4, 5], "rejected_ids": [6], "margin": 2.0,
                 "ref_chosen_logps": -1.0, "ref_rejected_logps": -2.0},
                {"prompt_ids": [7], "chosen_ids": [8], "rejected_ids": [9, 10], "margin": None,
                 "ref_chosen_logps": -3.0, "ref_rejected_logps": -4.0}]
    batch = collate_pairs(features, pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5], [7, 8, 0, 0, 0], [1, 2, 6, 0, 0], [7, 9, 10, 0, 0]]
    assert batch["attention_mask"].tolist() == [[1] * 5, [1, 1, 0, 0, 0], [1, 1, 1, 0, 0], [1, 1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 3, 4, 5], [-100, 8, -100, -100, -100],
                                        [-100, -100, 6, -100, -100], [-100, 9, 10, -100, -100]]
    assert batch["margin"].tolist() == [2.0, 0.0] and batch["ref_rejected_logps"].tolist() == [-2.0, -4.0]
    for feature in features:
        feature["margin"] = None
        del feature["ref_chosen_logps"]
    batch = collate_pairs(features, pad_id=0)
    assert "margin" not in batch and "ref_chosen_logps" not in batch and "ref_rejected_logps" in batch


def test_collate_feedback_rotates_completions_for_kl():
    features = [{"prompt_ids": [1], "completion_ids": [2, 3], "desirable": True},
                {"prompt_ids": [4, 5], "completion_ids": [6], "desirable": False},
                {"prompt_ids": [7], "completion_ids": [8], "desirable": True}]
    batch = collate_feedback(features, pad_id=0)
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 5, 6], [7, 8, 0]]
    assert batch["labels"].tolist() == [[-100, 2, 3], [-100, -100, 6], [-100, 8, -100]]
    assert batch["desirable"].dtype == torch.bool and batch["desirable"].tolist() == [True, False, True]
    assert batch["kl_input_ids"].tolist() == [[1, 6, 0], [4, 5, 8], [7, 2, 3]]
    assert batch["kl_labels"].tolist() == [[-100, 6, -100], [-100, -100, 8], [-100, 2, 3]]
    assert batch["kl_attention_mask"].tolist() == [[1, 1, 0], [1, 1, 1], [1, 1, 1]]
    assert collate_feedback(features, pad_id=0, max_length=2)["kl_input_ids"].tolist() == [[1, 6], [4, 5], [7, 2]]
