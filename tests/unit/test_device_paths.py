"""The GPU code paths (batch augmentation, nvJPEG routing, device batches, streamed prediction), run on the CPU.

On a machine without CUDA every one of these falls back to the CPU: the same functions, the same
ordering and failure handling; bench/bench_gpu.py measures them on a GPU.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from pipeline import data
from pipeline.data import (
    DeviceBatches,
    EvalPreset,
    ImageDataset,
    MissingObjectError,
    TrainPreset,
    color_jitter_batch,
    decode_image,
    default_num_workers,
    gpu_decodable,
    make_loader,
    preprocess_on_device,
    random_resized_crop_batch,
    resize_center_crop,
    to_model_input,
)
from pipeline.inference import predict_stream
from pipeline.model import predict, resolve_precision, training_autocast
from pipeline.params import validate_params
from pipeline.train import train_one_epoch
from pipeline.train_plan import TrainParams

CPU = torch.device("cpu")


def _photo(size=(120, 90), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (size[1] // 10, size[0] // 10, 3), dtype=np.uint8)
    return Image.fromarray(small).resize(size, Image.Resampling.BILINEAR)


def _encode(image: Image.Image, fmt: str = "JPEG", **kwargs) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        pytest.param(lambda: _encode(_photo()), True, id="baseline-rgb"),
        pytest.param(lambda: _encode(_photo().convert("L")), True, id="grayscale"),
        pytest.param(lambda: _encode(_photo(), progressive=True), False, id="progressive"),
        pytest.param(lambda: _encode(_photo().convert("CMYK")), False, id="cmyk"),
        pytest.param(lambda: _encode(_photo(), "PNG"), False, id="png"),
        pytest.param(lambda: _encode(_photo())[:40], False, id="truncated-header"),
        pytest.param(lambda: b"\xff\xd8\xff\x00garbage", False, id="garbage-after-soi"),
        pytest.param(lambda: b"", False, id="empty"),
    ],
)
def test_only_sequential_rgb_or_gray_jpegs_go_to_nvjpeg(payload, expected):
    assert gpu_decodable(payload()) is expected


def test_preprocess_on_device_matches_the_cpu_preset_and_names_failures():
    preset = EvalPreset(32)
    big, small = _encode(_photo((120, 90), 1)), _encode(_photo((80, 100), 2))
    png_tensor = preset.from_bytes(_encode(_photo((60, 60), 3), "PNG"))
    corrupt = _encode(_photo())[:300]
    batch, failed = preprocess_on_device([big, png_tensor, corrupt, small], 32, CPU)

    assert batch.shape == (4, 3, 32, 32) and batch.dtype == torch.uint8
    assert list(failed) == [2] and failed[2].startswith("decode_failed:")
    assert int(batch[2].sum()) == 0  # a failed image leaves zeros, the caller drops or masks it
    assert torch.equal(batch[1], png_tensor)
    for row, encoded in ((0, big), (3, small)):
        # The same full-size decode and resize, in float instead of uint8: a grey level or two.
        full = resize_center_crop(decode_image(encoded), 32)
        diff = (batch[row].int() - full.int()).abs()
        assert diff.float().mean() < 0.5 and int(diff.max()) <= 2
        # The CPU preset also decodes big JPEGs at reduced scale (DCT scaling): close, not equal.
        diff = (batch[row].int() - preset.from_bytes(encoded).int()).abs()
        assert diff.float().mean() < 2.0


def test_full_crop_with_square_ratio_is_the_identity():
    images = torch.rand(3, 3, 24, 24)
    out = random_resized_crop_batch(images, 24, scale=(1.0, 1.0), ratio=(1.0, 1.0))
    assert torch.allclose(out, images, atol=1e-5)


def test_random_crops_differ_per_image_and_follow_the_seed():
    images = torch.rand(1, 3, 40, 40).expand(6, 3, 40, 40).contiguous()
    torch.manual_seed(7)
    first = random_resized_crop_batch(images, 16)
    torch.manual_seed(7)
    again = random_resized_crop_batch(images, 16)
    assert first.shape == (6, 3, 16, 16)
    assert torch.equal(first, again)
    assert not torch.allclose(first[0], first[1])  # same source image, another crop


def test_colour_jitter_of_strength_zero_changes_nothing_and_stays_in_range():
    images = torch.rand(4, 3, 8, 8)
    assert torch.allclose(color_jitter_batch(images, 0.0), images, atol=1e-6)
    same = torch.rand(1, 3, 8, 8).expand(4, 3, 8, 8).contiguous()
    jittered = color_jitter_batch(same, 0.2)
    assert jittered.min() >= 0 and jittered.max() <= 1
    assert not torch.allclose(jittered[0], jittered[1])  # factors are drawn per image


def test_batch_augment_preset_leaves_the_crop_to_the_device():
    raw = _encode(_photo((120, 90)))
    preset = TrainPreset(32, augment=True, batch_augment=True)
    source = preset.from_bytes(raw)
    assert source.shape == (3, 36, 36) and preset.source_size == 36
    out = preset.on_device(torch.stack([source, source]))
    assert out.shape == (2, 3, 32, 32) and out.dtype == torch.float32
    assert 0 <= float(out.min()) and float(out.max()) <= 1

    plain = TrainPreset(32, augment=False, batch_augment=True)
    assert torch.equal(plain.from_bytes(raw), EvalPreset(32).from_bytes(raw))
    batch = plain.from_bytes(raw)[None]
    assert torch.equal(plain.on_device(batch), to_model_input(batch))


def _files(tmp_path: Path) -> list[Path]:
    paths = []
    for i, payload in enumerate(
        [
            _encode(_photo((120, 90), 10)),
            _encode(_photo((64, 64), 11), "PNG"),
            _encode(_photo((90, 120), 12))[:300],  # passes the header check, fails to decode
            _encode(_photo((100, 100), 13), progressive=True),
            _encode(_photo((120, 90), 14)),
        ]
    ):
        path = tmp_path / f"img{i}"
        path.write_bytes(payload)
        paths.append(path)
    return paths


def test_encoded_dataset_hands_jpeg_bytes_to_the_device_and_decodes_the_rest(tmp_path):
    paths = _files(tmp_path)
    dataset = ImageDataset(paths, [0, 1, 0, 1, 0], EvalPreset(16), encoded=True)
    assert isinstance(dataset[0][0], bytes)
    assert isinstance(dataset[1][0], torch.Tensor)  # PNG: decoded on the CPU
    assert isinstance(dataset[3][0], torch.Tensor)  # progressive JPEG: on the CPU
    dataset.paths[4] = tmp_path / "gone"
    assert dataset[4][1] == -1


@pytest.mark.parametrize("workers", [0, 2])
def test_device_batches_decode_in_order_and_mark_failures(tmp_path, workers):
    paths = _files(tmp_path)
    dataset = ImageDataset(paths, [0, 1, 0, 1, 0], EvalPreset(16), encoded=True)
    loader = make_loader(dataset, batch_size=3, shuffle=False, num_workers=workers, seed=0)
    batches = list(DeviceBatches(loader, 16, CPU))
    assert len(batches) == len(loader) == 2
    images = torch.cat([b[0] for b in batches])
    targets = torch.cat([b[1] for b in batches]).tolist()
    indices = torch.cat([b[2] for b in batches]).tolist()
    assert indices == [0, 1, 2, 3, 4]
    assert targets == [0, 1, -1, 1, 0]  # the corrupt JPEG failed on the "device"
    for i in (1, 3):  # PNG and progressive JPEG: the CPU preset's own output
        assert torch.equal(images[i], EvalPreset(16).from_bytes(paths[i].read_bytes()))
    for i in (0, 4):  # JPEGs: decoded whole with the batch, resized in float
        full = resize_center_crop(decode_image(paths[i].read_bytes()), 16)
        assert (images[i].int() - full.int()).abs().float().mean() < 0.5


@pytest.mark.parametrize(("cores", "workers"), [(1, 1), (2, 1), (8, 7), (64, 16)])
def test_default_workers_are_every_core_but_one_capped(monkeypatch, cores, workers):
    monkeypatch.setattr(data.os, "sched_getaffinity", lambda _: set(range(cores)))
    assert default_num_workers() == workers


def test_precision_auto_is_fp32_on_a_cpu_and_unknown_ones_are_refused():
    assert resolve_precision("auto", CPU) == "fp32"
    assert resolve_precision("bf16", CPU) == "bf16"
    with pytest.raises(ValueError, match="expected one of: auto, fp32, bf16, int8"):
        resolve_precision("fp8", CPU)
    assert training_autocast(CPU) == (None, None)


def test_gpu_related_params_default_to_automatic_choices():
    values = validate_params({})
    assert values["num_workers"] is None and values["compile"] is False
    assert values["precision"] == "auto"
    assert TrainParams.from_dict({"num_workers": None, "compile": True}).compile is True
    with pytest.raises(ValueError, match="num_workers must be an integer >= 0"):
        TrainParams.from_dict({"num_workers": -1})


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 3))


def test_stream_predicts_in_order_like_predict_and_reports_bad_images(tmp_path):
    paths = _files(tmp_path)
    missing = tmp_path / "missing"
    items = [*paths, missing]

    def fetch(path: Path) -> bytes:
        if path == missing:
            raise MissingObjectError("missing_object: deleted since it was catalogued")
        return path.read_bytes()

    model = _tiny_model().eval()
    labels = ["a", "b", "c"]
    scored = list(
        predict_stream(
            model, items, fetch, labels=labels, preset=EvalPreset(8), device=CPU, batch_size=2
        )
    )
    got = [(item, p) for s in scored for item, p in s.predictions]
    failures = dict(f for s in scored for f in s.failures)
    good = [paths[i] for i in (0, 1, 3, 4)]
    assert [item for item, _ in got] == good
    assert failures[paths[2]].startswith("decode_failed:")
    assert failures[missing].startswith("missing_object:")
    batch = torch.stack([EvalPreset(8).from_bytes(p.read_bytes()) for p in good])
    assert [p for _, p in got] == predict(model, batch, labels)


def test_stream_raises_transient_fetch_errors_instead_of_rejecting(tmp_path):
    paths = _files(tmp_path)

    def fetch(path: Path) -> bytes:
        raise ConnectionError("S3 at http://127.0.0.1:9: connection refused")

    stream = predict_stream(
        _tiny_model(), paths, fetch, labels=["a", "b", "c"], preset=EvalPreset(8), device=CPU
    )
    with pytest.raises(ConnectionError, match="connection refused"):
        list(stream)


def _epoch_batches():
    torch.manual_seed(1)
    images = torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8)
    targets = torch.tensor([0, 1, 2, -1, 1, 0])  # index 3 failed to decode
    return [
        (images[:3], targets[:3], torch.arange(3)),
        (images[3:], targets[3:], torch.arange(3, 6)),
    ]


def test_epoch_sums_loss_and_accuracy_over_decoded_images_only():
    model = _tiny_model()
    criterion = nn.CrossEntropyLoss(ignore_index=-1)
    batches = _epoch_batches()
    with torch.no_grad():
        images = torch.cat([b[0] for b in batches])
        targets = torch.cat([b[1] for b in batches])
        logits = model(to_model_input(images))
        good = targets >= 0
        expected_loss = float(nn.functional.cross_entropy(logits[good], targets[good]))
        expected_acc = float((logits[good].argmax(1) == targets[good]).float().mean())
    frozen = torch.optim.SGD(model.parameters(), lr=0.0)  # weights stay: outputs are comparable
    stats = train_one_epoch(model, criterion, frozen, batches, CPU, epoch=1, epochs=1)
    assert stats["failed"] == [3]
    assert stats["loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert stats["accuracy"] == pytest.approx(expected_acc)


def test_a_compiled_model_trains_the_plain_modules_weights():
    model = _tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    stats = train_one_epoch(
        torch.compile(model),
        nn.CrossEntropyLoss(ignore_index=-1),
        optimizer,
        _epoch_batches(),
        CPU,
        epoch=1,
        epochs=1,
    )
    assert stats["failed"] == [3]
    state = model.state_dict()
    assert set(state) == set(before)  # no `_orig_mod.` prefix: checkpoints and MLflow stay plain
    assert not torch.equal(state["1.weight"], before["1.weight"])


def test_cli_takes_an_explicit_worker_count_and_defaults_to_automatic():
    from pipeline.__main__ import build_parser

    parser = build_parser("train")
    explicit = parser.parse_args(["train", "--num-workers", "3", "--compile", "true"])
    assert explicit.num_workers == 3 and explicit.compile is True
    automatic = parser.parse_args(["train"])
    assert automatic.num_workers is None and automatic.compile is False


def test_training_never_gets_a_batch_of_one_image_that_batchnorm_cannot_take():
    """ResNet18 at 32 px ends in a 1x1 feature map: a training batch of one image fails in
    BatchNorm. 5 images in batches of 4 leave one out of each (shuffled) epoch instead."""
    from pipeline.model import build_model

    images = torch.randint(0, 256, (5, 3, 32, 32), dtype=torch.uint8)
    dataset = [(images[i], i % 2, i) for i in range(5)]
    loader = make_loader(dataset, batch_size=4, shuffle=True, num_workers=0, seed=0)
    model = build_model(2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    stats = train_one_epoch(
        model, nn.CrossEntropyLoss(ignore_index=-1), optimizer, loader, CPU, epoch=1, epochs=1
    )
    assert stats["failed"] == [] and len(loader) == 1
    evaluation = make_loader(dataset, batch_size=4, shuffle=False, num_workers=0, seed=0)
    assert [len(batch[1]) for batch in evaluation] == [4, 1]  # validation keeps every image
    with pytest.raises(ValueError, match="batch_size must be an integer >= 2"):
        TrainParams.from_dict({"batch_size": 1})
