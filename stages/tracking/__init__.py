"""MLflow: which store, recording a pipeline execution as a run, the registry and its promotion gate."""
