"""The comparison table people read at the end of a run: adapter vs base zero-shot vs mean price."""

from __future__ import annotations

ROWS = (
    ("adapter", "fine-tuned adapter"),
    ("base_zero_shot", "base model, zero-shot"),
    ("mean_baseline", "constant mean price"),
)


def comparison_rows(metrics: dict) -> list[tuple[str, dict]]:
    """(label, metrics) for each model scored in metrics/eval.json, in display order."""
    return [(label, metrics[key]) for key, label in ROWS if key in metrics]


def comparison_table(metrics: dict) -> str:
    """A plain-text table of avg error, RMSLE, hit rate and unparsed outputs per model."""
    header = f"{'model':<24} {'avg error':>10} {'RMSLE':>7} {'hit rate':>9} {'unparsed':>9}"
    lines = [header, "-" * len(header)]
    for label, m in comparison_rows(metrics):
        lines.append(
            f"{label:<24} {'$' + format(m['avg_error'], ',.2f'):>10} {m['rmsle']:>7.3f} "
            f"{m['hit_rate']:>9.1%} {m['unparsed']:>9d}"
        )
    return "\n".join(lines)


def comparison_markdown(metrics: dict) -> str:
    """The same table in Markdown, for the model card and the Prefect report."""
    lines = ["| model | avg error ($) | RMSLE | hit rate | unparsed |", "|---|---:|---:|---:|---:|"]
    for label, m in comparison_rows(metrics):
        lines.append(f"| {label} | {m['avg_error']:,.2f} | {m['rmsle']:.3f} | {m['hit_rate']:.1%} | {m['unparsed']} |")
    return "\n".join(lines)
