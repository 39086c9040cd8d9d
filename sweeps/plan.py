"""The trials of a sweep: params.yaml's `sweep` section expanded into DVC experiment overrides, every value
checked before any trial starts.

`plan_trials(raw, params, sweep_id)` takes params.yaml as parsed YAML (`raw`) and as `Params`, and returns the
trials: a grid's every combination (or, with `method: random`, `trials` of them drawn with `sample_seed`),
each repeated over `seeds`, with `fixed` set in all. Each key must be a `section.key` a stage reads, and each
trial's params must load as a run's would: a bad key, a value of the wrong type or out of range, or a budget
the grid does not fit raises ConfigError naming the key (`sweep.grid.train.learning_rate[1]: ...`).
`plan_notes(params, trials)` says what is worth knowing before they run: a trial that is the params' own run
again, and trials that train on another budget than the params (and so than a champion the params trained).
Run: `python -m sweeps.plan` prints the trials of ./params.yaml and those notes.
"""

from __future__ import annotations

import copy
import itertools
import random
from typing import NamedTuple

import yaml

from stages.common.config import Params, params_by_key, params_from_dict
from stages.common.errors import ConfigError

# Sections no stage's result depends on: sweeping them would make trials that differ in nothing they learn.
NOT_SWEPT = ("tracking", "flow", "sweep")
SEED_KEY = "train.seed"
BUDGET_KEYS = ("train.max_steps", "train.epochs", "data.n_train")  # how long a trial trains, and on how many rows


class Trial(NamedTuple):
    """One trial: its DVC experiment name and the params it sets (`section.key`: value), swept keys first."""

    name: str
    overrides: dict
    swept: tuple[str, ...]  # the keys that vary between trials (the grid's, then train.seed when repeated)

    def label(self) -> str:
        """The values that set this trial apart, for people: "learning_rate=0.0003 r=8"."""
        return " ".join(f"{key.rsplit('.', 1)[-1]}={self.overrides[key]}" for key in self.swept)

    def dvc_arguments(self) -> list[str]:
        """`-S key=value` for each override, the value written as YAML (what `dvc exp run -S` parses)."""
        return [item for key, value in self.overrides.items() for item in ("-S", f"{key}={yaml_value(value)}")]


def yaml_value(value) -> str:
    """`value` as one line of YAML: 0.0003, 8, cosine, [q_proj, v_proj], null."""
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()


def check_key(key: str, params: Params, where: str) -> None:
    """ConfigError unless `key` names a parameter a stage reads (`section.key`)."""
    section, _, name = key.partition(".")
    sections = [s for s in Params.__dataclass_fields__ if s not in NOT_SWEPT]
    if section not in sections:
        why = "is not read by any stage" if section in NOT_SWEPT else "is not a params section"
        raise ConfigError(f"{where}: {key!r}: {section!r} {why}; sweep a key of one of {sections}")
    known = list(getattr(params, section).__dataclass_fields__)
    if name not in known:
        raise ConfigError(f"{where}: unknown key {key!r}; section {section} has {known}")


def with_overrides(raw: dict, overrides: dict) -> dict:
    """A copy of parsed params.yaml with each `section.key` set."""
    changed = copy.deepcopy(raw)
    for key, value in overrides.items():
        section, _, name = key.partition(".")
        changed.setdefault(section, {})
        changed[section][name] = value
    return changed


def check_value(raw: dict, key: str, value, where: str) -> None:
    """ConfigError naming `where` unless params.yaml with `key` set to `value` loads."""
    try:
        params_from_dict(with_overrides(raw, {key: value}))
    except ConfigError as exc:
        raise ConfigError(f"{where}: {value!r} does not fit: {exc}") from None


def combinations(params: Params) -> list[dict]:
    """Every combination of the grid's values, in the grid's order, or the random method's draw."""
    keys = list(params.sweep.grid)
    every = [dict(zip(keys, values, strict=True)) for values in itertools.product(*params.sweep.grid.values())]
    if params.sweep.method == "random":
        draws = min(params.sweep.trials, len(every))
        every = random.Random(params.sweep.sample_seed).sample(every, draws)
    return every


def check_budget(params: Params, n_trials: int) -> None:
    sweep = params.sweep
    if sweep.trials is not None and n_trials > sweep.trials:
        seeds = f" x {len(sweep.seeds)} seeds" if sweep.seeds else ""
        raise ConfigError(
            f"sweep.trials: the grid makes {n_trials} trials ({len(combinations(params))} combinations{seeds}), more "
            f"than the budget of {sweep.trials}; raise sweep.trials, drop values, or use method: random to draw "
            f"{sweep.trials // max(len(sweep.seeds), 1) or 1} combinations"
        )


def plan_trials(raw: dict, params: Params, sweep_id: str) -> list[Trial]:
    """The sweep's trials, named `<sweep_id>-01`, ...; ConfigError naming the key on any bad entry."""
    sweep = params.sweep
    for key, value in sweep.fixed.items():
        check_key(key, params, "sweep.fixed")
        if key in sweep.grid:
            raise ConfigError(f"sweep.fixed: {key!r} is also in sweep.grid; keep it in one of them")
        check_value(raw, key, value, f"sweep.fixed.{key}")
    fixed = with_overrides(raw, sweep.fixed)  # a swept value is checked beside the fixed ones it runs with
    for key, values in sweep.grid.items():
        check_key(key, params, "sweep.grid")
        for index, value in enumerate(values):
            check_value(fixed, key, value, f"sweep.grid.{key}[{index}]")
    if sweep.seeds and SEED_KEY in {**sweep.grid, **sweep.fixed}:
        raise ConfigError(f"sweep.seeds: {SEED_KEY} is also in sweep.grid or sweep.fixed; set seeds in one place")
    for index, seed in enumerate(sweep.seeds):
        check_value(raw, SEED_KEY, seed, f"sweep.seeds[{index}]")
    seeds = [{SEED_KEY: seed} for seed in sweep.seeds] or [{}]
    swept = (*sweep.grid, *([SEED_KEY] if sweep.seeds else []))
    chosen = [{**combo, **seed} for combo in combinations(params) for seed in seeds]
    check_budget(params, len(chosen))
    trials = [Trial(f"{sweep_id}-{i:02d}", {**values, **sweep.fixed}, swept) for i, values in enumerate(chosen, 1)]
    for trial in trials:  # the values together (a rule across keys, such as eval_steps and save_steps)
        try:
            params_from_dict(with_overrides(raw, trial.overrides))
        except ConfigError as exc:
            raise ConfigError(f"sweep: trial {trial.label()!r} does not fit: {exc}") from None
    return trials


def plan_notes(params: Params, trials: list[Trial]) -> list[str]:
    """Notes on the planned `trials` of `params`: trials that set only values the params already hold (the
    params' own run again: DVC restores it from its run cache when it ran, and its results equal that run's,
    so it never beats a champion that run made), and budget keys (BUDGET_KEYS) the trials set to other values
    than the params' (a trial that trains less than the champion starts behind it at the gate)."""
    current = params_by_key(params)
    notes = []
    same = [t.name for t in trials if all(current.get(key) == value for key, value in t.overrides.items())]
    if same:
        notes.append(
            f"{', '.join(same)} only set{'s' if len(same) == 1 else ''} values the params already hold: the params' "
            "own run again (DVC restores it when that run is in its cache), equal to it and never promoted over a "
            "champion it made"
        )
    changed = [
        key for key in BUDGET_KEYS if any(key in t.overrides and t.overrides[key] != current.get(key) for t in trials)
    ]
    if changed:
        notes.append(
            f"the trials set {', '.join(changed)} to other values than the params: a trial that trains less than "
            "the champion starts behind it at the gate, whose reason then says so"
        )
    return notes


def main() -> int:
    from stages.common.config import load_params, read_yaml

    raw = read_yaml("params.yaml")
    params = load_params("params.yaml")
    trials = plan_trials(raw, params, "sweep")
    for trial in trials:
        print(trial.name, " ".join(trial.dvc_arguments()))
    for note in plan_notes(params, trials):
        print(f"note: {note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
