"""The final export as an MLflow transformers model (`tracking.log_model`), so the Model Registry can take it."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers
from huggingface_hub import ModelCard
from transformers import AutoModelForCausalLM, AutoTokenizer


def save_mlflow_model(export_dir: Path, path: Path) -> None:
    """Write `export_dir` (a transformers model + tokenizer + README.md card) as an MLflow model at `path`.

    MLflow's cheaper form, a path to the checkpoint, fails on transformers 5 (it reads a pipeline class name
    that is now a string), so the model is loaded once. The requirements are given, not inferred: inference
    imports every package transformers can use (torchvision, ...) and fails on the first one missing. Our own
    card is passed so MLflow does not look the model up on the hub."""
    import mlflow.transformers  # only when asked: the flavor takes seconds to import

    model = AutoModelForCausalLM.from_pretrained(export_dir)
    tokenizer = AutoTokenizer.from_pretrained(export_dir)
    card = export_dir / "README.md"
    mlflow.transformers.save_model(
        transformers_model={"model": model, "tokenizer": tokenizer}, path=str(path), task="text-generation",
        model_card=ModelCard.load(card) if card.is_file() else None,
        pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", f"transformers=={transformers.__version__}"])
