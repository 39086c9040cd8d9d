"""The shared `main()` wrapper: load params, run the stage, turn expected failures into one clear line."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

from stages.common.config import Params, load_params
from stages.common.errors import TRANSIENT_EXIT, ConfigError, InputError, StageError
from stages.common.paths import Paths
from stages.common.spec import StageSpec


def run_stage(
    spec: StageSpec,
    run: Callable[[Params, Paths], object],
    argv: list[str] | None = None,
    actions: dict[str, Callable[[Params, Paths], object]] | None = None,
) -> int:
    """Run `run(params, paths)` from the current directory; print its result; return an exit code.

    The stage's `run` is handed only the params sections `spec.params` declares (the rest raise ConfigError
    when read). Settings live in params.yaml (so DVC sees them), so a stage takes no option; `actions` maps
    a flag (e.g. "--plan") to something else to do instead of running the stage, which DVC never runs and
    so gets every params section. `argv` (default sys.argv[1:]) is read only when the stage has actions.
    Expected failures (bad params, bad input, missing files) end in one line naming the problem and exit
    code 1; a wrong flag exits 2; other OS errors (a lost file handle, a full disk being cleared) may pass
    and exit with TRANSIENT_EXIT, which the flow retries; anything else is a bug and keeps its traceback.
    """
    name = spec.name
    args = (sys.argv[1:] if argv is None else argv) if actions else []
    if len(args) > 1 or (args and args[0] not in actions):
        print(f"usage: {spec.command} [{' | '.join(actions)}]", file=sys.stderr)
        return 2
    action = actions[args[0]] if args else run
    started = time.perf_counter()
    paths = Paths.at(".")
    try:
        params = load_params(paths.params)
        result = action(params if args else params.only(spec.params, name), paths)
    except (ConfigError, StageError, InputError, FileNotFoundError) as exc:
        print(f"[{name}] error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"[{name}] error that may pass on a retry: {exc}", file=sys.stderr)
        return TRANSIENT_EXIT
    print(f"[{name}] done in {time.perf_counter() - started:.1f}s: {result}")
    return 0
