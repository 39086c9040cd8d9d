"""base_model: a local folder, a Hub id through huggingface_hub's cache, and the embedded GGUF."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from stages import base_model
from stages.common.config import load_params
from stages.common.paths import Paths

REPO_ROOT = Path(__file__).resolve().parent.parent
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def test_local_folder_is_copied_as_safetensors(project, tiny_model_dir):
    paths = Paths.at(project)
    result = base_model.run(load_params(paths.params), paths)
    assert (paths.base_model / "model.safetensors").is_file()
    assert (paths.base_model / "tokenizer.json").is_file()
    assert json.loads((paths.base_model / "source.json").read_text())["kind"] == "local"
    assert result.parameters > 0


def test_missing_local_folder_fails_clearly(project):
    (project / "params.yaml").write_text("base_model:\n  source: ./no/such/folder\n", encoding="utf-8")
    code = base_model.main([])
    assert code == 1
    assert not (project / "models" / "base").exists()


def fake_hub_cache(cache: Path, repo_id: str, model_dir: Path) -> None:
    """Lay out `model_dir` as huggingface_hub's cache holds a snapshot of `repo_id` at branch main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(model_dir, repo / "snapshots" / COMMIT)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT, encoding="utf-8")


@pytest.mark.parametrize("revision", ["main", COMMIT])
def test_hub_id_resolves_through_huggingface_hub(tmp_path, tiny_model_dir, revision):
    fake_hub_cache(tmp_path / "hf-cache", "test-org/tiny-llama", tiny_model_dir)
    (tmp_path / "params.yaml").write_text(
        f"base_model:\n  source: test-org/tiny-llama\n  revision: '{revision}'\n", encoding="utf-8"
    )
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(tmp_path / "hf-cache"),
        "PYTHONPATH": str(REPO_ROOT),
    }
    done = subprocess.run(
        [sys.executable, "-m", "stages.base_model"], cwd=tmp_path, env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    source = json.loads((tmp_path / "models" / "base" / "source.json").read_text())
    assert source["kind"] == "hub" and source["resolved_revision"] == COMMIT
    assert source["hub_id"] == "test-org/tiny-llama"  # derived from the source when params leave it unset
    assert (tmp_path / "models" / "base" / "model.safetensors").is_file()


def test_hub_id_not_reachable_fails_with_an_actionable_message(tmp_path):
    (tmp_path / "params.yaml").write_text("base_model:\n  source: test-org/absent\n", encoding="utf-8")
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(tmp_path / "empty-cache"),
        "PYTHONPATH": str(REPO_ROOT),
    }
    done = subprocess.run(
        [sys.executable, "-m", "stages.base_model"], cwd=tmp_path, env=env, capture_output=True, text=True, check=False
    )
    assert done.returncode == 1
    assert "not in the local Hugging Face cache" in done.stderr


@pytest.mark.slow
def test_embedded_gguf_becomes_a_regular_checkpoint_with_the_same_logits(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = base_model.embedded_gguf_path()
    base_model.save_from_gguf(gguf, tmp_path / "base")
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)
    original = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "base")
    ids = tokenizer("How much does this cost?\n\nPrice is $", return_tensors="pt")
    with torch.no_grad():
        assert torch.allclose(saved(**ids).logits, original(**ids).logits, atol=1e-5)
    assert "quantization_config" not in json.loads((tmp_path / "base" / "config.json").read_text())
