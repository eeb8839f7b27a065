"""Reward-model throughput and memory: posttrain (`stage: rm`) vs TRL's RewardTrainer, same model, pairs, batches.

    python benchmarks/rm.py                       # fp32 and bf16, base model (32000 embedding rows), 30 steps
    python benchmarks/rm.py --quick               # tiny model, 6 steps: a smoke test
    python benchmarks/rm.py --steps 12 --embedding-rows 0

Bradley-Terry loss, no margin, no reward centering on either side (`rm.center_coef: 0`,
`center_rewards_coefficient=None`), full fine-tuning. Both sides load the same sequence-classification
checkpoint (the parent writes it with posttrain's seeded reward-head init), so both start from the same head.
TRL gets the same conversations (prompt/chosen/rejected messages) and its own tokenization, checked against
posttrain's ids. posttrain's `finish` (the reward offset over the training responses, one extra forward pass
after the last step) is outside the timed steps. See common.py and benchmarks/README.md.
"""
from __future__ import annotations

import common

VARIANTS = {
    "posttrain": {"framework": "posttrain", "label": "posttrain (stage: rm)", "short": "posttrain"},
    "trl": {"framework": "trl", "label": "TRL RewardTrainer", "short": "TRL"},
    "posttrain-prefix": {"framework": "posttrain", "prefix_sharing": True,
                         "label": "posttrain (stage: rm, prefix_sharing)", "short": "posttrain prefix sharing"},
}
COMPARISONS = [("posttrain", "trl"), ("posttrain-prefix", "trl")]

if __name__ == "__main__":
    common.main(__file__, "rm", VARIANTS, COMPARISONS, __doc__)
