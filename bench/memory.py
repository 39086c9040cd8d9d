"""Benchmark: peak resident memory of QLoRA (4-bit NF4 base) against LoRA on the unquantized (fp32) base.

Two shapes of base:

- `base` (the default): the model in models/base, on batches of data/tokenized/train. Needs a finished
  pipeline (`make demo`).
- `1b`: a randomly initialised Llama of about 1.2B parameters, built in code from `LLAMA_1B` (nothing is
  downloaded), where the weights rather than the libraries dominate memory. It trains on data/tokenized/train
  when data/tokenized and models/base exist (the vocabulary is then that tokenizer's), else on synthetic token
  ids of `prompt.max_length` tokens, every position labelled, with a vocabulary of `SYNTHETIC_VOCAB`.

The 1B base is never written to disk. `random_base` hands transformers a state dict whose entries are drawn
only when transformers reads them, through the same `from_pretrained` call and arguments as the stage
(stages/common/modeling.py). With 4 bits, transformers quantizes each weight as soon as it is read (it loads
one tensor at a time when it quantizes), so the QLoRA process holds at most one fp32 weight at a time (the
largest is an embedding) and its peak measures training, not loading. A checkpoint on disk would not
do that: its memory-mapped pages stay resident until the load ends. Each weight has its own seed, so both
modes train the same weights.

Each mode runs in its own process (peak RSS is per process): load the base, attach the same LoRA adapters
(params `lora`), and take `--steps` AdamW steps on the same batches of `train.batch_size` rows, with
train_qlora's batches and loss. Prints, per mode: peak RSS (loading or training, whichever is higher); the
peak of the training steps alone (the peak is reset once the model is ready); the planner's estimate of that
for the same batches (`Plan.peak_memory` in stages/training/planner.py); the peak above the RSS right after
the imports (Python, torch and the libraries, the same in both modes); the peak while loading; the RSS after
loading and training; the base's parameter bytes; seconds per step; the last loss. Then the QLoRA/LoRA ratios
and each estimate part by part. Writes bench/results/memory.json (`base`) or bench/results/memory-1b.json (`1b`),
with the machine.

Run: `python -m bench.memory [--shape base|1b] [--steps N]` (or `make bench-memory`, `make bench-memory-1b`).
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
RESULT_FILES = {"base": RESULTS / "memory.json", "1b": RESULTS / "memory-1b.json"}
DEFAULT_STEPS = {"base": 5, "1b": 3}  # a 1B step takes tens of seconds on 2 cores
MODES = ("qlora", "lora")
# Llama 3.2 1B's block shape (grouped-query attention, 4 query heads per key/value head) with 16 layers and an
# untied lm_head, as Llama 2 and 3.1 have: ~1.2B parameters with SmolLM2's 49,152-entry vocabulary.
LLAMA_1B = {
    "hidden_size": 2048,
    "intermediate_size": 8192,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "tie_word_embeddings": False,
}
SYNTHETIC_VOCAB = 32_000  # Llama 2's vocabulary, when no tokenizer fixes the ids


def status_mb(field: str) -> float:
    """A memory figure of this process from /proc/self/status, in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def current_rss_mb() -> float:
    """This process's resident memory now (VmRSS), in MiB."""
    return status_mb("VmRSS")


def peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM) since it started or since `reset_peak_rss`, in MiB."""
    return status_mb("VmHWM")


def reset_peak_rss() -> None:
    """Restart the peak (VmHWM) from the resident memory now (Linux's clear_refs), so that the next reading is
    training's peak alone: for a small 4-bit model, loading peaks higher than training."""
    Path("/proc/self/clear_refs").write_text("5")


def uses_tokenized_data(paths) -> bool:
    """True when the pipeline's tokenized data and the tokenizer that made it are here."""
    return paths.tokenized.is_dir() and (paths.base_model / "config.json").is_file()


def base_config(shape: str, paths):
    """The transformers config of the base for `shape`: models/base's, or LLAMA_1B with the tokenizer's
    vocabulary when the tokenized data is used (else SYNTHETIC_VOCAB)."""
    from transformers import AutoConfig, LlamaConfig

    if shape == "base":
        return AutoConfig.from_pretrained(paths.base_model)
    vocab = AutoConfig.from_pretrained(paths.base_model).vocab_size if uses_tokenized_data(paths) else SYNTHETIC_VOCAB
    return LlamaConfig(**LLAMA_1B, vocab_size=vocab)


class RandomWeight:
    """One weight of a random base, drawn only when transformers reads it (`weight[...]`, as it reads a
    safetensors slice): N(0, std) from its own seed, or ones for a norm, in float32."""

    def __init__(self, shape: tuple[int, ...], seed: int, std: float, ones: bool):
        import torch

        self.shape, self.dtype = shape, torch.float32
        self.seed, self.std, self.ones = seed, std, ones

    def __getitem__(self, _index):
        import torch

        if self.ones:
            return torch.ones(self.shape)
        return torch.empty(self.shape).normal_(0.0, self.std, generator=torch.Generator().manual_seed(self.seed))


def random_weights(config, seed: int) -> dict[str, RandomWeight]:
    """The state dict of `config`'s model, lazily drawn: Llama's initialisation, one seed per tensor."""
    from stages.training.planner import meta_model

    shapes = meta_model(config).state_dict()
    return {
        name: RandomWeight(tuple(tensor.shape), seed + index, config.initializer_range, name.endswith("norm.weight"))
        for index, (name, tensor) in enumerate(sorted(shapes.items()))
    }


def random_base(config, quantization, seed: int):
    """A random Llama for `config`, loaded as the stage loads its base (4-bit when `quantization.load_in_4bit`),
    one weight drawn (and quantized) at a time; in eval mode like `load_base`."""
    from transformers import LlamaForCausalLM

    from stages.common.modeling import base_loading_kwargs, keep_compute_dtype_on_cpu

    state = random_weights(config, seed)
    model = LlamaForCausalLM.from_pretrained(None, config=config, state_dict=state, **base_loading_kwargs(quantization))
    keep_compute_dtype_on_cpu(model)
    model.eval()
    return model


def load_shape(shape: str, paths, quantization, seed: int):
    """The base of `shape` in this process: models/base through the stage's `load_base`, or the random 1B."""
    from stages.common.modeling import load_base

    if shape == "base":
        return load_base(paths.base_model, quantization)
    return random_base(base_config(shape, paths), quantization, seed)


def tokenized_batches(paths, params, steps: int) -> list[dict]:
    """`steps` batches of `train.batch_size` rows of data/tokenized/train, through train_qlora's collator."""
    from datasets import load_from_disk

    from stages.common.modeling import load_tokenizer
    from stages.training.batching import training_collator

    collate = training_collator(load_tokenizer(paths.base_model), params.train.padding_free)
    rows, size = load_from_disk(str(paths.tokenized))["train"], params.train.batch_size
    return [collate([rows[i] for i in range(step * size, (step + 1) * size)]) for step in range(steps)]


def synthetic_batches(params, steps: int, vocab: int) -> list[dict]:
    """`steps` batches of `train.batch_size` rows of `prompt.max_length` random token ids, every one labelled,
    with `logits_to_keep` as train_qlora's collator adds it."""
    import torch

    from stages.training.batching import LogitsOnLabels

    generator = torch.Generator().manual_seed(params.train.seed)
    shape = (params.train.batch_size, params.prompt.max_length)

    def collate(_features):
        ids = torch.randint(0, vocab, shape, generator=generator)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}

    return [LogitsOnLabels(collate)(None) for _ in range(steps)]


def batch_facts(batches: list[dict], source: str) -> dict:
    """What the planner needs of the batches: rows, the longest length, the most scored positions."""
    return {
        "source": source,
        "rows": max(b["input_ids"].shape[0] for b in batches),
        "length": max(b["input_ids"].shape[1] for b in batches),
        "scored_positions": max(int(b["logits_to_keep"].sum()) for b in batches),
    }


def measure(shape: str, mode: str, steps: int) -> dict:
    """Train `steps` steps in this process with a 4-bit (qlora) or full-precision (lora) base of `shape`, through
    the stage's own batches and loss (stages/training/batching.py)."""
    import bitsandbytes  # noqa: F401  (imported before the baseline reading, as every library below)
    import datasets  # noqa: F401
    import peft  # noqa: F401
    import torch
    import transformers  # noqa: F401

    from stages.common.config import load_params
    from stages.common.modeling import set_threads
    from stages.common.paths import Paths
    from stages.train_qlora import attach_lora
    from stages.training.batching import labelled_loss

    imports_rss = current_rss_mb()  # Python, torch, transformers, peft, bitsandbytes: the same in both modes
    paths = Paths.at(".")
    params = load_params(paths.params)
    set_threads(params.train.threads)
    quantization = dataclasses.replace(params.quantization, load_in_4bit=mode == "qlora")
    base = load_shape(shape, paths, quantization, params.train.seed)
    base_bytes = sum(t.numel() * t.element_size() for t in [*base.parameters(), *base.buffers()])
    gc.collect()
    loaded_rss, load_peak = current_rss_mb(), peak_rss_mb()
    # The tokenizer and data come after the load: allocated before it, they kept memory that loading frees from
    # returning to the system (measured once), which would count as base memory.
    if shape == "base" or uses_tokenized_data(paths):
        # Relative to the project, so that the results file names no folder of the machine it ran on.
        batches, source = tokenized_batches(paths, params, steps), paths.tokenized.relative_to(paths.root).as_posix()
    else:
        batches, source = synthetic_batches(params, steps, SYNTHETIC_VOCAB), "synthetic token ids"
    torch.manual_seed(params.train.seed)  # the same adapter in both modes
    model = attach_lora(base, params.lora, params.train.gradient_checkpointing)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=params.train.learning_rate)
    reset_peak_rss()
    started, loss = time.perf_counter(), float("nan")
    for batch in batches:
        batch = dict(batch)
        labels = batch.pop("labels")
        loss = labelled_loss(model(**batch), labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        loss = loss.item()
    training_peak = peak_rss_mb()
    peak = max(load_peak, training_peak)
    return {
        "mode": mode,
        "peak_rss_mb": peak,
        "training_peak_rss_mb": training_peak,
        "peak_above_imports_mb": round(peak - imports_rss, 1),
        "rss_after_imports_mb": imports_rss,
        "peak_rss_while_loading_mb": load_peak,
        "rss_after_load_mb": loaded_rss,
        "rss_after_training_mb": current_rss_mb(),
        "base_parameter_mb": round(base_bytes / 2**20, 1),
        "seconds_per_step": round((time.perf_counter() - started) / steps, 2),
        "last_loss": round(loss, 4),
        "batches": batch_facts(batches, source),
    }


def planned(shape: str, batches: dict) -> dict:
    """The planner's peak memory estimate, in MiB by part, for each mode on these batches; and the plan's
    parameter count."""
    from stages.common.config import load_params
    from stages.common.paths import Paths
    from stages.training.planner import checkpointing_applies, plan_for_config

    paths = Paths.at(".")
    params = load_params(paths.params)
    report = plan_for_config(base_config(shape, paths), params, f"the {shape} shape")
    estimates = {}
    for mode in MODES:
        quantized = mode == "qlora"
        estimate = report.peak_memory(
            quantized=quantized,
            checkpointing=checkpointing_applies(params, quantized),
            rows=batches["rows"],
            length=batches["length"],
            scored_positions=batches["scored_positions"],
        )
        parts = {**estimate.parts(), "total": estimate.total}
        estimates[mode] = {name: round(n / 2**20, 1) for name, n in parts.items()}
    return {"base_parameters": report.base_parameters, "estimates": estimates}


def run_mode(shape: str, mode: str, steps: int) -> dict:
    """`measure` in a fresh process (peak RSS is per process); exits with the child's error when it fails."""
    command = [sys.executable, "-m", "bench.memory", "--shape", shape, "--child", mode, "--steps", str(steps)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{mode} run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


COLUMNS = {
    "peak_rss_mb": "peak RSS",
    "training_peak_rss_mb": "train peak",
    "planned_mb": "planner",
    "peak_above_imports_mb": "above imports",
    "rss_after_imports_mb": "imports",
    "peak_rss_while_loading_mb": "load peak",
    "rss_after_load_mb": "after load",
    "rss_after_training_mb": "after train",
    "base_parameter_mb": "base",
    "seconds_per_step": "s/step",
    "last_loss": "last loss",
}


def report(shape: str, steps: int, results: dict, plan: dict) -> dict:
    """Print the table, ratios and estimates; return what goes to the results file."""
    from bench.machine import describe, machine

    for mode, r in results.items():
        r["planned_mb"] = plan["estimates"][mode]["total"]
    ratio, above, training = (
        results["qlora"][column] / results["lora"][column]
        for column in ("peak_rss_mb", "peak_above_imports_mb", "training_peak_rss_mb")
    )
    batches, where = results["qlora"]["batches"], machine()
    print(f"\n{shape}: {plan['base_parameters']:,} parameters, {describe(where)}")
    print(
        f"{steps} steps of {batches['rows']} rows x up to {batches['length']} tokens "
        f"({batches['scored_positions']} scored) from {batches['source']}"
    )
    print(f"{'mode':<6} " + " ".join(f"{title:>13}" for title in COLUMNS.values()) + "   (memory in MiB)")
    for mode, r in results.items():
        print(f"{mode:<6} " + " ".join(f"{r[c]:>13.2f}" for c in COLUMNS))
    print(
        f"QLoRA / LoRA peak RSS: {ratio:.2f}; peak above the imports (what loading and training add): {above:.2f}; "
        f"training's peak alone: {training:.2f}"
    )
    for mode, parts in plan["estimates"].items():
        print(f"planner, {mode} (MiB): " + ", ".join(f"{name} {n:,.1f}" for name, n in parts.items()))
    return {
        "shape": shape,
        "machine": where,
        "steps": steps,
        "base_parameters": plan["base_parameters"],
        "results": results,
        "planner_mb": plan["estimates"],
        "qlora_over_lora_peak_rss": round(ratio, 3),
        "qlora_over_lora_peak_above_imports": round(above, 3),
        "qlora_over_lora_training_peak": round(training, 3),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=tuple(RESULT_FILES), default="base", help="models/base (default) or 1b")
    parser.add_argument("--steps", type=int, help=f"training steps per mode (default {DEFAULT_STEPS})")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)  # internal: measure one mode
    args = parser.parse_args(argv)
    steps = args.steps or DEFAULT_STEPS[args.shape]
    if args.child:
        print(json.dumps(measure(args.shape, args.child, steps)))
        return 0
    results = {mode: run_mode(args.shape, mode, steps) for mode in MODES}
    summary = report(args.shape, steps, results, planned(args.shape, results["qlora"]["batches"]))
    from stages.common.io import write_json

    write_json(RESULT_FILES[args.shape], summary)
    print(f"written to {RESULT_FILES[args.shape]}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
