"""A LoRA adapter directory in the layout vLLM loads with `--enable-lora --lora-modules NAME=DIR`.

vLLM reads peft's own layout: `adapter_config.json` (peft_type LORA, r, lora_alpha, target_modules,
use_rslora) and `adapter_model.safetensors` with keys `base_model.model.<module>.lora_A.weight` /
`lora_B.weight`. It refuses an adapter that carries `modules_to_save` (full copies of e.g. the embeddings
or a head), DoRA magnitudes (`use_dora`), trained biases (`bias` other than none, unless the server enables
them), and adapters whose rank exceeds `--max-lora-rank` (16 unless raised). `check_adapter` names each
such problem; `export_adapter` copies a clean adapter with its base recorded and prints the serve line.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from ..errors import ConfigError
from .hf import check_adapter_fits, read_adapter_config

VLLM_DEFAULT_MAX_RANK = 16
# modules vLLM applies LoRA to in decoder models: the attention and MLP projections, not embeddings or heads
VLLM_MODULES = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "qkv_proj",
                "gate_up_proj", "c_attn", "c_proj", "c_fc", "dense", "query_key_value", "dense_h_to_4h",
                "dense_4h_to_h", "fc1", "fc2", "out_proj", "w1", "w2", "w3", "wqkv", "wo"}


def check_adapter(adapter: str) -> list[str]:
    """What keeps vLLM from loading this adapter (an empty list when nothing does)."""
    config = read_adapter_config(adapter)
    problems = []
    if config.get("peft_type") != "LORA":
        problems.append(f"peft_type is {config.get('peft_type')}, vLLM loads LORA adapters only")
    if config.get("modules_to_save"):
        problems.append(f"modules_to_save {config['modules_to_save']} (full module copies) is not supported")
    if config.get("use_dora"):
        problems.append("DoRA (use_dora) is not supported; train with adapter.use_dora: false")
    if config.get("bias", "none") != "none":
        problems.append(f"bias '{config['bias']}' needs `--enable-lora-bias` on the server")
    targets = config.get("target_modules") or []
    targets = [targets] if isinstance(targets, str) else list(targets)
    # peft may record full paths (model.layers.0.self_attn.q_proj); vLLM matches the module's own name
    unsupported = sorted({t.rsplit(".", 1)[-1] for t in targets} - VLLM_MODULES)
    if unsupported:
        problems.append(f"target modules {', '.join(unsupported)} are not projections vLLM applies LoRA to")
    if not (Path(adapter) / "adapter_model.safetensors").is_file():
        problems.append("no adapter_model.safetensors")
    return problems


def serve_line(base: str, name: str, adapter_dir: str, rank: int) -> str:
    extra = f" --max-lora-rank {rank}" if rank > VLLM_DEFAULT_MAX_RANK else ""
    return f"vllm serve {base} --enable-lora --lora-modules {name}={adapter_dir}{extra}"


def export_adapter(base: str, adapter: str, out: str) -> tuple[Path, str]:
    """Copy a vLLM-loadable adapter to `out` (its config naming `base`); (out, the `vllm serve` line)."""
    config = read_adapter_config(adapter)
    check_adapter_fits(base, adapter)
    problems = check_adapter(adapter)
    if problems:
        raise ConfigError(f"{adapter} cannot be served by vLLM: {'; '.join(problems)}")
    out_path = Path(out)
    staging = out_path.with_name(f".{out_path.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    shutil.copy2(Path(adapter) / "adapter_model.safetensors", staging / "adapter_model.safetensors")
    config["base_model_name_or_path"] = base
    (staging / "adapter_config.json").write_text(json.dumps(config, indent=2) + "\n")
    if out_path.exists():
        shutil.rmtree(out_path)
    staging.replace(out_path)
    return out_path, serve_line(base, out_path.name, str(out_path), int(config.get("r", 8)))
