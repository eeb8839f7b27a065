"""`posttrain init-model`: a BPE tokenizer trained on a corpus plus a randomly initialised model.

This is the offline starting point for the tests and the embedded default: no download, any of three
architecture shapes (Qwen2, Llama, GPT-2), a ChatML chat template and distinct pad / EOS tokens.
"""
from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (AutoModelForCausalLM, GenerationConfig, GPT2Config, LlamaConfig,
                          PreTrainedTokenizerFast, Qwen2Config)

from .errors import ConfigError

EOS = "<|endoftext|>"
PAD = "<|pad|>"
TURN_START = "<|im_start|>"
TURN_END = "<|im_end|>"
SPECIAL_TOKENS = [EOS, PAD, TURN_START, TURN_END]

# ChatML: every turn is <|im_start|>role\ncontent<|im_end|>\n. Tools are listed in the system turn;
# assistant tool calls are written as JSON inside the assistant turn.
CHAT_TEMPLATE = (
    "{%- if tools %}{{ '<|im_start|>system\\n' }}"
    "{%- if messages[0].role == 'system' %}{{ messages[0].content + '\\n\\n' }}{%- endif %}"
    "{{ 'Tools:\\n' }}{%- for tool in tools %}{{ tool | tojson }}{{ '\\n' }}{%- endfor %}"
    "{{ '<|im_end|>\\n' }}"
    "{%- elif messages[0].role == 'system' %}"
    "{{ '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role != 'system' %}"
    "{{ '<|im_start|>' + message.role + '\\n' }}"
    "{%- if message.content is string %}{{ message.content }}{%- endif %}"
    "{%- if message.tool_calls %}{%- for call in message.tool_calls %}"
    "{{ '<tool_call>' }}{{ (call.function if call.function is defined else call) | tojson }}{{ '</tool_call>' }}"
    "{%- endfor %}{%- endif %}"
    "{{ '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)

SIZES = {
    # name: hidden, layers, heads, kv heads, intermediate
    "tiny": dict(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=192),
    "mini": dict(hidden=128, layers=4, heads=4, kv_heads=2, intermediate=384),
    "small": dict(hidden=256, layers=4, heads=8, kv_heads=4, intermediate=768),
    "base": dict(hidden=512, layers=8, heads=8, kv_heads=4, intermediate=1536),
}
ARCHS = ("qwen2", "llama", "gpt2")


def train_tokenizer(texts: list[str], vocab_size: int = 2048) -> PreTrainedTokenizerFast:
    """Byte-level BPE on `texts`, with the chat template and special tokens the project relies on. Digits
    are single tokens (as in Qwen2's and Llama's tokenizers): "128" is 1, 2, 8, so arithmetic is learnt
    digit by digit instead of one token per number."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                       pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, pad_token=PAD,
                                      additional_special_tokens=[TURN_START, TURN_END],
                                      model_max_length=4096, clean_up_tokenization_spaces=False)
    wrapped.chat_template = CHAT_TEMPLATE
    return wrapped


def model_config(arch: str, size: str, tokenizer: PreTrainedTokenizerFast, max_positions: int = 2048):
    if arch not in ARCHS:
        raise ValueError(f"unknown arch '{arch}' (choose from {', '.join(ARCHS)})")
    if size not in SIZES:
        raise ValueError(f"unknown size '{size}' (choose from {', '.join(SIZES)})")
    s = SIZES[size]
    ids = dict(vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
               bos_token_id=tokenizer.eos_token_id)
    if arch == "gpt2":
        return GPT2Config(n_embd=s["hidden"], n_layer=s["layers"], n_head=s["heads"], n_inner=s["intermediate"],
                          n_positions=max_positions, tie_word_embeddings=True, **ids)
    common = dict(hidden_size=s["hidden"], num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                  num_key_value_heads=s["kv_heads"], intermediate_size=s["intermediate"],
                  max_position_embeddings=max_positions, tie_word_embeddings=True, **ids)
    return Qwen2Config(**common) if arch == "qwen2" else LlamaConfig(**common)


def generation_config(tokenizer: PreTrainedTokenizerFast) -> GenerationConfig:
    stop = [tokenizer.convert_tokens_to_ids(TURN_END), tokenizer.eos_token_id]
    return GenerationConfig(eos_token_id=stop, pad_token_id=tokenizer.pad_token_id, do_sample=True,
                            temperature=0.7, top_p=0.9, max_new_tokens=256)


def init_model(arch: str, size: str, texts: list[str], out: str | Path, vocab_size: int = 2048,
               seed: int = 0) -> Path:
    """Write a randomly initialised model with a freshly trained tokenizer to `out`."""
    out = Path(out)
    tokenizer = train_tokenizer(texts, vocab_size)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(model_config(arch, size, tokenizer))
    model.generation_config = generation_config(tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def read_corpus(paths: list[str | Path]) -> list[str]:
    texts: list[str] = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"tokenizer corpus not found: {path}")
        texts.extend(line for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    if not texts:
        raise ConfigError("the tokenizer corpus is empty")
    return texts
