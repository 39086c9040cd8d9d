"""Serve whatever holds the registry's champion alias, and follow the alias when it moves, dropping no request.

    python -m serving.champion [--port N] [--alias NAME | --version N]      (make serve-champion)

One port (params `serve`), in front of MLflow's own scoring server: one `mlflow models serve` process per
registered version, on a free loopback port.
- `POST /invocations` is answered by the version serving now, exactly as MLflow's server answers it (its
  4xx for a bad request included); an empty list of inputs is answered with an empty list.
- `GET /version`: the version serving, since when, the alias followed, the last check and the last failure.
- `POST /refresh`: read the alias now (the retrain and sweep flows call it after a promotion,
  `tell_servers`); besides, the alias is read every `serve.poll_seconds`.
- `GET /ping`, `GET /health`: 200 once a version serves, 503 before.

When the alias names another version, that version's process starts beside the serving one and must answer
its model's input example within `serve.start_timeout_seconds`; then new requests go to it, the old process
answers the requests it holds and stops. A version that does not start or answer leaves the old one serving:
the log and `/version` say why, with the exceptions in its process's log, and it is tried again only when the alias
moves or on `POST /refresh`. During a switch both models are in memory.

Why this and not MLServer (which can load and unload models at run time): its MLflow runtime declares MLflow 3
support only in a release candidate, and MLflow's own server already answers our models with their signature
checks; what it lacks is following an alias (docs/decisions.md).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from stages.common.config import ServeConfig, load_params
from stages.common.paths import Paths

EMPTY_INPUTS = ("dataframe_records", "inputs", "instances")  # request fields whose empty list means no rows


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception): .+")


def log_lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8", errors="replace").splitlines() if path.is_file() else []


def errors_in(lines: list[str]) -> str:
    """The exception lines of a server's log, in order ("StageError: the model's base ... is not here"): the
    cause a model's load raised comes before the scoring server's own wrapper of it."""
    found = [line.strip() for line in lines if EXCEPTION_LINE.match(line.strip())]
    return "; ".join(dict.fromkeys(found))


@dataclass
class Backend:
    """One `mlflow models serve` process of one registered version, and the requests it is answering."""

    version: str
    url: str
    process: subprocess.Popen
    log: Path
    in_flight: int = 0
    since: str = field(default_factory=now)

    def stop(self, grace: float = 30.0) -> None:
        """Stop the process and the server processes it started (`mlflow models serve` runs uvicorn as a child,
        which outlives it when only the parent is stopped)."""
        import psutil

        try:
            parent = psutil.Process(self.process.pid)
            processes = [*parent.children(recursive=True), parent]
        except psutil.NoSuchProcess:
            return
        for process in processes:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.terminate()
        _, alive = psutil.wait_procs(processes, timeout=grace)
        for process in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.kill()
        self.process.wait()


def start_backend(model_uri: str, version: str, logs: Path) -> Backend:
    """`mlflow models serve` of `model_uri` on a free loopback port, its output in a log file under `logs`."""
    port = free_port()
    log = logs / f"version-{version}-{port}.log"
    bin_dir = str(Path(sys.executable).parent)  # MLflow starts its server with the `uvicorn` beside python
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
               "--host", "127.0.0.1", "--port", str(port)]  # fmt: skip
    with log.open("w") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    return Backend(version, f"http://127.0.0.1:{port}", process, log)


def warm_up_request(model_uri: str) -> bytes:
    """The body of one /invocations request the model must answer before it takes traffic: its logged input
    example (a two-item dataframe), or, for a model logged without one, one row of its input column."""
    import mlflow

    info = mlflow.models.get_model_info(model_uri)
    with tempfile.TemporaryDirectory(prefix="warm-up-") as scratch:
        try:
            path = mlflow.artifacts.download_artifacts(f"{model_uri}/input_example.json", dst_path=scratch)
            return json.dumps({"dataframe_split": json.loads(Path(path).read_text())}).encode()
        except Exception:  # no example logged: one row of text stands in for it
            column = info.signature.inputs.input_names()[0]
            return json.dumps({"dataframe_records": [{column: "warm-up"}]}).encode()


def wait_until_answering(backend: Backend, body: bytes, timeout: float) -> None:
    """Return once `backend` answers /ping and the warm-up request; RuntimeError saying why it did not."""
    deadline = time.monotonic() + timeout
    while True:
        if backend.process.poll() is not None:
            raise RuntimeError(f"its server exited with code {backend.process.returncode}")
        try:
            with urllib.request.urlopen(f"{backend.url}/ping", timeout=5):
                break
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"its server did not answer /ping within {timeout:.0f} s") from None
            time.sleep(0.5)
    request = urllib.request.Request(
        f"{backend.url}/invocations", data=body, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=max(deadline - time.monotonic(), 5)) as answer:
            json.load(answer)
    except urllib.error.HTTPError as exc:
        raise RuntimeError(f"it answered its input example with HTTP {exc.code}: {exc.read()[:500]!r}") from None
    except OSError as exc:
        raise RuntimeError(f"it did not answer its input example ({exc})") from None


class Switchboard:
    """Which backend answers requests, and the switch from one registered version to another.

    `follow(version)` is the only way a backend starts or stops; it runs in one thread at a time (the refresh
    thread), while request handlers take `route()` and `done()` from the server's event loop.
    """

    def __init__(self, model: str, alias: str | None, pinned: str | None, cfg: ServeConfig, logs: Path):
        self.model, self.alias, self.pinned, self.cfg, self.logs = model, alias, pinned, cfg, logs
        self.current: Backend | None = None
        self.starting: Backend | None = None  # a version loading beside the serving one
        self.lock = threading.Lock()
        self.checked_at: str | None = None
        self.failure: dict | None = None  # the last version that did not start, and why
        self.refresh_asked = threading.Event()
        self.stopping = threading.Event()

    def route(self) -> Backend | None:
        """The backend a new request goes to, counted as in flight there until `done`."""
        with self.lock:
            if self.current is not None:
                self.current.in_flight += 1
            return self.current

    def done(self, backend: Backend) -> None:
        with self.lock:
            backend.in_flight -= 1

    def state(self) -> dict:
        """What GET /version answers."""
        current = self.current
        return {
            "model": self.model,
            "alias": self.alias,
            "version": current.version if current else None,
            "model_uri": f"models:/{self.model}/{current.version}" if current else None,
            "serving_since": current.since if current else None,
            "checked_at": self.checked_at,
            "last_failure": self.failure,
        }

    def wanted_version(self) -> str | None:
        """The version the alias names now (the pinned one when there is one); None when no version holds it."""
        if self.pinned:
            return self.pinned
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        try:
            return str(MlflowClient().get_model_version_by_alias(self.model, self.alias).version)
        except MlflowException as exc:
            if exc.error_code == "RESOURCE_DOES_NOT_EXIST" or "not found" in str(exc).lower():
                return None
            raise

    def check(self, forced: bool = False) -> None:
        """Read the alias and follow it; a version that failed before is retried only when `forced`."""
        try:
            version = self.wanted_version()
        except Exception as exc:  # the registry is down: keep serving, say so, try again later
            print(f"[serve] could not read {self.model}@{self.alias} from the registry: {exc}", flush=True)
            return
        self.checked_at = now()
        if version is None:
            if self.current is None:
                print(f"[serve] no version of {self.model} holds @{self.alias} yet; waiting", flush=True)
            return
        serving = self.current.version if self.current else None
        failed_before = self.failure is not None and self.failure["version"] == version
        if version != serving and (forced or not failed_before):
            self.follow(version)

    def follow(self, version: str) -> None:
        """Start `version` beside the serving one; switch to it once it answers, then stop the old one."""
        uri = f"models:/{self.model}/{version}"
        serving = self.current.version if self.current else None
        print(f"[serve] loading {uri} ({'beside version ' + serving if serving else 'first version'})", flush=True)
        started = time.monotonic()
        backend = self.starting = start_backend(uri, version, self.logs)
        try:
            wait_until_answering(backend, warm_up_request(uri), self.cfg.start_timeout_seconds)
        except Exception as exc:  # whatever stops the new version, the old one keeps serving
            backend.stop()
            lines = log_lines(backend.log)
            errors = errors_in(lines)
            reason = f"{exc}: {errors}" if errors else str(exc)
            self.failure = {"version": version, "at": now(), "reason": reason, "log_tail": "\n".join(lines[-15:])}
            keeps = f"version {serving} keeps serving" if serving else "nothing serves yet"
            print(f"[serve] {uri} did not start: {reason}; {keeps} (its log: {backend.log})", flush=True)
            return
        finally:
            self.starting = None
        with self.lock:
            old, self.current = self.current, backend
        self.failure = None
        print(f"[serve] version {version} serves (ready in {time.monotonic() - started:.0f} s)", flush=True)
        if old is not None:
            self.release(old)

    def release(self, old: Backend) -> None:
        """Stop `old` once the requests it was given are answered."""
        while old.in_flight > 0:
            time.sleep(0.05)
        old.stop()
        print(f"[serve] version {old.version} stopped", flush=True)

    def keep_following(self) -> None:
        """The refresh thread: follow the alias every poll_seconds, or at once when asked."""
        while not self.stopping.is_set():
            forced = self.refresh_asked.is_set()
            self.refresh_asked.clear()
            self.check(forced)
            self.refresh_asked.wait(self.cfg.poll_seconds)

    def shut_down(self) -> None:
        self.stopping.set()
        self.refresh_asked.set()
        for backend in (self.starting, self.current):
            if backend is not None:
                backend.stop()


def empty_request(body: bytes) -> bool:
    """True when the request asks for no rows at all (`{"dataframe_records": []}` and the like)."""
    if len(body) > 200:  # an empty request is short; a long body is never parsed twice
        return False
    try:
        payload = json.loads(body)
    except ValueError:
        return False
    if not isinstance(payload, dict) or len(payload) != 1:
        return False
    key, value = next(iter(payload.items()))
    if key == "dataframe_split":
        return isinstance(value, dict) and value.get("data") == []
    return key in EMPTY_INPUTS and value == []


def application(board: Switchboard):
    """The Starlette app of the one port: /invocations, /version, /refresh, /ping, /health."""
    import httpx
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    client = httpx.AsyncClient(timeout=None)

    def unavailable() -> JSONResponse:
        detail = f"; the last version tried did not start: {board.failure['reason']}" if board.failure else ""
        message = f"no version of {board.model} is serving yet (alias @{board.alias}){detail}"
        return JSONResponse({"error_code": "UNAVAILABLE", "message": message}, status_code=503)

    async def invocations(request):
        body = await request.body()
        if empty_request(body):
            return JSONResponse({"predictions": []})
        backend = board.route()
        if backend is None:
            return unavailable()
        try:
            headers = {"Content-Type": request.headers.get("content-type", "application/json")}
            answer = await client.post(f"{backend.url}/invocations", content=body, headers=headers)
        finally:
            board.done(backend)
        media = answer.headers.get("content-type")
        return Response(answer.content, status_code=answer.status_code, media_type=media)

    async def version(request):
        return JSONResponse(board.state())

    async def refresh(request):
        board.refresh_asked.set()
        return JSONResponse({**board.state(), "refresh": "asked"}, status_code=202)

    async def ping(request):
        return Response("\n", status_code=200) if board.current is not None else unavailable()

    routes = [
        Route("/invocations", invocations, methods=["POST"]),
        Route("/version", version, methods=["GET"]),
        Route("/refresh", refresh, methods=["POST"]),
        Route("/ping", ping, methods=["GET"]),
        Route("/health", ping, methods=["GET"]),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await client.aclose()

    return Starlette(routes=routes, lifespan=lifespan)


def tell_servers(cfg: ServeConfig) -> str:
    """Ask the champion server of params `serve` (on this machine) to read the alias now; a line for the
    flow's log. A server that is not running is not an error: nothing serves the old champion then."""
    host = "127.0.0.1" if cfg.host in ("0.0.0.0", "::") else cfg.host
    url = f"http://{host}:{cfg.port}/refresh"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=b"", method="POST"), timeout=5) as answer:
            serving = json.load(answer).get("version")
    except OSError:
        return f"no champion server answered at {url}; a running one reads the alias within serve.poll_seconds"
    return f"told the champion server at {url} (serving version {serving}) to follow the alias"


def stop_on_sigterm(signum, frame) -> None:
    raise SystemExit(0)


def command_line(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m serving.champion", description=__doc__.splitlines()[0])
    parser.add_argument("--project-dir", type=Path, default=Path("."), help="the workspace (params.yaml)")
    parser.add_argument("--host", help="where to listen (default: serve.host)")
    parser.add_argument("--port", type=int, help="the port (default: serve.port)")
    which = parser.add_mutually_exclusive_group()
    which.add_argument("--alias", help="the alias to follow (default: serve.alias)")
    which.add_argument("--version", help="serve this registered version and follow nothing")
    parser.add_argument("--model", help="the registered model (default: tracking.registered_model)")
    parser.add_argument("--poll-seconds", type=int, help="how often to read the alias (default: serve.poll_seconds)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import uvicorn

    from stages.tracking.store import tracking_uri

    args = command_line(argv)
    paths = Paths.at(args.project_dir)
    params = load_params(paths.params)
    cfg = params.serve
    if args.poll_seconds:
        cfg = dataclasses.replace(cfg, poll_seconds=args.poll_seconds)
    os.environ.setdefault("MLFLOW_TRACKING_URI", tracking_uri(paths, params))  # the store `models:/` reads
    model = args.model or params.tracking.registered_model
    alias = None if args.version else (args.alias or cfg.alias)
    with tempfile.TemporaryDirectory(prefix="champion-server-") as logs:
        board = Switchboard(model, alias, args.version, cfg, Path(logs))
        follower = threading.Thread(target=board.keep_following, name="follow-alias", daemon=True)
        follower.start()
        host, port = args.host or cfg.host, args.port or cfg.port
        what = f"version {args.version}" if args.version else f"@{alias}, read every {cfg.poll_seconds} s"
        print(f"[serve] {model} ({what}) on http://{host}:{port} (GET /version, POST /invocations)", flush=True)
        # uvicorn re-raises the SIGTERM it caught once it has shut down; as SystemExit, the versions' servers are
        # stopped below instead of left running
        signal.signal(signal.SIGTERM, stop_on_sigterm)
        try:
            uvicorn.run(application(board), host=host, port=port, log_level="warning")
        finally:
            board.shut_down()
            print("[serve] stopped", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
