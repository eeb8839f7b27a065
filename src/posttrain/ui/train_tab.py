"""Train tab: pick a stage, a model and data (with `posttrain data inspect`'s preview), set the options (the form is
generated from the config schema), see the exact YAML, start `posttrain train` as a subprocess, watch its progress
and curves (from metrics.jsonl), stop it (a checkpoint is written first) and resume it. Recipes run the same way
(`posttrain run`), with the step they are on. The demo's data and starting model can be prepared from here too.
"""
from __future__ import annotations

import time
from pathlib import Path

import yaml

from ..config import DataSource, build_config
from ..errors import ConfigError, PosttrainError
from . import config_form
from .curves import colours, curves, read_metrics
from .jobs import Jobs
from .workspace import Workspace, path_dropdown, write_text

STAGES = ("pt", "sft", "classify", "rm", "dpo", "kto", "ppo", "grpo", "embed")
INSPECT_STAGES = ("pt", "sft", "classify", "rm", "dpo", "kto")
TRAIN_KINDS = ("train", "run")


class TrainTab:
    def __init__(self, ws: Workspace, jobs: Jobs):
        self.ws, self.jobs = ws, jobs
        self.specs = config_form.field_specs()

    # ------------------------------------------------------------ config
    def config_yaml(self, stage, model, output_dir, train_files, eval_file, *values) -> tuple[str, str]:
        """The form as the YAML `posttrain train` gets, and whether it is valid."""
        train = [f for f in (train_files if isinstance(train_files, list) else [train_files]) if f]
        head = {"stage": stage, "model": model, "output_dir": output_dir or self.default_output(stage),
                "data.train": train[0] if len(train) == 1 else train, "data.eval": eval_file or None}
        raw = config_form.to_raw(self.specs, list(values), head)
        text = config_form.dump(raw)
        try:
            self.check(raw)
        except PosttrainError as exc:
            return text, f"not valid yet: {exc}"
        return text, "valid: Start trains with exactly this config"

    def config_from_options(self, stage, model, output_dir, train_files, eval_file, options: dict | None):
        """config_yaml with the options given as {dotted key: value} (the rest at their defaults): the form's
        answer for a script."""
        known = {spec.key: spec for spec in self.specs}
        unknown = sorted(set(options or {}) - set(known))
        if unknown:
            raise ConfigError(f"unknown option(s) {unknown}; options are the config's dotted keys, e.g. train.lr")
        values = [config_form.shown_value(spec, (options or {}).get(spec.key, spec.default)) for spec in self.specs]
        return self.config_yaml(stage, model, output_dir, train_files, eval_file, *values)

    def default_output(self, stage) -> str:
        return f"runs/{stage or 'run'}-{time.strftime('%Y%m%d-%H%M%S')}"

    def check(self, raw: dict):
        """The validated config; every path it names must lie in the workdir."""
        if not isinstance(raw, dict):
            raise ConfigError("the config must be a mapping of keys")
        config = build_config(raw)
        ws = self.ws
        ws.path(config.model, "model", exists=True)
        ws.path(config.output_dir, "output_dir")
        for what, value in (("data.train", config.data.train), ("data.eval", config.data.eval)):
            for source in value if isinstance(value, list) else [value] if value else []:
                path = source.path if isinstance(source, DataSource) else source
                if config.data.dataset_info is None:
                    ws.path(path, what, exists=True)
        if config.data.dataset_info:
            ws.path(config.data.dataset_info, "data.dataset_info", exists=True)
        if config.chat_template and "{" not in config.chat_template:
            ws.path(config.chat_template, "chat_template", exists=True)
        if isinstance(config.resume, str) and config.resume != "auto":
            ws.path(config.resume, "resume", exists=True)
        if config.stage == "ppo" and config.ppo.value_model not in ("auto", "head", "reward"):
            ws.path(config.ppo.value_model, "ppo.value_model", exists=True)
        for i, spec in enumerate(config.rewards):
            if "function" in spec:  # code: a file in the workdir, or one of posttrain's own modules
                target = str(spec["function"]).rpartition(":")[0]
                if target.endswith(".py"):
                    ws.path(target, f"rewards[{i}].function", exists=True)
                elif not (target == "posttrain" or target.startswith("posttrain.")):
                    raise ConfigError(f"rewards[{i}].function: from the UI a reward function is a file.py:function "
                                      f"in the workdir or a posttrain module, not {target!r}")
            if "model" in spec:
                ws.path(spec["model"], f"rewards[{i}].model", exists=True)
        return config

    def load_yaml(self, text: str) -> list:
        """A YAML config into the form: [stage, model, output_dir, train files, eval file, *option values]."""
        raw = yaml.safe_load(text or "") or {}
        if not isinstance(raw, dict):
            raise ConfigError("the config must be a mapping of keys")
        data = raw.get("data") or {}
        train = data.get("train") or []
        train = [t if isinstance(t, str) else t.get("path") for t in (train if isinstance(train, list) else [train])]
        return [raw.get("stage", "sft"), raw.get("model"), raw.get("output_dir", ""), train,
                data.get("eval") if isinstance(data.get("eval"), str) else None,
                *config_form.from_raw(self.specs, raw)]

    # ------------------------------------------------------------ data preview
    def inspect(self, files, model, stage) -> str:
        from ..data.inspect import inspect_data

        files = [f for f in (files if isinstance(files, list) else [files]) if f]
        if not files:
            return "choose a data file to see what training will read"
        reports = []
        for file in files:
            try:
                path = self.ws.path(file, "data file", exists=True)
                model_dir = str(self.ws.path(model, "model", exists=True)) if model else None
                reports.append(inspect_data(str(path), model=model_dir,
                                            stage=stage if stage in INSPECT_STAGES else None))
            except PosttrainError as exc:
                reports.append(f"{file}: {exc}")
        return "\n\n".join(reports)

    # ------------------------------------------------------------ jobs
    def start(self, text: str, overwrite: bool = False) -> tuple[str, str]:
        """Start `posttrain train` on this YAML; returns (job id, status line)."""
        from ..output_dir import check_unlocked, plan

        try:
            raw = yaml.safe_load(text or "")
            config = self.check(raw)
            out = self.ws.path(config.output_dir, "output_dir")
            check_unlocked(out)  # another run holds it: refused here, as the CLI would
            finished, _ = plan(out, config.resume, overwrite or config.overwrite_output_dir)
            if finished is not None:
                return "", f"{self.ws.rel(out)} already holds a finished run: nothing to do"
            path = write_text(self.ws.state / "configs" / f"{time.strftime('%Y%m%d-%H%M%S')}-{out.name}.yaml",
                              config_form.dump(raw))
            job = self.jobs.start("train", [str(path), *(["--overwrite"] if overwrite else [])], output=out,
                                  title=f"{config.stage} -> {self.ws.rel(out)}", extra={"config": str(path)})
        except (PosttrainError, yaml.YAMLError) as exc:
            return "", f"not started: {exc}"
        return job.id, f"started job {job.id}: posttrain train {self.ws.rel(path)}"

    def resume(self, job_id: str) -> tuple[str, str]:
        """Continue a stopped training from its newest checkpoint (`resume=auto`)."""
        try:
            job = self.jobs.get(job_id)
            if job.kind != "train" or "config" not in job.extra:
                raise ConfigError(f"job {job.id} is not a training started here")
            if self.jobs.state(job) == "running":
                raise ConfigError(f"job {job.id} is still running")
            new = self.jobs.start("train", [job.extra["config"], "resume=auto"], output=Path(job.output),
                                  title=job.title + " (resumed)", extra=job.extra)
        except PosttrainError as exc:
            return job_id, f"not resumed: {exc}"
        return new.id, f"resumed as job {new.id}"

    def stop(self, job_id: str) -> str:
        try:
            return self.jobs.stop(job_id)
        except PosttrainError as exc:
            return str(exc)

    def start_recipe(self, recipe: str) -> tuple[str, str]:
        try:
            path = self.ws.path(recipe, "recipe", exists=True)
            job = self.jobs.start("run", [str(path)], title=f"recipe {self.ws.rel(path)}")
        except PosttrainError as exc:
            return "", f"not started: {exc}"
        return job.id, f"started job {job.id}: posttrain run {self.ws.rel(path)}"

    def status(self, job_id: str) -> dict:
        """Where a job stands, as data (the API's answer): state, step / total, ETA, last metrics, log tail."""
        job = self.jobs.get(job_id)
        progress = self.jobs.progress(job)
        rows = read_metrics(self.jobs.metrics_file(job))
        return {"job": job.id, "kind": job.kind, "title": job.title, **progress,
                "output": self.ws.rel(job.output) if job.output else None,
                "last_metrics": rows[-1] if rows else None, "metric_lines": len(rows),
                "log_tail": self.jobs.log_tail(job, 1500)}

    def view(self, job_id: str):
        """The tab's live panel: a progress line, the loss / eval / other curves and the log's end."""
        if not str(job_id or "").strip():
            empty = curves([], "loss")
            return "no job yet: start a training or a recipe", empty, empty, empty, ""
        try:
            status = self.status(job_id)
            job = self.jobs.get(job_id)
        except PosttrainError as exc:
            empty = curves([], "loss")
            return str(exc), empty, empty, empty, ""
        rows = read_metrics(self.jobs.metrics_file(job))
        return (progress_line(status), curves(rows, "loss"), curves(rows, "eval"), curves(rows, "other"),
                self.jobs.log_tail(job, 3000))

    def job_choices(self) -> list[tuple[str, str]]:
        return [(f"{j.id}  {j.title}  ({self.jobs.state(j)})", j.id) for j in self.jobs.list(TRAIN_KINDS)[:30]]

    def attach(self) -> str:
        """The job a (re)loaded page shows: the newest running training or recipe, else the newest one."""
        job = self.jobs.latest(TRAIN_KINDS)
        return job.id if job else ""

    # ------------------------------------------------------------ the demo
    def prepare_demo(self) -> tuple[str, str]:
        """The demo's data (quick sizes) in demo/data and a recipe of its first steps (a tokenizer + random model,
        then continued pretraining) run as a job: the starting point of the demo's SFT."""
        from ..demo.data import write_demo_data
        from ..demo.run import QUICK, demo_recipe

        out = self.ws.root / "demo"
        write_demo_data(out / "data", seed=0, sizes=QUICK["data"])
        recipe = demo_recipe(Path("demo"), quick=True)
        recipe["vars"]["data"] = "demo/data"
        recipe["steps"] = [s for s in recipe["steps"] if s["name"] in ("init", "pt")]
        recipe.pop("report", None)
        path = write_text(out / "prepare.yaml", yaml.safe_dump(recipe, sort_keys=False))
        return self.start_recipe(self.ws.rel(path))

    def demo_sft_yaml(self) -> str:
        """The demo recipe's SFT step as a config (quick sizes), on the prepared model: what the form loads."""
        from ..demo.run import demo_recipe
        from ..recipe import resolve

        recipe = demo_recipe(Path("demo"), quick=True)
        recipe["vars"]["data"] = "demo/data"
        step = next(s for s in recipe["steps"] if s["name"] == "sft")
        recipe["steps"] = [s for s in recipe["steps"] if s["name"] in ("init", "pt")] + [step]
        recipe.pop("report", None)
        resolved = {s.name: s for s in resolve(recipe)}["sft"].config
        raw = {"stage": "sft", "model": "demo/pt", "output_dir": "runs/demo-sft",
               "data": {k: resolved["data"][k] for k in ("train", "eval", "max_length")},
               "train": {k: resolved["train"][k] for k in ("max_steps", "batch_size", "lr", "warmup_ratio",
                                                           "log_steps", "eval_steps")}}
        return config_form.dump(raw)

    # ------------------------------------------------------------ the page
    def build(self):
        import gradio as gr

        gr.Markdown("Pick a stage, a model directory and data files from the workdir, set the options (each one's "
                    "help comes from the config schema), then **Start**: `posttrain train` runs as a subprocess and "
                    "its progress, curves and log appear below. New here? **Prepare the demo** writes the demo's "
                    "data and trains its starting model; **Load the demo's SFT** fills the form.")
        with gr.Row():
            demo_button = gr.Button("Prepare the demo", elem_id="train-demo-prepare", size="sm")
            demo_sft_button = gr.Button("Load the demo's SFT", elem_id="train-demo-sft", size="sm")
            refresh = gr.Button("Refresh file lists", size="sm")
        with gr.Row():
            stage = gr.Dropdown(list(STAGES), value="sft", label="stage", elem_id="train-stage",
                                info=_stage_help())
            model = path_dropdown(self.ws.models(), label="model", elem_id="train-model",
                                  info="a model directory in the workdir")
            output_dir = gr.Textbox(label="output_dir", elem_id="train-output",
                                    info="where the result goes (default: runs/<stage>-<time>)")
        with gr.Row():
            train_files = gr.Dropdown(self.ws.data_files(), multiselect=True, allow_custom_value=True,
                                      label="data.train", elem_id="train-data", info="one or more files (mixed)")
            eval_file = path_dropdown(self.ws.data_files(), label="data.eval", elem_id="train-eval",
                                      info="optional held-out file")
        with gr.Accordion("data preview (posttrain data inspect)", open=True):
            preview = gr.Textbox(label="what training will read", lines=10, max_lines=30, elem_id="train-preview",
                                 buttons=["copy"])
        options, accordions = config_form.build_components(self.specs)
        with gr.Accordion("show YAML: the exact config Start runs", open=False):
            yaml_box = gr.Code(language="yaml", label="config.yaml", interactive=False, elem_id="train-yaml")
        validity = gr.Markdown(elem_id="train-validity")
        with gr.Row():
            overwrite = gr.Checkbox(label="overwrite an earlier run in output_dir", value=False)
            start = gr.Button("Start", variant="primary", elem_id="train-start")
            stop = gr.Button("Stop", variant="stop", elem_id="train-stop")
            resume = gr.Button("Resume", elem_id="train-resume")
        with gr.Row():
            recipe = path_dropdown(self.ws.recipes(), label="recipe (posttrain run)", elem_id="train-recipe")
            run_recipe = gr.Button("Run recipe", elem_id="train-run-recipe")
        job = gr.Dropdown(choices=[], value=None, allow_custom_value=True, label="job (re-attaches after a reload)",
                          elem_id="train-job")
        message = gr.Markdown(elem_id="train-message")
        progress = gr.Markdown(elem_id="train-progress")
        with gr.Row():
            loss_plot = gr.LinePlot(x="step", y="value", color="metric", label="loss", elem_id="train-loss-plot")
            eval_plot = gr.LinePlot(x="step", y="value", color="metric", label="eval")
            other_plot = gr.LinePlot(x="step", y="value", color="metric", label="rewards, KL and other metrics")
        log = gr.Textbox(label="log", lines=8, max_lines=8, autoscroll=True, elem_id="train-log")
        timer = gr.Timer(2.0)

        form = [stage, model, output_dir, train_files, eval_file, *options]
        gr.on([c.change for c in form], self.config_yaml, form, [yaml_box, validity], api_name="form_yaml",
              api_visibility="private", show_progress="hidden")
        gr.on([train_files.change, model.change, stage.change], self.inspect, [train_files, model, stage], preview,
              api_name="inspect_data")

        def stage_sections(chosen):
            shown = config_form.STAGE_SECTIONS.get(chosen, ())
            return [gr.update(visible=not any(s in names for names in config_form.STAGE_SECTIONS.values())
                              or s in shown) for s in accordions]
        stage.change(stage_sections, stage, list(accordions.values()), api_visibility="private")

        def started(job_id, text):
            return gr.update(choices=self.job_choices(), value=job_id or None), text
        start.click(self.config_yaml, form, [yaml_box, validity], api_name="form_yaml_start",
                    api_visibility="private").then(
            lambda text, over: started(*self.start(text, over)), [yaml_box, overwrite], [job, message],
            api_visibility="private")
        stop.click(self.stop, job, message, api_visibility="private")
        resume.click(lambda j: started(*self.resume(j)), job, [job, message], api_visibility="private")
        run_recipe.click(lambda r: started(*self.start_recipe(r)), recipe, [job, message], api_visibility="private")
        demo_button.click(lambda: started(*self.prepare_demo()), None, [job, message], api_visibility="private")
        demo_sft_button.click(self.demo_sft_yaml, None, yaml_box, api_visibility="private").then(
            self.load_form, yaml_box, form, api_visibility="private")

        # the scriptable endpoints: plain values in and out
        api, job_in = gr.Button(visible=False), gr.Textbox(visible=False, label="job")
        job_out, text_out = gr.Textbox(visible=False, label="job"), gr.Textbox(visible=False, label="message")
        options_in = gr.JSON(visible=False, label="options")
        api.click(self.config_from_options, [stage, model, output_dir, train_files, eval_file, options_in],
                  [yaml_box, text_out], api_name="config_yaml")
        api.click(self.start, [yaml_box, overwrite], [job_out, text_out], api_name="train_start")
        api.click(self.stop, job_in, text_out, api_name="train_stop")
        api.click(self.resume, job_in, [job_out, text_out], api_name="train_resume")
        api.click(self.start_recipe, recipe, [job_out, text_out], api_name="recipe_start")
        api.click(self.prepare_demo, None, [job_out, text_out], api_name="demo_prepare")
        api.click(self.demo_sft_yaml, None, text_out, api_name="demo_sft_config")
        api.click(self.status, job_in, gr.JSON(visible=False, label="status"), api_name="job_status")
        api.click(lambda: [[j.id, j.kind, j.title, self.jobs.state(j)] for j in self.jobs.list()], None,
                  gr.JSON(visible=False, label="jobs"), api_name="jobs")
        panel = [progress, loss_plot, eval_plot, other_plot, log]
        plots = [loss_plot, eval_plot, other_plot]

        def recolour(*frames):  # after the curves have arrived: draws metrics that appeared since (curves.colours)
            return tuple(gr.update(color_map=colours(frame)) for frame in frames)
        for trigger in (timer.tick, job.change):
            trigger(self.view, job, panel, api_visibility="private", show_progress="hidden").then(
                recolour, plots, plots, api_visibility="private", show_progress="hidden")

        def lists():
            models, files = self.ws.models(), self.ws.data_files()
            return (gr.update(choices=models), gr.update(choices=files), gr.update(choices=files),
                    gr.update(choices=self.ws.recipes()))
        refresh.click(lists, None, [model, train_files, eval_file, recipe], api_visibility="private")
        return {"load": (lambda: (gr.update(choices=self.job_choices(), value=self.attach() or None),
                                  *lists()), [job, model, train_files, eval_file, recipe]),
                "lists": (lists, [model, train_files, eval_file, recipe])}

    def load_form(self, text: str) -> list:
        import gradio as gr

        values = self.load_yaml(text)
        values[1] = gr.update(value=values[1], choices=self.ws.models())
        values[3] = gr.update(value=values[3], choices=self.ws.data_files())
        values[4] = gr.update(value=values[4], choices=self.ws.data_files())
        return values


def _stage_help() -> str:
    from ..config import Config

    return Config.model_fields["stage"].description


def progress_line(status: dict) -> str:
    parts = [f"**{status['state']}** — {status['title']}"]
    recipe = status.get("recipe")
    if recipe:
        parts.append(f"recipe step {recipe['step']} of {recipe['steps']}: {recipe['name']} ({recipe['kind']}, "
                     f"{recipe['action']})")
    if "total" in status:
        share = 100 * status["step"] / max(status["total"], 1)
        parts.append(f"step {status['step']} / {status['total']} ({share:.0f}%), ETA {status['eta']}")
    parts.append(f"{status['elapsed_s']:.0f} s since start")
    last = status.get("last_metrics") or {}
    if "tokens_per_s" in last:
        parts.append(f"{last['tokens_per_s']:,.0f} tokens/s")
    shown = [f"{k} {v:.4g}" for k, v in last.items() if k in ("loss", "eval_loss", "eval_accuracy", "reward", "kl")
             and isinstance(v, (int, float))]
    if shown:
        parts.append(", ".join(shown))
    return " · ".join(parts)
