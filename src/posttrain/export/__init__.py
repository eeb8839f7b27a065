"""`posttrain export`: a trained model (optionally base + LoRA adapter) in the format a server runs.

- hf.py: merged Hugging Face directory (`from_pretrained(out)` works; vLLM, TGI, transformers).
- gguf.py: one GGUF file for llama.cpp / Ollama (f16, bf16, q8_0, q4_0); ollama.py writes a Modelfile.
- vllm.py: the adapter itself, checked for what vLLM's LoRA loader accepts.
"""
from __future__ import annotations

from pathlib import Path

from ..errors import ConfigError

FORMATS = ("hf", "gguf", "vllm")


def export(model: str, out: str, *, adapter: str | None = None, format: str = "hf", quant: str = "f16",
           ollama: bool = False, trust_remote_code: bool = False) -> list[str]:
    """Write the export; returns the lines to show the user (what was written, notes)."""
    if format not in FORMATS:
        raise ConfigError(f"--format {format}: choose one of {', '.join(FORMATS)}")
    if ollama and format != "gguf":
        raise ConfigError("--ollama needs --format gguf (Ollama runs GGUF files)")
    if format == "hf":
        from .hf import merge_adapter

        if adapter is None:
            raise ConfigError("--format hf needs --adapter (the model directory itself is already in HF format)")
        return [f"merged {adapter} into {model} -> {merge_adapter(model, adapter, out, trust_remote_code)}"]
    if format == "vllm":
        from .vllm import export_adapter

        if adapter is None:
            raise ConfigError("--format vllm exports a LoRA adapter: give --adapter (vLLM serves a plain model "
                              "directory as it is)")
        path, line = export_adapter(model, adapter, out)
        return [f"vLLM-ready adapter -> {path}", f"serve it with: {line}"]
    from .gguf import QUANTS, write_gguf
    from .hf import load_merged

    if quant not in QUANTS:  # before the slow model load
        raise ConfigError(f"--quant {quant}: not supported (choose {', '.join(QUANTS)}; k-quants such as q4_k_m "
                          f"come from llama.cpp's llama-quantize run on the f16 file)")
    if not out.endswith(".gguf"):
        raise ConfigError(f"--out {out}: give a file name ending in .gguf")
    network, tokenizer = load_merged(model, adapter, trust_remote_code)
    path = write_gguf(network, tokenizer, out, quant, name=Path(adapter or model).name)
    lines = [f"wrote {path} ({quant}, {path.stat().st_size / 2**20:.1f} MiB)"]
    if ollama:
        from .ollama import write_modelfile

        modelfile, note = write_modelfile(path, tokenizer)
        lines.append(f"wrote {modelfile}: `ollama create NAME -f {modelfile}` then `ollama run NAME`")
        if note:
            lines.append(f"note: {note}")
    return lines
