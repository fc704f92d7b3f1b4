"""Benchmark training on the demo digits: accuracy, parity with a plain torchvision script, throughput.

Run by hand (throwaway bucket, database and registered model, removed afterwards):
    .venv/bin/python scripts/stack.py run -- .venv/bin/python bench/bench_train.py
Measures, with the default run parameters (`pipeline.train_plan.TrainParams()`):
  1. the pipeline's `train_model` → test accuracy of the registered model on the test split;
  2. a plain torchvision script (ImageFolder-style files, transforms v1, the same split, seed,
     optimizer, schedule and epochs) → its test accuracy;
  3. throughput: the pipeline's epoch images/s vs the same model's training step on in-memory
     tensors (the compute limit on this machine).
Writes bench/results/train.md.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from pipeline import catalog, registry, train  # noqa: E402
from pipeline.config import load_settings  # noqa: E402
from pipeline.db import create_database, drop_database, migrate  # noqa: E402
from pipeline.demo_data import render_digits  # noqa: E402
from pipeline.store import ObjectStore  # noqa: E402
from pipeline.train_plan import TrainParams  # noqa: E402
from pipeline.upload import upload_tree  # noqa: E402

log = logging.getLogger("bench_train")
RESULTS = Path(__file__).resolve().parent / "results" / "train.md"


def compute_limit(params: TrainParams, n_classes: int, steps: int = 8) -> float:
    """Training steps/s × batch on random in-memory tensors: what the model alone can do."""
    from pipeline.model import build_model

    model = build_model(n_classes).to(memory_format=torch.channels_last).train()
    opt = torch.optim.AdamW(model.parameters(), lr=params.learning_rate)
    x = torch.rand(params.batch_size, 3, params.image_size, params.image_size).contiguous(
        memory_format=torch.channels_last
    )
    y = torch.randint(0, n_classes, (params.batch_size,))
    loss_fn = torch.nn.CrossEntropyLoss()
    for _ in range(2):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    started = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    return steps * params.batch_size / (time.perf_counter() - started)


def plain_torchvision(local_dir: Path, records, test_records, params: TrainParams) -> dict:
    """The reference: a textbook torchvision loop over local files, same split and seed."""
    from PIL import Image
    from torchvision import models, transforms

    torch.manual_seed(params.seed)
    labels = sorted({r.label for r in records})
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

    def path(r):
        return local_dir / r.object_key.split("/", 1)[1]

    class Files(torch.utils.data.Dataset):
        def __init__(self, rs, tf):
            self.rs, self.tf = rs, tf

        def __len__(self):
            return len(self.rs)

        def __getitem__(self, i):
            return self.tf(Image.open(path(self.rs[i])).convert("RGB")), index[self.rs[i].label]

    loader = torch.utils.data.DataLoader(
        Files(records, train_tf),
        batch_size=params.batch_size,
        shuffle=True,
        num_workers=params.num_workers,
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
        log.info("plain torchvision: epoch %d done", epoch + 1)
    elapsed = time.perf_counter() - started
    model.eval()
    correct = 0
    with torch.inference_mode():
        for r in test_records:
            x = eval_tf(Image.open(path(r)).convert("RGB")).unsqueeze(0)
            correct += int(labels[int(model(x).argmax())] == r.label)
    return {"test_accuracy": correct / len(test_records), "seconds": elapsed}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, help="override the default epochs")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    settings = load_settings()
    suffix = uuid.uuid4().hex[:8]
    name = f"{settings.mysql.database}_test_bench_{suffix}"
    db = create_database(settings.mysql, name)
    store = ObjectStore(settings.s3, f"bench-{suffix}")
    model_name = f"bench-train-{suffix}"
    work = Path(tempfile.mkdtemp(prefix="bench_train_"))
    params = TrainParams()
    if args.epochs:
        params = replace(params, epochs=args.epochs)
    try:
        migrate(db)
        store.ensure_bucket()
        render_digits(work / "digits", size=64, inbox=0)
        upload_tree(store, work / "digits", "digits")
        version = catalog.scan(db, store, "digits")["dataset_version"]
        train_records = catalog.dataset_images(db, version, ["train"])
        test_records = catalog.dataset_images(db, version, ["test"])

        started = time.perf_counter()
        result = train.train_model(
            db,
            store,
            version,
            params,
            model_name=model_name,
            run_key=f"bench-{suffix}",
            cache_dir=work / "cache",
            checkpoint_store=train.LocalCheckpointStore(work / "ckpt"),
            experiment=model_name,
        )
        pipeline_s = time.perf_counter() - started
        loaded = registry.load_model(model_name, result["model_version"], cache_dir=work / "cache")
        pipeline_acc, n_test = registry.accuracy_on(
            loaded, store, test_records, cache_dir=work / "cache"
        )
        from mlflow import MlflowClient

        history = MlflowClient().get_metric_history(result["run_id"], "images_per_s")
        epoch_rates = [m.value for m in sorted(history, key=lambda m: m.step)]
        steady = sum(epoch_rates[1:]) / max(len(epoch_rates) - 1, 1)

        plain = plain_torchvision(work / "digits", train_records, test_records, params)
        limit = compute_limit(params, len(loaded.labels))
        rows = [
            ("pipeline train_model (default params)", f"{pipeline_acc:.4f}", f"{pipeline_s:.0f}"),
            (
                "plain torchvision script, same split/seed",
                f"{plain['test_accuracy']:.4f}",
                f"{plain['seconds']:.0f}",
            ),
        ]
        text = [
            "# Training benchmark (demo digits, CPU)",
            "",
            f"Machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
            f"{time.strftime('%Y-%m-%d')}. Command: "
            "`.venv/bin/python scripts/stack.py run -- .venv/bin/python bench/bench_train.py`.",
            "",
            f"Data: scikit-learn digits rendered at 64 px PNG; {len(train_records)} train, "
            f"{len(catalog.dataset_images(db, version, ['val']))} val, {n_test} test images. "
            f"Params: {params}.",
            "",
            "| run | test accuracy | seconds (train) |",
            "|---|---|---|",
            *[f"| {a} | {b} | {c} |" for a, b, c in rows],
            "",
            f"Accuracy difference pipeline − plain: {100 * (pipeline_acc - plain['test_accuracy']):+.2f} points.",
            "",
            "| throughput | images/s |",
            "|---|---|",
            f"| compute limit: train step on in-memory tensors (batch {params.batch_size}, "
            f"{params.image_size} px) | {limit:.1f} |",
            f"| pipeline epochs 2..{len(epoch_rates)} (S3 cache, decode, augment, loader workers) "
            f"| {steady:.1f} |",
            f"| ratio pipeline / limit | {steady / limit:.2f} |",
            "",
            f"Per-epoch images/s: {', '.join(f'{r:.1f}' for r in epoch_rates)} "
            "(epoch 1 includes worker start-up).",
            "",
        ]
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text("\n".join(text))
        print("\n".join(text))
        return 0
    finally:
        try:
            MlflowClient().delete_registered_model(model_name)
        except Exception:  # noqa: BLE001 - may not exist if training failed early
            pass
        store.delete_bucket()
        drop_database(settings.mysql, name)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
