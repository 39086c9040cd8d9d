"""The comparison table people read at the end of a run: adapter vs base zero-shot vs mean price."""

from __future__ import annotations

ROWS = (
    ("adapter", "fine-tuned adapter"),
    ("adapter_topk", "adapter, top-k estimate"),
    ("base_zero_shot", "base model, zero-shot"),
    ("mean_baseline", "constant mean price"),
    ("champion", "current champion (MLflow)"),
)


def comparison_rows(metrics: dict) -> list[tuple[str, dict]]:
    """(label, metrics) for each model scored in metrics/eval.json, in display order."""
    return [(label, metrics[key]) for key, label in ROWS if key in metrics]


def interval(m: dict) -> str:
    """The bootstrap 95% interval of the average error as "[low, high]", or "" when not computed."""
    if "avg_error_ci_low" not in m:
        return ""
    return f"[{m['avg_error_ci_low']:,.0f}, {m['avg_error_ci_high']:,.0f}]"


def comparison_table(metrics: dict) -> str:
    """A plain-text table of avg error (with its 95% interval), RMSLE, hit rate and unparsed outputs."""
    header = f"{'model':<24} {'avg error':>10} {'95% interval':>16} {'RMSLE':>7} {'hit rate':>9} {'unparsed':>9}"
    lines = [header, "-" * len(header)]
    for label, m in comparison_rows(metrics):
        lines.append(
            f"{label:<24} {'$' + format(m['avg_error'], ',.2f'):>10} {interval(m):>16} {m['rmsle']:>7.3f} "
            f"{m['hit_rate']:>9.1%} {int(m['unparsed']):>9d}"
        )
    return "\n".join(lines)


def comparison_markdown(metrics: dict) -> str:
    """The same table in Markdown, for the model card and the Prefect report."""
    lines = [
        "| model | avg error ($) | 95% interval ($) | RMSLE | hit rate | unparsed |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for label, m in comparison_rows(metrics):
        lines.append(
            f"| {label} | {m['avg_error']:,.2f} | {interval(m)} | {m['rmsle']:.3f} | {m['hit_rate']:.1%} "
            f"| {int(m['unparsed'])} |"
        )
    return "\n".join(lines)
