"""Quantised weights, in one place: int8 weight-only for serving and evaluation (torchao, any device), and
the bitsandbytes 4-bit / 8-bit base of QLoRA training (CUDA GPUs).

- `quantize_weights(model, "int8")`: every nn.Linear's weight becomes int8 with one scale per output row
  (torchao's Int8WeightOnlyConfig); activations stay in the model's dtype. LoRA matrices (lora_A/lora_B)
  are left as they are, so a quantised base still serves adapters. Embeddings stay as they are.
- `qlora_load_kwargs("4bit" | "8bit")`: from_pretrained arguments for a bitsandbytes base (NF4 with double
  quantisation and bf16 compute for 4bit, LLM.int8 for 8bit), or a one-line error where that cannot run.
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from .errors import ConfigError

SERVE_QUANTIZE = ("int8",)
QLORA_QUANTIZE = ("4bit", "8bit")


def _quiet_torchao_import():
    """torchao logs its CUDA-only extensions failing to load on CPU machines: not news to our users."""
    for name in ("torchao", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import torchao  # noqa: F401


def quantize_weights(model: nn.Module, kind: str | None) -> nn.Module:
    """Quantise the linear weights of `model` in place (kind None: unchanged). Returns the model."""
    if kind is None:
        return model
    if kind not in SERVE_QUANTIZE:
        raise ConfigError(f"--quantize {kind}: choose one of {', '.join(SERVE_QUANTIZE)}")
    try:
        _quiet_torchao_import()
        from torchao.quantization import Int8WeightOnlyConfig, quantize_
    except ImportError:
        raise ConfigError("--quantize int8 needs torchao: pip install 'posttrain[quantize]'") from None

    def is_base_linear(module: nn.Module, name: str) -> bool:
        return type(module) is nn.Linear and "lora_" not in name

    quantize_(model, Int8WeightOnlyConfig(), filter_fn=is_base_linear)
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes held by the model's parameters and buffers, counting quantised tensors by their int8 data
    and scales (torchao tensor subclasses report the original dtype's size through element_size)."""
    seen, total = set(), 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        inner = getattr(tensor, "__tensor_flatten__", None)
        if inner is not None and type(tensor).__name__ not in ("Parameter", "Tensor"):
            names, _ = tensor.__tensor_flatten__()
            total += sum(getattr(tensor, n).numel() * getattr(tensor, n).element_size() for n in names)
        else:
            total += tensor.numel() * tensor.element_size()
    return total


def qlora_load_kwargs(kind: str) -> dict:
    """from_pretrained kwargs that load the base for QLoRA, or a one-line ConfigError on this machine."""
    if kind not in QLORA_QUANTIZE:
        raise ConfigError(f"adapter.quantize: {kind} is not one of {', '.join(QLORA_QUANTIZE)}")
    if not torch.cuda.is_available():
        raise ConfigError(f"adapter.quantize: {kind} (QLoRA) needs a CUDA GPU: bitsandbytes' {kind} training "
                          f"kernels do not run on this machine's CPU; train plain LoRA (adapter.quantize: null)")
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError:
        raise ConfigError(f"adapter.quantize: {kind} needs bitsandbytes: pip install 'posttrain[qlora]'") from None
    if kind == "4bit":
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                    bnb_4bit_compute_dtype=torch.bfloat16)
    else:
        config = BitsAndBytesConfig(load_in_8bit=True)
    return {"quantization_config": config, "device_map": {"": torch.cuda.current_device()}}
