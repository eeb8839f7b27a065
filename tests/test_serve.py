"""`posttrain serve` as clients use it: the real server in a subprocess, the official openai package as the client,
raw HTTP for what the SDK cannot send (malformed bodies, missing keys, a client that goes away), and the exact
requests lm-evaluation-harness `local-completions` sends, checked against log-probs computed with transformers."""
from __future__ import annotations

import http.client
import json
import socket
import threading
import time
import urllib.error
import urllib.request

import openai
import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import serving
from posttrain.engine import Engine, SamplingParams
from test_engine import varied_model  # noqa: F401 - the fixture: tiny_model with varied, peaked outputs

KEY = "test-key-123"
MAX_BYTES = 64 * 1024


def make_adapter(model_dir, out, seed):
    from peft import LoraConfig, get_peft_model

    lora = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                          LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"]))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 1.0)
    lora.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(varied_model, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("adapters")
    return {"alpha": make_adapter(varied_model, root / "alpha", 0), "beta": make_adapter(varied_model, root / "beta", 1)}


@pytest.fixture(scope="module")
def server(varied_model, adapters, tmp_path_factory):  # noqa: F811
    log = tmp_path_factory.mktemp("server") / "server.log"
    loras = [f"--lora={name}={path}" for name, path in adapters.items()]
    with serving(["--model", varied_model, "--api-key", KEY, *loras, "--max-request-bytes", MAX_BYTES,
                  "--max-rows", "16", "--cors", "https://app.example"], log) as url:
        yield url
    assert "Traceback" not in log.read_text(), log.read_text()  # no request ever crashed a handler


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def engines(varied_model, adapters):  # noqa: F811
    """In-process engines on the same weights: what the server's answers must equal."""
    return {"base": Engine.load(varied_model), "alpha": Engine.load(varied_model, adapters["alpha"])}


def post(url, body, key: str | None = KEY, raw: bytes | None = None) -> tuple[int, dict]:
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(url, data=raw if raw is not None else json.dumps(body).encode(),
                                     headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def get(url, key: str | None = KEY) -> tuple[int, dict]:
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "The kitchen opens"}]


def test_models_lists_the_base_and_each_adapter_with_its_parent(client, varied_model):  # noqa: F811
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {str(varied_model), "alpha", "beta"}
    assert models["alpha"].model_extra["parent"] == str(varied_model) == models["beta"].model_extra["parent"]
    assert models[str(varied_model)].model_extra["parent"] is None


def test_chat_equals_the_engine_and_the_adapter_is_chosen_by_name(client, engines, varied_model):  # noqa: F811
    params = SamplingParams(max_new_tokens=8, temperature=0)
    for name, engine in [(str(varied_model), engines["base"]), ("alpha", engines["alpha"])]:
        expected = engine.chat([MESSAGES], params)[0]
        answer = client.chat.completions.create(model=name, messages=MESSAGES, max_tokens=8, temperature=0)
        assert answer.choices[0].message.content == expected.text
        assert answer.choices[0].message.role == "assistant"
        assert answer.choices[0].finish_reason == expected.finish_reason
        assert answer.usage.prompt_tokens == expected.prompt_tokens
        assert answer.usage.completion_tokens == len(expected.token_ids)
    base = client.chat.completions.create(model=str(varied_model), messages=MESSAGES, max_tokens=8, temperature=0)
    beta = client.chat.completions.create(model="beta", messages=MESSAGES, max_tokens=8, temperature=0)
    assert base.choices[0].message.content != beta.choices[0].message.content


def test_chat_roles_logprobs_n_and_max_completion_tokens(client, varied_model):  # noqa: F811
    messages = [*MESSAGES, {"role": "assistant", "content": "Nine.", "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "hours", "arguments": "{}"}}]},
                {"role": "tool", "content": "9:00", "tool_call_id": "c1"}, {"role": "user", "content": [
                    {"type": "text", "text": "And "}, {"type": "text", "text": "Sunday?"}]}]
    answer = client.chat.completions.create(model=str(varied_model), messages=messages, max_completion_tokens=5,
                                            temperature=1.0, seed=7, n=3, logprobs=True, top_logprobs=2)
    assert [c.index for c in answer.choices] == [0, 1, 2]
    assert len({c.message.content for c in answer.choices}) > 1  # n samples, not copies
    assert answer.usage.completion_tokens == sum(len(c.logprobs.content) for c in answer.choices)
    for choice in answer.choices:
        assert 1 <= len(choice.logprobs.content) <= 5
        for entry in choice.logprobs.content:
            assert entry.logprob <= 0 and len(entry.top_logprobs) == 2
            assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
    again = client.chat.completions.create(model=str(varied_model), messages=messages, max_completion_tokens=5,
                                           temperature=1.0, seed=7, n=3)
    assert [c.message.content for c in again.choices] == [c.message.content for c in answer.choices]  # same seed


def test_completions_accept_every_prompt_form(client, engines, varied_model):  # noqa: F811
    tokenizer = engines["base"].tokenizer
    ids = tokenizer("Two plus three")["input_ids"]
    expected = engines["base"].generate([ids], SamplingParams(max_new_tokens=6, temperature=0))[0].text
    for prompt, token_counts in [("Two plus three", [len(ids)]), (["Two plus three", "Reverse"], [len(ids), len(tokenizer("Reverse")["input_ids"])]),
                                 (ids, [len(ids)]), ([ids, ids[:2]], [len(ids), 2])]:
        answer = client.completions.create(model=str(varied_model), prompt=prompt, max_tokens=6, temperature=0, n=2)
        assert [c.index for c in answer.choices] == list(range(2 * len(token_counts)))
        assert answer.choices[0].text == answer.choices[1].text == expected  # greedy: both choices alike
        assert answer.usage.prompt_tokens == sum(token_counts) and answer.usage.completion_tokens > 0
    echoed = client.completions.create(model=str(varied_model), prompt="Two plus three", max_tokens=3, echo=True,
                                       temperature=0.7, top_p=0.9, seed=0, stop="\n", extra_body={"top_k": 5})
    assert echoed.choices[0].text.startswith("Two plus three")


def test_completion_logprobs_int_gives_the_legacy_form(client, engines, varied_model):  # noqa: F811
    answer = client.completions.create(model=str(varied_model), prompt="The kitchen", max_tokens=4, temperature=0.8,
                                       logprobs=3, seed=1)
    logprobs = answer.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.top_logprobs) == 4
    # the same request in-process (same seed: same tokens): each dict holds the 3 most likely tokens' strings and
    # the sampled one's (byte tokens that decode to the same string share one key: JSON objects have unique keys)
    base = engines["base"]
    ids = base.tokenizer("The kitchen")["input_ids"]
    expected = base.generate([ids], SamplingParams(max_new_tokens=4, temperature=0.8, seed=1, top_logprobs=3))[0]
    for token, value, top, token_id, alternatives in zip(logprobs.tokens, logprobs.token_logprobs,
                                                         logprobs.top_logprobs, expected.token_ids, expected.top_logprobs):
        strings = {base.tokenizer.decode([i]) for i, _ in alternatives} | {token}
        assert token == base.tokenizer.decode([token_id]) and token in top and top[token] == value
        assert set(top) == strings
    assert logprobs.text_offset[0] == len("The kitchen")


def test_streaming_holds_stop_strings_back_and_ends_with_usage_and_done(client, engines, server, varied_model):  # noqa: F811
    full = engines["base"].chat([MESSAGES], SamplingParams(max_new_tokens=24, temperature=0))[0].text
    stop = full[len(full) // 2:len(full) // 2 + 2]
    assert len(stop) == 2 and stop.strip()
    stream = client.chat.completions.create(model=str(varied_model), messages=MESSAGES, max_tokens=24, temperature=0,
                                            stop=[stop, "never-there"], stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full[:full.find(stop)] and stop not in text
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    sent = ""
    for chunk in chunks[:-1]:
        sent += chunk.choices[0].delta.content or ""
        assert stop not in sent

    request = urllib.request.Request(server + "/v1/completions", method="POST", headers={
        "Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}, data=json.dumps({
            "model": str(varied_model), "prompt": "Reverse", "max_tokens": 4, "stream": True, "n": 2,
            "temperature": 0}).encode())
    lines = [line for line in urllib.request.urlopen(request, timeout=30).read().decode().split("\n") if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)
    events = [json.loads(line[6:]) for line in lines[:-1]]
    # greedy, so both choices end as the engine's own greedy answer does (sampled, either could stop early)
    base = engines["base"]
    alone = base.generate([base.tokenizer("Reverse", add_special_tokens=False)["input_ids"]],
                          SamplingParams(max_new_tokens=4, temperature=0))[0]
    finals = [(e["choices"][0]["index"], e["choices"][0]["finish_reason"]) for e in events
              if e["choices"][0]["finish_reason"]]
    assert sorted(finals) == [(0, alone.finish_reason), (1, alone.finish_reason)]


def test_lm_eval_loglikelihood_requests_get_the_prompt_logprobs(server, engines, varied_model):  # noqa: F811
    """What `lm_eval --model local-completions` sends for loglikelihood, and how it reads the answer."""
    status, info = get(server + "/tokenizer_info")
    assert status == 200 and info["eos_token"] == "<|endoftext|>" and "chat_template" in info
    status, tokenized = post(server + "/tokenize", {"prompt": "test", "add_special_tokens": False})
    tokenizer = engines["base"].tokenizer
    assert status == 200 and tokenized["tokens"] == tokenizer("test", add_special_tokens=False)["input_ids"]
    assert post(server + "/detokenize", {"tokens": tokenized["tokens"]})[1]["prompt"] == "test"

    contexts = [tokenizer(t)["input_ids"] for t in ["Two plus three is", "The kitchen opens at nine in the"]]
    continuations = [tokenizer(t)["input_ids"] for t in [" five.", " morning"]]
    prompts = [c + k for c, k in zip(contexts, continuations)]
    status, answer = post(server + "/v1/completions", {"model": str(varied_model), "prompt": prompts,
                                                       "temperature": 0, "max_tokens": 1, "logprobs": 1,
                                                       "seed": 1234, "echo": True})
    assert status == 200
    model = AutoModelForCausalLM.from_pretrained(varied_model).eval()
    for choice, prompt, context in zip(sorted(answer["choices"], key=lambda c: c["index"]), prompts, contexts):
        logprobs = choice["logprobs"]
        assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == len(prompt) + 1
        assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
        assert len(logprobs["text_offset"]) == len(prompt) + 1
        with torch.no_grad():
            reference = torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), dim=-1)
        expected = reference[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
        torch.testing.assert_close(torch.tensor(logprobs["token_logprobs"][1:len(prompt)]), expected,
                                   atol=1e-4, rtol=0)
        # lm-eval's reading: the continuation is [ctxlen:-1]; greedy when each token is its position's best
        ctxlen = len(context)
        summed = sum(logprobs["token_logprobs"][ctxlen:-1])
        assert abs(summed - expected[ctxlen - 1:].sum().item()) < 1e-3
        greedy = all(t == max(top.values()) for t, top in
                     zip(logprobs["token_logprobs"][ctxlen:-1], logprobs["top_logprobs"][ctxlen:-1]))
        best = reference[torch.arange(ctxlen - 1, len(prompt) - 1)].argmax(-1).tolist()
        assert greedy == (best == prompt[ctxlen:])


def test_concurrent_requests_are_decoded_in_one_batch_with_the_same_answers(client, server, varied_model):  # noqa: F811
    prompts = ["The kitchen", "Two plus three is", "Reverse the word", "Our soup", "Sort the numbers", "abc"]

    def ask(prompt):
        return client.completions.create(model=str(varied_model), prompt=prompt, max_tokens=6,
                                         temperature=0).choices[0].text

    alone = [ask(p) for p in prompts]
    before = get(server + "/health")[1]["largest_batch"]
    together: dict[int, str] = {}
    start = threading.Barrier(len(prompts))

    def ask_together(i, prompt):
        start.wait()
        together[i] = ask(prompt)

    threads = [threading.Thread(target=ask_together, args=(i, p)) for i, p in enumerate(prompts)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [together[i] for i in range(len(prompts))] == alone
    largest = get(server + "/health")[1]["largest_batch"]
    assert largest > max(before, 1), f"largest batch {largest}, before this test {before}"


def test_api_key_is_required_on_v1_routes(server, varied_model):  # noqa: F811
    body = {"model": str(varied_model), "prompt": "hi", "max_tokens": 1}
    for key in (None, "wrong-key"):
        status, answer = post(server + "/v1/completions", body, key=key)
        assert status == 401 and set(answer["error"]) == {"message", "type", "param", "code"}
        assert get(server + "/v1/models", key=key)[0] == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server + "/v1", api_key="nope", max_retries=0).models.list()
    assert get(server + "/health", key=None)[0] == 200


BAD_CHAT = [
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({"messages": "hi"}, "messages"),
    ({"messages": MESSAGES, "max_tokens": 0}, "max_tokens"),
    ({"messages": MESSAGES, "max_tokens": "5"}, "max_tokens"),
    ({"messages": MESSAGES, "n": 1000}, "n"),
    ({"messages": MESSAGES, "temperature": -1}, "temperature"),
    ({"messages": MESSAGES, "top_p": 0}, "top_p"),
    ({"messages": MESSAGES, "stop": [""]}, "stop"),
    ({"messages": MESSAGES, "max_tokens": 5000}, "max_tokens"),
    ({"messages": [{"role": "assistant", "content": "x", "tool_calls": 5}]}, "messages"),  # the template fails
]


@pytest.mark.parametrize("fields, param", BAD_CHAT)
def test_bad_chat_requests_are_400_in_openai_error_shape(server, varied_model, fields, param):  # noqa: F811
    status, answer = post(server + "/v1/chat/completions", {"model": str(varied_model), **fields})
    assert status == 400, answer
    assert set(answer["error"]) == {"message", "type", "param", "code"} and answer["error"]["param"] == param


def test_bad_completion_requests_and_unknown_models(server, client, varied_model):  # noqa: F811
    model = str(varied_model)
    for body in [{"model": model, "prompt": "x " * 3000}, {"model": model, "prompt": []},
                 {"model": model, "prompt": [[]]}, {"model": model, "prompt": [5, 100000]},
                 {"model": model, "prompt": [-1]}, {"model": model, "prompt": 5}, {"model": model},
                 {"model": model, "prompt": "x", "logprobs": 99}, {"prompt": "x"}]:
        status, answer = post(server + "/v1/completions", body)
        assert status == 400 and answer["error"]["message"], (body, answer)
    for raw in [b"{not json", b"", b"[1, 2]", b"\xff\xfe"]:
        status, answer = post(server + "/v1/completions", None, raw=raw)
        assert status == 400 and answer["error"]["type"] == "invalid_request_error", (raw, answer)
    status, answer = post(server + "/v1/completions", {"model": "nope", "prompt": "x"})
    assert status == 404 and answer["error"]["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=MESSAGES)
    with pytest.raises(openai.BadRequestError, match="context length"):
        client.completions.create(model=model, prompt="x " * 3000)
    assert get(server + "/no/such/route")[0] == 404


def test_a_client_that_disconnects_cancels_its_generation(server, varied_model):  # noqa: F811
    cancelled = get(server + "/health")[1]["cancelled"]
    connection = http.client.HTTPConnection("127.0.0.1", int(server.rsplit(":", 1)[1]), timeout=30)
    body = {"model": str(varied_model), "prompt": "The kitchen", "max_tokens": 2000, "stream": True,
            "temperature": 1.0, "seed": 3}
    connection.request("POST", "/v1/completions", json.dumps(body),
                       {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200
    response.read(400)  # a few chunks arrived: it is generating
    connection.sock.shutdown(socket.SHUT_RDWR)
    connection.close()
    deadline = time.time() + 15
    while time.time() < deadline:
        health = get(server + "/health")[1]
        if health["cancelled"] > cancelled and health["running_rows"] == 0:
            break
        time.sleep(0.1)
    assert health["cancelled"] == cancelled + 1 and health["running_rows"] == 0


# ---------------------------------------------------------------------- continuous batching

def test_a_short_request_joins_while_a_long_one_decodes(client, server, varied_model):  # noqa: F811
    """Real concurrent clients: a 1-token request sent after a 300-token stream has started is answered while
    that stream is still going (it joins the running batch at the next step, it does not wait for it)."""
    long = client.completions.create(model=str(varied_model), prompt="The kitchen", max_tokens=300, temperature=1.0,
                                     seed=5, stream=True, extra_body={"ignore_eos": True})
    chunks = iter(long)
    received = [next(chunks) for _ in range(3)]  # it is decoding
    short = client.completions.create(model=str(varied_model), prompt="Two plus", max_tokens=1, temperature=0)
    assert short.usage.completion_tokens == 1 and short.choices[0].finish_reason == "length"
    so_far = len(received)
    received += list(chunks)
    assert received[-1].choices[0].finish_reason == "length"
    assert so_far < 50 < len(received), (so_far, len(received))  # answered near the long one's start, not its end


def test_one_request_over_the_row_cap_is_decoded_in_parts(client, server, varied_model):  # noqa: F811
    """--max-rows 16: 3 prompts x n=8 = 24 rows join as places free up; greedy answers equal each alone."""
    prompts = ["The kitchen", "Two plus three is", "Reverse the word"]
    answer = client.completions.create(model=str(varied_model), prompt=prompts, max_tokens=5, temperature=0, n=8)
    texts = [c.text for c in sorted(answer.choices, key=lambda c: c.index)]
    for index, prompt in enumerate(prompts):
        alone = client.completions.create(model=str(varied_model), prompt=prompt, max_tokens=5, temperature=0)
        assert texts[index * 8:(index + 1) * 8] == [alone.choices[0].text] * 8
    assert 0 < get(server + "/health")[1]["largest_batch"] <= 16


def test_seeds_of_any_size_and_mixed_settings_share_a_batch_with_the_same_answers(client, varied_model):  # noqa: F811
    """Seeds beyond 64 bits (and negative) no longer fail a request (nor the others decoded with it); each seeded
    request answers the same alone and among concurrent requests with other settings."""
    requests = [dict(seed=2**80, temperature=1.0), dict(seed=-5, temperature=0.7, extra_body={"top_k": 5}),
                dict(seed=12, temperature=1.2, top_p=0.8, frequency_penalty=0.5), dict(temperature=0)]

    def ask(settings):
        return client.completions.create(model=str(varied_model), prompt="Our soup", max_tokens=8,
                                         **settings).choices[0].text

    alone = [ask(r) for r in requests]
    together: dict[int, str] = {}
    barrier = threading.Barrier(len(requests) * 2)

    def ask_together(i, settings):
        barrier.wait()
        together[i] = ask(settings)

    threads = [threading.Thread(target=ask_together, args=(i, r)) for i, r in enumerate(requests * 2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [together[i] for i in range(len(requests) * 2)] == alone * 2


# ---------------------------------------------------------------------- request fields and limits

def test_tiny_temperature_or_top_p_is_greedy_not_a_500(client, varied_model):  # noqa: F811
    greedy = client.completions.create(model=str(varied_model), prompt="Reverse", max_tokens=6, temperature=0)
    for settings in (dict(temperature=1e-39), dict(temperature=1.0, top_p=1e-46), dict(temperature=1e-300, top_p=1e-300)):
        answer = client.completions.create(model=str(varied_model), prompt="Reverse", max_tokens=6, seed=1, **settings)
        assert answer.choices[0].text == greedy.choices[0].text, settings


def test_developer_role_and_integral_floats_are_accepted(server, varied_model):  # noqa: F811
    model = str(varied_model)
    system = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Soup?"}]
    developer = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Soup?"}]
    status, as_system = post(server + "/v1/chat/completions", {"model": model, "messages": system, "max_tokens": 5,
                                                               "temperature": 0})
    status2, as_developer = post(server + "/v1/chat/completions", {"model": model, "messages": developer,
                                                                   "max_tokens": 5.0, "n": 2.0, "temperature": 0,
                                                                   "seed": 3.0})
    assert status == status2 == 200 and len(as_developer["choices"]) == 2
    assert as_developer["choices"][0]["message"]["content"] == as_system["choices"][0]["message"]["content"]
    for bad in ({"n": 1.5}, {"max_tokens": True}, {"max_tokens": "5"}):
        status, answer = post(server + "/v1/chat/completions", {"model": model, "messages": system, **bad})
        assert status == 400 and answer["error"]["param"] == next(iter(bad)), (bad, answer)


def test_penalties_logit_bias_min_tokens_and_ignore_eos_equal_the_engine(client, engines, varied_model):  # noqa: F811
    base = engines["base"]
    eot = base.tokenizer.convert_tokens_to_ids("<|im_end|>")
    cases = [  # (request fields, the engine's SamplingParams fields, what must hold)
        (dict(logit_bias={str(eot): 100}), dict(logit_bias={eot: 100.0}), lambda c: c.token_ids == [eot]),
        (dict(logit_bias={str(eot): 100}, extra_body={"min_tokens": 3}), dict(logit_bias={eot: 100.0}, min_tokens=3),
         lambda c: len(c.token_ids) == 4 and c.token_ids[3] == eot and eot not in c.token_ids[:3]),
        (dict(logit_bias={str(eot): 100}, extra_body={"ignore_eos": True}), dict(logit_bias={eot: 100.0}, ignore_eos=True),
         lambda c: c.token_ids == [eot] * 8 and c.finish_reason == "length"),
        (dict(frequency_penalty=2.0), dict(frequency_penalty=2.0), lambda c: True),
        (dict(presence_penalty=-2.0), dict(presence_penalty=-2.0), lambda c: True),
    ]
    plain = base.chat([MESSAGES], SamplingParams(max_new_tokens=8, temperature=0))[0]
    changed = 0
    for fields, params, holds in cases:
        expected = base.chat([MESSAGES], SamplingParams(max_new_tokens=8, temperature=0, **params))[0]
        assert holds(expected), (fields, expected)
        answer = client.chat.completions.create(model=str(varied_model), messages=MESSAGES, max_tokens=8,
                                                temperature=0, logprobs=True, **fields)
        choice = answer.choices[0]
        assert choice.message.content == expected.text and choice.finish_reason == expected.finish_reason
        assert answer.usage.completion_tokens == len(expected.token_ids)
        changed += expected.token_ids != plain.token_ids
    assert changed >= 4  # the settings change the answer, they are not ignored


UNSUPPORTED = [({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {}}}}, "response_format"),
               ({"response_format": {"type": "json_object"}}, "response_format"), ({"best_of": 2}, "best_of"),
               ({"suffix": "end"}, "suffix"), ({"tool_choice": "required"}, "tool_choice"),
               ({"repetition_penalty": 1.2}, "repetition_penalty"), ({"logit_bias": {"999999": 5}}, "logit_bias"),
               ({"logit_bias": {"x": 5}}, "logit_bias"), ({"presence_penalty": 3}, "presence_penalty"),
               ({"min_tokens": 50, "max_tokens": 4}, "min_tokens")]


@pytest.mark.parametrize("fields, name", UNSUPPORTED)
def test_what_is_not_implemented_is_a_400_not_ignored(server, varied_model, fields, name):  # noqa: F811
    status, answer = post(server + "/v1/chat/completions", {"model": str(varied_model), "messages": MESSAGES, **fields})
    assert status == 400 and name in (answer["error"]["param"] or "") + answer["error"]["message"], answer
    status, _ = post(server + "/v1/chat/completions", {"model": str(varied_model), "messages": MESSAGES, "max_tokens": 2,
                                                      "response_format": {"type": "text"}})
    assert status == 200


def test_bodies_over_the_size_cap_are_413_and_tokenizer_routes_need_the_key(server, varied_model):  # noqa: F811
    big = {"model": str(varied_model), "prompt": "soup " * (MAX_BYTES // 5)}
    for route in ("/v1/completions", "/tokenize"):
        status, answer = post(server + route, big)
        assert status == 413 and answer["error"]["code"] == "request_too_large", (route, answer)
    # a chunked body declares no length: it is cut off while it is read
    connection = http.client.HTTPConnection("127.0.0.1", int(server.rsplit(":", 1)[1]), timeout=30)
    body = json.dumps(big).encode()
    connection.request("POST", "/tokenize", (body[i:i + 8192] for i in range(0, len(body), 8192)),
                       {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}, encode_chunked=True)
    response = connection.getresponse()
    assert response.status == 413 and json.loads(response.read())["error"]["code"] == "request_too_large"
    connection.close()
    small = {"prompt": "soup " * 2000}  # under the cap: tokenized (in a worker thread)
    status, answer = post(server + "/tokenize", small)
    assert status == 200 and answer["count"] >= 2000
    for route, body in (("/tokenize", small), ("/detokenize", {"tokens": [1, 2]})):
        for key in (None, "wrong"):
            assert post(server + route, body, key=key)[0] == 401
    assert get(server + "/tokenizer_info", key=None)[0] == 401


def test_an_empty_bearer_key_is_refused(server, varied_model, tmp_path):  # noqa: F811
    for header in ("Bearer ", "Bearer", "Bearer    ", ""):
        request = urllib.request.Request(server + "/v1/models", headers={"Authorization": header} if header else {})
        with pytest.raises(urllib.error.HTTPError) as error:
            urllib.request.urlopen(request, timeout=30)
        assert error.value.code == 401
    from conftest import run_cli

    result = run_cli("serve", "--model", varied_model, "--api-key", "", check=False, timeout=120)
    assert result.returncode != 0 and "--api-key is empty" in result.stderr and "Traceback" not in result.stderr


def test_vllm_backend_without_vllm_is_one_clear_line(varied_model):  # noqa: F811
    from conftest import run_cli

    result = run_cli("serve", "--model", varied_model, "--backend", "vllm", check=False, timeout=120)
    assert result.returncode != 0 and "Traceback" not in result.stderr
    assert "needs vLLM" in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


# ---------------------------------------------------------------------- openapi, CORS, metrics

def test_openapi_declares_the_request_bodies(server):
    status, schema = get(server + "/openapi.json")
    assert status == 200
    components = schema["components"]["schemas"]
    for path, name in (("/v1/chat/completions", "ChatRequest"), ("/v1/completions", "CompletionRequest"),
                       ("/tokenize", "TokenizeRequest"), ("/detokenize", "DetokenizeRequest")):
        body = schema["paths"][path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": f"#/components/schemas/{name}"}
    assert {"model", "messages", "temperature", "logit_bias"} <= set(components["ChatRequest"]["properties"])
    assert "Message" in components and "prompt" in components["CompletionRequest"]["required"]


def test_cors_allows_the_configured_origin_only(server):
    def preflight(origin):
        request = urllib.request.Request(server + "/v1/chat/completions", method="OPTIONS", headers={
            "Origin": origin, "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization,content-type"})
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, response.headers
        except urllib.error.HTTPError as error:
            return error.code, error.headers

    status, headers = preflight("https://app.example")
    assert status == 200 and headers["access-control-allow-origin"] == "https://app.example"
    status, headers = preflight("https://elsewhere.example")
    assert headers.get("access-control-allow-origin") is None


def test_metrics_are_prometheus_text_with_requests_tokens_batch_and_queue(client, server, varied_model):  # noqa: F811
    def read():
        with urllib.request.urlopen(server + "/metrics", timeout=30) as response:
            assert response.headers["content-type"].startswith("text/plain")
            text = response.read().decode()
        values = {}
        for line in text.splitlines():
            if line.startswith("#"):
                assert line.split()[1] in ("HELP", "TYPE")
                continue
            name, value = line.split()
            values[name] = float(value)
        return values

    before = read()
    answer = client.completions.create(model=str(varied_model), prompt="The kitchen", max_tokens=5, temperature=0, n=2)
    after = read()
    assert after["posttrain_requests_total"] == before["posttrain_requests_total"] + 1
    assert after["posttrain_generation_tokens_total"] - before["posttrain_generation_tokens_total"] == \
        answer.usage.completion_tokens
    assert after["posttrain_prompt_tokens_total"] - before["posttrain_prompt_tokens_total"] == answer.usage.prompt_tokens
    assert after["posttrain_largest_batch_rows"] >= 2 and after["posttrain_running_rows"] == 0
    assert after["posttrain_waiting_rows"] == 0


def test_readme_lm_eval_command_puts_batch_size_on_the_command_line():
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    command = re.search(r"lm_eval --model local-completions.*?(?=\n```)", readme, re.DOTALL).group(0)
    model_args = re.search(r"--model_args (\S+)", command).group(1)
    assert "batch_size" not in model_args and re.search(r"--batch_size \d+", command), command
