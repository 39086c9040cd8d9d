"""On a CUDA device (marked `gpu`; skipped without one): the stages' own code trains QLoRA with paged AdamW and
bf16 autocast, export_hub's merge check passes, and the stage trains under FSDP with its 4-bit weights sharded,
on a small random Llama.

Run them alone with `pytest -m gpu`; they need no download.
"""

import csv
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from stages import base_model, evaluate_adapter, export_hub, split_data, tokenize_data, train_qlora
from stages.common.config import load_params
from stages.common.paths import Paths
from stages.training import launcher
from tests.conftest import REPO_ROOT, save_random_llama, write_project
from tests.test_train_qlora import copy_inputs

pytestmark = pytest.mark.gpu

# Bigger than the CPU tests' tiny Llama, so the 4-bit CUDA kernels see matrices of a few blocks a side.
SMALL_LLAMA = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
}


def train_small_llama(root):
    """A project in `root` on SMALL_LLAMA, run from base_model to train_qlora with the default quantization and
    optimizer ("auto"): (paths, params, the TrainingArguments train_qlora built, the metrics it wrote)."""
    write_project(root, save_random_llama(root / "small-llama", SMALL_LLAMA))
    paths = Paths.at(root)
    params = load_params(paths.params)
    built, build = [], train_qlora.training_arguments

    def recorded(*args, **kwargs):
        built.append(build(*args, **kwargs))
        return built[-1]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_qlora, "training_arguments", recorded)
        for stage in (base_model, split_data, tokenize_data, train_qlora):
            stage.run(params, paths)
    return paths, params, built[0], json.loads(paths.train_metrics.read_text())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return train_small_llama(tmp_path_factory.mktemp("gpu-project"))


def test_qlora_trains_on_cuda_with_paged_adamw_and_bf16(trained):
    paths, _, args, metrics = trained
    assert not args.use_cpu and args.bf16 and not args.fp16  # auto: bfloat16 compute, autocast to it
    assert args.optim == "paged_adamw_32bit" == metrics["optimizer"]
    losses = [float(r["train_loss"]) for r in csv.DictReader(paths.loss_plot.open()) if r["train_loss"]]
    assert losses[-1] < losses[0]
    assert (paths.adapter / "adapter_model.safetensors").stat().st_size > 0
    assert (paths.adapter / "adapter_config.json").is_file()


def test_merged_model_agrees_with_the_adapter_on_cuda(trained):
    """export_hub's merge check, in bfloat16 on CUDA: the adapter merged into the dequantized base answers the
    first test items as evaluate_adapter's 4-bit model did, within export.merge_tolerance."""
    paths, params, _, _ = trained
    evaluate_adapter.run(params, paths)
    merged = dataclasses.replace(params, export=dataclasses.replace(params.export, merge=True))
    export_hub.run(merged, paths)  # raises StageError when the merged model disagrees
    check = json.loads((paths.export / "merge_check.json").read_text())
    assert check["items"] == params.export.merge_check_items
    assert check["max_relative_price_difference"] <= params.export.merge_tolerance
    assert (paths.export / "merged" / "model.safetensors").is_file()


def test_the_stage_trains_under_fsdp_with_its_4_bit_weights_sharded(trained, tmp_path):
    """The unchanged stage command with configs/accelerate/fsdp_qlora.yaml in one process (FSDP wraps the model
    as it would across several GPUs, one shard per parameter): accelerate leaves no 4-bit weight out of
    sharding, and the gathered adapter holds the tensors a plain run saves."""
    from safetensors import safe_open

    paths, _, _, _ = trained
    project = copy_inputs(paths, tmp_path)
    shutil.copytree(REPO_ROOT / "configs", tmp_path / "configs")
    raw = yaml.safe_load(project.params.read_text())
    raw["train"].update(
        launcher="accelerate",
        num_processes=1,
        accelerate_config="configs/accelerate/fsdp_qlora.yaml",
        sample_prompts=1,
    )
    project.params.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "TQDM_DISABLE": "1"}
    for name in (
        "LOCAL_RANK",
        "RANK",
        "WORLD_SIZE",
        "MLFLOW_RUN_ID",
        "ACCELERATE_USE_FSDP",
        launcher.LAUNCHED_VARIABLE,
    ):
        env.pop(name, None)
    command = [sys.executable, "-m", "stages.train_qlora"]
    done = subprocess.run(command, cwd=project.root, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "--config_file" in done.stdout and "fsdp_qlora.yaml" in done.stdout
    assert "non-floating frozen Params4bit" not in done.stderr  # accelerate's warning when it leaves them whole
    assert math.isfinite(json.loads(project.train_metrics.read_text())["val_loss"])

    def tensor_names(adapter):
        with safe_open(adapter / "adapter_model.safetensors", "pt") as weights:
            return sorted(weights.keys())

    assert tensor_names(project.adapter) == tensor_names(paths.adapter)
