"""End to end, in a temporary git repository against a real Prefect server on loopback: the flow drives
every DVC stage and records the run in MLflow; a second run is "up to date" in seconds; a params change
retrains and applies the promotion gate; a second flow on the busy workspace stops; new data retrains;
`dvc repro` and `dvc exp run` alone are recorded too; `flows.serve` serves a deployment that runs; a
tracking server that is down stops the flow before any stage.
The workspace is conftest's `flow_project`, run once through the flow (its flow runs push to a local DVC
remote); tests that change a workspace work on a copy of it (`workspace_copy`), so each passes alone and in
any order."""

import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from stages import STAGES
from tests.conftest import REPO_ROOT, price_rows
from tests.flow_workspace import commit, dvc, flow, latest_report, run, set_param

ALL_STAGES = set(STAGES)


def test_flow_runs_every_stage_and_prints_the_table(flow_project):
    root, _, done, _ = flow_project
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    assert set(lock["stages"]) == ALL_STAGES
    output = done.stdout + done.stderr  # the table goes through Prefect's logger
    assert "fine-tuned adapter" in output and "constant mean price" in output
    for name in (
        "metrics/eval.json",
        "metrics/train.json",
        "metrics/data.json",
        "export/README.md",
        "export/adapter_model.safetensors",
        "reports/scatter.png",
        "plots/loss.csv",
    ):
        assert (root / name).is_file(), name


def test_mlflow_holds_the_run_with_metrics_artifacts_and_lineage(flow_project):
    from mlflow import MlflowClient

    root, env, _, _ = flow_project
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("qlora-price")
    (mlflow_run,) = client.search_runs([experiment.experiment_id])
    data = mlflow_run.data
    evaluation = json.loads((root / "metrics" / "eval.json").read_text())
    assert data.metrics["eval/adapter.avg_error"] == pytest.approx(evaluation["adapter"]["avg_error"])
    assert "train/val_loss" in data.metrics and "data/rows_in" in data.metrics
    assert data.metrics["timing/train_qlora_seconds"] > 0
    history = client.get_metric_history(mlflow_run.info.run_id, "curves/val_loss")
    assert len(history) >= 2 and all(point.timestamp > 0 for point in history)  # streamed live by train_qlora
    assert len(client.get_metric_history(mlflow_run.info.run_id, "curves/train_loss")) >= 5
    assert client.list_artifacts(mlflow_run.info.run_id, "samples")  # what the model wrote at each evaluation
    assert data.params["lora.r"] == "4" and data.params["train.learning_rate"] == "0.003"
    assert mlflow_run.info.status == "FINISHED" and data.metrics["timing/record_run_seconds"] > 0
    assert data.tags["lib.transformers"] and data.tags["prefect.flow_run_id"]
    assert data.tags["dvc.dep.split_data.data/raw"] and data.tags["registry.version"] == "1"
    record = json.loads((root / "reports" / "mlflow_run.json").read_text())
    assert record["run_id"] == mlflow_run.info.run_id and record["started_by"] == "prefect"
    assert data.tags["promotion.alias"] == record["alias"] == expected_alias(root)
    assert data.tags["eval.per_item"] == "eval/predictions.jsonl" and data.tags["promotion.n_items"] == str(
        n_test(root)
    )
    head = run(["git", "rev-parse", "HEAD"], root, env).stdout.strip()
    assert data.tags["git.commit"] == head and data.tags["started_by"] == "prefect"
    lock = yaml.safe_load((root / "dvc.lock").read_text())
    splits_md5 = next(o["md5"] for o in lock["stages"]["split_data"]["outs"] if o["path"] == "data/splits")
    assert data.tags["dvc.out.data/splits"] == splits_md5
    artifacts = {a.path for a in client.list_artifacts(mlflow_run.info.run_id)}
    assert {"adapter", "plots", "params.yaml", "model_card"} <= artifacts
    adapter_files = {Path(a.path).name for a in client.list_artifacts(mlflow_run.info.run_id, "adapter")}
    assert "adapter_model.safetensors" in adapter_files


def test_second_repro_does_nothing(flow_project):
    root, env, _, _ = flow_project
    adapter = root / "models" / "adapter" / "adapter_model.safetensors"
    before = adapter.stat().st_mtime_ns
    done = run([sys.executable, "-m", "dvc", "repro"], root, env)
    assert "Running stage" not in done.stdout
    assert adapter.stat().st_mtime_ns == before
    assert "up to date" in run([sys.executable, "-m", "dvc", "status"], root, env).stdout


def stages_rerun_after(root: Path, env: dict, path: str, edit) -> set[str]:
    """The stages `dvc repro` would run after `edit(text)` replaced the file at `path` (a dry run, with
    --force-downstream standing in for the outputs that would change); the file is restored afterwards."""
    file = root / path
    original = file.read_text()
    file.write_text(edit(original))
    try:
        dry = run([sys.executable, "-m", "dvc", "repro", "--dry", "--force-downstream"], root, env).stdout
    finally:
        file.write_text(original)
    return set(re.findall(r"Running stage '(\w+)'", dry))


def stages_to_rerun(root: Path, env: dict, section: str, key: str, value) -> set[str]:
    """The stages `dvc repro` would run after setting params `section.key` to `value`."""

    def edit(text: str) -> str:
        params = yaml.safe_load(text)
        params[section][key] = value
        return yaml.safe_dump(params, sort_keys=False)

    return stages_rerun_after(root, env, "params.yaml", edit)


AFTER_EVALUATION = {"evaluate_adapter", "export_hub", "record_run"}


@pytest.mark.parametrize(
    ("module", "expected"),
    [
        ("stages/common/generation.py", AFTER_EVALUATION),  # evaluation and export import it, training does not
        ("stages/evaluation/charts.py", AFTER_EVALUATION),
        ("stages/tracking/registry.py", {"record_run"}),
        ("stages/training/watch.py", {"train_qlora"} | AFTER_EVALUATION),
    ],
)
def test_a_comment_in_a_module_reruns_only_the_stages_that_import_it(flow_project, module, expected):
    root, env, _, _ = flow_project
    assert stages_rerun_after(root, env, module, lambda text: text + "\n# a comment\n") == expected


def test_learning_rate_change_invalidates_train_evaluate_export_record_only(flow_project):
    root, env, _, _ = flow_project
    assert stages_to_rerun(root, env, "train", "learning_rate", 0.001) == {
        "train_qlora",
        "evaluate_adapter",
        "export_hub",
        "record_run",
    }


def test_split_seed_change_invalidates_from_split_on(flow_project):
    root, env, _, _ = flow_project
    assert stages_to_rerun(root, env, "data", "seed", 8) == ALL_STAGES - {"base_model"}


def n_test(root: Path) -> int:
    """The test items of the workspace's split (the membership rule decides how many)."""
    return len((root / "data" / "splits" / "test.jsonl").read_text().splitlines())


def expected_alias(root: Path) -> str:
    """What the promotion rule says for this workspace's predictions with no champion yet (the gate's own tests
    pin the rule itself)."""
    from stages.common.io import read_jsonl
    from stages.tracking.gate import Gate, Items, Provenance, decide

    rows = read_jsonl(root / "eval" / "predictions.jsonl")
    adapter, base = Items.from_rows(rows, "adapter"), Items.from_rows(rows, "base_zero_shot")
    return decide(Gate("avg_error", greater_is_better=False), adapter, None, base, Provenance("same")).alias


def make_version_1_a_poor_champion(root: Path):
    """The tiny model's adapter ties with the base model (neither writes a number yet), so version 1 was a
    challenger. Make it the champion by hand, as a user promoting it would, with per-item results $1,000,000
    off on every item, for a new version to beat."""
    from urllib.parse import urlsplit

    from stages.common.io import read_jsonl
    from stages.tracking.registry import PER_ITEM_ARTIFACT

    client = mlflow_client(root)
    first_version = client.get_model_version("qlora-price-adapter", "1")
    client.set_registered_model_alias("qlora-price-adapter", "champion", "1")
    rows = read_jsonl(root / "eval" / "predictions.jsonl")
    poor = "".join(json.dumps({**row, "adapter_prediction": row["truth"] + 1e6}) + "\n" for row in rows)
    # Written into this copy's artifact folder directly: MLflow caches a run's artifact store by run id for the
    # whole process, and every copy of the workspace has the same run ids.
    artifacts = Path(urlsplit(client.get_run(first_version.run_id).info.artifact_uri).path)
    (artifacts / PER_ITEM_ARTIFACT).write_text(poor, encoding="utf-8")
    return client


def mlflow_client(root: Path):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")


def all_runs(root: Path) -> list:
    client = mlflow_client(root)
    return client.search_runs([client.get_experiment_by_name("qlora-price").experiment_id])


def test_a_run_with_nothing_changed_is_up_to_date_in_seconds(workspace_copy):
    root, env = workspace_copy
    runs_before = len(all_runs(root))
    adapter = root / "models" / "adapter" / "adapter_model.safetensors"
    before = adapter.stat().st_mtime_ns
    started = time.monotonic()
    done = flow(root, env)
    seconds = time.monotonic() - started
    print(f"no-op retrain through the flow: {seconds:.1f} s")
    assert "up to date: data, params and code match dvc.lock" in done.stdout + done.stderr
    assert "nothing to push to DVC remote `shared`" in done.stdout + done.stderr  # flow.push: the remote has it all
    assert "dvc repro" not in done.stdout + done.stderr  # no stage task ran
    assert len(all_runs(root)) == runs_before and adapter.stat().st_mtime_ns == before
    assert "Retrain report: up to date" in latest_report(env)
    assert seconds < 60  # process start and Prefect import included; the check itself is `dvc status`


def test_a_second_flow_on_a_busy_workspace_stops_and_the_first_finishes(workspace_copy):
    root, env = workspace_copy
    client = make_version_1_a_poor_champion(root)
    set_param(root, "train", "learning_rate", 0.005)  # retrains; same test set, so the gate compares
    first = subprocess.Popen(
        [sys.executable, "-m", "flows", "--project-dir", str(root)],
        cwd=root,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    lock = root / ".cache" / "retrain.lock"
    deadline = time.monotonic() + 120
    while not (lock.is_file() and lock.read_text()) and time.monotonic() < deadline:
        time.sleep(0.2)
    second = flow(root, env, check=False)
    output, _ = first.communicate(timeout=600)
    assert second.returncode == 1
    assert "retrain not started: another retrain is running" in second.stderr and f"pid {first.pid}" in second.stderr
    assert first.returncode == 0, output[-4000:]
    assert "up to date" in run([sys.executable, "-m", "dvc", "status"], root, env).stdout
    assert len(all_runs(root)) == 2 and all(r.info.status == "FINISHED" for r in all_runs(root))

    record = json.loads((root / "reports" / "mlflow_run.json").read_text())
    assert record["version"] == "2" and record["promoted"] and "for champion v1: better by $" in record["reason"]
    assert record["comparison"]["n_items"] == n_test(root) and record["comparison"]["interval_low"] > 0
    assert str(client.get_model_version_by_alias("qlora-price-adapter", "champion").version) == "2"
    assert "current champion (MLflow)" in output and record["reason"] in output  # the table and the verdict
    report = latest_report(env)
    assert "Retrain report: retrained" in report and "promoted to `champion`" in report and record["run_id"] in report
    assert "| split | rows | sha256 |" in report  # the data report


def test_a_retrain_that_differs_only_by_its_seed_keeps_the_champion(workspace_copy):
    root, env = workspace_copy
    client = mlflow_client(root)
    client.set_registered_model_alias("qlora-price-adapter", "champion", "1")  # the first run's own results
    set_param(root, "train", "seed", 43)  # same data and settings: any difference is the seed's noise
    done = flow(root, env)
    output = done.stdout + done.stderr
    record = json.loads((root / "reports" / "mlflow_run.json").read_text())
    assert record["version"] == "2" and not record["promoted"] and record["alias"] == "challenger"
    assert str(client.get_model_version_by_alias("qlora-price-adapter", "champion").version) == "1"
    c = record["comparison"]
    assert c["against"] == "champion v1" and c["n_items"] == n_test(root) and c["interval_low"] <= 0
    assert record["reason"] in output
    report = latest_report(env)
    assert "**not promoted** (alias `challenger`)" in report and "95% paired interval" in report


def more_rows(n: int, seed: int, mark: str) -> list[dict]:
    """`n` products that are not in the first delivery: another seed, and `mark` in place of "model"."""
    return [{**row, "text": row["text"].replace("model", mark)} for row in price_rows(n, seed=seed)]


def data_since(root: Path) -> dict:
    return json.loads((root / "metrics" / "data.json").read_text())["since_last_run"]


def test_new_rows_keep_the_test_set_and_the_gate_compares_the_same_items(workspace_copy):
    """The default params, no pinned file: rows appended to the source keep every old test item, and the gate
    compares the new adapter with the champion on items both were scored on (or re-scores the champion)."""
    import pandas as pd

    root, env = workspace_copy
    make_version_1_a_poor_champion(root)
    tested_before = n_test(root)
    raw = root / "data" / "raw" / "prices.csv"
    pd.concat([pd.read_csv(raw), pd.DataFrame(more_rows(30, 1, "edition"))]).to_csv(raw, index=False)
    done = flow(root, env)
    output = done.stdout + done.stderr
    assert "split_data: changed deps: data/raw modified" in output
    since = data_since(root)
    assert since["test"]["kept"] == tested_before and since["test"]["removed"] == 0 and since["moved"] == 0
    record = json.loads((root / "reports" / "mlflow_run.json").read_text())
    assert record["version"] == "2" and record["reason"] in output
    print(f"new rows: version 2 is {record['alias']}: {record['reason']}")
    assert "for champion v1" in record["reason"]
    assert "items both were scored on" in record["reason"] or "champion v1 re-scored" in record["reason"]
    assert record["comparison"]["n_items"] >= tested_before  # the champion's logged metrics are another test set's
    tracked = yaml.safe_load((root / "data" / "raw" / "prices.csv.dvc").read_text())["outs"][0]
    assert tracked["md5"] == hashlib.md5(raw.read_bytes()).hexdigest()  # DVC cached the new version
    assert json.loads((root / "metrics" / "data.json").read_text())["rows_in"] == 120


def test_a_pinned_test_set_still_pins_it(workspace_copy):
    import pandas as pd

    root, env = workspace_copy
    pinned = root / "data" / "raw" / "test-pinned.jsonl"
    shutil.copy(root / "data" / "splits" / "test.jsonl", pinned)
    set_param(root, "data", "test_split", "data/raw/test-pinned.jsonl")
    raw = root / "data" / "raw" / "prices.csv"
    pd.concat([pd.read_csv(raw), pd.DataFrame(more_rows(30, 1, "edition"))]).to_csv(raw, index=False)
    flow(root, env)
    assert (root / "data" / "splits" / "test.jsonl").read_bytes() == pinned.read_bytes()
    assert data_since(root)["test"] == {"kept": n_test(root), "added": 0, "removed": 0}


def deliver(folder: Path, name: str, rows: list[dict]) -> None:
    import pandas as pd

    pd.DataFrame(rows).to_csv(folder / name, index=False)


def test_three_deliveries_into_a_folder_keep_the_test_set_and_make_a_history(workspace_copy):
    """The first delivery is the workspace's file, moved into data/raw/prices/; two more arrive, the flow runs
    after each: no test item is lost, the gate compares on the items both were scored on (6 new rows: 18 of
    19 items) and then re-scores the champion (40 more: 19 of 22 items, under tracking.min_shared), the history
    lists the three retrains, and a run's data version gives back its splits."""
    root, env = workspace_copy
    make_version_1_a_poor_champion(root)
    folder = root / "data" / "raw" / "prices"
    dvc(["remove", "data/raw/prices.csv.dvc"], root, env)
    folder.mkdir()
    shutil.move(root / "data" / "raw" / "prices.csv", folder / "2026-12-01.csv")
    deliver(folder, "2026-12-02.csv", more_rows(6, 2, "batch2"))
    dvc(["add", "data/raw/prices"], root, env)
    set_param(root, "data", "source", "data/raw/prices/")
    records, tested = [], [n_test(root)]
    for delivery in ("2026-12-03.csv", None):
        flow(root, env)
        since = data_since(root)
        assert since["test"]["kept"] == tested[-1] and since["test"]["removed"] == 0 and since["moved"] == 0
        tested.append(n_test(root))
        records.append(json.loads((root / "reports" / "mlflow_run.json").read_text()))
        commit(root, env, "retrained")
        if delivery:
            deliver(folder, delivery, more_rows(40, 3, "batch3"))
    second, third = records
    assert tested == [18, 19, 22], tested
    assert second["promoted"] and "on the 18 items both were scored on" in second["reason"], second["reason"]
    assert "champion v2 re-scored from its logged model" in third["reason"], third["reason"]
    assert third["comparison"]["n_items"] == 22

    printed = run([sys.executable, "-m", "flows.history", "--project-dir", str(root)], root, env).stdout
    lines = [line for line in printed.splitlines() if line.startswith("| 20")]
    assert len(lines) == 3, printed
    third_decision = "v3 promoted" if third["promoted"] else f"v3 {third['alias']}"
    assert "| v2 promoted | v2 |" in lines[1] and f"| {third_decision} |" in lines[2]
    assert (root / "reports" / "history.png").is_file()
    assert "| v2 promoted | v2 |" in mlflow_client(root).get_registered_model("qlora-price-adapter").description

    # The second run's data, back from its logged data version, split again: the splits DVC recorded for it.
    client = mlflow_client(root)
    for name in ("data_version/data/raw/prices.dvc", "dvc.lock", "params.yaml"):
        local = client.download_artifacts(second["run_id"], name, str(root.parent / "second"))
        shutil.copy(local, root / name.removeprefix("data_version/"))
    dvc(["checkout", "data/raw/prices.dvc"], root, env)
    assert sorted(p.name for p in folder.iterdir()) == ["2026-12-01.csv", "2026-12-02.csv"]
    run([sys.executable, "-m", "stages.split_data"], root, env)
    # raw data, params and splits as that run recorded them (metrics/data.json differs: its since_last_run
    # compares with the splits on disk, the third run's)
    status = dvc(["status", "split_data"], root, env).stdout
    assert not any(changed in status for changed in ("data/raw", "data/splits", "params")), status


def test_dvc_repro_alone_is_recorded_with_how_it_started(workspace_copy):
    root, env = workspace_copy
    set_param(root, "tracking", "min_improvement", 1.0)  # re-runs record_run only: cheap
    done = run([sys.executable, "-m", "dvc", "repro"], root, env)
    assert set(re.findall(r"Running stage '(\w+)'", done.stdout)) == {"record_run"}
    newest = max(all_runs(root), key=lambda r: r.info.start_time)
    assert newest.data.tags["started_by"] == "dvc repro" and newest.info.status == "FINISHED"
    assert newest.data.params["tracking.min_improvement"] == "1.0"
    record = json.loads((root / "reports" / "mlflow_run.json").read_text())
    assert record["new_version"] is False and "same adapter as version 1" in record["reason"]


def test_dvc_exp_run_is_recorded_with_the_experiment_name(workspace_copy):
    root, env = workspace_copy
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-qm", "after the first run"], root, env)
    run([sys.executable, "-m", "dvc", "exp", "run", "-n", "margin-2", "-S", "tracking.min_improvement=2.0"], root, env)
    newest = max(all_runs(root), key=lambda r: r.info.start_time)
    assert newest.data.tags["started_by"] == "dvc exp run" and newest.data.tags["dvc.exp_name"] == "margin-2"
    assert newest.data.params["tracking.min_improvement"] == "2.0"


def test_served_deployment_runs_on_demand_and_pauses_when_stopped(workspace_copy):
    root, env = workspace_copy
    # Output to a file, not a pipe: a process the served runs start may outlive `flows.serve` and hold a
    # pipe open, which once made reading it time out although the server had stopped.
    log = root.parent / "serve.log"
    serve = subprocess.Popen(
        [sys.executable, "-m", "flows.serve", "--project-dir", str(root), "--cron", "0 3 * * *"],
        cwd=root,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        listed = ""
        while "scheduled-retrain" not in listed and time.monotonic() < deadline:
            time.sleep(2)
            listed = run([sys.executable, "-m", "prefect", "deployment", "ls"], root, env, check=False).stdout
        assert "scheduled-retrain" in listed
        set_param(root, "tracking", "min_improvement", 3.0)  # something to do: record_run re-runs
        for expected in ("Retrain report: retrained", "Retrain report: up to date"):
            started = time.monotonic()
            done = run(
                [sys.executable, "-m", "prefect", "deployment", "run", "retrain/scheduled-retrain", "--watch"],
                root,
                env,
            )
            print(f"deployment run ({expected}): {time.monotonic() - started:.1f} s")
            assert "Completed" in done.stdout + done.stderr
            assert expected in latest_report(env)
    finally:
        serve.send_signal(signal.SIGINT)
        serve.wait(timeout=60)  # Ctrl-C stops serving within a minute
    output = log.read_text()
    inspected = run([sys.executable, "-m", "prefect", "deployment", "inspect", "retrain/scheduled-retrain"], root, env)
    assert "'paused': True" in inspected.stdout, output[-3000:]


FLAKY_STAGE = """
import sys
from pathlib import Path
attempts = Path("attempts.txt")
attempts.write_text(attempts.read_text() + "x" if attempts.exists() else "x")
if len(attempts.read_text()) == 1:
    sys.exit(int(sys.argv[1]))  # fails the first time only
Path("done.txt").touch()
"""
RETRY_FLOW = """
import sys
from prefect import flow
from flows.retrain import StageFailed, repro_stage, retry_when_transient

@flow
def flaky():
    repro_stage.with_options(retries=2, retry_delay_seconds=0, retry_condition_fn=retry_when_transient)(
        "flaky", sys.argv[1], {}
    )

try:
    flaky()
except StageFailed as exc:
    print(f"failed: {exc}")
"""


@pytest.mark.parametrize(("first_exit", "attempts"), [(75, 2), (1, 1)])
def test_a_stage_is_retried_only_when_its_failure_may_pass(tmp_path, prefect_api, first_exit, attempts):
    env = {**os.environ, "PREFECT_API_URL": prefect_api, "PREFECT_HOME": str(tmp_path / ".prefect")}
    run(["git", "init", "-q"], tmp_path, env)
    run([sys.executable, "-m", "dvc", "init", "-q"], tmp_path, env)
    (tmp_path / "flaky.py").write_text(FLAKY_STAGE)
    stage = {"cmd": f"python flaky.py {first_exit}", "deps": ["flaky.py"], "outs": [{"done.txt": {"cache": False}}]}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"flaky": stage}}))
    done = run([sys.executable, "-c", RETRY_FLOW, str(tmp_path)], REPO_ROOT, stage_env(env))
    assert len((tmp_path / "attempts.txt").read_text()) == attempts
    if first_exit == 1:
        assert "failed: `dvc repro flaky` failed (will not pass by retrying)" in done.stdout
    else:
        assert "failed:" not in done.stdout and (tmp_path / "done.txt").is_file()


def stage_env(env: dict) -> dict:
    """`python` in dvc.yaml commands is this interpreter."""
    return {**env, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"}


def test_a_tracking_server_that_is_down_stops_the_run_before_any_stage(tmp_path, tiny_model_dir, prefect_api):
    from tests.flow_workspace import new_workspace

    env = new_workspace(tmp_path, tiny_model_dir, prefect_api)
    env["MLFLOW_TRACKING_URI"] = "http://ml:s3cret@127.0.0.1:9"  # nothing listens on port 9
    done = flow(tmp_path, env, check=False)
    output = done.stdout + done.stderr
    assert done.returncode == 1, output[-3000:]
    assert "retrain failed: MLflow tracking server http://ml:***@127.0.0.1:9 does not answer" in done.stderr
    assert "s3cret" not in output
    assert not (tmp_path / "dvc.lock").exists() and not (tmp_path / "models" / "adapter").exists()  # no stage ran
