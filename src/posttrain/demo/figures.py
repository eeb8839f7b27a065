"""The demo report's own figures: reward over-optimisation during PPO, and the gold-score / KL frontier."""
from __future__ import annotations

from pathlib import Path

from ..plots import smooth


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def overoptimisation(rows: list[dict], out: Path, gold_sft: float | None = None) -> Path | None:
    """PPO's training curves against the KL to the SFT model: the learned reward model's mean score (what PPO
    maximises, left axis) and the gold rater's mean score of the same sampled answers (never seen by PPO,
    right axis). Each point is one step's rollout; the lines are smoothed over steps."""
    rows = [r for r in rows if all(isinstance(r.get(k), (int, float)) for k in ("kl", "reward/rm", "reward/gold"))]
    if len(rows) < 2:
        return None
    plt = _pyplot()
    kl = smooth([r["kl"] for r in rows])
    proxy, gold = [r["reward/rm"] for r in rows], [r["reward/gold"] for r in rows]
    fig, left = plt.subplots(figsize=(7, 4.2))
    right = left.twinx()
    left.plot([r["kl"] for r in rows], proxy, ".", alpha=0.3, color="tab:blue")
    left.plot(kl, smooth(proxy), color="tab:blue", linewidth=2, label="reward model score (PPO's reward)")
    right.plot([r["kl"] for r in rows], gold, ".", alpha=0.3, color="tab:green")
    right.plot(kl, smooth(gold), color="tab:green", linewidth=2, label="gold rater score (hidden from PPO)")
    if gold_sft is not None:
        right.axhline(gold_sft, linestyle="--", color="tab:green", alpha=0.6, label="gold score of SFT (held out)")
    left.set_xlabel("KL to the SFT model (nats per answer, this step's samples)")
    left.set_ylabel("reward model score (logit units)", color="tab:blue")
    right.set_ylabel("gold score (0-1)", color="tab:green")
    right.set_ylim(0, 1.05)
    left.set_title("PPO: the proxy reward vs the gold score as the policy moves from SFT", fontsize=10)
    left.grid(alpha=0.3)
    handles = left.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    labels = left.get_legend_handles_labels()[1] + right.get_legend_handles_labels()[1]
    left.legend(handles, labels, fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def frontier(points: dict[str, list[tuple[str, float, float]]], sft: tuple[float, float], out: Path) -> Path:
    """Held-out gold score against KL to SFT: one line per method, one labelled point per setting."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot([sft[0]], [sft[1]], "ks", label="sft")
    for (method, rows), marker in zip(points.items(), "o^v"):
        rows = sorted(rows, key=lambda r: r[1])
        line = ax.plot([r[1] for r in rows], [r[2] for r in rows], marker=marker, label=method)
        for label, x, y in rows:
            ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8,
                        color=line[0].get_color())
    ax.set_xlabel("KL to the SFT model (nats per answer, held-out greedy answers)")
    ax.set_ylabel("gold score (0-1, held-out sampled answers)")
    ax.set_ylim(0, 1.05)
    ax.set_title("Gold score vs KL: DPO at 3 betas, PPO at 3 KL coefficients", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
