"""The comparison table people read at the end of a run: adapter vs base zero-shot vs mean price.

For prompt/completion and chat data (metrics/eval.json with a "shape" other than "price") the columns
are the test loss per completion token, its perplexity and the exact-match rate instead.
"""

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


def is_text(metrics: dict) -> bool:
    """True for the metrics of a prompt/completion or chat evaluation (no prices)."""
    return metrics.get("shape", "price") != "price"


def text_table(metrics: dict) -> str:
    header = f"{'model':<26} {'test loss':>10} {'perplexity':>11} {'exact match':>12} {'items':>6}"
    lines = [header, "-" * len(header)]
    for label, m in comparison_rows(metrics):
        lines.append(
            f"{label:<26} {m['loss']:>10.4f} {m['perplexity']:>11.3f} {m['exact_match']:>12.1%} {int(m['n']):>6d}"
        )
    return "\n".join(lines)


def text_markdown(metrics: dict) -> str:
    lines = ["| model | test loss | perplexity | exact match | items |", "|---|---:|---:|---:|---:|"]
    for label, m in comparison_rows(metrics):
        lines.append(f"| {label} | {m['loss']:.4f} | {m['perplexity']:.3f} | {m['exact_match']:.1%} | {int(m['n'])} |")
    return "\n".join(lines)


def comparison_table(metrics: dict) -> str:
    """A plain-text table of avg error (with its 95% interval), RMSLE, hit rate and unparsed outputs
    (or, for text data, test loss, perplexity and exact match)."""
    if is_text(metrics):
        return text_table(metrics)
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
    if is_text(metrics):
        return text_markdown(metrics)
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


def data_markdown(data: dict) -> str:
    """metrics/data.json as Markdown for a run report: source and shape, rows in, kept and dropped per
    reason (reasons with no drops left out), and each split's size and sha256."""
    lines = [
        f"Data: `{data.get('source', '?')}` ({data.get('shape', 'price')}): {data['rows_in']:,} rows in, "
        f"{data['rows_kept']:,} kept, {data.get('rows_dropped', data['rows_in'] - data['rows_kept']):,} dropped.",
        "",
        "| dropped because | rows | first example |",
        "|---|---:|---|",
    ]
    examples = data.get("dropped_examples", {})
    for reason, count in data.get("dropped", {}).items():
        if count:
            first = (examples.get(reason) or [""])[0].replace("|", "\\|")
            lines.append(f"| {reason} | {count:,} | {first} |")
    lines += ["", "| split | rows | sha256 |", "|---|---:|---|"]
    lines += [f"| {name} | {data[name]['n']:,} | `{data[name]['sha256']}` |" for name in ("train", "val", "test")]
    return "\n".join(lines)
