"""Prefix sharing for pairwise losses: the prompt runs once per pair instead of twice.

One row per pair holds [prompt | chosen | rejected]. The attention mask lets the chosen tokens see the
prompt and the earlier chosen tokens, and the rejected tokens see the prompt and the earlier rejected
tokens (never the chosen ones); the rejected positions restart right after the prompt. Every response
token is then scored from exactly the context it has in the plain layout, so the log-probs, the rewards,
the loss and the gradients are the same while the prompt's tokens are processed once (Wang et al. 2024,
"Accelerating Direct Preference Optimization with Prefix Sharing").

The batch carries what forward.py needs to read it: `predictor` / `target` / `slot` (log-probs, summed per
slot: chosen 0..n-1, rejected n..2n-1) and `last_tokens` (where a reward model reads each response's score).
The mask is boolean (True = may attend); forward.model_inputs adapts it to the model's attention kernel.
"""
from __future__ import annotations

import torch

from ..data.vision import pixel_batch

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


def collate_shared_prefix(features: list[dict], pad_id: int) -> dict:
    rows = [_row(f) for f in features]
    width = max(len(r[0]) for r in rows)
    n = len(rows)
    input_ids = torch.full((n, width), pad_id, dtype=torch.long)
    segment = torch.zeros((n, width), dtype=torch.long)
    position_ids = torch.zeros((n, width), dtype=torch.long)
    predictor, target, slot = [], [], []
    for i, (ids, seg, pos, targets) in enumerate(rows):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        segment[i, :len(seg)] = torch.tensor(seg)
        position_ids[i, :len(pos)] = torch.tensor(pos)
        for position, token, side in targets:
            predictor.append(i * width + position)
            target.append(token)
            slot.append(i + n * side)
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    query, key = segment[:, :, None], segment[:, None, :]
    visible = (key == PROMPT) | (key == query)
    mask = (visible & (key > 0) & (query > 0) & causal) | torch.eye(width, dtype=torch.bool)
    last_chosen = [i * width + len(f["prompt_ids"]) + len(f["chosen_ids"]) - 1 for i, f in enumerate(features)]
    last_rejected = [i * width + len(r[0]) - 1 for i, r in enumerate(rows)]
    batch = {"input_ids": input_ids, "attention_mask": mask[:, None], "position_ids": position_ids,
             "last_tokens": torch.tensor(last_chosen + last_rejected),
             "predictor": torch.tensor(predictor), "target": torch.tensor(target), "slot": torch.tensor(slot),
             "slot_count": torch.tensor(2 * n), "pair_count": torch.tensor(n), "shared_prefix": torch.tensor(1)}
    batch.update(pixel_batch([f.get("images") for f in features], input_ids))
    if any(f.get("margin") is not None for f in features):
        batch["margin"] = torch.tensor([float(f.get("margin") or 0.0) for f in features])
    for key in features[0]:
        if key.startswith("ref_") and all(key in f for f in features):
            batch[key] = torch.tensor([float(f[key]) for f in features])
    return batch
