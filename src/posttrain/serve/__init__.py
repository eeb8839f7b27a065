"""`posttrain serve`: an OpenAI-compatible HTTP server over the generation engine.

protocol.py holds the request bodies, batcher.py the worker thread that owns the model and batches requests
continuously, responses.py the response shapes, tools.py the tool-call parsers, app.py the routes. LoRA adapters
are served vLLM's way: one peft model holds every adapter under its served name, and each row of a batch runs
under its own (peft's mixed-adapter batches; "__base__" for the base).

`--backend vllm` hands the whole job to vLLM's own OpenAI-compatible server (backends/vllm.py) where vLLM is
installed (a GPU machine).
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
                quantize: str | None = None, device: str | torch.device | None = None):
    from ..engine import Engine
    from ..modeling import check_adapter, load_model, load_tokenizer

    tokenizer = load_tokenizer(model, chat_template=chat_template)
    network = load_model(model, tokenizer=tokenizer, dtype=DTYPES[dtype], device=device)
    if adapters:
        from peft import PeftModel

        for path in adapters.values():
            check_adapter(network, path, model)
        (first, first_dir), *rest = adapters.items()
        network = PeftModel.from_pretrained(network, first_dir, adapter_name=first)
        for name, path in rest:
            network.load_adapter(path, adapter_name=name)
    if device is not None:
        network = network.to(device)
    from ..quantize import quantize_weights

    from ..data.vision import load_vision

    return Engine(quantize_weights(network.eval(), quantize), tokenizer, vision=load_vision(model))


def serve(model: str, loras: list[str], host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          chat_template: str | None = None, dtype: str = "float32", max_rows: int = 64,
          max_request_bytes: int = 4 * 1024 * 1024, cors: list[str] | None = None, backend: str = "engine",
          rag: str | None = None, rag_k: int = 5, rag_mode: str | None = None, rag_template: str | None = None,
          quantize: str | None = None, device: str | None = None, allow_remote_images: bool = False) -> None:
    adapters = parse_loras(loras)
    if model in adapters:
        raise ConfigError(f"--lora {model}=...: an adapter cannot have the base model's name")
    if api_key is not None and not api_key.strip():
        raise ConfigError("--api-key is empty: give a key, or leave the option out to serve without one")
    if max_rows < 1 or max_request_bytes < 1024:
        raise ConfigError("--max-rows must be at least 1 and --max-request-bytes at least 1024")
    if backend == "vllm":
        from ..backends.vllm import serve_vllm

        if rag or quantize:
            raise ConfigError(f"--backend vllm: {'--rag' if rag else '--quantize'} is served by the engine backend "
                              "only")
        serve_vllm(model, adapters, host=host, port=port, api_key=api_key, chat_template=chat_template, dtype=dtype,
                   max_rows=max_rows, cors=cors)
        return
    import uvicorn

    from .app import Server, create_app

    server = Server(load_engine(model, adapters, dtype, chat_template, quantize, device), model, adapters,
                    api_key=api_key, max_rows=max_rows, max_request_bytes=max_request_bytes, cors=cors,
                    allow_remote_images=allow_remote_images)
    if rag:  # the last user message retrieves from this index (see rag/prompt.py)
        from ..rag.prompt import load_augmenter

        server.rag = load_augmenter(rag, rag_k, rag_mode, rag_template)
    names = ", ".join(server.names())
    log.info(f"serving {names} at http://{host}:{port}/v1" + (" (API key required)" if api_key else ""))
    uvicorn.run(create_app(server), host=host, port=port, log_level="warning", access_log=False)
