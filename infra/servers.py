"""Servers on loopback, each started as a child process and always stopped: PostgreSQL in a folder, an MLflow
tracking server (on PostgreSQL or SQLite, artifacts proxied through it) and a Prefect server (on PostgreSQL or
its default SQLite). The tests and benchmarks start them for themselves; people start all three with
`make servers` (`python -m infra.servers`), which prints the variables to export (docs/operations.md).

    with postgres_server(Path(".servers/postgres")) as postgres:
        with mlflow_server(Path(".servers/mlflow"), env, postgres.url("mlflow")) as tracking_uri:
            ...  # MLFLOW_TRACKING_URI=tracking_uri
        with prefect_server(Path(".servers/prefect"), env, postgres.url("prefect", "postgresql+asyncpg")) as api:
            ...  # PREFECT_API_URL=api
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import NamedTuple


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
def background_process(command: list[str], env: dict[str, str], log_path: Path, stop_grace: float = 30, **popen):
    """Run `command` in its own process group with output to `log_path`; yield the Popen. Afterwards, even
    when the body raised, send SIGTERM to the group, then SIGKILL after `stop_grace` seconds. `popen`: more
    arguments for Popen (user=, group=)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("w") as log:
        process = subprocess.Popen(
            command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, **popen
        )
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


def log_tail(log_path: Path, characters: int = 3000) -> str:
    return log_path.read_text(errors="replace")[-characters:] if log_path.is_file() else ""


@contextlib.contextmanager
def loopback_server(name: str, command: list[str], health_url: str, env: dict[str, str], log_path: Path, timeout):
    """`background_process(command)`, entered once `health_url` answers; the log's tail is in the error."""
    with background_process(command, env, log_path) as process:
        try:
            wait_until_healthy(name, health_url, process, timeout)
        except RuntimeError as exc:
            raise RuntimeError(f"{exc}; its log ({log_path}) ends:\n{log_tail(log_path)}") from None
        yield process


POSTGRES_USER = "qlora"  # the superuser initdb creates; trust authentication, so loopback only


def postgres_binaries() -> Path | None:
    """The folder holding initdb and postgres: on PATH, or Debian's /usr/lib/postgresql/<version>/bin."""
    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parts[-3]))
    return versions[-1].parent if versions else None


class Postgres(NamedTuple):
    """A running PostgreSQL server on 127.0.0.1:`port`."""

    port: int

    def url(self, database: str, scheme: str = "postgresql") -> str:
        """The SQLAlchemy URL of `database` (postgresql for MLflow, postgresql+asyncpg for Prefect)."""
        return f"{scheme}://{POSTGRES_USER}@127.0.0.1:{self.port}/{database}"

    def create_database(self, name: str) -> None:
        """CREATE DATABASE `name` unless it exists."""
        import psycopg

        with psycopg.connect(self.url("postgres"), autocommit=True) as connection:
            if connection.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
                connection.execute(f'CREATE DATABASE "{name}"')


def as_postgres_user(folder: Path) -> dict:
    """Popen arguments that run PostgreSQL's programs as the `postgres` user when this process is root (they
    refuse to run as root), after handing it `folder`; none otherwise."""
    if os.geteuid() != 0:
        return {}
    import pwd

    try:
        owner = pwd.getpwnam("postgres")
    except KeyError:
        raise RuntimeError("PostgreSQL refuses to run as root, and there is no `postgres` user to run it as") from None
    closed = [str(p) for p in folder.resolve().parents if not p.stat().st_mode & stat.S_IXOTH]
    if closed:
        raise RuntimeError(
            f"PostgreSQL runs as the `postgres` user here (this process is root), which cannot enter {closed[0]}; "
            "put its folder under one it can reach, such as /tmp or /var/lib/postgresql"
        )
    os.chown(folder, owner.pw_uid, owner.pw_gid)
    return {"user": owner.pw_uid, "group": owner.pw_gid, "extra_groups": []}


def wait_for_postgres(postgres: Postgres, process: subprocess.Popen, log_path: Path, timeout: float) -> None:
    import psycopg

    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(
                f"postgres exited with {process.returncode}; its log ({log_path}) ends:\n{log_tail(log_path)}"
            )
        try:
            psycopg.connect(postgres.url("postgres"), connect_timeout=2).close()
            return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"postgres did not accept connections within {timeout:.0f} s") from None
            time.sleep(0.3)


@contextlib.contextmanager
def postgres_server(folder: Path, port: int | None = None, timeout: float = 60):
    """Yield a `Postgres` listening on 127.0.0.1 only, its cluster in `folder`/data (made by initdb the first
    time, kept afterwards), its socket and log in `folder`; stop it afterwards (a fast shutdown). As root,
    PostgreSQL runs as the `postgres` user, so `folder` and the folders above it must be open to it."""
    binaries = postgres_binaries()
    if binaries is None:
        raise RuntimeError(
            "PostgreSQL is not installed (no initdb on PATH or under /usr/lib/postgresql); "
            "install it with `apt-get install postgresql` (Debian, Ubuntu) or `brew install postgresql`"
        )
    folder.mkdir(parents=True, exist_ok=True)
    as_user = as_postgres_user(folder)
    data = folder / "data"
    if not (data / "PG_VERSION").is_file():
        initdb = [str(binaries / "initdb"), "-D", str(data), "-U", POSTGRES_USER, "--auth=trust", "-E", "UTF8"]
        done = subprocess.run([*initdb, "--no-locale"], capture_output=True, text=True, check=False, **as_user)
        if done.returncode != 0:
            raise RuntimeError(f"initdb failed for {data}: {(done.stderr or done.stdout).strip()[-2000:]}")
    postgres = Postgres(port or free_port())
    settings = {"listen_addresses": "127.0.0.1", "port": postgres.port, "unix_socket_directories": folder,
                "max_connections": 200}  # fmt: skip
    command = [str(binaries / "postgres"), "-D", str(data)]
    command += [item for key, value in settings.items() for item in ("-c", f"{key}={value}")]
    log_path = folder / "postgres.log"
    # SIGTERM is a smart shutdown, which waits for every client; the servers on it are stopped first anyway.
    with background_process(
        command, {"PATH": os.environ.get("PATH", ""), "LC_ALL": "C"}, log_path, **as_user
    ) as process:
        wait_for_postgres(postgres, process, log_path, timeout)
        yield postgres


@contextlib.contextmanager
def prefect_server(home: Path, env: dict[str, str], database_url: str | None = None, port: int | None = None,
                   timeout: float = 180):  # fmt: skip
    """Yield the API URL of a Prefect server on 127.0.0.1:`port` (none: a free one) started with
    PREFECT_HOME=`home`, its database `database_url` (postgresql+asyncpg://...; none: SQLite in `home`); stop it
    afterwards."""
    port = port or free_port()
    url = f"http://127.0.0.1:{port}/api"
    server_env = {**env, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    server_env.pop("PREFECT_API_URL", None)
    if database_url:
        server_env["PREFECT_API_DATABASE_CONNECTION_URL"] = database_url
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    with loopback_server("prefect server", command, f"{url}/health", server_env, home / "server.log", timeout):
        yield url


# The tracking server's connections to its store. MLflow's default (SQLAlchemy's 5 + 10 overflow) is below the
# threads its one server process answers with (40, anyio's default), and some requests hold two connections at
# once: with a few dozen clients writing together (bench/store_load.py) every connection was taken by a request
# waiting for a second one, and requests failed after the pool's 30 s timeout. More connections than threads.
STORE_POOL = {"MLFLOW_SQLALCHEMYSTORE_POOL_SIZE": "20", "MLFLOW_SQLALCHEMYSTORE_MAX_OVERFLOW": "40"}


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
def mlflow_server(folder: Path, env: dict[str, str], backend_store_uri: str | None = None, port: int | None = None,
                  timeout: float = 120):  # fmt: skip
    """Yield the tracking URI (http://127.0.0.1:`port`, none: a free port) of an MLflow server whose runs and
    registry are in `backend_store_uri` (postgresql://...; none: `folder`/mlflow.db) and whose artifacts are
    under `folder`/artifacts; stop it afterwards."""
    folder.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    uri = f"http://127.0.0.1:{port}"
    store = backend_store_uri or f"sqlite:///{folder / 'mlflow.db'}"
    command = mlflow_server_command(store, str(folder / "artifacts"), port)
    server_env = {key: value for key, value in env.items() if not key.startswith("MLFLOW_")}
    # The job runner (GenAI judges and scorers, unused here) adds worker processes; leave it off.
    server_env["MLFLOW_SERVER_ENABLE_JOB_EXECUTION"] = "false"
    server_env.update(STORE_POOL)
    with loopback_server("mlflow server", command, f"{uri}/health", server_env, folder / "server.log", timeout):
        yield uri


class SharedServers(NamedTuple):
    """What `shared_servers` yields: the URIs a process needs (MLFLOW_TRACKING_URI, PREFECT_API_URL)."""

    postgres: Postgres
    tracking_uri: str
    prefect_api: str
    mlflow_artifacts: Path  # where the MLflow server keeps the artifacts uploaded through it

    def environment(self) -> dict[str, str]:
        return {"MLFLOW_TRACKING_URI": self.tracking_uri, "PREFECT_API_URL": self.prefect_api}


@contextlib.contextmanager
def shared_servers(folder: Path, env: dict[str, str], postgres_folder: Path | None = None, ports: tuple = (None,) * 3):
    """PostgreSQL in `postgres_folder` (none: `folder`/postgres) holding the databases `mlflow` and `prefect`,
    an MLflow tracking server on the first (artifacts in `folder`/mlflow/artifacts) and a Prefect server on the
    second, the two started side by side; all stopped afterwards, PostgreSQL last. `ports`: PostgreSQL's,
    MLflow's and Prefect's (None: a free one)."""
    postgres_port, mlflow_port, prefect_port = ports
    from concurrent.futures import ThreadPoolExecutor

    with (
        postgres_server(postgres_folder or folder / "postgres", postgres_port) as postgres,
        contextlib.ExitStack() as stack,
    ):
        for name in ("mlflow", "prefect"):
            postgres.create_database(name)
        with ThreadPoolExecutor(2) as pool:  # a thread enters each server; the stack stops both
            mlflow = mlflow_server(folder / "mlflow", env, postgres.url("mlflow"), mlflow_port)
            prefect = prefect_server(
                folder / "prefect", env, postgres.url("prefect", "postgresql+asyncpg"), prefect_port
            )
            mlflow, prefect = pool.submit(stack.enter_context, mlflow), pool.submit(stack.enter_context, prefect)
        yield SharedServers(postgres, mlflow.result(), prefect.result(), folder / "mlflow" / "artifacts")


def main(argv: list[str] | None = None) -> int:
    """`python -m infra.servers [--folder .servers]`: PostgreSQL, MLflow and Prefect on loopback until Ctrl-C."""
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m infra.servers",
        description="PostgreSQL on loopback with an MLflow tracking server and a Prefect server on it, until "
        "Ctrl-C; prints the variables that point the pipeline at them.",
    )
    parser.add_argument("--folder", default=".servers", help="where the database, artifacts and logs live (kept)")
    parser.add_argument("--postgres-port", type=int, default=5432, help="PostgreSQL's port on 127.0.0.1")
    parser.add_argument("--mlflow-port", type=int, default=5000, help="the MLflow tracking server's port")
    parser.add_argument("--prefect-port", type=int, default=4200, help="the Prefect server's port")
    args = parser.parse_args(argv)
    folder = Path(args.folder).resolve()
    ports = (args.postgres_port, args.mlflow_port, args.prefect_port)
    try:
        with shared_servers(folder, dict(os.environ), ports=ports) as servers:
            print(f"PostgreSQL on 127.0.0.1:{servers.postgres.port} (databases mlflow, prefect), data in {folder}")
            for key, value in servers.environment().items():
                print(f"export {key}={value}")
            print("Ctrl-C stops the three servers.", flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                signal.pause()
    except RuntimeError as exc:
        print(f"servers not started: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
