"""Training pieces without services: presets, decoding, checkpoints, loaders, the gate rule."""

from __future__ import annotations

import io
import multiprocessing

import pytest
import torch
from PIL import Image

from pipeline.data import (
    EvalPreset,
    ImageDataset,
    ImageDecodeError,
    TrainPreset,
    decode_image,
    make_loader,
)
from pipeline.registry import gate_decision
from pipeline.train import (
    LocalCheckpointStore,
    checkpoint_name,
    load_checkpoint,
    save_checkpoint,
)


def _encoded(fmt: str, size=(40, 30), color=(200, 30, 90)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format=fmt)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "BMP"])
def test_decode_gives_rgb_uint8_for_every_accepted_format(fmt):
    image = decode_image(_encoded(fmt))
    assert image.dtype == torch.uint8
    assert image.shape == (3, 30, 40)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"not an image at all", id="text"),
        pytest.param(_encoded("JPEG", (200, 200))[:300], id="truncated-jpeg"),
        pytest.param(_encoded("PNG")[:60], id="truncated-png"),
    ],
)
def test_undecodable_bytes_raise_image_decode_error(data):
    with pytest.raises(ImageDecodeError):
        decode_image(data)


def test_big_jpeg_is_decoded_at_reduced_size_but_never_below_target():
    data = _encoded("JPEG", (1000, 800))
    image = decode_image(data, target_size=64)
    assert min(image.shape[1:]) >= 64
    assert image.shape[1] < 800
    assert EvalPreset(64).from_bytes(data).shape == (3, 64, 64)


def test_train_preset_without_augmentation_equals_eval_preset():
    data = _encoded("PNG", (50, 37))
    assert torch.equal(
        TrainPreset(32, augment=False).from_bytes(data), EvalPreset(32).from_bytes(data)
    )


def test_train_preset_with_augmentation_crops_and_jitters():
    gradient = Image.linear_gradient("L").resize((50, 37)).convert("RGB")
    buf = io.BytesIO()
    gradient.save(buf, format="PNG")
    data = buf.getvalue()
    torch.manual_seed(0)
    outs = [TrainPreset(32, augment=True).from_bytes(data) for _ in range(3)]
    plain = EvalPreset(32).from_bytes(data)
    for out in outs:
        assert out.shape == (3, 32, 32) and out.dtype == torch.uint8
        assert not torch.equal(out, plain)
    assert not torch.equal(outs[0], outs[1])  # a new crop and jitter each time


@pytest.mark.parametrize(
    ("augment", "batch_augment", "source_size"),
    [
        pytest.param(False, False, 32, id="eval"),
        pytest.param(True, False, 32, id="cpu-augment-crops-to-image-size"),
        pytest.param(False, True, 32, id="gpu-no-augment"),
        pytest.param(True, True, 36, id="gpu-augment-keeps-headroom"),
    ],
)
def test_train_preset_source_size_is_the_crop_headroom_only_when_the_batch_augments(
    augment, batch_augment, source_size
):
    preset = TrainPreset(32, augment=augment, batch_augment=batch_augment)
    assert preset.crop_source_size == 36  # int(32 * 1.15): the CPU crop's input as well
    assert preset.source_size == source_size
    assert preset.from_bytes(_encoded("PNG", (50, 37))).shape == (3, source_size, source_size)


def test_checkpoint_round_trip_and_safe_names(tmp_path):
    store = LocalCheckpointStore(tmp_path)
    name = checkpoint_name("my model", "manual__2026-01-01T00:00:00+00:00")
    assert " " not in name and ":" not in name and name.endswith("/last.pt")
    assert load_checkpoint(store, name) is None
    state = {"epoch": 3, "model": {"w": torch.arange(4.0)}, "history": [{"epoch": 1}]}
    save_checkpoint(store, name, state)
    loaded = load_checkpoint(store, name)
    assert loaded["epoch"] == 3 and torch.equal(loaded["model"]["w"], torch.arange(4.0))
    store.delete(name)
    assert load_checkpoint(store, name) is None


def _dataset(tmp_path):
    paths = []
    for i in range(6):
        path = tmp_path / f"{i}.png"
        path.write_bytes(_encoded("PNG", (20, 20), (i * 40, 0, 0)) if i != 4 else b"broken")
        paths.append(path)
    return ImageDataset(paths, [i % 2 for i in range(6)], EvalPreset(16))


def test_dataset_marks_undecodable_images_with_target_minus_one(tmp_path):
    ds = _dataset(tmp_path)
    assert [ds[i][1] for i in range(6)] == [0, 1, 0, 1, -1, 1]


def _load_in_daemon(tmp_path, queue):
    loader = make_loader(_dataset(tmp_path), batch_size=4, shuffle=False, num_workers=2, seed=0)
    queue.put(sum(len(targets) for _, targets, _ in loader))


def test_loader_with_workers_works_inside_a_daemonic_process(tmp_path):
    ctx = multiprocessing.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_load_in_daemon, args=(tmp_path, queue), daemon=True)
    proc.start()
    proc.join(60)
    assert proc.exitcode == 0
    assert queue.get(timeout=5) == 6


def test_loader_with_workers_yields_every_sample_in_order(tmp_path):
    loader = make_loader(_dataset(tmp_path), batch_size=4, shuffle=False, num_workers=2, seed=0)
    indices = [i for _, _, idx in loader for i in idx.tolist()]
    assert indices == list(range(6))


@pytest.mark.parametrize(
    ("accuracy", "champion", "minimum", "margin", "decision"),
    [
        pytest.param(0.9, None, 0.5, 0.0, "promoted", id="first-passes-minimum"),
        pytest.param(0.4, None, 0.5, 0.0, "challenger", id="first-below-minimum"),
        pytest.param(0.9, 0.8, 0.5, 0.0, "promoted", id="better-than-champion"),
        pytest.param(0.79, 0.8, 0.5, 0.0, "challenger", id="worse-no-margin"),
        pytest.param(0.79, 0.8, 0.5, 0.02, "promoted", id="worse-within-margin"),
        pytest.param(0.9, 0.95, 0.5, 0.02, "challenger", id="worse-beyond-margin"),
        pytest.param(0.9, 0.5, 0.95, 0.0, "challenger", id="better-but-below-minimum"),
    ],
)
def test_gate_decision(accuracy, champion, minimum, margin, decision):
    got, reason = gate_decision(
        accuracy, champion, min_accuracy=minimum, promotion_margin=margin, champion_version="1"
    )
    assert got == decision
    assert f"{accuracy:.4f}" in reason
