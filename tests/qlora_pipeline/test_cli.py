"""The console script: --help at every level, override files written into params.yaml with their comments
kept, and the planner on the course's Llama 3.1 8B file from a config alone."""

from __future__ import annotations

import difflib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from qlora_pipeline.cli import DELEGATED, build_parser, main
from stages.common.config import load_params
from tests.test_train_qlora import LLAMA_31_8B

ROOT = Path(__file__).resolve().parents[2]
LLAMA_31_FILE = ROOT / "configs" / "llama-3.1-8b.yaml"


def subcommands(parser) -> dict:
    return next(a for a in parser._actions if a.dest == "command").choices


def test_the_console_script_is_installed_and_answers_help():
    script = Path(sys.executable).parent / "qlora-pipeline"
    assert script.is_file(), "pip install -e . installs the qlora-pipeline script beside python"
    done = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert all(name in done.stdout for name in subcommands(build_parser()))


@pytest.mark.parametrize("name", sorted(subcommands(build_parser())))
def test_every_subcommand_says_what_it_does_with_an_example(name, capsys):
    argv = [name, "apply", "--help"] if name == "params" else [name, "--help"]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own --help
        code = exc.code
    out = capsys.readouterr().out
    assert code == 0
    example = next(line for line in out.splitlines() if line.startswith("example: "))
    assert f"qlora-pipeline {name}" in example
    if name in DELEGATED:  # then the module's own options
        assert f"options (those of python -m {DELEGATED[name].module.removesuffix('.__main__')})" in out
        assert "--project-dir" in out or "--folder" in out


def test_an_unknown_stage_or_option_is_refused(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["stage", "no_such_stage"])
    assert exited.value.code == 2 and "invalid choice: 'no_such_stage'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["plan", "--no-such-option"])


def test_params_apply_writes_the_values_and_keeps_the_comments(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    before = params.read_text()
    assert main(["params", "apply", str(LLAMA_31_FILE), "--params", str(params)]) == 0
    assert "base_model.source" in capsys.readouterr().out
    after = params.read_text()
    overridden = [key for values in yaml.safe_load(LLAMA_31_FILE.read_text()).values() for key in values]
    edits = [line for line in difflib.ndiff(before.splitlines(), after.splitlines()) if line[:2] in ("- ", "+ ")]
    removed = [line[2:] for line in edits if line.startswith("- ")]
    # one line per overridden key changes, its comment kept; no other line (quotes, nulls, numbers, lists) moves
    assert len(removed) == len(edits) / 2 == len(overridden)
    assert sorted(line.split(":")[0].strip() for line in removed) == sorted(overridden)
    added = [line[2:] for line in edits if line.startswith("+ ")]
    assert [line.partition("#")[2] for line in removed] == [line.partition("#")[2] for line in added]
    values = load_params(params)
    assert values.base_model.source == "meta-llama/Llama-3.1-8B"
    assert values.train.learning_rate == 1e-4 and values.data.n_train == -1
    assert values.data.text_template.endswith("\n\nPrice is $")
    assert values.lora.r == load_params(ROOT / "params.yaml").lora.r  # what the file does not name stays
    assert main(["params", "apply", str(LLAMA_31_FILE), "--params", str(params)]) == 0
    assert "already holds every value" in capsys.readouterr().out


def test_a_bad_override_file_changes_nothing(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    shutil.copy(ROOT / "params.yaml", params)
    before = params.read_bytes()
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  learning_rate: -1\n")
    assert main(["params", "apply", str(bad), "--params", str(params)]) == 1
    err = capsys.readouterr().err
    assert "train.learning_rate" in err and "is unchanged" in err
    assert params.read_bytes() == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".params.yaml")]  # nothing half-written


def test_plan_with_the_course_file_from_a_cached_config_alone(tmp_path, monkeypatch, capsys):
    """The Hub id's config.json as the Hugging Face cache holds it once fetched, read offline; no weights."""
    from huggingface_hub import constants

    snapshot = tmp_path / "hub" / "models--meta-llama--Llama-3.1-8B"
    commit = "0" * 40
    (snapshot / "refs").mkdir(parents=True)
    (snapshot / "refs" / "main").write_text(commit)
    (snapshot / "snapshots" / commit).mkdir(parents=True)
    config = {**LLAMA_31_8B, "max_position_embeddings": 131072, "rope_theta": 500000.0}
    config["rope_scaling"] = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    (snapshot / "snapshots" / commit / "config.json").write_text(json.dumps(config))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    shutil.copy(ROOT / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    assert main(["plan", "--with", str(LLAMA_31_FILE)]) == 0
    out = capsys.readouterr().out
    assert "meta-llama/Llama-3.1-8B@main config.json" in out
    assert "trainable parameters: 27,262,976" in out
    assert "16.06 GB in 16-bit" in out and "training FLOPs per token: 3.05e+10" in out
    assert "peak training memory: ~" in out
    assert (tmp_path / "params.yaml").read_bytes() == (ROOT / "params.yaml").read_bytes()  # planned, not written
