"""The model forwards every stage shares: log-probs of the trained tokens, and scalar scores read at the last
real token. One way to compute each, used by training, the reference model, RL, scoring and evaluation.

Which positions count comes from the batch:
- the usual layout: `labels` aligned with `input_ids`, -100 where not trained; position t predicts token t+1,
  and the sums are per row;
- the shared-prefix layout (stages/prefix.py): explicit `predictor` positions (flat indices into the batch),
  their `target` ids and a `slot` per position (the sums are per slot: chosen 0..n-1, rejected n..2n-1).
Every forward is the model's own call (through whatever DDP / FSDP / DeepSpeed wrapper it is in, so gradients
are synchronised and sharded weights gathered). For models whose causal-LM forward is exactly
`lm_head(last hidden state)` the head is applied, for that call, to the selected positions only, and the
log-probs are computed chunk by chunk (HeadLogps): the prompt's and the padding's rows of the logits are never
built, and no [tokens, vocab] tensor is kept for the backward.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError
from .losses import IGNORE, shift_labels
from .modeling import PLAIN_HEAD_MODELS

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")
IMAGE_INPUTS = ("pixel_values", "image_grid_thw", "image_sizes", "mm_token_type_ids")  # data/vision.py (VLMs)


def unwrap(model: nn.Module) -> nn.Module:
    """The module under a DistributedDataParallel wrapper or a DeepSpeed engine (FSDP2 shards in place: its
    module is the model itself)."""
    wrapped = isinstance(model, nn.parallel.DistributedDataParallel) or type(model).__name__ == "DeepSpeedEngine"
    return model.module if wrapped else model


def hf_model(model: nn.Module) -> nn.Module:
    """The transformers model under DDP / DeepSpeed and peft wrappers."""
    model = unwrap(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def attention_kernel(model: nn.Module) -> str:
    return getattr(hf_model(model).config, "_attn_implementation", None) or "sdpa"


def model_inputs(model: nn.Module, batch: dict) -> dict:
    """The batch's model inputs. A 4D attention mask is built as booleans (True = may attend), which sdpa takes
    as is; eager attention *adds* its mask to the scores, so it gets 0 / the dtype's minimum instead."""
    inputs = {k: batch[k] for k in MODEL_INPUTS + IMAGE_INPUTS if k in batch}
    mask = inputs.get("attention_mask")
    if mask is not None and mask.dim() == 4 and mask.dtype == torch.bool:
        kernel = attention_kernel(model)
        if kernel == "eager":
            blocked = torch.finfo(torch.float32).min
            inputs["attention_mask"] = torch.zeros(mask.shape, device=mask.device).masked_fill(~mask, blocked)
        elif kernel != "sdpa":
            raise ConfigError(f"attn_implementation {kernel} cannot take the explicit attention mask this batch "
                              f"needs (prefix sharing); use sdpa or eager")
    return inputs


def prefix_sharing_on(setting: bool | str, model: nn.Module, what: str) -> bool:
    """rm/dpo.prefix_sharing resolved: `auto` is on where it is exact (sdpa or eager attention, which take the
    explicit mask it needs), off for other kernels; `true` with such a kernel is a config error."""
    if setting == "auto":
        return attention_kernel(model) in ("sdpa", "eager")
    if setting:
        check_explicit_mask_kernel(model, what)
    return bool(setting)


def check_explicit_mask_kernel(model: nn.Module, what: str) -> None:
    """A clear config error, before training, for kernels that cannot take an explicit 4D mask."""
    kernel = attention_kernel(model)
    if kernel not in ("sdpa", "eager"):
        raise ConfigError(f"{what} needs attn_implementation sdpa or eager (an explicit attention mask), "
                          f"not {kernel}; set attn_implementation: sdpa or turn {what} off")


# ---------------------------------------------------------------------------------------- log-probs

def selection(batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """(flat positions that predict a trained token, their target ids, each one's slot, number of slots)."""
    if "predictor" in batch:
        return batch["predictor"], batch["target"], batch["slot"], int(batch["slot_count"])
    targets = shift_labels(batch["labels"])
    selected = (targets != IGNORE).flatten()
    positions = selected.nonzero().squeeze(-1)
    return positions, targets.flatten()[positions], positions // targets.shape[1], targets.shape[0]


# [rows, vocab] logits are computed this many elements at a time (128 MB in fp32): with a 152k vocabulary, 220
# rows. The backward recomputes a chunk's logits instead of keeping them, unless one chunk holds all rows.
CHUNK_ELEMENTS = 1 << 25


def _matmul_dtype(tensor: torch.Tensor) -> torch.dtype:
    kind = tensor.device.type
    return torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else tensor.dtype


def _logits(hidden, weight, bias, temperature) -> torch.Tensor:
    """fp32 logits / T of a chunk; the matmul in the dtype of `weight` (cast once to the autocast dtype, as the
    model's head would multiply)."""
    with torch.autocast(hidden.device.type, enabled=False):
        logits = F.linear(hidden.to(weight.dtype), weight, bias).float()
    return logits if temperature == 1.0 else logits / temperature


class HeadLogps(torch.autograd.Function):
    """Per row: log softmax(h W^T + b) / T at the target id, and the entropy of that distribution (no gradient),
    without a [rows, vocab] tensor: chunks of rows are done one after the other, in the forward and again in the
    backward, where d logp / d z = (onehot(target) - softmax(z)) / T."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature: float, entropy: bool):
        dtype, rows = _matmul_dtype(hidden), hidden.shape[0]
        chunk = max(1, CHUNK_ELEMENTS // weight.shape[0])
        w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
        logps = torch.empty(rows, dtype=torch.float32, device=hidden.device)
        entropies = torch.empty(rows if entropy else 0, dtype=torch.float32, device=hidden.device)
        probs = None
        for start in range(0, rows, chunk):
            z = _logits(hidden[start:start + chunk], w, b, temperature)
            log_p = torch.log_softmax(z, dim=-1)  # rounded as the plain computation rounds it
            logps[start:start + chunk] = log_p.gather(1, targets[start:start + chunk, None]).squeeze(1)
            if entropy or rows <= chunk:
                p = log_p.exp_()
                if entropy:
                    entropies[start:start + chunk] = -(p * (z - torch.logsumexp(z, dim=-1, keepdim=True))).sum(-1)
                if rows <= chunk:
                    probs = p  # one chunk: keep it for the backward instead of recomputing it
        ctx.save_for_backward(hidden, weight, bias, targets, probs)
        ctx.temperature, ctx.dtype, ctx.chunk = temperature, dtype, chunk
        ctx.mark_non_differentiable(entropies)
        return logps, entropies

    @staticmethod
    def backward(ctx, grad_logps, _grad_entropy):
        hidden, weight, bias, targets, probs = ctx.saved_tensors
        dtype, chunk, rows = ctx.dtype, ctx.chunk, hidden.shape[0]
        need_hidden, need_weight, need_bias = ctx.needs_input_grad[:3]
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        grad_weight = grad_bias = None  # summed over the chunks in fp32
        w, b = weight.to(dtype), None if bias is None else bias.to(dtype)
        with torch.autocast(hidden.device.type, enabled=False):
            for start in range(0, rows, chunk):
                end = min(start + chunk, rows)
                if probs is None:
                    p = torch.log_softmax(_logits(hidden[start:end], w, b, ctx.temperature), -1).exp_()
                else:
                    p = probs
                g = grad_logps[start:end, None].float()
                grad_z = torch.mul(p, -g).scatter_add_(1, targets[start:end, None], g)
                if ctx.temperature != 1.0:
                    grad_z /= ctx.temperature
                grad_z = grad_z.to(dtype)
                if need_hidden:
                    grad_hidden[start:end] = (grad_z @ w).to(hidden.dtype)
                if need_weight:
                    part = (grad_z.T @ hidden[start:end].to(dtype)).float()
                    grad_weight = part if grad_weight is None else grad_weight.add_(part)
                if need_bias:
                    part = grad_z.float().sum(0)
                    grad_bias = part if grad_bias is None else grad_bias.add_(part)
        return (grad_hidden, None if grad_weight is None else grad_weight.to(weight.dtype),
                None if grad_bias is None else grad_bias.to(bias.dtype), None, None, None)


@contextmanager
def _head_on_positions(model: nn.Module, positions: torch.Tensor, compute, captured: dict):
    """While the model's own forward runs (through any DDP / FSDP / DeepSpeed wrapper), its LM head is applied to
    the selected flat `positions` only, by `compute(head, hidden [K, H])`, whose result becomes the forward's
    `logits`; the selected hidden states are kept in `captured["hidden"]`. Yields False (and changes nothing)
    for models whose logits are not exactly `lm_head(last hidden state)` (modeling.PLAIN_HEAD_MODELS)."""
    head = _plain_head(model)
    if head is None:
        yield False
        return

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        selected = hidden.flatten(0, 1)[positions]
        captured["hidden"] = selected
        return compute(head, selected)

    own = head.__dict__.get("forward")  # an instance-level forward someone else installed, kept
    head.forward = forward
    try:
        yield True
    finally:
        if own is None:
            del head.forward  # back to the class's forward
        else:
            head.forward = own


def _plain_head(model: nn.Module) -> nn.Linear | None:
    hf = hf_model(model)
    if getattr(getattr(hf, "config", None), "model_type", None) not in PLAIN_HEAD_MODELS:
        return None
    head = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
    return head if type(head) is nn.Linear else None  # not a LoRA-wrapped head


def selected_logits(model: nn.Module, batch: dict, positions: torch.Tensor,
                    with_hidden: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits [K, V] (and the last hidden states [K, H]) at the flat `positions` of the batch. token_logps is the
    memory-lean way to what most callers need; this one builds the [K, V] logits."""
    captured: dict = {}
    with _head_on_positions(model, positions, lambda head, h: F.linear(h, head.weight, head.bias), captured) as on:
        out = model(**model_inputs(model, batch), use_cache=False, output_hidden_states=with_hidden and not on)
    if on:
        return out.logits, captured["hidden"] if with_hidden else None
    hidden = out.hidden_states[-1].flatten(0, 1)[positions] if with_hidden else None
    return out.logits.flatten(0, 1)[positions], hidden


def token_logps(model: nn.Module, batch: dict, temperature: float = 1.0, with_hidden: bool = False,
                with_entropy: bool = False, with_logits: bool = False) -> dict[str, torch.Tensor | None]:
    """Per trained token, in order: `logps` [K] fp32 under logits / T; `slots` [K]; `slot_count` the number of rows
    (or pair slots); when asked for, `entropy` [K] (no gradient), `hidden` [K, H], `logits` [K, V] (fp32, / T).

    For plain-head models (modeling.PLAIN_HEAD_MODELS) no [K, V] tensor is kept: HeadLogps computes the log-probs
    chunk by chunk in the forward and again in the backward (unless `logits` are asked for). Other models go
    through their full forward ([rows, length, vocab] logits)."""
    positions, targets, slots, count = selection(batch)
    captured: dict = {}

    def compute(head, hidden):
        if with_logits:
            return F.linear(hidden, head.weight, head.bias)
        logps, entropy = HeadLogps.apply(hidden, head.weight, head.bias, targets, float(temperature), with_entropy)
        captured["entropy"] = entropy
        return logps

    with _head_on_positions(model, positions, compute, captured) as on:
        out = model(**model_inputs(model, batch), use_cache=False, output_hidden_states=with_hidden and not on)
    if on and not with_logits:
        logps, logits, entropy, hidden = out.logits, None, captured.get("entropy"), captured.get("hidden")
        entropy = entropy if with_entropy else None
    else:
        logits = out.logits if on else out.logits.flatten(0, 1)[positions]
        hidden = captured.get("hidden") if on else (
            out.hidden_states[-1].flatten(0, 1)[positions] if with_hidden else None)
        logits = logits.float() / temperature
        logps = -F.cross_entropy(logits, targets, reduction="none")
        entropy = entropy_of(logits.detach()) if with_entropy else None
    return {"logps": logps, "logits": logits if with_logits else None, "entropy": entropy, "slots": slots,
            "hidden": hidden if with_hidden else None, "slot_count": count}


def entropy_of(logits: torch.Tensor) -> torch.Tensor:
    """Per-row entropy of softmax(logits): logsumexp(z) - sum p z."""
    log_z = torch.logsumexp(logits, dim=-1)
    return log_z - (torch.softmax(logits, dim=-1) * logits).sum(-1)


def sequence_logps(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row (or slot): the summed log-prob of its trained tokens and how many there are ([R] fp32, [R]).

    logp(y|x) = sum_t [labels[t+1] != -100] * log softmax(logits[t])[labels[t+1]]
    """
    out = token_logps(model, batch)
    slots, count = out["slots"], out["slot_count"]
    sums = torch.zeros(count, dtype=out["logps"].dtype, device=out["logps"].device).index_add(0, slots, out["logps"])
    return sums, torch.bincount(slots, minlength=count)


# ---------------------------------------------------------------------------------------- scalar scores

def score_head(model: nn.Module) -> nn.Module:
    """The scalar head of a sequence-classification model (a reward model or a critic)."""
    hf = hf_model(model)
    head = getattr(hf, "score", None) or getattr(hf, "classifier", None)
    if head is None:
        raise ConfigError(f"{type(hf).__name__} has no `score` or `classifier` head to read a reward from")
    return head


def last_real_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Flat index of each row's last attended token (right or left padding alike; pad == EOS is fine)."""
    rows, width = attention_mask.shape
    columns = torch.arange(width, device=attention_mask.device)
    last = (columns * attention_mask.bool()).argmax(-1)
    return torch.arange(rows, device=attention_mask.device) * width + last


def scores_at(model: nn.Module, batch: dict, positions: torch.Tensor) -> torch.Tensor:
    """The scalar head's output at flat `positions` ([K] fp32), from the model's own forward (so any DDP / FSDP /
    DeepSpeed wrapper sees it). Unlike transformers' own sequence-classification pooling, which takes the last
    token that is not the pad id (wrong when pad == EOS and the sequence ends with EOS), the positions come from
    the attention mask or the batch layout."""
    captured: dict = {}

    def keep(_module, _inputs, output):
        captured["scores"] = output.flatten(0, 1)[positions]

    handle = score_head(model).register_forward_hook(keep)
    try:
        model(**model_inputs(model, batch), use_cache=False)
    finally:
        handle.remove()
    return captured["scores"].squeeze(-1).float()


def sequence_scores(model: nn.Module, batch: dict) -> torch.Tensor:
    """One score per row read at its last real token; for a shared-prefix batch, per slot (chosen then
    rejected, each at its response's last token)."""
    if "last_tokens" in batch:
        return scores_at(model, batch, batch["last_tokens"])
    return scores_at(model, batch, last_real_positions(batch["attention_mask"]))
