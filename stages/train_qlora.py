"""Stage `train_qlora`: fine-tune LoRA adapters on the base model loaded in 4-bit NF4 (QLoRA), watchably.

The base is loaded in 4 bits with bitsandbytes (double quantization; float32 compute on CPU, bfloat16
on CUDA, where the Trainer autocasts to it; under FSDP the 4-bit weights are stored in that dtype too, so
they shard), prepared for k-bit training, and wrapped with LoRA adapters on `lora.target_modules`. Training
uses the Hugging Face Trainer with the optimizer, schedule, warmup, gradient accumulation and clipping
from params, on batches padded only to their longest example (or padding-free rows, `train.padding_free`)
whose logits are computed only where a label is scored (stages/training/batching.py). Every `train.eval_steps`
it prints one line (validation and training loss, learning rate, gradient norm, tokens seen, tokens/s)
and greedy completions of `train.sample_prompts` validation prompts, and streams both to the MLflow run the
flow names in MLFLOW_RUN_ID and MLFLOW_TRACKING_URI, when set. Early stopping on validation loss
(`train.early_stopping_patience`) restores the best checkpoint at the end. A NaN or infinite loss stops
training at that step. Checkpoints go every `train.save_steps` to a scratch folder (not a DVC output)
with a fingerprint of params, data and base: rerunning after a crash or a kill resumes from the last one;
a checkpoint from other params or data is set aside. Seeds are set before the adapter is created, so a
run is repeatable.
It writes the adapter (with the tokenizer), the training metrics, the loss curve as plot data and as a
chart, and the samples, only once training completes. Inputs and outputs: `SPEC` below.

Run: `python -m stages.train_qlora` (or `dvc repro train_qlora`);
`python -m stages.train_qlora --plan` prints parameters, memory and FLOPs from the config alone.
"""

from __future__ import annotations

import itertools
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from stages.common.charts import loss_curve
from stages.common.cli import run_stage
from stages.common.config import LoraConfig, Params, QuantizationConfig, TrainConfig
from stages.common.errors import StageError
from stages.common.io import atomic_path, write_csv, write_json, write_text
from stages.common.modeling import compute_dtype, device, load_base, load_tokenizer, set_threads
from stages.common.paths import Paths
from stages.common.spec import StageSpec
from stages.training import distributed
from stages.training.checkpoints import fingerprint, prepare_scratch
from stages.training.launcher import relaunch

SPEC = StageSpec(
    "train_qlora",
    params=("quantization", "lora", "train"),
    reads=(Paths.accelerate_configs, Paths.base_model, Paths.tokenized),
    writes=(Paths.adapter, Paths.loss_plot, Paths.loss_chart, Paths.train_samples),
    metrics=(Paths.train_metrics,),
)
# Paged optimizers page their state to CPU memory through CUDA unified memory; on a CPU the same
# algorithm without paging runs instead.
UNPAGED = {"paged_adamw_32bit": "adamw_torch", "paged_adamw_8bit": "adamw_bnb_8bit"}
KEEP_CHECKPOINTS = 2  # the newest two (plus the best one when early stopping is on)


@dataclass(frozen=True)
class Result:
    steps: int
    train_loss: float
    val_loss: float
    trainable_parameters: int
    adapter_mb: float
    tokens_per_second: float
    stopped_early: bool
    resumed_from_step: int


def choose_optimizer(name: str) -> tuple[str, str | None]:
    """(Trainer optimizer, note) for `train.optimizer`: "auto" is paged AdamW on CUDA and torch AdamW on
    CPU; a paged optimizer asked for on a CPU falls back to its unpaged twin, and the note says so."""
    on_cuda = device() == "cuda"
    if name == "auto":
        return ("paged_adamw_32bit" if on_cuda else "adamw_torch"), None
    if name in UNPAGED and not on_cuda:
        return UNPAGED[name], (
            f"train.optimizer={name} pages optimizer state through CUDA memory and cannot run on a CPU; "
            f"using {UNPAGED[name]} (the same update without paging) instead"
        )
    return name, None


def choose_schedule(cfg: TrainConfig) -> tuple[str, float, str | None]:
    """(scheduler, warmup, note): warmup_steps when > 0, else warmup_ratio (the Trainer reads a value
    below 1 as a fraction of all steps); "constant" with a warmup becomes constant_with_warmup."""
    warmup = cfg.warmup_steps if cfg.warmup_steps > 0 else cfg.warmup_ratio
    if cfg.lr_scheduler == "constant" and warmup > 0:
        note = f"train.lr_scheduler=constant ignores warmup; using constant_with_warmup (warmup {warmup})"
        return "constant_with_warmup", warmup, note
    return cfg.lr_scheduler, warmup, None


def fast_bf16_cpu() -> bool:
    """True when this CPU multiplies bfloat16 in hardware (AMX-BF16); without it bf16 is emulated, slowly."""
    try:
        return "amx_bf16" in Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return False


def trainer_precision(device_type: str, dtype, cpu_has_fast_bf16: bool) -> dict[str, bool]:
    """The Trainer's mixed-precision flags {"bf16": ..., "fp16": ...} for training on `device_type` ("cuda" or
    "cpu") with 4-bit layers computing in `dtype` (a torch dtype, as `compute_dtype` resolves it).

    The Trainer autocasts to the compute dtype where the hardware multiplies in it: bfloat16 or float16 on
    CUDA, bfloat16 on a CPU with AMX-BF16 (`cpu_has_fast_bf16`). On a CPU bfloat16 is always asked for by
    name ("auto" is float32 there); without AMX-BF16 it is emulated, so autocasting to it would only slow
    training down. Everything else trains without autocast.
    """
    import torch

    on_cuda = device_type == "cuda"
    return {
        "bf16": dtype == torch.bfloat16 and (on_cuda or cpu_has_fast_bf16),
        "fp16": dtype == torch.float16 and on_cuda,
    }


def dtype_note(cfg: QuantizationConfig) -> str | None:
    """A warning when the compute dtype asked for is slow on this machine (it is kept: it works)."""
    if device() == "cpu" and cfg.compute_dtype in ("bfloat16", "float16") and not fast_bf16_cpu():
        return (
            f"quantization.compute_dtype={cfg.compute_dtype} on a CPU without AMX-BF16 is emulated and much "
            "slower than float32; kept as asked (auto uses float32 on a CPU)"
        )
    return None


def peft_lora_config(cfg: LoraConfig):
    """PEFT's LoraConfig for params `lora` (no bias terms, causal LM): built here only, so the benchmark's
    TRL baseline (bench/train_throughput.py) trains exactly the adapter this stage trains."""
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def attach_lora(model, cfg: LoraConfig, gradient_checkpointing: bool):
    """Prepare a 4-bit model for training and wrap it with LoRA adapters; print what is trainable."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    try:
        return get_peft_model(model, peft_lora_config(cfg))
    except ValueError as exc:
        raise StageError(f"lora.target_modules={cfg.target_modules}: {exc}") from exc


def training_arguments(
    cfg: TrainConfig, output_dir: Path, optimizer: str, scheduler: str, warmup: float, precision: dict[str, bool]
):
    """TrainingArguments: evaluation every eval_steps, checkpoints every save_steps in `output_dir`, the
    best checkpoint (lowest validation loss) restored at the end when early stopping is on, mixed precision
    from `precision` (`trainer_precision`)."""
    from transformers import TrainingArguments

    early_stopping = cfg.early_stopping_patience > 0
    return TrainingArguments(
        output_dir=str(output_dir),
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size * 2,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=scheduler,
        warmup_steps=warmup,  # transformers 5: a value below 1 is a fraction of all steps
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        optim=optimizer,
        eval_strategy="steps",
        eval_steps=cfg.eval_steps,
        logging_steps=cfg.logging_steps,
        logging_nan_inf_filter=False,  # log a NaN loss as NaN (the guard stops training on it)
        save_strategy="steps",
        save_steps=cfg.save_steps,
        save_total_limit=KEEP_CHECKPOINTS,
        load_best_model_at_end=early_stopping,
        metric_for_best_model="eval_loss" if early_stopping else None,
        greater_is_better=False if early_stopping else None,
        restore_callback_states_from_checkpoint=True,  # early stopping's patience count survives a resume
        seed=cfg.seed,
        data_seed=cfg.seed,
        use_cpu=device() == "cpu",
        **precision,
        # Padding-free rows hold no padding, and their EOS tokens would be miscounted as pad tokens.
        include_num_input_tokens_seen="all" if cfg.padding_free else "non_padding",
        train_sampling_strategy="group_by_length" if cfg.group_by_length else "random",
        prediction_loss_only=True,  # validation needs the loss only, not every logit kept in memory
        report_to="none",
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,  # every LoRA weight gets a gradient: skip DDP's search for unused ones
    )


LOSS_COLUMNS = ("train_loss", "val_loss", "learning_rate", "grad_norm", "tokens_seen", "tokens_per_second")


def loss_rows(log_history: list[dict]) -> list[dict]:
    """One row per logged step: step, train/val loss, learning rate, grad norm, tokens seen, tokens/s."""
    by_step: dict[int, dict] = {}
    for entry in log_history:
        row = by_step.setdefault(entry["step"], {"step": entry["step"], **dict.fromkeys(LOSS_COLUMNS)})
        if "loss" in entry:
            row.update(
                train_loss=entry["loss"], learning_rate=entry.get("learning_rate"), grad_norm=entry.get("grad_norm")
            )
        if "eval_loss" in entry:
            row.update(val_loss=entry["eval_loss"], tokens_per_second=entry.get("tokens_per_second"))
        if entry.get("num_input_tokens_seen") is not None:
            row["tokens_seen"] = int(entry["num_input_tokens_seen"])
    return [row for _, row in sorted(by_step.items()) if row["train_loss"] is not None or row["val_loss"] is not None]


def overfitting_note(rows: list[dict]) -> str | None:
    """A sentence when validation loss rose between two evaluations while training loss kept falling
    (the training loss compared is the last one logged at or before each evaluation); else None."""
    evaluations = []
    train = None
    for row in rows:
        train = row["train_loss"] if row["train_loss"] is not None else train
        if row["val_loss"] is not None and train is not None:
            evaluations.append((row["step"], row["val_loss"], train))
    for (a, val_a, train_a), (b, val_b, train_b) in itertools.pairwise(evaluations):
        if val_b > val_a and train_b < train_a:
            return (
                f"overfitting: validation loss rose from {val_a:.4f} (step {a}) to {val_b:.4f} (step {b}) "
                f"while training loss fell from {train_a:.4f} to {train_b:.4f}"
            )
    return None


def build_trainer(params: Params, paths: Paths, model, tokenizer, data, optimizer: str):
    """The Trainer with the watching callbacks (lines, samples, MLflow), the NaN guard, early stopping, and
    mixed precision chosen from the device and the compute dtype (`trainer_precision`)."""
    from transformers import EarlyStoppingCallback, ProgressCallback, Trainer

    from stages.training.batching import labelled_loss, training_collator
    from stages.training.watch import FiniteLossGuard, MlflowStream, QuietProgress, WatchCallback, validation_samples

    cfg = params.train
    scheduler, warmup, note = choose_schedule(cfg)
    if note:
        print(note)
    precision = trainer_precision(device(), compute_dtype(params.quantization.compute_dtype), fast_bf16_cpu())
    samples = validation_samples(tokenizer, data["val"], cfg.sample_prompts)
    stream = MlflowStream.from_environment()
    watch = WatchCallback(tokenizer, samples, cfg.sample_new_tokens, paths.train_scratch / "samples.jsonl", stream)
    callbacks = [FiniteLossGuard(), watch]
    if cfg.early_stopping_patience > 0:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=cfg.early_stopping_patience))
    trainer = Trainer(
        model=model,
        args=training_arguments(cfg, paths.train_scratch, optimizer, scheduler, warmup, precision),
        train_dataset=data["train"],
        eval_dataset=data["val"],
        data_collator=training_collator(tokenizer, cfg.padding_free),
        compute_loss_func=labelled_loss,
        callbacks=callbacks,
    )
    if trainer.pop_callback(ProgressCallback):
        trainer.add_callback(QuietProgress())
    return trainer, watch


def prepare_model(params: Params, paths: Paths):
    """(tokenizer, 4-bit base with LoRA attached; under FSDP its 4-bit weights are stored shardable); prints
    what is trainable."""
    tokenizer = load_tokenizer(paths.base_model)
    base = load_base(paths.base_model, params.quantization, sharded=distributed.under_fsdp())
    model = attach_lora(base, params.lora, params.train.gradient_checkpointing)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"trainable LoRA parameters: {trainable:,} ({trainable * 4 / 1e6:.1f} MB in fp32)")
    return tokenizer, model


def run(params: Params, paths: Paths) -> Result | str:
    """Train LoRA adapters on the 4-bit base (resuming a matching checkpoint); write the adapter, metrics,
    loss curve and samples atomically once training completes. In a multi-process run every rank trains and
    rank 0 alone prepares the checkpoint folder and writes; the other ranks return a line saying what they did."""
    from datasets import load_from_disk
    from transformers import set_seed

    cfg = params.train
    optimizer, optimizer_note = choose_optimizer(cfg.optimizer)
    for note in (optimizer_note, dtype_note(params.quantization)):
        if note:
            print(f"note: {note}")
    set_threads(distributed.threads_per_process(cfg.threads))
    resume = distributed.on_main_then_share(
        lambda: prepare_scratch(paths.train_scratch, fingerprint(params, paths.tokenized, paths.base_model, paths.root))
    )
    set_seed(cfg.seed)
    tokenizer, model = prepare_model(params, paths)
    data = load_from_disk(str(paths.tokenized))
    trainer, watch = build_trainer(params, paths, model, tokenizer, data, optimizer)
    seen = distributed.record_training_examples(trainer)
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    seconds = time.perf_counter() - started  # this session only, validation passes and samples included
    processes = distributed.process_facts(seen, cfg.batch_size * cfg.grad_accum * distributed.world_size())
    # The adapter's full weights on every rank (FSDP gathers its shards here, also in a single process; DDP:
    # as is). One plain process saves from the model itself.
    wrapped = distributed.world_size() > 1 or distributed.under_fsdp()
    state_dict = trainer.accelerator.get_state_dict(trainer.model_wrapped) if wrapped else None
    if not distributed.is_main():
        return distributed.follower_summary(seen)
    metrics = write_outputs(params, paths, trainer, model, tokenizer, seconds, watch.tokens_at_start, state_dict)
    metrics.update(optimizer=optimizer, resumed_from_step=int(resume.name.rsplit("-", 1)[1]) if resume else 0)
    metrics["processes"] = processes
    write_json(paths.train_metrics, metrics)
    if watch.stream:
        watch.stream.artifact(paths.loss_chart, "plots")
    shutil.rmtree(paths.train_scratch)  # finished: the next run starts fresh
    print(f"adapter: {metrics['adapter_mb']:.1f} MB in {paths.adapter}; val loss {metrics['val_loss']:.4f}")
    return Result(
        steps=metrics["steps"],
        train_loss=metrics["train_loss"] if metrics["train_loss"] is not None else math.nan,
        val_loss=metrics["val_loss"],
        trainable_parameters=metrics["trainable_parameters"],
        adapter_mb=metrics["adapter_mb"],
        tokens_per_second=metrics["tokens_per_second"],
        stopped_early=metrics["stopped_early"],
        resumed_from_step=metrics["resumed_from_step"],
    )


def write_outputs(
    params, paths: Paths, trainer, model, tokenizer, seconds: float, tokens_at_start: int, state_dict=None
) -> dict:
    """Write the adapter (from `state_dict` when given), plots/loss.csv, the loss chart and the samples;
    return the metrics for train.json. Rank 0 only."""
    state = trainer.state
    rows = loss_rows(state.log_history)
    with atomic_path(paths.adapter) as tmp:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
    write_csv(paths.loss_plot, rows)
    loss_curve(rows, paths.loss_chart)
    samples = paths.train_scratch / "samples.jsonl"
    write_text(paths.train_samples, samples.read_text(encoding="utf-8") if samples.is_file() else "")
    evaluated = [r for r in rows if r["val_loss"] is not None]
    train_losses = [r["train_loss"] for r in rows if r["train_loss"] is not None]
    restored = params.train.early_stopping_patience > 0 and state.best_model_checkpoint is not None
    overfitting = overfitting_note(rows)
    if overfitting:
        print(overfitting)
    tokens = int(state.num_input_tokens_seen)
    return {
        "steps": state.global_step,
        "epochs": round(state.epoch or 0.0, 4),
        "train_loss": train_losses[-1] if train_losses else None,
        "val_loss": state.best_metric if restored else evaluated[-1]["val_loss"],  # of the adapter written
        "last_val_loss": evaluated[-1]["val_loss"],
        "best_step": state.best_global_step if restored else evaluated[-1]["step"],
        "stopped_early": state.global_step < state.max_steps,
        "overfitting": overfitting,
        "tokens_seen": tokens,
        "train_seconds": round(seconds, 1),
        "tokens_per_second": round((tokens - tokens_at_start) / seconds, 1),
        "trainable_parameters": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "adapter_mb": round((paths.adapter / "adapter_model.safetensors").stat().st_size / 1e6, 2),
    }


def print_plan(params: Params, paths: Paths) -> str:
    """`--plan`: print parameters, adapter size, base memory and FLOPs per token from the config alone."""
    from stages.training.planner import plan, plan_text

    report = plan(params, paths)
    print(plan_text(report))
    return f"{report.trainable:,} trainable parameters"


def main(argv: list[str] | None = None) -> int:
    """Train here, or with `train.launcher: accelerate` start this stage in train.num_processes processes."""
    launched = relaunch("train_qlora", argv)
    if launched is not None:
        return launched
    return run_stage(SPEC, run, argv, actions={"--plan": print_plan})


if __name__ == "__main__":
    raise SystemExit(main())
