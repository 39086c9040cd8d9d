"""The front door of the QLoRA pipeline: the `qlora-pipeline` console script (qlora_pipeline/cli.py) and the
params override files it applies (qlora_pipeline/overrides.py). The pipeline itself lives in stages/ (one
module per DVC stage), flows/ (Prefect), serving/ and sweeps/.

Run: `pip install -e .` in a clone, then `qlora-pipeline --help` from the clone's folder.
"""
