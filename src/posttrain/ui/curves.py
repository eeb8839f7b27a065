"""metrics.jsonl (one line per logging step, written by every training run) as tables for the UI's line plots."""
from __future__ import annotations

import json
from pathlib import Path

# eval_tokens counts the eval set's tokens: the same number at every eval, and thousands of times the perplexity
# or accuracy it would share a plot with (their curves were flattened against the axis)
NOT_PLOTTED = {"step", "epoch", "lr", "grad_norm", "tokens_per_s", "eval_tokens"}
GROUPS = ("loss", "eval", "other")
PALETTE = ("#4c78a8", "#f58518", "#54a24b", "#e45756", "#72b7b2", "#eeca3b", "#b279a2", "#ff9da6", "#9d755d",
           "#bab0ac")  # Vega's tableau10, the colours the plots had before


def read_metrics(path: Path | None) -> list[dict]:
    """The rows of a metrics.jsonl; a line cut short by a running writer is left out."""
    if path is None or not Path(path).is_file():
        return []
    rows = []
    for line in Path(path).read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), (int, float)):
            rows.append(row)
    return rows


def group_of(key: str) -> str | None:
    if key in NOT_PLOTTED:
        return None
    if key in ("loss", "eval_loss"):
        return "loss"
    return "eval" if key.startswith("eval_") else "other"


def curves(rows: list[dict], group: str, label: str | None = None):
    """A long table (step, value, metric) of one group's metrics; `label` prefixes the metric names (runs
    compared on one plot)."""
    import pandas as pd

    records = [{"step": row["step"], "value": float(value),
                "metric": f"{label}: {key}" if label else key}
               for row in rows for key, value in row.items()
               if group_of(key) == group and isinstance(value, (int, float)) and not isinstance(value, bool)]
    return pd.DataFrame(records, columns=["step", "value", "metric"])


def colours(value: dict | None) -> dict:
    """A colour for each metric (or run) of a line plot's value as Gradio hands it back ({columns, data}), in the
    order they first appear.

    Gradio draws a line plot's colours from the table it had when it last built the chart, and a new value only swaps
    the data: a metric that appears later (eval_loss at the first eval, a second run compared) was not drawn at all.
    Setting the plot's color_map in a later event (`.then`) rebuilds the chart from the table it shows by then; the
    same colour map again changes nothing. (Set in the same event as the value, the chart is rebuilt from the
    table before: measured with Gradio 6.31 in Chromium.)"""
    columns = list((value or {}).get("columns") or [])
    if "metric" not in columns:
        return {}
    names = dict.fromkeys(row[columns.index("metric")] for row in value.get("data") or [])
    return {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(names)}


def metric_names(rows: list[dict]) -> list[str]:
    return sorted({k for row in rows for k, v in row.items() if group_of(k) and isinstance(v, (int, float))})


def metric_curve(rows: list[dict], metric: str, label: str):
    import pandas as pd

    records = [{"step": row["step"], "value": float(row[metric]), "metric": label}
               for row in rows if isinstance(row.get(metric), (int, float))]
    return pd.DataFrame(records, columns=["step", "value", "metric"])
