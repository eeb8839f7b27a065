"""`posttrain demo --quick`: the embedded default runs the whole shipped recipe through the real CLI."""
from __future__ import annotations

import json
import shlex

from transformers import AutoModelForCausalLM

from conftest import run_cli

STEPS = ("init", "pt", "sft", "candidates", "rankings", "pairs", "candidates_eval", "rankings_eval", "pairs_eval",
         "rm", "dpo", "ppo", "grpo", "eval_sft", "eval_dpo", "eval_ppo", "eval_grpo")


def test_quick_demo_runs_the_pipeline_and_writes_the_report(tmp_path):
    out = tmp_path / "demo"
    result = run_cli("demo", "--quick", "--out", out, timeout=900)
    assert "Report:" in result.stdout
    # overall progress: which step of how many, time elapsed (and, once something was timed, time left)
    assert f"step 1 of {len(STEPS)}: init (init-model), 0 s elapsed" in result.stderr
    assert f"step {len(STEPS)} of {len(STEPS)}: eval_grpo (eval)" in result.stderr and " left" in result.stderr
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

    # the report says how the stages were trained, and its eval command reproduces the best model's row
    summary = json.loads((out / "sft" / "summary.json").read_text())
    assert f"Training ran in {summary['precision']} on {summary['machine']}." in report
    command = next(line for line in report.splitlines() if line.startswith("posttrain eval "))
    args = shlex.split(command.split("   #")[0])
    assert "--checker" in args and "--samples" in args
    run_cli(*args[1:], "--out", tmp_path / "again.json", timeout=300)
    again = json.loads((tmp_path / "again.json").read_text())
    measured = json.loads((out / f"eval_{demo['best']}" / "eval.json").read_text())
    for key in ("task_accuracy", "task_reward", "sampled_reward", "perplexity", "rm_score"):
        assert again[key] == measured[key], key

    # the written recipe reruns from a step, skipping every unchanged one before it, and rewrites the report
    (out / "report.md").unlink()
    rerun = run_cli("run", out / "recipe.yaml", "--from", "eval_grpo", timeout=300)
    assert f"1 of {len(STEPS)} steps ran" in rerun.stdout
    rewritten = (out / "report.md").read_text().splitlines()
    assert rewritten[1:] == report.splitlines()[1:]  # all but the title's timing: the same measurements
