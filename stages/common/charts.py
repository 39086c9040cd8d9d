"""PNG charts for people to look at: token lengths (tokenize_data) and loss curves (train_qlora); `save` and
`pyplot` for the charts of other stages (stages/evaluation/charts.py)."""

from __future__ import annotations

from pathlib import Path

from stages.common.io import atomic_path


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    pyplot().close(fig)


def token_histogram(lengths: dict[str, list[int]], max_length: int, path: Path) -> None:
    """Histogram of tokens per example for each split, with the max_length cut-off marked."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, values in lengths.items():
        ax.hist(values, bins=30, alpha=0.6, label=f"{name} (n={len(values)})")
    ax.axvline(max_length, color="black", linestyle="--", label=f"max_length={max_length}")
    ax.set_xlabel("tokens per example (prompt + completion)")
    ax.set_ylabel("examples")
    ax.set_title("Token lengths")
    ax.legend()
    save(fig, path)


def loss_curve(rows: list[dict], path: Path) -> None:
    """Training and validation loss against optimizer steps, with tokens seen on a second axis."""
    plt = pyplot()
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
    save(fig, path)


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
