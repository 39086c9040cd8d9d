"""The tiny project after record_run, shared by the serving tests: its registry holds the logged MLflow Model."""

from __future__ import annotations

import json
import os

import pytest

from stages import record_run
from stages.common.io import read_jsonl
from tests.conftest import copy_outputs

MODEL = "qlora-price-adapter"


@pytest.fixture(scope="session")
def registered(pipeline_project, tmp_path_factory):
    """A copy of the tiny project after record_run: (paths, params, the store's URI, the run record)."""
    paths, params, _ = pipeline_project
    copy = copy_outputs(paths, tmp_path_factory.mktemp("registered"))
    (copy.root / "params.yaml").write_text((paths.root / "params.yaml").read_text())
    saved = {name: os.environ.pop(name, None) for name in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "DVC_ROOT")}
    try:
        record_run.run(params.only(record_run.SPEC.params, "record_run"), copy)
    finally:
        os.environ.update({name: value for name, value in saved.items() if value is not None})
    record = json.loads(copy.run_record.read_text())
    return copy, params, f"sqlite:///{copy.mlflow_db}", record


def first_batch(paths, params) -> tuple[list[dict], list[dict]]:
    """The first evaluation batch of test items and their prediction rows (a batch computes as one)."""
    size = params.evaluate.batch_size
    return read_jsonl(paths.split("test"))[:size], read_jsonl(paths.predictions)[:size]
