"""Tables and heatmaps shared by the long-context suites (``eval ruler``, ``eval longbench``).

A suite's summary is one entry per cache setting: ``{"cache": name, "kv_kept": share of the tokens seen
still cached at the end of a generation (mean), ...scores (0-100)...}``. The score-versus-compression
table puts every setting on one row, the way kvpress reports presses.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def fmt(value: float | None, digits: int = 1) -> str:
    return "" if value is None else f"{value:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines)


def mean(values: Sequence[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return sum(kept) / len(kept) if kept else None


def kv_kept(stats: Sequence[dict[str, Any]]) -> float | None:
    """Mean share of the tokens seen that the cache still held after each generation (1.0 = full cache)."""
    shares = [s["kept_tokens"] / s["seen_tokens"] for s in stats if s.get("seen_tokens")]
    return mean(shares)


def compression_table(summary: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """One row per cache setting: KV kept, then ``columns`` ((header, key in the setting's entry)) and the average."""
    header = ["cache", "KV kept"] + [h for h, _ in columns] + ["average"]
    rows = [[s["cache"], fmt(None if s.get("kv_kept") is None else 100 * s["kv_kept"], 0) + "%"]
            + [fmt(s.get(key)) for _, key in columns] + [fmt(s.get("average"))] for s in summary]
    return markdown_table(header, rows)


def plot_heatmaps(panels: Sequence[tuple[str, Sequence[Sequence[float | None]]]], row_labels: Sequence[str],
                  col_labels: Sequence[str], path: str | Path, *, xlabel: str, ylabel: str, title: str) -> Path:
    """One heatmap (0-100, red to green) per panel ``(title, rows x cols)``, side by side, values printed."""
    from sinklora.eval.plots import pyplot

    plt = pyplot()
    n = len(panels)
    fig, axes = plt.subplots(1, n, figsize=(n * (0.9 * len(col_labels) + 2.6), 0.38 * len(row_labels) + 1.8),
                             squeeze=False, layout="constrained")
    image = None
    for ax, (name, values) in zip(axes[0], panels):
        grid = [[float("nan") if v is None else v for v in row] for row in values]
        image = ax.imshow(grid, cmap="RdYlGn", vmin=0.0, vmax=100.0, aspect="auto")
        for i, row in enumerate(values):
            for j, v in enumerate(row):
                ax.text(j, i, "" if v is None else f"{v:.0f}", ha="center", va="center", fontsize=7)
        ax.set_xticks(range(len(col_labels)), [str(c) for c in col_labels], fontsize=8)
        labels = [str(r) for r in row_labels] if ax is axes[0][0] else [""] * len(row_labels)
        ax.set_yticks(range(len(row_labels)), labels, fontsize=8)
        ax.set_xlabel(xlabel)
        ax.set_title(name, fontsize=9)
    axes[0][0].set_ylabel(ylabel)
    fig.suptitle(title, fontsize=10)
    if image is not None:
        fig.colorbar(image, ax=list(axes[0]), label="score")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_jsonl(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """One JSON object per line, written through a temporary file (never half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path
