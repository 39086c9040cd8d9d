"""Benchmark: where a training step of the project's train_qlora spends its time, by torch.profiler.

Trains `--steps` optimizer steps with stages/train_qlora's own model and Trainer (as bench/train_throughput.py's
project side: params.yaml, no evaluation or checkpoint) after `--warmup` steps left out of the profile, and
sums the CPU self time of every operator into categories: the matmuls of the frozen and LoRA weights, NF4
dequantization (bitsandbytes), attention, dropout, the LM head's loss, the optimizer, elementwise and norm
work, and the rest. Prints each category's share of the profiled time and the operators that took most;
writes bench/results/train_profile.json with the machine. Needs a finished pipeline (`make demo`).

Run: `python -m bench.train_profile [--steps 4] [--warmup 2]` (or `make bench-profile`).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from transformers import TrainerCallback

from bench.machine import describe, machine
from bench.train_throughput import bench_params, project_trainer, scratch_project
from stages.common.io import write_json

RESULTS = Path(__file__).resolve().parent / "results" / "train_profile.json"
# Operator name fragments per category, first match wins (names as torch.profiler reports them).
CATEGORIES = (
    ("dequantize NF4", ("dequantize",)),
    ("attention", ("scaled_dot_product", "attention", "softmax")),
    ("dropout", ("dropout", "bernoulli")),
    ("loss", ("cross_entropy", "nll_loss", "log_softmax")),
    ("matmul", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm",
                "matmul4bit", "gemm_4bit", "gemv_4bit")),
    ("optimizer", ("adam", "_foreach", "optimizer")),
    ("elementwise and norms", ("aten::mul", "aten::add", "aten::div", "aten::pow", "aten::mean", "aten::rsqrt",
                               "aten::silu", "aten::neg", "aten::cat", "aten::sum", "aten::sub", "aten::exp")),
    ("copies and layout", ("aten::copy_", "aten::to", "aten::_to_copy", "aten::clone", "aten::contiguous",
                           "aten::transpose", "aten::t", "aten::view", "aten::reshape", "aten::empty", "aten::fill_",
                           "aten::zero_", "aten::index", "aten::slice")),
)  # fmt: skip


class ProfileWindow(TrainerCallback):
    """Runs torch.profiler over optimizer steps warmup+1 .. warmup+steps."""

    def __init__(self, warmup: int, steps: int):
        self.warmup, self.steps, self.profiler = warmup, steps, torch.profiler.profile(record_shapes=False)

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.warmup:
            self.profiler.__enter__()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.warmup + self.steps:
            self.profiler.__exit__(None, None, None)


# Work done inside one of these is theirs, whatever operators it calls (bitsandbytes' CPU dequantization is a
# series of aten operators; attention calls matmuls; the optimizer's step is many elementwise operators). The
# 4-bit matmul (bitsandbytes' MatMul4Bit) is not: it dequantizes, then multiplies, and each part is counted apart.
ENCLOSING = ("dequantize NF4", "attention", "dropout", "loss", "optimizer")


def own_category(name: str) -> str:
    lowered = name.lower()
    for label, fragments in CATEGORIES:
        if any(fragment.lower() in lowered for fragment in fragments):
            return label
    return "other"


def category(event) -> str:
    """The category of a profiled event: that of its outermost enclosing event in ENCLOSING, or its own."""
    chain = []
    while event is not None:
        chain.append(event)
        event = event.cpu_parent
    for enclosing in reversed(chain):
        label = own_category(enclosing.name)
        if label in ENCLOSING:
            return label
    return own_category(chain[0].name)


def profile(steps: int, warmup: int):
    """Every profiled event (torch's FunctionEvent: name, self CPU time, parent) over the profiled steps."""
    from stages.common.modeling import set_threads

    params = bench_params(warmup + steps)
    set_threads(params.train.threads)
    with tempfile.TemporaryDirectory(prefix="bench-profile-") as folder:
        trainer, _ = project_trainer(params, scratch_project(Path(folder)))
        window = ProfileWindow(warmup, steps)
        trainer.add_callback(window)
        trainer.args.eval_delay = 10**9
        trainer.train()
    return window.profiler.events()


def shares(events) -> tuple[dict[str, float], list[tuple[str, float]], float]:
    """(share of self CPU time per category, (operator, share) most first, total self CPU seconds)."""
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    by_category: dict[str, float] = {}
    by_operator: dict[str, float] = {}
    for event in events:
        label = category(event)
        by_category[label] = by_category.get(label, 0.0) + event.self_cpu_time_total / total
        key = f"{event.name} ({label})"
        by_operator[key] = by_operator.get(key, 0.0) + event.self_cpu_time_total / total
    return by_category, sorted(by_operator.items(), key=lambda pair: -pair[1]), total / 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="optimizer steps profiled (default 4)")
    parser.add_argument("--warmup", type=int, default=2, help="steps run before the profile starts (default 2)")
    args = parser.parse_args(argv)
    by_category, operators, seconds = shares(profile(args.steps, args.warmup))
    info = machine()
    print(f"\n{describe(info)}; {args.steps} steps profiled after {args.warmup}, {seconds:.1f} s of operator time")
    for label, share in sorted(by_category.items(), key=lambda pair: -pair[1]):
        print(f"{label:<24} {share:>6.1%}")
    print("\nthe operators that took most (category: their own, or the work that called them):")
    for name, share in operators[:15]:
        print(f"{share:>6.1%}  {name}")
    write_json(
        RESULTS,
        {
            "machine": info,
            "steps": args.steps,
            "warmup": args.warmup,
            "cpu_seconds": round(seconds, 2),
            "shares": {label: round(share, 4) for label, share in by_category.items()},
            "top_operators": [{"name": name, "share": round(share, 4)} for name, share in operators[:30]],
        },
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
