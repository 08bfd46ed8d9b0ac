"""Training curves."""

from __future__ import annotations

import math
from pathlib import Path


def plot_history(history: list[dict], path: Path, keys: list[str] | None = None, title: str | None = None) -> None:
    """Training curves: one panel per metric (default: every numeric key but step/lr/seconds)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if keys is None:
        keys = [k for k in history[0] if k not in ("step", "lr", "seconds") and not k.startswith("val_")] if history else []
        keys += sorted({k for row in history for k in row if k.startswith("val_") and isinstance(row[k], (int, float))})
    keys = keys or ["loss"]
    columns = min(3, len(keys))
    rows = math.ceil(len(keys) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.0 * rows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        points = [(row["step"], row[key]) for row in history if isinstance(row.get(key), (int, float))]
        if points:
            steps, values = zip(*points)
            ax.plot(steps, values, marker="o" if len(points) < 20 else None, linewidth=1)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.set_visible(False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
