"""The shared `main()` wrapper: load params, run the stage, turn expected failures into one clear line."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

from stages.core.config import ConfigError, Params, load_params
from stages.core.io import InputError
from stages.core.paths import Paths

TRANSIENT_EXIT = 75  # EX_TEMPFAIL in sysexits.h: try again later


class StageError(RuntimeError):
    """A failure the user can act on: bad input, a missing file, an impossible setting."""


def run_stage(
    name: str,
    run: Callable[[Params, Paths], object],
    argv: list[str] | None = None,
    actions: dict[str, Callable[[Params, Paths], object]] | None = None,
) -> int:
    """Run `run(params, paths)` from the current directory; print its result; return an exit code.

    Settings live in params.yaml (so DVC sees them), so a stage takes no option; `actions` maps a flag
    (e.g. "--plan") to something else to do with the same params instead of running the stage.
    `argv` (default sys.argv[1:]) is read only when the stage has actions. Expected failures (bad params,
    bad input, missing files) end in one line naming the problem and exit code 1; a wrong flag exits 2;
    other OS errors (a lost file handle, a full disk being cleared) may pass and exit with TRANSIENT_EXIT,
    which the flow retries; anything else is a bug and keeps its traceback.
    """
    args = (sys.argv[1:] if argv is None else argv) if actions else []
    if len(args) > 1 or (args and args[0] not in actions):
        print(f"usage: python -m stages.{name} [{' | '.join(actions)}]", file=sys.stderr)
        return 2
    action = actions[args[0]] if args else run
    started = time.perf_counter()
    paths = Paths.at(".")
    try:
        params = load_params(paths.params)
        result = action(params, paths)
    except (ConfigError, StageError, InputError, FileNotFoundError) as exc:
        print(f"[{name}] error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"[{name}] error that may pass on a retry: {exc}", file=sys.stderr)
        return TRANSIENT_EXIT
    print(f"[{name}] done in {time.perf_counter() - started:.1f}s: {result}")
    return 0
