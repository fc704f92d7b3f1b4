"""ResNet18 classifier: construction, initial weights, and batched prediction.

The module is an `nn.Sequential` of torchvision parts only (`Normalize` then `resnet18`), so a
model pickled into MLflow loads wherever torch and torchvision are installed, with no project
code on the path. Input: float32 RGB in [0, 1], shape `(N, 3, S, S)`, any N.
"""

from __future__ import annotations

import io
import logging
import os
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision import models, transforms

from pipeline.data import MEAN, STD, to_model_input
from pipeline.params import PRECISIONS

log = logging.getLogger(__name__)

WEIGHT_CHOICES = "none, imagenet, a local path or an s3:// URI of a state dict"


def build_model(num_classes: int, *, weights: str = "none", store=None) -> nn.Sequential:
    """ResNet18 with a `num_classes` head; `weights` as in `WEIGHT_CHOICES`.

    `imagenet` uses torchvision's cached weights (TORCH_HOME) and fails with a clear message
    when they can't be had. A state dict may hold a full model (its head is replaced when the
    class count differs) or a bare torchvision ResNet18.
    """
    if num_classes < 2:
        raise ValueError(f"need at least 2 classes to train a classifier, got {num_classes}")
    net = models.resnet18(weights=None)
    if weights == "imagenet":
        net = _imagenet_resnet18()
    elif weights not in ("none", "", None):
        _load_state_dict(net, _read_weights(weights, store))
    net.fc = nn.Linear(net.fc.in_features, num_classes)
    return nn.Sequential(OrderedDict(normalize=transforms.Normalize(MEAN, STD), net=net))


def _imagenet_resnet18() -> nn.Module:
    enum = models.ResNet18_Weights.IMAGENET1K_V1
    try:
        return models.resnet18(weights=enum)
    except Exception as exc:  # noqa: BLE001 - offline download failures come in many types
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        raise RuntimeError(
            f"weights=imagenet: could not load {enum} ({type(exc).__name__}: {exc}). Offline, put "
            f"{enum.url.rsplit('/', 1)[-1]} into {cache} (TORCH_HOME), bake it into the image "
            "(docker/airflow/Dockerfile, BAKE_IMAGENET_WEIGHTS=true), or use weights=none"
        ) from exc


def _read_weights(uri: str, store) -> bytes:
    if uri.startswith("s3://"):
        if store is None:
            raise ValueError(f"weights={uri}: an object store is needed to read s3:// weights")
        bucket, _, key = uri[len("s3://") :].partition("/")
        return store.with_bucket(bucket).get_bytes(key)
    path = Path(uri)
    if not path.is_file():
        raise FileNotFoundError(f"weights={uri}: no such file; expected {WEIGHT_CHOICES}")
    return path.read_bytes()


def _load_state_dict(net: nn.Module, data: bytes) -> None:
    state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    state = state.get("model", state) if isinstance(state, dict) else state
    # Accept our own Sequential (prefix "net.") as well as a bare ResNet18.
    state = {k.removeprefix("net."): v for k, v in state.items() if not k.startswith("normalize.")}
    head = {k: v for k, v in state.items() if k.startswith("fc.")}
    if head and head.get("fc.weight", torch.empty(0)).shape != net.fc.weight.shape:
        state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    missing, unexpected = net.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if not k.startswith("fc.")]:
        raise ValueError(
            f"state dict does not fit ResNet18: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )


def freeze_backbone(model: nn.Sequential) -> None:
    """Train only the head (the fish project's recipe for small datasets with ImageNet weights)."""
    for name, param in model.named_parameters():
        param.requires_grad = name.startswith("net.fc.")


def pick_device() -> torch.device:
    """CUDA when present, else CPU with every core."""
    if torch.cuda.is_available():
        # Fixed input sizes: let cuDNN pick the fastest convolution algorithms once.
        torch.backends.cudnn.benchmark = True
        return torch.device("cuda")
    torch.set_num_threads(os.cpu_count() or 1)
    return torch.device("cpu")


def training_autocast(device: torch.device) -> tuple[torch.dtype | None, Any]:
    """(autocast dtype, GradScaler) for training on `device`.

    bf16 where the GPU has it (its range needs no loss scaling), fp16 with a GradScaler on
    older GPUs, plain fp32 on the CPU.
    """
    if device.type != "cuda":
        return None, None
    if torch.cuda.is_bf16_supported():
        return torch.bfloat16, None
    return torch.float16, torch.amp.GradScaler("cuda")


def resolve_precision(precision: str, device: torch.device) -> str:
    """The concrete scoring precision: `auto` is bf16 on a GPU with bf16, else fp32."""
    if precision not in PRECISIONS:
        raise ValueError(
            f"unknown precision {precision!r}; expected one of: {', '.join(PRECISIONS)}"
        )
    if precision != "auto":
        return precision
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


@dataclass(frozen=True)
class Prediction:
    """Top-k of one image: labels and probabilities, best first."""

    labels: tuple[str, ...]
    probs: tuple[float, ...]

    @property
    def label(self) -> str:
        return self.labels[0]

    @property
    def confidence(self) -> float:
        return self.probs[0]


def predict(
    model: nn.Module,
    batch: torch.Tensor,
    labels: Sequence[str],
    *,
    top_k: int = 3,
    precision: str = "fp32",
) -> list[Prediction]:
    """Top-k predictions for a batch under `inference_mode`.

    `batch`: `uint8` pixels (converted on the model's device) or float in [0, 1].
    `precision`: fp32; bf16 (autocast); int8 (`model` is a `pipeline.onnx_runtime.Int8Model`);
    auto (`resolve_precision`).
    """
    return to_predictions(*top_k_probs(model, batch, top_k=top_k, precision=precision), labels)


def top_k_probs(
    model: nn.Module, batch: torch.Tensor, *, top_k: int = 3, precision: str = "fp32"
) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities, class indices) of the top k, left on the model's device (no host sync)."""
    device = torch.device("cpu") if precision == "int8" else next(model.parameters()).device
    precision = resolve_precision(precision, device)
    with torch.inference_mode():
        if batch.dtype == torch.uint8:
            batch = to_model_input(batch.to(device, non_blocking=True))
        if precision == "int8":
            logits = model(batch)
        else:
            batch = batch.to(device, non_blocking=True).contiguous(
                memory_format=torch.channels_last
            )
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                logits = model(batch)
        probs = torch.softmax(logits.float(), dim=1)
        return probs.topk(min(top_k, probs.shape[1]), dim=1)


def to_predictions(
    values: torch.Tensor, indices: torch.Tensor, labels: Sequence[str]
) -> list[Prediction]:
    """`Prediction`s from `top_k_probs` output (waits for it when it is on a GPU)."""
    return [
        Prediction(tuple(labels[i] for i in idx), tuple(round(float(v), 6) for v in vals))
        for vals, idx in zip(values.tolist(), indices.tolist(), strict=True)
    ]
