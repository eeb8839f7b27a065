"""`posttrain serve`: an OpenAI-compatible HTTP server over the generation engine.

protocol.py holds the request bodies, batcher.py the worker thread that owns the model and batches requests,
responses.py the response shapes, app.py the routes. LoRA adapters are served vLLM's way: one peft model holds
every adapter under its served name, a batch runs under one of them (or with adapters disabled for the base).
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from ..errors import ConfigError

log = logging.getLogger("posttrain")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_loras(values: list[str]) -> dict[str, str]:
    """`NAME=DIR` pairs; each DIR must be a LoRA adapter directory."""
    adapters: dict[str, str] = {}
    for value in values:
        name, sep, path = value.partition("=")
        if not sep or not name or not path:
            raise ConfigError(f"--lora {value}: expected NAME=DIR")
        if name in adapters:
            raise ConfigError(f"--lora {value}: the name {name} is given twice")
        if not (Path(path) / "adapter_config.json").is_file():
            raise ConfigError(f"--lora {value}: {path} is not a LoRA adapter directory (no adapter_config.json)")
        adapters[name] = path
    return adapters


def load_engine(model: str, adapters: dict[str, str], dtype: str = "float32", chat_template: str | None = None,
                quantize: str | None = None):
    from ..engine import Engine
    from ..modeling import check_adapter, load_model, load_tokenizer

    tokenizer = load_tokenizer(model, chat_template=chat_template)
    network = load_model(model, tokenizer=tokenizer, dtype=DTYPES[dtype])
    if adapters:
        from peft import PeftModel

        for path in adapters.values():
            check_adapter(network, path, model)
        (first, first_dir), *rest = adapters.items()
        network = PeftModel.from_pretrained(network, first_dir, adapter_name=first)
        for name, path in rest:
            network.load_adapter(path, adapter_name=name)
    from ..quantize import quantize_weights

    return Engine(quantize_weights(network.eval(), quantize), tokenizer)


def serve(model: str, loras: list[str], host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          chat_template: str | None = None, dtype: str = "float32", batch_window_ms: float = 10,
          max_batch_wait_ms: float = 50, rag: str | None = None, rag_k: int = 5, rag_mode: str | None = None,
          rag_template: str | None = None, quantize: str | None = None) -> None:
    import uvicorn

    from .app import Server, create_app

    adapters = parse_loras(loras)
    if model in adapters:
        raise ConfigError(f"--lora {model}=...: an adapter cannot have the base model's name")
    if batch_window_ms < 0 or max_batch_wait_ms < batch_window_ms:
        raise ConfigError("--batch-window-ms must be >= 0 and --max-batch-wait-ms at least as long")
    server = Server(load_engine(model, adapters, dtype, chat_template, quantize), model, adapters, api_key=api_key,
                    batch_window_s=batch_window_ms / 1000, max_batch_wait_s=max_batch_wait_ms / 1000)
    if rag:  # the last user message retrieves from this index (see rag/prompt.py)
        from ..rag.prompt import load_augmenter

        server.rag = load_augmenter(rag, rag_k, rag_mode, rag_template)
    names = ", ".join(server.names())
    log.info(f"serving {names} at http://{host}:{port}/v1" + (" (API key required)" if api_key else ""))
    uvicorn.run(create_app(server), host=host, port=port, log_level="warning", access_log=False)
