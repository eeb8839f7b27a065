"""`posttrain init-model`: a BPE tokenizer trained on a corpus plus a randomly initialised model.

This is the offline starting point for the tests and the embedded default: no download, any of three
architecture shapes (Qwen2, Llama, GPT-2), a ChatML chat template and distinct pad / EOS tokens. Two
vision-language shapes (Qwen2-VL, LLaVA with a CLIP vision tower) add a small vision tower from a config, image
tokens in the tokenizer, an image processor for small images and a processor config, all built here.
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
VISION_ARCHS = ("qwen2-vl", "llava")  # init_vision_model
# how each vision-language shape writes an image in the chat: the processor repeats the image token per image
IMAGE_MARKS = {"qwen2-vl": "<|vision_start|><|image_pad|><|vision_end|>", "llava": "<image>"}
IMAGE_TOKENS = {"qwen2-vl": ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"],
                "llava": ["<image>"]}
PATCH = 7  # vision patch size (pixels): a 28 x 28 image is 4 x 4 patches
IMAGE_SIDE = 28  # LLaVA's fixed input size; Qwen2-VL's smallest (it takes any multiple of 2 patches up to 112)


def vision_chat_template(image_mark: str) -> str:
    """CHAT_TEMPLATE with contents that may be lists of parts: text parts as their text, image parts as
    `image_mark` (as vision-language processors' templates take them)."""
    content = ("{%- macro content(c) -%}{%- if c is string -%}{{ c }}{%- else -%}{%- for part in c -%}"
               "{%- if part.type in ['image', 'image_url'] -%}{{ '" + image_mark + "' }}"
               "{%- elif part.type == 'text' -%}{{ part.text }}{%- endif -%}{%- endfor -%}{%- endif -%}"
               "{%- endmacro -%}")
    template = CHAT_TEMPLATE.replace("messages[0].content", "content(messages[0].content)")
    template = template.replace("{%- if message.content is string %}{{ message.content }}{%- endif %}",
                                "{{ content(message.content) }}")
    return content + template


def train_tokenizer(texts: list[str], vocab_size: int = 2048, extra_special: list[str] = ()) -> PreTrainedTokenizerFast:
    """Byte-level BPE on `texts`, with the chat template and special tokens the project relies on. Digits
    are single tokens (as in Qwen2's and Llama's tokenizers): "128" is 1, 2, 8, so arithmetic is learnt
    digit by digit instead of one token per number."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                       pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS + list(extra_special),
                                  min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(texts, trainer=trainer)
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, pad_token=PAD,
                                      additional_special_tokens=[TURN_START, TURN_END, *extra_special],
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
    if arch in VISION_ARCHS:
        return init_vision_model(arch, size, texts, out, vocab_size, seed)
    out = Path(out)
    tokenizer = train_tokenizer(texts, vocab_size)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(model_config(arch, size, tokenizer))
    model.generation_config = generation_config(tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


# ---------------------------------------------------------------- vision-language models

def _vision_sizes(size: str) -> dict:
    s = SIZES[size]
    return dict(hidden=max(32, s["hidden"] // 2), layers=2, heads=max(2, s["heads"] // 2))


def _qwen2_vl(size: str, tokenizer: PreTrainedTokenizerFast):
    from transformers import Qwen2VLConfig
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    s, v, ids = SIZES[size], _vision_sizes(size), tokenizer.convert_tokens_to_ids
    half = s["hidden"] // s["heads"] // 2  # rotary frequencies per head, split over time, height and width
    sections = [half // 4, (half - half // 4) // 2, half - half // 4 - (half - half // 4) // 2]
    text = dict(vocab_size=len(tokenizer), hidden_size=s["hidden"], intermediate_size=s["intermediate"],
                num_hidden_layers=s["layers"], num_attention_heads=s["heads"], num_key_value_heads=s["kv_heads"],
                max_position_embeddings=2048, eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.eos_token_id,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": sections})
    vision = dict(depth=v["layers"], embed_dim=v["hidden"], hidden_size=s["hidden"], num_heads=v["heads"],
                  mlp_ratio=2, patch_size=PATCH, spatial_merge_size=2, temporal_patch_size=2)
    config = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=ids("<|image_pad|>"),
                           video_token_id=ids("<|video_pad|>"), vision_start_token_id=ids("<|vision_start|>"),
                           vision_end_token_id=ids("<|vision_end|>"), tie_word_embeddings=True)
    factor = PATCH * 2
    images = Qwen2VLImageProcessorPil(patch_size=PATCH, merge_size=2, temporal_patch_size=2,
                                      size={"shortest_edge": factor ** 2, "longest_edge": (8 * factor) ** 2})
    return config, images


def _llava(size: str, tokenizer: PreTrainedTokenizerFast):
    from transformers import CLIPVisionConfig, LlavaConfig
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    v = _vision_sizes(size)
    vision = CLIPVisionConfig(hidden_size=v["hidden"], intermediate_size=2 * v["hidden"], num_hidden_layers=v["layers"],
                              num_attention_heads=v["heads"], image_size=IMAGE_SIDE, patch_size=PATCH,
                              projection_dim=v["hidden"])
    text = model_config("qwen2", size, tokenizer)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_select_strategy="default", vision_feature_layer=-1, tie_word_embeddings=True)
    images = CLIPImageProcessorPil(size={"shortest_edge": IMAGE_SIDE},
                                   crop_size={"height": IMAGE_SIDE, "width": IMAGE_SIDE})
    return config, images


def init_vision_model(arch: str, size: str, texts: list[str], out: str | Path, vocab_size: int = 2048,
                      seed: int = 0) -> Path:
    """A random vision-language model (`arch` qwen2-vl or llava) with its tokenizer, image processor and processor
    config, loadable with AutoModelForImageTextToText and AutoProcessor. Nothing is downloaded."""
    import json

    from transformers import AutoModelForImageTextToText

    if size not in SIZES:
        raise ValueError(f"unknown size '{size}' (choose from {', '.join(SIZES)})")
    out = Path(out)
    tokenizer = train_tokenizer(texts, vocab_size, IMAGE_TOKENS[arch])
    tokenizer.chat_template = vision_chat_template(IMAGE_MARKS[arch])
    config, images = (_qwen2_vl if arch == "qwen2-vl" else _llava)(size, tokenizer)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config)
    model.generation_config = generation_config(tokenizer)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    if arch == "llava":
        processor = {"processor_class": "LlavaProcessor", "image_token": "<image>", "patch_size": PATCH,
                     "vision_feature_select_strategy": "default", "num_additional_image_tokens": 1}
    else:  # written out, as Qwen2VLProcessor would (building one needs torchvision, for its video processor)
        factor = PATCH * 2
        video = {"video_processor_type": "Qwen2VLVideoProcessor", "patch_size": PATCH, "merge_size": 2,
                 "temporal_patch_size": 2, "size": {"shortest_edge": factor ** 2, "longest_edge": (8 * factor) ** 2},
                 "image_mean": images.image_mean, "image_std": images.image_std}
        processor = {"processor_class": "Qwen2VLProcessor", "video_processor": video}
    processor["image_processor"] = {**images.to_dict(), "image_processor_type": type(images).__name__.removesuffix("Pil")}
    (out / "processor_config.json").write_text(json.dumps(processor, indent=2) + "\n")
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
