"""init_model on the project's generated tokenizer corpus: the output loads with plain transformers."""
from __future__ import annotations

import re
from collections import Counter

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from posttrain.demo.data import write_demo_data
from posttrain.init_model import ARCHS, TURN_END, init_model, read_corpus

VOCAB = 600
SAMPLES = ["What is 7 + 5?", "12", "The tomato soup costs $6.50.", "On Sunday we are open from 10:00 to 16:00.",
           "Ana's locker is 14. Ben's locker is 7. What is Ben's locker?", "Sort: 3 1 2 -> 1 2 3 (done!)",
           "  two  spaces, a tab\tand a\nnewline; [x] {y} <z> \"q\" 100% * / = _"]
MESSAGES = [{"role": "system", "content": "You are a helper."}, {"role": "user", "content": "Hi!"},
            {"role": "assistant", "content": "Hello."}]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    paths = write_demo_data(tmp_path_factory.mktemp("demo"), seed=0,
                            sizes=dict(pretrain=100, sft=200, tasks=100, classify=60))
    return read_corpus([paths["tokenizer_corpus"]])


@pytest.fixture(scope="module")
def models(corpus, tmp_path_factory):
    return {arch: init_model(arch, "tiny", corpus, tmp_path_factory.mktemp(arch), vocab_size=VOCAB, seed=0)
            for arch in ARCHS}


@pytest.mark.parametrize("arch", ARCHS)
def test_loads_with_plain_transformers(models, arch):
    model = AutoModelForCausalLM.from_pretrained(models[arch])
    tok = AutoTokenizer.from_pretrained(models[arch])
    assert model.config.model_type == arch
    assert model.config.vocab_size == len(tok) == model.get_input_embeddings().num_embeddings
    assert len(tok) <= VOCAB
    assert tok.pad_token_id != tok.eos_token_id
    assert model.config.pad_token_id == tok.pad_token_id and model.config.eos_token_id == tok.eos_token_id
    end = tok.convert_tokens_to_ids(TURN_END)
    assert end != tok.unk_token_id and end in model.generation_config.eos_token_id

    ids = tok.apply_chat_template(MESSAGES, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        logits = model(input_ids=ids["input_ids"]).logits
    assert logits.shape == (1, ids["input_ids"].shape[1], len(tok))
    assert torch.isfinite(logits).all()


def test_tokenizer_round_trips(corpus, models):
    tok = AutoTokenizer.from_pretrained(models["qwen2"])
    for text in SAMPLES:
        assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
        assert tok.decode(tok.encode(text)) == text  # no BOS/EOS added silently
    assert len(tok.encode(TURN_END, add_special_tokens=False)) == 1
    # the generated corpus makes frequent words single tokens: its ten most frequent words of 5+ letters
    common = [w for w, _ in Counter(re.findall(r" ([A-Za-z]{5,})", "\n".join(corpus))).most_common(10)]
    assert [len(tok.encode(" " + w, add_special_tokens=False)) for w in common] == [1] * 10, common


def test_chat_template(models):
    tok = AutoTokenizer.from_pretrained(models["llama"])
    text = tok.apply_chat_template(MESSAGES, tokenize=False)
    assert text == ("<|im_start|>system\nYou are a helper.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n"
                    "<|im_start|>assistant\nHello.<|im_end|>\n")
    prompt = tok.apply_chat_template(MESSAGES[:2], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n")
    ids = tok.apply_chat_template(MESSAGES, tokenize=True, return_dict=True)["input_ids"]
    assert tok.decode(ids) == text


def test_same_seed_same_weights(corpus, models, tmp_path):
    again = init_model("qwen2", "tiny", corpus, tmp_path / "again", vocab_size=VOCAB, seed=0)
    other = init_model("qwen2", "tiny", corpus, tmp_path / "other", vocab_size=VOCAB, seed=1)
    first = load_file(models["qwen2"] / "model.safetensors")
    second, third = load_file(again / "model.safetensors"), load_file(other / "model.safetensors")
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert any(not torch.equal(first[k], third[k]) for k in first)
    assert (again / "tokenizer.json").read_bytes() == (models["qwen2"] / "tokenizer.json").read_bytes()


def test_bad_arch_or_size(corpus, tmp_path):
    with pytest.raises(ValueError):
        init_model("bert", "tiny", corpus[:50], tmp_path / "a", vocab_size=300)
    with pytest.raises(ValueError):
        init_model("qwen2", "huge", corpus[:50], tmp_path / "b", vocab_size=300)
