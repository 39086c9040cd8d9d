"""What a stage reads and writes, declared once in its module as `SPEC`, and checked against dvc.yaml.

A stage's `SPEC` names the params sections (or `section.key`s) it reads, the paths it reads and the paths it
writes (`Paths.<name>` locations, stages/common/paths.py). `run_stage` hands the stage only those params
sections, so a stage cannot depend on a parameter DVC does not watch; tests/test_dvc_yaml.py checks each
dvc.yaml entry against its SPEC and against the project modules the stage imports.
"""

from __future__ import annotations

from dataclasses import dataclass

from stages.common.paths import Location


@dataclass(frozen=True)
class StageSpec:
    name: str  # the module stages/<name>.py and the dvc.yaml stage
    params: tuple[str, ...]  # params sections, or `section.key` for a single key
    reads: tuple[Location, ...] = ()  # data the stage reads (its code is derived from its imports)
    writes: tuple[Location, ...] = ()  # outputs DVC caches (`outs`)
    metrics: tuple[Location, ...] = ()  # JSON metrics files it writes (`metrics`)
    uncached: tuple[Location, ...] = ()  # outputs DVC tracks without caching (`cache: false`)

    @property
    def command(self) -> str:
        return f"python -m stages.{self.name}"
