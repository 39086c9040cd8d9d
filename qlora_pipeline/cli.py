"""`qlora-pipeline`: one command for what `make` and `python -m` reach, run from the project's folder (where
params.yaml and dvc.yaml are).

Most subcommands hand their options to the module that does the work (`qlora-pipeline sweep --jobs 2` is
`python -m flows.sweep --jobs 2`), so the two never disagree; `qlora-pipeline <subcommand> --help` prints what
it does, an example, then that module's options. `plan`, `stage` and `params` are the command's own.

Run: `pip install -e .` in a clone, then `qlora-pipeline --help`.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

from stages import STAGES


@dataclass(frozen=True)
class Delegated:
    """A subcommand whose options belong to `module`'s main(argv); `before` runs first (its main() takes none)."""

    module: str
    short: str  # one line in `qlora-pipeline --help`
    summary: str
    example: str
    make: str
    before: str = ""

    def help_text(self, name: str) -> str:
        summary = textwrap.fill(self.summary, 100)
        return f"usage: qlora-pipeline {name} [options]\n\n{summary}\n\nexample: {self.example}\nsame as: {self.make}"


DELEGATED = {
    "run": Delegated(
        "flows.__main__",
        "Run the pipeline once (the retrain flow)",
        "Run the pipeline once: the Prefect retrain flow through every DVC stage that is out of date, then the "
        "promotion gate and a report (the Prefect artifact retrain-report).",
        "qlora-pipeline run",
        "make demo",
    ),
    "sweep": Delegated(
        "flows.sweep",
        "Run params.yaml's sweep as DVC experiments",
        "Run params.yaml's sweep: every trial a DVC experiment and a child MLflow run; the best one meets the "
        "promotion gate once (docs/sweeps.md). Commit the project first.",
        "qlora-pipeline sweep --jobs 2",
        "make sweep",
    ),
    "serve": Delegated(
        "serving.champion",
        "Serve the champion over HTTP, following its alias",
        "Serve the registered version holding the champion alias on one port, following the alias as retrains "
        "move it (docs/serving.md).",
        "MLFLOW_TRACKING_URI=sqlite:///$PWD/mlflow.db qlora-pipeline serve --port 5001",
        "make serve-champion",
    ),
    "predict": Delegated(
        "serving.predict",
        "Price a file with the champion",
        "Price every row of a file with the champion (or --model URI, or --adapter DIR) and write the answers.",
        "qlora-pipeline predict --input new.csv --output priced.csv",
        "make predict",
    ),
    "history": Delegated(
        "flows.history",
        "The retrain history: a table and a chart",
        "Print every recorded retrain as one table (rows, test items kept and added, metric, decision, "
        "champion after) and draw reports/history.png.",
        "qlora-pipeline history --last 5",
        "make history",
    ),
    "schedule": Delegated(
        "flows.serve",
        "The retrain flow on a cron schedule (Prefect)",
        "Serve the retrain flow on flow.schedule (cron) against a Prefect server, after creating the "
        "automation that marks a run Crashed when its heartbeats stop. Needs PREFECT_API_URL.",
        "PREFECT_API_URL=http://127.0.0.1:4200/api qlora-pipeline schedule --cron '0 3 * * *'",
        "make serve",
        before="flows.heartbeats",
    ),
    "servers": Delegated(
        "infra.servers",
        "PostgreSQL, MLflow and Prefect servers for a team",
        "Start PostgreSQL with an MLflow tracking server and a Prefect server on it, on loopback, until Ctrl-C; "
        "prints the MLFLOW_TRACKING_URI and PREFECT_API_URL to export (docs/operations.md).",
        "qlora-pipeline servers --folder .servers",
        "make servers",
    ),
}

EXAMPLES = """\
examples:
  qlora-pipeline run                                     # the pipeline on params.yaml (make demo)
  qlora-pipeline plan --with configs/llama-3.1-8b.yaml   # what the course's 8B run trains and costs
  qlora-pipeline params apply configs/llama-3.1-8b.yaml  # make params.yaml that run
  qlora-pipeline stage split_data                        # one DVC stage's command
  qlora-pipeline sweep --help                            # what a subcommand does, and its options
"""


def build_parser() -> argparse.ArgumentParser:
    """The whole command line: one subparser per subcommand (`params` has its own, `apply`)."""
    parser = argparse.ArgumentParser(
        prog="qlora-pipeline",
        description="Fine-tune a causal language model with QLoRA as a reproducible pipeline (DVC stages, a "
        "Prefect flow, MLflow tracking and registry). Run it from the project's folder.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", metavar="<subcommand>", required=True)
    for name, spec in DELEGATED.items():
        commands.add_parser(
            name,
            help=spec.short,
            add_help=False,  # --help goes to the module, which lists the options (delegate)
        )
    plan = commands.add_parser(
        "plan",
        help="What the configured run trains and costs, without loading weights",
        description="Print the parameters LoRA trains, the adapter's size, the base's memory, the training "
        "FLOPs per token and the peak training memory of the configured run, from the model's config alone "
        "(docs/training.md, 'The planner'). Same as `make plan`.",
        epilog="example: qlora-pipeline plan --with configs/llama-3.1-8b.yaml",
    )
    plan.add_argument(
        "--with", dest="overrides", metavar="FILE", type=Path, help="an override file to plan with (not written)"
    )
    stage = commands.add_parser(
        "stage",
        help="Run one DVC stage's command",
        description="Run one stage as dvc.yaml does (`python -m stages.<name>`), outside DVC: nothing is "
        "cached or locked, so `dvc repro` may run it again. Use `dvc repro <name>` to run it under DVC.",
        epilog="example: qlora-pipeline stage split_data",
    )
    stage.add_argument("name", choices=STAGES, help="the stage")
    params = commands.add_parser(
        "params",
        help="Work with params.yaml",
        description="Work with params.yaml, the file every stage and DVC read.",
        epilog="example: qlora-pipeline params apply configs/llama-3.1-8b.yaml",
    )
    actions = params.add_subparsers(dest="action", metavar="<action>", required=True)
    apply = actions.add_parser(
        "apply",
        help="Write an override file's values into params.yaml",
        description="Write the values of an override file (some keys of params.yaml's sections) into "
        "params.yaml, keeping its comments and every other key; the result is checked first, and a bad file "
        "changes nothing. Commit params.yaml afterwards, so DVC and the run's record see the new values.",
        epilog="example: qlora-pipeline params apply configs/llama-3.1-8b.yaml",
    )
    apply.add_argument("file", type=Path, help="the override file")
    apply.add_argument("--params", type=Path, default=Path("params.yaml"), help="the file to write into")
    return parser


def command_environment() -> None:
    """What `make` sets for every command: dvc.yaml's `python` is this interpreter, Prefect sends no analytics."""
    here = str(Path(sys.executable).parent)
    if os.environ.get("PATH", "").split(os.pathsep)[0] != here:
        os.environ["PATH"] = os.pathsep.join([here, os.environ.get("PATH", "")])
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")


def delegate(name: str, args: list[str]) -> int:
    """Hand `args` to the subcommand's module; for --help print what the subcommand does first."""
    spec = DELEGATED[name]
    if "-h" in args or "--help" in args:
        print(spec.help_text(name))
        print(f"\noptions (those of python -m {spec.module.removesuffix('.__main__')}):", flush=True)
        args = ["--help"]
    elif spec.before:
        code = importlib.import_module(spec.before).main()
        if code:
            return code
    try:
        return importlib.import_module(spec.module).main(args) or 0
    except SystemExit as exc:  # argparse's --help and usage errors
        return exc.code if isinstance(exc.code, int) else 1


def plan(overrides: Path | None) -> int:
    """The planner on params.yaml, or on params.yaml with an override file's values (nothing written)."""
    from stages import train_qlora

    if overrides is None:
        return train_qlora.main(["--plan"])
    from qlora_pipeline.overrides import params_with
    from stages.common.errors import ConfigError, StageError
    from stages.common.paths import Paths

    paths = Paths.at(".")
    try:
        print(f"[plan] with {overrides}: {train_qlora.print_plan(params_with(paths.params, overrides), paths)}")
    except (ConfigError, StageError, FileNotFoundError) as exc:
        print(f"[plan] error: {exc}", file=sys.stderr)
        return 1
    return 0


def apply_overrides(file: Path, params: Path) -> int:
    from qlora_pipeline.overrides import apply
    from stages.common.errors import ConfigError

    try:
        changed = apply(params, file)
    except ConfigError as exc:
        print(f"params apply: {exc}; {params} is unchanged", file=sys.stderr)
        return 1
    if not changed:
        print(f"{params} already holds every value of {file}")
    else:
        print(f"{params}: {len(changed)} value(s) from {file}: {', '.join(changed)}")
        print("next: `qlora-pipeline plan` to see what the run costs, then commit params.yaml")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    command_environment()
    if args.command in DELEGATED:
        return delegate(args.command, rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "plan":
        return plan(args.overrides)
    if args.command == "stage":
        return importlib.import_module(f"stages.{args.name}").main([]) or 0
    return apply_overrides(args.file, args.params)


if __name__ == "__main__":
    raise SystemExit(main())
