"""dvc.yaml says exactly what each stage depends on, so `dvc repro` re-runs only what an edit can change.

For every stage: its command, its params (the stage module's SPEC.params, which the stage reads, every one of
them, and no other: checked by running it), its outputs and metrics (SPEC),
and its deps: the data it reads (SPEC.reads) and every project module it imports, directly or through other
modules, found by reading the import statements (function-level imports included) and the package
`__init__.py` files Python runs on the way. Run `python -m tests.test_dvc_yaml` to print the entries dvc.yaml
should hold.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest
import yaml

from stages import STAGES

REPO_ROOT = Path(__file__).resolve().parent.parent
PROJECT_PACKAGES = ("stages", "serving", "flows")


def module_file(name: str) -> Path | None:
    """The file of project module `name` ("stages.common.io"), its package's __init__.py, or None."""
    base = REPO_ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imported_modules(path: Path) -> set[str]:
    """Names of the project modules that the file at `path` imports anywhere in its body."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)  # `from package import module`
    return {name for name in found if name.split(".")[0] in PROJECT_PACKAGES and module_file(name)}


def with_packages(name: str) -> set[str]:
    """`name` and every package above it (importing a.b.c runs a/__init__.py and a/b/__init__.py)."""
    parts = name.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts) + 1)}


def module_closure(module: str) -> list[str]:
    """Files (relative to the repository) of `module` and of every project module it imports, transitively."""
    seen: set[str] = set()
    pending = [module]
    while pending:
        for name in with_packages(pending.pop()):
            if name not in seen and module_file(name):
                seen.add(name)
                pending.extend(imported_modules(module_file(name)))
    return sorted(str(module_file(name).relative_to(REPO_ROOT)) for name in seen)


def expected_entry(stage: str) -> dict:
    """The dvc.yaml entry that stage `stage`'s code and SPEC call for."""
    spec = importlib.import_module(f"stages.{stage}").SPEC
    entry = {
        "cmd": spec.command,
        "deps": module_closure(f"stages.{stage}") + [location.relative for location in spec.reads],
        "params": list(spec.params),
    }
    if spec.writes or spec.uncached:
        entry["outs"] = [loc.relative for loc in spec.writes] + [
            {loc.relative: {"cache": False}} for loc in spec.uncached
        ]
    if spec.metrics:
        entry["metrics"] = [loc.relative for loc in spec.metrics]
    return entry


def dvc_stages() -> dict:
    return yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text(encoding="utf-8"))["stages"]


def test_dvc_yaml_lists_every_stage_in_the_flow_order():
    assert list(dvc_stages()) == list(STAGES)


@pytest.mark.parametrize("stage", STAGES)
def test_dvc_yaml_entry_matches_the_stage_code_and_spec(stage):
    written, expected = dvc_stages()[stage], expected_entry(stage)
    for key in ("cmd", "deps", "params", "outs", "metrics"):
        got, want = written.get(key), expected.get(key)
        if isinstance(want, list):
            missing = [item for item in want if item not in (got or [])]
            extra = [item for item in (got or []) if item not in want]
            assert not missing and not extra, (
                f"dvc.yaml stage {stage} {key}: missing {missing}, not used {extra} "
                f"(python -m tests.test_dvc_yaml prints the entry)"
            )
        else:
            assert got == want, f"dvc.yaml stage {stage} {key}: {got!r}, expected {want!r}"


def test_a_module_only_evaluation_imports_is_not_a_training_dep():
    training = set(expected_entry("train_qlora")["deps"])
    assert "stages/common/generation.py" not in training and "stages/tracking/registry.py" not in training
    assert "stages/common/generation.py" in expected_entry("evaluate_adapter")["deps"]


@pytest.fixture(scope="module")
def merged_export_params_read(pipeline_project, tmp_path_factory) -> set[str]:
    """The params export_hub reads when it also merges (`export.merge`), on a copy of the tiny project."""
    import dataclasses

    from stages import export_hub
    from tests.conftest import copy_outputs, run_as_declared

    paths, params, _ = pipeline_project
    merging = dataclasses.replace(params, export=dataclasses.replace(params.export, merge=True))
    read: dict[str, set[str]] = {}
    run_as_declared(export_hub, merging, copy_outputs(paths, tmp_path_factory.mktemp("merged")), read)
    return read["export_hub"]


@pytest.mark.parametrize("stage", [name for name in STAGES if name != "record_run"])  # see test_record_run.py
def test_each_stage_reads_every_params_entry_it_declares(stage, pipeline_project, stage_params_read, request):
    """Run as DVC runs them (conftest's pipeline_project), stages cannot read a params section they do not
    declare (it raises), and this checks they declare none they do not read (export_hub reads `evaluate` only
    when it merges, so its merged run counts too)."""
    declared = set(importlib.import_module(f"stages.{stage}").SPEC.params)
    read = set(stage_params_read[stage])
    if stage == "export_hub":
        read |= request.getfixturevalue("merged_export_params_read")
    assert read == declared


if __name__ == "__main__":
    print(yaml.safe_dump({"stages": {stage: expected_entry(stage) for stage in STAGES}}, sort_keys=False))
