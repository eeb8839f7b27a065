"""Tool calls read back into OpenAI `tool_calls`: through the real server with the published Qwen3 tokenizer and
template (a tiny model wired to answer with a tool call), and the parser on what the real Qwen3 and DeepSeek-V3
templates write for an assistant tool-call turn."""
from __future__ import annotations

import json
import os

import openai
import pytest
import torch

from posttrain.serve.tools import parse_tool_calls
from conftest import serving

TOOLS = [{"type": "function", "function": {"name": "f", "description": "a tool",
                                           "parameters": {"type": "object", "properties": {}}}}]
CALL = '<tool_call>{"name":"f","arguments":{}}</tool_call>'


def wired_model(tokenizer_dir, out, answer: str):
    """A 1-layer Qwen2 model around the tokenizer whose greedy answer to any chat prompt is `answer` then
    <|im_end|>: attention and MLP outputs are zero, so each position's state is its token's embedding, and the
    untied head maps each token of the answer (and the prompt's last token) to the next one. The answer's
    tokens must be distinct."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen2Config

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    chain = [tokenizer("\n", add_special_tokens=False)["input_ids"][-1]]
    chain += tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    assert len(set(chain[:-1])) == len(chain) - 1
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                         tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight", "embed_tokens.weight", "lm_head.weight")):
                param.zero_()
        for slot, (token, following) in enumerate(zip(chain, chain[1:])):
            model.model.embed_tokens.weight[token, slot] = 1.0
            model.lm_head.weight[following, slot] = 10.0
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def qwen3_server(real_tokenizer_dir, tmp_path_factory):
    model = wired_model(real_tokenizer_dir("qwen3"), tmp_path_factory.mktemp("qwen3-tool-caller"), CALL)
    log = tmp_path_factory.mktemp("server") / "server.log"
    with serving(["--model", model], log) as url:
        yield url, str(model)
    assert "Traceback" not in log.read_text(), log.read_text()


def test_qwen3_tool_call_comes_back_as_tool_calls(qwen3_server):
    url, model = qwen3_server
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
    messages = [{"role": "user", "content": "Call the tool."}]
    answer = client.chat.completions.create(model=model, messages=messages, tools=TOOLS, max_tokens=20, temperature=0)
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "f" and json.loads(call.function.arguments) == {}
    assert call.id.startswith("call_")

    without = client.chat.completions.create(model=model, messages=messages, max_tokens=20, temperature=0)
    assert without.choices[0].message.content == CALL and without.choices[0].message.tool_calls is None

    stream = client.chat.completions.create(model=model, messages=messages, tools=TOOLS, max_tokens=20, temperature=0,
                                            stream=True)
    chunks = [c for c in stream if c.choices]
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert [(tc.index, tc.function.name, json.loads(tc.function.arguments)) for tc in calls] == [(0, "f", {})]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    assert not any(c.choices[0].delta.content for c in chunks)

    # the call goes back into the conversation and the template renders it
    follow = messages + [choice.message.model_dump(exclude_none=True), {"role": "tool", "tool_call_id": call.id,
                                                                        "content": "done"}]
    again = client.chat.completions.create(model=model, messages=follow, tools=TOOLS, max_tokens=20, temperature=0)
    assert again.choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize("name", ["qwen3", "deepseek_v3"])
def test_parser_reads_back_what_the_real_template_writes(real_tokenizer_dir, name):
    from transformers import AutoTokenizer

    from posttrain.data.encode import render_chat  # the renderer training and the server use

    tokenizer = AutoTokenizer.from_pretrained(real_tokenizer_dir(name))
    calls = [{"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
             {"id": "c2", "type": "function", "function": {"name": "get_time", "arguments": {"zone": "CET"}}}]
    prompt = [{"role": "user", "content": "Weather and time in Paris?"}]
    turn = {"role": "assistant", "content": None if name == "deepseek_v3" else "Checking.", "tool_calls": calls}
    before = render_chat(tokenizer, prompt, TOOLS, generation_prompt=True)
    after = render_chat(tokenizer, prompt + [turn], TOOLS, generation_prompt=False)
    generated = after[len(os.path.commonprefix([before, after])):]
    content, parsed = parse_tool_calls(generated.split("<|im_end|>")[0].split("<｜end▁of▁sentence｜>")[0])
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in parsed] == [
        ("get_weather", {"city": "Paris"}), ("get_time", {"zone": "CET"})]
    if name == "deepseek_v3":
        assert content is None
    else:  # Qwen3 writes an (empty) reasoning block before the content of a last assistant turn
        assert content.endswith("Checking.") and "tool_call" not in content


def test_parser_leaves_broken_calls_in_the_content():
    content, calls = parse_tool_calls('Sure. <tool_call>{"name": "f", "arguments": {</tool_call>')
    assert calls == [] and content == 'Sure. <tool_call>{"name": "f", "arguments": {</tool_call>'
    content, calls = parse_tool_calls('<tool_call>{"arguments": {}}</tool_call>')
    assert calls == [] and content.startswith("<tool_call>")
