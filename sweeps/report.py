"""A sweep's report: its trials sorted by the primary metric, mean and spread over repeated seeds, the time each
took, a note when trials trained on other budgets than each other or less than the champion, failures with
their last lines, and a chart of the primary metric against each swept key.

`Outcome` is one trial as it ended (state, minutes, its child MLflow run's metrics); `report_markdown` and
`sweep_chart` turn a list of them into what flows/sweep.py prints, logs on the sweep's parent MLflow run and
publishes as the Prefect artifact `sweep-report`.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from pathlib import Path

from stages.common.charts import pyplot, save
from stages.common.config import PRIMARY_METRICS
from stages.common.report import promotion_markdown
from stages.tracking.gate import Budget, Gate
from sweeps.plan import Trial, yaml_value
from sweeps.queue import SUCCESS


@dataclass(frozen=True)
class Outcome:
    """How one trial ended: its DVC state, seconds it ran, its child run and test metrics, or why it failed."""

    trial: Trial
    state: str
    seconds: float | None
    started: float | None = None  # seconds after the sweep's first trial started
    run_id: str | None = None
    metrics: dict | None = None  # {metric name: value} of the adapter on the test set
    failure: str = ""
    reused_from: str | None = None  # the run whose outputs DVC restored from its run cache for this trial
    budget: Budget | None = None  # how much its adapter trained (steps, tokens), from its run's train metrics

    def value(self, metric: str) -> float | None:
        return (self.metrics or {}).get(metric) if self.state == SUCCESS else None


def ranked(outcomes: list[Outcome], gate: Gate) -> list[Outcome]:
    """Successful trials best first by the gate's metric, then trials without it (failed), in trial order."""
    scored = [o for o in outcomes if o.value(gate.metric) is not None]
    scored.sort(key=lambda o: o.value(gate.metric), reverse=gate.greater_is_better)
    return scored + [o for o in outcomes if o not in scored]


def shown_metrics(gate: Gate, shape: str) -> list[str]:
    """The primary metric first, then the other gate metrics that score data of `shape`."""
    others = [name for name, (shapes, _) in PRIMARY_METRICS.items() if shape in shapes and name != gate.metric]
    return [gate.metric, *others]


def cell(value, metric: str) -> str:
    """A metric for the table: dollars for avg_error, a percentage for hit_rate, 4 digits otherwise."""
    if value is None:
        return "—"
    if metric == "avg_error":
        return f"${value:,.2f}"
    return f"{value:.1%}" if metric in ("hit_rate", "exact_match") else f"{value:.4g}"


def minutes(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds / 60:.1f}"


def trials_table(outcomes: list[Outcome], gate: Gate, shape: str) -> str:
    """One row per trial, best first: the swept values, the metrics, the minutes, the state and the run."""
    metrics = shown_metrics(gate, shape)[:3]
    keys = outcomes[0].trial.swept
    header = ["rank", "trial", *[k.rsplit(".", 1)[-1] for k in keys], *metrics, "minutes", "state", "MLflow run"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for rank, outcome in enumerate(ranked(outcomes, gate), 1):
        row = [
            str(rank) if outcome.value(gate.metric) is not None else "—",
            outcome.trial.name,
            *[str(outcome.trial.overrides[k]) for k in keys],
            *[cell(outcome.value(m), m) for m in metrics],
            minutes(outcome.seconds),
            "reused" if outcome.reused_from else outcome.state.lower(),
            f"`{outcome.run_id}`" if outcome.run_id else "—",
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def seeds_table(outcomes: list[Outcome], gate: Gate) -> str:
    """Mean ± standard deviation of the primary metric over the seeds of each combination ("" without seeds)."""
    keys = [k for k in outcomes[0].trial.swept if k != "train.seed"]
    if len(keys) == len(outcomes[0].trial.swept):
        return ""
    groups: dict[tuple, list[float]] = {}
    for outcome in outcomes:
        combo = tuple(outcome.trial.overrides[k] for k in keys)
        value = outcome.value(gate.metric)
        groups.setdefault(combo, [])
        if value is not None:
            groups[combo].append(value)
    lines = [
        "| " + " | ".join([*[k.rsplit(".", 1)[-1] for k in keys], f"{gate.metric} mean ± sd", "seeds"]) + " |",
        "|" + "---|" * (len(keys) + 2),
    ]
    sign = -1 if gate.greater_is_better else 1  # best first; combinations without a result last
    ordered = sorted(groups.items(), key=lambda kv: sign * statistics.mean(kv[1]) if kv[1] else float("inf"))
    for combo, values in ordered:
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        summary = f"{statistics.mean(values):.4g} ± {spread:.2g}" if values else "—"
        lines.append("| " + " | ".join([*map(str, combo), summary, str(len(values))]) + " |")
    return "\n".join(lines)


def budget_note(outcomes: list[Outcome], trained: dict | None) -> str:
    """What makes a budget mismatch visible: successful trials that trained on different budgets from each other,
    and those that trained less than the champion the gate compared the best with (`trained`, the gate's record
    of both budgets); "" when there is none, or nothing recorded the budgets."""
    known = [(o, o.budget) for o in outcomes if o.state == SUCCESS and o.budget is not None]
    if not known:
        return ""
    notes = []
    if len({budget for _, budget in known}) > 1:
        each = ", ".join(f"{o.trial.name} {budget.words()}" for o, budget in known)
        notes.append(
            f"**The trials trained on different budgets**: {each}. Their metrics differ by how long they trained as "
            "well as by the values they tried."
        )
    champion = (trained or {}).get("champion")
    if champion:
        theirs = Budget(**champion)
        short = [(o, budget) for o, budget in known if budget.less_than(theirs)]
        if short:
            shapes = {budget for _, budget in short}
            each = (
                f"each {short[0][1].words()}"
                if len(shapes) == 1
                else ", ".join(f"{o.trial.name} {budget.words()}" for o, budget in short)
            )
            notes.append(
                f"**{len(short)} of {len(known)} trials trained less than {trained['against']}**, which trained "
                f"{theirs.words()}: {each}. The gate compares the best trial with the champion as they are, "
                "so a trial that trained less starts behind. The trials train on the params' own budget unless "
                "`sweep.fixed` or the grid sets `train.max_steps`, `train.epochs` or `data.n_train`."
            )
    return "\n\n".join(notes)


def failures(outcomes: list[Outcome]) -> str:
    failed = [o for o in outcomes if o.state != SUCCESS]
    return "\n\n".join(f"**{o.trial.name}** ({o.trial.label()}) failed:\n\n```\n{o.failure}\n```" for o in failed)


def report_markdown(
    sweep_id: str, outcomes: list[Outcome], gate: Gate, shape: str, extra: str, trained: dict | None = None
) -> str:
    """The sweep's report: its trials table, a note on budgets that differ (between trials, or against the
    champion of the gate's record `trained`), the seed summary when seeds repeat, failures, then `extra` (the
    gate's decision, timings, where the runs are)."""
    succeeded = sum(o.state == SUCCESS for o in outcomes)
    arrow = "higher" if gate.greater_is_better else "lower"
    parts = [
        f"# Sweep report: {sweep_id}",
        f"{succeeded} of {len(outcomes)} trials succeeded; sorted by {gate.metric} on the test set ({arrow} is "
        "better). Each trial is a DVC experiment named in the table (`dvc exp show`, `dvc exp apply <name>`).",
        trials_table(outcomes, gate, shape),
        budget_note(outcomes, trained),
        seeds_table(outcomes, gate),
        failures(outcomes),
        extra,
    ]
    return "\n\n".join(part for part in parts if part) + "\n"


def sweep_chart(outcomes: list[Outcome], gate: Gate, path: Path) -> None:
    """The primary metric against each swept key, one panel per key: a dot per trial, a line through the mean
    at each value; numbers spanning more than 10x on a log axis."""
    plt = pyplot()
    keys = outcomes[0].trial.swept
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.8), squeeze=False, sharey=True)
    for ax, key in zip(axes[0], keys, strict=True):
        values = {yaml_value(o.trial.overrides[key]): o.trial.overrides[key] for o in outcomes}  # lists too
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values.values())
        position = {shown: (value if numeric else i) for i, (shown, value) in enumerate(values.items())}
        points = [(position[yaml_value(o.trial.overrides[key])], o.value(gate.metric)) for o in outcomes]
        points = [(x, y) for x, y in points if y is not None]
        ax.scatter([x for x, _ in points], [y for _, y in points], alpha=0.7)
        at_value = {x: [y for px, y in points if px == x] for x in position.values()}
        means = sorted((x, statistics.mean(ys)) for x, ys in at_value.items() if ys)
        ax.plot([x for x, _ in means], [y for _, y in means], "-", color="grey", alpha=0.6)
        if numeric and min(values.values()) > 0 and max(values.values()) / min(values.values()) > 10:
            ax.set_xscale("log")
        if not numeric or len(values) <= 6:
            ax.set_xticks(list(position.values()), list(position), rotation=0 if numeric else 20)
        ax.set_xlabel(key)
        ax.grid(alpha=0.3)
    better = "higher" if gate.greater_is_better else "lower"
    axes[0][0].set_ylabel(f"{gate.metric} on the test set ({better} is better)")
    fig.suptitle(f"{gate.metric} against each swept key ({len(outcomes)} trials)")
    save(fig, path)


def closing_section(decision: dict | None, registered: list[str], wall: float, ran: str, where: str) -> str:
    """The report's end: the gate's decision, other versions registered, the wall time, how the trials `ran`
    (the backend's own words) and `where` the runs are."""
    gate = promotion_markdown(decision) if decision else "No trial succeeded: nothing was registered or gated."
    others = f"\n\nOther trials registered without an alias: versions {', '.join(registered)}." if registered else ""
    return (
        f"## Promotion (the gate, once for the sweep's best trial)\n\n{gate}{others}\n\n"
        f"## Where\n\nWall time {wall / 60:.1f} min, the trials run as {ran}. {where}\n"
    )
