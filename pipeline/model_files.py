"""A registered version's files: weights as safetensors plus a JSON of what they mean.

Training writes both into the version's MLflow model, next to a standard pyfunc model built
from code (`pipeline/mlflow_pyfunc.py`, for users' `mlflow.pyfunc.load_model(...)`). The
pipeline itself never loads that pyfunc model nor any pickle: scoring, the gate and evaluation
rebuild ResNet18 from the installed package (`model.build_model`) and fill it with the weights,
after checking their SHA-256 against the version's `weights_sha256` tag (`read_weights`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from safetensors.torch import load, save_file
from torch import nn

from pipeline.data import MEAN, STD
from pipeline.errors import Refusal

WEIGHTS_FILE = "weights.safetensors"
META_FILE = "imgpipe_model.json"
PYFUNC_CODE = Path(__file__).with_name("mlflow_pyfunc.py")
ARCHITECTURE = "resnet18"
FORMAT = 1


def write_files(
    model: nn.Module, directory: Path, *, label_map: dict[str, int], image_size: int
) -> dict[str, Path]:
    """Write `model`'s weights and their meaning into `directory`; returns the two paths by the
    names the pyfunc model's artifacts use ("weights", "meta").
    """
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / WEIGHTS_FILE
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(weights), metadata={"format": str(FORMAT)})
    meta = directory / META_FILE
    meta.write_text(
        json.dumps(
            {
                "format": FORMAT,
                "architecture": ARCHITECTURE,
                "num_classes": len(label_map),
                "label_map": label_map,
                "image_size": image_size,
                "input": "float32 RGB in [0, 1], shape (N, 3, image_size, image_size)",
                "mean": list(MEAN),
                "std": list(STD),
            },
            ensure_ascii=False,
            sort_keys=True,
        )
    )
    return {"weights": weights, "meta": meta}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def find_file(model_dir: Path, name: str) -> Path | None:
    """`name` inside a downloaded MLflow model (pyfunc artifacts sit under `artifacts/`)."""
    for candidate in (model_dir / "artifacts" / name, model_dir / name):
        if candidate.is_file():
            return candidate
    return None


def read_weights(model_dir: Path, *, expected_sha256: str | None, what: str) -> dict[str, Any]:
    """The state dict in a downloaded model, refused unless its SHA-256 is `expected_sha256`.

    `what` names the version in the refusal ("image-classifier v3"). A model without the
    weights file or without a recorded digest was not registered by this pipeline's training.
    """
    weights = find_file(model_dir, WEIGHTS_FILE)
    if weights is None or not expected_sha256:
        raise Refusal(
            f"{what} has no {WEIGHTS_FILE} with a weights_sha256 tag: it was not registered by"
            " this pipeline's training (or by a release before weights files); retrain, or"
            " promote one that was"
        )
    data = weights.read_bytes()  # hashed and loaded from the same bytes: no swap in between
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected_sha256:
        raise Refusal(
            f"{what}: {WEIGHTS_FILE} has SHA-256 {actual[:16]}…, registered as"
            f" {expected_sha256[:16]}…: the file was altered after registration; not used"
        )
    return load(data)
