"""Images in, tensors out: decoding, the preprocessing presets shared by training and scoring, a content-keyed cache.

Choices:

- Presets produce `uint8` tensors `(3, S, S)`; the model itself scales and normalizes
  (`pipeline.model`), so the logged MLflow model takes plain RGB pixels in [0, 1] and the
  training and scoring paths cannot drift apart. `EvalPreset` is the only eval transform;
  `TrainPreset` is `EvalPreset` plus optional augmentation.
- Decoding uses `torchvision.io` (about 2x Pillow per core) for JPEG/PNG/WEBP and Pillow for the rest;
  JPEGs much larger than the target are decoded at reduced size by Pillow's `draft` (DCT scaling).
- Horizontal flips are off: labels such as digits or text are not mirror-invariant.
- The cache keys a file by (bucket, key, ETag), so a changed object is fetched again and an
  unchanged one never is; writes are atomic (temp file + rename), so a killed process leaves no
  half-written file.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as F

from pipeline.catalog import ImageRecord
from pipeline.store import ObjectStore

log = logging.getLogger(__name__)

# ImageNet statistics: the model normalizes with them (pipeline.model), here for reference only.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
_TORCHVISION_FORMATS = (b"\xff\xd8\xff", b"\x89PNG", b"RIFF")


class ImageDecodeError(ValueError):
    """The bytes are not a decodable image (truncated, corrupt, unsupported)."""


class MissingObjectError(LookupError):
    """The object is gone from the bucket (or its ETag changed) since it was catalogued."""


def decode_image(data: bytes, *, target_size: int | None = None) -> torch.Tensor:
    """RGB `uint8` tensor `(3, H, W)` from encoded bytes; ImageDecodeError with the cause otherwise.

    With `target_size`, big JPEGs are decoded at reduced scale (never below `target_size`).
    """
    if not data:
        raise ImageDecodeError("empty object")
    try:
        if data.startswith(_TORCHVISION_FORMATS) and not (
            target_size and data.startswith(b"\xff\xd8\xff") and _jpeg_reducible(data, target_size)
        ):
            from torchvision.io import ImageReadMode
            from torchvision.io import decode_image as tv_decode

            return tv_decode(
                torch.frombuffer(bytearray(data), dtype=torch.uint8), ImageReadMode.RGB
            )
        return _decode_pillow(data, target_size)
    except ImageDecodeError:
        raise
    except Exception as exc:  # noqa: BLE001 - every decoder failure means: not decodable
        raise ImageDecodeError(f"{type(exc).__name__}: {str(exc)[:200]}") from exc


def _jpeg_reducible(data: bytes, target_size: int) -> bool:
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        return min(im.size) >= 2 * target_size


def _decode_pillow(data: bytes, target_size: int | None) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        if target_size and im.format == "JPEG":
            im.draft("RGB", (target_size, target_size))
        im.load()
        rgb = im.convert("RGB")
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1).contiguous()


@dataclass(frozen=True)
class EvalPreset:
    """Resize the short side to `image_size`, centre-crop a square: used for validation and scoring."""

    image_size: int

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        image = F.resize(image, self.image_size, antialias=True)
        return F.center_crop(image, [self.image_size, self.image_size])

    def from_bytes(self, data: bytes) -> torch.Tensor:
        """Decode (at reduced size where the format allows) and preprocess."""
        return self(decode_image(data, target_size=self.image_size))


@dataclass(frozen=True)
class TrainPreset:
    """`EvalPreset` plus, when `augment`, a mild random resized crop and colour jitter."""

    image_size: int
    augment: bool = True

    def __post_init__(self) -> None:
        aug = T.Compose(
            [
                T.RandomResizedCrop(
                    self.image_size, scale=(0.7, 1.0), ratio=(0.85, 1.18), antialias=True
                ),
                T.ColorJitter(brightness=0.2, contrast=0.2),
            ]
        )
        object.__setattr__(self, "_aug", aug)
        object.__setattr__(self, "_eval", EvalPreset(self.image_size))

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if not self.augment:
            return self._eval(image)
        # Resize first so the crop works on a bounded image whatever the source resolution.
        return self._aug(F.resize(image, int(self.image_size * 1.15), antialias=True))

    def from_bytes(self, data: bytes) -> torch.Tensor:
        return self(decode_image(data, target_size=self.image_size))


def to_model_input(batch: torch.Tensor) -> torch.Tensor:
    """`uint8` batch `(N, 3, S, S)` → float32 in [0, 1], the input the logged model expects."""
    return batch.to(torch.float32).div_(255.0)


# ----------------------------------------------------------------------------- cache


class ImageCache:
    """Local copies of objects, keyed by (bucket, key, ETag); shared by training, scoring and reruns."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root) / "images"

    def path(self, record: ImageRecord) -> Path:
        digest = hashlib.sha256(
            f"{record.bucket}\0{record.object_key}\0{record.etag}".encode()
        ).hexdigest()
        return self.root / digest[:2] / digest

    def get(self, store: ObjectStore, record: ImageRecord) -> bytes:
        """The object's bytes, from the cache or S3 (then cached); MissingObjectError when gone."""
        path = self.path(record)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            pass
        data = fetch_object(store, record)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        os.replace(tmp, path)
        return data

    def fill(
        self, store: ObjectStore, records: Sequence[ImageRecord], *, workers: int = 16
    ) -> dict[int, str]:
        """Fetch every record not cached yet, in parallel; returns {image_id: reason} of failures."""
        missing = [r for r in records if not self.path(r).exists()]
        failures: dict[int, str] = {}
        if not missing:
            return failures

        def one(record: ImageRecord) -> tuple[int, str | None]:
            try:
                self.get(store, record)
                return record.image_id, None
            except MissingObjectError as exc:
                return record.image_id, str(exc)

        with ThreadPoolExecutor(max_workers=workers) as pool:
            for image_id, error in pool.map(one, missing):
                if error:
                    failures[image_id] = error
        log.info(
            "cache: fetched %d objects, %d missing", len(missing) - len(failures), len(failures)
        )
        return failures


def fetch_object(store: ObjectStore, record: ImageRecord) -> bytes:
    """GET one catalogued object; MissingObjectError if it vanished or changed since the scan."""
    from botocore.exceptions import ClientError

    try:
        response = store.client.get_object(
            Bucket=record.bucket, Key=record.object_key, IfMatch=record.etag
        )
        return response["Body"].read()
    except ClientError as exc:
        code = str(exc.response.get("Error", {}).get("Code", ""))
        if code in ("NoSuchKey", "404", "NotFound"):
            raise MissingObjectError("missing_object: deleted since it was catalogued") from exc
        if code in ("PreconditionFailed", "412"):
            raise MissingObjectError("changed_object: ETag differs from the catalog") from exc
        raise


def chunks(items: Iterable, size: int) -> Iterable[list]:
    """Consecutive lists of at most `size` items (the last may be shorter)."""
    batch: list = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch
