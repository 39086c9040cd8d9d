"""`flow.push`: after a successful run, upload the pipeline's outputs to a DVC remote so others can pull them.

- `push_target(root, name)`: the remote `dvc push` will use (`flow.remote`, else the default remote) and its URL
  with any password masked; raises PushFailed before anything trains when there is no such remote.
- `push_outputs` (a Prefect task): `dvc push [-r name]` in the project, i.e. every file the workspace's dvc.lock
  and .dvc files name that the remote lacks; returns a `Pushed` (files sent, remote, masked URL). It raises
  PushFailed, marked transient for network trouble so the flow's retry condition retries it.

Credentials never come from params.yaml: DVC reads them from the environment (AWS_ACCESS_KEY_ID, ...) or from
.dvc/config.local (`dvc remote modify --local`), which git ignores. Output lines and URLs pass through
`mask_secrets` before they reach the log or the report.
"""

from __future__ import annotations

import re
import subprocess
import sys
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

URL_PASSWORD = re.compile(r"(?P<head>[a-z][a-z0-9+.-]*://[^/\s:@]+):[^@/\s]+@", re.IGNORECASE)
# Failures that may pass on a retry: the network, a throttling or busy server, DVC's lock.
TRANSIENT_PUSH = re.compile(
    r"timed? ?out|connection (reset|refused|aborted|closed)|cannot connect|connect call failed|temporar(y|ily)|"
    r"unavailable|too many requests|slow ?down|throttl|\b50[234]\b|broken pipe|Unable to acquire lock",
    re.IGNORECASE,
)


class PushFailed(RuntimeError):
    """`dvc push` failed or has no remote to go to; `transient` says whether a retry may succeed."""

    def __init__(self, message: str, transient: bool = False):
        super().__init__(message)
        self.transient = transient


@dataclass(frozen=True)
class Pushed:
    files: int
    remote: str
    url: str

    def line(self) -> str:
        what = f"pushed {self.files} file{'s' * (self.files != 1)}" if self.files else "nothing to push"
        return f"{what} to DVC remote `{self.remote}` ({self.url}); the remote now holds every output of this run"


def mask_secrets(text: str) -> str:
    """`text` with the password of every `scheme://user:password@host` URL replaced by `***`."""
    return URL_PASSWORD.sub(r"\g<head>:***@", text)


def push_target(root: Path, name: str | None) -> tuple[str, str]:
    """(remote name, masked URL) that `dvc push` uses in `root`: `name`, else the default remote. Reads every
    DVC config level (system, global, .dvc/config, .dvc/config.local); raises PushFailed naming the fix."""
    from dvc.config import Config, ConfigError

    try:
        config = Config(dvc_dir=str(root / ".dvc"))
    except ConfigError as exc:
        raise PushFailed(f"flow.push: the DVC config in {root / '.dvc'} is invalid: {mask_secrets(str(exc))}") from exc
    remotes = config.get("remote", {})
    chosen = name or config.get("core", {}).get("remote")
    if not chosen:
        raise PushFailed(
            "flow.push is true but flow.remote is null and no default DVC remote is set: run "
            "`dvc remote add -d storage <url>` (README: Sharing data and adapters), or name one in flow.remote"
        )
    if chosen not in remotes:
        known = ", ".join(sorted(remotes)) or "none"
        where = "flow.remote" if name else "the default remote (core.remote)"
        raise PushFailed(f"{where}: no DVC remote named {chosen!r} (remotes: {known}); see `dvc remote list`")
    return chosen, mask_secrets(str(remotes[chosen].get("url", "")))


def pushed_files(output: str) -> int:
    """How many files `dvc push` sent, from its last line: "3 files pushed" or "Everything is up to date."."""
    found = re.findall(r"(\d+) files? pushed", output)
    return int(found[-1]) if found else 0


def push_command(remote: str) -> list[str]:
    return [sys.executable, "-m", "dvc", "push", "-r", remote]


def push_failure(remote: str, url: str, code: int, output: str) -> PushFailed:
    """The PushFailed for a `dvc push` that exited `code`: its first and last error lines (a cause such as
    "Cannot connect to host", then DVC's summary), transient when any error line names network trouble."""
    errors = [line for line in output.splitlines() if line.lstrip().startswith("ERROR")]
    why = "; ".join(dict.fromkeys([errors[0], errors[-1]])) if errors else f"exit code {code}"
    transient = any(TRANSIENT_PUSH.search(line) for line in errors)
    return PushFailed(f"`dvc push -r {remote}` to {url} failed: {why}", transient)


@task(cache_policy=NO_CACHE, persist_result=False, task_run_name="dvc push")
def push_outputs(project_dir: str, remote: str, url: str) -> Pushed:
    """Run `dvc push -r <remote>` in `project_dir` (DVC reads credentials from the environment and
    .dvc/config.local; none is a parameter here, so none is recorded by Prefect), logging its output with
    passwords masked; return what went up, or raise PushFailed (transient for network trouble)."""
    logger = get_run_logger()
    logger.info("$ dvc push -r %s  (%s)", remote, url)
    done = subprocess.run(push_command(remote), cwd=project_dir, capture_output=True, text=True)
    output = mask_secrets(done.stdout + done.stderr)
    for line in deque((line for line in output.splitlines() if line.strip()), maxlen=20):
        logger.info(line)
    if done.returncode != 0:
        raise push_failure(remote, url, done.returncode, output)
    return Pushed(files=pushed_files(output), remote=remote, url=url)
