"""Images in, tensors out: decoding, the preprocessing presets shared by training and scoring, a content-keyed cache.

Choices:

- Presets produce `uint8` tensors `(3, S, S)`; the model itself scales and normalizes
  (`pipeline.model`), so the logged MLflow model takes plain RGB pixels in [0, 1] and the
  training and scoring paths cannot drift apart. `EvalPreset` is the only eval transform;
  `TrainPreset` is `EvalPreset` plus optional augmentation.
- Decoding uses `torchvision.io` (about 2x Pillow per core) for JPEG/PNG/WEBP and Pillow for the rest
  (BMP, GIF's first frame, TIFF, PPM/PGM/PBM; palette, alpha, CMYK and grayscale become RGB);
  JPEGs much larger than the target are decoded at reduced size by Pillow's `draft` (DCT scaling).
- Horizontal flips are off: labels such as digits or text are not mirror-invariant.
- The cache keys a file by (bucket, key, ETag), so a changed object is fetched again and an
  unchanged one never is; writes are atomic (temp file + rename), so a killed process leaves no
  half-written file.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import logging
import math
import multiprocessing
import os
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.io import decode_image as tv_decode
from torchvision.ops import roi_align
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as F

from pipeline.catalog import REJECT_CHANGED_OBJECT, REJECT_MISSING_OBJECT
from pipeline.config import CACHE_MAX_GB_ENV, cache_max_bytes
from pipeline.errors import S3_CHANGED_CODES, S3_MISSING_CODES, is_out_of_memory, s3_error_code
from pipeline.files import read_own_file, write_atomically
from pipeline.records import ImageRecord

if TYPE_CHECKING:
    from pipeline.store import ObjectStore

log = logging.getLogger(__name__)

# ImageNet statistics: the model normalizes with them (pipeline.model), here for reference only.
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)
_JPEG = b"\xff\xd8\xff"
_TORCHVISION_FORMATS = (_JPEG, b"\x89PNG", b"RIFF")
# TrainPreset resizes to this much more than image_size before its random crop.
_CROP_HEADROOM = 1.15
_CROP_SCALE = (0.7, 1.0)
_CROP_RATIO = (0.85, 1.18)
_JITTER = 0.2  # brightness and contrast factors drawn from [1 - _JITTER, 1 + _JITTER]
MAX_AUTO_WORKERS = 16
# A cached copy used within this long is never trimmed: a run may still read it. Training marks
# its copies used when it starts and reads them for up to its execution_timeout (6 h); reads
# mark a copy at most every `_TOUCH_EVERY_S`.
CACHE_MIN_AGE_S = 7 * 3600
_TOUCH_EVERY_S = 600
_STALE_TMP_S = 3600
# A disk that cannot take a copy: full, over quota, a file size limit, read-only.
_DISK_FULL = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS})


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
        if (
            data.startswith(_TORCHVISION_FORMATS)
            and not (target_size and is_jpeg(data) and _jpeg_reducible(data, target_size))
            and not _animated_webp(data)  # torchvision refuses those; Pillow: first frame
        ):
            image = tv_decode(
                torch.frombuffer(bytearray(data), dtype=torch.uint8), ImageReadMode.RGB
            )
            # 16-bit PNGs decode to uint16: scale them to the 8 bits everything else has.
            return (
                image if image.dtype == torch.uint8 else F.to_dtype(image, torch.uint8, scale=True)
            )
        return _decode_pillow(data, target_size)
    except ImageDecodeError:
        raise
    except Exception as exc:  # noqa: BLE001 - every decoder failure means: not decodable
        if is_out_of_memory(exc):
            raise  # the worker's fault: the task fails and retries, the image stays accepted
        raise ImageDecodeError(f"{type(exc).__name__}: {str(exc)[:200]}") from exc


def _animated_webp(data: bytes) -> bool:
    """A WebP whose extended header (VP8X) has its animation flag set."""
    return data[8:16] == b"WEBPVP8X" and len(data) > 20 and bool(data[20] & 0x02)


def is_jpeg(data: bytes) -> bool:
    """JPEG by its magic bytes."""
    return data.startswith(_JPEG)


def gpu_decodable(data: bytes) -> bool:
    """A sequential (baseline or extended) JPEG of 1 or 3 components: what nvJPEG decodes as
    libjpeg does. Progressive and CMYK JPEGs, and everything else, are decoded on the CPU.
    """
    if not data.startswith(_JPEG):
        return False
    pos, end = 2, min(len(data), 1 << 16)
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            return False
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        if marker in (0xC0, 0xC1):  # SOF0 baseline, SOF1 extended sequential
            return pos + 9 < len(data) and data[pos + 9] in (1, 3)
        if 0xC2 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) or marker == 0xDA:
            return False  # progressive, lossless, arithmetic; or scan data before any SOF
        pos += 2 + length
    return False


def _jpeg_reducible(data: bytes, target_size: int) -> bool:
    with Image.open(io.BytesIO(data)) as im:
        return min(im.size) >= 2 * target_size


def _decode_pillow(data: bytes, target_size: int | None) -> torch.Tensor:
    with Image.open(io.BytesIO(data)) as im:
        if target_size and im.format == "JPEG":
            im.draft("RGB", (target_size, target_size))
        im.load()
        if im.mode.startswith("I;16") or im.mode in ("I", "F"):
            # 16-bit (and 32-bit) single-channel images: Pillow's convert would clip at 255.
            # Integer modes are taken as 16-bit data, float ones as already in 0-255.
            values = np.asarray(im, dtype=np.float64)
            if im.mode != "F":
                values = values / 257.0
            im = Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))
        rgb = im.convert("RGB")
    return torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1).contiguous()


@dataclass(frozen=True)
class EvalPreset:
    """Resize the short side to `image_size`, centre-crop a square: used for validation and scoring."""

    image_size: int

    @property
    def source_size(self) -> int:
        """Side of the square images the per-image part produces."""
        return self.image_size

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        return resize_center_crop(image, self.image_size)

    def from_bytes(self, data: bytes) -> torch.Tensor:
        """Decode (at reduced size where the format allows) and preprocess."""
        return self(decode_image(data, target_size=self.image_size))

    def on_device(self, batch: torch.Tensor) -> torch.Tensor:
        """The model input of a `uint8` batch already on its device."""
        return to_model_input(batch)


@dataclass(frozen=True)
class TrainPreset:
    """`EvalPreset` plus, when `augment`, a mild random resized crop and colour jitter.

    With `batch_augment` (GPU workers) the per-image part only resizes and centre-crops to
    `source_size`, and `on_device` draws the crop and jitter per image on the whole batch on
    the device, so a worker with few CPU cores per GPU still feeds it. The square source loses
    the strips beyond the short side that the per-image crop could reach; the crop scale, aspect
    ratios and jitter factors are the same.
    """

    image_size: int
    augment: bool = True
    batch_augment: bool = False

    def __post_init__(self) -> None:
        aug = T.Compose(
            [
                T.RandomResizedCrop(
                    self.image_size, scale=_CROP_SCALE, ratio=_CROP_RATIO, antialias=True
                ),
                T.ColorJitter(brightness=_JITTER, contrast=_JITTER),
            ]
        )
        object.__setattr__(self, "_aug", aug)
        object.__setattr__(self, "_eval", EvalPreset(self.image_size))

    @property
    def crop_source_size(self) -> int:
        """Short side an image is resized to before the random crop: `image_size` plus headroom."""
        return int(self.image_size * _CROP_HEADROOM)

    @property
    def source_size(self) -> int:
        """Side of the square images the per-image part produces."""
        if self.augment and self.batch_augment:
            return self.crop_source_size
        return self.image_size

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if not self.augment:
            return self._eval(image)
        if self.batch_augment:
            return resize_center_crop(image, self.source_size)
        # Resize first so the crop works on a bounded image whatever the source resolution.
        return self._aug(F.resize(image, self.crop_source_size, antialias=True))

    def from_bytes(self, data: bytes) -> torch.Tensor:
        return self(decode_image(data, target_size=self.image_size))

    def on_device(self, batch: torch.Tensor) -> torch.Tensor:
        """The model input of a `uint8` batch on its device: augmented there with `batch_augment`."""
        images = to_model_input(batch)
        if not (self.augment and self.batch_augment):
            return images
        with torch.no_grad():
            images = random_resized_crop_batch(images, self.image_size)
            return color_jitter_batch(images)


def resize_center_crop(image: torch.Tensor, size: int) -> torch.Tensor:
    """Short side to `size` (antialiased), then the central `size` x `size` square."""
    image = F.resize(image, size, antialias=True)
    return F.center_crop(image, [size, size])


def to_model_input(batch: torch.Tensor) -> torch.Tensor:
    """`uint8` batch `(N, 3, S, S)` → float32 in [0, 1], the input the logged model expects."""
    return batch.to(torch.float32).div_(255.0)


def random_resized_crop_batch(
    images: torch.Tensor,
    size: int,
    *,
    scale: tuple[float, float] = _CROP_SCALE,
    ratio: tuple[float, float] = _CROP_RATIO,
) -> torch.Tensor:
    """A random crop per image (area fraction in `scale`, aspect in `ratio`) resized to `size`.

    One `roi_align` over the batch: bilinear, averaging ceil(crop/size) samples per output pixel
    as its antialiasing. Crops too wide or tall for the image are clamped to it (torchvision's
    per-image transform retries and then falls back to a centre crop).
    """
    n, _, height, width = images.shape
    device = images.device
    area = torch.empty(n, device=device).uniform_(*scale) * (height * width)
    aspect = torch.exp(
        torch.empty(n, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1]))
    )
    crop_w = torch.sqrt(area * aspect).clamp(max=width)
    crop_h = torch.sqrt(area / aspect).clamp(max=height)
    x0 = torch.rand(n, device=device) * (width - crop_w)
    y0 = torch.rand(n, device=device) * (height - crop_h)
    boxes = torch.stack(
        [torch.arange(n, device=device, dtype=images.dtype), x0, y0, x0 + crop_w, y0 + crop_h], 1
    )
    return roi_align(images, boxes, output_size=size, sampling_ratio=0, aligned=True)


def color_jitter_batch(images: torch.Tensor, strength: float = _JITTER) -> torch.Tensor:
    """Brightness and contrast factors drawn per image, applied in a random order per image.

    Same as torchvision's `ColorJitter(brightness, contrast)` on float images in [0, 1].
    """
    n = images.shape[0]
    shape = (n, 1, 1, 1)
    low, high = 1.0 - strength, 1.0 + strength
    brightness = torch.empty(shape, device=images.device).uniform_(low, high)
    contrast = torch.empty(shape, device=images.device).uniform_(low, high)

    def adjust_brightness(x: torch.Tensor) -> torch.Tensor:
        return (x * brightness).clamp_(0.0, 1.0)

    def adjust_contrast(x: torch.Tensor) -> torch.Tensor:
        mean = F.rgb_to_grayscale(x).mean(dim=(-3, -2, -1), keepdim=True)
        return (contrast * x + (1.0 - contrast) * mean).clamp_(0.0, 1.0)

    brightness_first = torch.rand(shape, device=images.device) < 0.5
    return torch.where(
        brightness_first,
        adjust_contrast(adjust_brightness(images)),
        adjust_brightness(adjust_contrast(images)),
    )


# ----------------------------------------------------------------------------- batches on a device


def preprocess_on_device(
    items: Sequence[bytes | torch.Tensor], size: int, device: torch.device
) -> tuple[torch.Tensor, dict[int, str]]:
    """One `uint8` batch `(N, 3, size, size)` on `device` from encoded JPEGs and ready tensors.

    `items` holds, per image, either a tensor already preprocessed to `size` on the CPU (other
    formats) or the bytes of a JPEG (`gpu_decodable`), which are decoded on a CUDA device in one
    nvJPEG batch and resized there (`resize_center_crop`, one call per image size). Returns the
    batch, in order, with zeros where an image did not decode, and {index: reason} of those.
    """
    out = torch.zeros((len(items), 3, size, size), dtype=torch.uint8, device=device)
    failed: dict[int, str] = {}
    encoded = [i for i, item in enumerate(items) if not isinstance(item, torch.Tensor)]
    ready = [i for i, item in enumerate(items) if isinstance(item, torch.Tensor)]
    if ready:
        host = torch.stack([items[i] for i in ready])
        if device.type == "cuda":
            host = host.pin_memory()
        out[ready] = host.to(device, non_blocking=True)
    if encoded:
        decoded = _decode_jpegs(items, encoded, device, failed)
        groups: dict[tuple[int, int], list[int]] = {}
        for i, image in zip(encoded, decoded, strict=True):
            if image is not None:
                groups.setdefault(tuple(image.shape[-2:]), []).append(i)
        by_index = dict(zip(encoded, decoded, strict=True))
        for members in groups.values():
            # One resize per image size: datasets of uniform size take one call per batch.
            batch = torch.stack([by_index[i] for i in members])
            if batch.shape[-2:] != (size, size):
                batch = resize_center_crop(batch.to(torch.float32), size)
                batch = batch.round_().clamp_(0, 255).to(torch.uint8)
            out[members] = batch
    return out, failed


def _decode_jpegs(items, indices, device, failed: dict[int, str]) -> list[torch.Tensor | None]:
    """Decoded `(3, H, W)` images on `device`; one nvJPEG batch, per image after a failure."""
    data = [torch.frombuffer(bytearray(items[i]), dtype=torch.uint8) for i in indices]
    if device.type == "cuda":
        try:
            return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
        except RuntimeError as exc:
            # One bad image fails the whole batch: find it by decoding each on the CPU.
            log.warning("nvJPEG batch failed (%s): decoding image by image", str(exc)[:200])
    images: list[torch.Tensor | None] = []
    for i in indices:
        try:
            images.append(decode_image(items[i]).to(device))
        except ImageDecodeError as exc:
            failed[i] = f"decode_failed: {exc}"
            images.append(None)
    return images


# ----------------------------------------------------------------------------- loader


class ImageDataset:
    """(image uint8 (3,S,S), target, index) from cached files; target -1 when decoding fails.

    With `encoded`, a JPEG that nvJPEG decodes comes as its bytes instead, to be decoded on the
    GPU with its batch (`collate_encoded`, `DeviceBatches`); other images are decoded here.
    """

    def __init__(
        self, paths: Sequence[Path], targets: Sequence[int], preset, *, encoded: bool = False
    ) -> None:
        self.paths, self.targets, self.preset = list(paths), list(targets), preset
        self.encoded = encoded

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int):
        try:
            data = read_cached(self.paths[index])
            if self.encoded and gpu_decodable(data):
                return data, self.targets[index], index
            return self.preset.from_bytes(data), self.targets[index], index
        except (ImageDecodeError, OSError):
            size = self.preset.source_size
            return torch.zeros(3, size, size, dtype=torch.uint8), -1, index


def collate_encoded(samples: list) -> tuple[list, torch.Tensor, torch.Tensor]:
    """Batch of an `encoded` ImageDataset: (list of bytes or tensors, targets, indices)."""
    images, targets, indices = zip(*samples, strict=True)
    return list(images), torch.tensor(targets), torch.tensor(indices)


class DeviceBatches:
    """A loader's batches with their images already on a CUDA device, one step ahead.

    A background thread decodes each batch's JPEGs with nvJPEG and resizes them to the preset's
    `source_size` on a stream of its own (`preprocess_on_device`) while the caller trains on the
    previous batch. Images that fail to decode get target -1, like the loader's own failures.
    """

    def __init__(self, loader, size: int, device: torch.device, *, depth: int = 2) -> None:
        self.loader, self.size, self.device, self.depth = loader, size, device, depth

    def __len__(self) -> int:
        return len(self.loader)

    def _stage(self, batch):
        images, targets, indices = batch
        images, failed = preprocess_on_device(images, self.size, self.device)
        if failed:
            targets = targets.clone()
            targets[list(failed)] = -1
        return images, targets, indices

    def __iter__(self):
        # On a CPU device (tests, a GPU-less run) the same staging runs, without streams.
        return staged_on_device(self.loader, self._stage, self.device, depth=self.depth)


def staged_on_device(batches: Iterable, stage, device: torch.device, *, depth: int = 2):
    """`stage(batch)` for each batch, one batch ahead on a background thread, in order.

    `stage` returns `(images, *rest)` with `images` on `device` (or None). On CUDA it runs on a
    stream of its own, and each result is handed over only once the caller's stream waits for
    it (and the allocator knows the caller uses `images`), so staging overlaps the caller's work.
    """
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def run(batch):
        with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
            images, *rest = stage(batch)
            ready = None
            if stream is not None:
                ready = torch.cuda.Event()
                ready.record(stream)
        return images, rest, ready

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="device-batches") as pool:
        for images, rest, ready in prefetched(pool, run, batches, depth):
            if ready is not None and images is not None:
                current = torch.cuda.current_stream(device)
                current.wait_event(ready)
                images.record_stream(current)
            yield (images, *rest)


def default_num_workers() -> int:
    """Loader processes when none are asked for: every core this process may use but one, capped."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores - 1, MAX_AUTO_WORKERS))


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)


def make_loader(
    dataset, *, batch_size: int, shuffle: bool, num_workers: int | None, seed: int
) -> torch.utils.data.DataLoader:
    """A DataLoader that also works inside daemonic task processes (Celery) and after CUDA init.

    `num_workers=None` takes `default_num_workers()`.
    """
    if num_workers is None:
        num_workers = default_num_workers()
    if num_workers and multiprocessing.current_process().daemon:
        # An Airflow task under Celery's prefork pool inherits the pool process's daemon flag
        # (billiard sets it on multiprocessing's current process too), which forbids children.
        # The flag guards against orphans, and loader workers exit with this process (torch's
        # watchdog), so lift it rather than decode every batch in this one process.
        multiprocessing.current_process()._config["daemon"] = False
        log.info("daemonic process (a Celery worker's task): DataLoader workers allowed")
    extra: dict[str, Any] = {}
    if num_workers:
        # Workers only read and decode on the CPU and never touch CUDA, so forking them after
        # CUDA is initialised is safe (torchvision's reference recipes do the same); spawned
        # workers would each import torch again, a minute of start-up on a 16-core GPU host.
        extra = {
            "multiprocessing_context": "fork",
            "persistent_workers": True,
            "worker_init_fn": _worker_init,
            # Batches in flight live in shared memory: fewer per worker when there are many.
            "prefetch_factor": 4 if num_workers <= 4 else 2,
        }
    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=num_workers,
        generator=torch.Generator().manual_seed(seed),
        pin_memory=torch.cuda.is_available(),
        # Training never gets a batch of one image: BatchNorm cannot normalise one image whose
        # feature map is 1x1 (ResNet18 at 32 px or less). The one left out is another image each
        # epoch (shuffled).
        drop_last=shuffle and len(dataset) % batch_size == 1,
        collate_fn=collate_encoded if getattr(dataset, "encoded", False) else None,
        **extra,
    )


# ----------------------------------------------------------------------------- cache


class ImageCache:
    """Local copies of objects, keyed by (bucket, key, ETag); shared by training, scoring and reruns.

    With a budget (`max_bytes`, default `PIPELINE_CACHE_MAX_GB`), `trim` deletes the copies
    used longest ago until the cache fits, never one used in the last `CACHE_MIN_AGE_S` (another
    run may be reading it). A copy's modification time is its last use: reads touch it.
    """

    def __init__(self, root: str | Path, *, max_bytes: int | None = None) -> None:
        self.root = Path(root) / "images"
        self.max_bytes = cache_max_bytes() if max_bytes is None else max_bytes
        self._warned_full = False

    def path(self, record: ImageRecord) -> Path:
        digest = hashlib.sha256(
            f"{record.bucket}\0{record.object_key}\0{record.etag}".encode()
        ).hexdigest()
        return self.root / digest[:2] / digest

    def get(self, store: ObjectStore, record: ImageRecord, *, copy_required: bool = False) -> bytes:
        """The object's bytes, from the cache or S3 (then cached); MissingObjectError when gone.

        A cached copy whose size differs from the catalogued one (cut short by a crash or a
        full disk) is fetched again. A copy that cannot be written (a full disk) only costs the
        next reader a GET, unless `copy_required` (the reader opens the file: training).
        """
        path = self.path(record)
        try:
            data = read_cached(path, record.size)
            if record.size is None or len(data) == record.size:
                return data
            log.warning(
                "cached copy of %s has %d bytes, the object %d: fetching it again",
                record.object_key,
                len(data),
                record.size,
            )
        except FileNotFoundError:
            pass
        return self.refresh(store, record, copy_required=copy_required)

    def refresh(
        self, store: ObjectStore, record: ImageRecord, *, copy_required: bool = False
    ) -> bytes:
        """The object's bytes from S3, replacing the cached copy: before an image that failed
        to decode from its copy is rejected, since the copy on local disk may be what is
        damaged (MissingObjectError when the object is gone or changed)."""
        data = fetch_object(store, record)
        self._keep(record, data, required=copy_required)
        return data

    def _keep(self, record: ImageRecord, data: bytes, *, required: bool) -> None:
        path = self.path(record)
        try:
            write_atomically(path, data)
        except OSError as exc:
            if exc.errno not in _DISK_FULL:
                raise
            path.unlink(missing_ok=True)  # an old copy it was to replace may be damaged
            if required:
                raise OSError(
                    exc.errno,
                    f"the image cache {self.root} cannot keep a copy of {record.object_key}"
                    f" ({exc.strerror}): free space there or lower {CACHE_MAX_GB_ENV}",
                ) from exc
            if not self._warned_full:
                self._warned_full = True
                log.warning(
                    "the image cache %s cannot keep copies (%s): reading from S3 without them",
                    self.root,
                    exc.strerror,
                )

    def _cached(self, record: ImageRecord) -> bool:
        path = self.path(record)
        try:
            stat = path.stat()
        except FileNotFoundError:
            return False
        if record.size is not None and stat.st_size != record.size:
            return False
        _mark_used(path, stat.st_mtime)
        return True

    def trim(self) -> dict[str, int]:
        """Fit the cache in its budget: delete the copies used longest ago (none used in the last
        `CACHE_MIN_AGE_S`), and temporary files a killed writer left (older than an hour).
        Returns counts and bytes; does nothing without a budget."""
        done = {"deleted": 0, "deleted_bytes": 0, "kept_bytes": 0, "stale_tmp": 0}
        if self.max_bytes is None:
            return done
        now = time.time()
        copies, total = [], 0
        for entry in _cache_files(self.root):
            try:
                stat = entry.stat()
            except FileNotFoundError:  # trimmed or replaced by another process meanwhile
                continue
            if entry.name.endswith(".tmp"):
                if now - stat.st_mtime > _STALE_TMP_S:
                    Path(entry.path).unlink(missing_ok=True)
                    done["stale_tmp"] += 1
                continue
            copies.append((stat.st_mtime, stat.st_size, entry.path))
            total += stat.st_size
        copies.sort()
        for used, size, path in copies:
            if total <= self.max_bytes or now - used < CACHE_MIN_AGE_S:
                break
            if _used_since(path, used):  # read by another process since the walk: keep it
                continue
            Path(path).unlink(missing_ok=True)
            total -= size
            done["deleted"] += 1
            done["deleted_bytes"] += size
        done["kept_bytes"] = total
        if done["deleted"] or done["stale_tmp"]:
            log.info("cache %s trimmed: %s", self.root, done)
        if total > self.max_bytes:
            log.warning(
                "cache %s holds %.2f GB, over its budget of %.2f GB (%s): the rest was used in the"
                " last %d h",
                self.root,
                total / 1e9,
                self.max_bytes / 1e9,
                CACHE_MAX_GB_ENV,
                CACHE_MIN_AGE_S // 3600,
            )
        return done

    def fill(
        self,
        store: ObjectStore,
        records: Sequence[ImageRecord],
        *,
        workers: int = 16,
        copy_required: bool = False,
    ) -> dict[int, str]:
        """`trim` the cache, then fetch every record not cached yet, in parallel; returns
        {image_id: reason} of failures. `copy_required`: the caller opens the copies (training's
        loader), so one that cannot be written fails the fill (see `get`)."""
        self.trim()
        missing = [r for r in records if not self._cached(r)]
        failures: dict[int, str] = {}
        if not missing:
            return failures

        def one(record: ImageRecord) -> tuple[int, str | None]:
            try:
                self.get(store, record, copy_required=copy_required)
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


def read_cached(path: Path, max_bytes: int | None = None) -> bytes:
    """A cached copy's bytes, marking it used (so `ImageCache.trim` keeps it while it is read).
    Only a regular file of at most `max_bytes` is a copy (`read_own_file`)."""
    data, found = read_own_file(path, max_bytes)
    _mark_used(path, found.st_mtime)
    return data


def _mark_used(path: Path, last_used: float) -> None:
    """Touch a cached copy as used now (at most every `_TOUCH_EVERY_S`: reads stay cheap). A
    copy that cannot be touched (another owner, a read-only mount) is still read."""
    if time.time() - last_used > _TOUCH_EVERY_S:
        with contextlib.suppress(OSError):
            os.utime(path)


def _used_since(path: str, used: float) -> bool:
    try:
        return os.stat(path).st_mtime != used
    except FileNotFoundError:
        return True  # gone already


def _cache_files(root: Path) -> Iterator[os.DirEntry]:
    """The cached copies under `root`, never through a symlink: `images/` replaced by a link to
    another folder (by anyone who writes the cache volume) would have trim delete files there."""
    if root.is_symlink():
        log.warning(
            "cache %s is a symlink: not trimmed (trim deletes only in its own folder)", root
        )
        return
    try:
        shards = [e for e in os.scandir(root) if e.is_dir(follow_symlinks=False)]
    except FileNotFoundError:
        return
    for shard in shards:
        with contextlib.suppress(FileNotFoundError), os.scandir(shard.path) as entries:
            yield from (e for e in entries if e.is_file(follow_symlinks=False))


def fetch_object(store: ObjectStore, record: ImageRecord) -> bytes:
    """GET one catalogued object; MissingObjectError if it vanished or changed since the scan.

    Transient failures (after the client's own retries) raise `ServiceUnavailable`, naming S3
    and its endpoint (`ObjectStore.get_bytes`): they are never a reason to reject the image.
    """
    if record.bucket != store.bucket:
        store = store.with_bucket(record.bucket)
    try:
        return store.get_bytes(record.object_key, if_match=record.etag)
    except Exception as exc:
        code = s3_error_code(exc)
        if code in S3_MISSING_CODES:
            raise MissingObjectError(
                f"{REJECT_MISSING_OBJECT}: deleted since it was catalogued"
            ) from exc
        if code in S3_CHANGED_CODES:
            raise MissingObjectError(
                f"{REJECT_CHANGED_OBJECT}: ETag differs from the catalog"
            ) from exc
        raise


def prefetched(pool: ThreadPoolExecutor, fn, items: Iterable, depth: int) -> Iterator:
    """`map(fn, items)` in order on `pool`, never more than `depth` items in flight."""
    pending: deque[Future] = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= depth:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


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
