"""The model forwards every stage shares: log-probs of the trained tokens, and scalar scores read at the last
real token. One way to compute each, used by training, the reference model, RL, scoring and evaluation.

Which positions count comes from the batch:
- the usual layout: `labels` aligned with `input_ids`, -100 where not trained; position t predicts token t+1,
  and the sums are per row;
- the shared-prefix layout (stages/prefix.py): explicit `predictor` positions (flat indices into the batch),
  their `target` ids and a `slot` per position (the sums are per slot: chosen 0..n-1, rejected n..2n-1).
For models whose causal-LM forward is exactly `lm_head(body(...))` the head runs on the selected positions
only: the prompt's and the padding's rows of the [tokens, vocab] logits are never built.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .errors import ConfigError
from .losses import IGNORE, shift_labels
from .modeling import plain_head_parts

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")


def unwrap(model: nn.Module) -> nn.Module:
    """The module under a DistributedDataParallel wrapper."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def hf_model(model: nn.Module) -> nn.Module:
    """The transformers model under DDP and peft wrappers."""
    model = unwrap(model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def attention_kernel(model: nn.Module) -> str:
    return getattr(hf_model(model).config, "_attn_implementation", None) or "sdpa"


def model_inputs(model: nn.Module, batch: dict) -> dict:
    """The batch's model inputs. A 4D attention mask is built as booleans (True = may attend), which sdpa takes
    as is; eager attention *adds* its mask to the scores, so it gets 0 / the dtype's minimum instead."""
    inputs = {k: batch[k] for k in MODEL_INPUTS if k in batch}
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


def selected_logits(model: nn.Module, batch: dict, positions: torch.Tensor,
                    with_hidden: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits [K, V] (and the last hidden states [K, H]) at the flat `positions` of the batch."""
    inputs = model_inputs(model, batch)
    parts = plain_head_parts(model)
    if parts is not None:
        body, head = parts
        hidden = body(**inputs, use_cache=False).last_hidden_state.flatten(0, 1)[positions]
        return head(hidden), hidden if with_hidden else None
    out = model(**inputs, use_cache=False, output_hidden_states=with_hidden)
    hidden = out.hidden_states[-1].flatten(0, 1)[positions] if with_hidden else None
    return out.logits.flatten(0, 1)[positions], hidden


def token_logps(model: nn.Module, batch: dict, temperature: float = 1.0,
                with_hidden: bool = False) -> dict[str, torch.Tensor | None]:
    """Per trained token, in order: `logps` [K] under logits / T, `logits` [K, V] (scaled by 1/T, fp32),
    `slots` [K], `hidden` [K, H] when asked for; `slot_count` the number of rows (or pair slots)."""
    positions, targets, slots, count = selection(batch)
    logits, hidden = selected_logits(model, batch, positions, with_hidden)
    logits = logits.float() / temperature
    logps = -F.cross_entropy(logits, targets, reduction="none")
    return {"logps": logps, "logits": logits, "slots": slots, "hidden": hidden, "slot_count": count}


def sequence_logps(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row (or slot): the summed log-prob of its trained tokens and how many there are ([R] fp32, [R]).

    logp(y|x) = sum_t [labels[t+1] != -100] * log softmax(logits[t])[labels[t+1]]
    """
    out = token_logps(model, batch)
    slots, count = out["slots"], out["slot_count"]
    sums = torch.zeros(count, dtype=out["logps"].dtype, device=out["logps"].device).index_add(0, slots, out["logps"])
    return sums, torch.bincount(slots, minlength=count)


# ---------------------------------------------------------------------------------------- scalar scores

def score_parts(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(body, scalar head) of a sequence-classification model (a reward model or a critic)."""
    hf = hf_model(model)
    body = getattr(hf, hf.base_model_prefix)
    head = getattr(hf, "score", None) or getattr(hf, "classifier", None)
    if head is None:
        raise ConfigError(f"{type(hf).__name__} has no `score` or `classifier` head to read a reward from")
    return body, head


def last_real_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """Flat index of each row's last attended token (right or left padding alike; pad == EOS is fine)."""
    rows, width = attention_mask.shape
    columns = torch.arange(width, device=attention_mask.device)
    last = (columns * attention_mask.bool()).argmax(-1)
    return torch.arange(rows, device=attention_mask.device) * width + last


def scores_at(model: nn.Module, batch: dict, positions: torch.Tensor) -> torch.Tensor:
    """The scalar head applied to the last hidden states at flat `positions` ([K] fp32). Unlike transformers'
    own sequence-classification forward, which takes the last token that is not the pad id (wrong when pad ==
    EOS and the sequence ends with EOS), the positions come from the attention mask or the batch layout."""
    body, head = score_parts(model)
    hidden = body(**model_inputs(model, batch), use_cache=False).last_hidden_state.flatten(0, 1)[positions]
    return head(hidden).squeeze(-1).float()


def sequence_scores(model: nn.Module, batch: dict) -> torch.Tensor:
    """One score per row read at its last real token; for a shared-prefix batch, per slot (chosen then
    rejected, each at its response's last token)."""
    if "last_tokens" in batch:
        return scores_at(model, batch, batch["last_tokens"])
    return scores_at(model, batch, last_real_positions(batch["attention_mask"]))
