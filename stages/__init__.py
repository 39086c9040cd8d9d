"""DVC stages of the QLoRA pipeline: one module per stage; shared pieces in common/, each stage's own helpers in
data/, training/, evaluation/ and tracking/."""
