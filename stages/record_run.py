"""Stage `record_run`: record this pipeline execution in MLflow, register the adapter, apply the promotion gate.

Runs last, whenever any output it reads changed, so every execution that did something is one MLflow run,
whether it was started by the Prefect flow, `dvc repro` or `dvc exp run`:
- the run: the flow's (its id in $MLFLOW_RUN_ID, where train_qlora streamed the loss curve live), or a new
  one tagged `started_by` = "dvc repro" / "dvc exp run" and `dvc.exp_name` = $DVC_EXP_NAME; in a sweep's
  trial ($SWEEP_PARENT_RUN_ID set by flows/sweep.py), a child of the sweep's run that registers nothing;
- params, the stages' metrics, the loss curve, the adapter, charts, predictions, model card, dvc.lock, and
  lineage tags (stages/tracking/runs.py);
- the adapter as an MLflow Model (serving/pricer.py: a pyfunc that prices descriptions), linked to the run;
- a registry version of `tracking.registered_model` for a new adapter, pointing at that model (identical
  adapter bytes reuse their version), which takes `champion` or `challenger` by the paired rule in
  stages/tracking/gate.py, comparing its per-item test results with the champion's
  (stages/tracking/registry.py);
- the decision in words and numbers on the run and the version (tags, description) and in the run's copy of
  the model card.
It reads what the other stages wrote and every params section but `flow` (all of them are recorded), and
writes the run record: run id, store, version, alias, the reason, and the previous champion's metrics for
the report. Inputs and outputs: `SPEC` below.

Run: `python -m stages.record_run` (or `dvc repro record_run`).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from stages.common.cli import run_stage
from stages.common.config import PRICE, Params, PromptConfig, QuantizationConfig, flatten, params_by_key
from stages.common.errors import StageError
from stages.common.io import read_json, read_jsonl, write_json
from stages.common.paths import Paths
from stages.common.report import promotion_markdown
from stages.common.spec import StageSpec
from stages.tracking import history
from stages.tracking.registry import MODEL_URI_TAG, Rescore, register_adapter
from stages.tracking.runs import (
    CHARTS,
    METRIC_FILES,
    RECORDED,
    champion_metrics,
    committed_lock,
    record_pipeline_run,
    run_name,
    workspace_test_set,
)
from stages.tracking.store import client_for, shown_uri, tracking_uri

RECORDED_PARAMS = ("base_model", "data", "prompt", "quantization", "lora", "train", "evaluate", "export", "tracking")
# The base model and the test split: to re-score a champion; the train and val splits: what the adapter saw;
# the raw data's .dvc files: which data version it was (stages/tracking/runs.py `log_data_version`).
SPEC = StageSpec(
    "record_run",
    params=RECORDED_PARAMS,
    reads=(*METRIC_FILES, *CHARTS, *RECORDED, Paths.base_model, Paths.splits, Paths.raw_dir),
    writes=(Paths.run_record,),
)


@dataclass(frozen=True)
class Result:
    run_id: str
    version: str
    alias: str | None
    reason: str


def how_started() -> tuple[str, dict[str, str]]:
    """`started_by` for a new run, and tags naming the DVC experiment when `dvc exp run` started it."""
    experiment = os.environ.get("DVC_EXP_NAME")
    started_by = os.environ.get("PIPELINE_STARTED_BY") or ("dvc exp run" if experiment else "dvc repro")
    return started_by, ({"dvc.exp_name": experiment} if experiment else {})


def sweep_trial(params: Params) -> tuple[str, dict[str, str]] | None:
    """(run name, tags) of a sweep's trial, which flows/sweep.py's DVC queue runs with $SWEEP_ID,
    $SWEEP_PARENT_RUN_ID and $SWEEP_KEYS set: a child of the sweep's run, named after the values it tried.
    None outside a sweep."""
    parent = os.environ.get("SWEEP_PARENT_RUN_ID")
    if not parent:
        return None
    values = flatten(params)
    tried = " ".join(f"{key.rsplit('.', 1)[-1]}={values[key]}" for key in os.environ.get("SWEEP_KEYS", "").split(","))
    name = f"{os.environ.get('DVC_EXP_NAME', 'trial')} {tried}".strip()
    return name, {"mlflow.parentRunId": parent, "sweep.id": os.environ.get("SWEEP_ID", ""), "sweep.trial": tried}


def record_trial(params: Params, paths: Paths, name: str, tags: dict[str, str]) -> Result:
    """A sweep trial's child run, with its MLflow Model; no registry version: the sweep's gate decides once,
    for its best trial (flows/sweep.py), so trials finishing together never race on the aliases."""
    started_by, extra_tags = how_started()
    run_id = record_pipeline_run(paths, params, started_by, run_name=name, tags={**tags, **extra_tags})
    log_model(client_for(paths, params), run_id, params, paths)
    reason = "a sweep trial: the sweep registers its best trial and applies the gate once"
    write_json(paths.run_record, {
        "run_id": run_id, "tracking_uri": shown_uri(tracking_uri(paths, params)), "started_by": started_by,
        **extra_tags, **tags, "version": None, "alias": None, "promoted": False, "reason": reason,
    })  # fmt: skip
    print(f"MLflow run {run_id} ({name}), child of sweep run {tags['mlflow.parentRunId']}")
    return Result(run_id, "", None, reason)


def rescorer(params: Params, paths: Paths, client) -> Rescore:
    """How to re-score a champion on this workspace's test split as evaluate_adapter scores: from the MLflow
    Model its run logged (its adapter, with the prompt, generation and 4-bit settings it was logged with, so a
    changed prompt since does not handicap it), or, for a run recorded before models were logged, from the
    adapter in its run with this workspace's settings. The rescore returns None without the base model or the
    test split here, and raises StageError when the champion was trained on another base than this one."""

    def rescore(run_id: str) -> list[dict] | None:
        if not (paths.base_model / "config.json").is_file() or not paths.split("test").is_file():
            return None
        from stages.evaluate_adapter import adapter_rows

        with tempfile.TemporaryDirectory(prefix="champion-") as folder:
            model_uri = client.get_run(run_id).data.tags.get(MODEL_URI_TAG)
            if not model_uri:
                return adapter_rows(params, paths, Path(client.download_artifacts(run_id, "adapter", folder)))
            import mlflow.artifacts

            local = Path(
                mlflow.artifacts.download_artifacts(
                    model_uri, dst_path=folder, tracking_uri=tracking_uri(paths, params)
                )
            )
            config = read_json(local / "artifacts" / "config.json")
            return adapter_rows(as_logged(params, paths, config), paths, local / "artifacts" / "adapter")

    return rescore


def as_logged(params: Params, paths: Paths, config: dict) -> Params:
    """`params` with the prompt, generation and quantization a logged model's `config` (serving/pricer.py) was
    scored with; StageError when its base differs from this workspace's models/base."""
    here = read_json(paths.base_model / "source.json")
    theirs = config["base"]
    identity = ("kind", "source", "resolved_revision")
    if [theirs.get(key) for key in identity] != [here.get(key) for key in identity]:
        raise StageError(
            f"it was trained on the base {theirs['source']!r} ({theirs['kind']}), this workspace's is "
            f"{here['source']!r}: its adapter cannot be scored on this base"
        )
    generation = replace(params.evaluate, **config["generation"])
    return replace(
        params, prompt=PromptConfig(**config["prompt"]), evaluate=generation,
        quantization=QuantizationConfig(**config["quantization"]),
    )  # fmt: skip


def log_model(client, run_id: str, params: Params, paths: Paths):
    """The adapter as an MLflow Model (serving/pricer.py), logged for the run and named in its `model.uri` tag:
    the LoggedModel."""
    from serving.pricer import log_model as log_pricer

    model = log_pricer(client, run_id, params, paths, read_jsonl(paths.split("test")))
    client.set_tag(run_id, MODEL_URI_TAG, f"models:/{model.model_id}")
    return model


def log_card_with_decision(client, run_id: str, paths: Paths, record: dict) -> None:
    """The run's copy of the model card (model_card/README.md), with the promotion decision added: export_hub
    wrote the card before the gate ran, so the exported one (and the Hub's) cannot say it."""
    card = paths.export / "README.md"
    if card.is_file():
        text = f"{card.read_text(encoding='utf-8').rstrip()}\n\n## Promotion\n\n{promotion_markdown(record)}\n"
        client.log_text(run_id, text, "model_card/README.md")


def run(params: Params, paths: Paths) -> Result:
    """Record the execution, register the adapter and decide its alias; write reports/mlflow_run.json."""
    for needed in (paths.adapter / "adapter_config.json", paths.eval_metrics, paths.data_metrics, paths.predictions):
        if not needed.is_file():
            raise StageError(f"{needed}: missing; run the stages before record_run (`dvc repro`)")
    trial = sweep_trial(params)
    if trial:
        return record_trial(params, paths, *trial)
    started_by, extra_tags = how_started()
    previous_champion = champion_metrics(paths, params)  # before this run can move the alias
    name = extra_tags.get("dvc.exp_name") or run_name(started_by, committed_lock(paths.root), params_by_key(params))
    run_id = record_pipeline_run(paths, params, started_by, run_id=os.environ.get("MLFLOW_RUN_ID"), run_name=name)
    client = client_for(paths, params)
    for key, value in extra_tags.items():
        client.set_tag(run_id, key, value)
    shape = read_json(paths.eval_metrics).get("shape", PRICE)
    rows = read_jsonl(paths.predictions)
    model = log_model(client, run_id, params, paths)
    decision = register_adapter(
        client, params.tracking, run_id, paths.adapter, shape, rows, workspace_test_set(paths),
        rescorer(params, paths, client), model,
    )  # fmt: skip
    record = {
        "run_id": run_id,
        "tracking_uri": shown_uri(tracking_uri(paths, params)),
        "registered_model": params.tracking.registered_model,
        "started_by": started_by,
        **extra_tags,
        **decision,
        "previous_champion": previous_champion,
    }
    if decision["new_version"]:
        history.publish(client, params.tracking, run_id)
    log_card_with_decision(client, run_id, paths, record)
    write_json(paths.run_record, record)
    verdict = "promoted to champion" if decision["promoted"] else f"alias {decision['alias'] or 'unchanged'}"
    print(f"MLflow run {run_id}; {params.tracking.registered_model} v{decision['version']}: {verdict}")
    print(f"  why: {decision['reason']}")
    return Result(run_id, decision["version"], decision["alias"], decision["reason"])


def main(argv: list[str] | None = None) -> int:
    return run_stage(SPEC, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
