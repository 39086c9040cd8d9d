"""train_qlora: a 4-bit base with LoRA trains, writes the adapter and curves, and repeats exactly."""

import json

import pytest

from stages import train_qlora
from stages.core.config import params_from_dict


def test_adapter_and_metrics_are_written(pipeline_project):
    paths, params, results = pipeline_project
    result = results["train_qlora"]
    assert (paths.adapter / "adapter_model.safetensors").is_file()
    config = json.loads((paths.adapter / "adapter_config.json").read_text())
    assert config["r"] == params.lora.r and set(config["target_modules"]) == set(params.lora.target_modules)
    metrics = json.loads(paths.train_metrics.read_text())
    assert metrics["steps"] == 12  # 48 examples / batch 4, one epoch
    assert metrics["trainable_parameters"] == result.trainable_parameters > 0
    assert metrics["tokens_seen"] > 0 and metrics["tokens_per_second"] > 0


def test_loss_curve_has_training_and_validation_points(pipeline_project):
    import csv

    paths, _, _ = pipeline_project
    rows = list(csv.DictReader(paths.loss_plot.open()))
    assert sum(1 for r in rows if r["train_loss"]) >= 5
    assert sum(1 for r in rows if r["val_loss"]) >= 2
    first, last = next(r for r in rows if r["train_loss"]), [r for r in rows if r["train_loss"]][-1]
    assert float(last["train_loss"]) < float(first["train_loss"])  # it learns the format
    assert paths.loss_chart.stat().st_size > 0


def test_base_is_loaded_in_4_bit(pipeline_project):
    import bitsandbytes as bnb

    from stages.core.modeling import load_base

    paths, params, _ = pipeline_project
    model = load_base(paths.base_model, params.quantization)
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, bnb.nn.Linear4bit)
    assert layer.weight.quant_state.quant_type == "nf4"


def test_same_seed_gives_the_same_adapter(pipeline_project, tmp_path):
    import shutil

    from safetensors.torch import load_file

    from stages.core.paths import Paths

    paths, params, _ = pipeline_project
    again = Paths.at(tmp_path)
    for folder in ("models/base", "data/tokenized"):
        shutil.copytree(paths.root / folder, tmp_path / folder)
    train_qlora.run(params, again)
    first = load_file(paths.adapter / "adapter_model.safetensors")
    second = load_file(again.adapter / "adapter_model.safetensors")
    assert first.keys() == second.keys()
    assert all((first[k] == second[k]).all() for k in first)


def test_paged_optimizer_on_cpu_is_refused_with_a_reason():
    cfg = params_from_dict({"train": {"optimizer": "paged_adamw_8bit"}}).train
    with pytest.raises(train_qlora.StageError, match="needs CUDA"):
        train_qlora.choose_optimizer(cfg.optimizer)
