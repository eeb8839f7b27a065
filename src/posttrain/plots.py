"""PNG plots of the training curves, drawn from OUT/metrics.jsonl at the end of a run, and what they say.

Per-step metrics are noisy: a long curve is drawn as its raw points (faint) under a smoothed line. An eval
curve of fewer than 3 points is drawn as points with their values written beside them, on an axis that is
never zoomed to a tiny range. Accuracy plots show the chance level. `overfitting` says in words when the eval
loss rose while the train loss fell.
"""
from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


ONLINE_KEYS = ("reward", "score", "kl", "beta", "entropy", "response_length", "clip_fraction", "value_loss",
               "explained_variance")
SMOOTH_FROM = 20  # a curve with at least this many points gets a smoothed line over its raw points
FEW = 3  # an eval curve with fewer points is drawn as labelled points


def smooth(values: list[float]) -> list[float]:
    """Exponential moving average with bias correction (the first value is kept as it is); its memory is
    about a tenth of the curve."""
    weight = max(0.0, 1.0 - 10.0 / max(len(values), 1))
    out, average, norm = [], 0.0, 0.0
    for value in values:
        average = weight * average + (1 - weight) * value
        norm = weight * norm + (1 - weight)
        out.append(average / norm)
    return out


def overfitting(metrics_file: Path, rise: float = 0.02) -> str | None:
    """A sentence when the last eval loss is more than `rise` (relative) above the best one while the train
    loss went on falling; None otherwise."""
    rows = read_metrics(metrics_file)
    evals = [(r["step"], r["eval_loss"]) for r in rows if isinstance(r.get("eval_loss"), (int, float))]
    train = [(r["step"], r["loss"]) for r in rows if isinstance(r.get("loss"), (int, float))]
    if len(evals) < 2 or not train:
        return None
    best_step, best = min(evals, key=lambda e: e[1])
    last_step, last = evals[-1]
    if last_step == best_step or last <= best + rise * abs(best):
        return None
    k = max(1, len(train) // 10)
    before = [loss for step, loss in train if step <= best_step][-k:]
    after = [loss for _, loss in train[-k:]]
    if not before or sum(after) / len(after) >= sum(before) / len(before):
        return None
    return (f"overfitting: eval loss rose from {best:.4f} (step {best_step}) to {last:.4f} (step {last_step}) while "
            f"train loss fell from {sum(before) / len(before):.4f} to {sum(after) / len(after):.4f}; the model of "
            f"step {best_step} generalised best (train.early_stopping_patience keeps the best weights)")


def _limits(ax, values: list[float], share: float) -> None:
    """Keep the y axis at least `share` of the values' magnitude tall (matplotlib zooms a flat curve to its
    noise, e.g. a 1e-4 range that makes two equal points look like a cliff)."""
    low, high = min(values), max(values)
    span = max(high - low, share * max(abs(low), abs(high)), 1e-6)
    middle = (low + high) / 2
    ax.set_ylim(middle - 0.6 * span, middle + 0.6 * span)


def _curve(ax, steps: list, values: list[float], label: str | None = None, color: str | None = None) -> None:
    if len(values) < FEW:
        points = ax.plot(steps, values, "o", markersize=6, label=label, color=color)
        for x, y in zip(steps, values):
            ax.annotate(f"{y:.4g}", (x, y), textcoords="offset points", xytext=(6, 6), fontsize=9,
                        color=points[0].get_color())
    elif len(values) >= SMOOTH_FROM:
        raw = ax.plot(steps, values, ".", markersize=4, alpha=0.45, color=color,
                      label=f"{label} (each step)" if label else "each step")
        ax.plot(steps, smooth(values), linewidth=2, color=raw[0].get_color(),
                label=f"{label} (smoothed)" if label else "smoothed")
    else:
        ax.plot(steps, values, marker="o", markersize=3, label=label, color=color)


def plot_metrics(metrics_file: Path, out_dir: Path, chance: float | None = None) -> list[Path]:
    """loss.png (train loss, with eval loss when present), one PNG per other eval metric, and for the
    online stages the reward, KL and the other curves of ONLINE_KEYS. `chance`: the accuracy of guessing
    (0.5 for preference pairs, 1/K for K classes), drawn on accuracy plots."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_file)
    if not rows:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []

    def series(key: str):
        points = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
        return [p[0] for p in points], [p[1] for p in points]

    def save(fig, ax, name: str) -> None:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.ticklabel_format(axis="y", useOffset=False)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / f"{name}.png", dpi=100)
        plt.close(fig)
        written.append(out_dir / f"{name}.png")

    fig, ax = plt.subplots(figsize=(6, 4))
    plotted = []
    for key, label, color in (("loss", "train loss", "tab:blue"), ("eval_loss", "eval loss", "tab:orange")):
        steps, values = series(key)
        if steps:
            _curve(ax, steps, values, label, color)
            plotted += values
    if plotted:
        _limits(ax, plotted, 0.02)
    note = overfitting(metrics_file)
    if note:
        ax.set_title(note.split(" while ")[0], fontsize=8, color="tab:red")
    ax.set_ylabel("loss")
    save(fig, ax, "loss")

    eval_keys = sorted({k for r in rows for k in r if k.startswith("eval_") and k not in ("eval_loss",
                                                                                        "eval_tokens")})
    online = [k for k in ONLINE_KEYS if any(k in r for r in rows)]  # ppo / grpo curves
    for key in online + eval_keys + ["lr"]:
        steps, values = series(key)
        if len(steps) < 1:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        draw(ax, key, steps, values, chance)
        save(fig, ax, key.replace("/", "_"))
    return written


def draw(ax, key: str, steps: list, values: list[float], chance: float | None = None) -> None:
    """One metric's curve on `ax`: accuracy on a 0-1 axis with the chance level, anything else on an axis
    at least 2% (10% for a few points) of its values tall."""
    _curve(ax, steps, values)
    if "accuracy" in key:
        ax.set_ylim(0, 1.05)
        if chance is not None:
            ax.axhline(chance, linestyle="--", color="gray", label=f"chance ({chance:.0%})")
    else:
        _limits(ax, values, 0.1 if len(values) < FEW else 0.02)
    ax.set_ylabel(key)
