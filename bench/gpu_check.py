"""GPU check: the gpu-marked tests, then QLoRA training speed at two shapes, in one command for a CUDA machine.

1. `pytest -m gpu` (tests/training/test_gpu.py: paged AdamW and bf16 on CUDA, the merge check, FSDP-QLoRA);
2. for each shape, a randomly initialised Llama built in code (nothing downloaded; bench/memory.py's lazily
   drawn weights, loaded in 4-bit NF4 as the stage loads its base), the LoRA of params.yaml attached, and
   `--steps` AdamW steps on batches of `train.batch_size` rows of `prompt.max_length` random token ids after
   `WARMUP_STEPS` untimed ones. Shapes: `135m` (SmolLM2-135M's blocks) and `1b` (bench/memory.py's LLAMA_1B),
   both with an untied lm_head as the random weights draw it, and `tiny` (two small layers, to try the script
   on a CPU).

Prints per shape: trained tokens per second, seconds per step, the peak of allocated CUDA memory while training
(and while loading), and model-FLOPs utilisation: FLOPs per token from the planner (4 N + 12 L d T,
stages/training/planner.py) times tokens per second, over the GPU's dense bf16 peak (`PEAK_BF16_TFLOPS`, by
device name; `--peak-tflops` for another card). Writes bench/results/gpu_check.json with the device and
versions. Meant to take well under ten minutes on one H100.

Run: `python -m bench.gpu_check` (or `make gpu-check`); `--allow-cpu --shapes tiny --skip-tests` tries it on a CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import subprocess
import sys
import time
from pathlib import Path

from bench.machine import describe, machine
from bench.memory import LLAMA_1B, SYNTHETIC_VOCAB, random_base, synthetic_batches
from stages.common.io import write_json

RESULTS = Path(__file__).resolve().parent / "results" / "gpu_check.json"
SHAPES = {
    "tiny": {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "tie_word_embeddings": False, "vocab_size": 1024},
    "135m": {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
             "num_key_value_heads": 3, "tie_word_embeddings": False, "vocab_size": 49152},
    "1b": {**LLAMA_1B, "vocab_size": SYNTHETIC_VOCAB},
}  # fmt: skip
DEFAULT_SHAPES = ("135m", "1b")
DEFAULT_STEPS = 20
WARMUP_STEPS = 3  # kernels compile and the allocator settles before the clock starts
# Dense bf16 tensor-core peaks from NVIDIA's data sheets, in TFLOP/s, by a name torch reports; the first match
# counts, so the more specific names come first.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0),
    ("H100", 989.4),
    ("H200", 989.4),
    ("A100", 312.0),
    ("L40S", 362.1),
    ("L4", 121.0),
)


def device_peak_tflops(name: str, given: float | None) -> float | None:
    """The dense bf16 peak of the device named `name` (None when unknown), or `given`."""
    if given:
        return given
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def gpu_tests() -> int:
    """`pytest -m gpu` in a process of its own; its exit code."""
    print("== pytest -m gpu", flush=True)
    return subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q"]).returncode


def train_shape(shape: str, steps: int, params) -> dict:
    """Train `shape` for WARMUP_STEPS + `steps` steps; its speed, memory and the planner's FLOPs per token."""
    import torch
    from transformers import LlamaConfig

    from stages.common.modeling import device
    from stages.train_qlora import attach_lora
    from stages.training.batching import labelled_loss
    from stages.training.planner import plan_for_config

    config = LlamaConfig(**SHAPES[shape])
    cuda = device() == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    base = random_base(config, params.quantization, params.train.seed)
    load_seconds = time.perf_counter() - started
    load_peak = torch.cuda.max_memory_allocated() if cuda else None
    model = attach_lora(base, params.lora, params.train.gradient_checkpointing)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=params.train.learning_rate)
    batches = synthetic_batches(params, WARMUP_STEPS + steps, config.vocab_size)
    place = device()
    on_device = [{key: v.to(place) if hasattr(v, "to") else v for key, v in batch.items()} for batch in batches]
    loss = float("nan")
    for index, batch in enumerate(on_device):
        if index == WARMUP_STEPS:
            if cuda:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            timed_from = time.perf_counter()
        labels = batch.pop("labels")
        step_loss = labelled_loss(model(**batch), labels)
        step_loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        loss = step_loss.item()  # synchronises, so the clock below sees finished steps
    seconds = time.perf_counter() - timed_from
    rows, length = batches[0]["input_ids"].shape
    plan = plan_for_config(config, params, f"the {shape} shape")
    return {
        "shape": shape,
        "parameters": plan.base_parameters,
        "trainable": plan.trainable,
        "steps": steps,
        "tokens_per_step": rows * length,
        "tokens_per_second": round(steps * rows * length / seconds, 1),
        "seconds_per_step": round(seconds / steps, 4),
        "load_seconds": round(load_seconds, 1),
        "training_peak_memory_gb": round(torch.cuda.max_memory_allocated() / 1e9, 3) if cuda else None,
        "loading_peak_memory_gb": round(load_peak / 1e9, 3) if cuda else None,
        "flops_per_token": plan.training_flops_per_token(length),
        "last_loss": round(loss, 4),
    }


def table(rows: list[dict], peak_tflops: float | None) -> str:
    lines = [
        f"{'shape':>6} {'params':>14} {'tok/s':>10} {'s/step':>8} {'peak GB':>8} {'load GB':>8} {'TFLOP/s':>8} "
        f"{'MFU':>7}"
    ]
    for r in rows:
        tflops = r["flops_per_token"] * r["tokens_per_second"] / 1e12
        mfu = f"{tflops / peak_tflops:.1%}" if peak_tflops else "n/a"
        peak = f"{r['training_peak_memory_gb']:.2f}" if r["training_peak_memory_gb"] is not None else "n/a"
        load = f"{r['loading_peak_memory_gb']:.2f}" if r["loading_peak_memory_gb"] is not None else "n/a"
        lines.append(
            f"{r['shape']:>6} {r['parameters']:>14,} {r['tokens_per_second']:>10,.0f} {r['seconds_per_step']:>8.3f} "
            f"{peak:>8} {load:>8} {tflops:>8.2f} {mfu:>7}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", choices=tuple(SHAPES), default=list(DEFAULT_SHAPES))
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS, help=f"timed steps per shape ({DEFAULT_STEPS})")
    parser.add_argument("--skip-tests", action="store_true", help="leave out `pytest -m gpu`")
    parser.add_argument("--allow-cpu", action="store_true", help="run without CUDA (to try the script)")
    parser.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak, for a card not listed")
    parser.add_argument("--output", type=Path, default=RESULTS, help="where the JSON goes")
    args = parser.parse_args(argv)
    import torch

    from stages.common.config import load_params

    if not torch.cuda.is_available() and not args.allow_cpu:
        print("gpu-check needs a CUDA device (torch.cuda.is_available() is False); --allow-cpu tries it on the CPU")
        return 1
    name = torch.cuda.get_device_name() if torch.cuda.is_available() else f"CPU: {describe(machine())}"
    peak_tflops = device_peak_tflops(name, args.peak_tflops) if torch.cuda.is_available() else None
    print(f"device: {name}; torch {torch.__version__}; dense bf16 peak: {peak_tflops or 'unknown'} TFLOP/s")
    tests = None if args.skip_tests else gpu_tests()
    params = load_params("params.yaml")
    params = dataclasses.replace(params, train=dataclasses.replace(params.train, gradient_checkpointing=False))
    rows = []
    for shape in args.shapes:
        print(f"== training {shape}: {WARMUP_STEPS} + {args.steps} steps", flush=True)
        rows.append(train_shape(shape, args.steps, params))
    print(table(rows, peak_tflops))
    result = {"device": name, "torch": torch.__version__, "peak_bf16_tflops": peak_tflops, "machine": machine()}
    result |= {"gpu_tests_exit_code": tests, "shapes": rows}
    write_json(args.output, result)
    print(f"wrote {args.output}")
    return 1 if tests else 0


if __name__ == "__main__":
    raise SystemExit(main())
