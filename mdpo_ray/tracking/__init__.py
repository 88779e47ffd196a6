"""MLflow: the run and sweep records, the metric sinks that feed them, and the names/labels runs are shown by."""
