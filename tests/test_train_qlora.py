"""train_qlora: a 4-bit base with LoRA trains, writes the adapter and curves, and repeats exactly; it shows
each evaluation, stops early and on a NaN, streams to MLflow, and resumes after a SIGKILL."""

import csv
import dataclasses
import json
import shutil

import pytest

from stages import train_qlora
from stages.common.config import params_from_dict
from stages.common.io import read_jsonl
from stages.common.paths import Paths
from tests.conftest import REPO_ROOT


def copy_inputs(paths: Paths, root) -> Paths:
    """A second project at `root` with the pipeline project's base model and tokenized data."""
    for folder in ("models/base", "data/tokenized"):
        shutil.copytree(paths.root / folder, root / folder)
    shutil.copy(paths.params, root / "params.yaml")
    return Paths.at(root)


def with_train(params, **changes):
    return dataclasses.replace(params, train=dataclasses.replace(params.train, **changes))


def adapter_weights(paths: Paths) -> dict:
    from safetensors.torch import load_file

    return load_file(paths.adapter / "adapter_model.safetensors")


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
    assert metrics["resumed_from_step"] == 0 and metrics["optimizer"] == "adamw_torch"
    assert not paths.train_scratch.exists()  # checkpoints are removed once the stage completes


def test_loss_curve_has_training_and_validation_points(pipeline_project):
    paths, _, _ = pipeline_project
    rows = list(csv.DictReader(paths.loss_plot.open()))
    assert sum(1 for r in rows if r["train_loss"]) >= 5
    assert sum(1 for r in rows if r["val_loss"]) >= 2
    first, last = next(r for r in rows if r["train_loss"]), [r for r in rows if r["train_loss"]][-1]
    assert float(last["train_loss"]) < float(first["train_loss"])  # it learns the format
    assert all(float(r["tokens_per_second"]) > 0 and int(r["tokens_seen"]) > 0 for r in rows if r["val_loss"])
    assert paths.loss_chart.stat().st_size > 0


def test_each_evaluation_writes_samples_of_fixed_validation_prompts(pipeline_project):
    paths, params, _ = pipeline_project
    samples = read_jsonl(paths.train_samples)
    evaluations = [6, 12]  # eval_steps 6 over 12 steps
    assert [s["step"] for s in samples] == [step for step in evaluations for _ in range(params.train.sample_prompts)]
    first = [s for s in samples if s["step"] == 6]
    assert [s["prompt"] for s in first] == [s["prompt"] for s in samples if s["step"] == 12]
    assert all(s["prompt"].endswith("Price is $") and s["truth"].endswith(".00") for s in samples)


def test_base_is_loaded_in_4_bit(pipeline_project):
    import bitsandbytes as bnb

    from stages.common.modeling import load_base

    paths, params, _ = pipeline_project
    model = load_base(paths.base_model, params.quantization)
    layer = model.model.layers[0].self_attn.q_proj
    assert isinstance(layer, bnb.nn.Linear4bit)
    assert layer.weight.quant_state.quant_type == "nf4"


def test_same_seed_gives_the_same_adapter_and_prints_each_evaluation(pipeline_project, tmp_path, capsys):
    paths, params, _ = pipeline_project
    again = copy_inputs(paths, tmp_path)
    train_qlora.run(params, again)
    first, second = adapter_weights(paths), adapter_weights(again)
    assert first.keys() == second.keys()
    assert all((first[k] == second[k]).all() for k in first)
    out = capsys.readouterr().out
    for step in (6, 12):
        assert f"step {step:>5}/12 | val loss " in out
        assert f"samples at step {step}:" in out
    assert "tokens/s" in out and "grad norm" in out


def test_non_finite_loss_stops_training_at_that_step(pipeline_project, tmp_path, monkeypatch):
    from transformers import Trainer

    paths, params, _ = pipeline_project
    fresh = copy_inputs(paths, tmp_path)
    original = Trainer.compute_loss
    training_calls = []

    def loss_turning_nan_at_step_3(self, model, inputs, *args, **kwargs):
        loss = original(self, model, inputs, *args, **kwargs)
        if model.training:
            training_calls.append(1)
            if len(training_calls) == 3:  # batch 4, no accumulation: the third call is optimizer step 3
                return loss * float("nan")
        return loss

    monkeypatch.setattr(Trainer, "compute_loss", loss_turning_nan_at_step_3)
    with pytest.raises(train_qlora.StageError, match=r"at step 3 \(learning rate [0-9.e-]+\)"):
        train_qlora.run(params, fresh)
    assert len(training_calls) == 3  # stopped there, not after training
    assert not fresh.adapter.exists() and not fresh.train_metrics.exists()


def test_huge_learning_rate_fails_with_the_step_and_writes_no_adapter(pipeline_project, tmp_path):
    paths, params, _ = pipeline_project
    fresh = copy_inputs(paths, tmp_path)
    with pytest.raises(train_qlora.StageError, match=r"non-finite .* at step \d+ \(learning rate"):
        train_qlora.run(with_train(params, learning_rate=1e30, max_grad_norm=0.0, warmup_ratio=0.0), fresh)
    assert not fresh.adapter.exists()


def test_early_stopping_keeps_the_best_checkpoint(pipeline_project, tmp_path):
    """A learning rate too high for 15 epochs on 48 examples: validation loss stops improving, training
    stops after one evaluation without improvement, and the adapter written is the best one's."""
    import torch
    from transformers import DataCollatorForSeq2Seq

    from stages.common.modeling import load_adapter_model, load_tokenizer

    paths, params, _ = pipeline_project
    fresh = copy_inputs(paths, tmp_path)
    changes = {"epochs": 15.0, "eval_steps": 4, "save_steps": 4, "learning_rate": 3e-2, "sample_prompts": 0}
    result = train_qlora.run(with_train(params, early_stopping_patience=1, **changes), fresh)
    metrics = json.loads(fresh.train_metrics.read_text())
    val_losses = [float(r["val_loss"]) for r in csv.DictReader(fresh.loss_plot.open()) if r["val_loss"]]
    assert result.stopped_early and metrics["steps"] < 180
    assert metrics["val_loss"] == min(val_losses) < metrics["last_val_loss"] == val_losses[-1]
    assert metrics["best_step"] == metrics["steps"] - 4
    # The written adapter is the best checkpoint's: its validation loss is the best one.
    from datasets import load_from_disk

    tokenizer = load_tokenizer(fresh.base_model)
    val = load_from_disk(str(fresh.tokenized))["val"]
    batch = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=-100)(list(val))
    model = load_adapter_model(fresh.base_model, fresh.adapter, params.quantization)
    with torch.no_grad():
        loss = model(**batch).loss.item()
    assert loss == pytest.approx(metrics["val_loss"], abs=1e-5)


def test_overfitting_is_named_when_validation_rises_while_training_falls():
    rows = [
        {"step": 10, "train_loss": 2.0, "val_loss": None},
        {"step": 10, "train_loss": None, "val_loss": 2.1},
        {"step": 20, "train_loss": 1.5, "val_loss": 1.9},
        {"step": 30, "train_loss": 1.1, "val_loss": 2.0},
    ]
    assert train_qlora.overfitting_note(rows) == (
        "overfitting: validation loss rose from 1.9000 (step 20) to 2.0000 (step 30) "
        "while training loss fell from 1.5000 to 1.1000"
    )
    assert train_qlora.overfitting_note(rows[:3]) is None


def test_paged_optimizer_on_cpu_falls_back_with_a_note():
    used, note = train_qlora.choose_optimizer("paged_adamw_8bit")
    assert used == "adamw_bnb_8bit" and "cannot run on a CPU" in note and "using adamw_bnb_8bit" in note
    assert train_qlora.choose_optimizer("adamw_torch") == ("adamw_torch", None)


def test_auto_optimizer_is_paged_adamw_on_cuda_and_torch_adamw_on_a_cpu(monkeypatch):
    monkeypatch.setattr(train_qlora, "device", lambda: "cuda")
    assert train_qlora.choose_optimizer("auto") == ("paged_adamw_32bit", None)
    assert train_qlora.choose_optimizer("paged_adamw_8bit") == ("paged_adamw_8bit", None)  # no fallback on CUDA
    monkeypatch.setattr(train_qlora, "device", lambda: "cpu")
    assert train_qlora.choose_optimizer("auto") == ("adamw_torch", None)


@pytest.mark.parametrize(
    ("device", "dtype", "fast_bf16", "expected"),
    [
        ("cuda", "bfloat16", False, "bf16"),  # "auto" on CUDA
        ("cuda", "float16", False, "fp16"),
        ("cuda", "float32", False, None),
        ("cpu", "float32", True, None),  # "auto" on a CPU
        ("cpu", "bfloat16", True, "bf16"),  # asked for by name, on a CPU with AMX-BF16
        ("cpu", "bfloat16", False, None),  # emulated: autocast would only slow it down
        ("cpu", "float16", True, None),
    ],
)
def test_trainer_autocasts_to_the_compute_dtype_where_the_hardware_has_it(device, dtype, fast_bf16, expected):
    import torch

    flags = train_qlora.trainer_precision(device, getattr(torch, dtype), fast_bf16)
    assert flags == {"bf16": expected == "bf16", "fp16": expected == "fp16"}


def test_training_arguments_carry_the_precision_flags(tmp_path):
    cfg = params_from_dict({}).train
    args = train_qlora.training_arguments(cfg, tmp_path, "adamw_torch", "cosine", 0.1, {"bf16": True, "fp16": False})
    assert args.bf16 and not args.fp16 and args.use_cpu  # bf16 autocast on a CPU: what AMX-BF16 gets


def test_under_fsdp_the_base_loads_with_4_bit_weights_in_the_compute_dtype(tiny_model_dir, tmp_path, monkeypatch):
    import bitsandbytes as bnb
    import torch

    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "base").symlink_to(tiny_model_dir)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # as `accelerate launch` sets it for an FSDP config
    _, model = train_qlora.prepare_model(params_from_dict({}), Paths.at(tmp_path))
    weights = [m.weight for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert weights and {w.dtype for w in weights} == {torch.float32}  # "auto" on a CPU: float32, not uint8


def test_constant_schedule_with_warmup_becomes_constant_with_warmup():
    cfg = params_from_dict({"train": {"lr_scheduler": "constant", "warmup_steps": 5}}).train
    scheduler, warmup, note = train_qlora.choose_schedule(cfg)
    assert (scheduler, warmup) == ("constant_with_warmup", 5) and "constant_with_warmup" in note


def test_metrics_stream_to_the_active_mlflow_run(pipeline_project, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    paths, params, _ = pipeline_project
    fresh = copy_inputs(paths, tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("watch", artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = client.create_run(experiment).info.run_id
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_RUN_ID", run_id)
    train_qlora.run(params, fresh)
    history = {
        key: client.get_metric_history(run_id, f"curves/{key}")
        for key in ("val_loss", "train_loss", "tokens_per_second")
    }
    assert [m.step for m in history["val_loss"]] == [6, 12]  # one point per evaluation
    assert len(history["train_loss"]) == 6 and all(m.value > 0 for m in history["tokens_per_second"])
    for key in ("learning_rate", "grad_norm", "tokens_seen"):
        assert len(client.get_metric_history(run_id, f"curves/{key}")) >= 2
    texts = {a.path for a in client.list_artifacts(run_id, "samples")}
    assert texts == {"samples/step_000006.txt", "samples/step_000012.txt"}
    assert [a.path for a in client.list_artifacts(run_id, "plots")] == ["plots/loss_curve.png"]
    assert client.get_run(run_id).info.status == "RUNNING"  # the stage neither starts nor ends runs


def test_failing_mlflow_logging_warns_once_and_training_goes_on(pipeline_project, tmp_path, monkeypatch, capsys):
    paths, params, _ = pipeline_project
    fresh = copy_inputs(paths, tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_RUN_ID", "0123456789abcdef")  # no such run: every log call fails
    train_qlora.run(params, fresh)
    assert capsys.readouterr().out.count("warning: MLflow logging") == 1
    assert (fresh.adapter / "adapter_model.safetensors").is_file()


def test_a_checkpoint_from_other_params_is_set_aside(pipeline_project, tmp_path, capsys):
    from stages.training.checkpoints import FINGERPRINT, fingerprint, prepare_scratch

    paths, params, _ = pipeline_project
    scratch = tmp_path / "train_qlora"
    (scratch / "checkpoint-6").mkdir(parents=True)
    (scratch / "checkpoint-6" / "trainer_state.json").write_text("{}")
    before = fingerprint(params, paths.tokenized, paths.base_model)
    (scratch / FINGERPRINT).write_text(json.dumps(before))
    assert prepare_scratch(scratch, before) == scratch / "checkpoint-6"
    after = fingerprint(with_train(params, learning_rate=1e-2), paths.tokenized, paths.base_model)
    assert after["params"] != before["params"] and after["tokenized_data"] == before["tokenized_data"]
    assert fingerprint(with_train(params, threads=1), paths.tokenized, paths.base_model) == before
    assert prepare_scratch(scratch, after) is None
    assert "trained from different params" in capsys.readouterr().out
    (aside,) = tmp_path.glob("train_qlora.set-aside-*")
    assert (aside / "checkpoint-6").is_dir() and not (scratch / "checkpoint-6").exists()


def test_the_accelerate_config_files_contents_are_part_of_the_fingerprint(pipeline_project, tmp_path):
    from stages.training.checkpoints import fingerprint

    paths, params, _ = pipeline_project
    (tmp_path / "ddp.yaml").write_text("distributed_type: MULTI_GPU\nnum_processes: 2\n")
    launched = with_train(params, launcher="accelerate", accelerate_config="ddp.yaml")
    before = fingerprint(launched, paths.tokenized, paths.base_model, tmp_path)
    (tmp_path / "ddp.yaml").write_text("distributed_type: MULTI_GPU\nnum_processes: 2\nmixed_precision: bf16\n")
    after = fingerprint(launched, paths.tokenized, paths.base_model, tmp_path)
    assert after["accelerate_config"] != before["accelerate_config"] and after["params"] == before["params"]
    assert "accelerate_config" not in fingerprint(params, paths.tokenized, paths.base_model, tmp_path)


def run_stage_process(root, log_name: str, **kwargs):
    """`python -m stages.train_qlora` in `root` as a child process, output to `root/<log_name>`."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "TQDM_DISABLE": "1"}
    log = (root / log_name).open("w")
    command = [sys.executable, "-m", "stages.train_qlora"]
    return subprocess.Popen(command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, **kwargs)


def test_sigkill_then_rerun_resumes_and_matches_an_uninterrupted_run(pipeline_project, tmp_path):
    """Kill the stage with SIGKILL once a checkpoint exists, run it again: it resumes from the checkpoint
    and ends with the adapter and validation loss of a run that was never interrupted."""
    import signal
    import time

    import yaml

    from stages.common.config import load_params
    from stages.training.checkpoints import complete_checkpoints

    paths, _, _ = pipeline_project
    projects = {}
    for name in ("killed", "straight"):
        projects[name] = copy_inputs(paths, tmp_path / name)
        raw = yaml.safe_load(projects[name].params.read_text())
        raw["train"].update(max_steps=40, save_steps=5, eval_steps=5, early_stopping_patience=3, sample_prompts=1)
        raw["lora"]["dropout"] = 0.1  # dropout draws random numbers: the RNG state must be restored too
        projects[name].params.write_text(yaml.safe_dump(raw))
    killed, straight = projects["killed"], projects["straight"]

    child = run_stage_process(killed.root, "first.log")
    deadline = time.monotonic() + 300
    while not complete_checkpoints(killed.train_scratch) and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL, (killed.root / "first.log").read_text()[-2000:]
    (checkpoint, *_) = reversed(complete_checkpoints(killed.train_scratch))
    assert not killed.adapter.exists() and int(checkpoint.name.split("-")[1]) < 40

    rerun = run_stage_process(killed.root, "rerun.log")
    assert rerun.wait(timeout=300) == 0, (killed.root / "rerun.log").read_text()[-2000:]
    assert "resuming from" in (killed.root / "rerun.log").read_text()
    train_qlora.run(load_params(straight.params), straight)

    resumed = json.loads(killed.train_metrics.read_text())
    uninterrupted = json.loads(straight.train_metrics.read_text())
    assert resumed["resumed_from_step"] >= 5 and resumed["steps"] == uninterrupted["steps"] == 40
    first, second = adapter_weights(killed), adapter_weights(straight)
    largest = max((first[k] - second[k]).abs().max().item() for k in first)
    print(
        f"resumed from step {resumed['resumed_from_step']}; largest adapter weight difference {largest:.3g}; "
        f"val loss {resumed['val_loss']!r} resumed, {uninterrupted['val_loss']!r} uninterrupted"
    )
    assert largest == 0.0  # measured: bit-identical on this CPU
    assert resumed["val_loss"] == uninterrupted["val_loss"]
    assert read_jsonl(killed.train_samples) == read_jsonl(straight.train_samples)  # none repeated or lost


LLAMA_31_8B = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "tie_word_embeddings": False,
}


def test_plan_for_llama_31_8b_from_its_config_alone(tmp_path, monkeypatch, capsys):
    (tmp_path / "llama").mkdir()
    (tmp_path / "llama" / "config.json").write_text(json.dumps(LLAMA_31_8B))  # no weights anywhere
    (tmp_path / "params.yaml").write_text("base_model:\n  source: llama\n")  # defaults: r=32 on q/k/v/o
    monkeypatch.chdir(tmp_path)
    assert train_qlora.main(["--plan"]) == 0
    out = capsys.readouterr().out
    assert "trainable parameters: 27,262,976" in out
    assert "adapter size: 109.1 MB in fp32, 54.5 MB in bf16" in out
    assert "q_proj           32    4096 -> 4096      262,144      8,388,608" in out
    assert "k_proj           32    4096 -> 1024      163,840      5,242,880" in out
    assert "16.06 GB in 16-bit" in out and "training FLOPs per token: 3.05e+10" in out


def test_plan_matches_what_training_counts(pipeline_project):
    from stages.training.planner import plan

    paths, params, _ = pipeline_project
    report = plan(params, paths)
    assert report.config_from == str(paths.root / "models" / "tiny-source" / "config.json")  # the local source
    assert report.trainable == json.loads(paths.train_metrics.read_text())["trainable_parameters"]


def test_unknown_flag_exits_2(capsys):
    assert train_qlora.main(["--bogus"]) == 2
    assert "usage: python -m stages.train_qlora [--plan]" in capsys.readouterr().err


def test_plan_for_the_embedded_model_reads_the_gguf_metadata(tmp_path, monkeypatch):
    from stages.common.config import load_params
    from stages.training.planner import plan

    shutil.copy(REPO_ROOT / "params.yaml", tmp_path / "params.yaml")  # embedded:smollm2, r=32 on q/k/v/o
    report = plan(load_params(tmp_path / "params.yaml"), Paths.at(tmp_path))  # no models/base here
    assert report.config_from.startswith("GGUF metadata of ")
    assert report.trainable == 3_686_400 and report.base_parameters == 134_515_008


def test_bf16_on_a_cpu_without_amx_is_kept_with_a_note(monkeypatch):
    monkeypatch.setattr(train_qlora, "fast_bf16_cpu", lambda: False)
    note = train_qlora.dtype_note(params_from_dict({"quantization": {"compute_dtype": "bfloat16"}}).quantization)
    assert "without AMX-BF16" in note and "kept as asked" in note
    assert train_qlora.dtype_note(params_from_dict({}).quantization) is None  # auto: float32 on a CPU
