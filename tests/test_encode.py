"""Loss masks follow the chat template: only assistant turns (and their end-of-turn marker) are trained."""
from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from posttrain.data.encode import encode_all, encode_conversation, encode_labeled, encode_text
from posttrain.data.examples import Conversation, Labeled, Text
from posttrain.errors import DataError

# Llama-3 style: header tokens around the role, <|eot_id|> ends a turn, BOS written by the template.
LLAMA3_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{{ '<|start_header_id|>' + m.role + '<|end_header_id|>\n\n' + m.content + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
# Qwen3 style: the reasoning of assistant turns before the last user message is dropped, so the rendering
# of a chat's beginning is not a prefix of the whole rendering.
DROP_THINK_TEMPLATE = (
    "{% set ns = namespace(last_user=0) %}"
    "{% for m in messages %}{% if m.role == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}{% endfor %}"
    "{% for m in messages %}{{ '<|im_start|>' + m.role + '\n' }}"
    "{% if m.role == 'assistant' and loop.index0 < ns.last_user and '</think>' in m.content %}"
    "{{ m.content.split('</think>')[-1].lstrip() }}{% else %}{{ m.content }}{% endif %}"
    "{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CHAT = Conversation(source="chat.jsonl:3", messages=[
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "When does the kitchen open?"},
    {"role": "assistant", "content": "At nine in the morning."},
    {"role": "user", "content": "What is the soup of the day?"},
    {"role": "assistant", "content": "Tomato with basil."},
])


@pytest.fixture
def tokenizer(tiny_model):
    return AutoTokenizer.from_pretrained(tiny_model)  # fresh per test: some tests change the template


def trained_spans(tokenizer, feature) -> list[str]:
    """Decode each run of consecutive trained tokens."""
    runs, run = [], []
    for token, label in zip(feature["input_ids"], feature["labels"]):
        if label != -100:
            assert label == token
            run.append(token)
        elif run:
            runs.append(run)
            run = []
    runs += [run] if run else []
    return [tokenizer.decode(r) for r in runs]


def test_multi_turn_trains_assistant_content_and_end_marker(tokenizer):
    [feature] = encode_conversation(tokenizer, CHAT, max_length=512)
    assert trained_spans(tokenizer, feature) == ["At nine in the morning.<|im_end|>", "Tomato with basil.<|im_end|>"]
    assert not feature["truncated"]
    text = tokenizer.decode(feature["input_ids"])
    assert text == tokenizer.apply_chat_template(CHAT.messages, tokenize=False)
    untrained = tokenizer.decode([t for t, l in zip(feature["input_ids"], feature["labels"]) if l == -100])
    for piece in ["<|im_start|>system\nBe brief.", "When does the kitchen open?", "<|im_start|>assistant\n"]:
        assert piece in untrained


def test_train_on_prompt_trains_everything(tokenizer):
    [feature] = encode_conversation(tokenizer, CHAT, max_length=512, train_on_prompt=True)
    assert feature["labels"] == feature["input_ids"]


def test_tools_and_tool_calls(tokenizer):
    tool = {"type": "function", "function": {"name": "menu", "parameters": {"type": "object"}}}
    conv = Conversation(tools=[tool], messages=[
        {"role": "user", "content": "Soup?"},
        {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "menu", "arguments": {}}}]},
        {"role": "tool", "content": "tomato"},
        {"role": "assistant", "content": "Tomato soup."},
    ])
    [feature] = encode_conversation(tokenizer, conv, max_length=512)
    call = '<tool_call>{"name": "menu", "arguments": {}}</tool_call><|im_end|>'
    assert trained_spans(tokenizer, feature) == [call, "Tomato soup.<|im_end|>"]
    assert '"name": "menu"' in tokenizer.decode(feature["input_ids"]).split("<|im_end|>")[0]  # tools listed


def test_truncation_is_counted(tokenizer):
    [full] = encode_conversation(tokenizer, CHAT, max_length=512)
    first_trained = next(i for i, label in enumerate(full["labels"]) if label != -100)
    first_end = full["labels"].index(-100, first_trained)  # cut inside the second turn
    [feature] = encode_conversation(tokenizer, CHAT, max_length=first_end + 2)
    assert feature["truncated"] and len(feature["input_ids"]) == first_end + 2
    assert feature["input_ids"] == full["input_ids"][:first_end + 2]
    features, stats = encode_all([CHAT, CHAT], tokenizer, "sft", max_length=first_end + 2)
    assert stats.truncated == 2 and stats.examples == 2 and stats.lengths == [first_end + 2] * 2
    assert "2 truncated" in stats.summary()


def test_prompt_longer_than_max_length(tokenizer):
    with pytest.raises(DataError, match=r"chat.jsonl:3.*prompt is longer than max_length \(\d+ tokens > 10\)"):
        encode_conversation(tokenizer, CHAT, max_length=10)
    short = Conversation([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}])
    with pytest.raises(DataError, match=r"chat.jsonl:3.*\(\d+ tokens > 20\)"):
        encode_all([short, CHAT], tokenizer, "sft", max_length=20)
    features, stats = encode_all([short, CHAT], tokenizer, "sft", max_length=20, skip_invalid=True)
    assert len(features) == 1 and stats.examples == 1
    assert stats.skipped == {"prompt longer than max_length": 1}
    assert "1 skipped (prompt longer than max_length: 1)" in stats.summary()


def test_no_chat_template_is_a_clear_error(tokenizer):
    tokenizer.chat_template = None
    with pytest.raises(DataError, match="chat_template:"):
        encode_all([CHAT], tokenizer, "sft", max_length=512, skip_invalid=True)


def test_llama3_style_template(tokenizer):
    tokenizer.chat_template = LLAMA3_TEMPLATE
    tokenizer.bos_token = "<|endoftext|>"
    [feature] = encode_conversation(tokenizer, CHAT, max_length=512)
    assert trained_spans(tokenizer, feature) == ["At nine in the morning.<|eot_id|>", "Tomato with basil.<|eot_id|>"]
    bos = tokenizer.bos_token_id
    assert feature["input_ids"][0] == bos and feature["input_ids"][1] != bos  # BOS once, from the template


def test_template_that_drops_earlier_reasoning(tokenizer):
    tokenizer.chat_template = DROP_THINK_TEMPLATE
    conv = Conversation([
        {"role": "user", "content": "When does the kitchen open?"},
        {"role": "assistant", "content": "<think>Check the hours.</think>\n\nAt nine."},
        {"role": "user", "content": "And the soup?"},
        {"role": "assistant", "content": "<think>Look at the menu.</think>\n\nTomato."},
    ])
    [feature] = encode_conversation(tokenizer, conv, max_length=512)
    assert trained_spans(tokenizer, feature) == [
        "At nine.<|im_end|>", "<think>Look at the menu.</think>\n\nTomato.<|im_end|>"]


def test_conversation_without_assistant_is_an_error(tokenizer):
    conv = Conversation([{"role": "user", "content": "Hi"}], source="x.jsonl:1")
    with pytest.raises(DataError, match="x.jsonl:1.*no assistant message"):
        encode_conversation(tokenizer, conv, max_length=64)


def test_pretraining_chunks_lose_nothing(tokenizer):
    text = Text("The kitchen opens at nine in the morning and closes at ten at night. " * 5, source="a.txt:1")
    chunks = encode_text(tokenizer, text, max_length=16)
    ids = [t for c in chunks for t in c["input_ids"]]
    assert ids == tokenizer(text.text)["input_ids"] + [tokenizer.eos_token_id]
    assert all(len(c["input_ids"]) <= 16 for c in chunks) and len(chunks) > 2
    assert all(c["labels"] == c["input_ids"] for c in chunks)
    features, stats = encode_all([text], tokenizer, "pt", max_length=16)
    assert stats.examples == 1 and len(features) == len(chunks) and stats.truncated == 0


def test_classification_labels(tokenizer):
    label2id = {"negative": 0, "positive": 1}
    feature = encode_labeled(tokenizer, Labeled("the food was great", "positive"), label2id, max_length=3)
    assert feature["label"] == 1 and len(feature["input_ids"]) == 3 and feature["truncated"]
    with pytest.raises(DataError, match=r"data.csv:7: field 'label'.*'neutral'.*negative, positive"):
        encode_all([Labeled("meh", "neutral", source="data.csv:7")], tokenizer, "classify", max_length=32,
                   label2id=label2id)
    features, _ = encode_all([Labeled("meh", "b"), Labeled("ok", "a")], tokenizer, "classify", max_length=32)
    assert [f["label"] for f in features] == [1, 0]  # label set derived from the data, sorted


def test_wrong_example_type_for_stage(tokenizer):
    with pytest.raises(DataError, match="a.txt:1.*Conversation"):
        encode_all([Text("hello", source="a.txt:1")], tokenizer, "sft", max_length=32)
