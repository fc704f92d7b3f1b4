"""Training stage: ResNet18 on one dataset version, checkpointed per epoch, logged and registered in MLflow."""

from __future__ import annotations

import json
import logging
from typing import Any

log = logging.getLogger(__name__)


def log_and_register(
    model,
    *,
    model_name: str,
    label_map: dict[str, int],
    image_size: int,
    dataset_version: str,
    run_key: str,
    extra_tags: dict[str, str] | None = None,
) -> str:
    """Log `model` to the active MLflow run and register it; returns the model version.

    Pickle format (not MLflow 3's default `pt2`, which fixes the batch size to the input
    example's), with a signature and an input example; the label map travels as an artifact
    and a version tag. Registration is keyed by `run_key`: an existing version is returned.
    """
    import mlflow
    import numpy as np
    import torch
    import torchvision
    from mlflow.models import infer_signature

    from pipeline import registry

    existing = registry.find_version_by_run_key(model_name, run_key)
    if existing:
        log.info("model %s v%s already registered for run %s", model_name, existing, run_key)
        return existing
    example = np.random.default_rng(0).random((2, 3, image_size, image_size), dtype=np.float32)
    model = model.cpu().eval()
    with torch.inference_mode():
        output = model(torch.from_numpy(example)).numpy()
    mlflow.log_dict(label_map, "label_map.json")
    info = mlflow.pytorch.log_model(
        model,
        name="model",
        signature=infer_signature(example, output),
        input_example=example,
        serialization_format="pickle",
        # Explicit requirements: MLflow's inference imports the model in a subprocess (~10 s).
        pip_requirements=[
            f"torch=={torch.__version__.split('+')[0]}",
            f"torchvision=={torchvision.__version__.split('+')[0]}",
        ],
    )
    tags = {
        "dataset_version": dataset_version,
        "run_key": run_key,
        "label_map": json.dumps(label_map, ensure_ascii=False, sort_keys=True),
        "image_size": str(image_size),
        **(extra_tags or {}),
    }
    mv = mlflow.register_model(info.model_uri, model_name, tags=tags)
    log.info("registered %s v%s (run %s)", model_name, mv.version, run_key)
    return str(mv.version)


def _unused(*_: Any) -> None:  # placeholder until the training loop lands
    return None
