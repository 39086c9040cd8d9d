"""Which MLflow store a project uses, how it is shown, and whether a tracking server answers.

The store is `tracking.tracking_uri`, else $MLFLOW_TRACKING_URI, else sqlite:///<project>/mlflow.db (under
`dvc exp run --temp/--queue` the workspace in $DVC_ROOT, so every run lands in one store). Passwords in a URI
never reach a log, report or file: `shown_uri` and `without_password` mask them. `require_server` asks a
tracking server's /health before the flow trains anything. MLflow is imported only inside functions.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from stages.common.config import Params
from stages.common.paths import Paths


def store_root(paths: Paths) -> Path:
    """Where the default MLflow store lives: the project root, or under `dvc exp run --temp/--queue` (which
    runs in a temporary copy) the workspace DVC names in $DVC_ROOT, so every run lands in one store."""
    return Path(os.environ.get("DVC_ROOT") or paths.root)


def tracking_uri(paths: Paths, params: Params) -> str:
    default = f"sqlite:///{store_root(paths) / paths.mlflow_db.name}"
    return params.tracking.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or default


def shown_uri(uri: str) -> str:
    """`uri` without a password, for logs, reports and files (postgresql://user:secret@host -> user:***@host)."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    return urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)))


def without_password(text: str, uri: str) -> str:
    """`text` (an error message, say) with the password of `uri` replaced by ***."""
    password = urlsplit(uri).password
    return text.replace(password, "***") if password else text


def is_server(uri: str) -> bool:
    """Whether `uri` names a tracking server (http, https, databricks) rather than a store opened directly."""
    return urlsplit(uri).scheme in ("http", "https", "databricks")


# A tracking server that is down: MLflow's HTTP client retries 7 times with exponential backoff by default,
# ~4.5 minutes before one call fails. A live stream or a pre-flight check should know within seconds.
QUICK_HTTP_SETTINGS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1"}


class TrackingUnreachable(RuntimeError):
    """The tracking server in the configured URI does not answer."""


def require_server(uri: str, attempts: int = 3, timeout: float = 5.0) -> None:
    """Check that the MLflow tracking server at `uri` answers `GET <uri>/health`, `attempts` times at most,
    one second apart; TrackingUnreachable (password masked) when it never does. Stores opened directly
    (sqlite, files) and databricks URIs pass unchecked. Used by the retrain flow before any training."""
    import urllib.error
    import urllib.request

    if urlsplit(uri).scheme not in ("http", "https"):
        return
    why = ""
    for attempt in range(attempts):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as response:
                if response.status == 200:
                    return
                why = f"HTTP {response.status} from /health"
        except urllib.error.HTTPError as exc:
            why = f"HTTP {exc.code} from /health"
        except OSError as exc:  # refused, unknown host, timeout
            why = str(getattr(exc, "reason", exc))
        if attempt + 1 < attempts:
            time.sleep(1)
    raise TrackingUnreachable(
        f"MLflow tracking server {shown_uri(uri)} does not answer ({without_password(why, uri)}): start it "
        "(`make mlflow-server`), or set tracking.tracking_uri or MLFLOW_TRACKING_URI to one that runs"
    )


def client_for(paths: Paths, params: Params):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=tracking_uri(paths, params))
