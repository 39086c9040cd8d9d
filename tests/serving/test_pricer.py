"""The adapter as an MLflow Model: record_run logs it, the registry points at it, `mlflow.pyfunc.load_model`
and a real `mlflow models serve` process answer the completions and prices evaluate_adapter scored."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from infra.servers import free_port
from tests.serving.conftest import MODEL, first_batch


def test_the_champion_loads_as_a_pyfunc_and_prices_as_evaluation_did(registered, monkeypatch):
    import mlflow

    paths, params, uri, record = registered
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}/{record['version']}")
    items, evaluated = first_batch(paths, params)
    import pandas as pd

    answers = model.predict(pd.DataFrame({"text": [item["text"] for item in items]}))
    assert list(answers["completion"]) == [row["adapter_output"] for row in evaluated]
    assert [None if p != p else p for p in answers["price"]] == [row["adapter_prediction"] for row in evaluated]


def test_the_logged_model_has_a_signature_an_example_and_its_settings(registered, monkeypatch, tmp_path):
    import mlflow

    paths, params, uri, record = registered
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    info = mlflow.models.get_model_info(f"models:/{MODEL}/{record['version']}")
    assert info.signature.inputs.input_names() == ["text"]
    assert info.signature.outputs.input_names() == ["completion", "price"]
    folder = mlflow.artifacts.download_artifacts(f"models:/{MODEL}/{record['version']}", dst_path=str(tmp_path))
    config = json.loads(Path(folder, "artifacts", "config.json").read_text())
    assert config["prompt"]["template"] == params.prompt.template and config["shape"] == "price"
    assert config["base"]["kind"] == "local" and config["generation"]["max_new_tokens"] == 6
    adapter = Path(folder, "artifacts", "adapter", "adapter_model.safetensors").read_bytes()
    assert adapter == (paths.adapter / "adapter_model.safetensors").read_bytes()
    example = json.loads(Path(folder, "input_example.json").read_text())
    assert example["columns"] == ["text"] and len(example["data"]) == 2


def test_the_registry_version_points_at_the_model(registered):
    from mlflow import MlflowClient

    _, _, uri, record = registered
    client = MlflowClient(tracking_uri=uri)
    version = client.get_model_version(MODEL, record["version"])
    model_id = client.get_run(record["run_id"]).data.tags["model.uri"].removeprefix("models:/")
    model = client.get_logged_model(model_id)
    assert version.source == model.artifact_location and model.source_run_id == record["run_id"]


def serve(root: Path, uri: str, alias: str):
    """Start `mlflow models serve` of `models:/<MODEL>@alias` on a loopback port (the make target's command) and
    wait for /ping: (server process, url)."""
    port = free_port()
    # mlflow starts `uvicorn` by name: this interpreter's bin folder first, as `make serve-champion` has it
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    }
    command = [
        sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{MODEL}@{alias}",
        "--env-manager", "local", "--host", "127.0.0.1", "--port", str(port),
    ]  # fmt: skip
    log_path = root / f"serve-{port}.log"
    server = subprocess.Popen(command, cwd=root, env=env, stdout=log_path.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/ping", timeout=5) as answer:
                if answer.status == 200:
                    return server, url
        except OSError:
            time.sleep(1)
        if server.poll() is not None:
            break
    stop(server)
    pytest.fail(f"the server did not start:\n{log_path.read_text()[-3000:]}")


def stop(server) -> None:
    server.terminate()
    server.wait(timeout=60)


def invoke(url: str, texts: list[str]) -> list[dict]:
    """POST the texts to the server's /invocations as MLflow's dataframe_records; its predictions."""
    body = json.dumps({"dataframe_records": [{"text": text} for text in texts]}).encode()
    request = urllib.request.Request(f"{url}/invocations", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as answer:
        return json.load(answer)["predictions"]


@pytest.fixture(scope="module")
def served_champion(registered):
    """The champion served on loopback: (url, registered)."""
    paths, _, uri, record = registered
    server, url = serve(paths.root, uri, record["alias"])
    try:
        yield url, registered
    finally:
        stop(server)


def test_a_served_champion_answers_the_prices_evaluation_scored(served_champion):
    url, (paths, params, _, _) = served_champion
    items, evaluated = first_batch(paths, params)
    predictions = invoke(url, [item["text"] for item in items])
    assert [p["completion"] for p in predictions] == [row["adapter_output"] for row in evaluated]
    assert [p.get("price") for p in predictions] == [row["adapter_prediction"] for row in evaluated]


def test_the_logged_model_pins_its_packages_and_loading_under_others_names_them(registered, tmp_path, monkeypatch):
    """The pins are this environment's versions; a model pinned to another torch and transformers loads with
    MLflow's warning naming each package, the version running and the one required."""
    import logging
    from importlib.metadata import version

    import mlflow

    _, _, uri, record = registered
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    folder = Path(mlflow.artifacts.download_artifacts(f"models:/{MODEL}/{record['version']}", dst_path=str(tmp_path)))
    pins = (folder / "requirements.txt").read_text().splitlines()
    assert f"transformers=={version('transformers')}" in pins
    assert f"torch=={version('torch').split('+')[0]}" in pins
    mismatched = [
        "torch==1.0.0" if p.startswith("torch==") else "transformers==4.0.0" if p.startswith("transformers==") else p
        for p in pins
    ]
    (folder / "requirements.txt").write_text("\n".join(mismatched) + "\n")
    warnings: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda entry: warnings.append(entry.getMessage())
    logger = logging.getLogger("mlflow")
    logger.addHandler(handler)
    try:
        mlflow.pyfunc.load_model(str(folder))
    finally:
        logger.removeHandler(handler)
    said = "\n".join(warnings)
    assert "mismatches between the model's dependencies" in said
    assert f"torch (current: {version('torch')}, required: torch==1.0.0)" in said
    assert f"transformers (current: {version('transformers')}, required: transformers==4.0.0)" in said
