"""Typed view of params.yaml: one frozen dataclass per section, the one place where every parameter's default,
allowed values and range are declared.

`load_params("params.yaml")` returns a `Params`. Unknown keys, missing sections, values of the wrong type and
values outside their allowed set or range raise `ConfigError` naming the section and key, while params are
loaded, before any stage does work. params.yaml holds these same defaults with comments on effect and cost
(tests/common/test_config.py checks that the two agree); a section left out of params.yaml takes them.
`params.only(sections, stage)` is what a stage is handed: the sections its SPEC declares, and nothing else.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import yaml

from stages.common.errors import ConfigError

REMOTE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")  # a DVC remote name, never a URL

# Allowed values, each declared once; the modules that act on them import them from here.
PRICE, PAIR, CHAT = "price", "prompt_completion", "chat"
SHAPES = (PRICE, PAIR, CHAT)  # what a row of data is (stages/common/shapes.py)
QUANT_TYPES = ("nf4", "fp4")
COMPUTE_DTYPES = ("auto", "float32", "bfloat16", "float16")  # auto: bfloat16 on CUDA, float32 on a CPU
OPTIMIZERS = ("auto", "adamw_torch", "adamw_bnb_8bit", "paged_adamw_32bit", "paged_adamw_8bit")
SCHEDULERS = ("cosine", "linear", "constant", "constant_with_warmup")
LAUNCHERS = ("single", "accelerate")  # train_qlora in this process, or under `accelerate launch`
MERGE_TARGETS = ("dequantized", "unquantized")
GGUF_TYPES = ("f16", "q8_0")  # export.gguf: GGUF files of the merged model (serving/gguf.py)
SWEEP_METHODS = ("grid", "random")  # every combination of the swept values, or `sweep.trials` drawn from them
SWEEP_BACKENDS = ("local", "prefect")  # DVC's queue on this machine, or flow runs on a Prefect work pool's workers
SWEEP_REGISTER = ("best", "all")  # which trials get a registry version (only the best meets the gate)
# The metrics the promotion gate can decide on: {name: (the data shapes they score, greater is better)}.
# stages/tracking/gate.py computes each from per-item results; "auto" is avg_error for prices, loss otherwise.
TEXT_SHAPES = (PAIR, CHAT)
PRIMARY_METRICS = {
    "avg_error": ((PRICE,), False),
    "rmsle": ((PRICE,), False),
    "hit_rate": ((PRICE,), True),
    "mse": ((PRICE,), False),
    "r2": ((PRICE,), True),
    "loss": (TEXT_SHAPES, False),
    "perplexity": (TEXT_SHAPES, False),
    "exact_match": (TEXT_SHAPES, True),
}


# Keys that were replaced, with what to write instead: the message a params.yaml from before meets.
RENAMED = {
    "data.n_test": "replaced by data.test_fraction, the share of rows in the test set (a row's split now follows "
    "from its key, so rows that arrive later never move the old ones); e.g. 200 of 45,000 rows is 0.0044",
    "data.n_val": "replaced by data.val_fraction, the share of rows in the validation set; e.g. 40 of 45,000 rows "
    "is 0.0009",
}


def one_of(default, choices: tuple):
    return field(default=default, metadata={"choices": choices})


def at_least(default, low, *, or_value=None):
    """A number >= `low` (or exactly `or_value`, a switch such as -1 for "all")."""
    return field(default=default, metadata={"low": low, "or_value": or_value})


def above(default, low):
    return field(default=default, metadata={"above": low})


def fraction(default):
    """A number in [0, 1)."""
    return field(default=default, metadata={"low": 0, "below": 1})


def share(default):
    """A number in (0, 1)."""
    return field(default=default, metadata={"above": 0, "below": 1})


def listed(factory):
    """A list that must not be empty."""
    return field(default_factory=factory, metadata={"non_empty": True})


def _range_problem(value, meta: dict) -> str | None:
    """Why `value` breaks the range in a field's metadata, or None."""
    if "choices" in meta and value not in meta["choices"]:
        return f"one of {list(meta['choices'])}"
    if meta.get("non_empty") and not value:
        return "a non-empty list"
    if not isinstance(value, (int, float)) or value == meta.get("or_value"):
        return None
    if "low" in meta and value < meta["low"]:
        alternative = f"{meta['or_value']} or " if meta.get("or_value") is not None else ""
        upper = f" and below {meta['below']}" if "below" in meta else ""
        return f"{alternative}a number of at least {meta['low']}{upper}"
    if "below" in meta and value >= meta["below"]:
        lower = f"above {meta['above']}" if "above" in meta else f"of at least {meta['low']}"
        return f"a number {lower} and below {meta['below']}"
    if "above" in meta and value <= meta["above"]:
        upper = f" and below {meta['below']}" if "below" in meta else ""
        return f"a number above {meta['above']}{upper}"
    return None


class Section:
    """Base of every section: checks each field against its declared choices or range after construction,
    then the section's own rules across fields (`check`)."""

    SECTION: ClassVar[str] = ""

    def __post_init__(self):
        for item in dataclasses.fields(self):
            value = getattr(self, item.name)
            expected = None if value is None else _range_problem(value, item.metadata)
            if expected:
                raise ConfigError(f"{self.SECTION}.{item.name}: expected {expected}, got {value!r}")
        self.check()

    def check(self) -> None:
        """Rules across this section's fields; ConfigError naming the key."""

    def fail(self, key: str, expected: str) -> None:
        raise ConfigError(f"{self.SECTION}.{key}: expected {expected}, got {getattr(self, key)!r}")


@dataclass(frozen=True)
class BaseModelConfig(Section):
    SECTION: ClassVar[str] = "base_model"
    source: str = "embedded:smollm2"  # "embedded:smollm2", a Hub model id, or a local model directory
    revision: str = "main"  # Hub branch, tag or commit hash; ignored for local sources
    hub_id: str | None = None  # id for adapter_config.json and the card; None: derived from the source
    license: str = "apache-2.0"


COURSE_SCRUB_PHRASES = (
    '"Batteries Included?": "No"',
    '"Batteries Included?": "Yes"',
    '"Batteries Required?": "No"',
    '"Batteries Required?": "Yes"',
    "By Manufacturer",
    "Date First Available",
    "Best Sellers Rank",
)


@dataclass(frozen=True)
class DataConfig(Section):
    SECTION: ClassVar[str] = "data"
    source: str = "embedded:diamonds"  # "embedded:diamonds", a .csv/.jsonl/.parquet path, or a Hub dataset id
    revision: str | None = None  # Hub dataset revision
    hub_config: str | None = None  # Hub dataset configuration (subset) name
    hub_split: str = "train"  # split of the Hub dataset to read
    shape: str = one_of(PRICE, SHAPES)
    text_column: str = "text"
    text_template: str | None = None  # price shape: the text column's own wrapping; the part at {text} is kept
    price_column: str = "price"
    prompt_column: str = "prompt"
    completion_column: str = "completion"
    messages_column: str = "messages"
    max_row_chars: int = at_least(50000, 1)  # rows whose mapped text is longer are dropped and counted
    min_price: float = at_least(0.01, 0)
    max_price: float | None = None
    min_text_chars: int = at_least(1, 0)
    scrub: bool = False  # price shape: remove scrub_phrases and part-number-like words
    scrub_phrases: list[str] = field(default_factory=lambda: list(COURSE_SCRUB_PHRASES))
    min_text_words: int = at_least(0, 0)  # price shape: fewer words (after scrubbing) drop the row; 0 = off
    max_text_words: int = at_least(0, 0)  # price shape: longer descriptions are cut to this many words; 0 = off
    balance_per_price: int = at_least(0, 0)  # price shape: at most this many rows per whole-dollar price; 0 = off
    seed: int = 42  # with the key, decides each row's split (stages/data/membership.py)
    test_fraction: float = share(0.0044)  # of the rows: the test set (~200 of the 45,531 embedded diamonds)
    val_fraction: float = share(0.0009)  # of the rows: validation
    n_train: int = at_least(600, 1, or_value=-1)  # of the rest, in hash order; -1: every one
    test_split: str | None = None  # a kept copy of an earlier data/splits/test.jsonl: the test set, as is

    def check(self) -> None:
        if self.text_template is not None and self.text_template.count("{text}") != 1:
            self.fail("text_template", "null or text with {text} once, where the description is")
        if self.max_price is not None and self.max_price < self.min_price:
            self.fail("max_price", f"null or at least data.min_price={self.min_price:g}")
        if self.test_fraction + self.val_fraction >= 1:
            self.fail("val_fraction", "a share that leaves rows to train on, below 1 - data.test_fraction")


@dataclass(frozen=True)
class PromptConfig(Section):
    SECTION: ClassVar[str] = "prompt"
    template: str = "How much does this cost to the nearest dollar?\n\n{text}\n\nPrice is $"
    completion: str = "{price:.0f}.00"
    max_length: int = at_least(182, 1)
    add_eos: bool = True

    def check(self) -> None:
        for key, slot, value in (("template", "text", ""), ("completion", "price", 1.0)):
            try:
                getattr(self, key).format(**{slot: value})
            except (KeyError, IndexError, ValueError) as exc:
                self.fail(key, f"a text whose only slot is {{{slot}}} ({exc.__class__.__name__}: {exc})")
        if "{text}" not in self.template:
            self.fail("template", "a text with a {text} slot for the description")


@dataclass(frozen=True)
class QuantizationConfig(Section):
    SECTION: ClassVar[str] = "quantization"
    load_in_4bit: bool = True
    quant_type: str = one_of("nf4", QUANT_TYPES)
    double_quant: bool = True
    compute_dtype: str = one_of("auto", COMPUTE_DTYPES)


@dataclass(frozen=True)
class LoraConfig(Section):
    SECTION: ClassVar[str] = "lora"
    r: int = at_least(32, 1)
    alpha: int = above(64, 0)
    dropout: float = fraction(0.1)
    target_modules: list[str] = listed(lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass(frozen=True)
class TrainConfig(Section):
    SECTION: ClassVar[str] = "train"
    seed: int = 42
    epochs: float = above(1.0, 0)
    max_steps: int = at_least(-1, 1, or_value=-1)  # > 0 overrides epochs
    batch_size: int = at_least(4, 1)
    grad_accum: int = at_least(1, 1)
    learning_rate: float = above(1e-3, 0)
    lr_scheduler: str = one_of("cosine", SCHEDULERS)
    warmup_ratio: float = fraction(0.03)
    warmup_steps: int = at_least(0, 0)  # > 0 overrides warmup_ratio
    weight_decay: float = at_least(0.001, 0)
    max_grad_norm: float = at_least(0.3, 0)
    optimizer: str = one_of("auto", OPTIMIZERS)
    eval_steps: int = at_least(50, 1)
    logging_steps: int = at_least(10, 1)
    save_steps: int = at_least(50, 1)  # checkpoint every N optimizer steps in .cache/train_qlora/
    early_stopping_patience: int = at_least(2, 0)  # evaluations without a lower val loss before stopping; 0: off
    sample_prompts: int = at_least(3, 0)  # validation prompts completed greedily at each evaluation
    sample_new_tokens: int = at_least(8, 1)
    gradient_checkpointing: bool = False
    threads: int = at_least(0, 0)  # 0: one per core, shared out among launched processes
    group_by_length: bool = False  # batch examples of similar length together: less padding, less random
    padding_free: bool = False  # concatenate each batch into one row without padding (position ids restart)
    launcher: str = one_of("single", LAUNCHERS)
    num_processes: int = at_least(2, 1)  # processes accelerate starts: one per GPU, or CPU processes on gloo
    accelerate_config: str | None = None  # accelerate config YAML (DDP, FSDP), relative to the project root

    def check(self) -> None:
        if self.early_stopping_patience and self.save_steps % self.eval_steps:
            self.fail(
                "save_steps",
                f"a multiple of eval_steps ({self.eval_steps}) when early stopping is on, so the best checkpoint "
                "is saved at an evaluation",
            )
        if self.accelerate_config is not None and not self.accelerate_config.endswith((".yaml", ".yml", ".json")):
            self.fail("accelerate_config", "an accelerate config file (.yaml, .yml or .json) or null")


@dataclass(frozen=True)
class EvaluateConfig(Section):
    SECTION: ClassVar[str] = "evaluate"
    batch_size: int = at_least(16, 1)
    max_new_tokens: int = at_least(8, 1)
    show_items: bool = True  # one line per test item, coloured by band on a terminal
    bootstrap_samples: int = at_least(1000, 0)  # resamples for the 95% interval of the average error (0: none)
    topk_estimate: bool = False  # also score the one-pass top-k estimate, where prices are single tokens
    topk: int = at_least(5, 1)
    dequantize_on_cpu: bool = True  # on a CPU, generate from the 4-bit weights dequantized once (same answers)


@dataclass(frozen=True)
class ExportConfig(Section):
    SECTION: ClassVar[str] = "export"
    push: bool = False
    repo_id: str | None = None
    private: bool = True
    create_pr: bool = False
    merge: bool = False  # also export the adapter merged into an unquantized base
    merge_into: str = one_of("dequantized", MERGE_TARGETS)
    merge_check_items: int = at_least(8, 1)  # test items predicted by both merged and unmerged models
    merge_tolerance: float = at_least(0.01, 0)  # largest relative price difference allowed between the two
    gguf: list[str] = field(default_factory=list)  # GGUF files of the merged model: any of GGUF_TYPES

    def check(self) -> None:
        if self.push and not self.repo_id:
            self.fail("repo_id", "owner/name of a Hub repo when export.push is true")
        if any(kind not in GGUF_TYPES for kind in self.gguf) or len(set(self.gguf)) != len(self.gguf):
            self.fail("gguf", f"a list of distinct GGUF types from {list(GGUF_TYPES)}, or []")
        if self.gguf and not self.merge:
            self.fail("gguf", "[] unless export.merge is true (a GGUF file holds the merged model)")


@dataclass(frozen=True)
class TrackingConfig(Section):
    SECTION: ClassVar[str] = "tracking"
    experiment: str = "qlora-price"
    registered_model: str = "qlora-price-adapter"  # MLflow registry name; its `champion` alias is compared
    tracking_uri: str | None = None  # default: sqlite:///<project root>/mlflow.db
    primary_metric: str = one_of("auto", ("auto", *PRIMARY_METRICS))  # the metric that decides promotion
    min_improvement: float = at_least(0.0, 0)  # in the metric's units: the whole interval must be better by more
    # the share of the candidate's test items the champion's logged results must cover (and that the champion
    # did not train on) to compare on those; fewer, and the champion is re-scored on the current test set
    min_shared: float = above(0.9, 0)
    confidence: float = field(default=0.95, metadata={"above": 0.5, "below": 1})  # of the paired interval
    bootstrap_samples: int = at_least(2000, 100)  # resamples of the test items for that interval

    def check(self) -> None:
        if self.min_shared > 1:
            self.fail("min_shared", "a share above 0 and at most 1")


@dataclass(frozen=True)
class FlowConfig(Section):
    SECTION: ClassVar[str] = "flow"
    stage_retries: int = at_least(1, 0)
    retry_delay_seconds: int = at_least(10, 0)
    schedule: str = "0 3 * * *"  # cron for `python -m flows.serve`
    timezone: str = "UTC"
    deployment: str = "scheduled-retrain"
    lock_wait_seconds: int = at_least(0, 0)  # a second retrain on this workspace waits this long, then stops
    push: bool = False  # `dvc push` the outputs to a DVC remote after every successful run
    remote: str | None = None  # the DVC remote's name; None: the default remote (`dvc remote add -d`)

    def check(self) -> None:
        if self.remote is not None and not REMOTE_NAME.fullmatch(self.remote):
            self.fail(
                "remote",
                "the name of a DVC remote (as in `dvc remote list`) or null; the remote's URL belongs in "
                ".dvc/config (`dvc remote add`), not here",
            )


def _default_grid() -> dict:
    # The default rate and twice it at ranks below the default: four trials on the params' own budget, none of
    # them the default params themselves (that trial would be the champion again); params.yaml says why.
    return {"train.learning_rate": [1.0e-3, 2.0e-3], "lora.r": [8, 16]}


@dataclass(frozen=True)
class SweepConfig(Section):
    """`make sweep` (flows/sweep.py): trials as DVC experiments; sweeps/plan.py checks the keys and values
    against the other sections before any trial starts."""

    SECTION: ClassVar[str] = "sweep"
    method: str = one_of("grid", SWEEP_METHODS)
    grid: dict = field(default_factory=_default_grid)  # "section.key": [values], one value per key per trial
    fixed: dict = field(default_factory=dict)  # "section.key": value, the same in every trial; {}: the params' budget
    seeds: list[int] = field(default_factory=list)  # train.seed values each combination repeats with
    trials: int | None = at_least(None, 1)  # the budget: at most this many trials; None: the whole grid
    jobs: int = at_least(1, 1)  # trials run side by side by DVC's queue; each gets cores / jobs threads
    register: str = one_of("best", SWEEP_REGISTER)
    sample_seed: int = 0  # method random: which combinations are drawn
    backend: str = one_of("local", SWEEP_BACKENDS)  # where trials run (sweeps/queue.py, sweeps/workers.py)
    deployment: str = "sweep-trial/worker-trial"  # backend prefect: the trial deployment (prefect.yaml)
    git_remote: str = "origin"  # backend prefect: the sweep's commit goes out, and its trials come back, here

    def check(self) -> None:
        if not self.grid:
            self.fail("grid", 'at least one "section.key": [values] to try')
        for key, values in self.grid.items():
            if not isinstance(values, list) or not values:
                raise ConfigError(f"sweep.grid.{key}: expected a non-empty list of values to try, got {values!r}")
            if len({repr(v) for v in values}) != len(values):
                raise ConfigError(f"sweep.grid.{key}: expected distinct values, got {values!r}")
        if len(set(self.seeds)) != len(self.seeds):
            self.fail("seeds", "distinct train.seed values, or [] for the params' own seed")
        if self.method == "random" and self.trials is None:
            self.fail("trials", "how many trials to draw (a number of at least 1) with method random")
        if self.deployment.count("/") != 1 or not all(self.deployment.split("/")):
            self.fail("deployment", "<flow name>/<deployment name>, as `prefect deployment ls` shows it")


@dataclass(frozen=True)
class ServeConfig(Section):
    """`make serve-champion` (serving/champion.py): the server that follows the champion alias."""

    SECTION: ClassVar[str] = "serve"
    host: str = "127.0.0.1"  # the address it listens on (0.0.0.0: every interface)
    port: int = at_least(5001, 1)
    alias: str = "champion"  # the alias it follows
    poll_seconds: int = at_least(60, 1)  # how often it reads the alias, besides being told by the retrain flow
    start_timeout_seconds: int = at_least(900, 1)  # how long a new version may take to load and answer


class Undeclared:
    """Stands in for a params section (or key) a stage did not declare: reading it fails, naming the fix."""

    def __init__(self, stage: str, section: str, section_value=None, keys: tuple[str, ...] = ()):
        self._stage, self._section, self._value, self._keys = stage, section, section_value, keys
        self._read: set[str] = set()  # the declared keys read so far (tests check each is needed)

    def __getattr__(self, key: str):
        if key.startswith("_"):
            raise AttributeError(key)
        if key in self._keys:
            self._read.add(key)
            return getattr(self._value, key)
        raise ConfigError(
            f"stage {self._stage} read params {self._section}.{key} without declaring it: add it to the stage's "
            "SPEC.params and to its params in dvc.yaml, so DVC re-runs the stage when it changes"
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
    sweep: SweepConfig
    serve: ServeConfig

    def only(self, declared: tuple[str, ...], stage: str) -> Params:
        """These params with every section (or `section.key`) not in `declared` replaced by a stand-in that
        raises ConfigError when read: what `stage` is handed, so it cannot depend on params DVC does not watch."""
        views = {}
        for section in dataclasses.fields(self):
            name, value = section.name, getattr(self, section.name)
            if name in declared:
                views[name] = value
                continue
            keys = tuple(entry.split(".", 1)[1] for entry in declared if entry.startswith(f"{name}."))
            views[name] = Undeclared(stage, name, value, keys)
        return Params(**views)


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
    elif hint is dict and isinstance(value, dict):
        return {str(key): item for key, item in value.items()}
    expected = "a mapping" if hint is dict else getattr(hint, "__name__", hint)
    raise ConfigError(f"{where}: expected {expected}, got {value!r}")


def section_from_dict(cls, data: dict | None, name: str):
    """Build the dataclass `cls` for section `name` from a dict, rejecting unknown keys and bad values."""
    data = data or {}
    if not isinstance(data, dict):
        raise ConfigError(f"params section '{name}' must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    renamed = [f"{name}.{key}: {RENAMED[f'{name}.{key}']}" for key in unknown if f"{name}.{key}" in RENAMED]
    if renamed:
        raise ConfigError("; ".join(renamed))
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
    params = Params(**{name: section_from_dict(cls, raw.get(name), name) for name, cls in hints.items()})
    check_across_sections(params)
    return params


def check_across_sections(params: Params) -> None:
    """Rules that tie two sections together; ConfigError naming the key."""
    metric, shape = params.tracking.primary_metric, params.data.shape
    if metric != "auto" and shape not in PRIMARY_METRICS[metric][0]:
        fitting = [name for name, (shapes, _) in PRIMARY_METRICS.items() if shape in shapes]
        raise ConfigError(
            f"tracking.primary_metric: {metric!r} does not score {shape} data (data.shape); "
            f"expected auto or one of {fitting}"
        )


def read_yaml(path: str | Path, missing: str = "parameters file not found (run from the project root)"):
    """The parsed YAML file at `path` ({} when empty); ConfigError naming the file when it is not there
    (`missing` says what it should have been) or is not YAML."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: {missing}")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml; raise ConfigError with the file name on any problem."""
    raw = read_yaml(path)
    try:
        return params_from_dict(raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc


def params_by_key(params: Params) -> dict[str, object]:
    """{"section.key": value} of every section handed over, values as params.yaml holds them (lists stay lists)."""
    return {
        f"{section.name}.{key}": value
        for section in dataclasses.fields(params)
        if not isinstance(getattr(params, section.name), Undeclared)
        for key, value in dataclasses.asdict(getattr(params, section.name)).items()
    }


def flatten(params: Params) -> dict[str, object]:
    """`params_by_key` for MLflow: lists joined by commas; sections a stage was not handed are left out."""
    return {key: ",".join(map(str, v)) if isinstance(v, list) else v for key, v in params_by_key(params).items()}
