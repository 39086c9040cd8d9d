"""Start train_qlora in several processes with `accelerate launch` when params ask for it.

`train.launcher: accelerate` makes the unchanged stage command `python -m stages.train_qlora` (what
`dvc repro` and the retrain flow run) start itself again through `accelerate launch` with
`train.num_processes` processes and, when set, the accelerate config file `train.accelerate_config`; it
waits and returns the launcher's exit code, or TRANSIENT_EXIT (75) when a rank was killed by a signal or
exited 75, so the retrain flow retries the stage. Inside a started process (torchrun sets LOCAL_RANK) it trains:
the Trainer shards the batches across processes, and rank 0 alone writes (stages/training/distributed.py).

Which flags start several processes (accelerate 1.15, read in accelerate/commands/launch.py):
- `--multi_gpu --num_processes N` runs torchrun with N processes. On a machine without CUDA they train on
  the CPU over gloo, because the Trainer gets `use_cpu` there. This is what runs without a config file.
- `--cpu` (and a config with `distributed_type: MULTI_CPU` without an mpirun hostfile) takes the simple
  launcher: one process, whatever --num_processes says.
- A config file with `distributed_type: MULTI_GPU` (DDP) or `FSDP` (configs/accelerate/) also goes through
  torchrun; `--num_processes` from params overrides the file's.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import deque
from pathlib import Path

import yaml

from stages.common.config import TrainConfig, load_params
from stages.common.errors import TRANSIENT_EXIT, ConfigError, StageError
from stages.common.paths import Paths

LAUNCH_MODULE = "accelerate.commands.launch"  # `accelerate launch` of this interpreter's environment
# Without a config file: the processes torchrun starts, no mixed precision or compilation (the stage
# chooses dtypes itself) and a free port picked by accelerate (port 0), so two runs never collide.
DEFAULT_FLAGS = ("--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no")
# Set for the launched processes: one process started by accelerate's simple launcher has no LOCAL_RANK.
LAUNCHED_VARIABLE = "STAGES_LAUNCHED_BY"


def launched() -> bool:
    """True inside a process that a launcher started (torchrun, `accelerate launch`): do not launch again."""
    return "LOCAL_RANK" in os.environ or LAUNCHED_VARIABLE in os.environ


def config_file(cfg: TrainConfig, root: Path) -> Path | None:
    """`train.accelerate_config` resolved against the project root; StageError when it is missing, or asks
    for FSDP on a machine without CUDA (4-bit weights under FSDP need GPUs)."""
    if cfg.accelerate_config is None:
        return None
    path = (root / cfg.accelerate_config).resolve()
    if not path.is_file():
        raise StageError(f"train.accelerate_config: {path} not found")
    try:
        settings = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise StageError(f"train.accelerate_config: {path} is not valid YAML: {exc}") from exc
    if settings.get("distributed_type") == "FSDP" and not cuda_available():
        raise StageError(
            f"train.accelerate_config: {path} asks for FSDP, which shards 4-bit bitsandbytes weights on CUDA "
            "GPUs only; on this machine use DDP (no config file, or configs/accelerate/ddp.yaml)"
        )
    return path


def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def launch_command(cfg: TrainConfig, module: str, config: Path | None) -> list[str]:
    """`python -m accelerate.commands.launch <flags> -m <module>` for `cfg` (launcher accelerate)."""
    if config is None:
        flags = [*DEFAULT_FLAGS, "--main_process_port", "0"] if cfg.num_processes > 1 else []
    else:
        flags = ["--config_file", str(config)]
    return [sys.executable, "-m", LAUNCH_MODULE, *flags, "--num_processes", str(cfg.num_processes), "-m", module]


# torchrun's failure summary: "Root Cause (first observed failure):", then the rank's "exitcode  : -9 (pid: ..)".
_ROOT_CAUSE = re.compile(r"Root Cause.*?exitcode\s*:\s*(-?\d+)", re.DOTALL)


def exit_code(returncode: int) -> int:
    """A child's return code as a shell would report it (a signal N becomes 128 + N)."""
    return 128 - returncode if returncode < 0 else returncode


def root_cause_exit(stderr: str) -> int | None:
    """The exit code of the rank that failed first, from torchrun's failure summary in `stderr` (negative:
    killed by that signal); None when there is no summary."""
    found = _ROOT_CAUSE.findall(stderr)
    return int(found[-1]) if found else None


def run_launcher(command: list[str], env: dict[str, str]) -> int:
    """Run `command` (`accelerate launch ...`), its stderr passed through as it comes, and return its exit
    code; TRANSIENT_EXIT when the rank that failed first was killed by a signal or itself exited with
    TRANSIENT_EXIT (torchrun reports either as exit 1), so the retrain flow retries the stage as it would a
    single process."""
    process = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, text=True, errors="replace")
    tail: deque[str] = deque(maxlen=400)
    for line in process.stderr:
        sys.stderr.write(line)
        tail.append(line)
    returncode = process.wait()
    cause = root_cause_exit("".join(tail)) if returncode != 0 else None
    if cause is not None and (cause < 0 or cause == TRANSIENT_EXIT):
        how = f"was killed by signal {-cause}" if cause < 0 else f"exited {TRANSIENT_EXIT} (an OS error)"
        print(f"a training process {how}, which may pass: exiting {TRANSIENT_EXIT} (retried)", file=sys.stderr)
        return TRANSIENT_EXIT
    return exit_code(returncode)


def relaunch(name: str, argv: list[str] | None = None) -> int | None:
    """When params say `train.launcher: accelerate` and this process was not launched, run stage `name`
    (`python -m stages.<name>`) through `accelerate launch` and return its exit code; else None (train here).

    Unreadable params return None too, so the stage reports them the usual way. A stage flag (`--plan`)
    never launches.
    """
    args = sys.argv[1:] if argv is None else argv
    paths = Paths.at(".")
    try:
        cfg = load_params(paths.params).train
    except ConfigError:
        return None
    if cfg.launcher != "accelerate" or launched() or args:
        return None
    try:
        command = launch_command(cfg, f"stages.{name}", config_file(cfg, paths.root))
    except StageError as exc:
        print(f"[{name}] error: {exc}", file=sys.stderr)
        return 1
    print(f"[{name}] train.launcher=accelerate: {' '.join(command[1:])}", flush=True)
    env = {**os.environ, LAUNCHED_VARIABLE: "accelerate"}
    return run_launcher(command, env)
