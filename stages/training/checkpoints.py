"""Training checkpoints that are safe to resume: a fingerprint of what is trained, next to the checkpoints.

The Trainer writes `checkpoint-<step>/` folders into the scratch folder (.cache/train_qlora/, not a DVC
output). `fingerprint.json` beside them holds a hash of the settings that change the weights (the
`quantization`, `lora` and `train` params, except those that only change what is shown), of the tokenized
data, of the base model and of the accelerate config file. `prepare_scratch` returns the newest complete
checkpoint when the fingerprint matches; a folder from other params, data or base is renamed aside (never
resumed, never deleted). Used by `python -m stages.train_qlora`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
import time
from pathlib import Path

from stages.common.config import Params
from stages.common.io import file_sha256, write_json

FINGERPRINT = "fingerprint.json"
# train.* keys that change what is printed or how fast, not the weights: changing them still resumes.
WATCH_ONLY_KEYS = {"threads", "logging_steps", "sample_prompts", "sample_new_tokens"}
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")
# The Trainer writes trainer_state.json last in a checkpoint: without it the checkpoint is incomplete.
_COMPLETE_MARKER = "trainer_state.json"


def data_digest(tokenized: Path) -> str:
    """sha256 over the names and contents of the Arrow files under `tokenized` (the rows themselves; the
    `datasets` metadata beside them carries random fingerprints)."""
    digest = hashlib.sha256()
    for path in sorted(tokenized.rglob("*.arrow")):
        digest.update(str(path.relative_to(tokenized)).encode())
        digest.update(file_sha256(path).encode())
    return digest.hexdigest()


def base_identity(base: Path) -> str:
    """What identifies the base model cheaply: config, tokenizer and source files by content, weights by
    size (hashing 16 GB of an 8B base on every run would cost minutes)."""
    digest = hashlib.sha256()
    for path in sorted(p for p in base.iterdir() if p.is_file()):
        digest.update(path.name.encode())
        weights = path.suffix in (".safetensors", ".bin")
        digest.update((str(path.stat().st_size) if weights else file_sha256(path)).encode())
    return digest.hexdigest()


def fingerprint(params: Params, tokenized: Path, base: Path, root: Path | None = None) -> dict:
    """The settings and inputs a checkpoint was trained from, each hashed (sha256, hex); with the project
    `root`, also the contents of the `train.accelerate_config` file (its processes, precision, sharding)."""
    train = {k: v for k, v in dataclasses.asdict(params.train).items() if k not in WATCH_ONLY_KEYS}
    settings = {
        "quantization": dataclasses.asdict(params.quantization),
        "lora": dataclasses.asdict(params.lora),
        "train": train,
    }
    hashed = {
        "params": hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest(),
        "tokenized_data": data_digest(tokenized),
        "base_model": base_identity(base),
    }
    accelerate_file = root / params.train.accelerate_config if root and params.train.accelerate_config else None
    if accelerate_file is not None and accelerate_file.is_file():
        hashed["accelerate_config"] = file_sha256(accelerate_file)
    return hashed


def complete_checkpoints(scratch: Path) -> list[Path]:
    """Checkpoint folders in `scratch` that were written to the end, oldest step first."""
    found = []
    for path in scratch.glob("checkpoint-*"):
        match = _CHECKPOINT.match(path.name)
        if match and (path / _COMPLETE_MARKER).is_file():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def set_aside(scratch: Path, reason: str) -> Path:
    """Rename `scratch` to `<scratch>.set-aside-<time>` and say why; return the new path."""
    aside = scratch.with_name(f"{scratch.name}.set-aside-{time.strftime('%Y%m%d-%H%M%S')}")
    scratch.rename(aside)
    print(f"checkpoints in {scratch} set aside as {aside}: {reason}; training starts from step 0")
    return aside


def prepare_scratch(scratch: Path, expected: dict) -> Path | None:
    """Make `scratch` ready for a run with fingerprint `expected`; return the checkpoint to resume or None.

    A scratch folder written for another fingerprint (or with none) is set aside; incomplete checkpoint
    folders (a kill while saving) are removed.
    """
    if scratch.exists():
        stored_file = scratch / FINGERPRINT
        stored = json.loads(stored_file.read_text(encoding="utf-8")) if stored_file.is_file() else None
        if stored != expected:
            changed = sorted(k for k in expected if (stored or {}).get(k) != expected[k])
            set_aside(scratch, f"they were trained from different {', '.join(changed)}")
    scratch.mkdir(parents=True, exist_ok=True)
    write_json(scratch / FINGERPRINT, expected)
    complete = complete_checkpoints(scratch)
    for path in scratch.glob("checkpoint-*"):
        if path not in complete:
            print(f"removing incomplete checkpoint {path} (the run stopped while saving it)")
            shutil.rmtree(path)
    if complete:
        print(f"resuming from {complete[-1]} (optimizer, scheduler, RNG and data order restored)")
        return complete[-1]
    return None
