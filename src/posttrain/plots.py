"""PNG plots of the training curves, drawn from OUT/metrics.jsonl at the end of a run."""
from __future__ import annotations

import json
from pathlib import Path


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


ONLINE_KEYS = ("reward", "score", "kl", "beta", "entropy", "response_length", "clip_fraction", "value_loss",
               "explained_variance")


def plot_metrics(metrics_file: Path, out_dir: Path) -> list[Path]:
    """loss.png (train loss, with eval loss when present), one PNG per other eval metric, and for the
    online stages the reward, KL and the other curves of ONLINE_KEYS."""
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

    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("loss", "train loss"), ("eval_loss", "eval loss")):
        steps, values = series(key)
        if steps:
            ax.plot(steps, values, marker="o" if key == "eval_loss" else None, markersize=3, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out_dir / "loss.png", dpi=100)
    plt.close(fig)
    written.append(out_dir / "loss.png")

    eval_keys = sorted({k for r in rows for k in r if k.startswith("eval_") and k not in ("eval_loss",
                                                                                        "eval_tokens")})
    online = [k for k in ONLINE_KEYS if any(k in r for r in rows)]  # ppo / grpo curves
    for key in online + eval_keys + ["lr"]:
        steps, values = series(key)
        if len(steps) < 1:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(steps, values, marker="o", markersize=3)
        ax.set_xlabel("step")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        name = key.replace("/", "_")
        fig.savefig(out_dir / f"{name}.png", dpi=100)
        plt.close(fig)
        written.append(out_dir / f"{name}.png")
    return written
