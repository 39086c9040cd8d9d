"""DVC stages of the QLoRA pipeline: one module per stage; shared pieces in common/, each stage's own helpers in
data/, training/, evaluation/ and tracking/."""

# The stages in pipeline order: dvc.yaml's stages, each `python -m stages.<name>` (the flow runs them so).
STAGES = (
    "base_model",
    "split_data",
    "tokenize_data",
    "train_qlora",
    "evaluate_adapter",
    "export_hub",
    "record_run",
)
