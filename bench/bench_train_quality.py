"""Benchmark model quality off the easy case: `pipeline.train` against a plain torchvision loop.

Run by hand (throwaway bucket, database, MLflow experiment and registered model, removed after):
    .venv/bin/python scripts/stack.py run -- .venv/bin/python bench/bench_train_quality.py

Data (`bench.images.make_class_jpegs`): two digit classes painted in any colour on photo crops,
500x375 JPEGs, trained at 64 px from random init, so accuracy stays far from 100 % and recipe
differences show. Fixed images, one training seed per row. One prefix `carved/` (train/ +
test/, no val/): `catalog.scan` with the default val_percent carves ~10 % of train into val.
Per seed, each pipeline run is the real `train.train_model`, its registered version scored on
the test split with `score.score_shard` + `score.evaluate` (what the DAG reports):

  default         default params (epochs overridden): trains on the carved train images, keeps
                  the last epoch (`patience` 0).
  train_on_val    `train_on_val=True`: trains on train + val, i.e. every labelled non-test image.
  patience        early stopping (`patience=--patience`, 0: none), the best val epoch kept:
                  replayed on the default run's per-epoch val accuracy with the pipeline's own
                  rule (`train.update_best`, `train.patience_exhausted`), so it costs nothing;
                  the epochs before the stop are the default run's. `--real-patience-runs`
                  also trains it with `train_model` and scores it, as a check.
  plain           a textbook torchvision loop (ImageFolder-style PIL transforms v1, the same
                  ResNet18, AdamW, cosine schedule, augmentation, epochs, batch size) on ALL
                  train images, last epoch kept.

Each pipeline run also gets a checkpoint store that tests every epoch's checkpoint on the test
images and keeps nothing (`EpochProbe`): it gives per-epoch test curves, checks that `score`
agrees with the kept epoch's weights, shows what the old rule (best val epoch kept without
early stopping) would have registered from the same run, and replays early stopping.

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
import threading
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
from pipeline.train_plan import TrainParams  # noqa: E402

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

    `train_model` saves a checkpoint after each epoch (model, history, best val epoch); here
    each one is evaluated on the test images at once. `load` finds nothing, so no run resumes.
    """

    test: TestSet
    label_map: dict[str, int]
    test_accuracy: list[float] = field(default_factory=list)
    val_accuracy: list[float] = field(default_factory=list)

    def load(self, name: str) -> bytes | None:
        return None

    def save(self, name: str, data: bytes) -> None:
        from pipeline.model import build_model

        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        model = build_model(len(self.label_map)).to(memory_format=torch.channels_last)
        model.load_state_dict(state["model"])
        self.test_accuracy.append(accuracy(model, self.test, self.label_map))
        self.val_accuracy.append(state["history"][-1]["val_accuracy"])
        log.info(
            "probe: epoch %d test accuracy %.4f (val %.4f, best val epoch so far %d)",
            state["epoch"],
            self.test_accuracy[-1],
            self.val_accuracy[-1],
            state["best"]["epoch"],
        )

    def delete(self, name: str) -> None:
        pass

    def describe(self, name: str) -> str:
        return f"probe:{name}"


def run_pipeline(
    db,
    store,
    client,
    dataset_version: str,
    params: TrainParams,
    test: TestSet,
    *,
    prefix: str,
    model_name: str,
    run_key: str,
    cache_dir: Path,
) -> dict[str, Any]:
    """`train.train_model`, then its registered version scored on the test split as the DAG
    does; with the run's `kept_epoch`/`best_val_epoch` metrics and the probe's per-epoch curve.
    """
    dataset = catalog.get_dataset(db, dataset_version)
    probe = EpochProbe(test, dataset["label_map"])
    started = time.perf_counter()
    result = train.train_model(
        db,
        store,
        dataset_version,
        params,
        model_name=model_name,
        run_key=run_key,
        cache_dir=cache_dir,
        checkpoint_store=probe,
        experiment=model_name,
        force_retrain=True,  # every configuration trains on the same dataset version
    )
    seconds = time.perf_counter() - started
    metrics = client.get_run(result["run_id"]).data.metrics
    kept_epoch, best_val_epoch = int(metrics["kept_epoch"]), int(metrics["best_val_epoch"])
    scored, n_scored = score_test_split(
        db,
        store,
        prefix=prefix,
        model_name=model_name,
        model_version=result["model_version"],
        dataset_version=dataset_version,
        cache_dir=cache_dir,
    )
    assert n_scored == len(test.labels), (n_scored, len(test.labels))
    counts = dataset["counts"]
    n_train = sum(counts.get("train", {}).values())
    if params.train_on_val:
        n_train += sum(counts.get("val", {}).values())
    log.info(
        "%s: test accuracy %.4f (kept epoch %d of %d run, best val epoch %d), %.0f s",
        run_key,
        scored,
        kept_epoch,
        result["epochs_run"],
        best_val_epoch,
        seconds,
    )
    return {
        "test": scored,
        "seconds": seconds,
        "n_train": n_train,
        "kept_epoch": kept_epoch,
        "best_val_epoch": best_val_epoch,
        "epochs_run": result["epochs_run"],
        "curve": probe.test_accuracy,
        "val_curve": probe.val_accuracy,
        # What the registered weights scored per the probe: must equal `score`'s figure.
        "probe_kept": probe.test_accuracy[kept_epoch - 1],
        # The rule before the fix (best val epoch kept, every epoch trained), same run.
        "best_val": probe.test_accuracy[best_val_epoch - 1],
    }


def early_stopped(run: dict[str, Any], patience: int) -> dict[str, Any]:
    """Early stopping with `patience` replayed on `run`'s per-epoch val accuracy: the test
    accuracy of the epoch it keeps, that epoch and the epochs it trains.
    """
    best: dict[str, Any] = {"accuracy": -1.0, "epoch": 0, "state": None}
    for epoch, val_accuracy in enumerate(run["val_curve"], start=1):
        best = train.update_best(best, epoch, val_accuracy, lambda: None)
        if train.patience_exhausted(epoch, best["epoch"], patience):
            break
    return {
        "test": run["curve"][best["epoch"] - 1],
        "kept_epoch": best["epoch"],
        "epochs_run": epoch,
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


class LoadSampler:
    """The machine's 1-minute load average, sampled in a background thread while the run lasts."""

    def __init__(self, every_s: float = 15.0) -> None:
        self.samples: list[float] = []
        self._every_s = every_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while True:
            self.samples.append(os.getloadavg()[0])
            if self._stop.wait(self._every_s):
                return

    def start(self) -> LoadSampler:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> str:
        if not self.samples:
            return "not sampled"
        return (
            f"mean {statistics.mean(self.samples):.1f}, max {max(self.samples):.1f} "
            f"({len(self.samples)} samples every {self._every_s:.0f} s)"
        )


def columns(patience: int, real_patience_runs: bool) -> list[tuple[str, str]]:
    """(key, title) of the accuracy columns, the plain loop last."""
    cols = [
        ("default", "pipeline default: carved val, last epoch kept"),
        ("train_on_val", "`train_on_val=True` (train + val), last epoch"),
    ]
    if patience:
        cols.append(
            (
                "patience_replay",
                f"`patience={patience}`: best val epoch kept, early stop (replayed on default run)",
            )
        )
    if patience and real_patience_runs:
        cols.append(("patience", f"`patience={patience}`, trained and scored"))
    cols += [
        ("best_val", "before the fix: carved val, best val epoch kept (same run as default)"),
        ("plain", "plain loop (all train, last epoch)"),
    ]
    return cols


def pct(x: float) -> str:
    return f"{100 * x:.1f}"


def paired(rows: list[dict[str, Any]], key: str) -> str:
    """Mean gap to the plain loop in points, with the paired differences' sd and standard error."""
    diffs = [100 * (r[key] - r["plain"]) for r in rows]
    mean = statistics.mean(diffs)
    if len(diffs) < 2:
        return f"{mean:+.1f}"
    sd = statistics.stdev(diffs)
    return f"{mean:+.1f} (sd {sd:.1f}, se {sd / len(diffs) ** 0.5:.1f})"


def report(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    cols = columns(meta["patience"], meta["real_patience_runs"])
    means = {key: statistics.mean(r[key] for r in rows) for key, _ in cols}
    epochs = meta["epochs"]
    lines = [
        "## Quality off the easy case (two-class photos, random init)",
        "",
        f"Machine: {meta['cpu']}, {os.cpu_count()} cores shared with other work while this ran "
        f"(1-minute load average {meta['load']}; this run at nice {meta['nice']}, "
        f"{torch.get_num_threads()} torch threads); CPU flags: {cpu_flags()}; torch "
        f"{torch.__version__}; {time.strftime('%Y-%m-%d')}. Code: {meta['code']}. Command: "
        f"`{COMMAND}` ({meta['args']}).",
        "",
        f"Data (`bench.images.make_class_jpegs`): digits {' vs '.join(meta['labels'])} in any "
        f"colour on photo crops, 500x375 JPEG; {meta['n_train']} train images (no `val/`), "
        f"{meta['n_test']} test images, fixed across seeds. The default scan carves "
        f"{meta['n_val']} of the train images into val, so the default run trains on "
        f"{meta['n_train_carved']} and `train_on_val` on {meta['n_train_on_val']}. Params: "
        f"defaults with epochs={epochs}: {meta['params']}.",
        "",
        "Test accuracy (%) per training seed, every column on the same test images. Pipeline "
        "columns are the registered version scored by `score.score_shard` + `score.evaluate`; "
        '"before the fix" is the default run\'s best-val-epoch checkpoint, tested by the probe:',
        "",
        "| seed | " + " | ".join(title for _, title in cols) + " | epochs: default kept / "
        "best val" + ("; patience kept / run" if meta["patience"] else "") + " |",
        "|---" * (len(cols) + 2) + "|",
    ]
    for r in rows:
        epochs_note = f"{r['default_kept_epoch']} / {r['default_best_val_epoch']}"
        if meta["patience"]:
            epochs_note += f"; {r['patience_kept_epoch']} / {r['patience_epochs_run']}"
        if meta["real_patience_runs"] and meta["patience"]:
            epochs_note += f" (trained: {r['real_kept_epoch']} / {r['real_epochs_run']})"
        lines.append(
            f"| {r['seed']} | " + " | ".join(pct(r[key]) for key, _ in cols) + f" | {epochs_note} |"
        )
    lines += [
        "| **mean** | " + " | ".join(f"**{pct(means[k])}**" for k, _ in cols) + " | |",
        "| gap to plain, points (paired sd, se) | "
        + " | ".join(paired(rows, k) for k, _ in cols)
        + " | |",
        "",
        "Mean test accuracy (%) per epoch over the seeds, from the per-epoch checkpoints:",
        "",
        "| epoch | " + " | ".join(str(e) for e in range(1, epochs + 1)) + " |",
        "|---" * (epochs + 1) + "|",
    ]
    for name, key in (("default (carved)", "default_curve"), ("train_on_val", "tov_curve")):
        curve = [statistics.mean(r[key][e] for r in rows) for e in range(epochs)]
        lines.append(f"| {name} | " + " | ".join(pct(c) for c in curve) + " |")
    seconds = ", ".join(f"{k} {v:.0f}" for k, v in meta["seconds"].items())
    lines += [
        "",
        "The registered version's `score` accuracy equals the probe's accuracy for its kept epoch "
        f"(`kept_epoch` metric) in every pipeline run: {meta['score_matches_probe']}. Seconds "
        f"per run (training only, mean): {seconds}.",
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
    parser.add_argument(
        "--patience", type=int, default=3, help="early stopping's patience (0: no such column)"
    )
    parser.add_argument(
        "--real-patience-runs",
        action="store_true",
        help="also train and score the early-stopping setting (else it is only replayed)",
    )
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import mlflow
    from mlflow import MlflowClient

    from pipeline.data import default_num_workers

    settings = load_settings()
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    client = MlflowClient(settings.mlflow_tracking_uri)
    suffix = uuid.uuid4().hex[:8]
    db_name = f"{settings.mysql.database}_test_bench_{suffix}"
    db = create_database(settings.mysql, db_name)
    store = ObjectStore(settings.s3, f"bench-{suffix}")
    model_name = f"bench-quality-{suffix}"
    work = Path(tempfile.mkdtemp(prefix="bench_train_quality_"))
    labels = tuple(args.labels.split(","))
    code = git_state()  # the code imported now, not what a long run may find in the tree later
    load = LoadSampler().start()
    try:
        migrate(db)
        store.ensure_bucket()
        train_images = make_class_jpegs(args.train_images, seed=1, labels=labels)
        test_images = make_class_jpegs(args.test_images, seed=2, labels=labels)
        upload(store, "carved", "train", train_images)
        upload(store, "carved", "test", test_images)
        carved = catalog.scan(db, store, "carved")["dataset_version"]

        base = TrainParams(epochs=args.epochs)
        test = test_set(test_images, base.image_size)
        num_workers = default_num_workers() if base.num_workers is None else base.num_workers
        common = {"prefix": "carved", "model_name": model_name, "cache_dir": work / "cache"}
        variants = {
            "default": {},
            "train_on_val": {"train_on_val": True},
            **(
                {"patience": {"patience": args.patience}}
                if args.patience and args.real_patience_runs
                else {}
            ),
        }
        rows: list[dict[str, Any]] = []
        seconds: dict[str, list[float]] = {key: [] for key in (*variants, "plain")}
        matches: list[bool] = []
        for seed in args.seeds:
            runs = {}
            for key, overrides in variants.items():
                params = TrainParams(epochs=args.epochs, seed=seed, **overrides)
                runs[key] = run_pipeline(
                    db, store, client, carved, params, test, run_key=f"{key}-{seed}", **common
                )
                matches.append(abs(runs[key]["test"] - runs[key]["probe_kept"]) < 1e-9)
                seconds[key].append(runs[key]["seconds"])
            plain = plain_loop(
                train_images,
                test_images,
                TrainParams(epochs=args.epochs, seed=seed),
                num_workers=num_workers,
            )
            seconds["plain"].append(plain["seconds"])
            default = runs["default"]
            row = {
                "seed": seed,
                **{key: run["test"] for key, run in runs.items()},
                "best_val": default["best_val"],
                "plain": plain["last"],
                "default_kept_epoch": default["kept_epoch"],
                "default_best_val_epoch": default["best_val_epoch"],
                "default_curve": default["curve"],
                "tov_curve": runs["train_on_val"]["curve"],
            }
            if args.patience:
                replay = early_stopped(default, args.patience)
                row["patience_replay"] = replay["test"]
                row["patience_kept_epoch"] = replay["kept_epoch"]
                row["patience_epochs_run"] = replay["epochs_run"]
            if "patience" in runs:
                row["real_kept_epoch"] = runs["patience"]["kept_epoch"]
                row["real_epochs_run"] = runs["patience"]["epochs_run"]
            rows.append(row)
            log.info(
                "seed %d: %s",
                seed,
                ", ".join(
                    f"{key} {row[key]:.4f}"
                    for key, _ in columns(args.patience, args.real_patience_runs)
                ),
            )
            # The section is rewritten after every seed: a long run cut short keeps its rows.
            meta = {
                "cpu": cpu_model(),
                "code": code,
                "args": " ".join(sys.argv[1:]) or "defaults",
                "labels": labels,
                "n_train": len(train_images),
                "n_test": len(test_images),
                "n_val": len(train_images) - default["n_train"],
                "n_train_carved": default["n_train"],
                "n_train_on_val": runs["train_on_val"]["n_train"],
                "epochs": args.epochs,
                "patience": args.patience,
                "real_patience_runs": args.real_patience_runs,
                "params": {k: v for k, v in vars(base).items() if k != "seed"}
                | {"num_workers": num_workers},
                "score_matches_probe": "yes" if all(matches) else f"no ({matches})",
                "seconds": {k: statistics.mean(v) for k, v in seconds.items() if v},
                "load": load.summary(),
                "nice": os.nice(0),
            }
            text = report(rows, meta)
            if seed == args.seeds[-1]:
                print(text)
            if not args.no_write:
                write_section(text)
        return 0
    finally:
        load.stop()
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
