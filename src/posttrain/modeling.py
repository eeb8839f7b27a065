"""Loading and saving models and tokenizers; LoRA through peft; freeze fine-tuning.

Outputs are ecosystem-native: a full/freeze result loads with `AutoModelForCausalLM.from_pretrained`,
a LoRA result with `PeftModel.from_pretrained`, and the tokenizer keeps its chat template with a
generation config whose EOS list contains the template's end-of-turn token (so the model stops).
"""
from __future__ import annotations

import json
import logging
import re
import shutil
from pathlib import Path

import torch
from torch import nn
from transformers import (AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer,
                          GenerationConfig, PreTrainedModel)

from .errors import ConfigError
from .hub import resolve_model_path

log = logging.getLogger("posttrain")


# ---------------------------------------------------------------- model structure and precision

# Model types whose CausalLM forward is exactly `lm_head(last hidden state)`: for these forward.py applies the
# head to trained positions only and computes log-probs chunk by chunk. Others use the full forward.
PLAIN_HEAD_MODELS = {"llama", "qwen2", "qwen3", "qwen2_moe", "qwen3_moe", "mistral", "mixtral", "gpt2", "phi",
                     "phi3", "gemma", "olmo", "olmo2", "smollm3", "gpt_neox", "stablelm", "starcoder2",
                     "qwen2_vl", "qwen2_5_vl", "llava"}


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


# ---------------------------------------------------------------- device and dtype

DEVICE_CHOICES = ("auto", "cuda", "mps", "cpu")
DTYPE_CHOICES = ("auto", "bf16", "fp16", "fp32")
DTYPE_NAMES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
               "half": torch.float16, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32}


def resolve_device(setting: str | None = "auto", flag: str = "--device") -> torch.device:
    """`auto` (or None): the CUDA GPU, else Apple's MPS, else the CPU; `cuda`, `cuda:N`, `mps`, `cpu` as asked.
    A device this machine lacks is a one-line ConfigError naming `flag`."""
    setting = "auto" if setting in (None, "") else str(setting).lower()
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if setting == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("mps" if mps else "cpu")
    kind, _, index = setting.partition(":")
    if kind not in DEVICE_CHOICES[1:] or (index and (kind != "cuda" or not index.isdigit())):
        raise ConfigError(f"{flag} {setting}: choose one of auto, cuda, cuda:N, mps, cpu")
    if kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"{flag} {setting}: no CUDA GPU is visible here (torch {torch.__version__}"
                              f"{', built without CUDA' if torch.version.cuda is None else ''}); use {flag} auto or cpu")
        if index and int(index) >= count:
            raise ConfigError(f"{flag} {setting}: this machine has {count} CUDA GPU(s), numbered from 0")
    if kind == "mps" and not mps:
        raise ConfigError(f"{flag} mps: Apple's MPS backend is not available here; use {flag} auto or cpu")
    return torch.device(setting)


def resolve_dtype(setting: str | torch.dtype | None, device: torch.device | str, flag: str = "--dtype") -> torch.dtype:
    """The dtype weights are held in on `device`. `auto` (or None): bf16 on a GPU that has it (fp16 on older
    GPUs and on MPS), fp32 on a CPU. bf16 where it would be emulated, or fp16 on a CPU, is a one-line
    ConfigError naming `flag`."""
    if isinstance(setting, torch.dtype):
        setting = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}.get(setting, str(setting))
    setting = "auto" if setting in (None, "") else str(setting).lower()
    kind = torch.device(device).type
    if setting == "auto":
        if kind == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float16 if kind == "mps" else torch.float32
    if setting not in DTYPE_NAMES:
        raise ConfigError(f"{flag} {setting}: choose one of {', '.join(DTYPE_CHOICES)}")
    dtype = DTYPE_NAMES[setting]
    if dtype == torch.bfloat16 and kind == "cuda" and not torch.cuda.is_bf16_supported():
        raise ConfigError(f"{flag} {setting}: this GPU ({torch.cuda.get_device_name()}) has no bf16; use {flag} fp16 "
                          f"or fp32")
    if dtype == torch.bfloat16 and kind == "cpu" and not fast_bf16():
        raise ConfigError(f"{flag} {setting}: this CPU has no native bf16 (AMX or AVX512-BF16), it would be emulated "
                          f"and many times slower than fp32; use {flag} fp32")
    if dtype == torch.float16 and kind == "cpu":
        raise ConfigError(f"{flag} {setting}: fp16 is for GPUs; on a CPU use {flag} fp32"
                          + (" or bf16" if fast_bf16() else ""))
    return dtype


def trained_dtype(config) -> torch.dtype:
    """The dtype a training run loads its trained model in: fp32 (the master weights under train.bf16 autocast)
    unless `dtype:` asks for bf16 (pure bf16 training) or, with LoRA only, fp16 (the frozen base; peft keeps the
    adapter in fp32)."""
    if config.dtype in ("auto", "fp32"):
        return torch.float32
    if config.dtype == "fp16" and config.method != "lora":
        raise ConfigError("dtype: fp16 cannot train full or freeze fine-tuning (fp16 weights updated without loss "
                          "scaling lose small updates); use dtype: bf16, or dtype: auto with train.bf16")
    return DTYPE_NAMES[config.dtype]


def frozen_dtype(config) -> torch.dtype:
    """The dtype of a training run's frozen models (a reference copy, a reward model): `dtype:` when set, else
    the compute dtype: bf16 under train.bf16, fp32 otherwise."""
    if config.dtype != "auto":
        return DTYPE_NAMES[config.dtype]
    return torch.bfloat16 if use_bf16(config.train.bf16) else torch.float32


# ---------------------------------------------------------------- tokenizer

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "spiece.model")


def load_tokenizer(name: str, chat_template: str | None = None, trust_remote_code: bool = False):
    """The tokenizer of a model directory or hub id; a directory without tokenizer files, or files that give
    a tokenizer which cannot encode plain text, is a one-line ConfigError (transformers would return an
    empty tokenizer that encodes every text to nothing)."""
    source = resolve_model_path(name)
    if Path(source).is_dir() and not any((Path(source) / f).is_file() for f in TOKENIZER_FILES):
        raise ConfigError(f"{name} has no tokenizer files (tokenizer.json, tokenizer_config.json): copy them "
                          f"from the model it was made from, e.g. `cp BASE/tokenizer* BASE/chat_template.jinja "
                          f"{name}/`")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise ConfigError(f"model not found or not loadable: {name} ({str(exc).splitlines()[0]})") from None
    probe = tokenizer("Hello world 42", add_special_tokens=False)["input_ids"]
    if len(tokenizer) < 16 or not probe or all(t == tokenizer.unk_token_id for t in probe):
        raise ConfigError(f"the tokenizer of {name} is unusable: {len(tokenizer)} tokens, and 'Hello world 42' "
                          f"encodes to {probe[:8]} (incomplete tokenizer files?); copy the tokenizer files from "
                          f"the model it was made from")
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
               dtype: torch.dtype = torch.float32, quantize: str | None = None,
               device: torch.device | str | None = None) -> PreTrainedModel:
    """task: "causal" (AutoModelForCausalLM), "classify" (AutoModelForSequenceClassification with `labels`)
    or "reward" (AutoModelForSequenceClassification with one output: a scalar reward). quantize: "4bit" /
    "8bit" loads a bitsandbytes base for QLoRA (quantize.py). `device`: where the weights go (on a GPU they
    are loaded there directly, never held twice in host memory); None leaves them on the CPU."""
    name = resolve_model_path(name)
    kwargs: dict = dict(trust_remote_code=trust_remote_code, dtype=dtype)
    if quantize is not None:
        from .quantize import qlora_load_kwargs

        kwargs.update(qlora_load_kwargs(quantize))
    elif device is not None and torch.device(device).type != "cpu":
        kwargs["device_map"] = {"": torch.device(device)}
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
        model = _load_classifier(name, kwargs)
        if task == "reward" and not _is_sequence_classifier(name):
            _init_reward_head(model)
    elif task == "embed":  # an encoder whose hidden states are pooled (stage embed)
        from transformers import AutoModel

        model = _from_pretrained(AutoModel, name, kwargs)
    else:  # a vision-language model's directory loads as AutoModelForImageTextToText (vlm.py)
        model = _from_pretrained(_generative_class(name, trust_remote_code), name, kwargs)
    if tokenizer is not None and getattr(model.config, "pad_token_id", 0) is None:  # (a VLM's is in its text_config)
        model.config.pad_token_id = tokenizer.pad_token_id
    return model


def _generative_class(name: str, trust_remote_code: bool):
    from transformers import AutoConfig, AutoModelForImageTextToText

    from .data.vision import is_vision_config

    try:
        config = AutoConfig.from_pretrained(name, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return AutoModelForCausalLM  # its own error, from from_pretrained
    return AutoModelForImageTextToText if is_vision_config(config) else AutoModelForCausalLM


def _from_pretrained(auto_class, name: str, kwargs: dict):
    try:
        return auto_class.from_pretrained(name, **kwargs)
    except OSError as exc:
        raise ConfigError(f"model not found or not loadable: {name} ({str(exc).splitlines()[0]})") from None


class _NoLoadReport(logging.Filter):
    """Drops transformers' load report (raising its logger's level instead makes transformers 5 print its
    tensor-parallel plan check)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "LOAD REPORT" not in str(record.msg)


def _load_classifier(name: str, kwargs: dict):
    """AutoModelForSequenceClassification without transformers' load report, a table that makes the expected
    new task head look like an error; what it would list is said here in one line."""
    report, drop = logging.getLogger("transformers.modeling_utils"), _NoLoadReport()
    report.addFilter(drop)
    try:
        model, info = _from_pretrained(AutoModelForSequenceClassification, name,
                                       {**kwargs, "output_loading_info": True})
    finally:
        report.removeFilter(drop)
    missing = sorted(info.get("missing_keys") or [])
    head = [k for k in missing if k.split(".")[0] in ("score", "classifier")]
    if head:
        log.info("the task head (%s) is new: it starts from random weights and is trained in this stage",
                 ", ".join(head))
    others = [k for k in missing if k not in head] + [str(k) for k in info.get("mismatched_keys") or []]
    if others:
        log.warning("%s: %d weights were not in the checkpoint (or had another shape) and start from random "
                    "values: %s", name, len(others), ", ".join(others[:5]) + (" ..." if len(others) > 5 else ""))
    return model


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


def apply_lora(model: PreTrainedModel, adapter, task: str = "causal", exclude: list[str] | None = None):
    """`exclude`: module names LoRA leaves alone (a vision-language model's frozen vision parts, vlm.py)."""
    from peft import LoraConfig, TaskType, get_peft_model

    target = "all-linear" if adapter.target == "all-linear" else list(adapter.target)
    if isinstance(target, list):
        names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
        missing = [t for t in target if t not in names]
        if missing:
            raise ConfigError(f"adapter.target: no module named {', '.join(missing)} in this model "
                              f"(linear modules: {', '.join(sorted(linear_module_names(model)))})")
    config = LoraConfig(r=adapter.r, lora_alpha=adapter.alpha, lora_dropout=adapter.dropout, target_modules=target,
                        use_rslora=adapter.rslora, use_dora=adapter.use_dora, exclude_modules=exclude or None,
                        task_type=TaskType.SEQ_CLS if task in ("classify", "reward") else TaskType.CAUSAL_LM)
    if getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False):
        from peft import prepare_model_for_kbit_training  # QLoRA: norms in fp32, input grads for checkpointing

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return get_peft_model(model, config)


def linear_module_names(model: nn.Module) -> set[str]:
    from transformers.pytorch_utils import Conv1D

    return {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, (nn.Linear, Conv1D))}


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of transformer blocks: the longest ModuleList whose items are all the same type (in a
    vision-language model, of the language model)."""
    from .vlm import part_of

    best: nn.ModuleList | None = None
    for name, module in model.named_modules():
        if part_of(name) != "language":
            continue
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

def save_pretrained(model, tokenizer, out: Path, task: str = "causal", state_dict: dict | None = None) -> None:
    """Write the model (or adapter), tokenizer and, for causal LMs, a generation config that stops. `state_dict`:
    the weights to write when the module itself holds only shards (a gathered FSDP / ZeRO-3 state)."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True, **({"state_dict": state_dict} if state_dict is not None else {}))
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


def check_adapter(model: nn.Module, adapter: str | Path, base: str) -> None:
    """Before a LoRA adapter is put on `model` (serve --lora, chat / eval / generate --adapter, export): refuse
    one whose weights do not fit the model's layers (another size or architecture: peft would fail with a
    size-mismatch traceback, or leave layers it cannot find unadapted), and warn when it was trained on a
    model of another name (the shapes fit, but its output is only meaningful on the model it was trained on)."""
    from safetensors import safe_open

    adapter = Path(adapter)
    trained_on = json.loads((adapter / "adapter_config.json").read_text()).get("base_model_name_or_path")
    weights = adapter / "adapter_model.safetensors"
    problems = []
    if weights.is_file():
        modules, params = dict(model.named_modules()), dict(model.named_parameters())
        with safe_open(str(weights), framework="pt") as f:
            for key in f.keys():
                problem = _misfit(key.removeprefix("base_model.model."), f.get_slice(key).get_shape(), modules,
                                  params)
                if problem:
                    problems.append(problem)
    origin = f" (it was trained on {trained_on})" if trained_on else ""
    if problems:
        more = f", and {len(problems) - 1} more weights" if len(problems) > 1 else ""
        raise ConfigError(f"adapter {adapter} does not fit --model {base}{origin}: {problems[0]}{more}")
    if trained_on and not _same_model(trained_on, base):
        log.warning("adapter %s was trained on %s, not on %s: the shapes fit, but its output is only meaningful "
                    "on the model it was trained on", adapter, trained_on, base)


def _misfit(name: str, shape: list[int], modules: dict, params: dict) -> str | None:
    """Why one adapter weight does not fit the model, or None. LoRA A is [r, in], B is [out, r]."""
    for marker, axis in ((".lora_A.", 1), (".lora_B.", 0), (".lora_embedding_A", 1), (".lora_embedding_B", 0)):
        if marker in name:
            layer = name.split(marker)[0]
            module = modules.get(layer)
            if module is None:
                return f"the model has no layer {layer}"
            if isinstance(module, nn.Embedding):
                sizes = (module.num_embeddings, module.embedding_dim)
            elif hasattr(module, "in_features"):
                sizes = (module.in_features, module.out_features)
            else:  # GPT-2's Conv1D keeps its weight as [in, out]
                sizes = tuple(module.weight.shape)
            size = sizes[0] if axis == 1 else sizes[1]
            if shape[axis] != size:
                side = "input" if axis == 1 else "output"
                return f"{layer} has {side} size {size} in the model, {shape[axis]} in the adapter"
            return None
    for candidate in (name, name.replace(".modules_to_save.", ".")):  # a trained head saved with the adapter
        if candidate in params:
            expected = list(params[candidate].shape)
            if expected != list(shape):
                return f"{candidate} is {expected} in the model, {list(shape)} in the adapter"
            return None
    return None


def _same_model(a: str, b: str) -> bool:
    if a == b:
        return True
    pa, pb = Path(a).expanduser(), Path(b).expanduser()
    return pa.exists() and pb.exists() and pa.resolve() == pb.resolve()


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
