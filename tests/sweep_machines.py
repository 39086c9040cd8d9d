"""Two "machines" for a sweep with `sweep.backend: prefect`: a coordinator's project and N Prefect workers,
each in its own clone in its own folder, with a bare Git repository and a local-folder DVC remote between them,
against shared MLflow and Prefect servers (infra.servers.shared_servers). tests/sweeps/test_workers.py and
bench/sweep_workers.py build them here.

    with sweep_machines(folder, servers, tiny_model_dir, workers=2) as machines:
        done, seconds, report_folder = run_sweep(machines)
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import NamedTuple

from infra.servers import background_process
from stages.common.modeling import cores
from tests.flow_workspace import commit, dvc, new_workspace, run, workspace_env

POOL, DEPLOYMENT, MODEL = "trial-pool", "worker-trial", "qlora-price-adapter"
GRID = {"train.learning_rate": [3.0e-3, 1.0e-2], "lora.r": [4, 8]}
PREFECT = [sys.executable, "-m", "prefect", "--no-prompt"]
DEFAULT_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj"]  # params.yaml's lora.target_modules


class Machines(NamedTuple):
    coordinator: Path
    env: dict  # the coordinator's: PREFECT_API_URL and MLFLOW_TRACKING_URI of the shared servers
    clones: list[Path]  # each worker's own clone
    tracking_uri: str


@contextlib.contextmanager
def sweep_machines(base: Path, servers, tiny_model_dir: Path, workers: int = 2):
    """In `base`: the coordinator's project (committed, pushed to the bare repository, its DVC remote a local
    folder, the 2 x 2 tiny GRID with backend prefect), the trial pool and deployment on the Prefect server of
    `servers` (a SharedServers), and `workers` workers each serving one trial at a time from its own clone,
    stopped afterwards."""
    threads = max(cores() // workers, 1)  # the "machines" share this one's cores
    coordinator = base / "coordinator"
    coordinator.mkdir(parents=True)
    sweep = {"backend": "prefect", "grid": GRID, "fixed": {"train.max_steps": 4}, "register": "best"}
    overrides = {"base_model": {"source": str(tiny_model_dir)}, "sweep": sweep}  # a path every machine reads
    env = new_workspace(coordinator, tiny_model_dir, servers.prefect_api, overrides)
    env["MLFLOW_TRACKING_URI"] = servers.tracking_uri
    run(["git", "init", "-q", "--bare", str(base / "project.git")], base, env)
    run(["git", "remote", "add", "origin", str(base / "project.git")], coordinator, env)
    dvc(["remote", "add", "-d", "shared", str(base / "dvc-remote")], coordinator, env)
    commit(coordinator, env, "tiny project")
    run(["git", "push", "-q", "origin", "HEAD:refs/heads/main"], coordinator, env)
    run([*PREFECT, "work-pool", "create", POOL, "--type", "process"], coordinator, env)
    run([*PREFECT, "deploy", "--name", DEPLOYMENT], coordinator, env)
    clones = []
    with contextlib.ExitStack() as stack:
        for n in range(1, workers + 1):
            clone = base / f"machine-{n}"
            run(["git", "clone", "-q", "-b", "main", str(base / "project.git"), str(clone)], base, env)
            worker_env = {**workspace_env(clone, servers.prefect_api), "PROJECT_DIR": str(clone),
                          "PREFECT_WORKER_QUERY_SECONDS": "1", "OMP_NUM_THREADS": str(threads)}  # fmt: skip
            worker = [*PREFECT, "worker", "start", "--pool", POOL, "--type", "process", "--limit", "1"]
            log = base / f"worker-{n}.log"
            stack.enter_context(background_process([*worker, "--name", f"machine-{n}"], worker_env, log, cwd=clone))
            clones.append(clone)
        yield Machines(coordinator, env, clones, servers.tracking_uri)


def run_sweep(machines: Machines):
    """`python -m flows.sweep` on the coordinator: (completed process, wall seconds, the report's folder)."""
    root = machines.coordinator
    started = time.monotonic()
    done = run([sys.executable, "-m", "flows.sweep", "--project-dir", str(root)], root, machines.env, check=False)
    seconds = time.monotonic() - started
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    folder = max((root / "reports" / "sweeps").iterdir(), key=lambda p: p.stat().st_mtime)
    return done, seconds, folder
