"""Loss masks under real published chat templates (Qwen3, Llama-3, Gemma-3, DeepSeek-V3), fetched from the npm
registry at set-up (tests/real_tokenizers.py): tool calls, reasoning, and what a template leaves out."""
from __future__ import annotations

import json
import logging

import pytest
import yaml
from transformers import AutoTokenizer

from conftest import run_cli, write_jsonl
from posttrain.config import Config
from posttrain.data.encode import SkippableError, encode_all, encode_conversation
from posttrain.data.examples import Conversation, Preference
from posttrain.data.pairs import encode_preferences
from posttrain.data.inspect import inspect_data
from posttrain.errors import DataError
from posttrain.modeling import load_tokenizer

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
CALL = {"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
TOOL_CHAT = Conversation(source="tools.jsonl:1", tools=TOOLS, messages=[
    {"role": "user", "content": "What is the weather in Paris?"},
    {"role": "assistant", "content": "", "tool_calls": [CALL]},
    {"role": "tool", "content": "sunny, 21 C"},
    {"role": "assistant", "content": "It is sunny in Paris."},
])
CHAT = Conversation(source="chat.jsonl:1", messages=[
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "When does the kitchen open?"},
    {"role": "assistant", "content": "At nine."},
    {"role": "user", "content": "What is the soup of the day?"},
    {"role": "assistant", "content": "Tomato."},
])
THINK_CHAT = Conversation(source="think.jsonl:1", messages=[
    {"role": "user", "content": "When does the kitchen open?"},
    {"role": "assistant", "content": "<think>\nCheck the opening hours.\n</think>\n\nAt nine."},
    {"role": "user", "content": "And the soup?"},
    {"role": "assistant", "content": "<think>\nLook at the menu.\n</think>\n\nTomato."},
])


@pytest.fixture(scope="module")
def real(real_tokenizer_dir):
    """real(name) -> a fresh published tokenizer (fresh: some tests change it)."""
    return lambda name: AutoTokenizer.from_pretrained(real_tokenizer_dir(name))


def trained_runs(tokenizer, feature) -> list[str]:
    """Each run of consecutive trained tokens, decoded."""
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


def one(tokenizer, conv, **kwargs) -> dict:
    [feature] = encode_conversation(tokenizer, conv, max_length=4096, **kwargs)
    return feature


# ---------------------------------------------------------------- item 7: tool-call turns under Qwen3

def test_qwen3_tool_call_turns_are_found_and_trained(real):
    tokenizer = real("qwen3")
    feature = one(tokenizer, TOOL_CHAT)
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'
    assert trained_runs(tokenizer, feature) == [call, "<think>\n\n</think>\n\nIt is sunny in Paris.<|im_end|>"]
    text = tokenizer.decode(feature["input_ids"])
    assert text == tokenizer.apply_chat_template(TOOL_CHAT.messages, tools=TOOLS, tokenize=False)
    assert "# Tools" in text and "<tool_response>\nsunny, 21 C\n</tool_response>" in text


def test_qwen3_multi_turn_trains_each_answer_with_its_end_marker(real):
    tokenizer = real("qwen3")
    feature = one(tokenizer, CHAT)
    assert trained_runs(tokenizer, feature) == ["At nine.<|im_end|>", "<think>\n\n</think>\n\nTomato.<|im_end|>"]


def test_llama3_template_that_always_adds_the_assistant_header(real):
    """The first Llama-3 template adds the assistant header even without add_generation_prompt: a turn ends at
    <|eot_id|> (where generation stops), the header after it is never trained."""
    tokenizer = real("llama3")
    feature = one(tokenizer, CHAT)
    assert trained_runs(tokenizer, feature) == ["At nine.<|eot_id|>", "Tomato.<|eot_id|>"]


def test_gemma3_and_llama3_1_multi_turn(real):
    for name, end in (("gemma3", "<end_of_turn>"), ("llama3_1", "<|eot_id|>")):
        tokenizer = real(name)
        assert trained_runs(tokenizer, one(tokenizer, CHAT)) == [f"At nine.{end}", f"Tomato.{end}"], name


def test_gemma3_refuses_a_tool_role_which_is_skipped_and_counted(real):
    tokenizer = real("gemma3")
    features, stats = encode_all([TOOL_CHAT, CHAT], tokenizer, "sft", max_length=4096, skip_invalid=True)
    assert len(features) == 1 and stats.skipped == {"chat template error": 1}


# A template that writes earlier answers backwards: their text is nowhere in the rendering of the chat's start
BACKWARDS = ("{% for m in messages %}{{ '<|im_start|>' + m.role + '\n' }}"
             "{% if m.role == 'assistant' and not loop.last %}{{ m.content | reverse }}{% else %}{{ m.content }}"
             "{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
             "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def test_a_turn_that_cannot_be_located_is_skippable_and_counted(tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.chat_template = BACKWARDS
    with pytest.raises(SkippableError, match=r"chat.jsonl:1.*could not find assistant message 2"):
        encode_all([CHAT], tokenizer, "sft", max_length=512)
    single = Conversation([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}])
    features, stats = encode_all([CHAT, single], tokenizer, "sft", max_length=512, skip_invalid=True)
    assert len(features) == 1 and stats.skipped == {"assistant turn not found in the rendered chat": 1}
    assert "1 skipped (assistant turn not found in the rendered chat: 1)" in stats.summary()


# ---------------------------------------------------------------- item 8: tool calls a template drops

def test_deepseek_v3_renders_and_trains_tool_calls(real):
    """DeepSeek-V3 writes tool calls only for content None, with the arguments as a JSON string."""
    tokenizer = real("deepseek_v3")
    feature = one(tokenizer, TOOL_CHAT)
    runs = trained_runs(tokenizer, feature)
    assert len(runs) == 2
    assert runs[0].startswith("<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather")
    assert '{"city": "Paris"}' in runs[0]
    assert runs[1] == "It is sunny in Paris.<｜end▁of▁sentence｜>"
    features, stats = encode_all([TOOL_CHAT], tokenizer, "sft", max_length=4096)
    assert not stats.left_out


def test_template_without_tool_calls_warns_once_with_counts(real, caplog):
    tokenizer = real("llama3_1")  # a Llama-3 template that renders content only
    with caplog.at_level(logging.WARNING, logger="posttrain"):
        features, stats = encode_all([TOOL_CHAT, TOOL_CHAT, CHAT], tokenizer, "sft", max_length=4096)
    assert stats.left_out == {"tool calls": 2}
    for feature in features[:2]:  # the call turn renders as nothing: not trained, no literal "None" either
        assert trained_runs(tokenizer, feature) == ["It is sunny in Paris.<|eot_id|>"]
        assert "None" not in tokenizer.decode(feature["input_ids"])
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "tool calls of 2 assistant turns" in warnings[0], warnings
    assert "tool calls of 2 assistant turns" in stats.summary()


def test_preference_responses_with_tool_calls(real, caplog):
    """rm/dpo/kto responses: DeepSeek-V3 writes the call, a template without tool calls is counted and warned."""
    pair = Preference([{"role": "user", "content": "What is the weather in Paris?"}],
                      [{"role": "assistant", "content": "", "tool_calls": [CALL]}],
                      [{"role": "assistant", "content": "I do not know."}], source="pairs.jsonl:1")
    for name, left_out in (("deepseek_v3", {}), ("qwen3", {}), ("llama3_1", {"tool calls": 1})):
        tokenizer = real(name)
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="posttrain"):
            [feature], stats = encode_preferences([pair], tokenizer, max_length=4096)
        assert stats.left_out == left_out, name
        assert ("get_weather" in tokenizer.decode(feature["chosen_ids"])) == (not left_out), name
        assert [r.getMessage() for r in caplog.records if "tool calls of 1 assistant turn" in r.getMessage()] \
            == ([] if not left_out else [stats.warnings()[0]]), name


def test_data_inspect_shows_what_the_template_leaves_out(real_tiny_model, tmp_path):
    rows = [{"messages": [{"role": "user", "content": "Weather in Paris?"},
                          {"role": "assistant", "content": None, "tool_calls": [CALL]},
                          {"role": "tool", "content": "sunny"},
                          {"role": "assistant", "content": "<think>It says sunny.</think>Sunny."},
                          {"role": "user", "content": "Thanks"},
                          {"role": "assistant", "content": "You are welcome."}]}]
    data = write_jsonl(tmp_path / "tools.jsonl", rows)
    out = run_cli("data", "inspect", data, "--model", real_tiny_model("llama3_1", "llama")).stdout
    assert "tool calls of 1 assistant turn" in out, out
    out = inspect_data(str(data), model=str(real_tiny_model("qwen3")))  # the same report, in-process
    assert "tool calls" not in out.split("warnings:")[-1]
    assert "drops the reasoning of 1 assistant turn" in out and "keep_reasoning" in out, out


# ---------------------------------------------------------------- item 9: reasoning of earlier turns

def test_qwen3_dropped_reasoning_is_counted(real):
    tokenizer = real("qwen3")
    features, stats = encode_all([THINK_CHAT], tokenizer, "sft", max_length=4096)
    assert trained_runs(tokenizer, features[0]) == [
        "At nine.<|im_end|>", "<think>\nLook at the menu.\n</think>\n\nTomato.<|im_end|>"]
    assert stats.left_out == {"reasoning": 1}
    assert "drops the reasoning of 1 assistant turn" in stats.summary() and "keep_reasoning" in stats.summary()


def test_keep_reasoning_trains_each_such_turn_as_the_final_turn(real):
    tokenizer = real("qwen3")
    features, stats = encode_all([THINK_CHAT], tokenizer, "sft", max_length=4096, keep_reasoning=True)
    assert len(features) == 2 and stats.examples == 1
    first, whole = features
    assert trained_runs(tokenizer, first) == ["<think>\nCheck the opening hours.\n</think>\n\nAt nine.<|im_end|>"]
    assert tokenizer.decode(first["input_ids"]) == tokenizer.apply_chat_template(THINK_CHAT.messages[:2],
                                                                                 tokenize=False)
    assert trained_runs(tokenizer, whole) == ["<think>\nLook at the menu.\n</think>\n\nTomato.<|im_end|>"]
    assert not stats.left_out and stats.apart == 1
    assert "1 assistant turn trained in its own sequence to keep its reasoning" in stats.summary()
    # a chat whose reasoning the template keeps is left as one sequence
    features, stats = encode_all([CHAT], tokenizer, "sft", max_length=4096, keep_reasoning=True)
    assert len(features) == 1 and stats.apart == 0


# R1-distill style: the reasoning is cut from every assistant turn, the final one included
DROP_ALWAYS = ("{% for m in messages %}{{ '<|im_start|>' + m.role + '\n' }}"
               "{% if m.role == 'assistant' %}{{ m.content.split('</think>')[-1] | trim }}{% else %}{{ m.content }}"
               "{% endif %}{{ '<|im_end|>\n' }}{% endfor %}"
               "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def test_reasoning_a_template_never_renders_is_counted_apart(tiny_model):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model)
    tokenizer.chat_template = DROP_ALWAYS
    features, stats = encode_all([THINK_CHAT], tokenizer, "sft", max_length=512, keep_reasoning=True)
    assert len(features) == 1 and stats.apart == 0
    assert stats.left_out == {"reasoning even as the final turn": 2}
    assert "never renders the reasoning of 2 assistant turns" in stats.summary()


# ---------------------------------------------------------------- item 13: chat_template replaces

def test_chat_template_replaces_the_tokenizers_own(real_tiny_model):
    tokenizer = load_tokenizer(str(real_tiny_model("qwen3")), chat_template=DROP_ALWAYS)
    assert tokenizer.chat_template == DROP_ALWAYS
    description = Config.model_fields["chat_template"].description
    assert "replaces" in description and "without one" not in description
    help_text = run_cli("data", "inspect", "--help").stdout
    assert "replaces" in help_text and "without one" not in help_text


# ---------------------------------------------------------------- a real training step through the CLI

def test_sft_step_through_the_cli_with_qwen3_tool_calls_and_reasoning(real_tiny_model, tmp_path):
    """LLaMA-Factory sharegpt rows with function_call / observation turns and reasoning, one real SFT step."""
    call = json.dumps({"name": "get_weather", "arguments": {"city": "Paris"}})
    rows = [{"conversations": [{"from": "human", "value": f"Weather in Paris, day {i}?"},
                               {"from": "function_call", "value": call},
                               {"from": "observation", "value": "sunny"},
                               {"from": "gpt", "value": "<think>The tool says sunny.</think>\n\nSunny."},
                               {"from": "human", "value": "Thanks"},
                               {"from": "gpt", "value": "You are welcome."}],
             "tools": json.dumps([TOOLS[0]["function"]])} for i in range(4)]
    data = write_jsonl(tmp_path / "tools.jsonl", rows)
    out = tmp_path / "out"
    config = {"stage": "sft", "model": str(real_tiny_model("qwen3")), "output_dir": str(out),
              "data": {"train": str(data), "max_length": 512, "keep_reasoning": True},
              "train": {"max_steps": 1, "batch_size": 4, "lr": 1e-3}}
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(config))
    run_cli("train", tmp_path / "sft.yaml")
    report = json.loads((out / "summary.json").read_text())["data"]["train_encode"]
    assert report.startswith("4 examples -> 8 sequences"), report
    assert "4 assistant turns trained in their own sequence to keep their reasoning" in report
    assert AutoTokenizer.from_pretrained(out).chat_template == AutoTokenizer.from_pretrained(
        real_tiny_model("qwen3")).chat_template


def test_data_error_type_is_unchanged_for_bad_rows(real):
    """A conversation without an assistant turn is still a DataError naming its row."""
    with pytest.raises(DataError, match="x.jsonl:1.*no assistant message"):
        encode_conversation(real("qwen3"), Conversation([{"role": "user", "content": "Hi"}], source="x.jsonl:1"),
                            max_length=64)
