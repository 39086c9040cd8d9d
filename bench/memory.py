"""Benchmark: peak resident memory of QLoRA (4-bit NF4 base) against LoRA on the unquantized base.

Each mode runs in its own process (peak RSS is per process): load the base from models/base, attach the
same LoRA adapters (params `lora`), and take `--steps` AdamW steps on batches of `train.batch_size`
examples from data/tokenized/train with train_qlora's batches and loss. Needs a finished pipeline
(`make demo`). Prints, per mode, peak RSS, the peak above the resident memory right after the imports
(Python, torch and the libraries: the same in both modes, and most of a 135M model's total), the RSS after
loading and training, the base's parameter bytes, seconds per step and the last loss, then both QLoRA/LoRA
ratios; writes bench/results/memory.json.

Run: `python -m bench.memory [--steps 5]` (or `make bench-memory`).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "memory.json"
MODES = ("qlora", "lora")


def current_rss_mb() -> float:
    """This process's resident memory now (VmRSS), in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def measure(mode: str, steps: int) -> dict:
    """Train `steps` steps in this process with a 4-bit (qlora) or full-precision (lora) base, through the
    stage's own batches and loss (stages/training/batching.py)."""
    import bitsandbytes  # noqa: F401  (imported before the baseline reading, as every library below)
    import peft  # noqa: F401
    import torch
    import transformers  # noqa: F401
    from datasets import load_from_disk

    from stages.common.config import load_params
    from stages.common.modeling import load_base, load_tokenizer, set_threads
    from stages.common.paths import Paths
    from stages.train_qlora import attach_lora
    from stages.training.batching import labelled_loss, training_collator

    imports_rss = current_rss_mb()  # Python, torch, transformers, peft, bitsandbytes: the same in both modes
    paths = Paths.at(".")
    params = load_params(paths.params)
    set_threads(params.train.threads)
    torch.manual_seed(params.train.seed)
    quantization = dataclasses.replace(params.quantization, load_in_4bit=mode == "qlora")
    base = load_base(paths.base_model, quantization)
    base_bytes = sum(t.numel() * t.element_size() for t in [*base.parameters(), *base.buffers()])
    gc.collect()
    loaded_rss, load_peak = current_rss_mb(), peak_rss_mb()
    model = attach_lora(base, params.lora, params.train.gradient_checkpointing)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=params.train.learning_rate)
    collate = training_collator(load_tokenizer(paths.base_model), params.train.padding_free)
    rows = load_from_disk(str(paths.tokenized))["train"]
    size = params.train.batch_size
    started, loss = time.perf_counter(), float("nan")
    for step in range(steps):
        batch = collate([rows[i] for i in range(step * size, (step + 1) * size)])
        labels = batch.pop("labels")
        loss = labelled_loss(model(**batch), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        loss = loss.item()
    peak = peak_rss_mb()
    return {
        "mode": mode,
        "peak_rss_mb": peak,
        "peak_above_imports_mb": round(peak - imports_rss, 1),
        "rss_after_imports_mb": imports_rss,
        "peak_rss_while_loading_mb": load_peak,
        "rss_after_load_mb": loaded_rss,
        "rss_after_training_mb": current_rss_mb(),
        "base_parameter_mb": round(base_bytes / 2**20, 1),
        "seconds_per_step": round((time.perf_counter() - started) / steps, 2),
        "last_loss": round(loss, 4),
    }


def peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: KiB


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5, help="training steps per mode (default 5)")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)  # internal: measure one mode
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child, args.steps)))
        return 0
    results = {}
    for mode in MODES:
        done = subprocess.run(
            [sys.executable, "-m", "bench.memory", "--child", mode, "--steps", str(args.steps)],
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr)
            return done.returncode
        results[mode] = json.loads(done.stdout.strip().splitlines()[-1])
    ratio = results["qlora"]["peak_rss_mb"] / results["lora"]["peak_rss_mb"]
    above = results["qlora"]["peak_above_imports_mb"] / results["lora"]["peak_above_imports_mb"]
    columns = {
        "peak_rss_mb": "peak RSS",
        "peak_above_imports_mb": "above imports",
        "rss_after_imports_mb": "imports",
        "peak_rss_while_loading_mb": "load peak",
        "rss_after_load_mb": "after load",
        "rss_after_training_mb": "after train",
        "base_parameter_mb": "base",
        "seconds_per_step": "s/step",
        "last_loss": "last loss",
    }
    print(f"\n{'mode':<6} " + " ".join(f"{title:>13}" for title in columns.values()) + "   (memory in MiB)")
    for mode, r in results.items():
        print(f"{mode:<6} " + " ".join(f"{r[c]:>13.2f}" for c in columns))
    print(f"QLoRA / LoRA peak RSS: {ratio:.2f}; peak above the imports (what loading and training add): {above:.2f}")
    from stages.common.io import write_json

    write_json(
        RESULTS,
        {
            "steps": args.steps,
            "results": results,
            "qlora_over_lora_peak_rss": round(ratio, 3),
            "qlora_over_lora_peak_above_imports": round(above, 3),
        },
    )
    print(f"written to {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
