"""`python -m flows.history`: every recorded retrain of this project as one table, and a chart of them.

Reads the MLflow store params `tracking` names (or $MLFLOW_TRACKING_URI): one row per run the promotion gate
decided on, oldest first, with when it ran, the rows its data had, its test items (kept and added since the
run before), the primary metric with its interval, the decision and the champion after it
(stages/tracking/history.py); then how many runs a dead process left RUNNING were closed later. The chart
goes to reports/history.png (--chart).

Run: `python -m flows.history [--last N] [--chart PATH] [--project-dir DIR]` (or `make history`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flows.workspace import PROJECT_ROOT
from stages.common.config import load_params
from stages.common.errors import ConfigError
from stages.common.paths import Paths
from stages.tracking import history
from stages.tracking.store import client_for, shown_uri, tracking_uri


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Print the retrain history and draw its chart.")
    parser.add_argument("--project-dir", default=str(PROJECT_ROOT), help="project root holding params.yaml")
    parser.add_argument("--last", type=int, default=0, help="show only the last N retrains (default: all)")
    parser.add_argument("--chart", default=None, help="where to draw the chart (default: reports/history.png)")
    args = parser.parse_args(argv)
    paths = Paths.at(args.project_dir)
    try:
        params = load_params(paths.params)
    except ConfigError as exc:
        print(f"history: {exc}", file=sys.stderr)
        return 1
    store = shown_uri(tracking_uri(paths, params))
    client = client_for(paths, params)
    rows = history.retrains(client, params.tracking.experiment)
    if not rows:
        print(f"no retrains recorded yet in experiment {params.tracking.experiment!r} of {store}: run `make demo`")
        return 0
    shown = rows[-args.last :] if args.last > 0 else rows
    print(f"Retrains of {params.tracking.registered_model} in {store} ({len(shown)} of {len(rows)}):\n")
    print(history.markdown_table(shown))
    note = history.closed_note(client, params.tracking.experiment)
    if note:
        print(f"\n{note}")
    picture = Path(args.chart) if args.chart else paths.root / "reports" / "history.png"
    picture.parent.mkdir(parents=True, exist_ok=True)
    history.chart(shown, picture)
    print(f"\nchart: {picture}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
