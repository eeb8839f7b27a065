"""The one training loop every offline stage uses (accelerate underneath).

AdamW, warmup + cosine/linear schedule, gradient accumulation normalised over the whole step, clipping,
bf16 autocast, eval every N steps with early stopping, atomic checkpoints with exact resume, one JSON line
of metrics per logging step, a progress bar with ETA, and plots at the end.
"""
from __future__ import annotations

import json
import math
import signal
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from accelerate import Accelerator, DistributedType
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from .config import Config
from .errors import ConfigError, DataError
from .data.batching import batch_indices
from .modeling import decoder_layers, set_trainable_layers
from .stages import Stage

CRITIC = ("critic.", "value_head.")  # PPO's critic in rl.online.PolicyWithValue


@dataclass
class LoopState:
    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0   # optimizer steps already taken in the current epoch
    best_metric: float | None = None
    evals_without_improvement: int = 0
    stopped_early: bool = False
    best_step: int | None = None
    tokens_seen: int = 0
    runtime_s: float = 0.0    # training time over all runs, resumed ones included
    stage_state: dict = field(default_factory=dict)  # e.g. ppo's adaptive KL coefficient


class Trainer:
    """units: training items (a feature dict, or a list of features packed into one row);
    collate: list of units -> batch dict of tensors."""

    def __init__(self, config: Config, model, stage: Stage, units: list, eval_units: list, unit_length: Callable,
                 collate: Callable, accelerator: Accelerator, out_dir: Path, ctx=None):
        self.config, self.train_cfg, self.stage, self.ctx = config, config.train, stage, ctx
        self.units, self.eval_units, self.collate = units, eval_units, collate
        self.unit_length = unit_length
        self.lengths = [unit_length(u) for u in units]
        self.accelerator, self.out_dir = accelerator, out_dir
        self.state = LoopState()
        self.raw_model = model
        self.gradual = config.freeze.gradual_unfreeze
        if self.gradual:  # the optimizer must know every parameter that will ever be unfrozen
            set_trainable_layers(model, len(decoder_layers(model)))
        self.param_names = {n for n, p in model.named_parameters() if p.requires_grad}
        self._collect_params()
        self.optimizer = self._optimizer()
        self.steps_per_epoch = len(self._epoch_steps(0))
        if self.steps_per_epoch == 0:
            step = self.train_cfg.batch_size * self.train_cfg.grad_accum * accelerator.num_processes
            raise DataError(f"{len(units)} training items cannot fill one step of batch_size x grad_accum x "
                            f"processes = {step}")
        if self.train_cfg.early_stopping_patience and not eval_units:
            raise ConfigError("train.early_stopping_patience needs evaluation data (data.eval or data.eval_fraction)")
        self.best_weights: dict | None = None
        if self.train_cfg.max_steps:
            self.total_steps = self.train_cfg.max_steps
        else:
            self.total_steps = max(1, math.ceil(self.train_cfg.epochs * self.steps_per_epoch))
        warmup = self.train_cfg.warmup_steps
        if warmup is None:
            warmup = int(self.train_cfg.warmup_ratio * self.total_steps)
        self.scheduler = lr_schedule(self.train_cfg.scheduler, self.optimizer, warmup, self.total_steps)
        # the scheduler is stepped by us once per optimizer step, so it is not handed to accelerate
        self.model, self.optimizer = accelerator.prepare(model, self.optimizer)
        self._collect_params()  # FSDP2 and DeepSpeed replace the parameters with sharded ones
        self.sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
        self.strategy = distributed_strategy(accelerator)
        self._apply_unfreeze(0)

    # ------------------------------------------------------------ setup helpers
    def _collect_params(self) -> None:
        """The trained parameters, in the model's order. PPO's critic (a value head or a separate value model) is
        clipped on its own (see clip_gradients) and may have its own learning rate."""
        trained = [(n, p) for n, p in self.raw_model.named_parameters() if n in self.param_names]
        self.params = [p for _, p in trained]
        self.actor_params = [p for n, p in trained if not n.startswith(CRITIC)]
        self.critic_params = [p for n, p in trained if n.startswith(CRITIC)]

    def _optimizer(self) -> torch.optim.Optimizer:
        critic_lr = (self.config.ppo.value_lr or 10 * self.train_cfg.lr) if self.config.stage == "ppo" else self.train_cfg.lr
        groups = []
        for params, lr in ((self.actor_params, self.train_cfg.lr), (self.critic_params, critic_lr)):
            groups += [{"params": [p for p in params if p.dim() >= 2], "weight_decay": self.train_cfg.weight_decay,
                        "lr": lr},
                       {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, "lr": lr}]
        params = self.actor_params + self.critic_params
        groups, betas = [g for g in groups if g["params"]], tuple(self.train_cfg.adam_betas)
        if self.train_cfg.optim == "adamw_8bit":
            return adamw_8bit(groups, self.train_cfg.lr, betas, self.accelerator)
        # the fused kernel is much faster than the per-parameter loop on CPU and GPU alike
        fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params) or None
        return torch.optim.AdamW(groups, lr=self.train_cfg.lr, betas=betas, fused=fused)

    @contextmanager
    def micro_batch(self, last: bool):
        """One micro-batch of an accumulated update, as accelerate's `accumulate` does it but with the count given
        (an offline step's micro-batches, an RL mini-batch's): gradients are synchronised only on the last one
        (DDP's all-reduce and FSDP's reduce-scatter skipped before it; DeepSpeed steps once, at its end)."""
        acc = self.accelerator
        acc.sync_gradients = last
        try:
            with nullcontext() if last or acc.num_processes == 1 else acc.no_sync(self.model):
                yield
        finally:
            acc.sync_gradients = True

    def clip_gradients(self) -> tuple[float, float | None]:
        """Clip to train.max_grad_norm; returns the norms before clipping (the model's, the critic's). A PPO
        critic is clipped on its own, so a fresh critic's large value-loss gradients do not shrink the
        policy's step (under FSDP and DeepSpeed, which clip the whole model, the norm is a joint one)."""
        max_norm = self.train_cfg.max_grad_norm or float("inf")
        clip = lambda params: self.accelerator.clip_grad_norm_(params, max_norm)  # noqa: E731
        as_float = lambda norm: float("nan") if norm is None else float(norm)  # noqa: E731  (DeepSpeed: None)
        sharded = self.accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
        if not self.critic_params or sharded:
            return as_float(clip(self.params)), None
        return as_float(clip(self.actor_params)), as_float(clip(self.critic_params))

    def _apply_unfreeze(self, epoch: int) -> None:
        if self.gradual:
            n = set_trainable_layers(self.raw_model, self.config.freeze.trainable_layers * (epoch + 1))
            self.current_trainable_layers = n

    def _epoch_steps(self, epoch: int) -> list[list[list[int]]]:
        if getattr(self, "_steps_cache", (None,))[0] != epoch:
            self._steps_cache = (epoch, self._draw_epoch_steps(epoch))
        return self._steps_cache[1]

    def _draw_epoch_steps(self, epoch: int) -> list[list[list[int]]]:
        """This process's micro-batches for each optimizer step of `epoch`, the same in every run with the
        same seed. Batches are drawn at the size of a whole step (batch_size x grad_accum x processes) and then
        cut, so accumulating micro-batches gives exactly the update of one big batch."""
        cfg, world = self.train_cfg, self.accelerator.num_processes
        per_process = cfg.batch_size * cfg.grad_accum
        steps = batch_indices(self.lengths, per_process * world, seed=cfg.seed, epoch=epoch,
                              group_by_length=cfg.group_by_length, drop_last=world > 1)
        rank = self.accelerator.process_index
        mine = [step[rank * per_process:(rank + 1) * per_process] for step in steps]
        return [[b[i:i + cfg.batch_size] for i in range(0, len(b), cfg.batch_size)] for b in mine if b]

    def _to_device(self, batch: dict) -> dict:
        return {k: v.to(self.accelerator.device) for k, v in batch.items()}

    # ------------------------------------------------------------ one optimizer step
    def _train_step(self, step_batches: list[list[int]]) -> dict:
        batches = [self._to_device(self.collate([self.units[i] for i in b])) for b in step_batches]
        local_items = sum(self.stage.count(b) for b in batches)
        total_items = torch.tensor(float(local_items), device=self.accelerator.device)
        total_items = self.accelerator.reduce(total_items, "sum").clamp(min=1.0)
        world = self.accelerator.num_processes
        loss_sum, metric_sums = 0.0, {}
        tokens = sum(self.lengths[i] for b in step_batches for i in b)  # real tokens, padding excluded
        for i, batch in enumerate(batches):
            with self.micro_batch(last=i == len(batches) - 1):
                with self.accelerator.autocast():
                    summed, _, metrics = self.stage.loss(self.model, batch, self.ctx)
                # DDP averages gradients over processes; scaling by world keeps sum / all items
                self.accelerator.backward(summed * world / total_items)
            loss_sum += float(summed.detach())
            for key, value in metrics.items():
                metric_sums[key] = metric_sums.get(key, 0.0) + float(value)
        grad_norm = self.clip_gradients()[0]
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if world > 1:  # log what the step did on every process, not rank 0's share
            keys = sorted(metric_sums)
            packed = torch.tensor([loss_sum, float(tokens)] + [metric_sums[k] for k in keys],
                                  device=self.accelerator.device, dtype=torch.float64)
            packed = self.accelerator.reduce(packed, "sum").tolist()
            loss_sum, tokens = packed[0], int(packed[1])
            metric_sums = dict(zip(keys, packed[2:]))
        denominator = float(total_items)
        return {"loss": loss_sum / denominator, "grad_norm": float(grad_norm), "tokens": tokens,
                "metrics": {k: v / denominator for k, v in metric_sums.items()}}

    # ------------------------------------------------------------ evaluation
    def evaluate(self) -> dict[str, float]:
        if not self.eval_units:
            return {}
        if self.stage.step is not None:
            self.model.eval()
            metrics = self.stage.evaluate(self, self.eval_units, self.ctx)
            self.model.train()
            return metrics
        order = sorted(range(len(self.eval_units)), key=lambda i: self.unit_length(self.eval_units[i]))
        size = self.train_cfg.batch_size
        batches = (self._to_device(self.collate([self.eval_units[i] for i in order[s:s + size]]))
                   for s in range(0, len(order), size))
        self.model.eval()
        metrics = self.stage.evaluate(self.model, batches, self.accelerator.autocast, self.ctx)
        self.model.train()
        return metrics

    def _improved(self, metrics: dict) -> None:
        key = self.train_cfg.metric_for_best
        if key not in metrics:
            if self.train_cfg.early_stopping_patience:
                raise ConfigError(f"train.metric_for_best: '{key}' is not an eval metric of stage "
                                  f"{self.stage.name} (it has: {', '.join(sorted(metrics))})")
            return
        greater = self.train_cfg.greater_is_better
        if greater is None:
            greater = not any(w in key for w in ("loss", "perplexity"))
        value, best = metrics[key], self.state.best_metric
        if best is None or (value > best if greater else value < best):
            self.state.best_metric, self.state.evals_without_improvement = value, 0
            self.state.best_step = self.state.step
            self.best_eval = metrics
            if self.train_cfg.early_stopping_patience:  # kept on the CPU, restored if training stops early
                self.best_weights = ckpt.trainable_state(self.raw_model, self.param_names)
        else:
            self.state.evals_without_improvement += 1
        patience = self.train_cfg.early_stopping_patience
        if patience and self.state.evals_without_improvement >= patience:
            self.state.stopped_early = True

    # ------------------------------------------------------------ the loop
    def fit(self, resume_from: Path | None = None) -> dict:
        stop = StopRequest(self.accelerator.num_processes)
        try:
            return self._fit(resume_from, stop)
        finally:
            stop.restore()

    def _fit(self, resume_from: Path | None, stop: "StopRequest") -> dict:
        acc, cfg = self.accelerator, self.train_cfg
        metrics_file = self.out_dir / "metrics.jsonl"
        if self.stage.prepare is not None:  # before a checkpoint replaces the initial weights
            self.stage.prepare(self, self.ctx)
        if resume_from is not None:
            self._resume(resume_from, metrics_file)
        elif acc.is_main_process:
            metrics_file.write_text("")
        self._run_started = time.time()
        bar = tqdm(total=self.total_steps, initial=self.state.step, disable=not acc.is_main_process,
                   desc=f"{self.stage.name}", dynamic_ncols=True)
        started, last_eval = self._run_started, {}
        window = _new_window()  # sums since the last metrics line
        while self.state.step < self.total_steps and not self.state.stopped_early:
            steps = self._epoch_steps(self.state.epoch)
            step_started = time.time()
            if self.stage.step is not None:  # online stages: rollout + updates on this step's prompts
                units = [self.units[i] for b in steps[self.state.batch_in_epoch] for i in b]
                result = self.stage.step(self, units, self.ctx)
            else:
                result = self._train_step(steps[self.state.batch_in_epoch])
            self.scheduler.step()  # once per step: an offline optimizer step, or an online step's rollout
            window["seconds"] += time.time() - step_started
            window["loss"] += result["loss"]
            window["steps"] += 1
            window["tokens"] += result["tokens"]
            for key, value in result["metrics"].items():
                window["metrics"][key] = window["metrics"].get(key, 0.0) + value
            state = self.state
            state.step += 1
            state.batch_in_epoch += 1
            state.tokens_seen += result["tokens"]
            epoch_done = state.batch_in_epoch >= len(steps)
            if epoch_done:
                state.epoch, state.batch_in_epoch = state.epoch + 1, 0
                self._apply_unfreeze(state.epoch)
            row = {"step": state.step, "epoch": round(state.epoch + state.batch_in_epoch / len(steps), 4)}
            last = state.step == self.total_steps
            evaluate = bool(self.eval_units) and bool((cfg.eval_steps and state.step % cfg.eval_steps == 0)
                                                     or (not cfg.eval_steps and epoch_done) or last)
            if evaluate:
                last_eval = self.evaluate()
                self._improved(last_eval)
                row.update(last_eval)
            if state.step % cfg.log_steps == 0 or evaluate or last:
                self._log(row, window, result["grad_norm"], metrics_file)
                window = _new_window()
                postfix = {"loss": f"{row['loss']:.4f}"}
                if last_eval:
                    postfix["eval"] = f"{last_eval.get('eval_loss', 0):.4f}"
                bar.set_postfix(postfix)
            bar.update(1)
            if cfg.save_steps and state.step % cfg.save_steps == 0 and not last:
                self.save_checkpoint()
            if stop.requested and not last:
                bar.close()
                stop.restore()  # a second SIGTERM while the checkpoint is written ends the run at once
                saved = self.save_checkpoint()
                raise KeyboardInterrupt(f"stopped (SIGTERM) after step {state.step}; checkpoint {saved}")
        bar.close()
        self.state.runtime_s += time.time() - started
        if self.best_weights is not None and self.state.best_step != self.state.step:
            self._restore_best()
            last_eval = self.best_eval
        return {"steps": self.state.step, "epochs": round(self.state.epoch + self.state.batch_in_epoch /
                                                          max(self.steps_per_epoch, 1), 4),
                "total_steps_planned": self.total_steps, "stopped_early": self.state.stopped_early,
                "best_metric": self.state.best_metric, "metric_for_best": cfg.metric_for_best,
                "best_step": self.state.best_step, "final_eval": last_eval,
                "runtime_s": round(self.state.runtime_s, 2),
                "tokens_seen": self.state.tokens_seen}

    def _resume(self, checkpoint: Path, metrics_file: Path) -> None:
        written = json.loads((checkpoint / "trainer_state.json").read_text())
        world, strategy = self.accelerator.num_processes, distributed_strategy(self.accelerator)
        then = (written.get("fingerprint", {}).get("processes", 1), written.get("strategy", "single process"))
        if (ckpt.is_sharded(checkpoint) or self.sharded) and then != (world, strategy):
            raise ConfigError(f"resume: {checkpoint} was written by {then[0]} process(es) under {then[1]}; this run "
                              f"has {world} under {strategy}, which cannot read its shards: relaunch with the same "
                              f"accelerate config and --num_processes {then[0]}, or start a new output_dir "
                              f"(resume: null)")
        saved = written.get("fingerprint")
        if saved != self.fingerprint():
            raise ConfigError(f"resume: {checkpoint} was written by a run with a different batch plan "
                              f"({saved} vs now {self.fingerprint()}); start a new output_dir or set resume: null")
        loaded = ckpt.load_checkpoint(checkpoint, model=self.raw_model, optimizer=self.optimizer,
                                      scheduler=self.scheduler, rank=self.accelerator.process_index,
                                      sharded_by=self.accelerator if self.sharded else None)
        self.state = LoopState(**{k: v for k, v in loaded.items() if k in LoopState.__annotations__})
        self._apply_unfreeze(self.state.epoch)
        if self.accelerator.is_main_process:  # drop lines the interrupted run logged after this checkpoint
            kept = [r for r in _read_lines(metrics_file) if r.get("step", 0) <= self.state.step]
            metrics_file.write_text("".join(json.dumps(r) + "\n" for r in kept))

    def fingerprint(self) -> dict:
        """What must not change between a run and its resumption for the batch plan to be the same."""
        cfg = self.train_cfg
        return {"seed": cfg.seed, "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum,
                "processes": self.accelerator.num_processes, "units": len(self.units),
                "tokens": sum(self.lengths), "total_steps": self.total_steps}

    def _restore_best(self) -> None:
        params = dict(self.raw_model.named_parameters())
        with torch.no_grad():
            for name, value in self.best_weights.items():
                params[name].copy_(value)

    def _log(self, row: dict, window: dict, grad_norm: float, metrics_file: Path) -> None:
        """One metrics line: mean train loss since the last line, lr, grad norm, training tokens/s."""
        acc = self.accelerator
        steps = max(window["steps"], 1)
        row.update({key: round(value / steps, 6) for key, value in window["metrics"].items()})
        row.update(loss=round(window["loss"] / steps, 6), lr=self.scheduler.get_last_lr()[0],
                   grad_norm=round(grad_norm, 6),
                   tokens_per_s=round(window["tokens"] / max(window["seconds"], 1e-9), 1))
        if acc.is_main_process:
            with metrics_file.open("a") as f:
                f.write(json.dumps(row) + "\n")
        if self.train_cfg.tensorboard:
            acc.log({k: v for k, v in row.items() if k != "step"}, step=row["step"])

    def save_checkpoint(self) -> Path:
        acc = self.accelerator
        return ckpt.save_checkpoint(self.out_dir / "checkpoints", self.state.step, model=self.raw_model,
                                    names=self.param_names, optimizer=self.optimizer, scheduler=self.scheduler,
                                    loop_state={**asdict(self.state), "fingerprint": self.fingerprint(),
                                                "strategy": distributed_strategy(acc),
                                                "runtime_s": self.state.runtime_s + time.time() - self._run_started},
                                    rank=acc.process_index,
                                    is_main=acc.is_main_process, keep=self.train_cfg.save_total_limit,
                                    barrier=acc.wait_for_everyone, sharded_by=acc if self.sharded else None)


class StopRequest:
    """SIGTERM asks a single-process run to stop after the current step: fit() writes a checkpoint and raises
    KeyboardInterrupt, so `resume=auto` continues from there (the web UI's Stop; a scheduler's preemption). A
    second SIGTERM, or one in a distributed run or outside the main thread, keeps the default (end at once)."""

    def __init__(self, processes: int):
        self.requested, self.previous = False, None
        if processes == 1 and threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.requested:  # asked twice: stop now
            self.restore()
            signal.raise_signal(signal.SIGTERM)
        self.requested = True

    def restore(self) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGTERM, self.previous)
            self.previous = None


def _new_window() -> dict:
    return {"loss": 0.0, "steps": 0, "tokens": 0, "seconds": 0.0, "metrics": {}}


def _read_lines(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut short by the crash
            continue
    return rows


def lr_schedule(kind: str, optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warmup over `warmup` steps, then cosine to 0, linear to 0 or constant until `total` (transformers'
    get_scheduler formulas; written here so that a run does not import transformers' Trainer utilities, which
    pull in peft and bitsandbytes: seconds at every start)."""
    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        if kind == "constant":
            return 1.0
        if kind == "linear":
            return max(0.0, (total - step) / max(1, total - warmup))
        progress = (step - warmup) / max(1, total - warmup)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def adamw_8bit(groups: list[dict], lr: float, betas: tuple, accelerator) -> torch.optim.Optimizer:
    """bitsandbytes' AdamW with 8-bit moment states (blockwise quantised; tensors under 4096 values keep 32-bit
    states), or a one-line error where it cannot run."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        raise ConfigError("train.optim: adamw_8bit does not combine with DeepSpeed (ZeRO partitions the optimizer "
                          "state itself); use train.optim: adamw")
    try:
        import bitsandbytes
    except ImportError:
        raise ConfigError("train.optim: adamw_8bit needs bitsandbytes (pip install 'posttrain[gpu]'); or use "
                          "train.optim: adamw") from None
    return bitsandbytes.optim.AdamW8bit(groups, lr=lr, betas=betas)


def distributed_strategy(accelerator) -> str:
    """How the run is spread over processes, in words (summary.json, checkpoints)."""
    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        return "FSDP2" if accelerator.is_fsdp2 else "FSDP"
    if kind == DistributedType.DEEPSPEED:
        return f"DeepSpeed ZeRO-{accelerator.state.deepspeed_plugin.zero_stage}"
    return "DDP" if accelerator.num_processes > 1 else "single process"
