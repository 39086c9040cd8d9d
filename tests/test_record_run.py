"""Stage record_run: one MLflow run per execution, tagged with how it started, and the adapter registered."""

import json
import shutil
from pathlib import Path

import pytest

from stages import record_run
from stages.common.config import load_params
from stages.common.paths import Paths
from tests.conftest import REPO_ROOT, run_as_declared

EVALUATION = {
    "adapter": {"avg_error": 40.0, "rmsle": 0.3, "hit_rate": 0.5, "unparsed": 0},
    "base_zero_shot": {"avg_error": 400.0, "rmsle": 3.0, "hit_rate": 0.0, "unparsed": 0},
}


PREDICTIONS = [
    {"text": f"item {i}", "truth": 100.0 + 10 * i, "adapter_output": "", "adapter_prediction": 140.0 + 10 * i,
     "band": "green", "base_output": "", "base_prediction": 500.0 + 10 * i}
    for i in range(12)
]  # the adapter $40 off on every item, the base model $400: the metrics in EVALUATION  # fmt: skip


@pytest.fixture
def finished_project(tmp_path, monkeypatch):
    """What the other stages leave for record_run: an adapter, metrics, a loss curve."""
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "DVC_EXP_NAME", "DVC_ROOT", "PIPELINE_STARTED_BY"):
        monkeypatch.delenv(name, raising=False)
    shutil.copy(REPO_ROOT / "params.yaml", tmp_path / "params.yaml")
    paths = Paths.at(tmp_path)
    paths.adapter.mkdir(parents=True)
    (paths.adapter / "adapter_config.json").write_text(json.dumps({"r": 4}))
    (paths.adapter / "adapter_model.safetensors").write_bytes(b"weights")
    paths.eval_metrics.parent.mkdir()
    paths.eval_metrics.write_text(json.dumps(EVALUATION))
    splits = {"train": {"n": 60, "sha256": "a" * 64}, "val": {"n": 8, "sha256": "b" * 64}}
    paths.data_metrics.write_text(json.dumps({"rows_in": 90, **splits, "test": {"n": 12, "sha256": "c" * 64}}))
    paths.loss_plot.parent.mkdir()
    paths.loss_plot.write_text("step,train_loss,val_loss\n2,3.0,\n4,2.5,2.7\n")
    paths.predictions.parent.mkdir()
    paths.predictions.write_text("".join(json.dumps(row) + "\n" for row in PREDICTIONS))
    paths.export.mkdir()
    (paths.export / "README.md").write_text("# price-adapter\n\nThe card export_hub wrote.\n")
    paths.base_model.mkdir(parents=True)  # what the logged model names its base by
    source = {"source": "models/tiny", "kind": "local", "revision": "main", "resolved_revision": None, "hub_id": "t"}
    (paths.base_model / "source.json").write_text(json.dumps(source))
    paths.splits.mkdir(parents=True)
    paths.split("test").write_text(
        "".join(json.dumps({"text": r["text"], "price": r["truth"]}) + "\n" for r in PREDICTIONS)
    )
    monkeypatch.chdir(tmp_path)
    return paths


def client_of(paths):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{paths.mlflow_db}")


def test_the_run_reads_as_model_training_in_the_mlflow_ui(finished_project):
    """What a person comparing runs meets: a model-training experiment, Source and User columns, the splits as
    datasets with their digests, and metrics in sections (eval/, train/, data/, curves/)."""
    assert record_run.main([]) == 0
    client = client_of(finished_project)
    run = client.get_run(json.loads(finished_project.run_record.read_text())["run_id"])
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    assert run.info.run_name == "dvc repro: first run"  # no dvc.lock committed to compare the params with
    tags = run.data.tags
    assert tags["mlflow.source.name"] == "dvc.yaml (dvc repro)" and tags["mlflow.source.type"] == "LOCAL"
    assert tags["mlflow.user"] and tags["mlflow.source.git.commit"] == tags["git.commit"]
    inputs = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert set(inputs) == {"diamonds-train", "diamonds-val", "diamonds-test"}
    test = inputs["diamonds-test"]
    assert test.dataset.digest == "c" * 16 and json.loads(test.dataset.profile) == {"num_rows": 12}
    assert [(t.key, t.value) for t in test.tags] == [("mlflow.data.context", "test")]
    assert json.loads(test.dataset.source)["uri"] == "data/splits/test.jsonl"
    sections = {name.split("/", 1)[0] for name in run.data.metrics}
    # no train.json or tokens.json in this fixture; promotion/: the primary metric and its interval, for the history
    assert sections == {"eval", "data", "curves", "promotion"}, sections


def test_dvc_repro_alone_gets_its_own_run_and_a_champion(finished_project, capsys):
    assert record_run.main([]) == 0
    record = json.loads(finished_project.run_record.read_text())
    assert record["started_by"] == "dvc repro" and record["promoted"] and record["version"] == "1"
    assert "better by $360 [$360, $360] over 12 items: shown at 95%" in capsys.readouterr().out
    run = client_of(finished_project).get_run(record["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["started_by"] == "dvc repro"
    assert run.data.metrics["eval/adapter.avg_error"] == 40.0 and run.data.tags["data.test_sha256"] == "c" * 64
    assert run.data.tags["lib.torch"] and run.data.tags["promotion.alias"] == "champion"
    assert [m.value for m in client_of(finished_project).get_metric_history(record["run_id"], "curves/val_loss")] == [
        2.7
    ]


def test_the_decision_is_in_the_record_the_tags_the_version_and_the_runs_model_card(finished_project):
    assert record_run.main([]) == 0
    record = json.loads(finished_project.run_record.read_text())
    c = record["comparison"]
    assert c["against"] == "the base model zero-shot (no champion yet)" and c["n_items"] == 12
    assert c["improvement"] == c["interval_low"] == c["interval_high"] == 360.0 and c["confidence"] == 0.95
    client = client_of(finished_project)
    tags = client.get_run(record["run_id"]).data.tags
    assert tags["promotion.interval"] == "[360, 360]" and tags["promotion.n_items"] == "12"
    version = client.get_model_version("qlora-price-adapter", "1")
    assert version.description == record["reason"] and version.tags["promotion.improvement"] == "360"
    history = client.get_registered_model("qlora-price-adapter").description
    assert "| when (UTC) | rows in | test items |" in history and "| v1 promoted | v1 |" in history
    logged = {a.path for a in client.list_artifacts(record["run_id"], "history")}
    assert logged == {"history/history.md", "history/history.png"}
    card = client.download_artifacts(record["run_id"], "model_card/README.md", str(finished_project.root / "back"))
    text = Path(card).read_text()
    assert text.startswith("# price-adapter") and "## Promotion" in text and record["reason"] in text
    assert "| avg_error | 40 | 400 | 360 | [360, 360] | 12 | interval above 0 |" in text


def test_record_run_reads_every_params_section_it_declares(finished_project):
    read: dict[str, set[str]] = {}
    run_as_declared(record_run, load_params(finished_project.params), finished_project, read)
    assert read["record_run"] == set(record_run.SPEC.params)


def test_dvc_exp_run_is_tagged_with_the_experiment_name(finished_project, monkeypatch):
    monkeypatch.setenv("DVC_EXP_NAME", "bushy-lobe")
    assert record_run.main([]) == 0
    record = json.loads(finished_project.run_record.read_text())
    tags = client_of(finished_project).get_run(record["run_id"]).data.tags
    assert tags["started_by"] == "dvc exp run" and tags["dvc.exp_name"] == "bushy-lobe"


def test_the_flows_run_is_adopted_and_left_open(finished_project, monkeypatch):
    client = client_of(finished_project)
    experiment = client.create_experiment("qlora-price")
    flow_run = client.create_run(experiment, tags={"started_by": "prefect"})
    client.log_metric(flow_run.info.run_id, "curves/val_loss", 2.9, step=4)  # streamed live by train_qlora
    monkeypatch.setenv("MLFLOW_RUN_ID", flow_run.info.run_id)
    assert record_run.main([]) == 0
    assert json.loads(finished_project.run_record.read_text())["run_id"] == flow_run.info.run_id
    run = client.get_run(flow_run.info.run_id)
    assert run.info.status == "RUNNING"  # the flow ends it after adding stage times
    assert [m.value for m in client.get_metric_history(flow_run.info.run_id, "curves/val_loss")] == [2.9]  # not twice
    assert len(client.search_runs([experiment])) == 1


def test_a_second_record_of_the_same_adapter_registers_nothing_new(finished_project):
    assert record_run.main([]) == 0
    assert record_run.main([]) == 0
    record = json.loads(finished_project.run_record.read_text())
    assert record["new_version"] is False and "same adapter as version 1" in record["reason"]


def test_missing_evaluation_is_a_clear_error(finished_project, capsys):
    finished_project.eval_metrics.unlink()
    assert record_run.main([]) == 1
    assert "metrics/eval.json: missing; run the stages before record_run" in capsys.readouterr().err
    assert not finished_project.run_record.exists()


def test_a_password_in_the_tracking_uri_is_masked_where_it_is_shown():
    from stages.tracking.store import shown_uri

    assert shown_uri("postgresql://ml:s3cret@db:5432/mlflow") == "postgresql://ml:***@db:5432/mlflow"
    assert shown_uri("sqlite:///x/mlflow.db") == "sqlite:///x/mlflow.db"


def test_a_failing_live_stream_does_not_print_the_password(capsys, monkeypatch):
    from stages.training.watch import MlflowStream

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail at once, not after minutes of retries
    stream = MlflowStream("0123456789abcdef", "http://ml:s3cret@127.0.0.1:9/")  # nothing listens on port 9
    stream.text(1, "sample")
    printed = capsys.readouterr().out
    assert "warning: MLflow logging" in printed and "http://ml:***@127.0.0.1:9/" in printed and "s3cret" not in printed


def test_a_retrain_that_trained_less_than_the_champion_says_so_in_the_record(finished_project):
    """train_qlora's metrics/train.json is logged on the run (train/steps, train/tokens_seen) and read back from
    the champion's run by the next record_run's gate."""
    paths = finished_project
    paths.train_metrics.write_text(json.dumps({"steps": 150, "tokens_seen": 22500, "stopped_early": False}))
    assert record_run.main([]) == 0
    paths.train_metrics.write_text(json.dumps({"steps": 60, "tokens_seen": 9000, "stopped_early": False}))
    (paths.adapter / "adapter_model.safetensors").write_bytes(b"other weights")
    assert record_run.main([]) == 0
    record = json.loads(paths.run_record.read_text())
    assert record["version"] == "2" and record["alias"] == "challenger"  # the same results: not better
    assert record["reason"].endswith(
        "; the candidate trained 60 steps (9,000 tokens) against champion v1's 150 steps (22,500 tokens)"
    )
    assert record["trained"]["champion"] == {"steps": 150, "tokens": 22500}
