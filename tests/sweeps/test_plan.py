"""sweeps/plan.py: the sweep section expanded into trials, and every bad entry refused naming its key."""

from __future__ import annotations

import copy

import pytest
import yaml

from stages.common.config import params_from_dict
from stages.common.errors import ConfigError
from sweeps.plan import Trial, plan_notes, plan_trials, yaml_value
from tests.conftest import REPO_ROOT

RAW = yaml.safe_load((REPO_ROOT / "params.yaml").read_text(encoding="utf-8"))


def plan(**sweep) -> list[Trial]:
    raw = copy.deepcopy(RAW)
    raw["sweep"].update(sweep)
    return plan_trials(raw, params_from_dict(raw), "sw")


def test_the_default_grid_is_every_combination_with_the_fixed_values():
    trials = plan(fixed={"train.max_steps": 60})
    assert [t.name for t in trials] == ["sw-01", "sw-02", "sw-03", "sw-04"]
    assert [(t.overrides["train.learning_rate"], t.overrides["lora.r"]) for t in trials] == [
        (1e-3, 8), (1e-3, 16), (2e-3, 8), (2e-3, 16),
    ]  # fmt: skip
    assert all(t.overrides["train.max_steps"] == 60 for t in trials)
    assert trials[0].label() == "learning_rate=0.001 r=8"
    assert trials[0].dvc_arguments() == [
        "-S", "train.learning_rate=0.001", "-S", "lora.r=8", "-S", "train.max_steps=60",
    ]  # fmt: skip


def test_the_default_sweep_trains_on_the_params_budget_and_never_repeats_the_params():
    """Its trials are compared with a champion trained on the params' own budget (`make demo`'s): they train as
    long, and none is that run again (DVC would restore it: the champion's own results, never promoted)."""
    params = params_from_dict(RAW)
    trials = plan_trials(RAW, params, "sw")
    assert RAW["sweep"]["fixed"] == {} and all(set(t.overrides) == set(t.swept) for t in trials)
    assert (params.train.learning_rate, params.lora.r) not in [tuple(t.overrides.values()) for t in trials]
    assert plan_notes(params, trials) == []


def notes(**sweep) -> list[str]:
    raw = copy.deepcopy(RAW)
    raw["sweep"].update(sweep)
    params = params_from_dict(raw)
    return plan_notes(params, plan_trials(raw, params, "sw"))


def test_a_trial_that_is_the_params_own_run_again_is_noted():
    (note,) = notes(grid={"train.learning_rate": [1e-3, 2e-3]})  # the first is the params' value (r is too)
    assert note.startswith("sw-01 only sets values the params already hold: the params' own run again")
    assert notes(grid={"train.learning_rate": [1e-3], "lora.r": [16, 32]})[0].startswith("sw-02 only sets")


def test_trials_that_train_on_another_budget_than_the_params_are_noted():
    (note,) = notes(fixed={"train.max_steps": 60})
    assert note.startswith("the trials set train.max_steps to other values than the params: a trial that trains")
    (both,) = notes(grid={"data.n_train": [300, 1200], "train.epochs": [1.0, 2.0]})
    assert "set train.epochs, data.n_train to other values" in both
    assert notes(fixed={"train.max_steps": -1}) == []  # the params' own value


def test_seeds_repeat_every_combination_and_become_a_swept_key():
    trials = plan(grid={"lora.r": [4, 8]}, seeds=[1, 2, 3])
    assert len(trials) == 6
    assert trials[0].swept == ("lora.r", "train.seed")
    assert [(t.overrides["lora.r"], t.overrides["train.seed"]) for t in trials[:3]] == [(4, 1), (4, 2), (4, 3)]


def test_random_draws_the_budget_reproducibly():
    grid = {"train.learning_rate": [1e-4, 3e-4, 1e-3, 3e-3], "lora.r": [4, 8, 16]}
    first = plan(method="random", grid=grid, trials=5, sample_seed=3)
    again = plan(method="random", grid=grid, trials=5, sample_seed=3)
    assert len(first) == 5 and first == again
    assert len({tuple(t.overrides.items()) for t in first}) == 5


def test_values_are_written_as_dvc_parses_them():
    assert yaml_value(0.0003) == "0.0003"
    assert yaml_value(["q_proj", "v_proj"]) == "[q_proj, v_proj]"
    assert yaml_value(None) == "null"
    assert yaml_value("cosine") == "cosine"


@pytest.mark.parametrize(
    ("sweep", "named"),
    [
        ({"grid": {"train.lr": [1e-3]}}, "unknown key 'train.lr'"),
        ({"grid": {"optim.lr": [1e-3]}}, "'optim' is not a params section"),
        ({"grid": {"flow.push": [True]}}, "'flow' is not read by any stage"),
        ({"grid": {}}, "sweep.grid: expected at least one"),
        ({"grid": {"lora.r": []}}, "sweep.grid.lora.r: expected a non-empty list"),
        ({"grid": {"lora.r": 8}}, "sweep.grid.lora.r: expected a non-empty list"),
        ({"grid": {"lora.r": [8, "wide"]}}, "sweep.grid.lora.r[1]: 'wide' does not fit: lora.r: expected int"),
        ({"grid": {"train.learning_rate": [-1.0]}}, "sweep.grid.train.learning_rate[0]"),
        ({"trials": 0}, "sweep.trials: expected a number of at least 1, got 0"),
        ({"trials": 3}, "sweep.trials: the grid makes 4 trials"),
        ({"method": "random", "trials": None}, "sweep.trials: expected how many trials to draw"),
        ({"fixed": {"lora.r": 8}}, "sweep.fixed: 'lora.r' is also in sweep.grid"),
        ({"fixed": {"train.max_steps": "many"}}, "sweep.fixed.train.max_steps: 'many' does not fit"),
        ({"seeds": [1, 1]}, "sweep.seeds: expected distinct"),
        ({"grid": {"lora.r": [8, 8]}}, "sweep.grid.lora.r: expected distinct values"),
        ({"method": "bayes"}, "sweep.method: expected one of ['grid', 'random']"),
    ],
)
def test_bad_sweeps_are_refused_naming_the_key(sweep, named):
    with pytest.raises(ConfigError) as caught:
        plan(**sweep)
    assert named in str(caught.value)


def test_a_swept_value_is_checked_beside_the_fixed_values():
    """save_steps 40 breaks the default eval_steps (50) but fits the fixed 10: the trial runs with both."""
    trials = plan(grid={"train.save_steps": [40, 60]}, fixed={"train.eval_steps": 10})
    assert [t.overrides for t in trials] == [
        {"train.save_steps": 40, "train.eval_steps": 10}, {"train.save_steps": 60, "train.eval_steps": 10},
    ]  # fmt: skip
    with pytest.raises(ConfigError, match=r"sweep.grid.train.save_steps\[1\]: 45 does not fit"):
        plan(grid={"train.save_steps": [40, 45]}, fixed={"train.eval_steps": 10})
