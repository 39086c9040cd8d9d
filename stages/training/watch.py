"""Trainer callbacks that let a person watch training: one line per evaluation, samples, MLflow, a NaN guard.

- `WatchCallback`: at every evaluation prints validation loss, last training loss, learning rate, gradient
  norm, tokens seen and tokens per second (training time only, evaluations and saving left out), completes
  a few fixed validation prompts greedily and prints them, appends them to `<scratch>/samples.jsonl`, and
  streams the numbers and samples to MLflow when MLFLOW_RUN_ID names a run (the stage adds the loss chart
  there at the end). When several processes train, rank 0 alone prints, samples and streams.
- `FiniteLossGuard`: stops training at the optimizer step whose gradients (or logged loss) are NaN or
  infinite, with the step and learning rate in the error.
- `QuietProgress`: the Trainer's progress bar without its dict print at every logging step.

The stage imports this module inside `run()`, since it imports transformers (`python -m stages.train_qlora`).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import ProgressCallback, TrainerCallback

from stages.common.errors import StageError
from stages.common.labels import IGNORE_INDEX
from stages.tracking.names import curve
from stages.tracking.store import QUICK_HTTP_SETTINGS, is_server, shown_uri, without_password

RUN_ID_VARIABLE = "MLFLOW_RUN_ID"  # set by whoever owns the MLflow run (the flow); the stage only logs to it
URI_VARIABLE = "MLFLOW_TRACKING_URI"  # the store that run lives in, set beside it


class NonFiniteLoss(StageError):
    """Training produced a NaN or infinite loss; no adapter is written."""


@dataclass(frozen=True)
class Sample:
    prompt_ids: list[int]
    prompt: str
    truth: str


def validation_samples(tokenizer, rows, count: int) -> list[Sample]:
    """The first `count` tokenized validation rows as prompts (the tokens without labels) and truths."""
    samples = []
    for row in rows.select(range(min(count, len(rows)))):
        prompt_length = next((i for i, label in enumerate(row["labels"]) if label != IGNORE_INDEX), len(row["labels"]))
        prompt_ids = row["input_ids"][:prompt_length]
        samples.append(
            Sample(
                prompt_ids=prompt_ids,
                prompt=tokenizer.decode(prompt_ids, skip_special_tokens=True),
                truth=tokenizer.decode(row["input_ids"][prompt_length:], skip_special_tokens=True),
            )
        )
    return samples


def complete(model, tokenizer, samples: list[Sample], max_new_tokens: int) -> list[str]:
    """Greedy completions of each sample's prompt, one at a time (a few prompts: no padding needed)."""
    outputs = []
    for sample in samples:
        ids = torch.tensor([sample.prompt_ids], device=model.device)
        with torch.inference_mode():
            generated = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        outputs.append(tokenizer.decode(generated[0, ids.shape[1] :], skip_special_tokens=True))
    return outputs


class MlflowStream:
    """Logs to the existing MLflow run named by MLFLOW_RUN_ID (never starts or ends one). The first failure
    prints one warning and turns logging off, so tracking never stops training."""

    def __init__(self, run_id: str, uri: str):
        self.run_id, self.uri, self.client, self.failed = run_id, uri, None, False
        if is_server(uri):  # a server that went down costs seconds of training, not MLflow's ~4.5 min of retries
            for variable, value in QUICK_HTTP_SETTINGS.items():
                os.environ.setdefault(variable, value)

    @classmethod
    def from_environment(cls) -> MlflowStream | None:
        """The stream to the run in $MLFLOW_RUN_ID at $MLFLOW_TRACKING_URI (the flow sets both; the stage reads
        no `tracking` params, so changing them never re-runs training); None when there is no run to log to."""
        run_id, uri = os.environ.get(RUN_ID_VARIABLE), os.environ.get(URI_VARIABLE)
        if run_id and not uri:
            print(f"note: {RUN_ID_VARIABLE} is set without {URI_VARIABLE}; curves are logged by record_run at the end")
        return cls(run_id, uri) if run_id and uri else None

    def _call(self, action) -> None:
        if self.failed:
            return
        try:
            if self.client is None:
                import mlflow

                self.client = mlflow.MlflowClient(tracking_uri=self.uri)
            action(self.client)
        except Exception as exc:  # tracking must never stop training
            self.failed = True
            why = without_password(str(exc), self.uri)  # the URI, and so its password, is in MLflow's errors
            where = shown_uri(self.uri)
            print(f"warning: MLflow logging to run {self.run_id} at {where} failed ({why}); training goes on")

    def metrics(self, step: int, values: dict[str, float]) -> None:
        def log(client):
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            given = {k: v for k, v in values.items() if v is not None}
            batch = [Metric(key=curve(k), value=float(v), timestamp=now, step=step) for k, v in given.items()]
            client.log_batch(self.run_id, metrics=batch)

        self._call(log)

    def text(self, step: int, text: str) -> None:
        self._call(lambda client: client.log_text(self.run_id, text, f"samples/step_{step:06d}.txt"))

    def artifact(self, path: Path, folder: str) -> None:
        self._call(lambda client: client.log_artifact(self.run_id, str(path), folder))


def last_training_entry(log_history: list[dict]) -> dict:
    """The most recent logged training entry (loss, learning rate, grad norm), or {} before the first."""
    return next((entry for entry in reversed(log_history) if "loss" in entry), {})


def evaluation_line(step: int, max_steps: int, val_loss: float, train: dict, tokens: int, speed: float) -> str:
    """One console line per evaluation."""

    def number(key: str, spec: str) -> str:
        return format(train[key], spec) if train.get(key) is not None else "-"

    return (
        f"step {step:>5}/{max_steps} | val loss {val_loss:.4f} | train loss {number('loss', '.4f')} | "
        f"lr {number('learning_rate', '.2e')} | grad norm {number('grad_norm', '.3f')} | "
        f"tokens {tokens:,} | {speed:,.0f} tokens/s"
    )


def samples_text(step: int, rows: list[dict]) -> str:
    """The samples of one evaluation as readable text (console and MLflow)."""
    lines = [f"samples at step {step}:"]
    for i, row in enumerate(rows, start=1):
        prompt = " / ".join(row["prompt"].split("\n"))
        lines.append(f"  [{i}] truth {row['truth']!r} | model {row['completion']!r} | prompt ...{prompt[-70:]!r}")
    return "\n".join(lines)


def kept_samples(path: Path, up_to_step: int) -> None:
    """Drop sample lines written after `up_to_step` (a resumed run repeats those steps)."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    path.write_text("".join(f"{x}\n" for x in lines if json.loads(x)["step"] <= up_to_step), encoding="utf-8")


class WatchCallback(TrainerCallback):
    """Per-evaluation lines, samples (console, `samples_file`, MLflow) and live MLflow metrics."""

    def __init__(self, tokenizer, samples: list[Sample], new_tokens: int, samples_file: Path, stream):
        self.tokenizer, self.samples, self.new_tokens = tokenizer, samples, new_tokens
        self.samples_file, self.stream = samples_file, stream
        self.train_seconds, self.step_started, self.tokens_at_start = 0.0, 0.0, 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.tokens_at_start = state.num_input_tokens_seen
        if state.is_world_process_zero:
            kept_samples(self.samples_file, state.global_step)

    def on_step_begin(self, args, state, control, **kwargs):
        self.step_started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.train_seconds += time.perf_counter() - self.step_started

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.stream and logs and "loss" in logs and state.is_world_process_zero:
            keys = {"loss": "train_loss", "learning_rate": "learning_rate", "grad_norm": "grad_norm"}
            self.stream.metrics(state.global_step, {name: logs.get(key) for key, name in keys.items()})

    def on_evaluate(self, args, state, control, metrics=None, model=None, **kwargs):
        step, val_loss = state.global_step, metrics["eval_loss"]
        tokens = int(state.num_input_tokens_seen)
        speed = (tokens - self.tokens_at_start) / self.train_seconds if self.train_seconds > 0 else 0.0
        if state.log_history and "eval_loss" in state.log_history[-1]:
            state.log_history[-1]["tokens_per_second"] = round(speed, 1)  # kept in checkpoints, read into the CSV
        if not state.is_world_process_zero:  # several processes: rank 0 alone prints, samples and streams
            return
        train = last_training_entry(state.log_history)
        tqdm.write(evaluation_line(step, state.max_steps, val_loss, train, tokens, speed))
        if self.stream:
            values = {"val_loss": val_loss, "tokens_seen": tokens, "tokens_per_second": speed}
            self.stream.metrics(step, values)
        if self.samples:
            self.write_samples(step, model)

    def write_samples(self, step: int, model) -> None:
        completions = complete(model, self.tokenizer, self.samples, self.new_tokens)
        rows = [
            {"step": step, "index": i, "prompt": s.prompt, "truth": s.truth, "completion": c}
            for i, (s, c) in enumerate(zip(self.samples, completions, strict=True))
        ]
        text = samples_text(step, rows)
        tqdm.write(text)
        with self.samples_file.open("a", encoding="utf-8") as fh:
            fh.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
        if self.stream:
            self.stream.text(step, text)


class FiniteLossGuard(TrainerCallback):
    """Raises NonFiniteLoss at the optimizer step whose gradients, training loss or validation loss are
    NaN or infinite, before the optimizer applies them."""

    def on_pre_optimizer_step(self, args, state, control, model=None, lr_scheduler=None, **kwargs):
        grads = (p.grad for p in model.parameters() if p.requires_grad and p.grad is not None)
        if not all(bool(torch.isfinite(g).all()) for g in grads):
            self.stop("gradients", state.global_step + 1, lr_scheduler.get_last_lr()[0])

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs and not math.isfinite(logs["loss"]):
            self.stop(f"training loss ({logs['loss']})", state.global_step, logs.get("learning_rate"))

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if not math.isfinite(metrics["eval_loss"]):
            last = last_training_entry(state.log_history).get("learning_rate")
            self.stop(f"validation loss ({metrics['eval_loss']})", state.global_step, last)

    @staticmethod
    def stop(what: str, step: int, learning_rate: float | None) -> None:
        raise NonFiniteLoss(
            f"non-finite {what} at step {step} (learning rate {learning_rate}); training stopped there and no "
            "adapter was written: lower train.learning_rate, raise the warmup or check the data"
        )


class QuietProgress(ProgressCallback):
    """The Trainer's progress bar, without printing every log dict (WatchCallback prints the useful lines)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        return None
