"""Prefix sharing for pairwise losses: the prompt runs once per pair instead of twice.

One row per pair holds [prompt | chosen | rejected]. The attention mask lets the chosen tokens see the
prompt and the earlier chosen tokens, and the rejected tokens see the prompt and the earlier rejected
tokens (never the chosen ones); the rejected positions restart right after the prompt. Every response
token is then scored from exactly the context it has in the plain layout, so the log-probs, the loss and
the gradients are the same while the prompt's tokens are processed once (Wang et al. 2024, "Accelerating
Direct Preference Optimization with Prefix Sharing").
"""
from __future__ import annotations

import torch

from ..modeling import plain_head_parts
from .lm import _model_inputs

PROMPT, CHOSEN, REJECTED = 1, 2, 3


def _row(feature: dict) -> tuple[list[int], list[int], list[int], list[tuple[int, int, int]]]:
    """ids, segment, positions and (predictor position, target id, side) for one pair."""
    prompt, chosen, rejected = feature["prompt_ids"], feature["chosen_ids"], feature["rejected_ids"]
    p, c = len(prompt), len(chosen)
    ids = prompt + chosen + rejected
    segment = [PROMPT] * p + [CHOSEN] * c + [REJECTED] * len(rejected)
    positions = list(range(p + c)) + list(range(p, p + len(rejected)))
    targets = [(p + j - 1, token, 0) for j, token in enumerate(chosen)]
    targets += [((p - 1) if j == 0 else (p + c + j - 1), token, 1) for j, token in enumerate(rejected)]
    return ids, segment, positions, targets


def collate_shared_prefix(features: list[dict], pad_id: int, attn_implementation: str = "sdpa") -> dict:
    rows = [_row(f) for f in features]
    width = max(len(r[0]) for r in rows)
    n = len(rows)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    segment = torch.zeros((n, width), dtype=torch.long)
    position_ids = torch.zeros((n, width), dtype=torch.long)
    predictor, target, side, pair = [], [], [], []
    for i, (ids, seg, pos, targets) in enumerate(rows):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        segment[i, :len(seg)] = torch.tensor(seg)
        position_ids[i, :len(pos)] = torch.tensor(pos)
        for position, token, which in targets:
            predictor.append(i * width + position)
            target.append(token)
            side.append(which)
            pair.append(i)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    query, key = segment[:, :, None], segment[:, None, :]
    visible = (key == PROMPT) | (key == query)
    mask = (visible & (key > 0) & (query > 0) & causal) | torch.eye(width, dtype=torch.bool)
    mask = mask[:, None]
    if attn_implementation == "eager":
        mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
    ends = [(i * width + len(f["prompt_ids"]) + len(f["chosen_ids"]) - 1, i * width + len(r[0]) - 1)
            for i, (f, r) in enumerate(zip(features, rows))]
    batch = {"input_ids": input_ids, "attention_mask": mask, "position_ids": position_ids,
             "last_chosen": torch.tensor([e[0] for e in ends]), "last_rejected": torch.tensor([e[1] for e in ends]),
             "predictor": torch.tensor(predictor), "target": torch.tensor(target), "side": torch.tensor(side),
             "pair": torch.tensor(pair), "shared_prefix": torch.tensor(1), "pair_count": torch.tensor(n)}
    if any(f.get("margin") is not None for f in features):
        batch["margin"] = torch.tensor([float(f.get("margin") or 0.0) for f in features])
    for key in features[0]:
        if key.startswith("ref_") and all(key in f for f in features):
            batch[key] = torch.tensor([float(f[key]) for f in features])
    return batch


def shared_prefix_rewards(model, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Reward-model scores of the chosen and the rejected response, read at each one's last token."""
    base = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    base = base.get_base_model() if hasattr(base, "get_base_model") else base
    body = getattr(base, base.base_model_prefix)
    head = getattr(base, "score", None) or getattr(base, "classifier")
    hidden = body(**_model_inputs(batch), use_cache=False).last_hidden_state.flatten(0, 1)
    scores = head(hidden[torch.cat([batch["last_chosen"], batch["last_rejected"]])]).squeeze(-1).float()
    n = int(batch["pair_count"])
    return scores[:n], scores[n:]


def shared_prefix_logps(model, batch: dict):
    """(chosen, rejected) summed log-probs and token counts per pair, from one shared-prefix forward."""
    parts = plain_head_parts(model)
    if parts is None:
        logits = model(**_model_inputs(batch), use_cache=False).logits
        selected = logits.flatten(0, 1)[batch["predictor"]]
    else:
        body, head = parts
        hidden = body(**_model_inputs(batch), use_cache=False).last_hidden_state
        selected = head(hidden.flatten(0, 1)[batch["predictor"]])
    token_logps = torch.log_softmax(selected.float(), dim=-1).gather(-1, batch["target"][:, None]).squeeze(-1)
    n = int(batch["pair_count"])
    slot = batch["pair"] + n * batch["side"]  # chosen sums in 0..n-1, rejected in n..2n-1
    sums = torch.zeros(2 * n, dtype=token_logps.dtype, device=token_logps.device).index_add(0, slot, token_logps)
    counts = torch.bincount(slot, minlength=2 * n)
    return sums[:n], sums[n:], counts[:n], counts[n:]
