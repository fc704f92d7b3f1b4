"""Training pieces without services: train_model's steps, presets, decoding, checkpoints, loaders, the gate rule."""

from __future__ import annotations

import io
import multiprocessing

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline import train
from pipeline.data import (
    EvalPreset,
    ImageDataset,
    ImageDecodeError,
    TrainPreset,
    decode_image,
    make_loader,
)
from pipeline.records import ImageRecord
from pipeline.registry import gate_decision
from pipeline.train import (
    LocalCheckpointStore,
    checkpoint_name,
    load_checkpoint,
    save_checkpoint,
)
from pipeline.train_plan import TrainParams


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


# ----------------------------------------------------------------------------- train_model's steps

_IDENTITY = train.checkpoint_identity("dv1", TrainParams(epochs=2))


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        pytest.param(None, False, id="no-checkpoint"),
        pytest.param({"identity": _IDENTITY, "epoch": 1}, True, id="same-run"),
        pytest.param(
            {"identity": train.checkpoint_identity("dv2", TrainParams(epochs=2))},
            False,
            id="other-dataset",
        ),
        pytest.param(
            {"identity": train.checkpoint_identity("dv1", TrainParams(epochs=3))},
            False,
            id="other-params",
        ),
        pytest.param({"epoch": 1, "model": {}}, False, id="checkpoint-without-identity"),
    ],
)
def test_a_checkpoint_is_resumed_only_for_the_same_data_and_params(state, expected):
    assert train.resumable(state, _IDENTITY) is expected


def _tiny_training() -> train.Training:
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    return train.Training(
        model=model,
        step_model=model,
        criterion=torch.nn.CrossEntropyLoss(),
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.StepLR(optimizer, step_size=1),
        device=torch.device("cpu"),
        autocast_dtype=None,
        scaler=None,
        transform=lambda batch: batch,
    )


def _records(*image_ids: int) -> list[ImageRecord]:
    return [ImageRecord(i, "b", f"train/a/{i}.png", "e", "train", "a") for i in image_ids]


def test_resume_state_restores_this_runs_checkpoint_and_ignores_another(tmp_path, caplog):
    store = LocalCheckpointStore(tmp_path)
    saved = _tiny_training()
    saved.optimizer.step()  # no gradients: only the order the scheduler checks
    saved.scheduler.step()
    progress = train.Progress(
        epoch=1, history=[{"epoch": 1}], best={"accuracy": 0.5, "epoch": 1, "state": None}
    )
    progress.run_id = "r1"
    progress.stopped_early = True
    train_records, val_records = _records(10, 11, 12, 13), _records(20, 21)
    progress.bad_train, progress.bad_val = {1, 3}, {0}  # images 11, 13 and 20
    state = train.checkpoint_state(
        saved, progress, _IDENTITY, label_map={"a": 0, "b": 1}, records=(train_records, val_records)
    )
    train.save_checkpoint(store, "m/run/last.pt", state)

    resumed = _tiny_training()
    # This attempt loads one train image fewer (image 10 went missing): indices shift.
    records = (_records(11, 12, 13), val_records)
    got = train.resume_state(resumed, store, "m/run/last.pt", _IDENTITY, records=records)
    assert (got.epoch, got.history, got.best, got.run_id, got.stopped_early) == (
        1,
        [{"epoch": 1}],
        progress.best,
        "r1",
        True,
    )
    assert (got.bad_train, got.bad_val) == ({0, 2}, {0})  # still images 11, 13 and 20
    assert torch.equal(resumed.model.weight, saved.model.weight)
    assert resumed.scheduler.last_epoch == 1

    fresh = _tiny_training()
    other = train.checkpoint_identity("dv2", TrainParams(epochs=2))
    got = train.resume_state(fresh, store, "m/run/last.pt", other, records=records)
    assert (got.epoch, got.history, got.run_id, got.best["state"]) == (0, [], None, None)
    assert (got.stopped_early, got.bad_train, got.bad_val) == (False, set(), set())
    assert not torch.equal(fresh.model.weight, saved.model.weight)
    assert "for other data/params: starting over" in caplog.text


@pytest.mark.parametrize(
    ("accuracies", "patience", "best_epoch", "epochs_run"),
    [
        pytest.param([0.5, 0.7, 0.6, 0.6, 0.9], 2, 2, 4, id="stops-after-patience"),
        pytest.param([0.5, 0.5, 0.5], 5, 1, 3, id="a-tie-keeps-the-earlier-epoch"),
        pytest.param([0.0, 0.0], 1, 1, 2, id="zero-accuracy-still-beats-none"),
        pytest.param([0.5, 0.6, 0.7], 3, 3, 3, id="improving"),
    ],
)
def test_early_stopping_keeps_the_best_val_epoch(accuracies, patience, best_epoch, epochs_run):
    progress = train.Progress()
    assert train.kept_weights(progress.best, patience) is None  # no epoch ran: model's own
    copies = []
    for epoch, accuracy in enumerate(accuracies, 1):
        progress.epoch = epoch
        progress.best = train.update_best(
            progress.best, epoch, accuracy, lambda e=epoch: copies.append(e) or {"e": e}
        )
        if train.patience_exhausted(epoch, progress.best["epoch"], patience):
            break
    assert (progress.best["epoch"], progress.epoch) == (best_epoch, epochs_run)
    assert train.kept_weights(progress.best, patience) == {"e": best_epoch}
    assert train.kept_epoch(progress, patience) == best_epoch
    assert copies[-1] == best_epoch and len(copies) == len(set(copies))  # on improvement only


@pytest.mark.parametrize(
    "accuracies",
    [[0.9, 0.1, 0.1, 0.1], [0.5, 0.6, 0.7], [0.5, 0.5]],
    ids=["peak-first", "up", "flat"],
)
def test_without_early_stopping_every_epoch_runs_and_the_last_is_kept(accuracies):
    """patience 0: no epoch is chosen on val (noise on a small split); the last weights stay."""
    progress = train.Progress()
    for epoch, accuracy in enumerate(accuracies, 1):
        progress.epoch = epoch
        progress.best = train.update_best(progress.best, epoch, accuracy, lambda: None)
        assert not train.patience_exhausted(epoch, progress.best["epoch"], 0)
    assert train.kept_weights(progress.best, 0) is None  # the model's own: the last epoch's
    assert train.kept_epoch(progress, 0) == len(accuracies)
    assert progress.best["epoch"] == max(
        range(1, len(accuracies) + 1), key=lambda e: (accuracies[e - 1], -e)
    )


def test_epoch_row_is_the_history_line_and_its_metrics():
    row = train.epoch_row(
        3,
        {"loss": 0.5, "accuracy": 0.8, "images_per_s": 100.0, "failed": [1]},
        {"loss": 0.6, "accuracy": 0.7, "pairs": [], "failed": []},
        lr=0.01,
    )
    assert row == {
        "epoch": 3,
        "train_loss": 0.5,
        "train_accuracy": 0.8,
        "val_loss": 0.6,
        "val_accuracy": 0.7,
        "images_per_s": 100.0,
        "lr": 0.01,
    }


def test_the_confusion_figure_draws_labels_that_look_like_math():
    """Folder names such as `$\\foo$` or `$5-$10` failed matplotlib's math parser after the
    last epoch: training never registered its model, on every retry."""
    import io

    import matplotlib.pyplot as plt

    labels = ["$\\foo$", "$5-$10", "50%_$x^2$"]
    fig = train.confusion_figure(np.eye(3, dtype=int), labels)
    fig.savefig(io.BytesIO(), format="png")
    assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == labels
    plt.close(fig)


@pytest.mark.parametrize(
    ("n_labels", "drawn"),
    [
        pytest.param(10, True, id="ten"),
        pytest.param(train.CONFUSION_FIGURE_MAX_LABELS, True, id="at-the-cap"),
        pytest.param(300, False, id="hundreds"),
    ],
)
def test_the_confusion_figure_stays_bounded_whatever_the_labels(n_labels, drawn):
    """300 labels took 32 s and 5.9 GB to draw (1500: out of memory), and training could never
    register its model: above the cap no picture is drawn (the JSON keeps the matrix)."""
    import matplotlib.pyplot as plt

    labels = [f"label-{i:04d}" for i in range(n_labels)]
    cm = np.ones((n_labels, n_labels), dtype=int)
    fig = train.confusion_figure(cm, labels)
    assert (fig is not None) is drawn
    if fig is not None:
        assert max(fig.get_size_inches()) <= 30
        plt.close(fig)
