"""evaluate_adapter's charts: truth against prediction for prices, per-item loss for text data."""

from __future__ import annotations

from pathlib import Path

from stages.common.charts import pyplot, save
from stages.common.metrics import GREEN, ORANGE, RED


def price_scatter(truths: list[float], predictions: list[float], bands: list[str], title: str, path: Path) -> None:
    """Truth against prediction, coloured by the course's bands, with the y = x line."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 7))
    colours = {GREEN: "tab:green", ORANGE: "tab:orange", RED: "tab:red"}
    labels = {GREEN: "hit: within $40 or 20%", ORANGE: "within $80 or 40%", RED: "further off"}
    for name, colour in colours.items():
        chosen = [i for i, b in enumerate(bands) if b == name]
        ax.scatter(
            [truths[i] for i in chosen],
            [predictions[i] for i in chosen],
            s=12,
            c=colour,
            alpha=0.8,
            label=f"{labels[name]} ({len(chosen)})",
        )
    top = max(max(truths), max(predictions), 1.0) * 1.05
    _finish_diagonal(fig, ax, top, ("true price ($)", "predicted price ($)"), ("tab:blue", "y = x"), title, path)


def loss_scatter(base: list[float], adapter: list[float], title: str, path: Path) -> None:
    """Each test item's completion loss, zero-shot base (x) against adapter (y), with the y = x line:
    points below it are items the adapter learned."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 7))
    ax.scatter(base, adapter, s=12, c="tab:blue", alpha=0.8, label=f"test items ({len(base)})")
    top = max([*base, *adapter, 1e-3]) * 1.05
    labels = ("base model, zero-shot: loss per completion token", "adapter: loss per completion token")
    _finish_diagonal(fig, ax, top, labels, ("tab:gray", "y = x (no change)"), title, path)


def _finish_diagonal(fig, ax, top: float, axis_labels: tuple[str, str], line: tuple[str, str], title: str, path):
    """Square axes from 0 to `top` with the y = x line (colour, label), titles and legend; save to `path`."""
    colour, label = line
    ax.plot([0, top], [0, top], color=colour, linewidth=1, label=label)
    ax.set_xlim(0, top)
    ax.set_ylim(0, top)
    ax.set_xlabel(axis_labels[0])
    ax.set_ylabel(axis_labels[1])
    ax.set_title(title)
    ax.legend(loc="upper left")
    save(fig, path)
