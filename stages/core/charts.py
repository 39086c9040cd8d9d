"""PNG charts for people to look at: token lengths, loss curves, truth against prediction."""

from __future__ import annotations

from pathlib import Path

from stages.core.io import atomic_path
from stages.core.metrics import GREEN, ORANGE, RED


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    _pyplot().close(fig)


def token_histogram(lengths: dict[str, list[int]], max_length: int, path: Path) -> None:
    """Histogram of tokens per example for each split, with the max_length cut-off marked."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, values in lengths.items():
        ax.hist(values, bins=30, alpha=0.6, label=f"{name} (n={len(values)})")
    ax.axvline(max_length, color="black", linestyle="--", label=f"max_length={max_length}")
    ax.set_xlabel("tokens per example (prompt + completion)")
    ax.set_ylabel("examples")
    ax.set_title("Token lengths")
    ax.legend()
    _save(fig, path)


def loss_curve(rows: list[dict], path: Path) -> None:
    """Training and validation loss against optimizer steps, with tokens seen on a second axis."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    train = [r for r in rows if r.get("train_loss") is not None]
    val = [r for r in rows if r.get("val_loss") is not None]
    ax.plot([r["step"] for r in train], [r["train_loss"] for r in train], label="training loss")
    ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (completion tokens)")
    ax.set_title("QLoRA training")
    ax.grid(alpha=0.3)
    ax.legend()
    add_tokens_axis(ax, rows)
    _save(fig, path)


def add_tokens_axis(ax, rows: list[dict]) -> None:
    """A top axis in tokens seen, mapped from steps by the logged (step, tokens) pairs (batches differ in
    length, so the mapping is interpolated between logged steps rather than a constant tokens per step)."""
    import numpy as np

    pairs = sorted({(0, 0)} | {(r["step"], r["tokens_seen"]) for r in rows if r.get("tokens_seen")})
    if len(pairs) < 2:
        return
    steps = np.array([p[0] for p in pairs], dtype=float)
    tokens = np.array([p[1] for p in pairs], dtype=float)
    per_step = tokens[-1] / steps[-1]  # beyond the logged range: extend at the average rate

    def to_tokens(s):
        s = np.asarray(s, dtype=float)
        return np.where(s <= steps[-1], np.interp(s, steps, tokens), tokens[-1] + (s - steps[-1]) * per_step)

    def to_steps(t):
        t = np.asarray(t, dtype=float)
        return np.where(t <= tokens[-1], np.interp(t, tokens, steps), steps[-1] + (t - tokens[-1]) / per_step)

    top = ax.secondary_xaxis("top", functions=(to_tokens, to_steps))
    top.set_xlabel("tokens seen")


def price_scatter(truths: list[float], predictions: list[float], bands: list[str], title: str, path: Path) -> None:
    """Truth against prediction, coloured by the course's bands, with the y = x line."""
    plt = _pyplot()
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
    plt = _pyplot()
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
    _save(fig, path)
