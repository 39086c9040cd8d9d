"""Every module in qlora_pipeline/, stages/, serving/, sweeps/, flows/, infra/ and bench/ imports; a stage imports
no torch or prefect."""

import importlib
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import bench
import flows
import infra
import qlora_pipeline
import serving
import stages
import sweeps

PACKAGES = (qlora_pipeline, stages, serving, sweeps, flows, infra, bench)
FOUND = [
    (name, is_package)
    for package in PACKAGES
    for _, name, is_package in pkgutil.walk_packages(package.__path__, prefix=f"{package.__name__}.")
]
MODULES = sorted(name for name, _ in FOUND)
STAGE_MODULES = sorted(name for name, is_package in FOUND if not is_package and name.count(".") == 1)


def test_every_stage_has_a_module():
    import yaml

    from stages import STAGES

    assert set(STAGES) <= {name.split(".")[-1] for name in MODULES}
    dvc_yaml = Path(stages.__file__).resolve().parent.parent / "dvc.yaml"
    assert list(yaml.safe_load(dvc_yaml.read_text())["stages"]) == list(STAGES)  # the flow runs them all, in order


@pytest.mark.parametrize("name", MODULES)
def test_module_imports(name):
    module = importlib.import_module(name)
    assert module.__doc__, f"{name} has no docstring"


@pytest.mark.parametrize("name", [m for m in STAGE_MODULES if m.startswith("stages.")])
def test_stage_import_is_cheap_and_prefect_free(name):
    heavy = "('torch', 'transformers', 'prefect', 'mlflow')"
    code = f"import sys, {name}; print(sorted(m for m in {heavy} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    module = importlib.import_module(name)
    assert callable(module.run) and callable(module.main)
