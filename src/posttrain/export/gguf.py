"""GGUF export (llama.cpp, Ollama): tensors, hyper-parameters, tokenizer and chat template in one file.

Written with the `gguf` package (the format's maintained Python writer); the mapping from Hugging Face
names and conventions to GGUF's is ours, per architecture family:
- decoder (llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3): `model.layers.N.self_attn.q_proj` ->
  `blk.N.attn_q` and so on. llama.cpp's llama graph rotates adjacent pairs where transformers rotates
  halves, so Llama/Mistral query and key rows are reordered per head; Gemma's norms compute x * (1 + w),
  which GGUF stores as the weight 1 + w.
- gpt2: Conv1D weights are stored (in, out), GGUF wants (out, in): transposed.
Tokenizers: byte-level BPE (`gpt2` in GGUF: tokens, merges, a named pre-tokenizer) and SentencePiece-style
BPE (`llama`: tokens with scores, byte tokens <0xNN>). The file is written beside --out and renamed.
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError
from ..modeling import end_of_turn_token_ids

log = logging.getLogger("posttrain")

QUANTS = ("f16", "bf16", "q8_0", "q4_0")


def _gguf():
    logging.getLogger("gguf").setLevel(logging.WARNING)  # its writer logs every file it opens at INFO
    try:
        import gguf
    except ImportError:
        raise ConfigError("GGUF export needs the gguf package: pip install 'posttrain[export]'") from None
    return gguf


# ---------------------------------------------------------------- tensor names

def _decoder_names(T, post_norms: bool = False) -> dict:
    names = {
        "model.embed_tokens": T.TOKEN_EMBD, "model.norm": T.OUTPUT_NORM, "lm_head": T.OUTPUT,
        "model.layers.{bid}.input_layernorm": T.ATTN_NORM,
        "model.layers.{bid}.self_attn.q_proj": T.ATTN_Q, "model.layers.{bid}.self_attn.k_proj": T.ATTN_K,
        "model.layers.{bid}.self_attn.v_proj": T.ATTN_V, "model.layers.{bid}.self_attn.o_proj": T.ATTN_OUT,
        "model.layers.{bid}.self_attn.q_norm": T.ATTN_Q_NORM, "model.layers.{bid}.self_attn.k_norm": T.ATTN_K_NORM,
        "model.layers.{bid}.post_attention_layernorm": T.FFN_NORM,
        "model.layers.{bid}.mlp.gate_proj": T.FFN_GATE, "model.layers.{bid}.mlp.up_proj": T.FFN_UP,
        "model.layers.{bid}.mlp.down_proj": T.FFN_DOWN,
    }
    if post_norms:  # gemma2/3: a norm after attention and one on each side of the MLP
        names["model.layers.{bid}.post_attention_layernorm"] = T.ATTN_POST_NORM
        names["model.layers.{bid}.pre_feedforward_layernorm"] = T.FFN_PRE_NORM
        names["model.layers.{bid}.post_feedforward_layernorm"] = T.FFN_POST_NORM
    return names


def _gpt2_names(T) -> dict:
    return {
        "transformer.wte": T.TOKEN_EMBD, "transformer.wpe": T.POS_EMBD, "transformer.ln_f": T.OUTPUT_NORM,
        "lm_head": T.OUTPUT, "transformer.h.{bid}.ln_1": T.ATTN_NORM, "transformer.h.{bid}.attn.c_attn": T.ATTN_QKV,
        "transformer.h.{bid}.attn.c_proj": T.ATTN_OUT, "transformer.h.{bid}.ln_2": T.FFN_NORM,
        "transformer.h.{bid}.mlp.c_fc": T.FFN_UP, "transformer.h.{bid}.mlp.c_proj": T.FFN_DOWN,
    }


@dataclass
class Arch:
    gguf_name: str            # MODEL_ARCH member
    names: str                # "decoder", "decoder-post-norms" or "gpt2"
    rope_pairs: bool = False  # reorder q/k rows for llama.cpp's adjacent-pair rotation
    norm_plus_one: bool = False
    transpose: tuple[str, ...] = ()


ARCHS = {
    "llama": Arch("LLAMA", "decoder", rope_pairs=True),
    "mistral": Arch("LLAMA", "decoder", rope_pairs=True),
    "qwen2": Arch("QWEN2", "decoder"),
    "qwen3": Arch("QWEN3", "decoder"),
    "gemma": Arch("GEMMA", "decoder", norm_plus_one=True),
    "gemma2": Arch("GEMMA2", "decoder-post-norms", norm_plus_one=True),
    "gemma3_text": Arch("GEMMA3", "decoder-post-norms", norm_plus_one=True),
    "gpt2": Arch("GPT2", "gpt2", transpose=("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")),
}


def arch_for(config) -> Arch:
    model_type = config.model_type
    if model_type not in ARCHS:
        raise ConfigError(f"GGUF export does not support model type '{model_type}' (supported: "
                          f"{', '.join(sorted(ARCHS))}); use --format hf")
    return ARCHS[model_type]


def gguf_tensor_name(hf_name: str, table: dict, T, arch_tensors) -> str | None:
    """`model.layers.3.self_attn.q_proj.weight` -> `blk.3.attn_q.weight`; None for a tensor GGUF omits."""
    gguf = _gguf()
    stem, _, suffix = hf_name.rpartition(".")
    match = re.search(r"\.(\d+)\.", stem)
    bid = int(match.group(1)) if match else None
    key = stem.replace(f".{bid}.", ".{bid}.", 1) if match else stem
    kind = table.get(key)
    if kind is None or kind not in arch_tensors:
        return None
    return gguf.TENSOR_NAMES[kind].format(bid=bid) + "." + suffix


# ---------------------------------------------------------------- tensors

def _pairs_from_halves(weight: np.ndarray, heads: int) -> np.ndarray:
    """Rows of each head reordered from [x0..x(d/2-1), y0..] (rotate-half) to [x0, y0, x1, y1, ...]."""
    shape = weight.shape
    return weight.reshape(heads, 2, shape[0] // heads // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def tensor_type(name: str, data: np.ndarray, quant: str):
    """The GGML type of one tensor: vectors stay f32; matrices take --quant when their rows split into
    32-value blocks (else f16). With q4_0 the token embedding (also the output head when tied) and the
    output head keep q8_0, where 4 bits cost the most quality."""
    T = _gguf().GGMLQuantizationType
    if data.ndim == 1:
        return T.F32
    if quant == "f16":
        return T.F16
    if quant == "bf16":
        return T.BF16
    if data.shape[-1] % 32:
        return T.F16
    if quant == "q4_0" and (name.startswith("token_embd") or name.startswith("output.")):
        return T.Q8_0
    return T.Q8_0 if quant == "q8_0" else T.Q4_0


def encode_tensor(data: np.ndarray, ggml_type):
    gguf = _gguf()
    T = gguf.GGMLQuantizationType
    if ggml_type == T.F32:
        return data.astype(np.float32)
    if ggml_type == T.F16:
        return data.astype(np.float16)
    return gguf.quants.quantize(data.astype(np.float32), ggml_type)


def model_tensors(model, arch: Arch):
    """(gguf name, float32 array) for every tensor the file holds, in the model's order."""
    gguf = _gguf()
    T = gguf.MODEL_TENSOR
    arch_id = gguf.MODEL_ARCH[arch.gguf_name]
    table = _gpt2_names(T) if arch.names == "gpt2" else _decoder_names(T, arch.names == "decoder-post-norms")
    config = model.config
    tied = bool(getattr(config, "tie_word_embeddings", False))
    skipped = []
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # the same matrix as the token embedding: GGUF omits `output` and reuses it
        name = gguf_tensor_name(hf_name, table, T, gguf.MODEL_TENSORS[arch_id])
        if name is None:
            skipped.append(hf_name)
            continue
        data = tensor.detach().to(torch.float32).cpu().numpy()
        if arch.rope_pairs and (".attn_q." in name or ".attn_k." in name):
            heads = config.num_attention_heads if ".attn_q." in name else config.num_key_value_heads
            data = _pairs_from_halves(data, heads)
        if arch.norm_plus_one and "norm" in name:
            data = data + 1.0
        if arch.transpose and name.endswith(".weight") and any(part in hf_name for part in arch.transpose):
            data = data.T
        yield name, np.ascontiguousarray(data)
    if skipped:  # nothing is dropped silently: a tensor without a GGUF name means the file would be wrong
        raise ConfigError(f"GGUF export: {len(skipped)} tensors have no GGUF name for {config.model_type} "
                          f"(first: {skipped[0]}); this model variant is not supported")


# ---------------------------------------------------------------- hyper-parameters

def rope_thetas(config) -> tuple[float, float | None]:
    """(rotary base, base of the sliding-window layers if they have their own). transformers 5 keeps one
    `rope_parameters` dict, or one per layer type (Gemma 3: sliding_attention / full_attention)."""
    params = getattr(config, "rope_parameters", None) or {}
    per_type = params if "full_attention" in params else {"full_attention": params}
    for p in per_type.values():
        kind = p.get("rope_type") or "default"
        if kind != "default":
            raise ConfigError(f"GGUF export: rope scaling '{kind}' is not supported by this exporter (only plain "
                              f"rotary embeddings); use --format hf")
    theta = per_type["full_attention"].get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0
    sliding = per_type.get("sliding_attention", {}).get("rope_theta")
    return float(theta), (float(sliding) if sliding else None)


def write_hparams(writer, config, arch: Arch, name: str) -> None:
    writer.add_name(name)
    if arch.names == "gpt2":
        writer.add_context_length(config.n_positions)
        writer.add_embedding_length(config.n_embd)
        writer.add_feed_forward_length(config.n_inner or 4 * config.n_embd)
        writer.add_block_count(config.n_layer)
        writer.add_head_count(config.n_head)
        writer.add_layer_norm_eps(config.layer_norm_epsilon)
        return
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    theta, sliding_theta = rope_thetas(config)
    writer.add_rope_freq_base(theta)
    if sliding_theta is not None:
        writer.add_rope_freq_base_swa(sliding_theta)
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // heads or arch.gguf_name.startswith("GEMMA"):
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if arch.gguf_name in ("GEMMA2", "GEMMA3") and getattr(config, "sliding_window", None):
        writer.add_sliding_window(config.sliding_window)
    if arch.gguf_name == "GEMMA2":
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping or 0.0)
        writer.add_final_logit_softcapping(config.final_logit_softcapping or 0.0)
    window = getattr(config, "sliding_window", None)
    if arch.gguf_name in ("LLAMA", "QWEN2") and window and getattr(config, "use_sliding_window", True) \
            and window < config.max_position_embeddings:
        log.warning(f"GGUF export: the model's sliding window ({window}) is not stored; llama.cpp attends to the "
                    f"whole context, which matches the source only for inputs up to {window} tokens")


# ---------------------------------------------------------------- tokenizer

def _pre_tokenizer_name(pre: dict | None) -> str:
    """llama.cpp's name for a byte-level BPE pre-tokenizer, or a one-line error."""
    parts = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre] if pre else []
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"] and parts[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits") and parts[1].get("use_regex", True):
        # posttrain's own tokenizers (init-model): digits are split off, then GPT-2's regex. No merge ever
        # joins a digit, so GPT-2's split gives the same tokens except for a run of 2+ whitespace characters
        # right before a digit (GGUF splits the run's last character off)
        return "gpt-2"
    if kinds == ["Split", "ByteLevel"] and not parts[1].get("use_regex", True):
        regex = parts[0].get("pattern", {}).get("Regex")
        try:  # the split patterns transformers' own GGUF reader pairs with llama.cpp's names
            from transformers.integrations.gguf.gguf_tokenizer_mapping import GGUF_PRE_TOKENIZER_SPLITS
        except ImportError:
            GGUF_PRE_TOKENIZER_SPLITS = {}
        for name in ("qwen2", "llama-bpe", "tekken", "gpt-4o"):
            if GGUF_PRE_TOKENIZER_SPLITS.get(name) == regex:
                return name
    raise ConfigError(f"GGUF export: the tokenizer's pre-tokenizer ({' + '.join(map(str, kinds)) or 'none'}) has no "
                      f"GGUF name this exporter knows (GPT-2, Qwen2, Llama-3 byte-level BPE are supported)")


def _merges(model_json: dict) -> list[str]:
    return [" ".join(m) if isinstance(m, list) else m for m in model_json.get("merges", [])]


def write_tokenizer(writer, tokenizer, n_vocab: int) -> None:
    gguf = _gguf()
    TT = gguf.TokenType
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model_json = spec["model"]
    if model_json.get("type") != "BPE":
        raise ConfigError(f"GGUF export: tokenizer model {model_json.get('type')} is not supported (BPE only)")
    vocab = tokenizer.get_vocab()
    if len(vocab) > n_vocab:
        raise ConfigError(f"GGUF export: the tokenizer has {len(vocab)} tokens but the model only {n_vocab} "
                          f"embedding rows")
    by_id = {i: t for t, i in vocab.items()}
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    tokens, types = [], []
    byte_fallback = bool(model_json.get("byte_fallback"))
    for i in range(n_vocab):
        token = by_id.get(i)
        if token is None:  # embedding rows beyond the tokenizer (padded vocabularies)
            tokens.append(f"[PAD{i}]")
            types.append(TT.UNUSED)
        elif i in added:
            tokens.append(token)
            types.append(TT.CONTROL if added[i].get("special") else TT.USER_DEFINED)
        elif token == tokenizer.unk_token:
            tokens.append(token)
            types.append(TT.UNKNOWN)
        elif byte_fallback and re.fullmatch(r"<0x[0-9A-F]{2}>", token):
            tokens.append(token)
            types.append(TT.BYTE)
        else:
            tokens.append(token)
            types.append(TT.NORMAL)
    merges = _merges(model_json)
    decoder = json.dumps(spec.get("decoder"))
    if "ByteLevel" in decoder:
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(_pre_tokenizer_name(spec.get("pre_tokenizer")))
    elif byte_fallback or "Metaspace" in decoder or "\u2581" in decoder:
        # SentencePiece-style BPE: llama.cpp merges by score, so a merged token scores by its merge's rank
        rank = {m.replace(" ", ""): r for r, m in enumerate(merges)}
        writer.add_tokenizer_model("llama")
        writer.add_token_scores([-float(rank[t] + 1) if t in rank else 0.0 for t in tokens])
        writer.add_add_space_prefix("Prepend" in json.dumps(spec.get("normalizer"))
                                    or "prepend_scheme\": \"first" in json.dumps(spec.get("pre_tokenizer")))
    else:
        raise ConfigError("GGUF export: the tokenizer is neither byte-level nor SentencePiece-style BPE")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    _write_special_ids(writer, tokenizer)


def _write_special_ids(writer, tokenizer) -> None:
    probe = tokenizer("a")["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is not None:
        writer.add_bos_token_id(bos)
    if eos is not None:
        writer.add_eos_token_id(eos)
    if tokenizer.unk_token_id is not None:
        writer.add_unk_token_id(tokenizer.unk_token_id)
    if tokenizer.pad_token_id is not None:
        writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(bool(probe) and bos is not None and probe[0] == bos)
    writer.add_add_eos_token(bool(probe) and eos is not None and probe[-1] == eos and len(probe) > 1)
    end_of_turn = [i for i in end_of_turn_token_ids(tokenizer) if i != eos]
    if end_of_turn:
        writer.add_eot_token_id(end_of_turn[0])
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


# ---------------------------------------------------------------- the file

def write_gguf(model, tokenizer, out: str | Path, quant: str = "f16", name: str | None = None) -> Path:
    """Write `model` (a transformers causal LM, adapters already merged) and its tokenizer to `out`."""
    gguf = _gguf()
    if quant not in QUANTS:
        raise ConfigError(f"--quant {quant}: not supported (choose {', '.join(QUANTS)}; k-quants such as q4_k_m "
                          f"come from llama.cpp's llama-quantize run on the f16 file)")
    arch = arch_for(model.config)
    out = Path(out)
    if out.is_dir():
        raise ConfigError(f"--out {out} is a directory: give the .gguf file to write")
    out.parent.mkdir(parents=True, exist_ok=True)
    n_vocab = model.get_input_embeddings().weight.shape[0]
    file_types = {"f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0", "q4_0": "MOSTLY_Q4_0"}
    name = name or Path(getattr(model.config, "_name_or_path", "") or out.stem).name or out.stem
    temp = out.with_name(f".{out.name}.partial")
    writer = gguf.GGUFWriter(str(temp), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH[arch.gguf_name]])
    try:
        write_hparams(writer, model.config, arch, name)
        writer.add_vocab_size(n_vocab)
        writer.add_file_type(gguf.LlamaFileType[file_types[quant]])
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        write_tokenizer(writer, tokenizer, n_vocab)
        with torch.no_grad():
            for tensor_name, data in model_tensors(model, arch):
                ggml_type = tensor_type(tensor_name, data, quant)
                writer.add_tensor(tensor_name, encode_tensor(data, ggml_type), raw_dtype=ggml_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(temp, out)
    finally:
        temp.unlink(missing_ok=True)
    return out
