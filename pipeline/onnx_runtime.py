"""int8 scoring through ONNX Runtime: export a registered model, quantize it statically, cache it.

Choices (measurements in bench/results/score.md):

- Export: torch's TorchScript-based exporter (`dynamo=False`): a plain Conv/Relu/Gemm graph that
  ONNX Runtime's quantizer handles, with no `onnxscript` dependency; the batch axis is dynamic.
- Quantization: static, QDQ format, uint8 activations and per-channel int8 weights (the fast
  U8S8 kernels on x86, VNNI where present), activation ranges from the 99.999th percentile of
  histograms over real calibration images (on a trained digits ResNet18 it agreed with fp32 on
  every image, min/max ranges missed a few). Calibration images: the first `images` (by sha256
  of their object key: deterministic, spread over labels) train/val images of the dataset
  version the model was trained on, preprocessed by `EvalPreset` exactly as scoring does.
- Cache: `<cache_dir>/models/<model>/onnx/`, one file per model version, MLflow run, image size
  and calibration settings, written atomically (temp file + rename); a second load (another
  shard, a rerun) reads the file and never exports or calibrates again.
- `Int8Model` plays the torch module's role for `pipeline.model.predict`: a float batch in
  [0, 1], shape `(N, 3, S, S)`, any N, in; logits out.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.files import write_atomically

log = logging.getLogger(__name__)

OPSET = 17
INPUT_NAME = "pixels"
OUTPUT_NAME = "logits"
CALIBRATION_SUBSETS = ("train", "val")
CALIBRATION_METHODS = ("percentile", "minmax", "entropy")


@dataclass(frozen=True)
class Calibration:
    """How activation ranges are calibrated; part of the cached file's name."""

    images: int = 256
    method: str = "percentile"
    percentile: float = 99.999
    batch_size: int = 16  # the histogram calibrator holds one batch's activations at a time

    def __post_init__(self) -> None:
        if self.method not in CALIBRATION_METHODS:
            raise ValueError(
                f"unknown calibration method {self.method!r};"
                f" expected one of: {', '.join(CALIBRATION_METHODS)}"
            )
        if self.images < 1:
            raise ValueError(f"calibration needs at least 1 image, got {self.images}")

    @property
    def key(self) -> str:
        method = f"p{self.percentile:g}" if self.method == "percentile" else self.method
        return f"{method}-n{self.images}"


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError as exc:
        raise RuntimeError(
            "precision int8 needs onnxruntime and onnx (pinned in requirements.txt):"
            " `pip install -r requirements.txt`, or score with precision fp32/bf16"
        ) from exc
    return onnxruntime


class Int8Model:
    """An ONNX Runtime session over a quantized model, called like the torch module."""

    def __init__(self, path: str | Path, *, threads: int | None = None) -> None:
        ort = _onnxruntime()
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or os.cpu_count() or 1
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        # Idle intra-op threads sleep instead of spinning: while a batch is fetched and decoded
        # in other threads of the same process, spinning would steal their cores.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.path = Path(path)
        self.session = ort.InferenceSession(
            str(self.path), options, providers=["CPUExecutionProvider"]
        )

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        pixels = batch.detach().to("cpu", torch.float32).contiguous().numpy()
        (logits,) = self.session.run([OUTPUT_NAME], {INPUT_NAME: pixels})
        return torch.from_numpy(logits)


def int8_path(cache_dir: str | Path, loaded: Any, calibration: Calibration) -> Path:
    """Where the quantized model of a loaded version is cached."""
    from pipeline.registry import safe_name

    name = (
        f"v{loaded.model_version}-{loaded.run_id[:12]}-s{loaded.image_size}"
        f"-{calibration.key}.int8.onnx"
    )
    return Path(cache_dir) / "models" / safe_name(loaded.model_name) / "onnx" / name


def int8_model(
    loaded: Any,
    db: Any,
    store: Any,
    *,
    cache_dir: str | Path,
    calibration: Calibration | None = None,
    threads: int | None = None,
) -> Int8Model:
    """The int8 model of a loaded version (`registry.LoadedModel`): from the cache, or exported,
    calibrated on its dataset version's train/val images and quantized (then cached)."""
    _onnxruntime()
    calibration = calibration or Calibration()
    path = int8_path(cache_dir, loaded, calibration)
    if path.exists() and not intact(path):
        log.warning("int8: cached %s does not match its checksum: quantizing again", path)
        path.unlink(missing_ok=True)
    if not path.exists():
        images = calibration_images(db, store, loaded, cache_dir=cache_dir, n=calibration.images)
        quantize_module(loaded.module, images, path, calibration=calibration)
    else:
        log.info("int8: %s v%s from cache %s", loaded.model_name, loaded.model_version, path)
    return Int8Model(path, threads=threads)


def checksum_path(path: Path) -> Path:
    """The SHA-256 written beside a quantized model, which its reader checks."""
    return path.with_name(path.name + ".sha256")


def intact(path: Path) -> bool:
    """Whether the cached model at `path` holds the bytes it was written with (a damaged or
    partial copy on local disk is quantized again, never loaded)."""
    try:
        expected = checksum_path(path).read_text().strip()
    except FileNotFoundError:
        return False
    return hashlib.sha256(path.read_bytes()).hexdigest() == expected


def calibration_images(
    db: Any, store: Any, loaded: Any, *, cache_dir: str | Path, n: int
) -> torch.Tensor:
    """`uint8 (n', 3, S, S)`: up to `n` preprocessed train/val images of the model's dataset."""
    from pipeline import catalog
    from pipeline.data import EvalPreset, ImageCache, ImageDecodeError

    if not loaded.dataset_version:
        raise ValueError(
            f"{loaded.model_name} v{loaded.model_version} has no dataset_version tag:"
            " int8 calibration needs the images it was trained on"
        )
    records = catalog.dataset_images(db, loaded.dataset_version, CALIBRATION_SUBSETS)
    records.sort(key=lambda r: hashlib.sha256(r.object_key.encode()).hexdigest())
    cache = ImageCache(cache_dir)
    preset = EvalPreset(loaded.image_size)
    chosen = records[: n + n // 4]  # a few spares for images that vanished or don't decode
    cache.fill(store, chosen)
    tensors = []
    for record in chosen:
        try:
            tensors.append(preset.from_bytes(cache.get(store, record)))
        except (ImageDecodeError, LookupError) as exc:
            log.warning("int8 calibration: skipping %s (%s)", record.object_key, exc)
        if len(tensors) == n:
            break
    if not tensors:
        raise ValueError(
            f"dataset {loaded.dataset_version} has no usable train/val images to calibrate"
            f" {loaded.model_name} v{loaded.model_version} for int8"
        )
    return torch.stack(tensors)


def export_onnx(module: torch.nn.Module, path: str | Path, image_size: int) -> None:
    """Export a float model (input float `(N, 3, S, S)` in [0, 1]) with a dynamic batch axis."""
    import copy

    cpu = copy.deepcopy(module).to("cpu", torch.float32).eval()
    example = torch.rand(2, 3, image_size, image_size)
    with warnings.catch_warnings():
        # The exporter announces that dynamo is the new default: we choose the TorchScript one.
        # The tracer warns that Normalize's mean/std become constants: they are.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        torch.onnx.export(
            cpu,
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
        )


class _Batches:
    """Calibration batches for ONNX Runtime; `set_range` lets it collect one batch at a time."""

    def __init__(self, images: torch.Tensor, batch_size: int) -> None:
        pixels = images.to(torch.float32).div_(255.0).numpy()
        self.batches = [pixels[i : i + batch_size] for i in range(0, len(pixels), batch_size)]
        self.start, self.end = 0, len(self.batches)

    def __len__(self) -> int:
        return len(self.batches)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.start, self.end = start_index, end_index

    def get_next(self) -> dict[str, Any] | None:
        if self.start >= min(self.end, len(self.batches)):
            return None
        self.start += 1
        return {INPUT_NAME: self.batches[self.start - 1]}


def quantize_module(
    module: torch.nn.Module,
    images: torch.Tensor,
    path: str | Path,
    *,
    calibration: Calibration | None = None,
) -> Path:
    """Export `module`, quantize it to int8 with `images` (`uint8 (N, 3, S, S)`) as calibration
    data, and write the result to `path` atomically."""
    _onnxruntime()
    from onnxruntime.quantization import (
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )
    from onnxruntime.quantization.shape_inference import quant_pre_process

    calibration = calibration or Calibration()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix=".int8-", dir=path.parent))
    try:
        export_onnx(module, work / "fp32.onnx", int(images.shape[-1]))
        quant_pre_process(str(work / "fp32.onnx"), str(work / "pre.onnx"))
        reader = _Batches(images, calibration.batch_size)
        quantize_static(
            str(work / "pre.onnx"),
            str(work / "int8.onnx"),
            reader,
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            calibrate_method={
                "percentile": CalibrationMethod.Percentile,
                "minmax": CalibrationMethod.MinMax,
                "entropy": CalibrationMethod.Entropy,
            }[calibration.method],
            extra_options={
                "CalibPercentile": calibration.percentile,
                # One batch per collection round: histograms of every activation of every
                # calibration image at once would need gigabytes at 224 px.
                "CalibStridedMinMax": 1,
            },
        )
        # The checksum first: a model in place is never without the checksum it is read with.
        digest = hashlib.sha256((work / "int8.onnx").read_bytes()).hexdigest()
        write_atomically(checksum_path(path), f"{digest}\n".encode())
        os.replace(work / "int8.onnx", path)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log.info(
        "int8: quantized on %d calibration images (%s) in %.1fs -> %s",
        len(images),
        calibration.key,
        time.monotonic() - started,
        path,
    )
    return path
