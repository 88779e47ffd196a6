"""mdpo-ray: MinorDPO preference training on Ray Train + FSDP2, swept with Ray Tune, tracked in MLflow."""

__version__ = "0.1.0"
