"""vLLM as a generation backend: rollouts for ppo / grpo (`generation.backend: vllm`) and `serve --backend vllm`.

Rollouts (`VLLMGenerator`): one `vllm.LLM` in the training process, on the training GPU (colocated; it takes
`generation.vllm_gpu_memory_utilization` of the GPU's memory). Before every rollout the policy's current weights
are loaded into it (`sync`): with LoRA the adapter is merged into a copy of the weights named as the base model's
(peft's merge_adapter / unmerge_adapter around the read), so vLLM always serves a plain model of the base's
architecture. `generate(prompts, params)` answers like `Engine.generate`: n completions per prompt, in order,
with the sampler's log-probs (vLLM's `processed_logprobs`: under logits / temperature, like the engine's). vLLM's
kernels and dtype give log-probs that differ from the trainer's; rl/ measures the difference
(`sampler_logprob_diff`) and corrects the policy gradient with truncated importance sampling
(losses.truncated_importance_weights, `generation.tis_cap`).

Serving (`serve_vllm`): runs vLLM's OpenAI-compatible server (`vllm.entrypoints.openai.api_server`) with the
options mapped (model, LoRA adapters, host, port, API key, chat template, dtype, max rows = max_num_seqs, CORS).

This module needs vLLM (and a CUDA GPU) only when used; `require_vllm` is the one-line error otherwise. It could
not be run on the CPU machine this was written on: the code follows vLLM's documented entry points (LLM,
SamplingParams, TokensPrompt, load_weights on the driver worker's model, the api_server's flags).
"""
from __future__ import annotations

import os
import subprocess
import sys

from ..engine import Completion, SamplingParams
from ..errors import ConfigError


def require_vllm(what: str):
    """vllm, imported; a one-line ConfigError naming `what` when it cannot be."""
    try:
        import vllm
    except Exception as exc:  # noqa: BLE001 - ImportError, or a CUDA library that fails to load
        raise ConfigError(f"{what} needs vLLM, which cannot be imported here ({type(exc).__name__}: {exc}); "
                          "install it on a Linux machine with a CUDA GPU (pip install vllm) or use the engine "
                          "backend") from None
    return vllm


class VLLMGenerator:
    """`Engine.generate`'s interface over a colocated vllm.LLM (see the module docstring)."""

    def __init__(self, model_dir: str, tokenizer, stop_token_ids: list[int], *, gpu_memory_utilization: float = 0.3,
                 max_model_len: int | None = None, dtype: str = "auto", seed: int = 0):
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the model must live in this process
        vllm = require_vllm("generation.backend: vllm")
        self.tokenizer = tokenizer
        self.stop_token_ids = list(stop_token_ids)
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.llm = vllm.LLM(model=str(model_dir), dtype=dtype, gpu_memory_utilization=gpu_memory_utilization,
                            max_model_len=max_model_len, seed=seed, enable_prefix_caching=True,
                            logprobs_mode="processed_logprobs")

    def sync(self, model) -> None:
        """Load the policy's current weights into vLLM (LoRA merged)."""
        merged = hasattr(model, "merge_adapter")
        if merged:
            model.merge_adapter()
        try:
            weights = [(name, param.detach()) for name, param in _plain_names(model)]
            self._vllm_model().load_weights(weights)
        finally:
            if merged:
                model.unmerge_adapter()
        self.llm.reset_prefix_cache()

    def _vllm_model(self):
        engine = self.llm.llm_engine
        for path in ("model_executor.driver_worker.worker.model_runner.model",
                     "model_executor.driver_worker.model_runner.model"):
            target = engine
            try:
                for part in path.split("."):
                    target = getattr(target, part)
                return target
            except AttributeError:
                continue
        raise ConfigError("this vLLM version does not expose its model in-process (needed to load the trained "
                          "weights); use the vLLM version pinned in constraints.txt")

    def generate(self, prompts: list[list[int]], params: SamplingParams, max_rows: int | None = None) -> list[Completion]:
        from vllm import SamplingParams as VLLMParams
        from vllm.inputs import TokensPrompt

        if params.top_logprobs or params.min_tokens or params.logit_bias:
            raise ConfigError("generation.backend vllm: top_logprobs, min_tokens and logit_bias are engine-only here")
        sampling = VLLMParams(n=params.n, temperature=params.temperature, top_p=params.top_p,
                              top_k=params.top_k if params.top_k > 0 else -1, max_tokens=params.max_new_tokens,
                              stop=list(params.stop) or None, stop_token_ids=self.stop_token_ids, seed=params.seed,
                              presence_penalty=params.presence_penalty, frequency_penalty=params.frequency_penalty,
                              ignore_eos=params.ignore_eos, logprobs=0, skip_special_tokens=True)
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], sampling,
                                    use_tqdm=False)
        completions = []
        for index, (prompt, output) in enumerate(zip(prompts, outputs)):
            for sample in output.outputs:
                tokens = list(sample.token_ids)
                logprobs = [step[token].logprob for token, step in zip(tokens, sample.logprobs or [])]
                completions.append(Completion(index, tokens, sample.text, logprobs,
                                              "stop" if sample.finish_reason == "stop" else "length",
                                              prompt_tokens=len(prompt)))
        return completions


def _plain_names(model):
    """(name, parameter) with the names of the plain base model: peft's prefixes and LoRA's own tensors dropped."""
    for name, param in model.named_parameters():
        if "lora_" in name or "modules_to_save" in name:
            continue
        name = name.removeprefix("base_model.model.").replace(".base_layer.", ".")
        yield name, param


def serve_vllm(model: str, adapters: dict[str, str], *, host: str, port: int, api_key: str | None,
               chat_template: str | None, dtype: str, max_rows: int, cors: list[str] | None) -> None:
    """Run vLLM's OpenAI-compatible server in the foreground with our options mapped to its flags."""
    require_vllm("posttrain serve --backend vllm")
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model,
               "--served-model-name", model, "--host", host, "--port", str(port), "--dtype", dtype,
               "--max-num-seqs", str(max_rows)]
    if api_key:
        command += ["--api-key", api_key]
    if chat_template:
        command += ["--chat-template", chat_template]
    if adapters:
        command += ["--enable-lora", "--lora-modules", *[f"{name}={path}" for name, path in adapters.items()]]
    if cors:
        import json

        command += ["--allowed-origins", json.dumps(cors)]
    raise SystemExit(subprocess.call(command))
