"""`posttrain demo --quick`: the embedded default runs the whole shipped recipe through the real CLI."""
from __future__ import annotations

import json
import shlex

from transformers import AutoModelForCausalLM

from conftest import run_cli

STEPS = ("init", "pt", "sft", "candidates", "rankings", "pairs", "candidates_eval", "rankings_eval", "pairs_eval",
         "rm", "dpo", "ppo", "grpo", "eval_sft", "eval_dpo", "eval_ppo", "eval_grpo", "tasks_sft", "tasks_dpo",
         "tasks_ppo", "tasks_grpo", "kb_1", "kb_2", "kb_3", "kb_4", "encoder", "embed_pairs", "embedder", "rag_data",
         "rag_sft", "index", "rag_eval_sft", "rag_eval_tuned", "rag_new_sft", "rag_new_tuned")
MODELS = ("sft", "dpo", "ppo", "grpo")


def test_quick_demo_runs_the_pipeline_and_writes_the_report(tmp_path):
    out = tmp_path / "demo"
    result = run_cli("demo", "--quick", "--out", out, timeout=900)
    assert "Report:" in result.stdout
    # overall progress: which step of how many, time elapsed (and, once something was timed, time left)
    assert f"step 1 of {len(STEPS)}: init (init-model), 0 s elapsed" in result.stderr
    assert f"step {len(STEPS)} of {len(STEPS)}: rag_new_tuned (rag-eval)" in result.stderr and " left" in result.stderr
    for step in STEPS:  # every step completed (lineage.json is written last)
        assert (out / step / "lineage.json").is_file(), step
    for stage in ("pt", "sft", "rm", "dpo", "ppo", "grpo", "embedder", "rag_sft"):
        summary = json.loads((out / stage / "summary.json").read_text())
        assert summary["steps"] > 0, stage
        assert (out / stage / "plots").is_dir(), stage
    pt_metrics = [json.loads(line) for line in (out / "pt" / "metrics.jsonl").read_text().splitlines()]
    assert pt_metrics[-1]["loss"] < pt_metrics[0]["loss"]
    for stage in ("ppo", "grpo"):  # every RL step logs the mean reward and the KL to the SFT model
        rows = [json.loads(line) for line in (out / stage / "metrics.jsonl").read_text().splitlines()]
        assert rows and all("reward" in r and "kl" in r for r in rows), stage
        assert (out / stage / "plots" / "reward.png").is_file()
    # PPO's reward is the reward model alone: the gold rater rides along with weight 0, logged, adding nothing
    for row in (json.loads(line) for line in (out / "ppo" / "metrics.jsonl").read_text().splitlines()):
        assert 0.0 <= row["reward/gold"] <= 1.0
        assert abs(row["score"] - row["reward/rm"]) < 1e-5
    # the rankings are the gold rater's, in the format a labelling UI writes
    ranking = json.loads((out / "rankings" / "rankings.jsonl").read_text().splitlines()[0])
    assert ranking["scores"] == sorted(ranking["scores"], reverse=True) and len(ranking["ranks"]) == 4
    pairs = (out / "pairs" / "pairs.jsonl").read_text().splitlines()
    assert pairs and {"prompt", "chosen", "rejected"} <= set(json.loads(pairs[0]))

    report = (out / "report.md").read_text()
    for model in MODELS:
        chat = json.loads((out / f"eval_{model}" / "eval.json").read_text())
        assert 0.0 <= chat["task_reward"] <= 1.0 and chat["perplexity"] > 1.0  # the gold score of greedy answers
        assert chat["kl"] is not None and chat["rm_score"] is not None
        tasks = json.loads((out / f"tasks_{model}" / "eval.json").read_text())
        assert 0.0 <= tasks["task_accuracy"] <= 1.0
        assert f"| {model} |" in report
    sft_eval = json.loads((out / "eval_sft" / "eval.json").read_text())
    assert sft_eval["kl"] == 0.0  # the SFT model against itself
    assert sft_eval["rm_pairwise_accuracy"] is not None
    assert "posttrain chat --model" in report and "posttrain serve --model" in report
    assert (out / "ppo_overoptimisation.png").is_file() and "ppo_overoptimisation.png" in report

    demo = json.loads((out / "demo_result.json").read_text())
    assert {"minutes", "step_minutes", "evals", "rm_pairwise_accuracy", "dpo_eval_margin", "best", "summary",
            "changes", "rl", "gold", "tasks", "kl"} == set(demo)
    assert set(demo["rl"]) == {"ppo", "grpo"} and isinstance(demo["minutes"], float)
    assert demo["gold"]["rm_pairwise_accuracy"] == sft_eval["rm_pairwise_accuracy"]
    assert set(demo["gold"]["score"]) == set(demo["tasks"]["accuracy"]) == set(demo["kl"]) == set(MODELS)
    # each model's change from SFT is paired over the same prompts: its mean is the difference of the means
    for model in MODELS[1:]:
        mean, stderr = demo["gold"]["score_change_se"][model]
        assert abs(mean - (demo["gold"]["score"][model] - demo["gold"]["score"]["sft"])) < 1e-9 and stderr >= 0
        mean, stderr = demo["tasks"]["accuracy_change_se"][model]
        assert abs(mean - (demo["tasks"]["accuracy"][model] - demo["tasks"]["accuracy"]["sft"])) < 1e-9
        mean, _ = demo["changes"][model]["score"]
        assert abs(mean - (demo["evals"][model]["task_reward"] - demo["evals"]["sft"]["task_reward"])) < 1e-9
    assert AutoModelForCausalLM.from_pretrained(out / "grpo") is not None

    # retrieval: recall by mode and answer accuracy without and with the index, for SFT and the RAG-tuned model
    for name in ("rag_eval_sft", "rag_eval_tuned", "rag_new_sft", "rag_new_tuned"):
        rag = json.loads((out / name / "rag_eval.json").read_text())
        assert set(rag["by_mode"]) == {"hybrid", "bm25", "dense"} and rag["answer_k"] == 1
        assert 0.0 <= rag["answer_accuracy_with_rag"] <= 1.0
    assert "Retrieval-augmented generation" in report

    # the report says how the stages were trained, and its eval command reproduces the best model's row
    summary = json.loads((out / "sft" / "summary.json").read_text())
    assert f"Training ran in {summary['precision']} on {summary['machine']}" in report
    command = next(line for line in report.splitlines() if line.startswith("posttrain eval "))
    args = shlex.split(command.split("   #")[0])
    assert "--checker" in args and "--samples" in args
    run_cli(*args[1:], "--out", tmp_path / "again.json", timeout=300)
    again = json.loads((tmp_path / "again.json").read_text())
    measured = json.loads((out / f"eval_{demo['best']}" / "eval.json").read_text())
    for key in ("task_reward", "sampled_reward", "perplexity", "rm_score"):
        assert again[key] == measured[key], key

    # the written recipe reruns from a step, skipping every unchanged one before it, and rewrites the report
    (out / "report.md").unlink()
    rerun = run_cli("run", out / "recipe.yaml", "--from", "rag_new_tuned", timeout=300)
    assert f"1 of {len(STEPS)} steps ran" in rerun.stdout
    rewritten = (out / "report.md").read_text().splitlines()
    assert rewritten[1:] == report.splitlines()[1:]  # all but the title's timing: the same measurements


def test_frontier_adds_dpo_and_ppo_settings_to_the_same_recipe(tmp_path):
    """`posttrain demo --frontier` = the demo's recipe (its steps reused) + DPO at 2 more betas and PPO at 2
    more KL coefficients, each measured by a copy of its stage's eval step; the whole recipe validates."""
    from posttrain.demo.run import FRONTIER, demo_recipe
    from posttrain.recipe import resolve

    base = demo_recipe(tmp_path, quick=True)
    recipe = demo_recipe(tmp_path, quick=True, frontier=True)
    assert recipe["steps"][:len(base["steps"])] == base["steps"]
    extra = {s["name"]: s for s in recipe["steps"][len(base["steps"]):]}
    assert len(extra) == 2 * sum(len(values) for _, values in FRONTIER.values())
    assert extra["dpo_beta_0_1"]["dpo"]["beta"] == 0.1 and extra["ppo_kl_coef_0_05"]["ppo"]["kl_coef"] == 0.05
    assert extra["eval_dpo_beta_0_1"]["model"] == "${dpo_beta_0_1.output}"
    steps = {s.name: s for s in resolve(recipe)}
    assert steps["ppo_kl_coef_0_01"].config["ppo"]["kl_coef"] == 0.01
    assert steps["eval_ppo_kl_coef_0_01"].config["reference"] == str(tmp_path / "sft")
