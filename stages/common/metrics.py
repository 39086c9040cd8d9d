"""Scores for price predictions, as the course reports them.

An item is a hit (green) when its absolute error is under $40 or under 20% of the truth, orange under
$80 or 40%, red otherwise. RMSLE uses log(x + 1). A prediction that could not be parsed counts as $0
(an honest worst case) and is counted separately, never dropped.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

GREEN, ORANGE, RED = "green", "orange", "red"


def band(truth: float, prediction: float) -> str:
    """The course's colour band for one prediction."""
    error = abs(prediction - truth)
    relative = error / truth if truth > 0 else math.inf
    if error < 40 or relative < 0.2:
        return GREEN
    if error < 80 or relative < 0.4:
        return ORANGE
    return RED


def bootstrap_interval(values: Sequence[float], samples: int, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the mean of `values` (seeded, so reruns agree)."""
    import numpy as np

    data = np.asarray(values, dtype=float)
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, len(data), size=(samples, len(data)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def price_metrics(
    truths: Sequence[float], predictions: Sequence[float | None], bootstrap_samples: int = 0
) -> dict[str, float]:
    """Average absolute error (with a bootstrap 95% interval when `bootstrap_samples` > 0), RMSLE,
    hit rate, band shares, MSE, R² and the unparsed count.

    `predictions` may hold None for outputs that had no number; they are scored as 0.
    """
    if len(truths) != len(predictions) or not truths:
        raise ValueError(f"need as many predictions as truths (got {len(predictions)} and {len(truths)}), at least one")
    values = [max(p, 0.0) if p is not None else 0.0 for p in predictions]
    n = len(truths)
    errors = [abs(p - t) for p, t in zip(values, truths, strict=True)]
    squared_log = [(math.log1p(p) - math.log1p(t)) ** 2 for p, t in zip(values, truths, strict=True)]
    bands = [band(t, p) for t, p in zip(truths, values, strict=True)]
    mean_truth = sum(truths) / n
    total_ss = sum((t - mean_truth) ** 2 for t in truths)
    mse = sum(e * e for e in errors) / n
    interval = {}
    if bootstrap_samples > 0:
        low, high = bootstrap_interval(errors, bootstrap_samples)
        interval = {"avg_error_ci_low": low, "avg_error_ci_high": high}
    return {
        "n": n,
        "avg_error": sum(errors) / n,
        "rmsle": math.sqrt(sum(squared_log) / n),
        "hit_rate": bands.count(GREEN) / n,
        "orange_rate": bands.count(ORANGE) / n,
        "red_rate": bands.count(RED) / n,
        "mse": mse,
        "r2": 1.0 - (mse * n) / total_ss if total_ss > 0 else 0.0,
        "unparsed": sum(p is None for p in predictions),
        **interval,
    }


def text_metrics(losses: Sequence[tuple[float, int]], outputs: Sequence[str], references: Sequence[str]) -> dict:
    """For prompt/completion and chat data: the loss per completion token over all items (token-weighted,
    as training reports it), its perplexity exp(loss), and the share of greedy outputs that equal the
    reference completion exactly (both stripped of surrounding whitespace)."""
    if not (len(losses) == len(outputs) == len(references)) or not losses:
        raise ValueError("need one loss, output and reference per item, and at least one item")
    tokens = sum(count for _, count in losses)
    loss = sum(total for total, _ in losses) / max(tokens, 1)
    matches = sum(o.strip() == r.strip() for o, r in zip(outputs, references, strict=True))
    return {
        "n": len(losses),
        "loss": loss,
        "perplexity": math.exp(min(loss, 700.0)),  # exp overflows a float beyond ~709
        "exact_match": matches / len(losses),
        "exact_matches": matches,
        "completion_tokens": tokens,
    }
