"""`posttrain train`: config -> data -> model -> the one loop -> an ecosystem-native output directory.

Order matters for "nothing half-written": the config, tokenizer and every data row are validated and
encoded before anything is written to output_dir; the final model is written to a hidden directory
and moved into place, and summary.json is written last.
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from functools import partial
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedDataParallelKwargs, DistributedType, FullyShardedDataParallelPlugin, set_seed

from . import output_dir
from .config import Config, dump_config
from .data.batching import collate, collate_packed, pack
from .data.encode import encode_all
from .data.formats import load_examples, split_eval
from .data.vision import load_vision, own_positions
from .errors import ConfigError, DataError
from .forward import unwrap
from .modeling import (apply_freeze, apply_lora, count_parameters, disable_dropout, load_model, load_tokenizer,
                       resolve_device, resolve_dtype, save_pretrained, trained_dtype, use_bf16, write_into)
from .plots import overfitting, plot_metrics
from .vlm import freeze_vision, is_vlm, lora_exclusions
from .stages import STAGES, Stage

log = logging.getLogger("posttrain")


IMAGE_STAGES = ("sft", "dpo")  # the stages that read images with a vision-language model


def prepare_data(config: Config, stage: Stage, tokenizer, vision=None) -> dict:
    """Load, normalise and encode train/eval data. Raises DataError before anything is written. `vision` (a
    vision-language model's data/vision.Vision): sft and dpo read the rows' images."""
    data = config.data
    images = vision is not None and stage.name in IMAGE_STAGES
    common = dict(kind=stage.kind, dataset_info=data.dataset_info, skip_invalid=data.skip_invalid,
                  text_split=data.text_split, **({"images": True} if images else {}))
    load = stage.load or load_examples
    train_examples, train_report = load(data.train, max_samples=data.max_samples, **common)
    eval_examples, eval_report = [], None
    if data.eval:
        eval_examples, eval_report = load(data.eval, **common)
    labels = None
    if stage.task == "classify":  # from all rows, before a held-out split can take a rare label away
        labels = data.labels or sorted({e.label for e in train_examples})
        if len(labels) < 2:
            raise DataError(f"classify needs at least 2 labels, found {labels}")
    if not data.eval and data.eval_fraction > 0:
        train_examples, eval_examples = split_eval(train_examples, data.eval_fraction, config.train.seed)
    label2id = {label: i for i, label in enumerate(labels)} if labels else None
    with_vision = {"vision": vision} if images else {}
    if stage.encode is not None:
        encode = partial(stage.encode, tokenizer=tokenizer, config=config, **with_vision)
    else:
        encode = partial(encode_all, tokenizer=tokenizer, stage=stage.name, max_length=data.max_length,
                         train_on_prompt=data.train_on_prompt, label2id=label2id, skip_invalid=data.skip_invalid,
                         keep_reasoning=data.keep_reasoning, **with_vision)
    train_features, train_stats = encode(train_examples)
    eval_features, eval_stats = encode(eval_examples) if eval_examples else ([], None)
    if not train_features:
        raise DataError("no training examples left after encoding")
    check_trained_tokens(data.train, train_features, train_stats)
    return {"train": train_features, "eval": eval_features, "labels": labels,
            "report": {"train_load": train_report.summary(), "train_encode": train_stats.summary(),
                       "eval_load": eval_report.summary() if eval_report else None,
                       "eval_encode": eval_stats.summary() if eval_stats else None,
                       "train_examples": len(train_features), "eval_examples": len(eval_features)}}


def check_trained_tokens(source, features: list[dict], stats) -> None:
    """A run that would train on nothing is an error, never a success with eval_perplexity 1: no trained
    token at all, or 90% or more of the sequences without one (a broken tokenizer, or masks that hide
    every answer)."""
    empty = sum(1 for f in features if "labels" in f and not any(label != -100 for label in f["labels"][1:]))
    if getattr(stats, "trained_tokens", None) == 0 or empty >= 0.9 * len(features):
        raise DataError(f"{source}: the training data gives almost nothing to train on ({stats.summary()}; "
                        f"{empty} of {len(features)} sequences train no token): check the tokenizer (does it "
                        f"encode text?) and data.train_on_prompt")


def build_units(features: list[dict], config: Config, stage: Stage, pad_id: int, attn_implementation: str = "sdpa",
                ctx=None):
    """Training items, how to batch them and their length in tokens: the stage's own collation (pairs),
    single examples with padding, or packed rows."""
    if stage.collate is not None:
        return features, partial(stage.collate, pad_id=pad_id, ctx=ctx), stage.length or (lambda f: len(f["input_ids"]))
    if config.data.packing:
        groups = pack([len(f["input_ids"]) for f in features], config.data.max_length)
        units = [[features[i] for i in g] for g in groups]
        collate_fn = partial(collate_packed, pad_id=pad_id, attn_implementation=attn_implementation)
        return units, collate_fn, lambda u: sum(len(f["input_ids"]) for f in u)
    return features, partial(collate, pad_id=pad_id), lambda f: len(f["input_ids"])


def build_model(config: Config, stage: Stage, tokenizer, labels):
    """The trained model, in modeling.trained_dtype (fp32 master weights, or pure bf16 when `dtype: bf16`); the
    accelerator moves it to the device (and shards it under FSDP / DeepSpeed)."""
    model = load_model(config.model, stage.task, tokenizer=tokenizer, trust_remote_code=config.trust_remote_code,
                       attn_implementation=config.attn_implementation, labels=labels, dtype=trained_dtype(config),
                       quantize=config.adapter.quantize if config.method == "lora" else None)
    if config.train.disable_dropout:  # before LoRA, so that adapter.dropout still applies
        disable_dropout(model)
    vision_model, freeze = is_vlm(model), config.freeze
    if config.method == "lora":  # a VLM's frozen vision parts get no adapters
        exclude = lora_exclusions(model, freeze.vision_tower, freeze.projector) if vision_model else None
        model = apply_lora(model, config.adapter, stage.task, exclude)
    elif config.method == "freeze":
        apply_freeze(model, config.freeze.trainable_layers, config.freeze.train_embeddings)
    if vision_model and config.method != "lora":
        freeze_vision(model, freeze.vision_tower, freeze.projector)
    if config.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if config.method == "lora":
            model.enable_input_require_grads()
    model.train()
    return model


def save_output(model, tokenizer, config: Config, stage: Stage, out_dir: Path, state_dict: dict | None = None,
                vision=None) -> None:
    """Write the result into out_dir through a hidden staging directory (a crash leaves no partial model).
    `state_dict`: the gathered weights of a sharded run (FSDP, DeepSpeed ZeRO-3), written instead of the module's
    own (which holds only this process's shards). `vision`: a VLM's processor files are written beside it."""
    def write(staging: Path) -> None:
        if vision is not None:
            vision.save(staging)
        to_save = model
        if config.method == "lora" and stage.task in ("classify", "reward"):
            if state_dict is not None:  # merging needs whole weights in the module
                model.load_state_dict(state_dict)
            # a classifier must load with AutoModelForSequenceClassification: merge, keep the adapter beside it
            save_pretrained(model, tokenizer, staging / "adapter", stage.task)
            to_save = model.merge_and_unload()
            save_pretrained(to_save, tokenizer, staging, stage.task)
        else:
            save_pretrained(to_save, tokenizer, staging, stage.task, state_dict=state_dict)
        if stage.task == "embed":  # sentence-transformers' files, so the encoder loads there too
            from .rag.embed import resolve_pooling, write_sentence_transformers_layout

            limit = getattr(to_save.config, "max_position_embeddings", None) or config.data.max_length
            write_sentence_transformers_layout(staging, to_save.config.hidden_size,
                                               resolve_pooling(config.model, config.embed.pooling),
                                               min(config.data.max_length, limit))

    write_into(out_dir, write)


# what a previous run may have left in output_dir; a new run (not a resume) removes it first, so that
# e.g. a stale adapter_config.json can never make from_pretrained(output_dir) load an old adapter
PREVIOUS_RUN = ("checkpoints", "plots", "adapter", "tensorboard", "summary.json", "metrics.jsonl", "config.json",
                "generation_config.json", "adapter_config.json", "chat_template.jinja", "special_tokens_map.json",
                "vocab.json", "merges.txt", "README.md")


def clear_previous_run(out_dir: Path) -> None:
    for item in out_dir.iterdir():
        if item.name in PREVIOUS_RUN or item.name.startswith("tokenizer") or item.suffix == ".safetensors" \
                or item.name.endswith(".safetensors.index.json"):
            shutil.rmtree(item) if item.is_dir() else item.unlink()


def machine_kind() -> str:
    """What ran the training, for summary.json: results differ between machines (bf16 or fp32 above all)."""
    from .modeling import fast_bf16

    if torch.cuda.is_available():
        return f"cuda: {torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        cpuinfo = ""
    name = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    flags_line = re.search(r"^flags\s*:\s*(.+)$", cpuinfo, re.M)
    flags = set(flags_line.group(1).split()) if flags_line else set()
    isa = next((label for flag, label in (("amx_bf16", "AMX"), ("avx512_bf16", "AVX512-BF16"),
                                          ("avx512f", "AVX-512"), ("avx2", "AVX2")) if flag in flags), None)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    bf16 = "fast bf16" if fast_bf16() else "no fast bf16"
    return ", ".join(filter(None, [f"cpu: {name.group(1).strip() if name else 'unknown'}", f"{cores} cores", isa,
                                   bf16]))


def run_training(config: Config) -> dict:
    """Train in config.output_dir, holding its lock; a finished run with `resume: auto` is left as it is."""
    out_dir = Path(config.output_dir)
    with output_dir.lock(out_dir):
        finished, resume_from = output_dir.plan(out_dir, config.resume, config.overwrite_output_dir)
        if finished is not None:
            return {**finished, "already_finished": True}  # the CLI says so
        return _train(config, out_dir, resume_from)


def build_accelerator(config: Config, out_dir: Path) -> Accelerator:
    """The run's Accelerator: on `device:`, bf16 autocast under train.bf16 (not with pure bf16 weights), and DDP /
    FSDP2 / DeepSpeed as `accelerate launch --config_file` asked. The dtype is checked against the device here,
    before any model loads."""
    device = resolve_device(config.device, flag="device:")
    if config.dtype != "auto":
        resolve_dtype(config.dtype, device, flag="dtype:")
    if device.type == "cuda" and device.index is not None and int(os.environ.get("WORLD_SIZE", "1")) == 1:
        os.environ["ACCELERATE_TORCH_DEVICE"] = str(device)  # cuda:N in a single process
    AcceleratorState._reset_state()  # several runs in one process (demo, tests) may differ in precision
    mixed = "bf16" if use_bf16(config.train.bf16) and config.dtype in ("auto", "fp32") else "no"
    # gradual unfreezing leaves the lower layers without gradients for a while: DDP must be told
    ddp = [DistributedDataParallelKwargs(find_unused_parameters=True)] if config.freeze.gradual_unfreeze else []
    accelerator = Accelerator(cpu=device.type == "cpu", mixed_precision=mixed,  # cpu: CPU processes form a gloo group
                              log_with="tensorboard" if config.train.tensorboard else None,
                              project_dir=str(out_dir), kwargs_handlers=ddp)
    if accelerator.distributed_type == DistributedType.MULTI_CPU and os.environ.get("ACCELERATE_USE_FSDP") == "true":
        _fsdp_on_cpu(accelerator, mixed)
    if accelerator.distributed_type == DistributedType.MULTI_CPU and \
            os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true":
        _deepspeed_on_cpu(accelerator, mixed)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        _deepspeed_settings(accelerator, config)
    return accelerator


def _fsdp_on_cpu(accelerator: Accelerator, mixed: str) -> None:
    """accelerate turns FSDP on only for accelerators; a CPU-only launch that asks for it (the tests' two gloo
    processes, CPU clusters) gets accelerate's FSDP path here, with torch's fully_shard running over gloo."""
    plugin = FullyShardedDataParallelPlugin()
    if mixed != "no":
        plugin.set_mixed_precision(mixed)
    accelerator.state.fsdp_plugin = plugin
    accelerator.state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP  # what later AcceleratorStates read


def _deepspeed_on_cpu(accelerator: Accelerator, mixed: str) -> None:
    """The same for DeepSpeed: its CPU accelerator runs over the gloo group accelerate formed."""
    import deepspeed
    from accelerate.utils import DeepSpeedPlugin

    deepspeed.init_distributed(dist_backend="gloo")
    plugin = DeepSpeedPlugin()
    plugin.set_mixed_precision(mixed)
    accelerator.state.distributed_type = DistributedType.DEEPSPEED
    PartialState._shared_state["distributed_type"] = DistributedType.DEEPSPEED
    accelerator.state.deepspeed_plugins = plugin
    plugin.select(_from_accelerator_state=True)
    accelerator.state._mixed_precision = "no"  # DeepSpeed casts the model itself, as accelerate leaves it to do
    accelerator.native_amp = False


def _deepspeed_settings(accelerator: Accelerator, config: Config) -> None:
    """Fill the DeepSpeed config from the posttrain one: no data loader goes through accelerate (so the micro-batch
    size is set here), accumulation is ours (train.grad_accum: DeepSpeed steps at the end of each accumulated
    update, see Trainer.micro_batch), and clipping is DeepSpeed's own (at train.max_grad_norm)."""
    ds = accelerator.state.deepspeed_plugin.deepspeed_config
    ds["train_micro_batch_size_per_gpu"] = config.train.batch_size
    ds["gradient_accumulation_steps"] = 1
    ds["train_batch_size"] = config.train.batch_size * accelerator.num_processes
    ds["gradient_clipping"] = config.train.max_grad_norm or 0.0
    accelerator.gradient_accumulation_steps = 1


def build_trainer(config: Config, out_dir: Path, resume_from: Path | None = None):
    """Data, accelerator, model, stage context and the loop's Trainer: everything a run needs before its first
    step (tests use it to drive a stage's real code). Returns the trainer and what the summary reports."""
    stage = STAGES[config.stage]
    tokenizer = load_tokenizer(config.model, config.chat_template, config.trust_remote_code)
    vision = load_vision(config.model, config.trust_remote_code) if stage.task == "causal" else None
    data = prepare_data(config, stage, tokenizer, vision)
    if config.data.packing and own_positions(data["train"]):
        raise ConfigError("data.packing cannot pack images for this model (it places image tokens on 3-D rotary "
                          "positions that packed rows would overwrite); set data.packing: false")
    for key in ("train_load", "train_encode", "eval_load", "eval_encode"):
        if data["report"][key]:
            log.info("%s: %s", key.replace("_", " "), data["report"][key])

    accelerator = build_accelerator(config, out_dir)
    set_seed(config.train.seed)
    model = build_model(config, stage, tokenizer, data["labels"])
    if stage.wrap is not None:  # e.g. ppo: the policy and its critic, trained together
        model = stage.wrap(config, model, tokenizer)
    trainable, total = count_parameters(model)
    log.info("model %s: %s, %.2fM of %.2fM parameters trainable", config.model, config.method,
             trainable / 1e6, total / 1e6)

    attn = getattr(model.config, "_attn_implementation", None) or "sdpa"
    if config.data.packing and attn not in ("sdpa", "eager") and not attn.startswith("flash_attention"):
        raise ConfigError(f"data.packing works with attn_implementation sdpa, eager or flash_attention_*, "
                          f"not {attn}")
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        if resume_from is None:
            clear_previous_run(out_dir)
        (out_dir / "config.yaml").write_text(dump_config(config))
    if config.train.tensorboard:
        accelerator.init_trackers("tensorboard")
    ctx = stage.setup(config, model, tokenizer, accelerator) if stage.setup else None
    units, collate_fn, unit_length = build_units(data["train"], config, stage, tokenizer.pad_token_id, attn, ctx)
    eval_units, _, _ = build_units(data["eval"], config, stage, tokenizer.pad_token_id, attn, ctx)
    from .trainer import Trainer

    trainer = Trainer(config, model, stage, units, eval_units, unit_length, collate_fn, accelerator, out_dir, ctx)
    return trainer, {"tokenizer": tokenizer, "data": data, "trainable": trainable, "total": total, "vision": vision}


def gathered_state(trainer, trained, written) -> dict | None:
    """The whole weights of `written` (the trained module, or the part of it that is the output, e.g. PPO's policy)
    gathered from every process's shards when the run is sharded; None when the module holds them itself."""
    if not trainer.sharded:
        return None
    state = trainer.accelerator.get_state_dict(trainer.model)
    if state is None:  # DeepSpeed ZeRO-3 gathers onto the main process only
        return None
    if written is not trained:
        prefix = next(name for name, module in trained.named_modules() if module is written) + "."
        state = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
    # a tied weight (the LM head sharing the embeddings) is gathered under both names; written once, as
    # save_pretrained writes it from the module itself
    first: dict[int, str] = {}
    tied = {name for name, param in written.named_parameters(remove_duplicate=False)
            if first.setdefault(id(param), name) != name}
    return {key: value for key, value in state.items() if key not in tied}


def precision_words(config: Config, accelerator) -> str:
    if config.dtype in ("bf16", "fp16"):
        return f"{config.dtype} weights" + (" (LoRA adapter fp32)" if config.method == "lora" else " (pure, no fp32 copy)")
    return "bf16 autocast (weights fp32)" if accelerator.mixed_precision == "bf16" else "fp32"


def _train(config: Config, out_dir: Path, resume_from: Path | None) -> dict:
    stage = STAGES[config.stage]
    trainer, run = build_trainer(config, out_dir, resume_from)
    accelerator, ctx, tokenizer, data = trainer.accelerator, trainer.ctx, run["tokenizer"], run["data"]
    trainable, total = run["trainable"], run["total"]
    if resume_from is not None:
        log.info("resuming from %s", resume_from)
    result = trainer.fit(resume_from)
    if stage.finish is not None:
        result.update(stage.finish(trainer, ctx))
    accelerator.wait_for_everyone()
    trained = unwrap(trainer.model)  # not accelerate's unwrap_model: it imports DeepSpeed when installed (seconds)
    written = stage.unwrap(trained) if stage.unwrap else trained
    state_dict = gathered_state(trainer, trained, written)  # every process takes part under FSDP / ZeRO-3
    if accelerator.is_main_process:
        save_output(written, tokenizer, config, stage, out_dir, state_dict, run["vision"])
        chance = 1 / len(data["labels"]) if data["labels"] else 0.5 if stage.name in ("rm", "dpo", "kto") else None
        plots = plot_metrics(out_dir / "metrics.jsonl", out_dir / "plots", chance=chance)
        notes = [note for note in [overfitting(out_dir / "metrics.jsonl")] if note]
        for note in notes:
            log.warning("%s: %s", stage.name, note)
        summary = {"stage": stage.name, "model": config.model, "method": config.method,
                   "trainable_parameters": trainable, "total_parameters": total, **result,
                   "tokens_per_s": round(result["tokens_seen"] / max(result["runtime_s"], 1e-9), 1),
                   "precision": precision_words(config, accelerator),
                   "distributed": f"{trainer.strategy} x {accelerator.num_processes}",
                   "machine": machine_kind(), "notes": notes,
                   "data": data["report"], "plots": [p.name for p in plots],
                   "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    else:
        summary = result
    if config.train.tensorboard:
        accelerator.end_training()
    return summary
