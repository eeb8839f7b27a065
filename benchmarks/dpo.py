"""DPO throughput and memory: posttrain (`stage: dpo`) vs TRL's DPOTrainer, same model, pairs and batches.

    python benchmarks/dpo.py                      # fp32 and bf16, base model (32000 embedding rows), 30 steps
    python benchmarks/dpo.py --quick              # tiny model, 6 steps: a smoke test
    python benchmarks/dpo.py --steps 12 --embedding-rows 0 --variants posttrain-precompute,trl-precompute

Sigmoid DPO, beta 0.1, full fine-tuning. Runs (each in a fresh child process, per precision):

* posttrain-precompute vs trl-precompute: `dpo.reference: precompute` vs `precompute_ref_log_probs=True`:
  one reference pass over the data before training, no reference model in memory while training;
* posttrain-copy vs trl-copy: `dpo.reference: copy` vs TRL's default (a reference model loaded beside the policy);
* posttrain-prefix: `dpo.reference: precompute` + `dpo.prefix_sharing: true` (the prompt runs once per pair).

The reference pass happens before the first step on both sides and is excluded from tokens/s on both; its
duration is reported in its own column. Everything else: see common.py and benchmarks/README.md.
"""
from __future__ import annotations

import common

VARIANTS = {
    "posttrain-precompute": {"framework": "posttrain", "reference": "precompute",
                             "label": "posttrain, reference: precompute", "short": "posttrain precompute"},
    "trl-precompute": {"framework": "trl", "reference": "precompute",
                       "label": "TRL DPOTrainer, precompute_ref_log_probs", "short": "TRL precompute"},
    "posttrain-copy": {"framework": "posttrain", "reference": "copy", "label": "posttrain, reference: copy",
                       "short": "posttrain copy"},
    "trl-copy": {"framework": "trl", "reference": "copy", "label": "TRL DPOTrainer, ref model (default)",
                 "short": "TRL ref model"},
    "posttrain-prefix": {"framework": "posttrain", "reference": "precompute", "prefix_sharing": True,
                         "label": "posttrain, precompute + prefix_sharing", "short": "posttrain prefix sharing"},
}
COMPARISONS = [("posttrain-precompute", "trl-precompute"), ("posttrain-copy", "trl-copy"),
               ("posttrain-prefix", "trl-precompute"), ("posttrain-prefix", "posttrain-precompute")]

if __name__ == "__main__":
    common.main(__file__, "dpo", VARIANTS, COMPARISONS, __doc__)
