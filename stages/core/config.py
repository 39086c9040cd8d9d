"""Typed view of params.yaml: one frozen dataclass per section.

`load_params("params.yaml")` returns a `Params`; unknown keys, missing sections and values of the
wrong type raise `ConfigError` naming the section and key. Stages read only the sections they declare
in dvc.yaml, so DVC re-runs exactly the stages whose parameters changed.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REMOTE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")  # a DVC remote name, never a URL


class ConfigError(ValueError):
    """params.yaml is missing a key, has an unknown one, or holds a value of the wrong type."""


# How train_qlora runs: in this process, or in processes started by `accelerate launch` (stages/core/launcher.py).
LAUNCHERS = ("single", "accelerate")


@dataclass(frozen=True)
class BaseModelConfig:
    source: str = "embedded:smollm2"  # "embedded:smollm2", a Hub model id, or a local model directory
    revision: str = "main"  # Hub branch, tag or commit hash; ignored for local sources
    hub_id: str | None = None  # id for adapter_config.json and the card; None: derived from the source
    license: str = "apache-2.0"


@dataclass(frozen=True)
class DataConfig:
    source: str = "embedded:diamonds"  # "embedded:diamonds", a .csv/.jsonl/.parquet path, or a Hub dataset id
    revision: str | None = None  # Hub dataset revision
    hub_config: str | None = None  # Hub dataset configuration (subset) name
    hub_split: str = "train"  # split of the Hub dataset to read
    shape: str = "price"  # "price" (text + numeric target), "prompt_completion" or "chat"
    text_column: str = "text"
    price_column: str = "price"
    prompt_column: str = "prompt"
    completion_column: str = "completion"
    messages_column: str = "messages"
    max_row_chars: int = 50000  # rows whose mapped text is longer are dropped and counted
    min_price: float = 0.01
    max_price: float | None = None
    min_text_chars: int = 1
    scrub: bool = False  # price shape: remove scrub_phrases and part-number-like words
    scrub_phrases: list[str] = field(default_factory=list)
    min_text_words: int = 0  # price shape: fewer words (after scrubbing) drop the row; 0 = off
    max_text_words: int = 0  # price shape: longer descriptions are cut to this many words; 0 = off
    balance_per_price: int = 0  # price shape: at most this many rows per whole-dollar price; 0 = off
    seed: int = 42
    n_test: int = 200
    n_val: int = 50
    n_train: int = 1000
    test_split: str | None = None  # a kept copy of an earlier data/splits/test.jsonl: the test set, as is


@dataclass(frozen=True)
class PromptConfig:
    template: str = "How much does this cost to the nearest dollar?\n\n{text}\n\nPrice is $"
    completion: str = "{price:.0f}.00"
    max_length: int = 182
    add_eos: bool = True


@dataclass(frozen=True)
class QuantizationConfig:
    load_in_4bit: bool = True
    quant_type: str = "nf4"
    double_quant: bool = True
    compute_dtype: str = "auto"  # "auto": bfloat16 on CUDA, float32 on CPU


@dataclass(frozen=True)
class LoraConfig:
    r: int = 32
    alpha: int = 64
    dropout: float = 0.1
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 42
    epochs: float = 1.0
    max_steps: int = -1
    batch_size: int = 4
    grad_accum: int = 1
    learning_rate: float = 1e-4
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    warmup_steps: int = 0  # > 0 overrides warmup_ratio
    weight_decay: float = 0.001
    max_grad_norm: float = 0.3
    optimizer: str = "auto"  # auto, adamw_torch, adamw_bnb_8bit, paged_adamw_32bit, paged_adamw_8bit (CUDA)
    eval_steps: int = 50
    logging_steps: int = 10
    save_steps: int = 50  # checkpoint every N optimizer steps in .cache/train_qlora/ (resume after a crash)
    early_stopping_patience: int = 0  # evaluations without a lower val loss before stopping; 0: off
    sample_prompts: int = 3  # validation prompts completed greedily at each evaluation
    sample_new_tokens: int = 8
    gradient_checkpointing: bool = False
    threads: int = 0
    group_by_length: bool = False  # batch examples of similar length together: less padding, less random
    padding_free: bool = False  # concatenate each batch into one row without padding (position ids restart)
    launcher: str = "single"  # "single": this process; "accelerate": `accelerate launch` starts num_processes
    num_processes: int = 2  # processes accelerate starts: one per GPU, or CPU processes on gloo
    accelerate_config: str | None = None  # accelerate config YAML (DDP, FSDP), relative to the project root

    def __post_init__(self):
        if self.launcher not in LAUNCHERS:
            raise ConfigError(f"train.launcher: expected one of {list(LAUNCHERS)}, got {self.launcher!r}")
        if self.num_processes < 1:
            raise ConfigError(f"train.num_processes: expected at least 1, got {self.num_processes}")
        if self.accelerate_config is not None and not self.accelerate_config.endswith((".yaml", ".yml", ".json")):
            raise ConfigError(
                f"train.accelerate_config: expected an accelerate config file (.yaml, .yml or .json) or null, "
                f"got {self.accelerate_config!r}"
            )


@dataclass(frozen=True)
class EvaluateConfig:
    batch_size: int = 16
    max_new_tokens: int = 8
    show_items: bool = True  # one line per test item, coloured by band on a terminal
    bootstrap_samples: int = 1000  # resamples for the 95% interval of the average error (0: none)
    topk_estimate: bool = False  # also score the one-pass top-k estimate, where prices are single tokens
    topk: int = 5


@dataclass(frozen=True)
class ExportConfig:
    push: bool = False
    repo_id: str | None = None
    private: bool = True
    create_pr: bool = False
    merge: bool = False  # also export the adapter merged into an unquantized base
    merge_into: str = "dequantized"  # "dequantized" NF4 weights (the evaluated model) or "unquantized" originals
    merge_check_items: int = 8  # test items predicted by both merged and unmerged models before export
    merge_tolerance: float = 0.01  # largest relative price difference allowed between the two


@dataclass(frozen=True)
class TrackingConfig:
    experiment: str = "qlora-price"
    registered_model: str = "qlora-price-adapter"  # MLflow registry name; its `champion` alias is compared
    tracking_uri: str | None = None  # default: sqlite:///<project root>/mlflow.db
    primary_metric: str = "auto"  # key of the adapter's row in metrics/eval.json that decides promotion
    greater_is_better: bool = False
    min_improvement: float = 0.0  # in the metric's units: a challenger must beat the champion by more

    def __post_init__(self):
        if self.min_improvement < 0:
            raise ConfigError(f"tracking.min_improvement: must be >= 0, got {self.min_improvement}")


@dataclass(frozen=True)
class FlowConfig:
    stage_retries: int = 0
    retry_delay_seconds: int = 10
    schedule: str = "0 3 * * *"  # cron for `python -m flows.serve`
    timezone: str = "UTC"
    deployment: str = "scheduled-retrain"
    lock_wait_seconds: int = 0  # a second retrain on this workspace waits this long for the first, then stops
    push: bool = False  # `dvc push` the outputs to a DVC remote after every successful run
    remote: str | None = None  # the DVC remote's name; None: the default remote (`dvc remote add -d`)

    def __post_init__(self):
        for key in ("stage_retries", "retry_delay_seconds", "lock_wait_seconds"):
            if getattr(self, key) < 0:
                raise ConfigError(f"flow.{key}: must be >= 0, got {getattr(self, key)}")
        if self.remote is not None and not REMOTE_NAME.fullmatch(self.remote):
            raise ConfigError(
                f"flow.remote: expected the name of a DVC remote (as in `dvc remote list`) or null, got "
                f"{self.remote!r}; the remote's URL belongs in .dvc/config (`dvc remote add`), not here"
            )


@dataclass(frozen=True)
class Params:
    base_model: BaseModelConfig
    data: DataConfig
    prompt: PromptConfig
    quantization: QuantizationConfig
    lora: LoraConfig
    train: TrainConfig
    evaluate: EvaluateConfig
    export: ExportConfig
    tracking: TrackingConfig
    flow: FlowConfig


def _coerce(value, hint, where: str):
    """Return `value` checked against the type `hint`; raise ConfigError naming `where` otherwise."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        (inner,) = [o for o in options if o is not type(None)]
        return _coerce(value, inner, where)
    if origin is list:
        (inner,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        # YAML 1.1 reads "2e-4" as a string; DVC's `-S key=2e-4` can write it that way.
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif hint is str and isinstance(value, str):
        return value
    raise ConfigError(f"{where}: expected {getattr(hint, '__name__', hint)}, got {value!r}")


def section_from_dict(cls, data: dict | None, name: str):
    """Build the dataclass `cls` for section `name` from a dict, rejecting unknown keys."""
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"params section '{name}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"params section '{name}': unknown key(s) {unknown}; known keys are {sorted(known)}")
    values = {key: _coerce(value, hints[key], f"{name}.{key}") for key, value in data.items()}
    return cls(**values)


def params_from_dict(raw: dict) -> Params:
    """Build `Params` from the parsed YAML mapping; every section may be omitted to take defaults."""
    if not isinstance(raw, dict):
        raise ConfigError("params.yaml must be a mapping of sections")
    hints = typing.get_type_hints(Params)
    unknown = sorted(set(raw) - set(hints))
    if unknown:
        raise ConfigError(f"params.yaml: unknown section(s) {unknown}; known sections are {sorted(hints)}")
    return Params(**{name: section_from_dict(cls, raw.get(name), name) for name, cls in hints.items()})


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml; raise ConfigError with the file name on any problem."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: parameters file not found (run from the project root)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    try:
        return params_from_dict(raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def flatten(params: Params) -> dict[str, object]:
    """Flatten params into {"section.key": value} for MLflow (lists joined by commas)."""
    flat: dict[str, object] = {}
    for section in dataclasses.fields(params):
        for key, value in dataclasses.asdict(getattr(params, section.name)).items():
            flat[f"{section.name}.{key}"] = ",".join(map(str, value)) if isinstance(value, list) else value
    return flat
