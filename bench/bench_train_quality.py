"""Benchmark model quality off the easy case: `pipeline.train` against a plain torchvision loop.

Run by hand (throwaway bucket, database, MLflow experiment and registered model, removed after):
    .venv/bin/python scripts/stack.py run -- .venv/bin/python bench/bench_train_quality.py

Data (`bench.images.make_class_jpegs`): two digit classes painted in any colour on photo crops,
500x375 JPEGs, trained at 64 px from random init, so accuracy stays far from 100 % and recipe
differences show. Fixed images, one training seed per row. Per seed:

  pipeline        prefix `carved/` (train/ + test/, no val/): `catalog.scan` with the default
                  val_percent carves ~10 % of train into val; `train_model` with the default
                  params (epochs overridden); the registered model is scored on the test split
                  with `score.score_shard` + `score.evaluate` (what the DAG reports).
  full            prefix `full/`: the same train images, all kept for training, plus a val/
                  folder of other images of the same size as the carved val; `train_model`.
  plain           a textbook torchvision loop (ImageFolder-style PIL transforms v1, the same
                  ResNet18, AdamW, cosine schedule, augmentation, epochs, batch size) on ALL
                  train images, last epoch kept.

Each pipeline run gets a checkpoint store that evaluates every epoch's checkpoint on the test
images and keeps nothing (`EpochProbe`), so one run yields both the kept (best-on-val) epoch's
and the last epoch's test accuracy without touching `pipeline/`. The 2x2 of {carved, full} x
{best-on-val, last epoch} separates the two suspected causes of the gap.

Writes its section of bench/results/train.md (between markers; the rest of the file is kept).
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from bench.images import cpu_flags, make_class_jpegs  # noqa: E402
from pipeline import catalog, score, train  # noqa: E402
from pipeline.config import load_settings  # noqa: E402
from pipeline.db import create_database, drop_database, migrate  # noqa: E402
from pipeline.store import ObjectStore  # noqa: E402

try:  # TrainParams moved to the torch-free pipeline.train_plan
    from pipeline.train_plan import TrainParams  # noqa: E402
except ImportError:  # pragma: no cover - older checkouts
    from pipeline.train import TrainParams  # noqa: E402

log = logging.getLogger("bench_train_quality")
RESULTS = Path(__file__).resolve().parent / "results" / "train.md"
BEGIN, END = "<!-- bench_train_quality:begin -->", "<!-- bench_train_quality:end -->"
COMMAND = ".venv/bin/python scripts/stack.py run -- .venv/bin/python bench/bench_train_quality.py"


# ----------------------------------------------------------------------------- test images


@dataclass
class TestSet:
    """The test images preprocessed once with the pipeline's `EvalPreset`, and their targets."""

    images: torch.Tensor  # uint8 (N, 3, S, S)
    labels: list[str]

    def targets(self, label_map: dict[str, int]) -> torch.Tensor:
        return torch.tensor([label_map[label] for label in self.labels])


def test_set(images: list[tuple[str, bytes]], image_size: int) -> TestSet:
    from pipeline.data import EvalPreset

    preset = EvalPreset(image_size)
    return TestSet(
        torch.stack([preset.from_bytes(data) for _, data in images]),
        [label for label, _ in images],
    )


def accuracy(model: torch.nn.Module, test: TestSet, label_map: dict[str, int]) -> float:
    """Top-1 accuracy of `model` (pipeline layout: takes [0, 1] pixels) on `test`, eval mode."""
    from pipeline.data import to_model_input

    model.eval()
    correct = 0
    targets = test.targets(label_map)
    with torch.inference_mode():
        for start in range(0, len(targets), 200):
            batch = to_model_input(test.images[start : start + 200])
            batch = batch.contiguous(memory_format=torch.channels_last)
            predicted = model(batch).argmax(1)
            correct += int((predicted == targets[start : start + 200]).sum())
    return correct / len(targets)


# ----------------------------------------------------------------------------- pipeline runs


@dataclass
class EpochProbe:
    """A checkpoint store for `train_model` that tests every epoch's weights and stores nothing.

    `train_model` saves a checkpoint after each epoch (model, history, best epoch); here each
    one is evaluated on the test images at once. `load` finds nothing, so no run resumes.
    """

    test: TestSet
    label_map: dict[str, int]
    test_accuracy: list[float] = field(default_factory=list)
    val_accuracy: list[float] = field(default_factory=list)
    best_epoch: int = 0

    def load(self, name: str) -> bytes | None:
        return None

    def save(self, name: str, data: bytes) -> None:
        from pipeline.model import build_model

        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        model = build_model(len(self.label_map)).to(memory_format=torch.channels_last)
        model.load_state_dict(state["model"])
        self.test_accuracy.append(accuracy(model, self.test, self.label_map))
        self.val_accuracy.append(state["history"][-1]["val_accuracy"])
        self.best_epoch = int(state["best"]["epoch"])
        log.info(
            "probe: epoch %d test accuracy %.4f (val %.4f, best epoch so far %d)",
            state["epoch"],
            self.test_accuracy[-1],
            self.val_accuracy[-1],
            self.best_epoch,
        )

    def delete(self, name: str) -> None:
        pass

    def describe(self, name: str) -> str:
        return f"probe:{name}"


def run_pipeline(
    db, store, dataset_version: str, params: TrainParams, test: TestSet, **kwargs: Any
) -> dict[str, Any]:
    """`train.train_model` with an `EpochProbe`; best (kept) and last epoch's test accuracy."""
    label_map = catalog.get_dataset(db, dataset_version)["label_map"]
    probe = EpochProbe(test, label_map)
    started = time.perf_counter()
    result = train.train_model(db, store, dataset_version, params, checkpoint_store=probe, **kwargs)
    seconds = time.perf_counter() - started
    counts = catalog.get_dataset(db, dataset_version)["counts"]
    return {
        **result,
        "seconds": seconds,
        "n_train": sum(counts.get("train", {}).values()),
        "n_val": sum(counts.get("val", {}).values()),
        "curve": probe.test_accuracy,
        "val_curve": probe.val_accuracy,
        "best_epoch": probe.best_epoch,
        "best": probe.test_accuracy[probe.best_epoch - 1],
        "last": probe.test_accuracy[-1],
    }


def score_test_split(
    db, store, *, prefix: str, model_name: str, model_version: str, dataset_version: str, cache_dir
) -> tuple[float, int]:
    """The DAG's path: score the test split with the registered version, then evaluate it."""
    score.score_shard(
        db,
        store,
        model_name=model_name,
        model_version=model_version,
        shard=0,
        shards=1,
        prefix=prefix,
        cache_dir=cache_dir,
        dataset_version=dataset_version,
        subsets=("test",),
        precision="fp32",
    )
    result = score.evaluate(
        db, model_name=model_name, model_version=model_version, log_to_mlflow=False
    )
    return result["accuracy"], result["n_images"]


# ----------------------------------------------------------------------------- plain loop


class _Photos(torch.utils.data.Dataset):
    def __init__(self, images: list[tuple[str, bytes]], index: dict[str, int], transform) -> None:
        self.images, self.index, self.transform = images, index, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        from PIL import Image

        label, data = self.images[i]
        return self.transform(Image.open(io.BytesIO(data)).convert("RGB")), self.index[label]


def plain_loop(
    train_images: list[tuple[str, bytes]],
    test_images: list[tuple[str, bytes]],
    params: TrainParams,
    *,
    num_workers: int,
) -> dict[str, float]:
    """The reference: a textbook torchvision loop on all train images; the last epoch is kept."""
    from PIL import Image
    from torchvision import models, transforms

    torch.manual_seed(params.seed)
    labels = sorted({label for label, _ in train_images})
    index = {label: i for i, label in enumerate(labels)}
    normalize = transforms.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    train_tf = transforms.Compose(
        [
            transforms.Resize(int(params.image_size * 1.15)),
            transforms.RandomResizedCrop(params.image_size, scale=(0.7, 1.0), ratio=(0.85, 1.18)),
            transforms.ColorJitter(brightness=0.2, contrast=0.2),
            transforms.ToTensor(),
            normalize,
        ]
    )
    eval_tf = transforms.Compose(
        [
            transforms.Resize(params.image_size),
            transforms.CenterCrop(params.image_size),
            transforms.ToTensor(),
            normalize,
        ]
    )
    loader = torch.utils.data.DataLoader(
        _Photos(train_images, index, train_tf),
        batch_size=params.batch_size,
        shuffle=True,
        num_workers=num_workers,
        persistent_workers=num_workers > 0,
        generator=torch.Generator().manual_seed(params.seed),
    )
    model = models.resnet18(num_classes=len(labels))
    opt = torch.optim.AdamW(
        model.parameters(), lr=params.learning_rate, weight_decay=params.weight_decay
    )
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=params.epochs)
    loss_fn = torch.nn.CrossEntropyLoss()
    started = time.perf_counter()
    for epoch in range(params.epochs):
        model.train()
        for x, y in loader:
            opt.zero_grad()
            loss_fn(model(x), y).backward()
            opt.step()
        sched.step()
        log.info("plain loop: epoch %d/%d done", epoch + 1, params.epochs)
    seconds = time.perf_counter() - started
    model.eval()
    x = torch.stack([eval_tf(Image.open(io.BytesIO(d)).convert("RGB")) for _, d in test_images])
    y = torch.tensor([index[label] for label, _ in test_images])
    with torch.inference_mode():
        predicted = torch.cat([model(x[i : i + 200]).argmax(1) for i in range(0, len(y), 200)])
    return {"last": float((predicted == y).float().mean()), "seconds": seconds}


# ----------------------------------------------------------------------------- report


def cpu_model() -> str:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return platform.processor() or "unknown"
    found = re.search(r"^model name\s*:\s*(.+)$", text, re.MULTILINE)
    return found.group(1).strip() if found else "unknown"


def git_state() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short=12", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", "pipeline"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha + (" (pipeline/ has uncommitted changes)" if dirty else "")


COLUMNS = (
    ("pipeline", "pipeline: `train_model` + `score` (carved val, best epoch)"),
    ("carved_last", "carved val, last epoch"),
    ("full_best", "all train + separate val/, best epoch"),
    ("full_last", "all train, last epoch"),
    ("plain", "plain loop (all train, last epoch)"),
)


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def report(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    means = {key: statistics.mean(r[key] for r in rows) for key, _ in COLUMNS}
    plain = means["plain"]
    lines = [
        "## Quality off the easy case (two-class photos, random init)",
        "",
        f"Machine: {meta['cpu']}, {os.cpu_count()} cores (shared with other work while this "
        f"ran); CPU flags: {cpu_flags()}; torch {torch.__version__}; {time.strftime('%Y-%m-%d')}."
        f" Code: {meta['code']}. Command: `{COMMAND}` ({meta['args']}).",
        "",
        f"Data (`bench.images.make_class_jpegs`): digits {' vs '.join(meta['labels'])} in any "
        f"colour on photo crops, 500x375 JPEG; {meta['n_train']} train images (no `val/`), "
        f"{meta['n_test']} test images, fixed across seeds. The default scan carves "
        f"{meta['n_val_carved']} of the train images into val (so {meta['n_train_carved']} train);"
        f" the `full/` prefix keeps all {meta['n_train']} for training and has a `val/` folder of "
        f"{meta['n_val_full']} other images. Params: defaults with epochs={meta['epochs']}: "
        f"{meta['params']}.",
        "",
        "Test accuracy (%) per training seed; every column is measured on the same test images:",
        "",
        "| seed | " + " | ".join(title for _, title in COLUMNS) + " | kept epoch (carved) |",
        "|---" * (len(COLUMNS) + 2) + "|",
    ]
    for r in rows:
        lines.append(
            f"| {r['seed']} | "
            + " | ".join(pct(r[key]) for key, _ in COLUMNS)
            + f" | {r['carved_best_epoch']} of {meta['epochs']} |"
        )
    lines += [
        "| **mean** | " + " | ".join(f"**{pct(means[k])}**" for k, _ in COLUMNS) + " | |",
        "| gap to plain (points) | "
        + " | ".join(f"{100 * (means[k] - plain):+.1f}" for k, _ in COLUMNS)
        + " | |",
        "",
        "Mean test accuracy (%) per epoch over the seeds, from the per-epoch checkpoints:",
        "",
        "| epoch | " + " | ".join(str(e) for e in range(1, meta["epochs"] + 1)) + " |",
        "|---" * (meta["epochs"] + 1) + "|",
    ]
    for name, key in (("carved (train minus val)", "carved_curve"), ("all train", "full_curve")):
        curve = [statistics.mean(r[key][e] for r in rows) for e in range(meta["epochs"])]
        lines.append(f"| {name} | " + " | ".join(pct(c) for c in curve) + " |")
    lines += [
        "",
        f"The registered model's `score` accuracy equals the probe's kept-epoch accuracy: "
        f"{meta['score_matches_probe']}. Seconds per run (train only, mean): pipeline "
        f"{meta['seconds']['pipeline']:.0f}, full {meta['seconds']['full']:.0f}, plain "
        f"{meta['seconds']['plain']:.0f}.",
        "",
    ]
    return "\n".join(lines)


def write_section(text: str) -> None:
    """Replace this benchmark's section of the results file (or append it), keeping the rest."""
    current = RESULTS.read_text(encoding="utf-8") if RESULTS.exists() else ""
    section = f"{BEGIN}\n{text}\n{END}\n"
    if BEGIN in current and END in current:
        head, _, rest = current.partition(BEGIN)
        _, _, tail = rest.partition(END)
        updated = head + section.rstrip("\n") + tail
    else:
        updated = current.rstrip("\n") + ("\n\n" if current else "") + section
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(updated, encoding="utf-8")


# ----------------------------------------------------------------------------- main


def upload(store: ObjectStore, prefix: str, split: str, images: list[tuple[str, bytes]]) -> None:
    def put(item: tuple[int, tuple[str, bytes]]) -> None:
        i, (label, data) = item
        store.put_bytes(f"{prefix}/{split}/{label}/img_{i:05d}.jpg", data)

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(put, enumerate(images)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--labels", default="3,8", help="digit classes, comma-separated")
    parser.add_argument("--train-images", type=int, default=300)
    parser.add_argument("--test-images", type=int, default=400)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import mlflow
    from mlflow import MlflowClient

    from pipeline.data import default_num_workers

    settings = load_settings()
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    suffix = uuid.uuid4().hex[:8]
    db_name = f"{settings.mysql.database}_test_bench_{suffix}"
    db = create_database(settings.mysql, db_name)
    store = ObjectStore(settings.s3, f"bench-{suffix}")
    model_name = f"bench-quality-{suffix}"
    work = Path(tempfile.mkdtemp(prefix="bench_train_quality_"))
    labels = tuple(args.labels.split(","))
    try:
        migrate(db)
        store.ensure_bucket()
        train_images = make_class_jpegs(args.train_images, seed=1, labels=labels)
        test_images = make_class_jpegs(args.test_images, seed=2, labels=labels)
        upload(store, "carved", "train", train_images)
        upload(store, "carved", "test", test_images)
        carved = catalog.scan(db, store, "carved")["dataset_version"]
        n_val_carved = sum(catalog.get_dataset(db, carved)["counts"].get("val", {}).values())
        val_images = make_class_jpegs(max(n_val_carved, 2 * len(labels)), seed=3, labels=labels)
        upload(store, "full", "train", train_images)
        upload(store, "full", "val", val_images)
        full = catalog.scan(db, store, "full")["dataset_version"]

        base = TrainParams(epochs=args.epochs)
        test = test_set(test_images, base.image_size)
        num_workers = default_num_workers() if base.num_workers is None else base.num_workers
        common = {"model_name": model_name, "cache_dir": work / "cache", "experiment": model_name}
        rows, seconds, matches = [], {"pipeline": [], "full": [], "plain": []}, []
        for seed in args.seeds:
            params = TrainParams(epochs=args.epochs, seed=seed)
            p = run_pipeline(db, store, carved, params, test, run_key=f"carved-{seed}", **common)
            scored, n_scored = score_test_split(
                db,
                store,
                prefix="carved",
                model_name=model_name,
                model_version=p["model_version"],
                dataset_version=carved,
                cache_dir=work / "cache",
            )
            assert n_scored == len(test_images), (n_scored, len(test_images))
            matches.append(abs(scored - p["best"]) < 1e-9)
            f = run_pipeline(db, store, full, params, test, run_key=f"full-{seed}", **common)
            plain = plain_loop(train_images, test_images, params, num_workers=num_workers)
            rows.append(
                {
                    "seed": seed,
                    "pipeline": scored,
                    "carved_last": p["last"],
                    "full_best": f["best"],
                    "full_last": f["last"],
                    "plain": plain["last"],
                    "carved_best_epoch": p["best_epoch"],
                    "carved_curve": p["curve"],
                    "full_curve": f["curve"],
                    "n_train_carved": p["n_train"],
                }
            )
            seconds["pipeline"].append(p["seconds"])
            seconds["full"].append(f["seconds"])
            seconds["plain"].append(plain["seconds"])
            log.info(
                "seed %d: pipeline %.4f (probe best %.4f, epoch %d) carved-last %.4f "
                "full-best %.4f full-last %.4f plain %.4f",
                seed,
                scored,
                p["best"],
                p["best_epoch"],
                p["last"],
                f["best"],
                f["last"],
                plain["last"],
            )
            # The section is rewritten after every seed: a long run cut short keeps its rows.
            meta = {
                "cpu": cpu_model(),
                "code": git_state(),
                "args": " ".join(sys.argv[1:]) or "defaults",
                "labels": labels,
                "n_train": len(train_images),
                "n_test": len(test_images),
                "n_val_carved": n_val_carved,
                "n_train_carved": rows[0]["n_train_carved"],
                "n_val_full": len(val_images),
                "epochs": args.epochs,
                "params": {k: v for k, v in vars(base).items() if k != "seed"}
                | {"num_workers": num_workers},
                "score_matches_probe": "yes" if all(matches) else f"no ({matches})",
                "seconds": {k: statistics.mean(v) for k, v in seconds.items()},
            }
            text = report(rows, meta)
            if seed == args.seeds[-1]:
                print(text)
            if not args.no_write:
                write_section(text)
        return 0
    finally:
        client = MlflowClient(settings.mlflow_tracking_uri)
        try:
            client.delete_registered_model(model_name)
        except Exception:  # noqa: BLE001 - nothing registered when training failed early
            pass
        experiment = client.get_experiment_by_name(model_name)
        if experiment is not None:
            client.delete_experiment(experiment.experiment_id)
        store.delete_bucket()
        drop_database(settings.mysql, db_name)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
