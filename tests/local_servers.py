"""Servers on loopback for tests and benchmarks, each started as a child process and always stopped:
a Prefect server (the flow tests, the pipeline-overhead benchmark, the worker test) and an MLflow tracking
server with a SQLite store (the tracking-server test). For daily use run them yourself: `make prefect-server`
and `make mlflow-server` (see the README, "Scaling").

    with prefect_server(Path("/tmp/prefect-home"), dict(os.environ)) as api_url:
        ...  # PREFECT_API_URL=api_url for the processes started here
    with mlflow_server(Path("/tmp/mlflow"), dict(os.environ)) as tracking_uri:
        ...  # MLFLOW_TRACKING_URI=tracking_uri
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_until_healthy(name: str, url: str, process: subprocess.Popen, timeout: float) -> None:
    """Return once GET `url` answers 200; raise when `process` exits first or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with {process.returncode} before answering {url}")
        with contextlib.suppress(OSError), urllib.request.urlopen(url, timeout=2) as response:
            if response.status == 200:
                return
        time.sleep(0.5)
    raise RuntimeError(f"{name} did not answer {url} within {timeout:.0f} s")


@contextlib.contextmanager
def background_process(command: list[str], env: dict[str, str], log_path: Path, stop_grace: float = 30):
    """Run `command` in its own process group with output to `log_path`; yield the Popen. Afterwards, even
    when the body raised, send SIGTERM to the group, then SIGKILL after `stop_grace` seconds."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as log:
        process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            yield process
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=stop_grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(process.pid, signal.SIGKILL)
                process.wait()


@contextlib.contextmanager
def loopback_server(name: str, command: list[str], health_url: str, env: dict[str, str], log_path: Path, timeout):
    """`background_process(command)`, entered once `health_url` answers; the log's tail is in the error."""
    with background_process(command, env, log_path) as process:
        try:
            wait_until_healthy(name, health_url, process, timeout)
        except RuntimeError as exc:
            tail = log_path.read_text(errors="replace")[-3000:] if log_path.is_file() else ""
            raise RuntimeError(f"{exc}; its log ({log_path}) ends:\n{tail}") from None
        yield process


@contextlib.contextmanager
def prefect_server(home: Path, env: dict[str, str], timeout: float = 180):
    """Yield the API URL of a Prefect server started with PREFECT_HOME=`home`; stop it afterwards."""
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    server_env = {**env, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    server_env.pop("PREFECT_API_URL", None)
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    with loopback_server("prefect server", command, f"{url}/health", server_env, home / "server.log", timeout):
        yield url


def mlflow_server_command(backend_store_uri: str, artifacts_destination: str, port: int) -> list[str]:
    """`mlflow server` on 127.0.0.1:`port` with one worker process, serving (proxying) artifacts: clients
    upload and download them through the server, so they need no access to `artifacts_destination`."""
    return [
        *(str(Path(sys.executable).parent / "mlflow"), "server"),
        *("--backend-store-uri", backend_store_uri),
        *("--artifacts-destination", artifacts_destination),
        *("--host", "127.0.0.1", "--port", str(port), "--workers", "1"),
    ]


@contextlib.contextmanager
def mlflow_server(folder: Path, env: dict[str, str], timeout: float = 120):
    """Yield the tracking URI (http://127.0.0.1:<port>) of an MLflow server whose runs and registry are in
    `folder`/mlflow.db and whose artifacts are under `folder`/artifacts; stop it afterwards."""
    folder.mkdir(parents=True, exist_ok=True)
    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    command = mlflow_server_command(f"sqlite:///{folder / 'mlflow.db'}", str(folder / "artifacts"), port)
    server_env = {key: value for key, value in env.items() if not key.startswith("MLFLOW_")}
    # The job runner (GenAI judges and scorers, unused here) adds worker processes; leave it off.
    server_env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    with loopback_server("mlflow server", command, f"{uri}/health", server_env, folder / "server.log", timeout):
        yield uri
