"""`posttrain demo`: the embedded default, end to end, offline on a CPU.

Writes generated data to OUT/data, then runs the shipped recipe (demo/recipe.yaml, with the full or --quick
sizes as its vars) through the recipe runner: init-model -> pt -> sft -> candidates -> rankings -> pairs ->
rm -> dpo -> ppo -> grpo -> an eval of every model on held-out prompts. OUT/report.md says what each stage
measurably did; OUT/recipe.yaml reruns the same pipeline (`posttrain run OUT/recipe.yaml`), skipping what
is unchanged, and rewrites the report (its `report:` hook is `recipe_report`).
"""
from __future__ import annotations

import json
import logging
import math
import shlex
import time
from importlib import resources
from pathlib import Path

import yaml

from ..recipe import format_results, run_recipe
from .data import write_demo_data

log = logging.getLogger("posttrain")

FULL = {"data": {"pretrain": 12000, "sft": 8000, "tasks": 2000, "tasks_eval": 250},
        "vars": {}}  # the recipe's own vars are the full run
QUICK = {"data": {"pretrain": 600, "sft": 800, "tasks": 48, "tasks_eval": 16},
         "vars": {"size": "tiny", "vocab": 1024, "max_length": 128, "pt_steps": 30, "sft_steps": 60,
                  "batch_size": 8, "rm_steps": 10, "dpo_steps": 6, "ppo_steps": 3, "grpo_steps": 3,
                  "ppo_prompts": 4, "grpo_prompts": 2, "n_eval": 16, "eval_samples": 2}}
MODELS = ("sft", "dpo", "ppo", "grpo")


def demo_recipe(out: Path, quick: bool) -> dict:
    """The shipped recipe with OUT/data and the run's sizes filled into its vars."""
    recipe = yaml.safe_load(resources.files("posttrain.demo").joinpath("recipe.yaml").read_text())
    settings = QUICK if quick else FULL
    recipe["vars"] = {**recipe["vars"], **settings["vars"], "data": str(out / "data"), "quick": quick}
    recipe["out"] = str(out)
    recipe["report"] = "posttrain.demo.run:recipe_report"  # `posttrain run OUT/recipe.yaml` rewrites report.md
    return recipe


def run_demo(out: Path, quick: bool = False) -> dict:
    started = time.time()
    out.mkdir(parents=True, exist_ok=True)
    write_demo_data(out / "data", seed=0, sizes=(QUICK if quick else FULL)["data"])
    recipe = demo_recipe(out, quick)
    (out / "recipe.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    log.info("== demo: running %s (%s)", out / "recipe.yaml", "quick" if quick else "full")
    results = run_recipe(recipe)  # ends with recipe_report: report.md and demo_result.json
    minutes = (time.time() - started) / 60
    report = _read(out / "demo_result.json")
    print("\n" + format_results(results))
    print(f"\n{report['summary']}\nReport: {out / 'report.md'} ({minutes:.1f} min)")
    return report


# ------------------------------------------------------------------------------------------------ report

def recipe_report(out: Path, results: dict, minutes: float, variables: dict) -> dict:
    """The recipe's `report:` hook, called by the runner after the last step."""
    return write_report(out, results, minutes, bool(variables.get("quick")))


def _read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _metrics(out: Path, stage: str) -> list[dict]:
    path = out / stage / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _window_mean(rows: list[dict], key: str, first: bool) -> float | None:
    values = [r[key] for r in rows if key in r]
    if not values:
        return None
    k = max(1, len(values) // 4)
    part = values[:k] if first else values[-k:]
    return sum(part) / len(part)


def _fmt(value, digits: int = 3, percent: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:.0%}" if percent else f"{value:.{digits}f}"


def _delta(value, base) -> str:
    if value is None or base is None:
        return ""
    return f" ({value - base:+.3f})"


def _generations(out: Path, model: str) -> list[dict]:
    path = out / f"eval_{model}" / "generations.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _paired(out: Path, model: str, key: str) -> tuple[float, float] | None:
    """The mean and standard error of `model`'s per-prompt `key` minus the SFT model's, on the same held-out
    prompts (each eval writes them in the tasks file's order)."""
    pairs = [(a.get(key), b.get(key)) for a, b in zip(_generations(out, "sft"), _generations(out, model))
             if a.get("prompt") == b.get("prompt")]
    diffs = [b - a for a, b in pairs if a is not None and b is not None]
    if len(diffs) < 2:
        return None
    mean = sum(diffs) / len(diffs)
    variance = sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1)
    return mean, math.sqrt(variance / len(diffs))


def _change(out: Path, model: str, key: str, value, base) -> str:
    """The change from SFT and its paired standard error, as " (+0.012 ± 0.005)"; just the change when
    there are no per-prompt numbers."""
    if model == "sft":
        return ""
    paired = _paired(out, model, key)
    return f" ({paired[0]:+.3f} ± {paired[1]:.3f})" if paired else _delta(value, base)


RL_KEY = {"ppo": "score", "grpo": "reward"}  # the training metric each RL stage's row reports


def _model_tables(out: Path, evals: dict) -> list[str]:
    """Every model on the held-out tasks, then its accuracy by task kind."""
    sft = evals["sft"]
    lines = [f"## Held-out tasks ({sft.get('tasks') or 0} prompts, greedy answers)", "",
             "| model | task accuracy | checker reward | sampled reward (T=1) | reward-model score | "
             "KL to SFT (per answer) | perplexity (held-out chats) |",
             "|---|---|---|---|---|---|---|"]
    for m in MODELS:
        e = evals[m]
        lines.append(f"| {m} | {_fmt(e.get('task_accuracy'), percent=True)} | {_fmt(e.get('task_reward'))}"
                     f"{_change(out, m, 'score', e.get('task_reward'), sft.get('task_reward'))} | "
                     f"{_fmt(e.get('sampled_reward'))}"
                     f"{_change(out, m, 'sampled_score', e.get('sampled_reward'), sft.get('sampled_reward'))} | "
                     f"{_fmt(e.get('rm_score'))} | {_fmt(e.get('kl'))} | {_fmt(e.get('perplexity'), 2)} |")
    kinds = sorted(sft.get("task_accuracy_by_kind") or {})
    lines += ["", "Task accuracy counts exact answers; the checker reward gives 1 for an exact answer and up to "
              "0.5 for a close one (the reward PPO and GRPO optimise). The sampled reward is its mean over "
              f"{sft.get('samples') or 0} answers per prompt sampled at temperature 1, what RL optimises. In "
              "brackets: the change from SFT ± its standard error over the prompts (per-prompt differences on "
              "the same prompts); a change within about two standard errors of 0 is noise. KL is the summed "
              "log-ratio to the SFT model on each model's own greedy answers.", "",
              "Accuracy by task kind:", "", "| model | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    for m in MODELS:
        by_kind = evals[m].get("task_accuracy_by_kind") or {}
        lines.append(f"| {m} | " + " | ".join(_fmt(by_kind[k], percent=True) for k in sorted(by_kind)) + " |")
    return lines


def _stage_table(out: Path, sft: dict, rm_eval: dict, dpo_eval: dict, rl: dict) -> list[str]:
    """One row per training stage: what it measurably did."""
    lines = ["## What each stage did", "", "| stage | measured |", "|---|---|",
             f"| pt | held-out loss {_fmt((_read(out / 'pt' / 'summary.json').get('final_eval') or {}).get('eval_loss'))} |",
             f"| sft | held-out chat perplexity {_fmt(sft.get('perplexity'), 2)}, task accuracy "
             f"{_fmt(sft.get('task_accuracy'), percent=True)} |",
             f"| rm | pairwise accuracy on {sft.get('rm_pairs') or 0} held-out pairs: "
             f"{_fmt(sft.get('rm_pairwise_accuracy'), percent=True)} (chance 50%), mean margin "
             f"{_fmt(sft.get('rm_margin'))}; training eval accuracy {_fmt(rm_eval.get('eval_accuracy'), percent=True)} |",
             f"| dpo | held-out chosen-rejected margin 0 at the start (policy = reference) -> "
             f"{_fmt(dpo_eval.get('eval_margin'))}, preference accuracy {_fmt(dpo_eval.get('eval_accuracy'), percent=True)} |"]
    for stage, key in RL_KEY.items():
        rows = rl[stage]
        lines.append(f"| {stage} | training {key} (first quarter -> last quarter of {len(rows)} steps): "
                     f"{_fmt(_window_mean(rows, key, True))} -> {_fmt(_window_mean(rows, key, False))}; "
                     f"KL to SFT per response at the end {_fmt(_window_mean(rows, 'kl', False))} |")
    return lines


PLOTS = ("loss", "reward", "score", "kl", "eval_accuracy", "eval_margin",
         "explained_variance", "value_loss", "clip_fraction")  # the last three diagnose PPO's critic and steps


def _plot_links(out: Path) -> list[str]:
    lines = ["## Plots", ""]
    for stage in ("pt", "sft", "rm", "dpo", "ppo", "grpo"):
        plots = {p.stem: p for p in (out / stage / "plots").glob("*.png")} if (out / stage / "plots").is_dir() else {}
        wanted = [plots[name] for name in PLOTS if name in plots]
        if wanted:
            lines.append(f"- {stage}: " + ", ".join(f"[{p.stem}]({p.relative_to(out)})" for p in wanted))
    lines += ["", "For PPO: explained variance near 1 means the critic predicts the returns (near 0 or below: its "
              "advantages are noise); clip fraction is the share of tokens whose update was clipped."]
    notes = [f"- {stage}: {note}" for stage in ("pt", "sft", "rm", "dpo", "ppo", "grpo")
             for note in _read(out / stage / "summary.json").get("notes") or []]
    return lines + (["", "Seen in the curves:", "", *notes] if notes else [])


def _eval_command(out: Path, model: str) -> str:
    """The `posttrain eval` command that measured `model`'s row, from its step's lineage.json (so it holds
    the checker, the sample count and every other setting the recipe used)."""
    from ..recipe import EvalStep

    config = _read(out / f"eval_{model}" / "lineage.json").get("config") or {}
    parts = ["posttrain", "eval"]
    for key, value in config.items():
        field = EvalStep.model_fields.get(key)
        if value is None or (field is not None and not field.is_required() and value == field.default):
            continue
        parts += [f"--{key.replace('_', '-')}", str(value)]
    return shlex.join(parts)


def _machine(out: Path) -> str:
    """The precision and machine every training stage ran with (from their summary.json)."""
    seen = {(s.get("precision"), s.get("machine")) for stage in ("pt", "sft", "rm", "dpo", "ppo", "grpo")
            if (s := _read(out / stage / "summary.json")) and s.get("precision")}
    if not seen:
        return ""
    kinds = "; ".join(f"{precision} on {machine}" for precision, machine in sorted(seen))
    return (f"Training ran in {kinds}. Numbers differ between machines that train in bf16 (fast bf16: AMX or "
            f"AVX512-BF16 CPUs, most GPUs) and fp32 machines; compare runs of the same kind.")


def write_report(out: Path, results: dict, minutes: float, quick: bool) -> dict:
    """OUT/report.md (the tables, plots and how to use the result) and OUT/demo_result.json."""
    evals = {m: _read(out / f"eval_{m}" / "eval.json") for m in MODELS}
    sft = evals["sft"]
    rm_eval = _read(out / "rm" / "summary.json").get("final_eval") or {}
    dpo_eval = _read(out / "dpo" / "summary.json").get("final_eval") or {}
    rl = {s: _metrics(out, s) for s in RL_KEY}

    step_minutes = sum(_read(Path(r["lineage"])).get("runtime_s", 0.0) for r in results.values()) / 60
    skipped = [name for name, r in results.items() if r["skipped"]]
    timing = (f"{step_minutes:.1f} minutes of steps" + (f"; this run {minutes:.1f} minutes, reusing {', '.join(skipped)} "
              "(unchanged since an earlier run)" if skipped else ""))
    best = max(MODELS, key=lambda m: evals[m].get("task_reward") or -1)
    lines = [f"# posttrain demo report ({'quick' if quick else 'full'} run, {timing})", "",
             "Every number below was measured by this run. A tiny Qwen2-shaped model was initialised at random, "
             "pretrained on generated text, fine-tuned on generated instructions, and then improved by each "
             "preference and RL method from the SFT model. No held-out prompt appears in any training file; the "
             "small fact sets they draw on (30 words, one-digit numbers, 25 names) do, in other phrasings and "
             "combinations.", "", *([_machine(out), ""] if _machine(out) else []),
             *(["**A --quick run** is a smoke test of the whole pipeline on a tiny model with a few steps per "
                "stage: its numbers show that every stage runs, not what the methods can do. Run the full "
                "demo (`posttrain demo`) for that.", ""] if quick else []),
             *_model_tables(out, evals), "", *_stage_table(out, sft, rm_eval, dpo_eval, rl), "", *_plot_links(out),
             "", "## Use the result", "", "Every model directory loads with `AutoModelForCausalLM.from_pretrained`.",
             "", "```bash", f"posttrain chat --model {out / best}",
             f"posttrain serve --model {out / best} --port 8000   # OpenAI-compatible: /v1/chat/completions",
             f"{_eval_command(out, best)}   # reproduces the {best} row above",
             f"posttrain run {out / 'recipe.yaml'} --from ppo   # rerun from a step; unchanged steps are skipped",
             "```", "", "Each step's resolved config, inputs and parents are in its `lineage.json`."]
    (out / "report.md").write_text("\n".join(lines) + "\n")

    summary = "; ".join(f"{m}: accuracy {_fmt(evals[m].get('task_accuracy'), percent=True)}, checker reward "
                        f"{_fmt(evals[m].get('task_reward'))}" for m in MODELS)
    result = {"minutes": round(minutes, 2), "step_minutes": round(step_minutes, 2), "evals": evals,
              "rm_pairwise_accuracy": sft.get("rm_pairwise_accuracy"), "dpo_eval_margin": dpo_eval.get("eval_margin"),
              "best": best, "summary": summary,
              # each model's change from SFT on the same held-out prompts: [mean, standard error]
              "changes": {m: {key: _paired(out, m, key) for key in ("score", "sampled_score")} for m in MODELS[1:]},
              "rl": {s: {"first": _window_mean(rl[s], key, True), "last": _window_mean(rl[s], key, False),
                         "kl_last": _window_mean(rl[s], "kl", False)} for s, key in RL_KEY.items()}}
    (out / "demo_result.json").write_text(json.dumps(result, indent=2))
    return result
