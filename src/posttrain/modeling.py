"""Loading and saving models and tokenizers; LoRA through peft; freeze fine-tuning.

Outputs are ecosystem-native: a full/freeze result loads with `AutoModelForCausalLM.from_pretrained`,
a LoRA result with `PeftModel.from_pretrained`, and the tokenizer keeps its chat template with a
generation config whose EOS list contains the template's end-of-turn token (so the model stops).
"""
from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import torch
from torch import nn
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                          GenerationConfig, PreTrainedModel)

from .errors import ConfigError

log = logging.getLogger("posttrain")


# ---------------------------------------------------------------- model structure and precision

# Model types whose CausalLM forward is exactly `lm_head(body(...))`: for these the head is applied only
# to trained positions (prompt and padding rows of the logits are never built). Others use the full forward.
PLAIN_HEAD_MODELS = {"llama", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "mistral", "mixtral", "gpt2", "phi",
                     "phi3", "gemma", "olmo", "olmo2", "smollm3", "gpt_neox", "stablelm", "starcoder2"}


def plain_head_parts(model: nn.Module):
    """(body, head) when the trained positions can be selected before the LM head, else None."""
    if isinstance(model, nn.parallel.DistributedDataParallel):  # the forward must go through the wrapper
        return None
    hf = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(hf.config, "model_type", None) not in PLAIN_HEAD_MODELS:
        return None
    body = getattr(hf, getattr(hf, "base_model_prefix", ""), None)
    head = hf.get_output_embeddings()
    return (body, head) if body is not None and head is not None else None


def fast_bf16() -> bool:
    """Whether bf16 matmuls run natively here: a CUDA GPU with bf16, or a CPU with AMX / AVX512-BF16."""
    if torch.cuda.is_available():
        return torch.cuda.is_bf16_supported()
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return bool(re.search(r"\b(amx_bf16|avx512_bf16)\b", flags))


def use_bf16(setting: bool | str) -> bool:
    """train.bf16 resolved: true / false as given, `auto` by fast_bf16()."""
    return fast_bf16() if setting == "auto" else bool(setting)


# ---------------------------------------------------------------- tokenizer

def resolve_model_path(name: str) -> str:
    """The local directory (with ~ expanded), or the name as a hub id when no such directory exists."""
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():
            raise ConfigError(f"model directory {name} has no config.json")
        return str(path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ConfigError(f"model not found: {name} (no such directory; give a model directory or a hub id "
                          f"such as Qwen/Qwen2.5-0.5B, or create one with `posttrain init-model`)")
    return name


def load_tokenizer(name: str, chat_template: str | None = None, trust_remote_code: bool = False):
    source = resolve_model_path(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise ConfigError(f"model not found or not loadable: {name} ({str(exc).splitlines()[0]})") from None
    if chat_template:
        tokenizer.chat_template = read_chat_template(chat_template)
    if tokenizer.pad_token is None:
        # a distinct pad token would change the embedding matrix; eos is safe because padding is masked
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def read_chat_template(value: str) -> str:
    """`chat_template:` is the Jinja text itself or a path to a file holding it; either must compile."""
    from jinja2 import TemplateSyntaxError
    from transformers.utils.chat_template_utils import _compile_jinja_template

    if "{" not in value and "\n" not in value:  # not Jinja: a path
        path = Path(value).expanduser()
        if not path.is_file():
            raise ConfigError(f"chat_template file not found: {value} (give a path to a .jinja file, or the "
                              "template itself inline)")
        value = path.read_text(encoding="utf-8")
    try:
        _compile_jinja_template(value)
    except TemplateSyntaxError as exc:
        raise ConfigError(f"chat_template is not valid Jinja: {exc.message} (template line {exc.lineno})") from None
    return value


def end_of_turn_token_ids(tokenizer) -> list[int]:
    """Token ids that end an assistant turn under the chat template (e.g. <|im_end|>), plus EOS."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    if getattr(tokenizer, "chat_template", None):
        marker = "XQZMARKER"
        try:
            text = tokenizer.apply_chat_template(
                [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}], tokenize=False)
        except Exception:  # noqa: BLE001 - a template that cannot render simple chats has no usable EOT
            text = ""
        after = text.split(marker, 1)[1] if marker in text else ""
        special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
        for token_id in tokenizer(after, add_special_tokens=False)["input_ids"]:
            if token_id in special:
                ids.insert(0, token_id)
                break
    return list(dict.fromkeys(i for i in ids if i is not None))


# ---------------------------------------------------------------- model

def load_model(name: str, task: str = "causal", *, tokenizer=None, trust_remote_code: bool = False,
               attn_implementation: str | None = None, labels: list[str] | None = None,
               dtype: torch.dtype = torch.float32, quantize: str | None = None) -> PreTrainedModel:
    """task: "causal" (AutoModelForCausalLM), "classify" (AutoModelForSequenceClassification with `labels`)
    or "reward" (AutoModelForSequenceClassification with one output: a scalar reward). quantize: "4bit" /
    "8bit" loads a bitsandbytes base for QLoRA (quantize.py)."""
    name = resolve_model_path(name)
    kwargs: dict = dict(trust_remote_code=trust_remote_code, dtype=dtype)
    if quantize is not None:
        from .quantize import qlora_load_kwargs

        kwargs.update(qlora_load_kwargs(quantize))
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    if task in ("classify", "reward"):
        labels = labels or []
        if task == "reward":
            kwargs.update(num_labels=1)
        else:
            kwargs.update(num_labels=len(labels), id2label=dict(enumerate(labels)),
                          label2id={label: i for i, label in enumerate(labels)})
        if tokenizer is not None:
            kwargs["pad_token_id"] = tokenizer.pad_token_id
        model = _from_pretrained(AutoModelForSequenceClassification, name, kwargs)
        if task == "reward" and not _is_sequence_classifier(name):
            _init_reward_head(model)
    elif task == "embed":  # an encoder whose hidden states are pooled (stage embed)
        from transformers import AutoModel

        model = _from_pretrained(AutoModel, name, kwargs)
    else:
        model = _from_pretrained(AutoModelForCausalLM, name, kwargs)
    if tokenizer is not None and model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def _from_pretrained(auto_class, name: str, kwargs: dict):
    try:
        return auto_class.from_pretrained(name, **kwargs)
    except OSError as exc:
        raise ConfigError(f"model not found or not loadable: {name} ({str(exc).splitlines()[0]})") from None


def _is_sequence_classifier(name: str) -> bool:
    from transformers import AutoConfig

    architectures = AutoConfig.from_pretrained(name).architectures or []
    return any(a.endswith("ForSequenceClassification") for a in architectures)


def _init_reward_head(model) -> None:
    """A fresh reward head drawn from N(0, 1/sqrt(d+1)) (Stiennon et al.), so initial rewards are small."""
    head = getattr(model, "score", None) or getattr(model, "classifier", None)
    if isinstance(head, nn.Linear):
        with torch.no_grad():
            head.weight.normal_(0.0, 1.0 / (head.in_features + 1) ** 0.5)
            if head.bias is not None:
                head.bias.zero_()


def disable_dropout(model: nn.Module) -> None:
    """Dropout off everywhere in the model: nn.Dropout modules and the float rates some attention
    implementations read from their module (attention_dropout, ...)."""
    for m in model.modules():
        if isinstance(m, nn.Dropout):
            m.p = 0.0
        for name in ("attention_dropout", "attn_dropout", "dropout"):
            if isinstance(getattr(m, name, None), float):
                setattr(m, name, 0.0)


def apply_lora(model: PreTrainedModel, adapter, task: str = "causal"):
    from peft import LoraConfig, TaskType, get_peft_model

    target = "all-linear" if adapter.target == "all-linear" else list(adapter.target)
    if isinstance(target, list):
        names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        missing = [t for t in target if t not in names]
        if missing:
            raise ConfigError(f"adapter.target: no module named {', '.join(missing)} in this model "
                              f"(linear modules: {', '.join(sorted(linear_module_names(model)))})")
    config = LoraConfig(r=adapter.r, lora_alpha=adapter.alpha, lora_dropout=adapter.dropout, target_modules=target,
                        use_rslora=adapter.rslora, use_dora=adapter.use_dora,
                        task_type=TaskType.SEQ_CLS if task in ("classify", "reward") else TaskType.CAUSAL_LM)
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        from peft import prepare_model_for_kbit_training  # QLoRA: norms in fp32, input grads for checkpointing

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return get_peft_model(model, config)


def linear_module_names(model: nn.Module) -> set[str]:
    from transformers.pytorch_utils import Conv1D

    return {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))}


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of transformer blocks: the longest ModuleList whose items are all the same type."""
    best: nn.ModuleList | None = None
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and len({type(m) for m in module}) == 1:
            if best is None or len(module) > len(best):
                best = module
    if best is None:
        raise ConfigError("freeze: could not find the transformer layers of this model")
    return best


def apply_freeze(model: nn.Module, trainable_layers: int, train_embeddings: bool = False,
                 head_names: tuple[str, ...] = ("score", "classifier")) -> None:
    """Freeze everything except the top `trainable_layers` blocks, the final norm and any task head."""
    layers = decoder_layers(model)
    for param in model.parameters():
        param.requires_grad_(False)
    set_trainable_layers(model, trainable_layers)
    layer_params = {id(p) for p in layers.parameters()}
    embedding_params = {id(p) for p in model.get_input_embeddings().parameters()}
    for name, param in model.named_parameters():
        if id(param) in layer_params:
            continue
        is_head = any(re.search(rf"(^|\.){h}(\.|$)", name) for h in head_names)
        is_norm = re.search(r"(norm|ln_f)", name) is not None
        if is_head or is_norm or (train_embeddings and id(param) in embedding_params):
            param.requires_grad_(True)


def set_trainable_layers(model: nn.Module, count: int) -> int:
    """Make the top `count` blocks trainable (gradual unfreezing calls this with a growing count)."""
    layers = decoder_layers(model)
    count = min(count, len(layers))
    for index, layer in enumerate(layers):
        for param in layer.parameters():
            param.requires_grad_(index >= len(layers) - count)
    return count


def count_parameters(model: nn.Module) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return trainable, sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- saving

def save_pretrained(model, tokenizer, out: Path, task: str = "causal") -> None:
    """Write the model (or adapter), tokenizer and, for causal LMs, a generation config that stops."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    if task == "causal":
        generation_config_for(model, tokenizer).save_pretrained(out)


def generation_config_for(model, tokenizer) -> GenerationConfig:
    base = getattr(model, "get_base_model", lambda: model)()
    config = base.generation_config if getattr(base, "generation_config", None) else GenerationConfig()
    config = GenerationConfig.from_dict(config.to_dict())
    stops = end_of_turn_token_ids(tokenizer)
    existing = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
    config.eos_token_id = list(dict.fromkeys(stops + [e for e in existing if e is not None]))
    config.pad_token_id = tokenizer.pad_token_id
    return config


def write_into(out_dir: Path, write) -> None:
    """Call write(staging_dir), then move what it wrote into out_dir: a crash mid-write leaves only the
    hidden staging directory, never a half-written model in out_dir."""
    staging = out_dir / ".partial-output"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    write(staging)
    for item in staging.iterdir():
        target = out_dir / item.name
        if target.is_dir():
            shutil.rmtree(target)
        item.replace(target)
    staging.rmdir()
