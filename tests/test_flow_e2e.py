"""End to end: the Prefect flow drives every DVC stage in a temporary git repository and records the
run in MLflow; a second `dvc repro` does nothing; params changes invalidate exactly the right stages."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO_ROOT, write_project

COPIED = (
    "stages",
    "flows",
    "dvc.yaml",
    ".dvc/config",
    ".dvc/.gitignore",
    ".dvcignore",
    ".gitignore",
    "data/raw/README.md",
)
ALL_STAGES = {"base_model", "split_data", "tokenize_data", "train_qlora", "evaluate_adapter", "export_hub"}


def run(command: list[str], cwd: Path, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if check and done.returncode != 0:
        raise AssertionError(
            f"{' '.join(command)} exited {done.returncode}\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
        )
    return done


@pytest.fixture(scope="module")
def flow_project(tmp_path_factory, tiny_model_dir):
    root = tmp_path_factory.mktemp("e2e")
    for name in COPIED:
        source = REPO_ROOT / name
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, root / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(source, root / name)
    write_project(root, tiny_model_dir)
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PREFECT_HOME": str(root / ".prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "TQDM_DISABLE": "1",
        "GIT_AUTHOR_NAME": "t",
        "GIT_AUTHOR_EMAIL": "t@t",
        "GIT_COMMITTER_NAME": "t",
        "GIT_COMMITTER_EMAIL": "t@t",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("PREFECT_API_URL", None)
    run(["git", "init", "-q"], root, env)
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-qm", "tiny project"], root, env)
    done = run([sys.executable, "-m", "flows.retrain", "--project-dir", str(root)], root, env)
    return root, env, done


def test_flow_runs_every_stage_and_prints_the_table(flow_project):
    root, _, done = flow_project
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

    root, env, _ = flow_project
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("qlora-price")
    (mlflow_run,) = client.search_runs([experiment.experiment_id])
    data = mlflow_run.data
    evaluation = json.loads((root / "metrics" / "eval.json").read_text())
    assert data.metrics["eval.adapter.avg_error"] == pytest.approx(evaluation["adapter"]["avg_error"])
    assert "train.val_loss" in data.metrics and "data.rows_in" in data.metrics
    assert data.metrics["stage_seconds.train_qlora"] > 0
    assert len(client.get_metric_history(mlflow_run.info.run_id, "train_loss")) >= 5
    assert data.params["lora.r"] == "4" and data.params["train.learning_rate"] == "0.003"
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
    root, env, _ = flow_project
    adapter = root / "models" / "adapter" / "adapter_model.safetensors"
    before = adapter.stat().st_mtime_ns
    done = run([sys.executable, "-m", "dvc", "repro"], root, env)
    assert "Running stage" not in done.stdout
    assert adapter.stat().st_mtime_ns == before
    assert "up to date" in run([sys.executable, "-m", "dvc", "status"], root, env).stdout


def stages_to_rerun(root: Path, env: dict, section: str, key: str, value) -> set[str]:
    """The stages `dvc repro` would run after setting params `section.key` to `value` (a dry run, with
    --force-downstream standing in for the outputs that would change)."""
    params_path = root / "params.yaml"
    original = params_path.read_text()
    params = yaml.safe_load(original)
    params[section][key] = value
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        dry = run([sys.executable, "-m", "dvc", "repro", "--dry", "--force-downstream"], root, env).stdout
    finally:
        params_path.write_text(original)
    return set(re.findall(r"Running stage '(\w+)'", dry))


def test_learning_rate_change_invalidates_train_evaluate_export_only(flow_project):
    root, env, _ = flow_project
    assert stages_to_rerun(root, env, "train", "learning_rate", 0.001) == {
        "train_qlora",
        "evaluate_adapter",
        "export_hub",
    }


def test_split_seed_change_invalidates_from_split_on(flow_project):
    root, env, _ = flow_project
    assert stages_to_rerun(root, env, "data", "seed", 8) == ALL_STAGES - {"base_model"}


def test_champion_row_comes_from_the_registry_when_scored_on_the_same_test_set(flow_project):
    from mlflow import MlflowClient

    from stages.core.config import load_params
    from stages.core.paths import Paths
    from stages.core.report import comparison_table
    from stages.core.tracking import champion_metrics

    root, _, _ = flow_project
    paths = Paths.at(root)
    params = load_params(paths.params)
    assert champion_metrics(paths, params) is None  # nothing registered yet
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    (mlflow_run,) = client.search_runs([client.get_experiment_by_name("qlora-price").experiment_id])
    name = params.tracking.registered_model
    client.create_registered_model(name)
    version = client.create_model_version(name, f"runs:/{mlflow_run.info.run_id}/adapter", mlflow_run.info.run_id)
    client.set_registered_model_alias(name, "champion", version.version)

    champion = champion_metrics(paths, params)
    evaluation = json.loads((root / "metrics" / "eval.json").read_text())
    assert champion["avg_error"] == pytest.approx(evaluation["adapter"]["avg_error"])
    assert "current champion (MLflow)" in comparison_table({**evaluation, "champion": champion})

    client.set_tag(mlflow_run.info.run_id, "data.test_sha256", "another-test-set")
    assert champion_metrics(paths, params) is None
