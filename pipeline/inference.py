"""Batched prediction over a stream of images: fetch ahead on threads, preprocess and infer on the device.

Three stages overlap, each a bounded look-ahead of the next:

1. a thread pool fetches each image's bytes (`fetch`: S3 through the cache, or a local file);
   on a CPU it also decodes and preprocesses them there, as on a GPU it does for anything
   but JPEG;
2. on a GPU, one thread turns each batch into a `uint8` tensor on the device on a stream of
   its own: JPEGs decoded by nvJPEG in one call, resized there (`data.preprocess_on_device`);
3. the calling thread runs the model and copies the top-k back without waiting for it, so the
   next batch's forward pass is queued before this batch's results are read.

Failures are per image: a fetch that raises `MissingObjectError` or bytes that do not decode
come back as (item, reason); any other error (a transient S3 or network fault) propagates.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import torch

from pipeline.data import (
    EvalPreset,
    ImageDecodeError,
    MissingObjectError,
    chunks,
    gpu_decodable,
    prefetched,
    preprocess_on_device,
    staged_on_device,
)
from pipeline.errors import is_out_of_memory
from pipeline.model import Prediction, resolve_precision, to_predictions, top_k_probs

T = TypeVar("T")
log = logging.getLogger(__name__)

CPU_BATCH_SIZE = 64
# ResNet18 at 224 px in bf16 keeps an H100/H200 busy from about 256 images on; 512 leaves room.
GPU_BATCH_SIZE = 512
_CHUNK = 8  # images a fetch thread takes at a time


def default_batch_size(device: torch.device) -> int:
    """Scoring batch size when none is asked for: one that fills the device."""
    return GPU_BATCH_SIZE if device.type == "cuda" else CPU_BATCH_SIZE


@dataclass
class ScoredBatch(Generic[T]):
    """One batch's outcome: predictions of the images that decoded, reasons for those that didn't,
    and, when asked for (`embed`), the predictions' embeddings on the host, in their order."""

    predictions: list[tuple[T, Prediction]]
    failures: list[tuple[T, str]]
    embeddings: torch.Tensor | None = None


@dataclass
class StageClock:
    """Seconds the calling thread spent waiting for input and running inference."""

    seconds: Counter = field(default_factory=Counter)

    def add(self, stage: str, since: float) -> float:
        now = time.perf_counter()
        self.seconds[stage] += now - since
        return now


def predict_stream(
    module: Any,
    items: Iterable[T],
    fetch: Callable[[T], bytes],
    *,
    labels: Sequence[str],
    preset: EvalPreset,
    device: torch.device,
    precision: str = "auto",
    batch_size: int | None = None,
    workers: int = 8,
    top_k: int = 3,
    gpu_decode: bool = True,
    clock: StageClock | None = None,
    embed: Callable[[torch.Tensor], torch.Tensor] | None = None,
    refetch: Callable[[T], bytes] | None = None,
) -> Iterator[ScoredBatch[T]]:
    """Predictions for `items` in order, a batch at a time; see the module docstring.

    `module` is the model on `device` (or an int8 ONNX model on the CPU); `fetch` returns an
    item's encoded bytes. `gpu_decode=False` decodes JPEGs on the fetch threads too (for hosts
    with many cores per GPU, or to compare). `embed` (a PyTorch `module` only) maps the
    penultimate-layer features of a batch, captured in the same forward pass, to what
    `ScoredBatch.embeddings` holds (`drift.Projector`: their projection, on the device).
    `refetch` returns an item's bytes from the source when `fetch`'s (a local copy) did not
    decode: the verdict is on the object, not on a copy damaged on local disk.
    """
    precision = resolve_precision(precision, device)
    batch_size = batch_size or default_batch_size(device)
    on_gpu = device.type == "cuda"
    load = image_loader(fetch, preset, decode_on_gpu=on_gpu and gpu_decode, refetch=refetch)
    with fetch_pool(workers) as pool:
        fetched = fetched_in_order(pool, load, items, depth=max(workers, 2 * batch_size // _CHUNK))
        batches = _batches(fetched, batch_size, first_size=ramp_size(batch_size))
        stage = device_stager(preset, device, recheck=source_check(preset, refetch))
        staged = staged_on_device(batches, stage, device) if on_gpu else map(stage, batches)
        yield from scored_batches(
            module,
            staged,
            labels=labels,
            top_k=top_k,
            precision=precision,
            clock=clock or StageClock(),
            embed=embed,
        )


def image_loader(
    fetch: Callable[[T], bytes],
    preset: EvalPreset,
    *,
    decode_on_gpu: bool,
    refetch: Callable[[T], bytes] | None = None,
) -> Callable[[T], tuple[T, bytes | torch.Tensor | None, str | None]]:
    """Step 1, on a fetch thread: (item, preprocessed tensor or JPEG bytes, None) or
    (item, None, reason) for an image that is gone, changed or not decodable (also from
    `refetch`'s bytes, when given and they differ from `fetch`'s: `source_check`)."""
    recheck = source_check(preset, refetch)

    def load(item: T) -> tuple[T, bytes | torch.Tensor | None, str | None]:
        try:
            data = fetch(item)
        except MissingObjectError as exc:
            return item, None, str(exc)
        if decode_on_gpu and gpu_decodable(data):
            return item, data, None  # decoded on the GPU with its batch
        loaded = decoded_on_cpu(preset, item, data)
        if loaded[2] is not None and recheck is not None:
            return recheck(item, data, loaded[2])
        return loaded

    return load


def decoded_on_cpu(
    preset: EvalPreset, item: T, data: bytes
) -> tuple[T, torch.Tensor | None, str | None]:
    """(item, `preset`'s tensor, None), or (item, None, a `decode_failed` reason)."""
    try:
        return item, preset.from_bytes(data), None
    except ImageDecodeError as exc:
        return item, None, f"decode_failed: {exc}"
    except Exception as exc:  # noqa: BLE001 - e.g. a preprocessing error on a weird image
        if is_out_of_memory(exc):
            raise
        return item, None, f"decode_failed: {type(exc).__name__}: {str(exc)[:200]}"


def source_check(preset: EvalPreset, refetch: Callable[[T], bytes] | None):
    """Before an image whose bytes from `fetch` (a local copy) did not decode is rejected, its
    bytes from the source (`refetch`): decoded on the CPU when they differ, so the verdict is
    on the object and not on a copy damaged on local disk. None without `refetch`."""
    if refetch is None:
        return None

    def recheck(item: T, data: bytes, reason: str) -> tuple[T, torch.Tensor | None, str | None]:
        try:
            fresh = refetch(item)
        except MissingObjectError as exc:
            return item, None, str(exc)
        if fresh == data:
            return item, None, reason
        key = getattr(item, "object_key", item)
        log.warning("%s: its local copy did not decode and differs from S3's", key)
        return decoded_on_cpu(preset, item, fresh)

    return recheck


def fetch_pool(workers: int) -> ThreadPoolExecutor:
    """The fetch threads. They run torch ops (resize) single-threaded: per-thread OpenMP teams on
    top of the model's would oversubscribe the cores and slow inference down."""
    return ThreadPoolExecutor(
        max_workers=workers,
        thread_name_prefix="score-fetch",
        initializer=torch.set_num_threads,
        initargs=(1,),
    )


def fetched_in_order(pool: ThreadPoolExecutor, load, items: Iterable[T], *, depth: int) -> Iterator:
    """`load(item)` of every item, in order, at most `depth` chunks ahead of the caller."""
    # Whole chunks per task: one future per image costs more than reading a cached file.
    fetched = prefetched(pool, lambda chunk: [load(i) for i in chunk], chunks(items, _CHUNK), depth)
    return (one for chunk in fetched for one in chunk)


def ramp_size(batch_size: int) -> int:
    """Size of the first batch: small, so the model starts while the next ones are fetched
    (the pipeline fills in a quarter of the time a full first batch takes)."""
    return min(batch_size, max(_CHUNK, batch_size // 4))


def device_stager(preset: EvalPreset, device: torch.device, *, recheck=None):
    """Step 2: a (loaded, failures) group as (images on `device` or None, kept items, failures);
    JPEG bytes (on a GPU) are decoded and resized on `device` (`preprocess_on_device`). An
    image that fails there goes through `recheck` (`source_check`) before it is a failure."""

    def stage(batch: tuple[list, list]) -> tuple[torch.Tensor | None, list, list]:
        loaded, failures = batch
        if not loaded:
            return None, [], failures
        payloads = [payload for _, payload in loaded]
        if all(isinstance(p, torch.Tensor) for p in payloads) and device.type != "cuda":
            return torch.stack(payloads), [item for item, _ in loaded], failures
        images, failed = preprocess_on_device(payloads, preset.image_size, device)
        for i, reason in list(failed.items()):
            if recheck is None:
                break
            _, image, failed[i] = recheck(loaded[i][0], payloads[i], reason)
            if image is not None:
                images[i] = image.to(device)
                del failed[i]
        if failed:
            images = images[[i for i in range(len(loaded)) if i not in failed]]
        kept = [item for i, (item, _) in enumerate(loaded) if i not in failed]
        failures = failures + [(loaded[i][0], reason) for i, reason in failed.items()]
        return images, kept, failures

    return stage


def scored_batches(
    module,
    staged: Iterable,
    *,
    labels: Sequence[str],
    top_k: int,
    precision: str,
    clock,
    embed: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> Iterator[ScoredBatch]:
    """Step 3, on the calling thread: each batch's forward pass is queued before the previous
    batch's results are read, so a GPU never waits for the host."""
    pending = None
    since = time.perf_counter()
    for images, kept, failures in staged:
        since = clock.add("wait_input", since)
        launched = None
        if images is not None:
            launched = _launch(module, images, top_k=top_k, precision=precision, embed=embed)
        if pending is not None:
            scored = _finish(pending, labels)
            clock.add("infer", since)
            yield scored
            since = time.perf_counter()
        else:
            since = clock.add("infer", since)
        pending = (kept, failures, launched)
    if pending is not None:
        scored = _finish(pending, labels)
        clock.add("infer", since)
        yield scored


def _batches(
    loads: Iterable, batch_size: int, *, first_size: int | None = None
) -> Iterator[tuple[list, list]]:
    """(loaded, failures) groups of `batch_size` images in all (the first of `first_size`)."""
    loaded: list = []
    failures: list = []
    size = first_size or batch_size
    for item, payload, error in loads:
        if error is None:
            loaded.append((item, payload))
        else:
            failures.append((item, error))
        if len(loaded) + len(failures) >= size:
            yield loaded, failures
            loaded, failures, size = [], [], batch_size
    if loaded or failures:
        yield loaded, failures


def _launch(module, images: torch.Tensor, *, top_k: int, precision: str, embed=None):
    """Queue the forward pass and the copy of its top-k (and embeddings) to the host; returns
    without waiting."""
    embedded = None
    if embed is None:
        values, indices = top_k_probs(module, images, top_k=top_k, precision=precision)
    else:
        from pipeline.drift import penultimate

        with penultimate(module) as features:
            values, indices = top_k_probs(module, images, top_k=top_k, precision=precision)
        with torch.inference_mode():
            embedded = embed(features[-1])
    if not values.is_cuda:
        return values, indices, embedded, None
    host = [
        None if t is None else torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        for t in (values, indices, embedded)
    ]
    for target, source in zip(host, (values, indices, embedded), strict=True):
        if target is not None:
            target.copy_(source, non_blocking=True)
    done = torch.cuda.Event()
    done.record()
    return *host, done


def _finish(pending, labels: Sequence[str]) -> ScoredBatch:
    kept, failures, launched = pending
    if launched is None:
        return ScoredBatch([], failures)
    values, indices, embedded, done = launched
    if done is not None:
        done.synchronize()
    return ScoredBatch(
        list(zip(kept, to_predictions(values, indices, labels), strict=True)), failures, embedded
    )
