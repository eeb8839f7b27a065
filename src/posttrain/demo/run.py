"""`posttrain demo`: the embedded default, end to end, offline on a CPU.

Writes generated data to OUT/data, then runs the shipped recipe (demo/recipe.yaml, with the full or --quick
sizes as its vars) through the recipe runner: init-model -> pt -> sft -> the preference track (candidates
ranked by the gold rater -> pairs -> rm -> dpo, ppo), the verifiable track (grpo), retrieval (an embedder,
indexes, RAG fine-tuning) -> an eval of every model on held-out prompts. OUT/report.md says what each stage
measurably did (report.py); OUT/recipe.yaml reruns the same pipeline (`posttrain run OUT/recipe.yaml`),
skipping what is unchanged, and rewrites the report (its `report:` hook is `recipe_report`).

`--frontier` adds DPO at two more betas and PPO at two more KL coefficients (each with its eval) to the same
recipe, so the steps of an earlier run are reused, and draws the gold score against KL (OUT/frontier.png).
"""
from __future__ import annotations

import copy
import json
import logging
import time
from importlib import resources
from pathlib import Path

import yaml

from ..recipe import format_results, run_recipe
from . import figures
from .data import write_demo_data
from .report import change, fmt, paired, read, rows, write_report

log = logging.getLogger("posttrain")

FULL = {"data": {"pretrain": 8000, "sft": 8000, "tasks": 2000, "tasks_eval": 250, "chat": 800, "chat_eval": 200},
        "vars": {}}  # the recipe's own vars are the full run
QUICK = {"data": {"pretrain": 300, "sft": 400, "sft_eval": 20, "tasks": 48, "tasks_eval": 16, "chat": 48,
                  "chat_eval": 32, "classify": 30, "classify_eval": 10, "rag_eval": 16},
         # fp32: for a model this small bf16 autocast costs more than it saves
         "vars": {"size": "tiny", "vocab": 1024, "max_length": 128, "bf16": False, "pt_steps": 20, "sft_steps": 120,
                  "batch_size": 8, "rm_steps": 6, "dpo_steps": 4, "ppo_steps": 2, "grpo_steps": 2,
                  "ppo_prompts": 4, "grpo_prompts": 2, "n_eval": 16, "chat_samples": 2, "task_samples": 2,
                  "chat_tokens": 24, "embed_steps": 4, "rag_sft_steps": 4, "rag_tokens": 12}}
# the frontier's extra settings (the recipe's own dpo_beta and ppo_kl are the third point of each)
FRONTIER = {"dpo": ("beta", (0.03, 0.1)), "ppo": ("kl_coef", (0.01, 0.05))}


def demo_recipe(out: Path, quick: bool, frontier: bool = False) -> dict:
    """The shipped recipe with OUT/data and the run's sizes filled into its vars (and the frontier's steps)."""
    recipe = yaml.safe_load(resources.files("posttrain.demo").joinpath("recipe.yaml").read_text())
    settings = QUICK if quick else FULL
    recipe["vars"] = {**recipe["vars"], **settings["vars"], "data": str(out / "data"), "quick": quick,
                      "frontier": frontier}
    recipe["out"] = str(out)
    recipe["report"] = "posttrain.demo.run:recipe_report"  # `posttrain run OUT/recipe.yaml` rewrites report.md
    if frontier:
        recipe["steps"] += frontier_steps(recipe["steps"])
    return recipe


def frontier_steps(steps: list[dict]) -> list[dict]:
    """For each FRONTIER setting: the stage's step with that value, and a copy of the stage's eval step on it."""
    by_name, extra = {s["name"]: s for s in steps}, []
    for stage, (key, values) in FRONTIER.items():
        for value in values:
            name = f"{stage}_{key}_{value}".replace(".", "_")
            train = copy.deepcopy(by_name[stage])
            train["name"], train[stage][key] = name, value
            evaluation = {**copy.deepcopy(by_name[f"eval_{stage}"]), "name": f"eval_{name}", "model": f"${{{name}.output}}"}
            extra += [train, evaluation]
    return extra


def run_demo(out: Path, quick: bool = False, frontier: bool = False) -> dict:
    started = time.time()
    out.mkdir(parents=True, exist_ok=True)
    write_demo_data(out / "data", seed=0, sizes=(QUICK if quick else FULL)["data"])
    recipe = demo_recipe(out, quick, frontier)
    (out / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    log.info("== demo: running %s (%s)", out / "recipe.yaml", ("quick" if quick else "full") + (" + frontier" if frontier else ""))
    results = run_recipe(recipe)  # ends with recipe_report: report.md and demo_result.json
    minutes = (time.time() - started) / 60
    report = read(out / "demo_result.json")
    print("\n" + format_results(results))
    print(f"\n{report['summary']}\nReport: {out / 'report.md'} ({minutes:.1f} min)")
    return report


def recipe_report(out: Path, results: dict, minutes: float, variables: dict) -> dict:
    """The recipe's `report:` hook, called by the runner after the last step."""
    result = write_report(out, results, minutes, bool(variables.get("quick")))
    if variables.get("frontier"):
        write_frontier(out, variables)
    return result


def write_frontier(out: Path, variables: dict) -> None:
    """OUT/frontier.png, OUT/frontier.json and a section appended to report.md: held-out gold score vs KL."""
    sft_rows = rows(out / "eval_sft" / "generations.jsonl")
    sft = read(out / "eval_sft" / "eval.json")
    points, table = {}, []
    for stage, (key, values) in FRONTIER.items():
        own = variables["dpo_beta" if stage == "dpo" else "ppo_kl"]
        for value in sorted((own, *values)):
            step = f"eval_{stage}" if value == own else f"eval_{stage}_{key}_{value}".replace(".", "_")
            e = read(out / step / "eval.json")
            gain = paired([r.get("sampled_score") for r in sft_rows],
                          [r.get("sampled_score") for r in rows(out / step / "generations.jsonl")])
            points.setdefault(stage, []).append((f"{key} {value}", e.get("kl") or 0.0, e.get("sampled_reward") or 0.0))
            table.append({"method": stage, key: value, "gold": e.get("sampled_reward"), "gold_change_se": gain,
                          "kl": e.get("kl"), "perplexity": e.get("perplexity")})
    figures.frontier(points, (sft.get("kl") or 0.0, sft.get("sampled_reward") or 0.0), out / "frontier.png")
    (out / "frontier.json").write_text(json.dumps(table, indent=2))
    lines = ["", "## Frontier: gold score against KL", "",
             "| method | setting | gold score (sampled, change from SFT ± se) | KL to SFT (nats per answer) | perplexity |",
             "|---|---|---|---|---|"]
    for row in table:
        key = "beta" if row["method"] == "dpo" else "kl_coef"
        lines.append(f"| {row['method']} | {key} {row[key]} | {fmt(row['gold'])}{change(row['gold_change_se'])} | "
                     f"{fmt(row['kl'], 2)} | {fmt(row['perplexity'], 2)} |")
    lines += ["", "A smaller beta (DPO) or KL coefficient (PPO) lets the policy move further from SFT; whether the "
              "gold score follows is the question over-optimisation asks.", "", "![gold score against KL](frontier.png)"]
    with open(out / "report.md", "a") as handle:
        handle.write("\n".join(lines) + "\n")
