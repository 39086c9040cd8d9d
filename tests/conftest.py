"""Shared fixtures: a tiny randomly initialised Llama with a small BPE tokenizer, and tiny projects.

The tiny model (2 layers, hidden size 64) trains and generates in seconds on a CPU, through the same
4-bit bitsandbytes and PEFT code as the real one. Stage tests share one project run through every stage
(`pipeline_project`), so each stage runs once per test session. Tests marked `gpu` run on a CUDA device and
are skipped without one.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

import pytest
import yaml

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent
# A test that needs one of these runs servers, the flow, several processes or a benchmark: `slow`, left out of
# `make test-fast` (a test can also be marked by hand, as the embedded GGUF conversion is).
SLOW_FIXTURES = {
    "prefect_api",
    "flow_project",
    "workspace_copy",
    "two_process_run",
    "bench_runs",
    "noise_run",
    "servers",
}

# Small enough to run every stage in seconds; shaped like the real defaults.
TINY_PARAMS = {
    "base_model": {"source": "models/tiny-source", "hub_id": "test-org/tiny-llama"},
    "data": {"source": "data/raw/prices.csv", "test_fraction": 0.15, "val_fraction": 0.1, "n_train": 48, "seed": 7},
    "prompt": {"max_length": 128},
    "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
    "train": {
        "batch_size": 4,
        "learning_rate": 3.0e-3,
        "eval_steps": 6,
        "logging_steps": 2,
        "save_steps": 6,
        "warmup_ratio": 0.1,
    },
    "evaluate": {"batch_size": 8, "max_new_tokens": 6},
}


NO_CUDA = "marked gpu: needs a CUDA device, and torch.cuda.is_available() is False here"


def pytest_collection_modifyitems(items):
    for item in items:
        if SLOW_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.slow)
    gpu_items = [item for item in items if item.get_closest_marker("gpu")]
    if gpu_items and not cuda_available():
        for item in gpu_items:
            item.add_marker(pytest.mark.skip(reason=NO_CUDA))


def pytest_sessionfinish(session, exitstatus):
    """Stop the temporary Prefect server that flows run in this process started, while pytest's streams are open:
    left to its exit hook, it logs "Stopping temporary server" to a closed stream, a traceback in every test log.
    (Prefect's own test fixtures stop it the same way.)"""
    server = sys.modules.get("prefect.server.api.server")
    if server is not None:
        server.SubprocessASGIServer().stop()


def cuda_available() -> bool:
    import torch  # here, so that collecting tests without a `gpu` mark never imports torch

    return torch.cuda.is_available()


def price_rows(n: int, seed: int = 0) -> list[dict]:
    """`n` distinct product descriptions with prices that depend on them."""
    import random

    rng = random.Random(seed)
    colours = ["red", "blue", "green", "black", "white", "silver"]
    things = ["kettle", "lamp", "chair", "speaker", "backpack", "watch", "drill"]
    rows = []
    for i in range(n):
        thing, colour, size = rng.choice(things), rng.choice(colours), rng.randint(1, 60)
        rows.append({"text": f"A {colour} {thing}, model {i}, size {size} cm.", "price": float(10 + size * 7)})
    return rows


def build_tokenizer(folder: Path):
    """A byte-level BPE tokenizer (vocab ~400) trained on the test texts, saved in `folder`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    corpus = [r["text"] for r in price_rows(300)] + ["How much does this cost to the nearest dollar? Price is $"]
    corpus += [f"{p}.00" for p in range(0, 1000, 7)]
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>", "<pad>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<pad>"
    )
    fast.save_pretrained(folder)
    return fast


# The tiny Llama's shape: trains and generates in seconds on a CPU.
TINY_LLAMA = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
}


def save_random_llama(folder: Path, shape: dict, float16_exact: bool = False, **settings) -> Path:
    """A Llama of `shape` (hidden size, layers, heads...), randomly initialised with seed 0, saved (safetensors)
    in `folder` with the test tokenizer; returns `folder`. `settings` are further LlamaConfig values (rope
    parameters, initializer_range); `float16_exact` rounds every weight through float16 first, so a float16
    copy (an F16 GGUF) holds it exactly."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(folder)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        **shape,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **settings,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    if float16_exact:
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.copy_(parameter.half().float())
    model.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved tiny random Llama (safetensors) with its tokenizer."""
    return save_random_llama(tmp_path_factory.mktemp("tiny-llama"), TINY_LLAMA)


def write_project(root: Path, tiny_model_dir: Path, overrides: dict | None = None, n_rows: int = 90) -> Path:
    """A project folder with the repository's params.yaml made tiny, the tiny model as local base source
    and a price CSV."""
    import pandas as pd

    params = yaml.safe_load((REPO_ROOT / "params.yaml").read_text(encoding="utf-8"))  # every section, as DVC needs
    for changes in (TINY_PARAMS, overrides or {}):
        for section, values in changes.items():
            params[section].update(values)
    (root / "data" / "raw").mkdir(parents=True, exist_ok=True)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    pd.DataFrame(price_rows(n_rows)).to_csv(root / "data" / "raw" / "prices.csv", index=False)
    shutil.copytree(tiny_model_dir, root / "models" / "tiny-source")
    return root


@pytest.fixture
def project(tmp_path, tiny_model_dir, monkeypatch) -> Path:
    """A fresh tiny project as the current directory."""
    write_project(tmp_path, tiny_model_dir)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def run_as_declared(stage, params, paths, params_read: dict[str, set[str]]):
    """Run stage module `stage` as `dvc repro` does (handed only the params its SPEC declares) and note in
    `params_read[name]` the declared sections and `section.key`s it read."""
    import dataclasses

    from stages.common.config import Params, Undeclared

    class NotingParams(Params):
        def __getattribute__(self, name):
            value = object.__getattribute__(self, name)
            if name in Params.__dataclass_fields__ and not isinstance(value, Undeclared):
                params_read.setdefault(stage.SPEC.name, set()).add(name)
            return value

    view = params.only(stage.SPEC.params, stage.SPEC.name)
    noting = NotingParams(**{f.name: getattr(view, f.name) for f in dataclasses.fields(view)})
    result = stage.run(noting, paths)
    for section in dataclasses.fields(view):
        value = getattr(view, section.name)
        if isinstance(value, Undeclared):
            params_read.setdefault(stage.SPEC.name, set()).update(f"{section.name}.{k}" for k in value._read)
    return result


@pytest.fixture(scope="session")
def stage_params_read() -> dict[str, set[str]]:
    """{stage: the params sections and keys it read} for the stages `pipeline_project` ran (test_record_run.py
    adds record_run)."""
    return {}


@pytest.fixture(scope="session")
def pipeline_project(tmp_path_factory, tiny_model_dir, stage_params_read):
    """A tiny project run through every stage but record_run, each handed only the params it declares."""
    from stages import base_model, evaluate_adapter, export_hub, split_data, tokenize_data, train_qlora
    from stages.common.config import load_params
    from stages.common.paths import Paths

    root = write_project(tmp_path_factory.mktemp("pipeline"), tiny_model_dir)
    paths = Paths.at(root)
    params = load_params(paths.params)
    results = {}
    for module in (base_model, split_data, tokenize_data, train_qlora, evaluate_adapter, export_hub):
        results[module.SPEC.name] = run_as_declared(module, params, paths, stage_params_read)
    return paths, params, results


def copy_outputs(paths, destination):
    """A copy of the pipeline's outputs, so an export with other params leaves the shared project alone."""
    import shutil

    from stages.common.paths import Paths

    for folder in ("models", "data", "metrics", "reports", "eval"):
        shutil.copytree(paths.root / folder, destination / folder)
    return Paths.at(destination)


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    """The API URL of one Prefect server on loopback, shared by the flow tests and stopped at the end."""
    from infra.servers import prefect_server

    with prefect_server(tmp_path_factory.mktemp("prefect-server"), dict(os.environ)) as url:
        yield url


def require_postgres() -> None:
    """Skip when PostgreSQL is not installed; fail instead under CI (QLORA_REQUIRE_POSTGRES=1, set by .ci/run,
    which installs it), so the tests on real servers never silently skip there."""
    from infra.servers import postgres_binaries

    if postgres_binaries() is None:
        message = "PostgreSQL is not installed (initdb not found): `apt-get install postgresql`"
        if os.environ.get("QLORA_REQUIRE_POSTGRES") == "1":
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(scope="module")
def team_servers(tmp_path_factory):
    """PostgreSQL on loopback with an MLflow tracking server and a Prefect server on it, as a team runs them
    (infra.servers.shared_servers); one set per test module, so no module sees another's runs or registry.
    PostgreSQL's folder is under /tmp: as root it runs as the `postgres` user, who cannot enter pytest's."""
    from infra.servers import shared_servers

    require_postgres()
    postgres_folder = Path(tempfile.mkdtemp(prefix="qlora-postgres-"))
    try:
        with shared_servers(tmp_path_factory.mktemp("team-servers"), dict(os.environ), postgres_folder) as servers:
            yield servers
    finally:
        shutil.rmtree(postgres_folder, ignore_errors=True)


@pytest.fixture(scope="session")
def dvc_remote(tmp_path_factory) -> Path:
    """The folder of the local DVC remote `shared` that `flow_project` pushes to."""
    return tmp_path_factory.mktemp("dvc-remote")


class FlowRun(NamedTuple):
    """A workspace after one run of the flow: its root, the environment of its commands, the flow's completed
    process and the report it published."""

    root: Path
    env: dict
    done: subprocess.CompletedProcess
    report: str


@pytest.fixture(scope="session")
def flow_project(tmp_path_factory, tiny_model_dir, prefect_api, dvc_remote) -> FlowRun:
    """A tiny workspace in a temporary git repository (raw CSV under `dvc add`, `dvc_remote` its default DVC
    remote, flow.push: true) after one run of the flow (~80 s), built once. Tests only read it; a test that
    changes a workspace takes `workspace_copy`."""
    from tests.flow_workspace import commit, dvc, flow, latest_report, new_workspace

    root = tmp_path_factory.mktemp("e2e")
    env = new_workspace(root, tiny_model_dir, prefect_api, overrides={"flow": {"push": True}})
    dvc(["remote", "add", "-d", "shared", str(dvc_remote)], root, env)
    commit(root, env, "tiny project")
    done = flow(root, env)
    return FlowRun(root, env, done, latest_report(env))


@pytest.fixture
def workspace_copy(flow_project, tmp_path, prefect_api) -> tuple[Path, dict]:
    """A copy of `flow_project`'s workspace (git history, DVC cache, mlflow.db and outputs) for one test to
    change, so every test starts from the same state whatever ran before: (root, env)."""
    from tests.flow_workspace import workspace_env

    def left_out(folder: str, names: list[str]) -> list[str]:
        # DVC's state under .dvc/tmp names absolute paths; Prefect's home is per workspace
        return [n for n in names if (n == "tmp" and folder.endswith(".dvc")) or n == ".prefect-home"]

    root = tmp_path / "workspace"
    shutil.copytree(flow_project.root, root, symlinks=True, ignore=left_out)
    point_mlflow_at(root / "mlflow.db", f"{flow_project.root.as_uri()}/", f"{root.as_uri()}/")
    return root, workspace_env(root, prefect_api)


def point_mlflow_at(store: Path, old_root: str, new_root: str) -> None:
    """Make a copied SQLite MLflow store use the copied artifacts: the store names its artifact folders by
    absolute URI, so without this a copy would write into (and read from) the original's mlartifacts/.
    (Within one process MLflow also caches a run's artifact store by run id, and copies share run ids: a test
    that writes a copy's artifacts in-process writes the files itself.)"""
    import sqlite3

    columns = {
        "experiments": ("artifact_location",),
        "runs": ("artifact_uri",),
        "model_versions": ("source", "storage_location"),
        "logged_models": ("artifact_location",),
    }
    with sqlite3.connect(store) as connection:
        for table, names in columns.items():
            for name in names:
                connection.execute(f"UPDATE {table} SET {name} = replace({name}, ?, ?)", (old_root, new_root))
