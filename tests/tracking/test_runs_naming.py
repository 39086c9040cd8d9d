"""stages/tracking/runs.py: run names read against the last run's dvc.lock, and remote URLs without tokens."""

import yaml

from stages.tracking.runs import run_name

LOCK = yaml.safe_dump({
    "stages": {
        "train_qlora": {"params": {"params.yaml": {"train": {"learning_rate": 1e-3, "seed": 42}}}},
        "export_hub": {"params": {"params.yaml": {"data.source": "embedded:diamonds"}}},
    }
})  # fmt: skip
CURRENT = {"train.learning_rate": 2e-3, "train.seed": 42, "data.source": "embedded:diamonds"}


def test_a_run_is_named_after_the_params_that_differ_from_dvc_lock():
    assert run_name("retrain", LOCK, CURRENT) == "retrain: learning_rate=0.002"
    assert run_name("dvc repro", LOCK, {**CURRENT, "train.learning_rate": 1e-3}) == "dvc repro: data or code changed"
    assert run_name("retrain", None, CURRENT) == "retrain: first run"
    assert run_name("dvc repro", LOCK, {"data.source": "embedded:diamonds"}) == "dvc repro: data or code changed"


def test_a_remote_url_reaches_mlflow_without_its_token():
    from stages.tracking.runs import without_credentials

    assert without_credentials("https://ghp_secret@github.com/o/r.git") == "https://github.com/o/r.git"
    assert without_credentials("https://user:pw@host/o/r") == "https://host/o/r"
    assert without_credentials("git@github.com:o/r.git") == "git@github.com:o/r.git"
