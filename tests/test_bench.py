"""The benchmarks run: each side of bench/train_throughput.py on the tiny project, one optimizer step each; the
memory benchmark's 1B shape has the size it claims, and its random base loads as the stage loads a base.

Their figures are printed by `make bench` on the real model (docs/performance.md); here only that the code
works with the installed TRL and transformers, and that the figures mean what they say.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stages.common.io import read_jsonl
from tests.conftest import REPO_ROOT


def bench_child(root: Path, trainer: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "TQDM_DISABLE": "1"}
    command = [sys.executable, "-m", "bench.train_throughput", "--child", trainer, "--steps", "2"]
    done = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def bench_runs(pipeline_project) -> dict:
    paths, _, _ = pipeline_project
    return {trainer: bench_child(paths.root, trainer) for trainer in ("baseline", "careful", "project")}


def test_the_baseline_pads_every_sequence_to_max_length(bench_runs, pipeline_project):
    _, params, _ = pipeline_project
    baseline = bench_runs["baseline"]
    batch = params.train.batch_size
    assert baseline["computed_tokens"] == 2 * batch * params.prompt.max_length
    assert baseline["padding_fraction"] > 0.3  # tiny examples are ~65 tokens of 128


def test_the_project_computes_almost_no_padding_and_scores_the_same_validation_set(bench_runs):
    project, baseline = bench_runs["project"], bench_runs["baseline"]
    assert project["padding_fraction"] < 0.2 < baseline["padding_fraction"]
    assert project["computed_tokens"] < baseline["computed_tokens"]
    for run in (project, baseline):
        assert run["steps"] == 2 and run["useful_tokens"] > 0 and run["train_seconds"] > 0
        assert math.isfinite(run["val_loss"]) and run["peak_rss_mb"] > 0


def test_the_careful_peer_pads_each_batch_to_its_longest_example_only(bench_runs):
    careful, baseline = bench_runs["careful"], bench_runs["baseline"]
    assert careful["useful_tokens"] == baseline["useful_tokens"] == bench_runs["project"]["useful_tokens"]
    assert careful["computed_tokens"] < baseline["computed_tokens"]
    assert careful["padding_fraction"] < 0.2 and math.isfinite(careful["val_loss"])


def test_the_paired_loss_difference_and_the_roofs_are_figures_of_this_run():
    from bench.machine import fp32_flops_per_cycle, roof_summary
    from bench.train_throughput import paired_difference

    runs = [
        {"trainer": trainer, "seed": seed, "val_loss": loss}
        for seed, losses in ((1, (1.10, 1.00)), (2, (1.20, 1.05)), (3, (1.15, 1.05)))
        for trainer, loss in zip(("careful", "project"), losses, strict=True)
    ]
    difference = paired_difference(runs, "careful")
    assert difference["seeds"] == 3 and difference["mean"] == pytest.approx(0.11667, abs=1e-4)
    assert difference["low"] < difference["mean"] < difference["high"]  # t(2) = 4.30: a wide interval
    assert difference["high"] - difference["mean"] == pytest.approx(4.3027 * 0.02887 / 3**0.5, abs=1e-3)
    assert paired_difference(runs[:2], "careful") is None
    assert roof_summary([100.0, 120.0, 110.0]) == {
        "samples": [100.0, 120.0, 110.0],
        "median": 110.0,
        "min": 100.0,
        "max": 120.0,
    }
    zen4 = {"vendor_id": "AuthenticAMD", "cpu family": "25", "flags": "fma avx2 avx512f"}
    assert fp32_flops_per_cycle(zen4)[0] == 32
    assert fp32_flops_per_cycle({**zen4, "cpu family": "26"})[0] == 64
    assert (
        fp32_flops_per_cycle({"vendor_id": "GenuineIntel", "cpu family": "6", "flags": "fma avx2 avx512f amx_tile"})[0]
        == 64
    )
    assert fp32_flops_per_cycle({"vendor_id": "AuthenticAMD", "cpu family": "25", "flags": "fma avx2"})[0] == 32


def test_both_trainers_start_from_the_same_adapter_whatever_its_dtype(tiny_model_dir):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from bench.train_throughput import same_starting_adapter

    def adapted(seed: int):
        torch.manual_seed(seed)  # a different initialisation for each model
        base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        return get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))

    project, baseline = adapted(1), adapted(2)
    for weight in baseline.parameters():
        if weight.requires_grad:
            weight.data = weight.data.to(torch.bfloat16)  # as TRL keeps a quantized model's adapter
    same_starting_adapter(project, 42)
    same_starting_adapter(baseline, 42)
    lora = {name: weight for name, weight in baseline.named_parameters() if ".lora_" in name}
    assert len(lora) == 8
    for name, weight in project.named_parameters():
        if ".lora_A." in name:
            assert torch.equal(weight.to(torch.bfloat16), lora[name]) and weight.abs().sum() > 0
        elif ".lora_B." in name:
            assert not weight.any() and not lora[name].any()


@pytest.fixture(scope="module")
def noise_run(pipeline_project, tmp_path_factory) -> tuple[dict, str]:
    """bench/seed_noise.py on the tiny project: 2 seeds, 2 optimizer steps each."""
    paths, _, _ = pipeline_project
    output = tmp_path_factory.mktemp("noise") / "seed_noise.json"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "TQDM_DISABLE": "1"}
    env.pop("MLFLOW_RUN_ID", None)
    command = [sys.executable, "-m", "bench.seed_noise", "--seeds", "2", "--steps", "2", "--output", str(output)]
    done = subprocess.run(command, cwd=paths.root, env=env, capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(output.read_text()), done.stdout


def test_the_noise_benchmark_reports_the_spread_and_the_gate_on_every_pair(noise_run, pipeline_project):
    result, printed = noise_run
    paths, params, _ = pipeline_project
    assert [r["seed"] for r in result["runs"]] == [params.train.seed, params.train.seed + 1]
    assert all(r["steps"] == 2 for r in result["runs"])
    assert set(result["spread"]) == {"avg_error", "rmsle", "hit_rate", "val_loss"}
    pairs = {(d["candidate_seed"], d["champion_seed"]) for d in result["decisions"]}
    n_test = len(read_jsonl(paths.split("test")))
    assert pairs == {(42, 43), (43, 42)} and all(d["n_items"] == n_test for d in result["decisions"])
    assert result["machine"]["cores"] >= 1 and result["machine"]["cpu"]
    assert "seed pairs promoted" in printed
    assert not paths.train_scratch.exists()  # the workspace is untouched


def test_the_1b_shape_has_about_a_billion_parameters():
    from transformers import LlamaConfig

    from bench.memory import LLAMA_1B
    from stages.common.config import params_from_dict
    from stages.training.planner import plan_for_config

    # 16 layers x (q, o 2048x2048; k, v 2048x512; MLP 3 x 2048x8192; 2 norms) + embeddings and lm_head of 49,152
    # (SmolLM2's vocabulary) + the final norm.
    per_layer = 2 * 2048 * 2048 + 2 * 2048 * 512 + 3 * 2048 * 8192 + 2 * 2048
    report = plan_for_config(LlamaConfig(**LLAMA_1B, vocab_size=49_152), params_from_dict({}))
    assert report.base_parameters == 16 * per_layer + 2 * 49_152 * 2048 + 2048 == 1_174_472_704


def test_the_random_base_is_drawn_weight_by_weight_the_same_in_both_modes():
    import dataclasses

    import bitsandbytes as bnb
    import torch
    from transformers import LlamaConfig

    from bench.memory import random_base, random_weights
    from stages.common.config import params_from_dict

    shape = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 4, "num_key_value_heads": 2}
    config = LlamaConfig(**shape, num_hidden_layers=2, vocab_size=100, tie_word_embeddings=False)
    nf4 = params_from_dict({}).quantization
    qlora, lora = random_base(config, nf4, 42), random_base(config, dataclasses.replace(nf4, load_in_4bit=False), 42)
    draws = random_weights(config, 42)
    up = "model.layers.1.mlp.up_proj.weight"
    assert torch.equal(lora.get_parameter(up), draws[up][...])  # transformers loaded the draws themselves
    assert torch.equal(qlora.lm_head.weight, lora.lm_head.weight)  # lm_head stays in full precision
    quantized = qlora.get_parameter(up)
    assert isinstance(quantized, bnb.nn.Params4bit) and qlora.is_loaded_in_4bit
    dequantized = bnb.functional.dequantize_4bit(quantized.data, quantized.quant_state)
    assert (dequantized - draws[up][...]).abs().max() < 0.2 * draws[up][...].abs().max()  # NF4's rounding only


def test_the_retrain_schedule_delivers_every_diamond_once_in_the_shares_asked():
    from bench.retrain_schedule import deliveries, table

    parts = deliveries([0.8, 0.12, 0.08])
    assert [len(part) for part in parts] == [43_152, 6_473, 4_315]  # of 53,940
    assert sum(len(part) for part in parts) == 53_940 and deliveries([0.8, 0.12, 0.08])[2] == parts[2]  # seeded
    outcome = {
        "rows_in": 43_152, "test_items": 171, "test_kept": None, "test_added": None, "train_items": 600,
        "train_new": None, "compared_items": 171,
        "compared_with": "base model", "version": "1", "alias": "champion", "promoted": True, "seconds": 421.0,
    }  # fmt: skip
    lines = table([outcome, {**outcome, "test_kept": 171, "test_added": 25, "promoted": False, "alias": "challenger"}])
    first, second = lines.splitlines()[2:]
    assert " ".join(first.split()) == "1 43,152 171 - - 600 - 171 base model v1 champion 7 m 01 s"
    assert second.split()[3:5] == ["171", "25"] and "challenger" in second


def test_the_gpu_check_trains_and_reports_on_a_cpu_when_allowed(tmp_path, monkeypatch, capsys):
    from bench.gpu_check import device_peak_tflops, main

    monkeypatch.chdir(REPO_ROOT)  # the project's params.yaml; nothing is written there
    output = tmp_path / "gpu_check.json"
    assert main(["--allow-cpu", "--shapes", "tiny", "--skip-tests", "--steps", "2", "--output", str(output)]) == 0
    assert "tok/s" in capsys.readouterr().out
    result = json.loads(output.read_text())
    (row,) = result["shapes"]
    assert row["shape"] == "tiny" and row["tokens_per_second"] > 0 and row["flops_per_token"] > 0
    assert result["peak_bf16_tflops"] is None and result["gpu_tests_exit_code"] is None
    assert device_peak_tflops("NVIDIA H100 PCIe", None) == 756.0
    assert device_peak_tflops("NVIDIA H100 80GB HBM3", None) == 989.4
    assert device_peak_tflops("Some GPU", 100.0) == 100.0 and device_peak_tflops("Some GPU", None) is None
