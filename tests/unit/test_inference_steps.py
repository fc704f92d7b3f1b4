"""The named steps of `inference.predict_stream`: a small first batch, per-image failures as
reasons, outages raised."""

from __future__ import annotations

import io

import pytest
import torch
from PIL import Image

from pipeline.data import EvalPreset, MissingObjectError
from pipeline.errors import ServiceUnavailable
from pipeline.inference import _batches, device_stager, image_loader, ramp_size, source_check


def jpeg() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 30), (200, 10, 10)).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.mark.parametrize(
    ("batch_size", "first"),
    [
        pytest.param(64, 16, id="cpu"),
        pytest.param(512, 128, id="gpu"),
        pytest.param(16, 8, id="small"),
        pytest.param(4, 4, id="tiny"),
    ],
)
def test_the_first_batch_is_a_quarter_but_at_least_a_chunk(batch_size, first):
    assert ramp_size(batch_size) == first


def test_batches_start_small_and_count_failures_toward_the_size():
    loads = [(i, f"payload{i}", None if i % 3 else "gone") for i in range(10)]
    groups = list(_batches(loads, 4, first_size=2))
    assert [len(ok) + len(bad) for ok, bad in groups] == [2, 4, 4]
    assert [item for ok, _ in groups for item, _ in ok] == [1, 2, 4, 5, 7, 8]
    assert [item for _, bad in groups for item, _ in bad] == [0, 3, 6, 9]


def fetch_of(outcomes: dict):
    def fetch(item):
        outcome = outcomes[item]
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    return fetch


def test_the_loader_turns_gone_and_undecodable_images_into_reasons():
    load = image_loader(
        fetch_of(
            {
                "ok": jpeg(),
                "gone": MissingObjectError("missing_object: deleted since it was catalogued"),
                "junk": b"\xff\xd8\xff not really a jpeg",
            }
        ),
        EvalPreset(16),
        decode_on_gpu=False,
    )
    item, image, reason = load("ok")
    assert reason is None and image.shape == (3, 16, 16) and image.dtype == torch.uint8
    assert load("gone") == ("gone", None, "missing_object: deleted since it was catalogued")
    item, image, reason = load("junk")
    assert image is None and reason.startswith("decode_failed: ")


def test_the_loader_keeps_jpeg_bytes_for_the_gpu_and_raises_outages():
    data = jpeg()
    outage = ServiceUnavailable("S3", "http://127.0.0.1:9000", "connection refused")
    load = image_loader(fetch_of({"ok": data, "down": outage}), EvalPreset(16), decode_on_gpu=True)
    assert load("ok") == ("ok", data, None)
    with pytest.raises(ServiceUnavailable):
        load("down")


def damaged(data: bytes) -> bytes:
    """A copy as a torn write on local disk leaves it: same size, a valid JPEG header, zeros."""
    return data[: len(data) // 2] + bytes(len(data) - len(data) // 2)


@pytest.mark.parametrize("decode_on_gpu", [False, True], ids=["cpu-decode", "device-decode"])
def test_a_damaged_local_copy_is_judged_by_the_source_bytes_on_both_decode_paths(decode_on_gpu):
    """The loader (CPU decode) and the device stager (JPEGs decoded with their batch, here on
    the CPU device through the same `preprocess_on_device`) ask the source before rejecting."""
    good, preset = jpeg(), EvalPreset(16)
    copies = {"ok": jpeg(), "torn": damaged(good), "broken": damaged(good)}
    source = {"ok": copies["ok"], "torn": good, "broken": copies["broken"]}
    asked: list[str] = []

    def refetch(item):
        asked.append(item)
        return source[item]

    load = image_loader(fetch_of(copies), preset, decode_on_gpu=decode_on_gpu, refetch=refetch)
    loaded = [load(item) for item in copies]
    stage = device_stager(preset, torch.device("cpu"), recheck=source_check(preset, refetch))
    images, kept, failures = stage(
        ([(i, p) for i, p, r in loaded if r is None], [(i, r) for i, _, r in loaded if r])
    )
    assert kept == ["ok", "torn"] and images.shape == (2, 3, 16, 16)
    assert torch.equal(images[1], preset.from_bytes(good))
    assert [item for item, _ in failures] == ["broken"]
    assert failures[0][1].startswith("decode_failed: ")
    assert sorted(asked) == ["broken", "torn"]  # only images whose copy failed
