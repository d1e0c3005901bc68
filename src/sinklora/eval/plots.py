"""Figures for eval and training results: perplexity vs context length, passkey heatmap, loss curve.

matplotlib is imported on first use with the Agg backend (no display needed). Each function takes the
result dicts the eval commands write (``results.json``) or a Trainer ``log_history`` and writes a PNG.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sinklora.eval.results import series_label


def pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
    return path


def plot_perplexity(results: Sequence[dict[str, Any]], path: str | Path, *, title: str | None = None) -> Path:
    """One line per result (``by_length`` rows from :func:`evaluate_perplexity`): perplexity vs context length."""
    if not results:
        raise ValueError("results is empty: pass one or more perplexity result dicts")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for result in results:
        rows = sorted(result["by_length"], key=lambda r: r["context_len"])
        ax.plot([r["context_len"] for r in rows], [r["ppl"] for r in rows], marker="o", label=series_label(result))
    limits = {r.get("metadata", {}).get("model_info", {}).get("max_position_embeddings") for r in results} - {None}
    for limit in sorted(limits):
        ax.axvline(limit, color="grey", linestyle=":", linewidth=1, label=f"max_position_embeddings {limit}")
    ax.set_xscale("log", base=2)
    lengths = sorted({r["context_len"] for result in results for r in result["by_length"]})
    ax.set_xticks(lengths, [str(n) for n in lengths])
    ax.minorticks_off()
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("perplexity")
    protocol = results[0].get("protocol", "sliding")
    ax.set_title(title or f"perplexity vs context length ({protocol})")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def plot_passkey_heatmap(result: dict[str, Any], path: str | Path, *, title: str | None = None) -> Path:
    """Passkey accuracy, rows = prompt length, columns = key depth, from :func:`run_passkey`."""
    plt = pyplot()
    acc = result["accuracy"]
    lengths, depths = result["lengths"], result["depths"]
    fig, ax = plt.subplots(figsize=(1.1 * len(depths) + 2.5, 0.5 * len(lengths) + 2))
    image = ax.imshow(acc, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto")
    for i, row in enumerate(acc):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(depths)), [f"{d:g}" for d in depths])
    ax.set_yticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_xlabel("key depth (fraction of filler before the key)")
    ax.set_ylabel("prompt length (tokens)")
    ax.set_title(title or f"passkey accuracy: {series_label(result)}", fontsize=10)
    fig.colorbar(image, ax=ax, label="accuracy")
    return save_figure(fig, path)


def smooth(values: Sequence[float], weight: float = 0.9) -> list[float]:
    """Bias-corrected exponential moving average (TensorBoard-style smoothing)."""
    out, avg = [], 0.0
    for k, v in enumerate(values, start=1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**k))
    return out


def plot_loss(log_history: Sequence[dict[str, Any]], path: str | Path, *, smoothing: float = 0.9,
              title: str = "training loss") -> Path:
    """Train loss vs step (raw, faint, and smoothed) plus ``eval_loss`` points if any, from ``log_history``."""
    train = [(h["step"], h["loss"]) for h in log_history if "loss" in h and "step" in h]
    evals = [(h["step"], h["eval_loss"]) for h in log_history if "eval_loss" in h and "step" in h]
    if not train and not evals:
        raise ValueError("log_history has no entries with 'step' and 'loss' or 'eval_loss'; nothing to plot")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    if train:
        steps, losses = zip(*train)
        ax.plot(steps, losses, color="tab:blue", alpha=0.3, linewidth=1, label="train loss")
        ax.plot(steps, smooth(losses, smoothing), color="tab:blue", linewidth=2,
                label=f"train loss (EMA {smoothing:g})")
    if evals:
        steps, losses = zip(*evals)
        ax.plot(steps, losses, color="tab:orange", marker="o", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)
