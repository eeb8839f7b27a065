"""Evaluate tab: `posttrain eval` as a job (task accuracy, reward-model score and pairwise accuracy, KL to a
reference, perplexity), its result shown as a table when it has finished; results of several evals side by side."""
from __future__ import annotations

import json
import time
from pathlib import Path

from ..errors import ConfigError, PosttrainError
from .jobs import Jobs
from .workspace import Workspace, path_dropdown

INPUTS = (("tasks", "--tasks"), ("data", "--data"), ("pairs", "--pairs"), ("reward_model", "--reward-model"),
          ("reference", "--reference"))


class EvaluateTab:
    def __init__(self, ws: Workspace, jobs: Jobs):
        self.ws, self.jobs = ws, jobs

    def start(self, model: str, adapter: str, tasks: str, data: str, pairs: str, reward_model: str, reference: str,
              max_new_tokens: float, n_samples: float) -> tuple[str, str]:
        try:
            model_dir = self.ws.path(model, "model", exists=True)
            name = f"{model_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}"
            out = self.ws.root / "evals" / f"{name}.json"
            args = ["--model", str(model_dir), "--out", str(out), "--generations",
                    str(out.with_name(f"{name}.generations.jsonl")), "--max-new-tokens", str(int(max_new_tokens or 64))]
            if str(adapter or "").strip():
                args += ["--adapter", str(self.ws.path(adapter, "adapter", exists=True))]
            given = dict(zip([k for k, _ in INPUTS], (tasks, data, pairs, reward_model, reference)))
            for key, flag in INPUTS:
                if str(given[key] or "").strip():
                    args += [flag, str(self.ws.path(given[key], key, exists=True))]
            if not any(str(v or "").strip() for v in given.values()):
                raise ConfigError("give at least one of tasks, data, pairs, reward model (what to measure)")
            if n_samples:
                args += ["--n-samples", str(int(n_samples))]
            job = self.jobs.start("eval", args, output=out, title=f"eval {self.ws.rel(model_dir)}")
        except PosttrainError as exc:
            return "", f"not started: {exc}"
        return job.id, f"started job {job.id}: the result goes to {self.ws.rel(out)}"

    def result(self, job_id: str) -> dict:
        """{state, result (the eval's JSON once written), log}."""
        job = self.jobs.get(job_id)
        state = self.jobs.state(job)
        path = Path(job.output) if job.output else None
        result = json.loads(path.read_text()) if state == "finished" and path and path.is_file() else None
        return {"job": job.id, "state": state, "result": result, "output": self.ws.rel(path) if path else None,
                "log_tail": self.jobs.log_tail(job, 1500)}

    def results(self) -> list[str]:
        """Eval results in the workdir: evals/*.json (from this tab) and recipe eval steps' eval.json."""
        return [f for f in self.ws.files((".json",)) if f.startswith("evals/") or f.endswith("eval.json")]

    def table(self, files: list[str]):
        """Results side by side: one column per eval JSON file."""
        import pandas as pd

        columns = {}
        for name in files or []:
            path = self.ws.path(name, "eval result", exists=True)
            columns[self.ws.rel(path)] = json.loads(path.read_text())
        keys = sorted({k for v in columns.values() for k, x in v.items() if isinstance(x, (int, float))})
        return pd.DataFrame([[k] + [v.get(k) for v in columns.values()] for k in keys], columns=["metric", *columns])

    def build(self):
        import gradio as gr

        gr.Markdown("Run `posttrain eval` on a model: task accuracy (tasks file with answers), reward-model score "
                    "and pairwise accuracy (pairs), KL to a reference, perplexity (data).")
        with gr.Row():
            model = path_dropdown(self.ws.models(), label="model", elem_id="eval-model")
            adapter = path_dropdown(self.ws.adapters(), label="adapter (optional)")
        with gr.Row():
            files = self.ws.data_files()
            tasks = path_dropdown(files, label="tasks (prompt + answer rows)")
            data = path_dropdown(files, label="data (perplexity)", elem_id="eval-data")
            pairs = path_dropdown(files, label="pairs (reward model accuracy)")
        with gr.Row():
            reward_model = path_dropdown(self.ws.models(), label="reward model (optional)")
            reference = path_dropdown(self.ws.models(), label="reference for KL (optional)")
            max_new = gr.Number(64, precision=0, label="max new tokens")
            n_samples = gr.Number(None, precision=0, label="only the first N task prompts")
        start = gr.Button("Evaluate", variant="primary", elem_id="eval-start")
        job = gr.Textbox(label="job", elem_id="eval-job")
        message = gr.Markdown()
        state = gr.Markdown(elem_id="eval-state")
        result = gr.Dataframe(headers=["metric", "value"], interactive=False, elem_id="eval-result")
        log = gr.Textbox(label="log", lines=4, max_lines=4)
        gr.Markdown("### results side by side")
        with gr.Row():
            chosen = gr.Dropdown(self.results(), multiselect=True, allow_custom_value=True,
                                 label="eval result files")
            side_button = gr.Button("Show")
        side = gr.Dataframe(interactive=False)
        timer = gr.Timer(3.0)

        start.click(self.start, [model, adapter, tasks, data, pairs, reward_model, reference, max_new, n_samples],
                    [job, message], api_name="eval_start")

        def view(job_id):
            if not str(job_id or "").strip():
                return "", None, ""
            try:
                r = self.result(job_id)
            except PosttrainError as exc:
                return f"**{exc}**", None, ""
            rows = [[k, json.dumps(v) if isinstance(v, (dict, list)) else v] for k, v in (r["result"] or {}).items()
                    if v is not None]
            return f"**{r['state']}** — {r['output']}", rows or None, r["log_tail"]
        timer.tick(view, job, [state, result, log], api_visibility="private", show_progress="hidden")
        gr.Button(visible=False).click(self.result, job, gr.JSON(visible=False, label="result"),
                                       api_name="eval_result")
        side_button.click(self.table, chosen, side, api_name="eval_table")

        def lists():
            models, data_files = self.ws.models(), self.ws.data_files()
            return (gr.update(choices=models), gr.update(choices=data_files), gr.update(choices=data_files),
                    gr.update(choices=data_files), gr.update(choices=self.results()))
        return {"lists": (lists, [model, tasks, data, pairs, chosen])}
