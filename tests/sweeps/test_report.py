"""sweeps/report.py: trials ranked by the primary metric, seeds summarised, failures shown, the chart drawn."""

from __future__ import annotations

from dataclasses import replace

from PIL import Image

from stages.tracking.gate import Budget, Gate
from sweeps.plan import Trial
from sweeps.report import Outcome, budget_note, ranked, report_markdown, seeds_table, sweep_chart

GATE = Gate("avg_error", greater_is_better=False)
SWEPT = ("lora.r", "train.seed")


def outcome(name: str, r: int, seed: int, error: float | None, state: str = "Success") -> Outcome:
    metrics = None if error is None else {"avg_error": error, "rmsle": 0.5, "hit_rate": 0.4}
    failure = "" if error is not None else "ValueError: Target modules {'nope'} not found"
    return Outcome(Trial(name, {"lora.r": r, "train.seed": seed}, SWEPT), state, 60.0, 0.0, name, metrics, failure)


OUTCOMES = [
    outcome("t1", 8, 1, 900.0),
    outcome("t2", 8, 2, 700.0),
    outcome("t3", 32, 1, 800.0),
    outcome("t4", 32, 2, None, "Failed"),
]


def test_trials_are_ranked_best_first_and_failures_last():
    assert [o.trial.name for o in ranked(OUTCOMES, GATE)] == ["t2", "t3", "t1", "t4"]
    assert [o.trial.name for o in ranked(OUTCOMES, Gate("hit_rate", greater_is_better=True))][-1] == "t4"


def test_seeds_are_summarised_as_mean_and_spread_per_combination():
    table = seeds_table(OUTCOMES, GATE)
    assert "| 8 | 800 ± 1.4e+02 | 2 |" in table  # mean of 900 and 700, sample sd 141
    assert "| 32 | 800 ± 0 | 1 |" in table  # the failed seed is left out of the mean


def test_the_report_lists_every_trial_and_each_failure_with_its_last_lines():
    markdown = report_markdown("sw", OUTCOMES, GATE, "price", "## Promotion\n\ndecided")
    assert "3 of 4 trials succeeded" in markdown
    rows = [line for line in markdown.splitlines() if line.startswith("| ") and " | t" in line][1:]
    assert [row.split(" | ")[1] for row in rows[:4]] == ["t2", "t3", "t1", "t4"]
    assert "| 1 | t2 | 8 | 2 | $700.00 |" in markdown
    assert "**t4** (r=32 seed=2) failed" in markdown and "Target modules" in markdown
    assert markdown.rstrip().endswith("decided")


def test_the_chart_has_one_panel_per_swept_key(tmp_path):
    path = tmp_path / "chart.png"
    sweep_chart(OUTCOMES, GATE, path)
    width, height = Image.open(path).size
    assert width > 1.5 * height  # two panels side by side


SHORT, FULL = Budget(60, 9_000), Budget(150, 22_500)
GATED = {"candidate": SHORT.record(), "champion": FULL.record(), "against": "champion v1"}  # the gate's record


def budgets(*each: Budget | None) -> list[Outcome]:
    return [replace(o, budget=b) for o, b in zip(OUTCOMES, each, strict=True)]


def test_trials_that_trained_less_than_the_champion_are_named_in_the_report():
    markdown = report_markdown("sw", budgets(SHORT, SHORT, SHORT, None), GATE, "price", "decided", GATED)
    assert (
        "**3 of 3 trials trained less than champion v1**, which trained 150 steps (22,500 tokens): each 60 steps"
        in (markdown)
    )
    assert markdown.index("trained less") < markdown.index("decided")
    mixed = budget_note(budgets(SHORT, FULL, Budget(100, 15_000), None), GATED)
    assert "**2 of 3 trials trained less than champion v1**" in mixed
    assert "t1 60 steps (9,000 tokens), t3 100 steps (15,000 tokens)." in mixed
    assert "**The trials trained on different budgets**: t1 60 steps (9,000 tokens), t2 150 steps" in mixed


def test_trials_that_trained_more_than_the_champion_are_not_said_to_train_less():
    longer = budget_note(budgets(Budget(300, 45_000), FULL, FULL, None), GATED)
    assert "trained less" not in longer and "**The trials trained on different budgets**" in longer


def test_nothing_is_said_when_the_budgets_match_or_are_unknown():
    assert budget_note(budgets(FULL, FULL, FULL, None), GATED) == ""  # as much as the champion
    assert budget_note(budgets(SHORT, SHORT, SHORT, None), {**GATED, "champion": None}) == ""  # an old champion
    assert budget_note(budgets(SHORT, SHORT, SHORT, None), None) == ""  # no gate record (nothing registered)
    assert budget_note(OUTCOMES, GATED) == ""  # runs that logged no budget
    assert "trained less" not in report_markdown("sw", OUTCOMES, GATE, "price", "decided")
