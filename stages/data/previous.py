"""The previous run's splits and data metrics, so split_data can say what changed since then.

`dvc repro` deletes a stage's outputs before running it, so they are read back the way DVC itself would
restore them: from the workspace's dvc.lock (the md5 of `data/splits` and `metrics/data.json` as last
recorded) and the DVC cache. Run without DVC (`python -m stages.split_data`), the files still on disk are the
previous run. Nothing found (a first run, a cleared cache) is not an error: the comparison is then left out.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from stages.common.io import read_jsonl
from stages.common.paths import Paths

SPLIT_FILES = ("train", "val", "test")


@dataclass(frozen=True)
class Previous:
    where: str  # "data/splits (on disk)" or "dvc.lock (data/splits <md5>)"
    splits: dict[str, list[dict]]
    metrics: dict  # its metrics/data.json ({} when not found)


def on_disk(paths: Paths) -> Previous | None:
    if not all(paths.split(name).is_file() for name in SPLIT_FILES):
        return None
    metrics = json.loads(paths.data_metrics.read_text(encoding="utf-8")) if paths.data_metrics.is_file() else {}
    return Previous(f"{Paths.splits.relative} (on disk)", {n: read_jsonl(paths.split(n)) for n in SPLIT_FILES}, metrics)


def locked_outputs(root: Path) -> dict[str, str]:
    """{output path: md5} of split_data in dvc.lock; {} when there is none."""
    lock = root / "dvc.lock"
    if not lock.is_file():
        return {}
    try:
        stage = (yaml.safe_load(lock.read_text(encoding="utf-8")) or {}).get("stages", {}).get("split_data", {})
    except yaml.YAMLError:
        return {}
    return {out["path"]: out["md5"] for out in stage.get("outs", []) if "md5" in out and "path" in out}


def from_cache(paths: Paths) -> Previous | None:
    """The splits dvc.lock names, read from the DVC cache; None when the lock or the cache lacks them."""
    outputs = locked_outputs(paths.root)
    folder_md5 = outputs.get(Paths.splits.relative)
    if not folder_md5 or not (paths.root / ".dvc").is_dir():
        return None
    from dvc.repo import Repo

    with Repo(str(paths.root)) as repo:
        cached = repo.cache.local.oid_to_path
        listing = Path(cached(folder_md5))
        if not listing.is_file():
            return None
        files = {entry["relpath"]: Path(cached(entry["md5"])) for entry in json.loads(listing.read_text())}
        if not all(files.get(f"{name}.jsonl", Path()).is_file() for name in SPLIT_FILES):
            return None
        metrics_file = (
            Path(cached(outputs[Paths.data_metrics.relative])) if Paths.data_metrics.relative in outputs else None
        )
        metrics = json.loads(metrics_file.read_text()) if metrics_file and metrics_file.is_file() else {}
        splits = {name: read_jsonl(files[f"{name}.jsonl"]) for name in SPLIT_FILES}
    return Previous(f"dvc.lock ({Paths.splits.relative} {folder_md5})", splits, metrics)


def previous_run(paths: Paths) -> Previous | None:
    """The splits and data metrics of the run before this one, or None."""
    return on_disk(paths) or from_cache(paths)
