"""GGUF export, verified by an independent reader: transformers' own GGUF loader rebuilds the model and the
tokenizer from the file alone, and must generate the same greedy tokens (f16) or the same perplexity within a
stated tolerance (q8_0, q4_0), and encode a chat the same way."""
from __future__ import annotations

import math
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import CORPUS, run_cli

pytest.importorskip("gguf")

CHATS = [
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 12 + 5?"}],
    [{"role": "user", "content": "Reverse the word cat, then sort 3 1 2."},
     {"role": "assistant", "content": "tac; 1 2 3"}, {"role": "user", "content": "And the soup of the day?"}],
]


def vivid(source, out, std: float = 0.25, seed: int = 0):
    """A copy of a tiny model with weights redrawn large enough that greedy decoding varies from token to
    token (a random init at std 0.02 repeats one token, which would hide a wrong tensor mapping)."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(source)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name or "ln_" in name:
                param.add_(torch.randn_like(param) * 0.1)
            else:
                param.normal_(0.0, std)
    model.save_pretrained(out)
    for item in source.iterdir():
        if not item.name.startswith(("model", "config")):
            shutil.copy2(item, out / item.name)
    return out


@pytest.fixture(scope="module")
def models(make_model, tmp_path_factory):
    """arch -> vivid model directory. GPT-2 uses MLP width 4 x hidden and 1024 positions here: transformers'
    GGUF reader does not read GPT-2's feed_forward_length and context_length back (it assumes GPT-2's
    defaults), so init-model's GPT-2 (3x, 2048) cannot round-trip through that reader (llama.cpp reads both)."""
    from transformers import GPT2Config

    made = {}
    for arch in ("qwen2", "llama"):
        made[arch] = vivid(make_model(arch), tmp_path_factory.mktemp(f"vivid-{arch}"))
    gpt2_dir = tmp_path_factory.mktemp("gpt2-4x")
    source = make_model("gpt2")
    config = GPT2Config.from_pretrained(source)
    config.n_inner, config.n_positions = None, 1024
    AutoModelForCausalLM.from_config(config).save_pretrained(gpt2_dir)
    for item in source.iterdir():
        if not item.name.startswith(("model", "config")):
            shutil.copy2(item, gpt2_dir / item.name)
    made["gpt2"] = vivid(gpt2_dir, tmp_path_factory.mktemp("vivid-gpt2"))
    return made


def export(model_dir, out, quant="f16"):
    """`posttrain export --format gguf` in this process (the CLI itself is run by the tests further down)."""
    from posttrain.export import export as export_model

    return export_model(str(model_dir), str(out), format="gguf", quant=quant)


def read_back(path):
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model, tokenizer


def chat_ids(tokenizer, chat):
    ids = tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def greedy(model, ids, n=24):
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                         eos_token_id=None, pad_token_id=0)
    return out[0, len(ids):].tolist()


def perplexity(model, tokenizer, texts):
    total, count = 0.0, 0
    with torch.no_grad():
        for text in texts:
            ids = torch.tensor([tokenizer(text)["input_ids"]])
            loss = model(ids, labels=ids).loss
            total += loss.item() * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    return math.exp(total / count)


@pytest.mark.parametrize("arch", ["qwen2", "llama", "gpt2"])
def test_f16_file_generates_the_same_tokens_and_tokenizes_chats_the_same(models, tmp_path, arch):
    source_dir = models[arch]
    out = tmp_path / f"{arch}.gguf"
    export(source_dir, out, "f16")
    gguf_model, gguf_tokenizer = read_back(out)
    source = AutoModelForCausalLM.from_pretrained(source_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(source_dir)
    assert gguf_tokenizer.chat_template == tokenizer.chat_template
    text = "Two plus three is five. 128 + 7 = 135! (soup, bread)"
    assert gguf_tokenizer(text)["input_ids"] == tokenizer(text)["input_ids"]
    for chat in CHATS:
        ids = chat_ids(tokenizer, chat)
        assert chat_ids(gguf_tokenizer, chat) == ids
        tokens = greedy(source, ids)
        assert len(set(tokens)) > 3, "the test model must not repeat one token (it would hide mapping errors)"
        assert greedy(gguf_model, ids) == tokens


WORDS = ["cat", "dog", "soup", "bread", "tea", "rice", "fish", "cake", "lamp", "tree", "book", "door"]


def reverse_chats(n: int, offset: int = 0) -> list[list[dict]]:
    return [[{"role": "user", "content": f"Reverse {WORDS[i % len(WORDS)]} {i % 7}"},
             {"role": "assistant", "content": f"{WORDS[i % len(WORDS)][::-1]} {i % 7}"}]
            for i in range(offset, offset + n)]


@pytest.fixture(scope="module")
def sft_model(make_model, tmp_path_factory):
    """A tiny qwen2 trained for 60 SFT steps (reversing words), so perplexity means something."""
    from conftest import write_jsonl
    from posttrain.config import build_config
    from posttrain.train import run_training

    root = tmp_path_factory.mktemp("sft")
    data = write_jsonl(root / "sft.jsonl", [{"messages": chat} for chat in reverse_chats(96)])
    run_training(build_config({"stage": "sft", "model": str(make_model("qwen2")), "output_dir": str(root / "out"),
                               "data": {"train": str(data), "max_length": 64},
                               "train": {"max_steps": 60, "batch_size": 8, "lr": 3e-3, "seed": 1}}))
    return root / "out"


@pytest.mark.parametrize("quant,tolerance", [("q8_0", 0.01), ("q4_0", 0.10)])
def test_quantised_file_keeps_perplexity_within_tolerance(sft_model, tmp_path, quant, tolerance):
    """Perplexity on held-out chats relative to the source model: q8_0 within 1%, q4_0 within 10%; the
    file is smaller than the f16 one by about the bits per weight."""
    from posttrain.export.gguf import write_gguf
    from posttrain.export.hf import load_merged

    source, tokenizer = load_merged(str(sft_model))
    f16 = write_gguf(source, tokenizer, tmp_path / "f16.gguf", "f16")
    out = write_gguf(source, tokenizer, tmp_path / f"{quant}.gguf", quant)
    gguf_model, _ = read_back(out)
    texts = [tokenizer.apply_chat_template(chat, tokenize=False) for chat in reverse_chats(24, offset=500)]
    reference = perplexity(source, tokenizer, texts)
    quantised = perplexity(gguf_model, tokenizer, texts)
    assert reference < 150, f"the trained model should beat a uniform guess (400) by far ({reference:.1f})"
    print(f"{quant}: perplexity {reference:.3f} -> {quantised:.3f}")
    assert abs(quantised / reference - 1) < tolerance, (quant, reference, quantised)
    assert out.stat().st_size < f16.stat().st_size * (0.6 if quant == "q8_0" else 0.45)


def test_ollama_modelfile_has_an_equivalent_chatml_template(models, tmp_path):
    out = tmp_path / "ollama" / "model.gguf"
    result = run_cli("export", "--model", models["qwen2"], "--format", "gguf", "--quant", "q8_0", "--ollama",
                     "--out", out)
    assert "Modelfile" in result.stdout and "note:" not in result.stdout
    text = (out.parent / "Modelfile").read_text()
    assert text.startswith("FROM ./model.gguf\n")
    assert 'TEMPLATE """{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n' in text
    assert 'PARAMETER stop "<|im_end|>"' in text and 'PARAMETER stop "<|endoftext|>"' in text


def test_untranslatable_template_is_said_plainly(models, tmp_path):
    from posttrain.export.ollama import modelfile_text

    tokenizer = AutoTokenizer.from_pretrained(models["qwen2"])
    tokenizer.chat_template = "{% for m in messages %}### {{ m.role }}: {{ m.content }}\n{% endfor %}### assistant:"
    text, note = modelfile_text("m.gguf", tokenizer)
    assert "TEMPLATE" not in text and "not one this exporter translates" in note


def test_lora_adapter_is_merged_into_the_gguf(make_model, tmp_path):
    """--adapter: the file holds W0 + (alpha/r) B A; generation matches the peft model on top of the base."""
    from peft import LoraConfig, PeftModel, get_peft_model

    base_dir = vivid(make_model("qwen2"), tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.2)
    peft_model.save_pretrained(tmp_path / "adapter")
    out = tmp_path / "merged.gguf"
    run_cli("export", "--model", base_dir, "--adapter", tmp_path / "adapter", "--format", "gguf", "--out", out)
    gguf_model, _ = read_back(out)
    reference = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "adapter")
    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    ids = chat_ids(tokenizer, CHATS[0])
    assert greedy(gguf_model, ids) == greedy(reference.eval(), ids)
    assert greedy(gguf_model, ids) != greedy(AutoModelForCausalLM.from_pretrained(base_dir).eval(), ids)


def fails(*args, out):
    result = run_cli(*args, check=False)
    assert result.returncode == 2, result.stdout + result.stderr
    assert result.stderr.count("error:") == 1 and "Traceback" not in result.stderr
    assert not out.exists() and not list(out.parent.glob(f".{out.name}*")), "nothing may be left at --out"
    return result.stderr


def test_bad_input_is_one_line_and_writes_nothing(models, make_model, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import GPTNeoXConfig

    out = tmp_path / "m.gguf"
    assert "--quant q4_k: not supported" in fails("export", "--model", models["qwen2"], "--format", "gguf",
                                                  "--quant", "q4_k", "--out", out, out=out)
    neox = tmp_path / "neox"
    AutoModelForCausalLM.from_config(GPTNeoXConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                   intermediate_size=64, vocab_size=400)).save_pretrained(neox)
    for item in models["qwen2"].iterdir():
        if item.name.startswith("tokenizer") or item.name.endswith(".jinja"):
            shutil.copy2(item, neox / item.name)
    assert "does not support model type 'gpt_neox'" in fails("export", "--model", neox, "--format", "gguf",
                                                             "--out", out, out=out)
    llama_adapter = tmp_path / "llama-adapter"
    llama = AutoModelForCausalLM.from_pretrained(make_model("llama"))
    get_peft_model(llama, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(llama_adapter)
    stderr = fails("export", "--model", models["gpt2"], "--adapter", llama_adapter, "--format", "gguf",
                   "--out", out, out=out)
    assert "does not match --model" in stderr or "does not fit --model" in stderr


@pytest.fixture(scope="module")
def sentencepiece_tokenizer():
    """A SentencePiece-style BPE tokenizer (Llama-2 / Mistral kind: '▁' for spaces, <0xNN> byte fallback,
    BOS added), trained here on the test corpus and wrapped in transformers' LlamaTokenizer."""
    import json

    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import LlamaTokenizer

    from posttrain.init_model import CHAT_TEMPLATE

    specials = ["<unk>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"] + [f"<0x{i:02X}>" for i in range(256)]
    backend = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>", fuse_unk=True))
    backend.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    backend.train_from_iterator(CORPUS * 20, trainers.BpeTrainer(vocab_size=600, special_tokens=specials,
                                                                 show_progress=False))
    model = json.loads(backend.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tokenizer = LlamaTokenizer(vocab=model["vocab"], merges=merges, unk_token="<unk>", bos_token="<s>",
                               eos_token="</s>", add_bos_token=True)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def random_model(config, tokenizer, out):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.25)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def test_sentencepiece_tokenizer_and_untied_head_round_trip(sentencepiece_tokenizer, tmp_path):
    """GGUF tokenizer model `llama` (tokens with scores, byte tokens): the reader's tokenizer encodes text,
    bytes outside the vocabulary and chats like the source; an untied LM head is written as `output`."""
    from transformers import LlamaConfig

    tokenizer = sentencepiece_tokenizer
    source_dir = random_model(LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, intermediate_size=128, vocab_size=len(tokenizer),
                                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                                          tie_word_embeddings=False), tokenizer, tmp_path / "spm")
    out = tmp_path / "spm.gguf"
    export(source_dir, out, "f16")
    gguf_model, gguf_tokenizer = read_back(out)
    source = AutoModelForCausalLM.from_pretrained(source_dir).eval()
    assert not gguf_model.config.tie_word_embeddings
    for text in ["Hello 128 soup", " two  spaces\nnew line é ü \u6f22\u5b57"]:
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id and gguf_tokenizer(text)["input_ids"] == ids
    for chat in CHATS:
        ids = chat_ids(tokenizer, chat)
        assert chat_ids(gguf_tokenizer, chat) == ids
        assert greedy(gguf_model, ids) == greedy(source, ids)


@pytest.mark.parametrize("arch", ["mistral", "qwen3", "gemma2", "gemma3"])
def test_other_architectures_round_trip(sentencepiece_tokenizer, tmp_path, arch):
    """Weights and hyper-parameters of Mistral, Qwen3 (q/k norms), Gemma 2 and 3 (norms stored as 1 + w,
    post-norms, head_dim apart from hidden/heads): the reader's model gives the source's logits and greedy
    tokens. (Qwen3 uses head_dim 128 here: transformers' reader does not read Qwen3's key_length back.)"""
    from transformers import Gemma2Config, Gemma3TextConfig, MistralConfig, Qwen3Config

    tokenizer = sentencepiece_tokenizer
    common = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  intermediate_size=128, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=0)
    config = {"mistral": lambda: MistralConfig(**common, sliding_window=None),
              "qwen3": lambda: Qwen3Config(**{**common, "hidden_size": 256, "num_attention_heads": 2,
                                              "num_key_value_heads": 1}, head_dim=128),
              "gemma2": lambda: Gemma2Config(**common, head_dim=32),
              "gemma3": lambda: Gemma3TextConfig(**common, head_dim=32)}[arch]()
    # (not a directory named just "mistral": transformers' reader then looks for a GGUF architecture "mistral",
    # which GGUF does not have; Mistral is GGUF's llama)
    source_dir = random_model(config, tokenizer, tmp_path / f"{arch}-model")
    out = tmp_path / f"{arch}.gguf"
    export(source_dir, out, "f16")
    gguf_model, _ = read_back(out)
    source = AutoModelForCausalLM.from_pretrained(source_dir).eval()
    from gguf import GGUFReader

    fields = GGUFReader(out).fields
    prefix = fields["general.architecture"].contents()
    rope = source.config.rope_parameters  # Gemma 3: one per layer type, full attention at 1e6
    full_theta = rope.get("full_attention", rope)["rope_theta"]
    assert fields[f"{prefix}.rope.freq_base"].contents() == pytest.approx(full_theta)
    ids = [tokenizer.bos_token_id, 5, 40, 300, 17, 99, 250, 3, 8]
    with torch.no_grad():
        torch.testing.assert_close(gguf_model(torch.tensor([ids])).logits, source(torch.tensor([ids])).logits,
                                   atol=2e-2, rtol=1e-2)
    assert greedy(gguf_model, ids) == greedy(source, ids)
