"""DVC stages of the QLoRA pipeline: one module per stage, shared pieces in stages.core."""
