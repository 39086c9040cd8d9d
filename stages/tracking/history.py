"""The history of retrains: one row per recorded run that went through the promotion gate, oldest first.

Each row says when the run was recorded, the rows its data had, its test items (and how many were kept and
added since the run before), the primary metric on its test set with its bootstrap interval, the decision,
and the version holding `champion` after it. Everything comes from what record_run logged in MLflow (metrics
`data/...` and `promotion/primary_*`, tags `promotion.*` and `registry.*`), so the history of any store can
be shown, not only this workspace's. It is shown as a Markdown table (the flow's report, the registered
model's description, `python -m flows.history`) and as a chart (reports/history.png, and on each run under
history/).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from stages.common.charts import pyplot, save
from stages.tracking.orphans import closed_count
from stages.tracking.registry import CHAMPION_AFTER_TAG, PRIMARY_METRIC_PREFIX, PRIMARY_METRIC_TAG

DESCRIPTION_ROWS = 25  # the last retrains shown in the registered model's description (MLflow caps its length)
DESCRIPTION_LIMIT = 5000  # characters MLflow's SQL stores allow in a registered model's description


@dataclass(frozen=True)
class Retrain:
    """One recorded run's line in the history."""

    when: str  # UTC, minutes
    run_id: str
    rows_in: int | None
    test_items: int | None
    test_kept: int | None  # of the previous run's test items; None: no previous run to compare with
    test_added: int | None
    metric: str
    value: float | None
    low: float | None
    high: float | None
    version: str
    alias: str
    promoted: bool
    champion_after: str
    reason: str

    def decision(self) -> str:
        if not self.version:
            return "not registered"
        return f"v{self.version} promoted" if self.promoted else f"v{self.version} {self.alias}"


def whole(metrics: dict, key: str) -> int | None:
    return int(metrics[key]) if key in metrics else None


def retrain_of(run) -> Retrain:
    metrics, tags = run.data.metrics, run.data.tags
    started = datetime.fromtimestamp(run.info.start_time / 1000, tz=UTC).strftime("%Y-%m-%d %H:%M")
    return Retrain(
        when=started,
        run_id=run.info.run_id,
        rows_in=whole(metrics, "data/rows_in"),
        test_items=whole(metrics, "data/test.n"),
        test_kept=whole(metrics, "data/since_last_run.test.kept"),
        test_added=whole(metrics, "data/since_last_run.test.added"),
        metric=tags.get(PRIMARY_METRIC_TAG, tags.get("promotion.metric", "")),
        value=metrics.get(f"{PRIMARY_METRIC_PREFIX}value"),
        low=metrics.get(f"{PRIMARY_METRIC_PREFIX}low"),
        high=metrics.get(f"{PRIMARY_METRIC_PREFIX}high"),
        version=tags.get("registry.version", ""),
        alias=tags.get("promotion.alias", ""),
        promoted=tags.get("promotion.promoted") == "True",
        champion_after=tags.get(CHAMPION_AFTER_TAG, ""),
        reason=tags.get("promotion.reason", ""),
    )


def retrains(client, experiment_name: str) -> list[Retrain]:
    """Every run of `experiment_name` that the promotion gate decided on, oldest first ([] when none)."""
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        return []
    runs = client.search_runs(
        [experiment.experiment_id],
        filter_string="tags.`promotion.alias` != ''",
        order_by=["attributes.start_time ASC"],
        max_results=5000,
    )
    return [retrain_of(run) for run in runs]


def number(value: float | None, metric: str) -> str:
    if value is None:
        return "-"
    return f"${value:,.0f}" if metric == "avg_error" else f"{value:.4g}"


def count(value: int | None) -> str:
    return "-" if value is None else f"{value:,}"


def markdown_table(history: list[Retrain]) -> str:
    """The history as a Markdown table, one row per retrain, oldest first."""
    lines = [
        "| when (UTC) | rows in | test items | kept | added | primary metric [interval] | decision | champion after |",
        "|---|---:|---:|---:|---:|---|---|---|",
    ]
    for r in history:
        interval = f" [{number(r.low, r.metric)}, {number(r.high, r.metric)}]" if r.low is not None else ""
        lines.append(
            f"| {r.when} | {count(r.rows_in)} | {count(r.test_items)} | {count(r.test_kept)} | {count(r.test_added)} "
            f"| {r.metric} {number(r.value, r.metric)}{interval} | {r.decision()} | "
            f"{'v' + r.champion_after if r.champion_after else '-'} |"
        )
    return "\n".join(lines)


def closed_note(client, experiment_name: str) -> str:
    """A line counting the runs of `experiment_name` that a dead process left RUNNING and a later retrain closed
    (stages/tracking/orphans.py; they never reached the gate, so the table leaves them out), or "" when none."""
    closed = closed_count(client, experiment_name)
    if not closed:
        return ""
    return f"{closed} run(s) left RUNNING by a process that died, closed by a later retrain (tag `orphan.reason`)"


def description(history: list[Retrain], model_name: str) -> str:
    """The registered model's description: the last retrains as a table, within MLflow's length limit."""
    shown = history[-DESCRIPTION_ROWS:]
    while True:
        head = f"Retrain history of `{model_name}` (last {len(shown)} of {len(history)}; `python -m flows.history`)"
        text = f"{head}\n\n{markdown_table(shown)}\n"
        if len(text) <= DESCRIPTION_LIMIT or len(shown) <= 1:
            return text[:DESCRIPTION_LIMIT]
        shown = shown[1:]


def chart(history: list[Retrain], path: Path) -> None:
    """The primary metric of every retrain with its interval, promoted ones filled, over time."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(history) + 3), 4))
    scored = [(i, r) for i, r in enumerate(history) if r.value is not None]
    for promoted, style in ((True, {"color": "tab:green", "label": "promoted"}), (False, {"color": "tab:gray"})):
        points = [(i, r) for i, r in scored if r.promoted == promoted]
        if not points:
            continue
        xs = [i for i, _ in points]
        ys = [r.value for _, r in points]
        below = [r.value - (r.low if r.low is not None else r.value) for _, r in points]
        above = [(r.high if r.high is not None else r.value) - r.value for _, r in points]
        ax.errorbar(
            xs, ys, yerr=[below, above], fmt="o", capsize=4, mfc=style["color"] if promoted else "white",
            color=style["color"], label=style.get("label", "not promoted"),
        )  # fmt: skip
    for i, r in scored:
        ax.annotate(r.decision(), (i, r.value), textcoords="offset points", xytext=(6, 6), fontsize=8)
    ax.set_xticks(range(len(history)), [f"{r.when[5:16]}\n{count(r.test_items)} test" for r in history], fontsize=7)
    metric = next((r.metric for r in history if r.metric), "primary metric")
    ax.set_ylabel(f"{metric} on the run's test set")
    ax.set_title("Retrain history")
    ax.legend(loc="best")
    save(fig, path)


def publish(client, tracking, run_id: str) -> list[Retrain]:
    """After the gate decided on run `run_id`: the history (params `tracking`: its experiment) as Markdown and
    a chart on that run (history/), and as the description of the registered model. Returns the history."""
    import tempfile

    history = retrains(client, tracking.experiment)
    if not history:
        return history
    client.log_text(run_id, f"{markdown_table(history)}\n", "history/history.md")
    with tempfile.TemporaryDirectory(prefix="history-") as folder:
        picture = Path(folder) / "history.png"
        chart(history, picture)
        client.log_artifact(run_id, str(picture), "history")
    client.update_registered_model(
        tracking.registered_model, description=description(history, tracking.registered_model)
    )
    return history
