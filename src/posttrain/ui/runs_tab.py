"""Runs tab: every output under the workdir (training runs and recipe steps) with its lineage, summary, plots and
eval results; two or more runs compared (one metric's curves overlaid, final evals side by side). Everything is
read from what the runs wrote: summary.json, metrics.jsonl, plots/, config.yaml, lineage.json, eval.json."""
from __future__ import annotations

import json
from pathlib import Path

import yaml

from ..errors import ConfigError, PosttrainError
from .curves import colours, metric_curve, metric_names, read_metrics
from .workspace import Workspace, path_dropdown

MARKERS = ("summary.json", "metrics.jsonl", "lineage.json")


def _json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
        return value if isinstance(value, dict) else {}
    except (OSError, ValueError):
        return {}


class RunsTab:
    def __init__(self, ws: Workspace):
        self.ws = ws

    def run_dirs(self) -> list[Path]:
        return [p for p in self.ws.walk() if p.is_dir() and any((p / m).is_file() for m in MARKERS)]

    def table(self) -> list[list]:
        """One row per run: run, what, state, steps, result, finished, from."""
        rows = []
        for path in self.run_dirs():
            summary, lineage = _json(path / "summary.json"), _json(path / "lineage.json")
            config = self._config(path)
            what = summary.get("stage") or config.get("stage") or lineage.get("kind") or "?"
            if summary:
                state = "finished"
            elif (path / ".posttrain.lock").is_file() and (path / ".posttrain.lock").read_text().strip():
                state = "running"
            elif lineage:
                state = "done"
            else:
                state = "unfinished"
            final = summary.get("final_eval") or {}
            result = ", ".join(f"{k} {v:.4g}" for k, v in list(final.items())[:3] if isinstance(v, (int, float)))
            rows.append([self.ws.rel(path), what, state, summary.get("steps"), result,
                         summary.get("finished_at") or lineage.get("started_at") or "", self._parent(path, config)])
        return rows

    def _config(self, path: Path) -> dict:
        try:
            value = yaml.safe_load((path / "config.yaml").read_text())
            return value if isinstance(value, dict) else {}
        except (OSError, yaml.YAMLError):
            return {}

    def _parent(self, path: Path, config: dict) -> str:
        model = config.get("model")
        if not model:
            return ", ".join(_json(path / "lineage.json").get("parents", {}))
        candidate = Path(model) if Path(model).is_absolute() else self.ws.root / model
        return self.ws.rel(candidate) if candidate.exists() else str(model)

    def lineage(self, path: Path) -> list[str]:
        """The chain of models a run started from: run <- its model <- that model's model ..."""
        chain, seen = [self.ws.rel(path)], {path.resolve()}
        current = path
        for _ in range(20):
            model = self._config(current).get("model")
            if not model:
                break
            parent = Path(model) if Path(model).is_absolute() else self.ws.root / model
            if not parent.exists() or parent.resolve() in seen:
                chain.append(str(model))
                break
            chain.append(self.ws.rel(parent))
            seen.add(parent.resolve())
            current = parent
        return chain

    def details(self, run: str) -> dict:
        """One run: lineage, summary, eval results, plots (paths), config."""
        path = self.ws.path(run, "run", exists=True)
        summary, lineage = _json(path / "summary.json"), _json(path / "lineage.json")
        evals = {p.name: _json(p) for p in sorted(path.glob("*.json"))
                 if p.name not in ("summary.json", "lineage.json", "config.json", "generation_config.json",
                                   "tokenizer.json", "tokenizer_config.json", "adapter_config.json",
                                   "special_tokens_map.json")}
        return {"run": self.ws.rel(path), "lineage": self.lineage(path),
                "recipe_parents": list(lineage.get("parents", {})), "summary": summary, "evals": evals,
                "recipe_result": lineage.get("result"),
                "plots": [str(p) for p in sorted((path / "plots").glob("*.png"))],
                "config": (path / "config.yaml").read_text() if (path / "config.yaml").is_file() else ""}

    def compare(self, runs: list[str], metric: str) -> tuple:
        """`metric`'s curves of several runs on one plot, and their final evals side by side."""
        import pandas as pd

        runs = [r for r in (runs or []) if r]
        if not runs:
            raise ConfigError("choose two or more runs to compare")
        paths = [self.ws.path(r, "run", exists=True) for r in runs]
        frames = [metric_curve(read_metrics(p / "metrics.jsonl"), metric or "loss", self.ws.rel(p)) for p in paths]
        finals = {self.ws.rel(p): {**(_json(p / "summary.json").get("final_eval") or {}),
                                   **(_json(p / "eval.json"))} for p in paths}
        keys = sorted({k for values in finals.values() for k, v in values.items() if isinstance(v, (int, float))})
        table = pd.DataFrame([[k] + [finals[r].get(k) for r in finals] for k in keys], columns=["metric", *finals])
        return pd.concat(frames, ignore_index=True), table

    def metrics_of(self, runs: list[str]) -> list[str]:
        names = set()
        for run in runs or []:
            try:
                names |= set(metric_names(read_metrics(self.ws.path(run, "run", exists=True) / "metrics.jsonl")))
            except PosttrainError:
                continue
        return sorted(names)

    # ------------------------------------------------------------ the page
    def build(self):
        import gradio as gr

        headers = ["run", "stage / kind", "state", "steps", "final eval", "finished", "from"]
        gr.Markdown("Every run under the workdir. Pick one to see its lineage, summary, plots and eval results, "
                    "or several to compare.")
        refresh = gr.Button("Refresh", size="sm", elem_id="runs-refresh")
        table = gr.Dataframe(headers=headers, value=self.table() or None, interactive=False, elem_id="runs-table",
                             wrap=True)
        with gr.Row():
            run = path_dropdown([r[0] for r in self.table()], label="run", elem_id="runs-run")
        lineage = gr.Markdown(elem_id="runs-lineage")
        with gr.Row():
            summary = gr.JSON(label="summary.json", elem_id="runs-summary")
            evals = gr.JSON(label="eval results")
        plots = gr.Gallery(label="plots", columns=3, height=300, elem_id="runs-plots")
        config = gr.Code(language="yaml", label="config.yaml", interactive=False)
        gr.Markdown("### compare")
        with gr.Row():
            chosen = gr.Dropdown([r[0] for r in self.table()], multiselect=True, label="runs", elem_id="runs-compare")
            metric = gr.Dropdown(["loss"], value="loss", allow_custom_value=True, label="metric")
            compare = gr.Button("Compare", elem_id="runs-compare-button")
        overlay = gr.LinePlot(x="step", y="value", color="metric", label="curves", elem_id="runs-overlay")
        side = gr.Dataframe(label="final evals side by side", interactive=False)
        note = gr.Markdown()

        def show(name):
            try:
                d = self.details(name)
            except PosttrainError as exc:
                return f"**{exc}**", None, None, [], ""
            chain = " ← ".join(f"`{step}`" for step in d["lineage"])
            if d["recipe_parents"]:
                chain += f"  (recipe step after: {', '.join(d['recipe_parents'])})"
            return (f"**lineage:** {chain}", d["summary"] or None, {**d["evals"], **({"recipe step result":
                                                                                       d["recipe_result"]}
                                                                                      if d["recipe_result"] else {})},
                    d["plots"], d["config"])
        run.change(show, run, [lineage, summary, evals, plots, config], api_visibility="private")

        def compared(names, name):
            try:
                curves, finals = self.compare(names, name)
            except PosttrainError as exc:
                return gr.skip(), gr.skip(), f"**{exc}**"
            return curves, finals, ""
        compare.click(compared, [chosen, metric], [overlay, side, note], api_visibility="private").then(
            lambda frame: gr.update(color_map=colours(frame)), overlay, overlay, api_visibility="private")
        chosen.change(lambda names: gr.update(choices=self.metrics_of(names) or ["loss"]), chosen, metric,
                      api_visibility="private")

        def lists():
            rows = self.table()
            names = [r[0] for r in rows]
            return rows or None, gr.update(choices=names), gr.update(choices=names)
        refresh.click(lists, None, [table, run, chosen], api_name="runs_list")
        api = gr.Button(visible=False)
        api.click(self.details, run, gr.JSON(visible=False, label="details"), api_name="run_details")
        api.click(compared, [chosen, metric], [overlay, side, note], api_name="runs_compare")
        return {"lists": (lists, [table, run, chosen])}
