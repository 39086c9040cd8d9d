"""What people read at the end of a run: the comparison table (adapter vs base zero-shot vs baselines), the data
summary and the promotion decision, as plain text for the console and as Markdown for reports and cards.

For prompt/completion and chat data (metrics/eval.json with a "shape" other than "price") the columns
are the test loss per completion token, its perplexity and the exact-match rate instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

ROWS = (
    ("adapter", "fine-tuned adapter"),
    ("adapter_topk", "adapter, top-k estimate"),
    ("base_zero_shot", "base model, zero-shot"),
    ("tfidf_ridge", "TF-IDF ridge regression"),
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


@dataclass(frozen=True)
class Column:
    """One column of the comparison table: its title, its width in the plain-text table, and its cell."""

    title: str
    width: int
    cell: Callable[[dict], str]


PRICE_COLUMNS = (
    Column("avg error", 10, lambda m: f"${m['avg_error']:,.2f}"),
    Column("95% interval", 16, interval),
    Column("RMSLE", 7, lambda m: f"{m['rmsle']:.3f}"),
    Column("hit rate", 9, lambda m: f"{m['hit_rate']:.1%}"),
    Column("unparsed", 9, lambda m: f"{int(m['unparsed'])}"),
)
TEXT_COLUMNS = (
    Column("test loss", 10, lambda m: f"{m['loss']:.4f}"),
    Column("perplexity", 11, lambda m: f"{m['perplexity']:.3f}"),
    Column("exact match", 12, lambda m: f"{m['exact_match']:.1%}"),
    Column("items", 6, lambda m: f"{int(m['n'])}"),
)
LABEL_WIDTH = 26


def columns_for(metrics: dict) -> tuple[Column, ...]:
    return TEXT_COLUMNS if is_text(metrics) else PRICE_COLUMNS


def comparison_table(metrics: dict) -> str:
    """A plain-text table of avg error (with its 95% interval), RMSLE, hit rate and unparsed outputs
    (or, for text data, test loss, perplexity, exact match and items), one row per model."""
    columns = columns_for(metrics)
    header = f"{'model':<{LABEL_WIDTH}}" + "".join(f" {c.title:>{c.width}}" for c in columns)
    lines = [header, "-" * len(header)]
    for label, m in comparison_rows(metrics):
        lines.append(f"{label:<{LABEL_WIDTH}}" + "".join(f" {c.cell(m):>{c.width}}" for c in columns))
    return "\n".join(lines)


def comparison_markdown(metrics: dict) -> str:
    """The same table in Markdown, for the model card and the Prefect report."""
    columns = columns_for(metrics)
    lines = [
        "| model | " + " | ".join(c.title for c in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for label, m in comparison_rows(metrics):
        lines.append(f"| {label} | " + " | ".join(c.cell(m) for c in columns) + " |")
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
    return "\n".join([*lines, "", since_last_run_markdown(data)])


def since_last_run_markdown(data: dict) -> str:
    """What metrics/data.json says changed in the splits since the previous run, in a sentence or two."""
    since = data.get("since_last_run") or {}
    rule = data.get("membership", {})
    if not since.get("previous"):
        return "First split of this workspace: no earlier test set to compare with."
    test = since["test"]
    text = (
        f"Test set since the last run: {test['kept']:,} items kept, {test['added']:,} added, {test['removed']:,} "
        f"removed; {since['moved']:,} rows moved between splits."
    )
    if since.get("membership_changed"):
        text += (
            f" **Split membership changed** ({', '.join(since['membership_changed'])}; now fingerprint "
            f"`{rule.get('fingerprint', '?')}`): this is another test set, so the gate re-scores the champion on it."
        )
    return text


def promotion_markdown(record: dict) -> str:
    """The promotion decision in reports/mlflow_run.json (record_run's record) as Markdown: the verdict, the
    reason in words, and the paired comparison's numbers when there was one."""
    name, version = record["registered_model"], record["version"]
    if record.get("new_version") is False:
        return f"No new version of `{name}`: {record['reason']}."
    verdict = "**promoted to `champion`**" if record["promoted"] else f"**not promoted** (alias `{record['alias']}`)"
    text = f"`{name}` version {version}: {verdict}.\n\n{record['reason']}."
    c = record.get("comparison")
    if not c:
        return text
    level = f"{c['confidence']:.0%}"
    return (
        f"{text}\n\n| metric | candidate | {c['against']} | improvement | {level} paired interval | items | "
        f"required |\n|---|---:|---:|---:|---:|---:|---:|\n| {c['metric']} | {c['candidate']:,.4g} | "
        f"{c['reference']:,.4g} | {c['improvement']:,.4g} | [{c['interval_low']:,.4g}, {c['interval_high']:,.4g}] | "
        f"{c['n_items']} | interval above {c['min_improvement']:g} |"
    )
