"""The memory planner: the model's shape from its config on the meta device, a per-rank footprint, and a verdict."""
