"""Benchmark: the project's train_qlora against TRL's SFTTrainer set up two ways, same machine, same run.

Two peers, both TRL's SFTTrainer on the same base loaded in 4-bit NF4 with the same LoRA (params `lora`, passed
as `peft_config`), batch `train.batch_size`, no packing:
- `baseline`, the course's notebook: every sequence padded to `prompt.max_length` (182);
- `careful`, what TRL's documentation recommends today: each batch padded to its longest example only and the
  loss on the completion only. Padding-free batches are not used: TRL makes them correct only with
  FlashAttention kernels, which do not run on a CPU (with SDPA, rows in one batch would attend to each other).
TRL's defaults hold otherwise (it keeps a quantized model's adapter in bfloat16, and computes the logits and a
token-accuracy metric at every position), except where the comparison must hold something equal: the
optimizer, schedule, learning rate, gradient checkpointing and float32 compute come from params, as the
project's. The project side is stages/train_qlora's own model and Trainer (labelled-position logits, batches
padded to their longest example; length-grouped with `train.group_by_length`, padding-free rows with
`train.padding_free`). All take the same train split and the same number of optimizer steps, each in its own
process (peak RSS is per process), alternating trainers within a round. Round k runs each with seed
`train.seed` + k - 1, so the validation losses compare them over several seeds rather than one draw of the
noise. Within a round all tokenize the rows identically (checked: the same input ids and labels for all 600),
see the same data order and start from the same adapter weights (`same_starting_adapter`); their dropout
masks differ, since the peers draw them for their padded positions too.

Reported per trainer (median over rounds): useful (non-pad) tokens per second of training, training wall
seconds, peak RSS, the share of computed tokens that were padding, the validation loss afterwards (mean per
labelled token over data/tokenized/val, computed by the same function for all; mean over seeds, and per
seed), and model-FLOPs utilisation. The project's speed-up over each peer is the ratio of the medians; its
validation loss against each peer is a paired comparison over the seeds (mean difference and its 95%
t-interval). FLOPs per token ~ 4 N + 12 L d T (stages/training/planner.py: N the weights of every linear layer
and LoRA, L layers, d attention width, T the mean example length). MFU is given against two roofs
(bench/machine.py): the nominal float32 peak from this CPU's vector units, and a 2048^2 float32 matmul rate
measured before the first run and after every round (its median, with min and max, since it moves on shared
machines). Needs a finished pipeline (`make demo`): models/base, data/splits and data/tokenized.
Writes bench/results/train_throughput.json (train_throughput_seed<first seed>.json with --seed-offset).

Run: `python -m bench.train_throughput [--steps 40] [--rounds 3] [--seed-offset 0] [--trainers careful project]`
(or `make bench-train`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "train_throughput.json"
TRAINERS = ("baseline", "careful", "project")
PEERS = ("baseline", "careful")  # the trainers the project is compared with


class CountingCollator:
    """Wrap a data collator and count, per batch, the tokens it hands the model: computed (the batch's size)
    and useful (those the attention mask keeps; a padding-free row has no mask and no padding). The data
    loader prepares a batch ahead, so `totals(n)` sums the first `n` batches only: those trained on."""

    def __init__(self, collator):
        self.collator, self.batches = collator, []

    def __call__(self, features):
        batch = self.collator(features)
        mask = batch.get("attention_mask")
        computed = batch["input_ids"].numel()
        self.batches.append((computed, int(mask.sum()) if mask is not None else computed))
        return batch

    def totals(self, n: int) -> tuple[int, int]:
        """(computed, useful) tokens of the first `n` batches."""
        return sum(c for c, _ in self.batches[:n]), sum(u for _, u in self.batches[:n])


def bench_params(steps: int, seed_offset: int = 0):
    """params.yaml with `steps` optimizer steps, `train.seed` + `seed_offset`, and nothing but training: no
    evaluation, checkpoint or sample."""
    from stages.common.config import load_params

    params = load_params("params.yaml")
    train = dataclasses.replace(
        params.train,
        seed=params.train.seed + seed_offset,
        max_steps=steps,
        eval_steps=10**6,
        save_steps=10**6,
        early_stopping_patience=0,
        sample_prompts=0,
    )
    return dataclasses.replace(params, train=train)


def scratch_project(folder: Path):
    """Paths of a throwaway project in `folder` reading this project's base and tokenized data, so the
    benchmark's checkpoints never touch .cache/train_qlora."""
    from stages.common.paths import Paths

    here, there = Paths.at("."), Paths.at(folder)
    for source, link in ((here.base_model, there.base_model), (here.tokenized, there.tokenized)):
        if not source.exists():
            raise SystemExit(f"{source}: missing; run the pipeline first (make demo)")
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(source)
    return there


def project_trainer(params, paths):
    """(Trainer, tokenizer): stages/train_qlora's own model and Trainer for `params`, loaded as the stage does."""
    from datasets import load_from_disk

    from stages.train_qlora import build_trainer, choose_optimizer, prepare_model

    tokenizer, model = prepare_model(params, paths)
    optimizer, _ = choose_optimizer(params.train.optimizer)
    trainer, _ = build_trainer(params, paths, model, tokenizer, load_from_disk(str(paths.tokenized)), optimizer)
    return trainer, tokenizer


def train_project(params, paths):
    """(model, tokenizer, counter, seconds): stages/train_qlora's model and Trainer, trained `max_steps`."""
    trainer, tokenizer = project_trainer(params, paths)
    return trainer.model, tokenizer, *timed_training(trainer)


def course_pairs(rows: list[dict], prompt) -> list[dict]:
    """Prompt/completion pairs for TRL from split rows (price rows through the templates)."""
    from stages.common.config import PAIR, PRICE
    from stages.common.prompts import render_completion, render_prompt
    from stages.common.rows import split_shape

    shape = split_shape(rows, "data/splits/train.jsonl")
    if shape == PRICE:
        return [
            {
                "prompt": render_prompt(prompt.template, r["text"]),
                "completion": render_completion(prompt.completion, r["price"]),
            }
            for r in rows
        ]
    if shape == PAIR:
        return [{"prompt": r["prompt"], "completion": r["completion"]} for r in rows]
    raise SystemExit(f"the baseline handles price and prompt/completion data, not {shape}")


def train_peer(params, paths, padded: bool):
    """(model, tokenizer, counter, seconds): TRL's SFTTrainer trained `max_steps`, as the course sets it up
    (`padded`: every sequence to max_length) or as TRL recommends (each batch to its longest example)."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from stages.common.io import read_jsonl
    from stages.common.modeling import compute_dtype, device, load_base, load_tokenizer
    from stages.train_qlora import choose_optimizer, choose_schedule, fast_bf16_cpu, peft_lora_config, trainer_precision

    cfg = params.train
    scheduler, warmup, _ = choose_schedule(cfg)
    tokenizer = load_tokenizer(paths.base_model)
    args = SFTConfig(
        output_dir=str(paths.train_scratch),
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=scheduler,
        warmup_steps=warmup,
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        optim=choose_optimizer(cfg.optimizer)[0],
        gradient_checkpointing=cfg.gradient_checkpointing,
        logging_steps=cfg.logging_steps,
        save_strategy="no",
        eval_strategy="no",
        seed=cfg.seed,
        data_seed=cfg.seed,
        use_cpu=device() == "cpu",
        **trainer_precision(device(), compute_dtype(params.quantization.compute_dtype), fast_bf16_cpu()),
        report_to="none",
        max_length=params.prompt.max_length,
        packing=False,
        padding_free=False,
        pad_to_multiple_of=params.prompt.max_length if padded else None,
        completion_only_loss=True,
    )
    trainer = SFTTrainer(
        model=load_base(paths.base_model, params.quantization),
        args=args,
        train_dataset=Dataset.from_list(course_pairs(read_jsonl(Path("data/splits/train.jsonl")), params.prompt)),
        processing_class=tokenizer,
        peft_config=peft_lora_config(params.lora),
    )
    return trainer.model, tokenizer, *timed_training(trainer)


def same_starting_adapter(model, seed: int) -> None:
    """Draw every LoRA A matrix again, in name order, from one generator seeded with `seed`, as PEFT's
    default initialisation does (Kaiming uniform, a = sqrt(5)); B stays zero. The two trainers build their
    adapters after different amounts of random drawing, so without this they would start from different
    weights and one seed would compare two draws of the initialisation as well as two trainers. Drawn in
    float32 and stored in each weight's own dtype: TRL keeps a quantized model's adapter in bfloat16
    (after the QLoRA paper), so the baseline starts from the bfloat16 rounding of the project's weights."""
    import math

    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, weight in sorted(model.named_parameters()):
            if ".lora_A." in name:
                drawn = torch.empty(weight.shape, dtype=torch.float32)  # the same draw whatever the dtype
                torch.nn.init.kaiming_uniform_(drawn, a=math.sqrt(5), generator=generator)
                weight.copy_(drawn)
            elif ".lora_B." in name:
                weight.zero_()


def timed_training(trainer) -> tuple[CountingCollator, float]:
    """Start from the same adapter weights for a seed (`same_starting_adapter`), then train, counting
    tokens; the seconds cover training only (transformers 5 would otherwise evaluate after the last step
    of a steps-based schedule: pushed out of reach here)."""
    same_starting_adapter(trainer.model, trainer.args.seed)
    counter = CountingCollator(trainer.data_collator)
    trainer.data_collator = counter
    trainer.args.eval_delay = 10**9
    started = time.perf_counter()
    trainer.train()
    return counter, time.perf_counter() - started


def validation_loss(model, tokenizer, rows) -> float:
    """Mean cross-entropy per labelled token over the tokenized validation split, full logits, batches of 8."""
    import torch
    import torch.nn.functional as F
    from transformers import DataCollatorForSeq2Seq

    from stages.common.labels import IGNORE_INDEX

    collate = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=IGNORE_INDEX)
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(rows), 8):
            batch = collate([rows[i] for i in range(start, min(start + 8, len(rows)))])
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            targets = batch["labels"][:, 1:]
            total += F.cross_entropy(
                logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
            ).item()
            count += int((targets != IGNORE_INDEX).sum())
    return total / count


def measure(trainer_name: str, steps: int, seed_offset: int = 0) -> dict:
    """Train with one trainer in this process and return its figures."""
    from datasets import load_from_disk
    from transformers import set_seed

    from stages.common.modeling import set_threads

    params = bench_params(steps, seed_offset)
    set_threads(params.train.threads)
    with tempfile.TemporaryDirectory(prefix="bench-train-") as folder:
        paths = scratch_project(Path(folder))
        set_seed(params.train.seed)
        if trainer_name == "project":
            model, tokenizer, counter, seconds = train_project(params, paths)
        else:
            model, tokenizer, counter, seconds = train_peer(params, paths, padded=trainer_name == "baseline")
        val = load_from_disk(str(paths.tokenized))["val"]
        val_loss = validation_loss(model, tokenizer, val)
    computed, useful = counter.totals(steps * params.train.grad_accum)
    return {
        "trainer": trainer_name,
        "steps": steps,
        "seed": params.train.seed,
        "train_seconds": round(seconds, 2),
        "useful_tokens": useful,
        "computed_tokens": computed,
        "useful_tokens_per_second": round(useful / seconds, 1),
        "padding_fraction": round(1 - useful / computed, 4),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),  # Linux: KiB
        "val_loss": round(val_loss, 4),
    }


def flops_per_token(mean_length: float) -> float:
    from stages.common.config import load_params
    from stages.common.paths import Paths
    from stages.training.planner import plan

    return plan(load_params("params.yaml"), Paths.at(".")).training_flops_per_token(round(mean_length))


def run_child(trainer_name: str, steps: int, seed_offset: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_RUN_ID", "MLFLOW_TRACKING_URI")}
    env["TQDM_DISABLE"] = "1"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench.train_throughput",
            *("--child", trainer_name, "--steps", str(steps), "--seed-offset", str(seed_offset)),
        ],
        capture_output=True,
        text=True,
        check=False,
        env=env,
    )
    if done.returncode != 0:
        raise SystemExit(f"{trainer_name} run failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def paired_difference(runs: list[dict], peer: str) -> dict | None:
    """The peer's validation loss minus the project's, seed by seed: mean and 95% t-interval (None under 2
    seeds). Positive: the project ends lower."""
    from scipy import stats

    by_seed: dict[int, dict[str, float]] = {}
    for r in runs:
        by_seed.setdefault(r["seed"], {})[r["trainer"]] = r["val_loss"]
    differences = [s[peer] - s["project"] for s in by_seed.values() if peer in s and "project" in s]
    if len(differences) < 2:
        return None
    mean = statistics.mean(differences)
    half = stats.t.ppf(0.975, len(differences) - 1) * statistics.stdev(differences) / len(differences) ** 0.5
    return {
        "seeds": len(differences),
        "mean": round(mean, 5),
        "low": round(mean - half, 5),
        "high": round(mean + half, 5),
    }


def summarise(runs: list[dict], peak: dict, roof: dict) -> dict:
    """Median figures per trainer, MFU against both roofs, and the project against each peer: speed-up and the
    paired validation-loss difference."""
    summary = {}
    for name in dict.fromkeys(r["trainer"] for r in runs):
        mine = [r for r in runs if r["trainer"] == name]
        tokens_per_second = statistics.median(r["useful_tokens_per_second"] for r in mine)
        mean_length = mine[0]["useful_tokens"] / (mine[0]["steps"] * bench_params(1).train.batch_size)
        flops = flops_per_token(mean_length)
        useful_gflops = tokens_per_second * flops / 1e9
        summary[name] = {
            "useful_tokens_per_second": tokens_per_second,
            "train_seconds": statistics.median(r["train_seconds"] for r in mine),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in mine),
            "padding_fraction": mine[0]["padding_fraction"],
            "val_loss": statistics.mean(r["val_loss"] for r in mine),
            "flops_per_token": flops,
            "useful_gflops": round(useful_gflops, 1),
            "mfu_nominal": round(useful_gflops / peak["peak_gflops"], 4) if peak["peak_gflops"] else None,
            "share_of_matmul": round(useful_gflops / roof["median"], 4),
        }
    versus = {
        peer: {
            "speedup": round(
                summary["project"]["useful_tokens_per_second"] / summary[peer]["useful_tokens_per_second"], 2
            ),
            "val_loss_difference": paired_difference(runs, peer),
        }
        for peer in PEERS
        if peer in summary and "project" in summary
    }
    return {"trainers": summary, "versus": versus}


def print_table(result: dict) -> None:
    peak, roof, rows = result["peak"], result["matmul_roof"], result["summary"]["trainers"]
    print(
        f"\n{'trainer':<9} {'useful tok/s':>12} {'train s':>8} {'peak RSS MiB':>13} {'padding':>8} "
        f"{'val loss':>9} {'GFLOP/s':>8} {'MFU':>7} {'of matmul':>10}   (val loss: mean over seeds)"
    )
    for name, r in rows.items():
        mfu = f"{r['mfu_nominal']:.1%}" if r["mfu_nominal"] is not None else "n/a"
        print(
            f"{name:<9} {r['useful_tokens_per_second']:>12.1f} {r['train_seconds']:>8.1f} {r['peak_rss_mb']:>13.1f} "
            f"{r['padding_fraction']:>8.1%} {r['val_loss']:>9.4f} {r['useful_gflops']:>8.1f} {mfu:>7} "
            f"{r['share_of_matmul']:>10.1%}"
        )
    for peer, v in result["summary"]["versus"].items():
        d = v["val_loss_difference"]
        paired = (
            f"{peer} - project val loss {d['mean']:+.4f} [{d['low']:+.4f}, {d['high']:+.4f}] "
            f"(95% t-interval, {d['seeds']} seeds)"
            if d
            else "val loss: one seed, no interval"
        )
        print(f"project / {peer} useful tokens per second: {v['speedup']:.2f}x; {paired}")
    print(
        f"{result['steps']} steps, {result['rounds']} alternating rounds, medians. FLOPs per token "
        f"{rows['project']['flops_per_token']:.3g} (4N + 12LdT at the mean example length). MFU against the "
        f"nominal peak {peak['peak_gflops']} GFLOP/s ({peak['cores']} cores x {peak['clock_ghz']} GHz x "
        f"{peak['flops_per_cycle_per_core']} FLOPs/cycle: {peak['why']}); 'of matmul' against the measured "
        f"2048^2 float32 matmul rate, median {roof['median']} GFLOP/s (min {roof['min']}, max {roof['max']}, "
        f"{len(roof['samples'])} samples in this run)"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per run (default 40)")
    parser.add_argument("--rounds", type=int, default=3, help="alternating baseline/project rounds (default 3)")
    parser.add_argument(
        "--seed-offset",
        type=int,
        default=0,
        help="round k runs seed train.seed + this + k - 1 (default 0): more seeds without repeating earlier "
        "ones, written to train_throughput_seed<first seed>.json",
    )
    parser.add_argument("--trainers", nargs="+", choices=TRAINERS, default=list(TRAINERS), help="default: all")
    parser.add_argument("--child", choices=TRAINERS, help=argparse.SUPPRESS)  # internal: one run, seed + offset
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(args.child, args.steps, args.seed_offset)))
        return 0
    if "project" not in args.trainers:
        parser.error("--trainers must include project: the figures compare it with the peers")
    from bench.machine import describe, machine, matmul_gflops, nominal_peak, roof_summary
    from stages.common.io import write_json

    roofs, runs = [matmul_gflops()], []
    for round_number in range(1, args.rounds + 1):
        for name in [t for t in TRAINERS if t in args.trainers]:
            runs.append(run_child(name, args.steps, seed_offset=args.seed_offset + round_number - 1))
            r = runs[-1]
            print(
                f"round {round_number} (seed {r['seed']}) {name}: {r['useful_tokens_per_second']} useful tok/s, "
                f"{r['train_seconds']} s, val loss {r['val_loss']}",
                flush=True,
            )
        roofs.append(matmul_gflops())
    peak, roof = nominal_peak(), roof_summary(roofs)
    result = {
        "machine": machine(),
        "steps": args.steps,
        "rounds": args.rounds,
        "peak": peak,
        "matmul_roof": roof,
        "runs": runs,
        "summary": summarise(runs, peak, roof),
    }
    print(f"\n{describe(result['machine'])}")
    print_table(result)
    written = RESULTS.with_stem(f"{RESULTS.stem}_seed{runs[0]['seed']}") if args.seed_offset else RESULTS
    write_json(written, result)
    print(f"written to {written}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
