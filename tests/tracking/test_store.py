"""stages/tracking/runs.py and the live stream in stages/training/watch.py against a tracking server that is up
or down (a loopback HTTP server stands in for `mlflow server`)."""

import http.server
import os
import threading

import pytest

from stages.tracking.store import QUICK_HTTP_SETTINGS, TrackingUnreachable, require_server


@pytest.fixture
def health_server():
    """A loopback server whose /health answers 200 and every other path 404; yields its URL."""

    class Health(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200 if self.path == "/health" else 404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Health)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}"
    server.shutdown()


def test_a_running_server_and_a_local_store_pass_the_check(health_server):
    require_server(health_server)
    require_server(f"{health_server}/")
    require_server("sqlite:////nowhere/mlflow.db")  # opened directly: nothing to reach


def test_a_server_that_does_not_answer_stops_with_its_uri_and_no_password():
    with pytest.raises(TrackingUnreachable) as raised:
        require_server("http://ml:s3cret@127.0.0.1:9", attempts=1)  # nothing listens on port 9
    message = str(raised.value)
    assert "http://ml:***@127.0.0.1:9" in message and "s3cret" not in message
    assert "make mlflow-server" in message and "MLFLOW_TRACKING_URI" in message


def test_a_path_that_is_not_an_mlflow_server_is_named(health_server):
    with pytest.raises(TrackingUnreachable, match="HTTP 404 from /health"):
        require_server(f"{health_server}/not-mlflow", attempts=1)


def test_a_live_stream_to_a_server_gives_up_in_seconds_not_minutes(monkeypatch, capsys):
    from stages.training.watch import MlflowStream

    for variable in QUICK_HTTP_SETTINGS:  # unset for this test, restored afterwards
        monkeypatch.setenv(variable, "")
        monkeypatch.delenv(variable)
    stream = MlflowStream("0123456789abcdef", "http://127.0.0.1:9")
    assert {variable: os.environ[variable] for variable in QUICK_HTTP_SETTINGS} == QUICK_HTTP_SETTINGS
    stream.metrics(1, {"val_loss": 1.0})
    stream.metrics(2, {"val_loss": 0.9})  # after the first failure, no further attempt
    printed = capsys.readouterr().out
    assert printed.count("warning: MLflow logging") == 1 and "training goes on" in printed


def test_a_live_stream_keeps_the_retry_settings_a_user_chose(monkeypatch):
    from stages.training.watch import MlflowStream

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "5")
    MlflowStream("0123456789abcdef", "http://127.0.0.1:9")
    assert os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] == "5"
