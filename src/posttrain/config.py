"""The one config system: pydantic models per section, YAML files, dotted command-line overrides.

Every field carries a description; `posttrain config-reference` renders them into docs/config.md.
Unknown keys are rejected with the closest valid name; wrong types get a message naming the key.
"""
from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataSource(Section):
    """One dataset entry in `data.train` / `data.eval`, when more than a path is needed."""

    path: str = Field(description="File (json, jsonl, csv, parquet, txt), saved `datasets` directory, "
                                  "hub name, or a dataset name from `data.dataset_info`.")
    format: Literal["auto", "alpaca", "sharegpt", "messages", "prompt_completion", "text", "classification",
                    "preference", "preference_alpaca", "preference_sharegpt", "feedback", "ranking"] = Field(
        "auto", description="Row format; `auto` detects it from the columns.")
    columns: dict[str, str] | None = Field(
        None, description="Column renames, canonical name -> column in the file (as in LLaMA-Factory's `columns`).")
    max_samples: int | None = Field(None, ge=1, description="Use at most this many rows of this source.")


class DataConfig(Section):
    train: str | DataSource | list[str | DataSource] = Field(
        description="Training data: a path or a list of paths/sources; several sources are concatenated (mixed).")
    eval: str | DataSource | list[str | DataSource] | None = Field(
        None, description="Evaluation data (a separate file); alternatively use `eval_fraction`.")
    eval_fraction: float = Field(0.0, ge=0.0, lt=1.0,
                                 description="Hold out this fraction of the training rows for evaluation "
                                             "(seeded by `train.seed`). Ignored when `eval` is given.")
    dataset_info: str | None = Field(
        None, description="Path to a LLaMA-Factory `dataset_info.json`; `train`/`eval` entries may then be "
                          "dataset names from it (file_name, formatting, columns and tags are honoured).")
    max_prompt_length: int | None = Field(
        None, ge=1, description="rm/dpo/kto: when prompt + response exceed `max_length`, keep only the last "
                                "this-many prompt tokens (default max_length // 2), then cut responses to fit. "
                                "ppo/grpo: prompts longer than this keep their last this-many tokens (counted; "
                                "default max_length - generation.max_new_tokens).")
    max_length: int = Field(1024, ge=8, description="Maximum tokens per example; longer ones are truncated "
                                                    "(counted and reported). For `pt`, long texts are split into "
                                                    "chunks of this length instead.")
    train_on_prompt: bool = Field(False, description="Train on every token, not only the assistant turns.")
    packing: bool = Field(False, description="Pack several examples into each row of `max_length` tokens "
                                            "(pt/sft), with attention isolated per example.")
    skip_invalid: bool = Field(False, description="Skip malformed rows (counted and reported by reason) "
                                                 "instead of stopping at the first one.")
    keep_reasoning: bool = Field(
        False, description="sft: train the reasoning (<think> blocks) that the chat template drops from earlier "
                            "assistant turns (Qwen3 and DeepSeek-R1-style templates write it only in the final "
                            "turn). Each such turn becomes a sequence of its own: the chat rendered up to that turn "
                            "as the final one, only that turn trained, as the model sees it when it answers there "
                            "(one extra sequence per such turn). Off: that reasoning is not trained (counted and "
                            "warned).")
    text_split: Literal["auto", "paragraph", "line", "file"] = Field(
        "auto", description="How a .txt file is cut into documents: `paragraph` at blank lines, `line` at every "
                            "line, `file` the whole file as one; `auto` at blank lines, or at every line in a file "
                            "that has none (as LLaMA-Factory reads .txt; said in the data report).")
    labels: list[str] | None = Field(
        None, description="classify: the label set, in id order. Default: the sorted labels found in the "
                          "training data. A label outside the set is an error.")
    max_samples: int | None = Field(None, ge=1, description="Use at most this many training rows in total.")


class TrainConfig(Section):
    max_steps: int | None = Field(None, ge=1, description="Optimizer steps to run; overrides `epochs` when set.")
    epochs: float = Field(1.0, gt=0, description="Passes over the training data (when `max_steps` is unset).")
    batch_size: int = Field(8, ge=1, description="Examples (or packed rows) per micro-batch.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches accumulated per optimizer step.")
    lr: float = Field(5e-5, gt=0, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay (not applied to biases and norms).")
    adam_betas: tuple[float, float] = Field((0.9, 0.999), description="AdamW betas.")
    warmup_ratio: float = Field(0.0, ge=0, le=1, description="Fraction of the steps spent warming up linearly.")
    warmup_steps: int | None = Field(None, ge=0, description="Warmup steps; overrides `warmup_ratio`.")
    scheduler: Literal["cosine", "linear", "constant"] = Field("cosine", description="Decay after warmup.")
    max_grad_norm: float | None = Field(1.0, gt=0, description="Clip the gradient norm to this; null = no clip.")
    seed: int = Field(42, description="Seed for initialisation, data order and dropout (reproducible on CPU).")
    bf16: bool | Literal["auto"] = Field(
        False, description="bf16 autocast; weights and optimizer stay fp32. `auto`: on where bf16 is fast (a GPU "
                           "that supports it, a CPU with AMX or AVX512-BF16), off elsewhere (on a CPU without "
                           "them bf16 is emulated and many times slower than fp32).")
    group_by_length: bool | None = Field(
        None, description="Batch examples of similar length together (less padding); batches are shuffled. "
                          "Default: on, except for ppo and grpo, whose prompt batches are drawn at random (the "
                          "padding saved is small next to generation, and prompts of one length are often one "
                          "kind of task: a whole batch of easy or of hard prompts).")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward pass (every "
                                                            "trained model: the policy and a separate PPO critic).")
    optim: Literal["adamw", "adamw_8bit"] = Field(
        "adamw", description="`adamw`: torch AdamW (fused). `adamw_8bit`: bitsandbytes' 8-bit AdamW (the two moment "
                             "states in 8 bits: 2 bytes per parameter instead of 8); needs bitsandbytes (`pip install "
                             "'posttrain[gpu]'`). Not under DeepSpeed, which brings its own optimizer "
                             "handling.")
    log_steps: int = Field(1, ge=1, description="Write a metrics line every N optimizer steps.")
    eval_steps: int | None = Field(None, ge=1, description="Evaluate every N steps (and at the end). "
                                                          "Default: at the end of every epoch.")
    save_steps: int | None = Field(None, ge=1, description="Write a checkpoint every N steps.")
    save_total_limit: int = Field(2, ge=1, description="Keep only the newest K checkpoints.")
    early_stopping_patience: int | None = Field(
        None, ge=1, description="Stop when `metric_for_best` has not improved for this many evaluations; the "
                                "weights of the best evaluation are restored before the result is written.")
    metric_for_best: str = Field("eval_loss", description="Eval metric watched by early stopping "
                                                          "(e.g. eval_loss, eval_accuracy, eval_macro_f1).")
    greater_is_better: bool | None = Field(None, description="Direction of `metric_for_best`; default: "
                                                             "lower is better for losses, higher otherwise.")
    tensorboard: bool = Field(False, description="Also log to TensorBoard (OUT/tensorboard) via accelerate.")
    disable_dropout: bool = Field(True, description="Turn the model's dropout off (as TRL does): preference losses "
                                                    "compare log-probs of the same tokens (DPO's first loss is ln 2 "
                                                    "only without dropout) and RL needs the sampled policy to be "
                                                    "the one it scores (ppo/grpo turn it off whatever this says). "
                                                    "false keeps the model's dropout; LoRA's own `adapter.dropout` "
                                                    "is applied either way.")


class AdapterConfig(Section):
    type: Literal["none", "lora"] = Field("none", description="`lora` trains a LoRA adapter through peft.")
    r: int = Field(8, ge=1, description="LoRA rank.")
    alpha: float = Field(16, gt=0, description="LoRA alpha (scale alpha/r, or alpha/sqrt(r) with rslora).")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the LoRA input.")
    target: Literal["all-linear"] | list[str] = Field(
        "all-linear", description="Modules to adapt: `all-linear` or a list of module names "
                                  "(q_proj, v_proj, c_attn, ...). Linear and GPT-2's Conv1D are supported.")
    rslora: bool = Field(False, description="Rank-stabilised scaling alpha/sqrt(r).")
    use_dora: bool = Field(False, description="DoRA: the weight split into a magnitude and a direction, LoRA "
                                              "adapting the direction (peft use_dora). vLLM does not serve DoRA "
                                              "adapters; merged exports (hf, gguf) are fine.")
    quantize: Literal["4bit", "8bit"] | None = Field(
        None, description="QLoRA: load the frozen base through bitsandbytes (4bit: NF4, double quantisation, "
                          "bf16 compute; 8bit: LLM.int8) and train LoRA on top. Needs a CUDA GPU.")

    @model_validator(mode="after")
    def _lora_only(self) -> "AdapterConfig":
        if self.type != "lora" and (self.quantize or self.use_dora):
            raise ValueError("adapter.quantize and adapter.use_dora need adapter.type: lora")
        return self


class FreezeConfig(Section):
    trainable_layers: int | None = Field(
        None, ge=1, description="Freeze fine-tuning: train only the top N transformer layers (plus the final "
                                "norm and any task head). Null = off (full fine-tuning).")
    gradual_unfreeze: bool = Field(False, description="Unfreeze `trainable_layers` more layers (top-down) at "
                                                      "the start of every further epoch.")
    train_embeddings: bool = Field(False, description="Also train the token embeddings (and a tied LM head).")
    vision_tower: bool = Field(True, description="Vision-language models: keep the vision encoder's weights fixed "
                                                 "(full and freeze fine-tuning), and put no LoRA adapters in it.")
    projector: bool = Field(True, description="Vision-language models: keep the projector (vision features into "
                                              "the language model: LLaVA's multi_modal_projector, Qwen2-VL's "
                                              "merger) fixed, and put no LoRA adapters in it. Both true: only the "
                                              "language model is trained (with LoRA: adapted); both false: all of it.")


class RewardConfig(Section):
    center_coef: float = Field(0.0, ge=0, description="Reward centering: adds c * mean((r_chosen + r_rejected)^2) "
                                                      "to the loss (about 0.01 when used).")
    prefix_sharing: bool | Literal["auto"] = Field(
        "auto", description="Run the shared prompt once per pair instead of twice (same rewards and gradients, "
                            "fewer tokens). `auto`: on where it is exact, i.e. with sdpa or eager attention (an "
                            "explicit attention mask); off for kernels that cannot take one (flash attention).")


class ReferenceConfig(Section):
    reference: Literal["auto", "adapter", "copy", "precompute"] = Field(
        "auto", description="The reference model: `adapter` = the base with the LoRA adapter disabled (no copy), "
                            "`copy` = a frozen copy in memory, `precompute` = reference log-probs computed once "
                            "before training (no reference model in memory while training). `auto`: adapter "
                            "with LoRA, else precompute.")
    precompute_reference: bool = Field(False, description="Shorthand for `reference: precompute`.")

    @property
    def strategy(self) -> str:
        return "precompute" if self.precompute_reference else self.reference


class DPOConfig(ReferenceConfig):
    beta: float = Field(0.1, gt=0, description="Strength of the implicit KL constraint (ORPO: the weight of the "
                                               "odds-ratio term; SimPO: the reward scale).")
    loss: Literal["sigmoid", "ipo", "hinge", "robust", "simpo", "orpo"] = Field(
        "sigmoid", description="sigmoid (DPO), ipo, hinge, robust (label smoothing, unbiased), simpo "
                               "(length-normalised, no reference, margin `simpo_gamma`), orpo (no reference; "
                               "NLL of the chosen response + odds ratio).")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="sigmoid (cDPO) and robust: probability that a "
                                                                  "preference label is flipped.")
    simpo_gamma: float = Field(0.5, description="SimPO target reward margin.")
    sft_weight: float | None = Field(None, ge=0, description="Adds this times the mean token NLL of the chosen "
                                                            "response (each pair's own token mean, averaged over "
                                                            "pairs; TRL's ORPO takes one token mean over prompt and "
                                                            "response tokens of the batch). Default: 1 for orpo, 0 "
                                                            "otherwise.")
    prefix_sharing: bool | Literal["auto"] = Field(
        "auto", description="Run the shared prompt once per pair instead of twice (same losses and gradients, "
                            "fewer tokens). `auto`: on where it is exact, i.e. with sdpa or eager attention (an "
                            "explicit attention mask); off for kernels that cannot take one (flash attention).")


class KTOConfig(ReferenceConfig):
    beta: float = Field(0.1, gt=0, description="KTO beta.")
    desirable_weight: float = Field(1.0, gt=0, description="Weight of desirable examples (lambda_D).")
    undesirable_weight: float = Field(1.0, gt=0, description="Weight of undesirable examples (lambda_U).")


class GenerationConfig(Section):
    """Sampling of the online stages' rollouts (ppo, grpo); evaluation decodes greedily."""

    max_new_tokens: int = Field(64, ge=1, description="Most tokens sampled per response; a response cut here "
                                                      "has no end-of-turn token (see `ppo.missing_eos_penalty`).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature; the update scores tokens under "
                                                      "logits / temperature too.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling (1: off).")
    top_k: int = Field(0, ge=0, description="Top-k sampling (0: off).")
    stop: list[str] = Field(default_factory=list, description="Stop strings (end-of-turn and EOS always stop).")
    batch_size: int | None = Field(None, ge=1, description="Most prompts decoded at once (each with all its samples; "
                                                           "a finished sample's place goes to a waiting one); "
                                                           "default: every prompt of the step at once.")
    backend: Literal["engine", "vllm"] = Field(
        "engine", description="Who samples the rollouts: `engine` = posttrain's own (any device); `vllm` = vLLM on "
                              "the training GPU (needs vLLM installed; the policy's weights are loaded into it "
                              "before every rollout, LoRA merged).")
    vllm_gpu_memory_utilization: float = Field(0.3, gt=0, lt=1, description="backend vllm: the share of the GPU's "
                                                                            "memory vLLM takes next to training.")
    tis_cap: float | None = Field(None, gt=0, description="Truncated importance sampling: multiply each token's "
                                                          "policy-gradient loss by min(pi_trainer / pi_sampler, cap) "
                                                          "(losses.truncated_importance_weights), correcting for "
                                                          "a sampler whose log-probs differ from the trainer's "
                                                          "(vLLM: 2.0 is the usual cap). null: off. The mismatch "
                                                          "is logged either way (`sampler_logprob_diff`).")


def resolve_reference(setting: str, method: str, online: bool) -> str:
    """The reference strategy a stage uses (reference.py implements them). `auto`: adapter with LoRA; else
    precompute for the offline stages (their examples are known up front), copy for ppo/grpo (their samples
    are new every step)."""
    if setting == "auto":
        return "adapter" if method == "lora" else ("copy" if online else "precompute")
    if setting == "adapter" and method != "lora":
        raise ValueError("reference: adapter needs adapter.type: lora (use copy or precompute otherwise)")
    if setting == "precompute" and online:
        raise ValueError("reference: precompute is for offline stages (ppo and grpo sample new answers every step)")
    if setting not in ("adapter", "copy", "precompute"):
        raise ValueError(f"unknown reference strategy {setting!r}")
    return setting


class RLConfig(Section):
    reference: Literal["auto", "adapter", "copy"] = Field(
        "auto", description="The KL reference: `adapter` = the base with the LoRA adapter disabled (no copy), "
                            "`copy` = a frozen copy of the starting model. `auto`: adapter with LoRA, else copy.")
    epochs: int = Field(1, ge=1, description="Passes over each rollout batch (old log-probs are computed once "
                                             "per rollout).")
    mini_batches: int = Field(1, ge=1, description="Optimizer updates per pass: the rollout batch is cut into "
                                                   "this many shuffled mini-batches.")
    clip: float = Field(0.2, gt=0, description="Policy ratio clip epsilon (lower side, and upper unless "
                                               "`clip_high`).")
    clip_high: float | None = Field(None, gt=0, description="Upper clip epsilon (asymmetric clipping, e.g. "
                                                             "0.28 as in DAPO); default: `clip`.")
    skip_invalid_rewards: bool = Field(False, description="A reward source that fails or returns None for a "
                                                          "completion scores it 0 (counted in `reward/skipped`) "
                                                          "instead of stopping.")

    @property
    def strategy(self) -> str:
        return self.reference


class PPOConfig(RLConfig):
    epochs: int = Field(4, ge=1, description="PPO epochs over each rollout batch.")
    kl_coef: float = Field(0.05, ge=0, description="beta of the per-token KL penalty -beta * (log pi - log "
                                                   "pi_ref) in the reward (start value when adaptive).")
    adaptive_kl: bool = Field(False, description="Adapt beta towards `target_kl` (Ziegler et al.).")
    target_kl: float = Field(6.0, gt=0, description="Adaptive controller: target KL per response (nats).")
    kl_horizon: int = Field(10000, ge=1, description="Adaptive controller horizon.")
    gamma: float = Field(1.0, ge=0, le=1, description="GAE discount.")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda.")
    value_clip: float | None = Field(0.2, gt=0, description="Value clip range around the rollout's values "
                                                            "(null: no clipping).")
    vf_coef: float = Field(1.0, ge=0, description="Weight of the value loss. With a value head on the policy it "
                                                  "sets how much the shared body learns for the critic (0.1 left "
                                                  "the critic explaining none of the returns' variance on a rule "
                                                  "reward; 1.0 learnt); a separate critic has its own optimizer "
                                                  "state and clipping, so the weight matters little there.")
    critic_warmup_steps: int = Field(0, ge=0, description="Rollouts at the start on which only the critic is "
                                                          "updated (the policy's gradients are dropped), so the "
                                                          "policy's first updates use values that mean something.")
    value_lr: float | None = Field(None, gt=0, description="Learning rate of the critic (the value head or the "
                                                           "separate value model), on the same schedule; null: 10 x "
                                                           "train.lr (a critic has to fit the returns faster than "
                                                           "the policy moves).")
    value_model: str = Field(
        "auto", description="The critic: `head` = a value head on the policy's hidden states (shares the body), "
                            "`reward` = a separate value model initialised from the reward model in `rewards`, "
                            "or a directory to initialise a separate value model from (a reward model or a "
                            "causal LM). `auto`: `reward` when `rewards` has a model source, else `head`.")
    missing_eos_penalty: float | None = Field(None, description="Added to the score of a response that ends "
                                                                "without an end-of-turn token (null: none). -1 is the "
                                                                "usual choice with a reward model that favours long "
                                                                "answers (Huang et al. 2024).")
    whiten_rewards: bool = Field(False, description="Whiten the per-token rewards before GAE.")
    normalize_scores: bool = Field(True, description="Standardise each response's score by the running mean and "
                                                     "std of all scores so far (kept in checkpoints) before the KL "
                                                     "penalty is subtracted: kl_coef then weighs the KL against a "
                                                     "unit-variance score whatever the reward's scale (a vowel share "
                                                     "of 0.2 ± 0.05 or a reward model's ±3).")


class GRPOConfig(RLConfig):
    num_generations: int = Field(8, ge=2, description="Completions sampled per prompt (the group).")
    baseline: Literal["grpo", "rloo", "reinforce++"] = Field(
        "grpo", description="grpo: r - group mean (scaled per `scale`); rloo: r - mean of the other completions; "
                            "reinforce++: r - group mean, whitened over the batch.")
    scale: Literal["group", "batch", "none"] = Field(
        "group", description="grpo baseline: divide by the group's reward std, the batch's, or not at all.")
    loss: Literal["token_mean", "sequence_mean"] = Field(
        "token_mean", description="Average the per-token loss over all tokens of the update (DAPO) or first "
                                  "within each completion (original GRPO).")
    kl_coef: float = Field(0.0, ge=0, description="beta of the k3 KL penalty to the reference in the loss.")
    track_kl: bool = Field(True, description="Measure the KL to the reference every step even when kl_coef is "
                                             "0 (one extra no-grad forward per rollout).")
    missing_eos_penalty: float | None = Field(None, description="Added to the reward of a completion that ends "
                                                                "without an end-of-turn token (null: none).")


class EmbedConfig(Section):
    temperature: float = Field(0.05, gt=0, description="InfoNCE temperature tau: similarities are cosines / tau.")
    pooling: Literal["auto", "mean", "cls"] = Field(
        "auto", description="A text's vector: the mean of its token states or its first ([CLS]) token's state. "
                            "`auto`: what the model directory's sentence-transformers config says, else mean.")


class Config(Section):
    stage: Literal["pt", "sft", "classify", "rm", "dpo", "kto", "ppo", "grpo", "embed"] = Field(
        description="What to train: `pt` continued pretraining on raw text, `sft` supervised fine-tuning, "
                    "`classify` text classification, `rm` a reward model from preference pairs, `dpo` the DPO "
                    "family on preference pairs, `kto` KTO on unpaired desirable/undesirable examples, `ppo` "
                    "RLHF with PPO and `grpo` GRPO/RLOO/REINFORCE++ on prompts scored by `rewards`; `embed` a "
                    "text embedder for RAG retrieval (contrastive, on query/positive pairs).")
    model: str = Field(description="Model directory or hub id (AutoModelForCausalLM, or "
                                   "AutoModelForSequenceClassification for classify).")
    output_dir: str = Field(description="Where the result lands: the model or adapter itself, with "
                                        "config.yaml, metrics.jsonl, summary.json, plots/ and checkpoints/.")
    resume: str | None = Field(None, description="`auto`: continue from the newest complete checkpoint in "
                                                 "output_dir (start fresh if none; a finished run is left as it "
                                                 "is); or a checkpoint path.")
    overwrite_output_dir: bool = Field(False, description="Allow a new run to replace what an earlier run left "
                                                          "in output_dir (a finished model, or the checkpoints "
                                                          "of an unfinished one); `posttrain train --overwrite`.")
    chat_template: str | None = Field(None, description="Jinja chat template (inline, or a path to a .jinja "
                                                        "file). It replaces the tokenizer's own template, if it has "
                                                        "one, for training and in the saved tokenizer.")
    trust_remote_code: bool = Field(False, description="Allow model code from the model directory / hub.")
    attn_implementation: str | None = Field(None, description="sdpa, eager, flash_attention_2, ... "
                                                              "Default: transformers' choice.")
    device: str = Field("auto", description="Where the models live: `auto` (a CUDA GPU, else Apple MPS, else the "
                                            "CPU), `cuda`, `cuda:N`, `mps` or `cpu`. Under `accelerate launch` each "
                                            "process takes its own GPU. A device this machine lacks is an error.")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field(
        "auto", description="The dtype weights are loaded in. `auto`: trained weights in fp32 (the master copy under "
                            "train.bf16 autocast), frozen copies (reference, reward model) in the compute dtype "
                            "(bf16 under train.bf16, else fp32). `bf16`: every weight in bf16: pure bf16 training "
                            "(AdamW state in bf16 too, half the memory of fp32 master weights); with LoRA the frozen "
                            "base is bf16 and the adapter fp32. `fp16`: for GPUs without bf16: frozen weights and a "
                            "LoRA base in fp16 (full fine-tuning of fp16 weights is refused). `fp32`: all fp32. bf16 "
                            "on a CPU without native bf16, or fp16 on a CPU, is an error.")
    data: DataConfig
    train: TrainConfig = Field(default_factory=TrainConfig)
    adapter: AdapterConfig = Field(default_factory=AdapterConfig)
    freeze: FreezeConfig = Field(default_factory=FreezeConfig)
    rm: RewardConfig = Field(default_factory=RewardConfig)
    dpo: DPOConfig = Field(default_factory=DPOConfig)
    kto: KTOConfig = Field(default_factory=KTOConfig)
    rewards: list[dict[str, Any]] = Field(
        default_factory=list, description="ppo/grpo: reward sources, summed with weights: `{builtin: "
                                          "answer_match, column: answer}`, `{function: \"file.py:fn\"}`, "
                                          "`{model: DIR}`, `{http: URL}`, each with optional `weight`, `name`.")
    generation: GenerationConfig = Field(default_factory=GenerationConfig)
    ppo: PPOConfig = Field(default_factory=PPOConfig)
    grpo: GRPOConfig = Field(default_factory=GRPOConfig)
    embed: EmbedConfig = Field(default_factory=EmbedConfig)

    @field_validator("resume", mode="before")
    @classmethod
    def _resume(cls, value):
        return None if value in (None, False, "", "none", "false", "False") else value

    @model_validator(mode="after")
    def _combinations(self) -> "Config":
        if self.adapter.type == "lora" and self.freeze.trainable_layers is not None:
            raise ValueError("choose one of adapter.type=lora and freeze.trainable_layers, not both")
        if self.freeze.gradual_unfreeze and self.freeze.trainable_layers is None:
            raise ValueError("freeze.gradual_unfreeze needs freeze.trainable_layers")
        if self.data.packing and self.stage not in ("pt", "sft"):
            raise ValueError("data.packing applies to pt and sft only")
        if self.stage == "embed" and self.adapter.type == "lora":
            raise ValueError("stage embed trains the whole encoder or its top layers (freeze.trainable_layers), "
                             "not a LoRA adapter")
        if self.train.group_by_length is None:
            self.train.group_by_length = self.stage not in ("ppo", "grpo")
        if self.stage in ("ppo", "grpo"):
            if not self.rewards:
                raise ValueError(f"stage {self.stage} needs `rewards:` (a list of reward sources)")
        elif self.rewards:
            raise ValueError(f"`rewards:` is for stages ppo and grpo, not {self.stage}")
        if self.stage in ("dpo", "kto", "ppo", "grpo"):
            resolve_reference(getattr(self, self.stage).strategy, self.method, online=self.stage in ("ppo", "grpo"))
        return self

    @property
    def method(self) -> str:
        if self.adapter.type == "lora":
            return "lora"
        return "freeze" if self.freeze.trainable_layers is not None else "full"


# ---------------------------------------------------------------- loading, overrides, errors

def _parse_value(text: str) -> Any:
    """Command-line values are YAML scalars/lists: 3, 1e-4, true, null, [q_proj, v_proj]."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form section.key=value")
        key, value = item.split("=", 1)
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[parts[-1]] = _parse_value(value)
    return raw


def _model_at(path: tuple) -> type[BaseModel] | None:
    model: Any = Config
    for part in path:
        if not (isinstance(model, type) and issubclass(model, BaseModel)) or part not in model.model_fields:
            return None
        annotation = model.model_fields[part].annotation
        model = next((t for t in getattr(annotation, "__args__", (annotation,))
                      if isinstance(t, type) and issubclass(t, BaseModel)), annotation)
    return model if isinstance(model, type) and issubclass(model, BaseModel) else None


def _describe(error: dict) -> str:
    loc = tuple(p for p in error["loc"] if not isinstance(p, int))
    # pydantic reports union members as extra path parts ("str", "DataSource"); drop type names
    loc = tuple(p for p in loc if not (p[:1].isupper() or "[" in p or p in ("str", "int", "float", "bool")))
    name = ".".join(str(p) for p in loc)
    if error["type"] == "extra_forbidden":
        parent = _model_at(loc[:-1])
        valid = list(parent.model_fields) if parent else []
        close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
        hint = f"; did you mean '{'.'.join(map(str, loc[:-1] + (close[0],)))}'?" if close else ""
        return f"unknown key '{name}'{hint}" + (f" (valid: {', '.join(valid)})" if not close and valid else "")
    if error["type"] == "missing":
        return f"missing required key '{name}'"
    if not name:  # a rule about several keys at once
        return error["msg"].removeprefix("Value error, ")
    got = error.get("input")
    shown = repr(got) if not isinstance(got, dict) else "a mapping"
    return f"'{name}': {error['msg']} (got {shown})"


def build_config(raw: dict) -> Config:
    try:
        return Config.model_validate(raw)
    except ValidationError as exc:
        messages = list(dict.fromkeys(_describe(e) for e in exc.errors()))
        # a union type yields one error per member; keep the most specific ones
        specific = [m for m in messages if "unknown key" in m or "missing" in m] or messages
        raise ConfigError("invalid config:\n  " + "\n  ".join(specific[:8])) from None


def read_yaml(path: Path) -> Any:
    """yaml.safe_load of a file; a syntax error is one line with the file, line and column."""
    text = path.read_text()
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        line = text.splitlines()[mark.line] if mark and mark.line < len(text.splitlines()) else ""
        if "'\\t'" in problem or "\t" in line[:len(line) - len(line.lstrip())]:  # yaml shows a tab as '\t'
            problem = "a tab, which YAML does not allow here: indent with spaces"
        raise ConfigError(f"{where}: not valid YAML: {problem}") from None


def load_config(path: str | Path | None, overrides: list[str] = (), base: dict | None = None) -> Config:
    raw: dict = dict(base or {})
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        loaded = read_yaml(path) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of keys")
        raw.update(loaded)
    return build_config(apply_overrides(raw, list(overrides)))


def dump_config(config: Config) -> str:
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


# ---------------------------------------------------------------- reference page

def _type_name(annotation: Any) -> str:
    text = str(annotation).replace("typing.", "").replace("posttrain.config.", "")
    return text.replace("<class '", "").replace("'>", "")


def reference_markdown() -> str:
    lines = ["# Configuration reference", "",
             "Generated from the schema in `src/posttrain/config.py` by `posttrain config-reference`; "
             "do not edit by hand.", "",
             "Every key can be overridden on the command line with its dotted name: "
             "`posttrain train cfg.yaml train.max_steps=6 adapter.target=[q_proj,v_proj]`.", ""]

    def table(model: type[BaseModel], prefix: str) -> None:
        lines.extend(["| key | type | default | description |", "|---|---|---|---|"])
        for name, field in model.model_fields.items():
            if field.is_required():
                default = "required"
            elif field.default_factory is not None:
                default = "(section)"
            else:
                default = f"`{field.default!r}`" if field.default is not None else "`null`"
            type_name = _type_name(field.annotation).replace("|", "\\|")
            lines.append(f"| `{prefix}{name}` | {type_name} | {default} | {field.description or ''} |")
        lines.append("")

    lines += ["## Top level", ""]
    table(Config, "")
    for name in ("data", "train", "adapter", "freeze", "rm", "dpo", "kto", "generation", "ppo", "grpo", "embed"):
        lines += [f"## `{name}`", ""]
        table(Config.model_fields[name].annotation, f"{name}.")
    lines += ["## Data source entries (`data.train` / `data.eval` items)", ""]
    table(DataSource, "")
    return "\n".join(lines)
