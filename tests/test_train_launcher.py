"""train.launcher: the stage command starts itself in two CPU processes with `accelerate launch` (gloo), each
trains on its own half of the data, and the adapter and outputs are written once; plus the settings and the
command line the launcher builds."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from stages.common.config import TrainConfig, params_from_dict
from stages.common.errors import ConfigError
from stages.common.io import read_jsonl
from stages.training import launcher
from tests.conftest import REPO_ROOT
from tests.test_train_qlora import copy_inputs

TWO_PROCESSES = {
    "launcher": "accelerate",
    "num_processes": 2,
    "eval_steps": 3,
    "save_steps": 3,
    "logging_steps": 1,
    "sample_prompts": 1,
}


@pytest.fixture(scope="module")
def two_process_run(pipeline_project, tmp_path_factory):
    """The unchanged stage command run on a copy of the tiny project with launcher accelerate, 2 processes."""
    paths, _, _ = pipeline_project
    project = copy_inputs(paths, tmp_path_factory.mktemp("launcher"))
    raw = yaml.safe_load(project.params.read_text())
    raw["train"].update(TWO_PROCESSES)
    project.params.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "TQDM_DISABLE": "1"}
    for name in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "MLFLOW_RUN_ID", launcher.LAUNCHED_VARIABLE):
        env.pop(name, None)
    command = [sys.executable, "-m", "stages.train_qlora"]
    done = subprocess.run(command, cwd=project.root, env=env, capture_output=True, text=True, timeout=400)
    return project, done


def test_two_gloo_processes_train_on_different_halves_of_the_data(two_process_run):
    project, done = two_process_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "accelerate.commands.launch --multi_gpu" in done.stdout
    metrics = json.loads(project.train_metrics.read_text())
    processes = metrics["processes"]
    assert processes["world_size"] == 2 and processes["backend"] == "gloo"
    assert processes["effective_batch_size"] == 8  # batch 4 x grad_accum 1 x 2 processes
    assert metrics["steps"] == 6  # 48 examples / 8 per step, one epoch
    first, second = processes["ranks"]["0"], processes["ranks"]["1"]
    assert first["distinct_examples"] == second["distinct_examples"] == 24  # each rank half of the 48
    assert first["examples_sha256"] != second["examples_sha256"]
    assert processes["examples_on_several_ranks"] == 0
    assert first["tokens"] + second["tokens"] == metrics["tokens_seen"]  # the Trainer's count, summed over ranks
    print(f"2 processes: {metrics['train_seconds']} s training, val loss {metrics['val_loss']:.4f}")


def test_the_adapter_and_outputs_are_written_once(two_process_run, pipeline_project):
    from safetensors import safe_open

    project, done = two_process_run
    assert done.stdout.count("adapter: ") == 1  # printed by the one writer, after writing
    assert done.stdout.count("rank 1 of 2 trained on 24 examples") == 1

    def tensor_names(adapter):
        with safe_open(adapter / "adapter_model.safetensors", "pt") as weights:
            return sorted(weights.keys())

    assert tensor_names(project.adapter) == tensor_names(pipeline_project[0].adapter)  # as one process saves
    assert sorted(p.name for p in project.adapter.parent.iterdir()) == ["adapter", "base"]  # no leftovers
    samples = read_jsonl(project.train_samples)
    assert [s["step"] for s in samples] == [3, 6]  # one prompt per evaluation, not one per process
    assert not project.train_scratch.exists()
    assert done.stdout.count("step     3/6 | val loss") == 1


def test_launcher_settings_are_checked_by_name():
    assert params_from_dict({}).train.launcher == "single"
    with pytest.raises(ConfigError, match=r"train\.launcher: expected one of \['single', 'accelerate'\]"):
        params_from_dict({"train": {"launcher": "torchrun"}})
    with pytest.raises(ConfigError, match=r"train\.num_processes: expected a number of at least 1, got 0"):
        params_from_dict({"train": {"num_processes": 0}})
    with pytest.raises(ConfigError, match=r"train\.accelerate_config: expected an accelerate config file"):
        params_from_dict({"train": {"accelerate_config": "configs/accelerate"}})


def test_command_line_without_and_with_a_config_file(tmp_path):
    cfg = TrainConfig(launcher="accelerate", num_processes=3)
    command = launcher.launch_command(cfg, "stages.train_qlora", None)
    assert command[:3] == [sys.executable, "-m", "accelerate.commands.launch"]
    assert command[3:] == [
        *("--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"),
        *("--main_process_port", "0", "--num_processes", "3", "-m", "stages.train_qlora"),
    ]
    config = tmp_path / "ddp.yaml"
    command = launcher.launch_command(cfg, "stages.train_qlora", config)
    assert command[3:] == ["--config_file", str(config), "--num_processes", "3", "-m", "stages.train_qlora"]


@pytest.mark.parametrize("name", ["ddp.yaml", "fsdp_qlora.yaml"])
def test_shipped_config_files_are_valid_for_accelerate(name):
    from accelerate.commands.config.config_args import load_config_from_file

    settings = load_config_from_file(str(REPO_ROOT / "configs" / "accelerate" / name))
    assert settings.distributed_type in ("MULTI_GPU", "FSDP") and settings.mixed_precision == "no"


def test_config_file_problems_name_the_key(tmp_path):
    missing = TrainConfig(launcher="accelerate", accelerate_config="configs/none.yaml")
    with pytest.raises(launcher.StageError, match=r"train\.accelerate_config: .*none\.yaml not found"):
        launcher.config_file(missing, tmp_path)
    if not launcher.cuda_available():
        fsdp = TrainConfig(launcher="accelerate", accelerate_config="configs/accelerate/fsdp_qlora.yaml")
        with pytest.raises(launcher.StageError, match=r"train\.accelerate_config: .*FSDP.*CUDA GPUs only"):
            launcher.config_file(fsdp, REPO_ROOT)


def test_no_relaunch_for_single_a_flag_or_a_launched_process(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("train:\n  launcher: single\n")
    assert launcher.relaunch("train_qlora", []) is None
    (tmp_path / "params.yaml").write_text("train:\n  launcher: accelerate\n  accelerate_config: gone.yaml\n")
    assert launcher.relaunch("train_qlora", ["--plan"]) is None
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert launcher.relaunch("train_qlora", []) is None
    monkeypatch.delenv("LOCAL_RANK")
    assert launcher.relaunch("train_qlora", []) == 1
    assert "[train_qlora] error: train.accelerate_config:" in capsys.readouterr().err
    assert launcher.exit_code(-9) == 137 and launcher.exit_code(3) == 3


RANK_SCRIPT = """
import os, signal, sys, time
if os.environ["RANK"] == "1":
    {action}
time.sleep(2)
"""


@pytest.mark.parametrize(
    ("action", "expected", "said"),
    [
        ("os.kill(os.getpid(), signal.SIGKILL)", 75, "was killed by signal 9, which may pass: exiting 75"),
        ("sys.exit(75)", 75, "exited 75 (an OS error), which may pass: exiting 75"),
        ("sys.exit(2)", 1, None),  # bad input or params: failing again would fail the same way
    ],
)
def test_a_rank_that_dies_makes_the_stage_transient_only_when_a_retry_may_pass(tmp_path, capfd, action, expected, said):
    (tmp_path / "rank_ends.py").write_text(RANK_SCRIPT.format(action=action))
    command = launcher.launch_command(TrainConfig(launcher="accelerate", num_processes=2), "rank_ends", None)
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "OMP_NUM_THREADS": "1"}
    assert launcher.run_launcher(command, env) == expected
    err = capfd.readouterr().err
    assert "Root Cause (first observed failure)" in err  # torchrun's summary still reaches the log
    assert (said in err) if said else ("which may pass" not in err)


def test_no_failure_summary_means_no_root_cause():
    assert launcher.root_cause_exit("Traceback ...\nValueError: bad row\n") is None
    assert launcher.root_cause_exit("Root Cause (first observed failure):\n[0]:\n  exitcode  : -9 (pid: 1)") == -9
