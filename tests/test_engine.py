"""The generation engine against transformers itself: greedy parity with model.generate (also while rows join and
leave the batch), recorded log-probs against a plain forward, the sampler's distribution against the exact one,
per-row settings and seeds in one batch, stop tokens and strings, penalties / logit bias / min_tokens /
ignore_eos, LoRA adapters, dtype, and `posttrain generate` via the CLI."""
from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import run_cli, write_jsonl
from posttrain.engine import Engine, Row, SamplingParams
from posttrain.sampler import RowSampler, row_key
from posttrain.modeling import load_tokenizer

PROMPTS = ["The kitchen opens", "Two plus three is five. Seven minus", "Reverse"]


@pytest.fixture(scope="module")
def varied_model(tiny_model, tmp_path_factory):
    """tiny_model with larger random weights: a freshly initialised model repeats one token, which would
    make parity checks trivial; these weights give varied, peaked next-token distributions."""
    out = tmp_path_factory.mktemp("varied-model")
    model = AutoModelForCausalLM.from_pretrained(tiny_model)
    torch.manual_seed(1)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.35)
    model.save_pretrained(out)
    load_tokenizer(str(tiny_model)).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def engine(varied_model):
    return Engine.load(varied_model)


def encode(engine, texts=PROMPTS):
    return [engine.tokenizer(text)["input_ids"] for text in texts]


def test_greedy_equals_transformers_generate_with_left_padding(engine):
    prompts = encode(engine)
    assert len({len(p) for p in prompts}) == len(prompts)  # different lengths: real left padding
    ours = engine.generate(prompts, SamplingParams(max_new_tokens=12, temperature=0))
    engine.tokenizer.padding_side = "left"
    batch = engine.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    theirs = engine.model.generate(**batch, do_sample=False, max_new_tokens=12, eos_token_id=engine.stop_token_ids,
                                   pad_token_id=engine.pad_token_id)[:, batch["input_ids"].shape[1]:].tolist()
    assert len({tuple(c.token_ids) for c in ours}) > 1 and len(set(ours[0].token_ids)) > 2  # not degenerate
    for completion, reference in zip(ours, theirs):
        assert completion.token_ids == reference[:len(completion.token_ids)]
        assert completion.finish_reason == ("stop" if len(completion.token_ids) < 12 else "length")
        assert completion.text == engine.tokenizer.decode(
            [t for t in completion.token_ids if t not in engine.stop_token_ids], skip_special_tokens=True)


@pytest.mark.parametrize("temperature, top_k, top_p", [(0.7, 20, 0.9), (1.3, 0, 1.0), (0.0, 0, 1.0)])
def test_logprobs_equal_a_plain_forward_at_the_sampling_temperature(engine, temperature, top_k, top_p):
    prompts = encode(engine)
    params = SamplingParams(max_new_tokens=10, temperature=temperature, top_k=top_k, top_p=top_p, seed=3, n=2)
    completions = engine.generate(prompts, params)
    assert [c.prompt_index for c in completions] == [0, 0, 1, 1, 2, 2]
    scale = temperature or 1.0
    for completion in completions:
        prompt = prompts[completion.prompt_index]
        with torch.no_grad():
            logits = engine.model(torch.tensor([prompt + completion.token_ids])).logits[0].float()
        logprobs = torch.log_softmax(logits / scale, dim=-1)
        positions = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(completion.token_ids))
        expected = logprobs[positions, torch.tensor(completion.token_ids)]
        torch.testing.assert_close(torch.tensor(completion.logprobs), expected, atol=1e-4, rtol=0)
        assert completion.prompt_tokens == len(prompt)


def test_same_seed_same_samples_different_seed_different(engine):
    prompts = encode(engine)

    def sample(seed):
        params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=seed, n=2)
        return [c.token_ids for c in engine.generate(prompts, params)]

    first = sample(0)
    assert first == sample(0)
    assert first != sample(1)
    assert first[0] != first[1] or first[2] != first[3]  # the n samples of a prompt are not copies


def test_top_k_one_and_tiny_temperature_or_top_p_are_greedy(engine):
    prompts = encode(engine)
    greedy = [c.token_ids for c in engine.generate(prompts, SamplingParams(max_new_tokens=8, temperature=0))]
    for params in (SamplingParams(max_new_tokens=8, temperature=1.0, top_k=1, seed=5),
                   SamplingParams(max_new_tokens=8, temperature=1e-38, seed=5),  # was a 500 in the server
                   SamplingParams(max_new_tokens=8, temperature=1.0, top_p=1e-46, seed=5)):
        completions = engine.generate(prompts, params)
        assert [c.token_ids for c in completions] == greedy, params
        assert all(all(lp <= 0 and lp == lp for lp in c.logprobs) for c in completions)  # no NaN


def exact_distribution(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """The distribution top-k then top-p sampling at `temperature` must draw from, written the plain way."""
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    order = probs.argsort(descending=True)
    keep = torch.zeros_like(probs, dtype=torch.bool)
    kept_k = order[:top_k] if top_k else order
    within = probs[kept_k] / probs[kept_k].sum()
    before = within.cumsum(0) - within
    keep[kept_k[(before < top_p) | (torch.arange(len(kept_k)) == 0)]] = True
    return torch.where(keep, probs, 0.0) / probs[keep].sum()


@pytest.mark.parametrize("temperature, top_k, top_p", [(1.0, 0, 1.0), (0.7, 0, 0.8), (1.3, 3, 1.0), (1.0, 4, 0.6)])
def test_sampler_draws_the_exact_filtered_distribution(temperature, top_k, top_p):
    """20,000 rows, each with its own random stream, one draw each: the frequencies match the exact
    probabilities within 5 standard errors, and tokens outside the kept set never appear."""
    logits = torch.tensor([2.0, 1.5, 1.0, 0.2, -0.5, -1.0, 0.7, -3.0])
    rows = [Row([1], SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p), row_key(7, i))
            for i in range(20_000)]
    sampler = RowSampler.build(rows, len(logits), stop_ids=[], device="cpu")
    tokens, logprobs, _, _ = sampler.sample(logits.repeat(len(rows), 1))
    expected = exact_distribution(logits, temperature, top_k, top_p)
    observed = torch.bincount(tokens, minlength=len(logits)).double() / len(rows)
    error = (expected * (1 - expected) / len(rows)).sqrt()
    assert ((observed - expected).abs() <= 5 * error + 1e-12).all(), (observed, expected)
    assert (observed[expected == 0] == 0).all()
    # the recorded log-prob is the unfiltered distribution at the temperature
    torch.testing.assert_close(logprobs, torch.log_softmax(logits / temperature, -1)[tokens], atol=1e-5, rtol=0)


def test_penalties_logit_bias_min_tokens_and_ignore_eos(engine):
    prompts = encode(engine)
    favourite = engine.tokenizer.convert_tokens_to_ids("a")
    biased = engine.generate(prompts, SamplingParams(max_new_tokens=6, temperature=1.0, seed=0,
                                                     logit_bias={favourite: 100.0}))
    assert all(c.token_ids == [favourite] * 6 for c in biased)
    plain = engine.generate(prompts, SamplingParams(max_new_tokens=16, temperature=0))
    assert any(len(set(c.token_ids)) < len(c.token_ids) for c in plain)  # greedy repeats itself here
    penalised = engine.generate(prompts, SamplingParams(max_new_tokens=16, temperature=0, frequency_penalty=50.0))
    presence = engine.generate(prompts, SamplingParams(max_new_tokens=16, temperature=0, presence_penalty=50.0))
    for completions in (penalised, presence):
        for c in completions:
            body = c.token_ids[:-1] if c.finish_reason == "stop" else c.token_ids
            assert len(set(body)) == len(body), c.token_ids  # a used token is never chosen again

    end_of_turn = engine.tokenizer.convert_tokens_to_ids("<|im_end|>")

    def force_end_of_turn(module, inputs, output):  # the end-of-turn token wins wherever it is allowed
        output[..., end_of_turn] += 1e4
        return output

    handle = engine.model.lm_head.register_forward_hook(force_end_of_turn)
    try:
        stopped = engine.generate(prompts, SamplingParams(max_new_tokens=8, temperature=1.0, seed=1))
        late = engine.generate(prompts, SamplingParams(max_new_tokens=8, temperature=1.0, seed=1, min_tokens=5))
        ignored = engine.generate(prompts, SamplingParams(max_new_tokens=8, temperature=1.0, seed=1, ignore_eos=True))
    finally:
        handle.remove()
    assert all(c.token_ids == [end_of_turn] and c.finish_reason == "stop" for c in stopped)
    for c in late:  # the stop token is masked until 5 tokens exist, then wins
        assert len(c.token_ids) == 6 and end_of_turn not in c.token_ids[:5] and c.token_ids[5] == end_of_turn
    assert all(c.token_ids == [end_of_turn] * 8 and c.finish_reason == "length" for c in ignored)


def test_stop_strings_cut_the_text_and_never_leak(engine):
    prompt = encode(engine)[:1]
    full = engine.generate(prompt, SamplingParams(max_new_tokens=24, temperature=0))[0]
    # the stop string: two characters from the second half that start at a token boundary where the text
    # is whole UTF-8 (this random model also emits stray bytes of multi-byte characters, and a text cut
    # between such bytes decodes differently from the whole text), appearing there first
    for k in range(len(full.token_ids) // 2, len(full.token_ids)):
        head = engine.tokenizer.decode(full.token_ids[:k])
        stop = full.text[len(head):len(head) + 2]
        if (full.text.startswith(head) and "\ufffd" not in head[-1:] + stop and len(stop) == 2 and stop.strip()
                and full.text.find(stop) == len(head)):
            break
    else:
        pytest.fail(f"no clean two-character stop string in {full.text!r}")
    assert len(stop) == 2 and stop.strip()
    params = SamplingParams(max_new_tokens=24, temperature=0, stop=["never-there", stop])
    cut = engine.generate(prompt, params)[0]
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[:full.text.find(stop)] and stop not in cut.text
    assert cut.token_ids == full.token_ids[:len(cut.token_ids)] and len(cut.logprobs) == len(cut.token_ids)
    assert stop in engine.tokenizer.decode(cut.token_ids) and stop not in engine.tokenizer.decode(cut.token_ids[:-1])

    deltas = list(engine.stream(prompt[0], params))
    streamed = "".join(d.text for d in deltas)
    assert streamed == cut.text and deltas[-1].completion.finish_reason == "stop"
    sent = ""
    for delta in deltas:
        sent += delta.text
        assert stop not in sent and cut.text.startswith(sent)


def test_max_new_tokens_gives_length(engine):
    no_stop_tokens = Engine(engine.model, engine.tokenizer, stop_token_ids=[])
    completions = no_stop_tokens.generate(encode(engine), SamplingParams(max_new_tokens=3, temperature=0.8, seed=0))
    for completion in completions:
        assert completion.finish_reason == "length" and len(completion.token_ids) == 3


def test_end_of_turn_token_stops_and_is_kept_out_of_the_text(engine):
    tokenizer = engine.tokenizer
    end_of_turn = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert end_of_turn in engine.stop_token_ids and tokenizer.eos_token_id in engine.stop_token_ids

    fed = {}

    def remember_input(module, args, kwargs):
        fed["width"] = kwargs["input_ids"].shape[1]

    def force_end_of_turn(module, inputs, output):  # on decode steps (one new token fed) only
        if fed["width"] == 1:
            output[..., end_of_turn] += 1e4
        return output

    handles = [engine.model.register_forward_pre_hook(remember_input, with_kwargs=True),
               engine.model.lm_head.register_forward_hook(force_end_of_turn)]
    try:
        completions = engine.chat([[{"role": "user", "content": "hello"}], [{"role": "user", "content": "hi"}]],
                                  SamplingParams(max_new_tokens=10, temperature=0.9, seed=0))
    finally:
        for handle in handles:
            handle.remove()
    for completion in completions:
        assert completion.finish_reason == "stop"
        assert len(completion.token_ids) == 2 and completion.token_ids[-1] == end_of_turn
        assert len(completion.logprobs) == 2 and completion.logprobs[-1] > -1e-3  # forced: probability ~1
        assert completion.text == tokenizer.decode(completion.token_ids[:1], skip_special_tokens=True)
        assert "im_end" not in completion.text


def test_adapter_changes_the_output_and_matches_peft_generate(varied_model, engine, tmp_path):
    from peft import LoraConfig, PeftModel, get_peft_model

    base = AutoModelForCausalLM.from_pretrained(varied_model)
    lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "o_proj"]))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, param in lora.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 1.0)
    lora.save_pretrained(tmp_path / "adapter")

    adapted = Engine.load(varied_model, tmp_path / "adapter")
    assert isinstance(adapted.model, PeftModel)
    prompts = encode(engine)
    params = SamplingParams(max_new_tokens=10, temperature=0)
    ours = [c.token_ids for c in adapted.generate(prompts, params)]
    assert ours != [c.token_ids for c in engine.generate(prompts, params)]

    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(varied_model), tmp_path / "adapter")
    for prompt, tokens in zip(prompts, ours):
        out = reference.generate(input_ids=torch.tensor([prompt]), do_sample=False, max_new_tokens=10,
                                 eos_token_id=adapted.stop_token_ids, pad_token_id=adapted.pad_token_id)
        assert out[0, len(prompt):].tolist()[:len(tokens)] == tokens


def test_generate_cli_writes_rankings_that_data_pairs_reads(varied_model, tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [
        {"prompt": "The kitchen", "id": 1},
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Soup?"}], "id": 2},
        {"messages": [{"role": "user", "content": "Two plus"}], "answer": "five"},
    ])
    out = tmp_path / "samples.jsonl"

    def generate(out, batch_size="2"):
        return run_cli("generate", "--model", varied_model, "--prompts", prompts, "--n", "3", "--out", out,
                       "--max-new-tokens", "6", "--temperature", "1.0", "--top-k", "50", "--seed", "0",
                       "--batch-size", batch_size, "--stop", "never-there", "\n\n")

    result = generate(out)
    assert "9 responses for 3 prompts" in result.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [row["prompt"] for row in rows] == [
        "The kitchen", [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Soup?"}],
        [{"role": "user", "content": "Two plus"}]]
    assert rows[0]["id"] == 1 and rows[1]["id"] == 2 and rows[2]["answer"] == "five" and "messages" not in rows[2]
    for row in rows:
        assert len(row["responses"]) == len(row["finish_reasons"]) == len(row["logprobs"]) == 3
        assert all(isinstance(r, str) for r in row["responses"])
        assert all(reason in ("stop", "length") for reason in row["finish_reasons"])
        assert all(lp < 0 for lp in row["logprobs"])
    assert len(set(rows[0]["responses"])) > 1  # sampled, not copies
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no partial file left

    generate(tmp_path / "same.jsonl")  # same seed: same file
    assert (tmp_path / "same.jsonl").read_text() == out.read_text()
    generate(tmp_path / "alone.jsonl", batch_size="1")  # whatever decodes together: the same samples (the
    again = [json.loads(line) for line in (tmp_path / "alone.jsonl").read_text().splitlines()]  # log-probs
    assert [r["responses"] for r in again] == [r["responses"] for r in rows]  # to float rounding of the batch)
    for first, second in zip(rows, again):
        assert first["logprobs"] == pytest.approx(second["logprobs"], abs=1e-4)

    pairs = run_cli("data", "pairs", out, "--out", tmp_path / "pairs.jsonl")
    assert "3 rankings" in pairs.stdout


def test_generate_cli_bad_prompt_is_one_line_with_file_and_line(varied_model, tmp_path):
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [
        {"prompt": "fine"},
        {"prompt": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
    ])
    out = tmp_path / "samples.jsonl"
    result = run_cli("generate", "--model", varied_model, "--prompts", prompts, "--n", "2", "--out", out,
                     check=False)
    assert result.returncode == 2
    assert f"{prompts}:2" in result.stderr and "must end with a user" in result.stderr
    assert "Traceback" not in result.stderr and not out.exists()


def test_prompt_logprobs_equal_a_plain_forward_of_each_prompt(engine):
    prompts = encode(engine)
    scored = engine.prompt_logprobs(prompts, top_logprobs=3, batch_size=2)  # padded batches of mixed lengths
    for prompt, result in zip(prompts, scored):
        with torch.no_grad():
            logprobs = torch.log_softmax(engine.model(torch.tensor([prompt])).logits[0].float(), dim=-1)
        expected = logprobs[torch.arange(len(prompt) - 1), torch.tensor(prompt[1:])]
        assert result.token_ids == prompt and result.logprobs[0] is None and result.top[0] is None
        torch.testing.assert_close(torch.tensor(result.logprobs[1:]), expected, atol=1e-4, rtol=0)
        for position, top in enumerate(result.top[1:]):
            values, ids = logprobs[position].topk(3)
            assert [i for i, _ in top] == ids.tolist()
            torch.testing.assert_close(torch.tensor([v for _, v in top]), values, atol=1e-4, rtol=0)


def test_top_logprobs_list_the_most_likely_tokens_at_each_step(engine):
    params = SamplingParams(max_new_tokens=6, temperature=0, top_logprobs=4)
    for completion in engine.generate(encode(engine), params):
        assert len(completion.top_logprobs) == len(completion.token_ids)
        for token, logprob, top in zip(completion.token_ids, completion.logprobs, completion.top_logprobs):
            assert len(top) == 4 and top[0][0] == token  # greedy: the sampled token is the most likely
            assert abs(top[0][1] - logprob) < 1e-5 and [v for _, v in top] == sorted([v for _, v in top], reverse=True)
    plain = engine.generate(encode(engine), SamplingParams(max_new_tokens=6, temperature=0))
    assert all(c.top_logprobs == [] for c in plain)


def test_rows_join_and_leave_the_batch_with_the_answers_of_a_static_batch(engine):
    """max_rows=2 over five prompts: rows join as others finish. Greedy tokens equal the all-at-once batch and
    transformers' generate; sampled rows with per-row settings equal each row decoded alone (same seeds)."""
    texts = PROMPTS + ["Our soup of the day", "abc"]
    prompts = encode(engine, texts)
    params = SamplingParams(max_new_tokens=10, temperature=0)
    together = [c.token_ids for c in engine.generate(prompts, params)]
    scheduler = engine.scheduler(max_rows=2)
    rows = engine.rows(prompts, params)
    scheduler.add(rows)
    sizes = []
    while scheduler.busy:
        scheduler.step()
        sizes.append(len(scheduler.running))
    assert [r.token_ids for r in rows] == together and max(sizes) == 2 and scheduler.stats["prefills"] >= 3
    engine.tokenizer.padding_side = "left"
    batch = engine.tokenizer(texts, return_tensors="pt", padding=True)
    theirs = engine.model.generate(**batch, do_sample=False, max_new_tokens=10, eos_token_id=engine.stop_token_ids,
                                   pad_token_id=engine.pad_token_id)[:, batch["input_ids"].shape[1]:].tolist()
    assert all(t[:len(ours)] == ours for ours, t in zip(together, theirs))

    settings = [SamplingParams(max_new_tokens=9, temperature=0.8, top_k=20, seed=11),
                SamplingParams(max_new_tokens=4, temperature=0),
                SamplingParams(max_new_tokens=12, temperature=1.2, top_p=0.9, seed=2**70),  # a seed beyond 64 bits
                SamplingParams(max_new_tokens=7, temperature=1.0, seed=-3, presence_penalty=0.5),
                SamplingParams(max_new_tokens=10, temperature=0.5, seed=11, top_logprobs=2)]
    alone = [engine.generate([p], s)[0].token_ids for p, s in zip(prompts, settings)]
    mixed = engine.scheduler(max_rows=3)
    rows = [engine.rows([p], s)[0] for p, s in zip(prompts, settings)]
    mixed.add(rows[:2])
    mixed.step()
    mixed.step()
    mixed.add(rows[2:])  # joining a running batch
    while mixed.busy:
        mixed.step()
    assert [r.token_ids for r in rows] == alone


def test_same_seed_same_answer_under_any_load_and_rows_can_be_cancelled(engine):
    prompt = encode(engine)[1]
    params = SamplingParams(max_new_tokens=12, temperature=1.0, seed=1234, n=2)
    alone = [c.token_ids for c in engine.generate([prompt], params)]
    noise = engine.rows(encode(engine, ["The kitchen opens at nine", "x y z"]),
                        SamplingParams(max_new_tokens=30, temperature=1.0))
    scheduler = engine.scheduler(max_rows=8)
    scheduler.add(noise)
    for _ in range(3):
        scheduler.step()
    rows = engine.rows([prompt], params)
    scheduler.add(rows)
    steps = 0
    while scheduler.busy:
        scheduler.step()
        steps += 1
        if steps == 2:
            noise[0].finish_reason = "cancelled"  # the caller ends a row: it leaves the batch
    assert [r.token_ids for r in rows] == alone and alone[0] != alone[1]
    assert noise[0].finish_reason == "cancelled" and len(noise[0].token_ids) == 5
    assert noise[0] not in scheduler.running


def test_engine_load_places_the_model_on_a_device_in_a_dtype(varied_model):
    engine = Engine.load(varied_model, device="cpu", dtype=torch.bfloat16)
    assert engine.device == torch.device("cpu") and next(engine.model.parameters()).dtype == torch.bfloat16
    completion = engine.generate(encode(engine)[:1], SamplingParams(max_new_tokens=4, temperature=0.9, seed=0))[0]
    assert 1 <= len(completion.token_ids) <= 4 and all(lp <= 0 for lp in completion.logprobs)
    default = Engine.load(varied_model)  # "auto": this machine has no GPU, so the CPU in fp32
    assert default.device == torch.device("cpu") and next(default.model.parameters()).dtype == torch.float32


@pytest.mark.parametrize("arch", ["mistral", "gemma3"])
def test_sliding_window_models_match_transformers_while_rows_join(tiny_model, arch):
    """The engine keeps every layer whole and lets the model's mask apply the window: greedy tokens equal
    transformers' generate beyond the window (5 tokens), with rows joining a running batch (max_rows=2)."""
    from transformers import Gemma3TextConfig, MistralConfig

    tokenizer = load_tokenizer(str(tiny_model))
    shape = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_attention_heads=4,
                 num_key_value_heads=2, sliding_window=5)
    config = (MistralConfig(num_hidden_layers=2, **shape) if arch == "mistral" else
              Gemma3TextConfig(num_hidden_layers=3, head_dim=8, layer_types=["sliding_attention"] * 2 + ["full_attention"],
                               **shape))
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.5)
    texts = ["The kitchen opens at nine", "Two", "Reverse the word cat to get"]
    prompts = [tokenizer(t)["input_ids"] for t in texts]
    ours = [c.token_ids for c in Engine(model, tokenizer, stop_token_ids=[]).generate(
        prompts, SamplingParams(max_new_tokens=16, temperature=0), max_rows=2)]
    for prompt, tokens in zip(prompts, ours):
        reference = model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=16, min_new_tokens=16,
                                   eos_token_id=None, pad_token_id=tokenizer.pad_token_id)[0, len(prompt):].tolist()
        assert tokens == reference
    assert len({tuple(t) for t in ours}) == 3
