"""flows/sweep.py end to end on the tiny model: trials as DVC experiments run two at a time by DVC's queue,
child MLflow runs under one parent, the gate applied once, the report, and failures that stop nothing."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

from tests.conftest import REPO_ROOT
from tests.flow_workspace import dvc, latest_report, run, set_param, sweep_runs

FEW_STEPS = {"train.max_steps": 4}


def sweep(root: Path, env: dict, grid: dict, register: str = "best"):
    set_param(root, "sweep", "grid", grid)
    set_param(root, "sweep", "fixed", FEW_STEPS)
    set_param(root, "sweep", "jobs", 2)
    set_param(root, "sweep", "register", register)
    return run([sys.executable, "-m", "flows.sweep", "--project-dir", str(root)], root, env, check=False)


def report_folder(root: Path) -> Path:
    (folder,) = (root / "reports" / "sweeps").iterdir()
    return folder


def test_a_two_by_two_sweep_lands_its_experiments_gates_once_and_reports_its_failures(workspace_copy):
    """Two module lists, one of which does not exist, x two learning rates: two trials land (DVC experiments, child
    runs, versions with register: all), the gate runs once, and the two that fail are named with their last lines.
    The modules come first in the grid so that the two trials that land are the first two, which the queue's two
    workers start together: their overlap then lasts a whole trial, longer than the queue's poll interval (a trial
    started after a failed one may overlap the other for less than one poll, too short to be seen).
    Sweeps on Prefect workers, the tracking server and the reuse of finished trials are in
    tests/sweeps/test_workers.py."""
    root, env = workspace_copy
    uri = f"sqlite:///{root / 'mlflow.db'}"
    grid = {"lora.target_modules": [["q_proj", "v_proj"], ["no_such_module"]], "train.learning_rate": [3.0e-3, 1.0e-2]}
    done = sweep(root, env, grid, register="all")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    folder = report_folder(root)
    sweep_id = folder.name
    names = [f"{sweep_id}-01", f"{sweep_id}-02"]  # the trials with modules that exist

    shown = json.loads(dvc(["exp", "show", "--json"], root, env).stdout)
    experiments = {e["name"]: e["revs"][0]["data"] for row in shown for e in row.get("experiments") or []}
    assert set(names) <= set(experiments)
    tried = {experiments[n]["params"]["params.yaml"]["data"]["train"]["learning_rate"] for n in names}
    assert tried == {0.003, 0.01}
    assert all("adapter" in experiments[n]["metrics"]["metrics/eval.json"]["data"] for n in names)

    client, parent, children = sweep_runs(uri, sweep_id)
    assert sorted(c.data.tags["dvc.exp_name"] for c in children) == names
    assert all(c.info.run_name.startswith(c.data.tags["dvc.exp_name"] + " target_modules=") for c in children)
    error = {c.info.run_id: c.data.metrics["eval/adapter.avg_error"] for c in children}
    versions = {c.info.run_id: client.search_model_versions(f"run_id = '{c.info.run_id}'") for c in children}
    assert all(len(found) == 1 for found in versions.values())  # register: all gives every trial a version
    gated = [found[0].run_id for found in versions.values() if "promotion.alias" in found[0].tags]
    # the gate ran once, on a best trial (of tied ones, the first in trial order)
    assert len(gated) == 1 and error[gated[0]] == min(error.values())
    best = next(c for c in children if c.info.run_id == gated[0])
    numbers = [found[0].version for found in versions.values()]
    aliased = [n for n in numbers if client.get_model_version("qlora-price-adapter", n).aliases]
    assert len(aliased) == 1  # the best, as champion or challenger; the others hold none
    assert parent.data.tags["promotion.best_trial"] == best.data.tags["dvc.exp_name"]
    experiment = client.get_experiment(parent.info.experiment_id)
    view = json.loads(experiment.tags[f"mlflow.sharedViewState.{sweep_id}"])  # the saved comparison
    assert view["searchFilter"] == f"tags.`sweep.id` = '{sweep_id}'" and view["orderByAsc"] is True
    assert [c["type"] for c in view["compareRunCharts"]] == ["PARALLEL", "SCATTER", "SCATTER"]
    assert view["selectedColumns"][-1] == "metrics.`eval/adapter.avg_error`"
    assert view["compareRunCharts"][0]["selectedParams"] == ["lora.target_modules", "train.learning_rate"]

    landed = [t for t in json.loads((folder / "trials.json").read_text()) if t["name"] in names]
    assert max(t["started"] for t in landed) < min(t["started"] + t["seconds"] for t in landed)  # side by side
    markdown = (folder / "report.md").read_text()
    assert all(name in markdown for name in names) and (folder / "chart.png").stat().st_size > 10_000
    assert "2 of 4 trials succeeded" in markdown
    for failed, rate in ((f"{sweep_id}-03", "0.003"), (f"{sweep_id}-04", "0.01")):
        assert f"**{failed}** (target_modules=['no_such_module'] learning_rate={rate}) failed" in markdown
    assert "no_such_module" in markdown.split("failed:", 1)[1]  # the trial's last lines (`dvc queue logs`)
    assert latest_report(env, "sweep-report") == markdown
    logged = client.list_artifacts(parent.info.run_id, "sweep")
    assert {Path(a.path).name for a in logged} >= {"report.md", "chart.png", "trials.json"}

    out = root / "plots-diff"
    dvc(["plots", "diff", names[0], names[1], "-o", str(out)], root, env)
    page = (out / "index.html").read_text()
    assert names[0] in page and names[1] in page


def test_a_bad_sweep_stops_before_prefect_or_dvc_start(tmp_path, capsys):
    """`python -m flows.sweep` with an unknown key: exit 1 with one line naming it, and nothing queued."""
    from flows.sweep import main

    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    params["sweep"]["grid"] = {"train.lr": [1e-3]}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    assert main(["--project-dir", str(tmp_path)]) == 1
    assert "sweep not started: sweep.grid: unknown key 'train.lr'" in capsys.readouterr().err
    assert not (tmp_path / ".dvc").exists()


def test_a_sweep_needs_a_commit(tmp_path, capsys):
    from flows.sweep import main

    (tmp_path / "params.yaml").write_text((REPO_ROOT / "params.yaml").read_text())
    assert main(["--project-dir", str(tmp_path)]) == 1
    assert "which start from a git commit" in capsys.readouterr().err
