"""MLflow pyfunc model of a registered version, for users of `mlflow.pyfunc.load_model`.

    model = mlflow.pyfunc.load_model("models:/image-classifier@champion")
    logits = model.predict(batch)  # float32 RGB in [0, 1], shape (N, 3, S, S), any N

MLflow stores this file with each version (models from code: no pickle) and runs it when a user
loads the model, so it imports only torch, torchvision, safetensors and numpy: it works where
the `pipeline` package is not installed. Its network is `pipeline.model.build_model`'s
(Normalize, then ResNet18 with a new head), filled from the version's `weights.safetensors`;
the label of output column i is the `label_map` entry with value i (`imgpipe_model.json`).
The pipeline itself never loads this model (`pipeline.model_files`).
"""

from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel
from safetensors.torch import load_file
from torchvision import models, transforms


class ImageClassifier(PythonModel):
    def load_context(self, context) -> None:
        meta = json.loads(Path(context.artifacts["meta"]).read_text())
        if meta.get("architecture") != "resnet18":
            raise ValueError(f"unknown architecture {meta.get('architecture')!r}")
        net = models.resnet18(weights=None)
        net.fc = torch.nn.Linear(net.fc.in_features, meta["num_classes"])
        model = torch.nn.Sequential(
            OrderedDict(normalize=transforms.Normalize(meta["mean"], meta["std"]), net=net)
        )
        model.load_state_dict(load_file(context.artifacts["weights"]), strict=True)
        self.model = model.eval()
        self.label_map = meta["label_map"]

    def predict(self, context, model_input, params=None):
        batch = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
        with torch.inference_mode():
            return self.model(batch).numpy()


set_model(ImageClassifier())
