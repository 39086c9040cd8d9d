"""`python -m flows`: run the retrain flow once (flows/retrain.py), with `dvc status` started first.

DVC checks the workspace while Prefect is imported: both take a second or two, so starting one before the
other saves that much on every run, which is most of a run that finds nothing to do. `--help` and bad options
exit before anything starts.

Run: `python -m flows [--project-dir DIR]` (what `make demo` runs).
"""

from __future__ import annotations

import sys
from pathlib import Path

from flows.workspace import StatusAhead, command_line, stage_environment


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ahead = StatusAhead(Path(command_line(argv).project_dir), stage_environment({}))
    from flows.retrain import main as retrain  # imports Prefect while DVC answers

    return retrain(argv, ahead)


if __name__ == "__main__":
    raise SystemExit(main())
