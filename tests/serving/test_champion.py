"""The champion server (serving/champion.py) as a real process on loopback, in front of real `mlflow models serve`
processes: it follows an alias while requests run, keeps the old version when a new one cannot load, and
refuses bad requests with a 4xx that names the field, then goes on answering."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import psutil
import pytest

from infra.servers import free_port, wait_until_healthy
from tests.serving.conftest import MODEL, first_batch

ALIAS = "following"  # not the champion, which the other tests of this session read


def post(url: str, body: bytes, content_type: str = "application/json") -> tuple[int, dict | str]:
    """(HTTP status, the decoded answer) of POST `body` to `url`."""
    request = urllib.request.Request(url, data=body, headers={"Content-Type": content_type})
    try:
        with urllib.request.urlopen(request, timeout=120) as answer:
            status, text = answer.status, answer.read().decode()
    except urllib.error.HTTPError as exc:
        status, text = exc.code, exc.read().decode()
    try:
        return status, json.loads(text)
    except ValueError:
        return status, text


def records(texts: list) -> bytes:
    return json.dumps({"dataframe_records": [{"text": t} for t in texts]}).encode()


def version_of(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/version", timeout=10) as answer:
        return json.load(answer)


def wait_for(condition, timeout: float = 240, what: str = "the server"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := condition():
            return result
        time.sleep(0.5)
    pytest.fail(f"{what} did not get there within {timeout:.0f} s")


def register(client, record, params, paths, items, scratch, *, scale_lora_b=1.0, base_path=None) -> str:
    """A new registered version of the logged model: the adapter's LoRA B weights scaled (so it answers
    differently), or its base pointed at `base_path` (a folder that is not there: it cannot load)."""
    from safetensors.torch import load_file, save_file

    from serving.pricer import MODEL_NAME, model_config, save_model
    from tests.conftest import copy_outputs

    copy = copy_outputs(paths, scratch)
    weights_file = copy.adapter / "adapter_model.safetensors"
    weights = load_file(weights_file)
    save_file({n: w * scale_lora_b if "lora_B" in n else w for n, w in weights.items()}, weights_file)
    config = model_config(params, copy)
    if base_path is not None:
        config["base"]["path"] = str(base_path)
    experiment = client.get_run(record["run_id"]).info.experiment_id
    logged = client.create_logged_model(experiment, name=MODEL_NAME, source_run_id=record["run_id"])
    save_model(scratch / "model", config, copy.adapter, items)
    client.log_model_artifacts(logged.model_id, str(scratch / "model"))
    client.finalize_logged_model(logged.model_id, "READY")
    version = client.create_model_version(MODEL, logged.artifact_location, run_id=record["run_id"]).version
    return str(version)


@pytest.fixture(scope="module")
def server(registered, tmp_path_factory):
    """`python -m serving.champion` following ALIAS (set to the recorded version), reading it every second:
    (its URL, registered, the registry client)."""
    from mlflow import MlflowClient

    paths, _, uri, record = registered
    client = MlflowClient(tracking_uri=uri)
    client.set_registered_model_alias(MODEL, ALIAS, record["version"])
    port = free_port()
    log = tmp_path_factory.mktemp("champion-server") / "server.log"
    command = [sys.executable, "-m", "serving.champion", "--project-dir", str(paths.root), "--alias", ALIAS,
               "--port", str(port), "--poll-seconds", "1"]  # fmt: skip
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    process = subprocess.Popen(command, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy("the champion server", f"{url}/ping", process, timeout=240)
        yield url, registered, client
    finally:
        servers = psutil.Process(process.pid).children(recursive=True)
        process.terminate()
        process.wait(timeout=60)
        print(log.read_text()[-3000:])
    _, left = psutil.wait_procs(servers, timeout=30)
    assert process.returncode == 0 and not left, f"SIGTERM left the versions' servers running: {left}"


def test_a_promotion_while_requests_run_drops_none_and_switches_the_answers(server, tmp_path):
    import mlflow
    import pandas as pd

    url, (paths, params, uri, record), client = server
    items, _ = first_batch(paths, params)
    texts = [item["text"] for item in items[:4]]
    old = version_of(url)["version"]
    status, answer = post(f"{url}/invocations", records(texts))
    assert status == 200
    old_answers = [p["completion"] for p in answer["predictions"]]

    answers: list[tuple[int, list]] = []
    stop = threading.Event()

    def keep_asking():
        while not stop.is_set():
            status, answer = post(f"{url}/invocations", records(texts))
            answers.append((status, [p["completion"] for p in answer["predictions"]] if status == 200 else answer))

    asking = threading.Thread(target=keep_asking)
    asking.start()
    try:
        new = register(client, record, params, paths, items, tmp_path, scale_lora_b=40.0)
        client.set_registered_model_alias(MODEL, ALIAS, new)  # found by the server's poll, not told
        wait_for(lambda: version_of(url)["version"] == new, what=f"version {new}")
        count = len(answers)
        wait_for(lambda: len(answers) >= count + 3, what="three more answers")
    finally:
        stop.set()
        asking.join(timeout=120)

    os.environ["MLFLOW_TRACKING_URI"] = uri
    try:
        expected = list(
            mlflow.pyfunc.load_model(f"models:/{MODEL}/{new}").predict(pd.DataFrame({"text": texts}))["completion"]
        )
    finally:
        del os.environ["MLFLOW_TRACKING_URI"]
    assert expected != old_answers, "the new version must answer differently"
    assert all(status == 200 for status, _ in answers), [a for a in answers if a[0] != 200]
    switched = [completions == expected for _, completions in answers]
    assert all(completions in (old_answers, expected) for _, completions in answers)
    assert switched[-1] and switched == sorted(switched), "answers switch once, from the old to the new"
    state = version_of(url)
    assert state["version"] == new != old and state["model_uri"] == f"models:/{MODEL}/{new}"


def test_a_version_that_cannot_load_leaves_the_old_one_serving(server, tmp_path):
    url, (paths, params, _, record), client = server
    items, _ = first_batch(paths, params)
    serving = version_of(url)["version"]
    broken = register(client, record, params, paths, items, tmp_path, base_path=tmp_path / "no-such-base")
    client.set_registered_model_alias(MODEL, ALIAS, broken)
    status, _ = post(f"{url}/refresh", b"")  # what the retrain flow does after a promotion
    assert status == 202
    failure = wait_for(lambda: version_of(url)["last_failure"], what="the failure")
    assert failure["version"] == broken and "exited" in failure["reason"]
    assert "no-such-base" in failure["reason"] and "StageError" in failure["reason"]
    assert version_of(url)["version"] == serving
    status, answer = post(f"{url}/invocations", records([items[0]["text"]]))
    assert status == 200 and len(answer["predictions"]) == 1


LONG = "a" * 200_000
BAD_REQUESTS = [
    ("no input column", json.dumps({"dataframe_records": [{"txt": "a ring"}]}), "text"),
    ("null", json.dumps({"dataframe_records": [{"text": None}]}), "expected text, got null"),
    ("a list", json.dumps({"dataframe_records": [{"text": ["a", "b"]}]}), "expected text, got a list"),
    ("a number", json.dumps({"dataframe_records": [{"text": "ok"}, {"text": 5}]}), "row 1, field 'text'"),
    ("invalid JSON", '{"dataframe_records": [', "valid JSON"),
    ("an unknown format", json.dumps({"rows": [{"text": "a"}]}), "dataframe_records"),
    ("far too long", json.dumps({"dataframe_records": [{"text": LONG}]}), "200,000 characters"),
]


@pytest.mark.parametrize(("what", "body", "named"), BAD_REQUESTS, ids=[b[0] for b in BAD_REQUESTS])
def test_a_bad_request_gets_a_4xx_naming_the_field_and_the_server_goes_on(server, what, body, named):
    url, (paths, params, _, _), _ = server
    status, answer = post(f"{url}/invocations", body.encode())
    assert 400 <= status < 500, (status, answer)
    assert named in answer["message"] and "Traceback" not in answer["message"]
    items, _ = first_batch(paths, params)
    assert post(f"{url}/invocations", records([items[0]["text"]]))[0] == 200


def test_non_utf8_bytes_an_unknown_content_type_and_an_empty_list(server):
    url = server[0]
    status, answer = post(f"{url}/invocations", b'{"dataframe_records": [{"text": "\xff\xfe"}]}')
    assert status == 400 and "UnicodeDecodeError" in answer["message"]
    status, answer = post(f"{url}/invocations", b"a ring", content_type="text/plain")
    assert status == 415 and "application/json" in answer
    assert post(f"{url}/invocations", records([])) == (200, {"predictions": []})


def test_the_flows_tell_a_running_server_and_pass_over_a_missing_one(server):
    from serving.champion import tell_servers
    from stages.common.config import ServeConfig

    port = int(server[0].rsplit(":", 1)[1])
    assert tell_servers(ServeConfig(port=port)).startswith(f"told the champion server at http://127.0.0.1:{port}")
    assert tell_servers(ServeConfig(port=free_port())).startswith("no champion server answered")
