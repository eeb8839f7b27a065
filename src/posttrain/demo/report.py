"""The demo's report: OUT/report.md (what every model measurably does, against the goals) and OUT/demo_result.json.

Everything is read from what the steps wrote: each eval step's eval.json and generations.jsonl (one row per
held-out prompt, in the prompt file's order, so two models' rows pair up prompt by prompt), the training
stages' summary.json and metrics.jsonl, and the RAG evals' rag_eval.json. A change from SFT is the mean of
the per-prompt differences, with its standard error sd / sqrt(n): the prompts are the same for both models.
"""
from __future__ import annotations

import json
import math
import shlex
from pathlib import Path

from . import figures
from .gold import parts

MODELS = ("sft", "dpo", "ppo", "grpo")
STAGES = ("pt", "sft", "rm", "dpo", "ppo", "grpo", "embedder", "rag_sft")
RL_KEY = {"ppo": "score", "grpo": "reward"}  # the training metric each RL stage's row reports
PERPLEXITY_NOTE = 0.10  # a relative change of held-out chat perplexity beyond this is pointed out
GOALS = {"rm": 0.90, "gold": 0.25, "preferred": 0.30, "tasks": 0.10, "recall": 0.90, "rag": 0.80}


def read(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def window_mean(values: list[float], first: bool) -> float | None:
    if not values:
        return None
    k = max(1, len(values) // 4)
    part = values[:k] if first else values[-k:]
    return sum(part) / len(part)


def fmt(value, digits: int = 3, percent: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:.0%}" if percent else f"{value:.{digits}f}"


def paired(base: list, other: list) -> tuple[float, float] | None:
    """Mean and standard error of other - base over the prompts both have a value for."""
    diffs = [b - a for a, b in zip(base, other) if a is not None and b is not None]
    if len(diffs) < 2:
        return None
    mean = sum(diffs) / len(diffs)
    variance = sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1)
    return mean, math.sqrt(variance / len(diffs))


def change(pair, percent: bool = False) -> str:
    if pair is None:
        return ""
    if percent:
        return f" ({100 * pair[0]:+.1f} ± {100 * pair[1]:.1f} pts)"
    return f" ({pair[0]:+.3f} ± {pair[1]:.3f})"


class Run:
    """What the steps of one demo run wrote, read once."""

    def __init__(self, out: Path):
        self.out = out
        self.chat = {m: read(out / f"eval_{m}" / "eval.json") for m in MODELS}
        self.tasks = {m: read(out / f"tasks_{m}" / "eval.json") for m in MODELS}
        self.chat_rows = {m: rows(out / f"eval_{m}" / "generations.jsonl") for m in MODELS}
        self.task_rows = {m: rows(out / f"tasks_{m}" / "generations.jsonl") for m in MODELS}
        self.rag = {name: read(out / name / "rag_eval.json")
                    for name in ("rag_eval_sft", "rag_eval_tuned", "rag_new_sft", "rag_new_tuned")}
        self.metrics = {s: rows(out / s / "metrics.jsonl") for s in ("ppo", "grpo")}

    def column(self, model: str, key: str, tasks: bool = False) -> list:
        return [r.get(key) for r in (self.task_rows if tasks else self.chat_rows)[model]]

    def change(self, model: str, key: str, tasks: bool = False):
        return paired(self.column("sft", key, tasks), self.column(model, key, tasks))

    def preferred(self, model: str) -> tuple[float, float] | None:
        """Share of prompts whose greedy answer the gold rater prefers to SFT's (ties half), with its se."""
        wins = [1.0 if b > a else 0.5 if b == a else 0.0
                for a, b in zip(self.column("sft", "score"), self.column(model, "score")) if a is not None and b is not None]
        if len(wins) < 2:
            return None
        mean = sum(wins) / len(wins)
        return mean, math.sqrt(sum((w - mean) ** 2 for w in wins) / (len(wins) - 1) / len(wins))

    def pass_at(self, model: str) -> float | None:
        """Share of task prompts with at least one exact sampled answer (pass@k, k = the samples per prompt)."""
        scores = [s for s in self.column(model, "sampled_score", tasks=True) if s is not None]
        return sum(s > 0 for s in scores) / len(scores) if scores else None


# ------------------------------------------------------------------------------------------------ sections

def goals_table(run: Run) -> tuple[list[str], dict]:
    sft = run.chat["sft"]
    rm = sft.get("rm_pairwise_accuracy")
    lines = ["## Goals", "", "| goal | measured | met |", "|---|---|---|"]
    met = {}

    def row(name: str, goal: str, measured: str, ok: bool | None) -> None:
        met[name] = ok
        lines.append(f"| {goal} | {measured} | {'yes' if ok else 'no' if ok is not None else '-'} |")

    row("rm", f"the reward model orders held-out pairs as the gold rater does (>= {GOALS['rm']:.0%})",
        f"{fmt(rm, percent=True)} of {sft.get('rm_pairs') or 0} pairs", None if rm is None else rm >= GOALS["rm"])
    for m in ("dpo", "ppo"):
        gain, pref = run.change(m, "sampled_score"), run.preferred(m)
        ok = None if gain is None else gain[0] >= GOALS["gold"] or (pref is not None and pref[0] - 0.5 >= GOALS["preferred"])
        row(m, f"{m} raises the gold score over SFT by >= {GOALS['gold']} (or wins >= {50 + 100 * GOALS['preferred']:.0f}% "
               "against SFT)", f"{fmt(gain and gain[0])} ± {fmt(gain and gain[1])} (sampled); wins "
            f"{fmt(pref and pref[0], percent=True)} of prompts (greedy); KL {fmt(run.chat[m].get('kl'), 2)}", ok)
    grpo = run.change("grpo", "score", tasks=True)
    row("grpo", f"grpo raises greedy task accuracy by >= {100 * GOALS['tasks']:.0f} points",
        f"{change(grpo, percent=True).strip(' ()') or '-'}", None if grpo is None else grpo[0] >= GOALS["tasks"])
    flagged = [m for m in MODELS[1:] if relative_perplexity(run, m) is not None
               and abs(relative_perplexity(run, m)) > PERPLEXITY_NOTE]
    lines.append(f"| no stage moves held-out chat perplexity by more than {PERPLEXITY_NOTE:.0%} unremarked | "
                 + (", ".join(f"{m} {relative_perplexity(run, m):+.0%}" for m in flagged) + " (explained below)"
                    if flagged else "all within 10%") + " | yes |")
    hybrid = ((run.rag["rag_eval_sft"].get("by_mode") or {}).get("hybrid") or {}).get("recall@k")
    row("recall", f"hybrid recall@5 on held-out questions >= {GOALS['recall']}", fmt(hybrid),
        None if hybrid is None else hybrid >= GOALS["recall"])
    tuned, new = (run.rag[n].get("answer_accuracy_with_rag") for n in ("rag_eval_tuned", "rag_new_tuned"))
    row("rag", f"RAG-tuned answer accuracy >= {GOALS['rag']} (held-out questions; the promotion added after "
               "training)", f"{fmt(tuned)}; {fmt(new)}", None if tuned is None else tuned >= GOALS["rag"] and (new or 0) >= GOALS["rag"])
    return lines, met


def relative_perplexity(run: Run, model: str) -> float | None:
    base, value = run.chat["sft"].get("perplexity"), run.chat[model].get("perplexity")
    return None if base is None or value is None else value / base - 1


def chat_table(run: Run) -> list[str]:
    n, k = run.chat["sft"].get("tasks") or 0, run.chat["sft"].get("samples") or 0
    lines = [f"## The restaurant bot on {n} held-out customer questions, scored by the gold rater", "",
             f"| model | gold score, {k} sampled answers (T=1) | gold score, greedy answer | wins against SFT "
             "(greedy) | reward-model score | KL to SFT (nats per answer) | perplexity (held-out chats) |",
             "|---|---|---|---|---|---|---|"]
    for m in MODELS:
        e = run.chat[m]
        pref = run.preferred(m) if m != "sft" else None
        ppl = relative_perplexity(run, m)
        lines.append(f"| {m} | {fmt(e.get('sampled_reward'))}{change(run.change(m, 'sampled_score')) if m != 'sft' else ''}"
                     f" | {fmt(e.get('task_reward'))}{change(run.change(m, 'score')) if m != 'sft' else ''} | "
                     f"{fmt(pref and pref[0], percent=True) if pref else '-'} | {fmt(e.get('rm_score'), 2)} | "
                     f"{fmt(e.get('kl'), 2)} | {fmt(e.get('perplexity'), 2)}"
                     f"{f' ({ppl:+.0%})' if ppl is not None and m != 'sft' else ''} |")
    lines += ["", "In brackets: the change from SFT ± its standard error, paired over the same prompts (a change "
              "within about two standard errors of 0 is noise). Wins: the share of prompts whose greedy answer the "
              "gold rater scores above SFT's (ties count half; 50% = no better). KL is the summed log-ratio to the "
              "SFT model on the model's own greedy answers. Perplexity is on held-out chats in the SFT data's mix of "
              "styles: a model that stopped writing rude, terse or rambling answers finds them less likely, so "
              "its perplexity there rises; that is the price of the preference, not damage."]
    notes = [f"{m}'s held-out chat perplexity moved by {relative_perplexity(run, m):+.0%} "
             f"({fmt(run.chat['sft'].get('perplexity'), 2)} -> {fmt(run.chat[m].get('perplexity'), 2)})"
             for m in MODELS[1:] if relative_perplexity(run, m) is not None
             and abs(relative_perplexity(run, m)) > PERPLEXITY_NOTE]
    if notes:
        lines += ["", "Beyond 10%: " + "; ".join(notes) + "."]
    lines += ["", "What the greedy answers are like (share of answers):", "",
              "| model | right fact | complete sentence | concise | rude | out of persona |", "|---|---|---|---|---|---|"]
    for m in MODELS:
        got = [parts(str(r.get("answer")), r.get("response") or "") for r in run.chat_rows[m]]
        share = lambda key: sum(float(g[key] if key not in ("fact", "concise") else g[key] >= 1) for g in got) / len(got) if got else None  # noqa: E731,E501
        lines.append(f"| {m} | " + " | ".join(fmt(share(key), percent=True) for key in
                                             ("fact", "sentence", "concise", "rude", "out_of_persona")) + " |")
    return lines


def examples(run: Run, count: int = 5) -> list[str]:
    """`count` held-out questions, one of each kind where possible, with every model's greedy answer."""
    base = run.chat_rows["sft"]
    if not base:
        return []
    chosen, kinds = [], set()
    for i, r in enumerate(base):
        if r.get("kind") not in kinds:
            chosen.append(i)
            kinds.add(r.get("kind"))
        if len(chosen) == count:
            break
    lines = ["## Five held-out questions, every model's answer", "",
             "Greedy answers; the gold score in brackets; the facts the rater checks after the question."]
    for i in chosen:
        lines += ["", f"**{base[i]['prompt']}** (facts: `{base[i].get('answer')}`)", "", "| model | answer | gold |",
                  "|---|---|---|"]
        for m in MODELS:
            r = run.chat_rows[m][i] if i < len(run.chat_rows[m]) else {}
            text = " ".join(str(r.get("response", "")).split()).replace("|", "\\|")
            lines.append(f"| {m} | {text or '(empty)'} | {fmt(r.get('score'), 2)} |")
    return lines


def rm_section(run: Run, plot: Path | None) -> list[str]:
    sft = run.chat["sft"]
    rl = run.metrics["ppo"]
    proxy, gold = [r.get("reward/rm") for r in rl if "reward/rm" in r], [r.get("reward/gold") for r in rl if "reward/gold" in r]
    kl = [r.get("kl") for r in rl if "kl" in r]
    lines = ["## The reward model, and what over-optimising it looks like", "",
             f"The reward model (Bradley-Terry, from the SFT model) learned only from the gold rater's rankings of "
             f"sampled answers. On {sft.get('rm_pairs') or 0} pairs from held-out questions it orders "
             f"{fmt(sft.get('rm_pairwise_accuracy'), percent=True)} as the gold rater does (chance 50%; mean margin "
             f"{fmt(sft.get('rm_margin'), 2)}).", "",
             "PPO maximises that reward model, never the gold rater; the gold rater's score of the same samples is "
             "only logged (a weight-0 reward source). Over PPO training (first quarter of the steps -> last "
             f"quarter): reward-model score {fmt(window_mean(proxy, True), 2)} -> {fmt(window_mean(proxy, False), 2)}, "
             f"gold score {fmt(window_mean(gold, True))} -> {fmt(window_mean(gold, False))}, KL to SFT "
             f"{fmt(window_mean(kl, True), 2)} -> {fmt(window_mean(kl, False), 2)} nats per answer."]
    if gold:
        best = max(range(len(gold)), key=lambda i: gold[i])
        lines[-1] += (f" The gold score of a single step peaked at {fmt(gold[best])} (step {best + 1} of {len(gold)}, KL "
                      f"{fmt(kl[best] if best < len(kl) else None, 2)}).")
    lines += ["", "Over-optimisation is the proxy rising while the gold score stops rising or falls: the policy "
              "finds what the reward model over-rewards (a phrase, a length) rather than what the rater wants. The "
              "KL penalty to the SFT model is what holds it back; `posttrain demo --frontier` traces the gold score "
              "against KL for three KL coefficients and three DPO betas."]
    if plot:
        lines += ["", f"![reward model score and gold score against KL during PPO]({plot.relative_to(run.out)})"]
    return lines


def tasks_table(run: Run) -> list[str]:
    sft = run.tasks["sft"]
    k = sft.get("samples") or 0
    lines = [f"## Verifiable tasks ({sft.get('tasks') or 0} held-out prompts, exact answers)", "",
             f"| model | greedy accuracy | sampled accuracy (T=1) | pass@{k} | KL to SFT (nats per answer) |",
             "|---|---|---|---|---|"]
    for m in MODELS:
        t = run.tasks[m]
        lines.append(f"| {m} | {fmt(t.get('task_accuracy'), percent=True)}"
                     f"{change(run.change(m, 'score', tasks=True), percent=True) if m != 'sft' else ''} | "
                     f"{fmt(t.get('sampled_accuracy'), percent=True)} | {fmt(run.pass_at(m), percent=True)} | "
                     f"{fmt(t.get('kl'), 2)} |")
    kinds = sorted(sft.get("task_accuracy_by_kind") or {})
    lines += ["", f"GRPO samples 8 answers per training prompt and reinforces the exact ones (the task checker is its "
              f"rule reward). It can only reinforce what the SFT model sometimes gets right: pass@{k} (a prompt "
              f"counts when any of its {k} samples is exact) is that room.", "",
              "Greedy accuracy by task kind:", "", "| model | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    for m in MODELS:
        by_kind = run.tasks[m].get("task_accuracy_by_kind") or {}
        lines.append(f"| {m} | " + " | ".join(fmt(by_kind.get(kind), percent=True) for kind in kinds) + " |")
    return lines


def rag_section(run: Run) -> list[str]:
    held, new = run.rag["rag_eval_sft"], run.rag["rag_new_sft"]
    if not held:
        return []
    lines = ["## Retrieval-augmented generation", "",
             "The restaurant's knowledge lives in documents (menu, hours, policies, reviews, news, and the week's "
             "promotions: an offer and a code word for each day) that change every week. RAG fine-tuning (RAFT: the "
             "best retrieved chunk, or for 10% of the questions a distractor and the answer 'not in the sources') "
             "used the weekly snapshots before training; the evaluation asks held-out questions of the snapshot "
             "after training, whose promotions are in no training file and no model's weights. Index: "
             f"{held.get('chunks')} chunks; embedder: the demo's own, trained on question-chunk pairs.",
             "", f"Retrieval on {held.get('questions')} held-out questions (k = {held.get('k')}):", "",
             "| mode | recall@5 | MRR@5 | nDCG@5 |", "|---|---|---|---|"]
    for mode, m in (held.get("by_mode") or {}).items():
        lines.append(f"| {mode} | {fmt(m.get('recall@k'))} | {fmt(m.get('mrr@k'))} | {fmt(m.get('ndcg@k'))} |")
    lines += ["", f"Answer accuracy (the answer string in a greedy answer; with retrieval: {held.get('answer_mode')}, "
              f"{held.get('answer_k')} chunks in the prompt):", "",
              f"| model | held-out questions ({held.get('answered')}), without retrieval | with retrieval | the new "
              f"promotion ({new.get('answered')}), without retrieval | with retrieval |", "|---|---|---|---|---|"]
    for label, a, b in (("sft", held, new), ("rag_sft (RAG-tuned)", run.rag["rag_eval_tuned"], run.rag["rag_new_tuned"])):
        lines.append(f"| {label} | {fmt(a.get('answer_accuracy_without_rag'))} | {fmt(a.get('answer_accuracy_with_rag'))} | "
                     f"{fmt(b.get('answer_accuracy_without_rag'))} | {fmt(b.get('answer_accuracy_with_rag'))} |")
    return lines


def stage_table(run: Run) -> list[str]:
    out = run.out
    rm_eval = read(out / "rm" / "summary.json").get("final_eval") or {}
    dpo_eval = read(out / "dpo" / "summary.json").get("final_eval") or {}
    lines = ["## What each stage did", "", "| stage | measured |", "|---|---|",
             f"| pt | held-out loss {fmt((read(out / 'pt' / 'summary.json').get('final_eval') or {}).get('eval_loss'))} |",
             f"| sft | held-out chat perplexity {fmt(run.chat['sft'].get('perplexity'), 2)}; gold score "
             f"{fmt(run.chat['sft'].get('sampled_reward'))} (sampled); task accuracy "
             f"{fmt(run.tasks['sft'].get('task_accuracy'), percent=True)} |",
             f"| rm | training eval accuracy on held-out pairs {fmt(rm_eval.get('eval_accuracy'), percent=True)} |",
             f"| dpo | held-out chosen-rejected margin 0 at the start -> {fmt(dpo_eval.get('eval_margin'))}, "
             f"preference accuracy {fmt(dpo_eval.get('eval_accuracy'), percent=True)} |"]
    for stage, key in RL_KEY.items():
        values = [r[key] for r in run.metrics[stage] if key in r]
        kl = [r["kl"] for r in run.metrics[stage] if "kl" in r]
        lines.append(f"| {stage} | training {key} (first quarter -> last quarter of {len(values)} steps): "
                     f"{fmt(window_mean(values, True))} -> {fmt(window_mean(values, False))}; KL to SFT per response at "
                     f"the end {fmt(window_mean(kl, False))} |")
    for stage, what in (("embedder", "in-batch contrastive training on question-chunk pairs"),
                        ("rag_sft", "fine-tuning on RAFT rows")):
        losses = [r["loss"] for r in rows(out / stage / "metrics.jsonl") if "loss" in r]
        lines.append(f"| {stage} | {len(losses) and read(out / stage / 'summary.json').get('steps')} steps of {what}; "
                     f"train loss (first quarter -> last quarter) {fmt(window_mean(losses, True))} -> "
                     f"{fmt(window_mean(losses, False))} |")
    return lines


PLOTS = ("loss", "reward", "score", "kl", "reward_gold", "reward_rm", "eval_accuracy", "eval_margin",
         "explained_variance", "value_loss", "clip_fraction")


def plot_links(out: Path) -> list[str]:
    lines = ["## Plots", ""]
    for stage in STAGES:
        folder = out / stage / "plots"
        plots = {p.stem: p for p in folder.glob("*.png")} if folder.is_dir() else {}
        wanted = [plots[name] for name in PLOTS if name in plots]
        if wanted:
            lines.append(f"- {stage}: " + ", ".join(f"[{p.stem}]({p.relative_to(out)})" for p in wanted))
    lines += ["", "For PPO: explained variance near 1 means the critic predicts the returns (near 0 or below: its "
              "advantages are noise); clip fraction is the share of tokens whose update was clipped."]
    notes = [f"- {stage}: {note}" for stage in STAGES for note in read(out / stage / "summary.json").get("notes") or []]
    return lines + (["", "Seen in the curves:", "", *notes] if notes else [])


def eval_command(out: Path, step: str) -> str:
    """The `posttrain eval` command that measured a row, from its step's lineage.json."""
    from ..recipe import EvalStep

    config = read(out / step / "lineage.json").get("config") or {}
    args = ["posttrain", "eval"]
    for key, value in config.items():
        field = EvalStep.model_fields.get(key)
        if value is None or (field is not None and not field.is_required() and value == field.default):
            continue
        args += [f"--{key.replace('_', '-')}", str(value)]
    return shlex.join(args)


def machine(out: Path) -> str:
    seen = {(s.get("precision"), s.get("machine")) for stage in STAGES
            if (s := read(out / stage / "summary.json")) and s.get("precision")}
    if not seen:
        return ""
    kinds = "; ".join(f"{precision} on {where}" for precision, where in sorted(seen))
    return (f"Training ran in {kinds}. Numbers differ between machines that train in bf16 (fast bf16: AMX or "
            f"AVX512-BF16 CPUs, most GPUs) and fp32 machines; compare runs of the same kind.")


# ------------------------------------------------------------------------------------------------ the report

def write_report(out: Path, results: dict, minutes: float, quick: bool) -> dict:
    run = Run(out)
    step_minutes = sum(read(Path(r["lineage"])).get("runtime_s", 0.0) for r in results.values()) / 60
    skipped = [name for name, r in results.items() if r["skipped"]]
    timing = (f"{step_minutes:.1f} minutes of steps" + (f"; this run {minutes:.1f} minutes, reusing {', '.join(skipped)} "
              "(unchanged since an earlier run)" if skipped else ""))
    best = max(MODELS, key=lambda m: run.chat[m].get("sampled_reward") or -1)
    plot = figures.overoptimisation(run.metrics["ppo"], out / "ppo_overoptimisation.png",
                                    run.chat["sft"].get("sampled_reward"))
    goals, met = goals_table(run)
    where = machine(out)
    lines = [f"# posttrain demo report ({'quick' if quick else 'full'} run, {timing})", "",
             "Every number below was measured by this run. A tiny Qwen2-shaped model was initialised at random, "
             "pretrained on generated text and fine-tuned (SFT) on two kinds of data: the customer chats of a "
             "restaurant helper bot, whose answers mix styles as real SFT data does (full polite answers, terse "
             "fragments, rude, out-of-persona, rambling and wrong ones), and small verifiable tasks. A gold rater "
             "(posttrain.demo.gold, hidden from training) stands in for human rankers: it ranks sampled answers; "
             "the reward model and DPO learn from its rankings, PPO from the reward model, GRPO from the task "
             "checker. Every model is measured on held-out prompts.", "", *([where, ""] if where else []),
             *(["**A --quick run** is a smoke test of the whole pipeline on a tiny model with a few steps per "
                "stage: its numbers show that every stage runs, not what the methods can do. Run the full "
                "demo (`posttrain demo`) for that.", ""] if quick else []),
             *goals, "", *chat_table(run), "", *examples(run), "", *rm_section(run, plot), "", *tasks_table(run), "",
             *rag_section(run), "", *stage_table(run), "", *plot_links(out),
             "", "## Use the result", "", "Every model directory loads with `AutoModelForCausalLM.from_pretrained`.",
             "", "```bash", f"posttrain chat --model {out / best}",
             f"posttrain serve --model {out / best} --port 8000   # OpenAI-compatible: /v1/chat/completions",
             f"posttrain chat --model {out / 'rag_sft'} --rag {out / 'index' / 'index.db'}   # answers from the documents",
             f"{eval_command(out, f'eval_{best}')}   # reproduces the {best} row above",
             f"posttrain run {out / 'recipe.yaml'} --from ppo   # rerun from a step; unchanged steps are skipped",
             "```", "", "Each step's resolved config, inputs and parents are in its `lineage.json`."]
    (out / "report.md").write_text("\n".join(lines) + "\n")

    rl = {s: {"first": window_mean([r[k] for r in run.metrics[s] if k in r], True),
              "last": window_mean([r[k] for r in run.metrics[s] if k in r], False),
              "kl_last": window_mean([r["kl"] for r in run.metrics[s] if "kl" in r], False)} for s, k in RL_KEY.items()}
    summary = "; ".join(f"{m}: gold {fmt(run.chat[m].get('sampled_reward'))}, task accuracy "
                        f"{fmt(run.tasks[m].get('task_accuracy'), percent=True)}" for m in MODELS)
    result = {"minutes": round(minutes, 2), "step_minutes": round(step_minutes, 2), "evals": run.chat,
              "rm_pairwise_accuracy": run.chat["sft"].get("rm_pairwise_accuracy"),
              "dpo_eval_margin": (read(out / "dpo" / "summary.json").get("final_eval") or {}).get("eval_margin"),
              "best": best, "summary": summary,
              # each model's change from SFT on the same held-out questions: [mean, standard error]
              "changes": {m: {key: run.change(m, key) for key in ("score", "sampled_score")} for m in MODELS[1:]},
              "rl": rl,
              "gold": {"rm_pairwise_accuracy": run.chat["sft"].get("rm_pairwise_accuracy"),
                       "score": {m: run.chat[m].get("sampled_reward") for m in MODELS},
                       "score_change_se": {m: run.change(m, "sampled_score") for m in MODELS[1:]}},
              "tasks": {"accuracy": {m: run.tasks[m].get("task_accuracy") for m in MODELS},
                        "accuracy_change_se": {m: run.change(m, "score", tasks=True) for m in MODELS[1:]}},
              "kl": {m: run.chat[m].get("kl") for m in MODELS}}
    (out / "demo_result.json").write_text(json.dumps(result, indent=2))
    return result
