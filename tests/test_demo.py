"""`posttrain demo --quick`: the embedded default runs the whole shipped recipe through the real CLI."""
from __future__ import annotations

import json

from transformers import AutoModelForCausalLM

from conftest import run_cli

STEPS = ("init", "pt", "sft", "candidates", "rankings", "pairs", "candidates_eval", "rankings_eval", "pairs_eval",
         "rm", "dpo", "ppo", "grpo", "eval_sft", "eval_dpo", "eval_ppo", "eval_grpo")


def test_quick_demo_runs_the_pipeline_and_writes_the_report(tmp_path):
    out = tmp_path / "demo"
    result = run_cli("demo", "--quick", "--out", out, timeout=900)
    assert "Report:" in result.stdout
    for step in STEPS:  # every step completed (lineage.json is written last)
        assert (out / step / "lineage.json").is_file(), step
    for stage in ("pt", "sft", "rm", "dpo", "ppo", "grpo"):
        summary = json.loads((out / stage / "summary.json").read_text())
        assert summary["steps"] > 0, stage
        assert (out / stage / "plots").is_dir(), stage
    pt_metrics = [json.loads(line) for line in (out / "pt" / "metrics.jsonl").read_text().splitlines()]
    assert pt_metrics[-1]["loss"] < pt_metrics[0]["loss"]
    for stage in ("ppo", "grpo"):  # every RL step logs the mean reward and the KL to the SFT model
        rows = [json.loads(line) for line in (out / stage / "metrics.jsonl").read_text().splitlines()]
        assert rows and all("reward" in r and "kl" in r for r in rows), stage
        assert (out / stage / "plots" / "reward.png").is_file()
    pairs = (out / "pairs" / "pairs.jsonl").read_text().splitlines()
    assert pairs and {"prompt", "chosen", "rejected"} <= set(json.loads(pairs[0]))

    report = (out / "report.md").read_text()
    for model in ("sft", "dpo", "ppo", "grpo"):
        evaluation = json.loads((out / f"eval_{model}" / "eval.json").read_text())
        assert 0.0 <= evaluation["task_accuracy"] <= 1.0 and evaluation["perplexity"] > 1.0
        assert evaluation["kl"] is not None and evaluation["rm_score"] is not None
        assert f"| {model} |" in report
    sft_eval = json.loads((out / "eval_sft" / "eval.json").read_text())
    assert sft_eval["kl"] == 0.0  # the SFT model against itself
    assert sft_eval["rm_pairwise_accuracy"] is not None
    assert "posttrain chat --model" in report and "posttrain serve --model" in report
    demo = json.loads((out / "demo_result.json").read_text())
    assert set(demo["rl"]) == {"ppo", "grpo"}
    # each model's change from SFT is paired over the same prompts: its mean is the difference of the means
    for model in ("dpo", "ppo", "grpo"):
        mean, stderr = demo["changes"][model]["score"]
        expected = demo["evals"][model]["task_reward"] - demo["evals"]["sft"]["task_reward"]
        assert abs(mean - expected) < 1e-9 and stderr >= 0
        mean, _ = demo["changes"][model]["sampled_score"]
        assert abs(mean - (demo["evals"][model]["sampled_reward"] - demo["evals"]["sft"]["sampled_reward"])) < 1e-9
    assert f"({demo['changes']['grpo']['score'][0]:+.3f} ± {demo['changes']['grpo']['score'][1]:.3f})" in report
    assert AutoModelForCausalLM.from_pretrained(out / "grpo") is not None

    # the written recipe reruns: nothing changed, so every step is skipped
    rerun = run_cli("run", out / "recipe.yaml", timeout=300)
    assert f"0 of {len(STEPS)} steps ran" in rerun.stdout
