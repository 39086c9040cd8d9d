"""Shared fixtures: a tiny randomly initialised Llama with a small BPE tokenizer, and tiny projects.

The tiny model (2 layers, hidden size 64) trains and generates in seconds on a CPU, through the same
4-bit bitsandbytes and PEFT code as the real one. Stage tests share one project run through every stage
(`pipeline_project`), so each stage runs once per test session.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("TQDM_DISABLE", "1")

REPO_ROOT = Path(__file__).resolve().parent.parent

# Small enough to run every stage in seconds; shaped like the real defaults.
TINY_PARAMS = {
    "base_model": {"source": "models/tiny-source", "hub_id": "test-org/tiny-llama"},
    "data": {"source": "data/raw/prices.csv", "n_test": 12, "n_val": 8, "n_train": 48, "seed": 7},
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


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A saved tiny random Llama (safetensors) with its tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = build_tokenizer(folder)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(folder, safe_serialization=True)
    return folder


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


@pytest.fixture(scope="session")
def pipeline_project(tmp_path_factory, tiny_model_dir):
    """A tiny project run through base_model, split_data, tokenize_data, train_qlora and evaluate_adapter."""
    from stages import base_model, evaluate_adapter, split_data, tokenize_data, train_qlora
    from stages.core.config import load_params
    from stages.core.paths import Paths

    root = write_project(tmp_path_factory.mktemp("pipeline"), tiny_model_dir)
    paths = Paths.at(root)
    params = load_params(paths.params)
    results = {}
    for module in (base_model, split_data, tokenize_data, train_qlora, evaluate_adapter):
        results[module.__name__.rsplit(".", 1)[-1]] = module.run(params, paths)
    return paths, params, results


@pytest.fixture(scope="session")
def prefect_api(tmp_path_factory):
    """The API URL of one Prefect server on loopback, shared by the flow tests and stopped at the end."""
    from flows.local_server import prefect_server

    with prefect_server(tmp_path_factory.mktemp("prefect-server"), dict(os.environ)) as url:
        yield url


@pytest.fixture(scope="session")
def dvc_remote(tmp_path_factory) -> Path:
    """The folder of the local DVC remote `shared` that `flow_project` pushes to."""
    return tmp_path_factory.mktemp("dvc-remote")


@pytest.fixture(scope="session")
def flow_project(tmp_path_factory, tiny_model_dir, prefect_api, dvc_remote):
    """A tiny workspace in a temporary git repository (raw CSV under `dvc add`, `dvc_remote` its default DVC
    remote, flow.push: true) after one run of the flow: (root, env, the flow's completed process). Built once
    for test_dvc_remote.py and test_flow_e2e.py, which go on changing it in that order (one flow run, ~80 s)."""
    from tests.flow_workspace import commit, dvc, flow, new_workspace

    root = tmp_path_factory.mktemp("e2e")
    env = new_workspace(root, tiny_model_dir, prefect_api, overrides={"flow": {"push": True}})
    dvc(["remote", "add", "-d", "shared", str(dvc_remote)], root, env)
    commit(root, env, "tiny project")
    return root, env, flow(root, env)
