"""Merged Hugging Face export: fold a LoRA adapter into its base (W' = W0 + (alpha/r) B A) and write the
model, tokenizer and a generation config that stops. `load_merged` is shared by every export format."""
from __future__ import annotations

import json
import logging
from pathlib import Path

from ..errors import ConfigError
from ..modeling import check_adapter, load_tokenizer, resolve_model_path, save_pretrained, write_into

log = logging.getLogger("posttrain")

def read_adapter_config(adapter: str) -> dict:
    path = Path(adapter) / "adapter_config.json"
    if not path.is_file():
        raise ConfigError(f"{adapter} is not a LoRA adapter directory (no adapter_config.json)")
    return json.loads(path.read_text())


def check_adapter_fits(model: str, adapter: str, trust_remote_code: bool = False) -> None:
    """modeling.check_adapter against the model's shapes alone: an empty skeleton, no weights read."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(resolve_model_path(model), trust_remote_code=trust_remote_code)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    check_adapter(skeleton, adapter, model)


def load_merged(model: str, adapter: str | None = None, trust_remote_code: bool = False):
    """(model, tokenizer) on the CPU in float32: the base with the adapter (if any) merged into it."""
    from transformers import AutoModelForCausalLM

    model = resolve_model_path(model)
    tokenizer_source = model
    if adapter is not None:
        adapter_config = read_adapter_config(adapter)
        if str(adapter_config.get("task_type", "")).endswith("SEQ_CLS"):
            raise ConfigError(f"{adapter} is a classification adapter: `posttrain train` already writes the merged "
                              f"classifier next to it (its parent directory)")
        if (Path(adapter) / "tokenizer_config.json").is_file():
            tokenizer_source = adapter
    tokenizer = load_tokenizer(tokenizer_source, trust_remote_code=trust_remote_code)
    try:
        network = AutoModelForCausalLM.from_pretrained(model, trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise ConfigError(f"model not found or not loadable: {model} ({str(exc).splitlines()[0]})") from None
    if adapter is not None:
        from peft import PeftModel

        check_adapter(network, adapter, model)  # the check serve, chat and eval make too
        try:
            network = PeftModel.from_pretrained(network, adapter).merge_and_unload()
        except (RuntimeError, ValueError, KeyError) as exc:  # size mismatch, missing target modules
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"adapter {adapter} does not fit --model {model}: {first}") from None
    return network.eval(), tokenizer


def merge_adapter(base: str, adapter: str, out: str, trust_remote_code: bool = False) -> Path:
    """`posttrain export --format hf`: the merged model in a directory `from_pretrained(out)` loads."""
    merged, tokenizer = load_merged(base, adapter, trust_remote_code)
    out_path = Path(out)
    write_into(out_path, lambda staging: save_pretrained(merged, tokenizer, staging, "causal"))
    return out_path
