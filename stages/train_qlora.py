"""Stage `train_qlora`: fine-tune LoRA adapters on the base model loaded in 4-bit NF4 (QLoRA).

Reads models/base/, data/tokenized/{train,val} and params `quantization`, `lora` and `train`.
The base is loaded in 4 bits with bitsandbytes (double quantization; float32 compute on CPU, bfloat16
on CUDA), prepared for k-bit training, and wrapped with LoRA adapters on `lora.target_modules`. Training
uses the Hugging Face Trainer: AdamW (paged on CUDA), a cosine (or other) schedule with warmup, gradient
accumulation and clipping, and validation loss every `train.eval_steps` optimizer steps. Seeds are set
before the adapter is created, so a run is repeatable.
Writes models/adapter/ (adapter_model.safetensors, adapter_config.json, tokenizer),
metrics/train.json, plots/loss.csv and reports/loss_curve.png.

Run: `python -m stages.train_qlora` (or `dvc repro train_qlora`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from stages.core.charts import loss_curve
from stages.core.cli import StageError, run_stage
from stages.core.config import LoraConfig, Params, TrainConfig
from stages.core.io import atomic_path, write_csv, write_json
from stages.core.modeling import device, load_base, load_tokenizer, set_threads
from stages.core.paths import Paths
from stages.core.prompts import IGNORE_INDEX

SCRATCH = ".cache/train_qlora"  # Trainer's output_dir: scratch space, never a DVC output


@dataclass(frozen=True)
class Result:
    steps: int
    train_loss: float
    val_loss: float
    trainable_parameters: int
    adapter_mb: float
    tokens_per_second: float


def choose_optimizer(name: str) -> str:
    """The Trainer optimizer for `train.optimizer`: "auto" is paged AdamW on CUDA, torch AdamW on CPU."""
    on_cuda = device() == "cuda"
    if name == "auto":
        return "paged_adamw_32bit" if on_cuda else "adamw_torch"
    if "paged" in name and not on_cuda:
        raise StageError(
            f"train.optimizer={name!r} pages optimizer state to CPU memory and needs CUDA; "
            "use auto or adamw_torch on this machine"
        )
    return name


def attach_lora(model, cfg: LoraConfig, gradient_checkpointing: bool):
    """Prepare a 4-bit model for training and wrap it with LoRA adapters; print what is trainable."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model, prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    lora = PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, lora)
    except ValueError as exc:
        raise StageError(f"lora.target_modules={cfg.target_modules}: {exc}") from exc


def training_arguments(cfg: TrainConfig, output_dir: str):
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=output_dir,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        per_device_train_batch_size=cfg.batch_size,
        per_device_eval_batch_size=cfg.batch_size * 2,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=cfg.warmup_ratio,  # transformers 5: a value below 1 is a fraction of all steps
        weight_decay=cfg.weight_decay,
        max_grad_norm=cfg.max_grad_norm,
        optim=choose_optimizer(cfg.optimizer),
        eval_strategy="steps",
        eval_steps=cfg.eval_steps,
        logging_steps=cfg.logging_steps,
        save_strategy="no",
        seed=cfg.seed,
        data_seed=cfg.seed,
        use_cpu=device() == "cpu",
        bf16=False,
        include_num_input_tokens_seen="non_padding",
        report_to="none",
        dataloader_num_workers=0,
    )


def loss_rows(log_history: list[dict]) -> list[dict]:
    """One row per logged step: step, train/val loss, learning rate, grad norm, tokens seen."""
    by_step: dict[int, dict] = {}
    for entry in log_history:
        row = by_step.setdefault(
            entry["step"],
            {
                "step": entry["step"],
                "train_loss": None,
                "val_loss": None,
                "learning_rate": None,
                "grad_norm": None,
                "tokens_seen": None,
            },
        )
        if "loss" in entry:
            row.update(
                train_loss=entry["loss"], learning_rate=entry.get("learning_rate"), grad_norm=entry.get("grad_norm")
            )
        if "eval_loss" in entry:
            row["val_loss"] = entry["eval_loss"]
        if entry.get("num_input_tokens_seen") is not None:
            row["tokens_seen"] = int(entry["num_input_tokens_seen"])
    return [by_step[s] for s in sorted(by_step) if by_step[s]["train_loss"] or by_step[s]["val_loss"]]


def check_finite(rows: list[dict]) -> None:
    """Stop with the step and learning rate when a logged loss is NaN or infinite."""
    for row in rows:
        for key in ("train_loss", "val_loss"):
            if row[key] is not None and not math.isfinite(row[key]):
                raise StageError(
                    f"{key} became {row[key]} at step {row['step']} "
                    f"(learning rate {row['learning_rate']}); lower train.learning_rate"
                )


def run(params: Params, paths: Paths) -> Result:
    """Train LoRA adapters on the 4-bit base; write the adapter, metrics and loss curve atomically."""
    from datasets import load_from_disk
    from transformers import DataCollatorForSeq2Seq, Trainer, set_seed

    cfg = params.train
    set_threads(cfg.threads)
    set_seed(cfg.seed)
    tokenizer = load_tokenizer(paths.base_model)
    model = attach_lora(load_base(paths.base_model, params.quantization), params.lora, cfg.gradient_checkpointing)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"trainable LoRA parameters: {trainable:,} ({trainable * 4 / 1e6:.1f} MB in fp32)")
    data = load_from_disk(str(paths.tokenized))
    collator = DataCollatorForSeq2Seq(tokenizer, padding="longest", label_pad_token_id=IGNORE_INDEX)
    trainer = Trainer(
        model=model,
        args=training_arguments(cfg, str(paths.root / SCRATCH)),
        train_dataset=data["train"],
        eval_dataset=data["val"],
        data_collator=collator,
    )
    started = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - started  # includes the periodic validation passes
    evaluated = [e for e in trainer.state.log_history if "eval_loss" in e]
    if not evaluated or evaluated[-1]["step"] != trainer.state.global_step:
        trainer.evaluate()  # appends the final validation loss to log_history
    rows = loss_rows(trainer.state.log_history)
    check_finite(rows)
    tokens = int(trainer.state.num_input_tokens_seen)
    with atomic_path(paths.adapter) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
    adapter_mb = (paths.adapter / "adapter_model.safetensors").stat().st_size / 1e6
    train_losses = [r["train_loss"] for r in rows if r["train_loss"] is not None]
    metrics = {
        "steps": trainer.state.global_step,
        "epochs": round(trainer.state.epoch or 0.0, 4),
        "train_loss": train_losses[-1] if train_losses else None,
        "val_loss": [r["val_loss"] for r in rows if r["val_loss"] is not None][-1],
        "tokens_seen": tokens,
        "train_seconds": round(seconds, 1),
        "tokens_per_second": round(tokens / seconds, 1),
        "trainable_parameters": trainable,
        "adapter_mb": round(adapter_mb, 2),
    }
    write_json(paths.train_metrics, metrics)
    write_csv(paths.loss_plot, rows)
    loss_curve(rows, paths.loss_chart)
    print(f"adapter: {adapter_mb:.1f} MB in {paths.adapter}; final val loss {metrics['val_loss']:.4f}")
    return Result(
        steps=metrics["steps"],
        train_loss=metrics["train_loss"] or math.nan,
        val_loss=metrics["val_loss"],
        trainable_parameters=trainable,
        adapter_mb=metrics["adapter_mb"],
        tokens_per_second=metrics["tokens_per_second"],
    )


def main(argv: list[str] | None = None) -> int:
    return run_stage("train_qlora", run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
