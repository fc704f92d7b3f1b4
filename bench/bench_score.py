"""Benchmark scoring: the model alone vs end-to-end S3 → MySQL scoring vs the naive per-image loop.

Run by hand (throwaway bucket, database and MLflow model, removed afterwards):
    .venv/bin/python scripts/stack.py run -- .venv/bin/python bench/bench_score.py --images 512
Writes bench/results/score.md.

Images: real JPEGs of 500x375, each a random crop of one of scikit-learn's two sample photos
(china.jpg, flower.jpg), rescaled and brightness-jittered, with a large scikit-learn digit painted
in the middle; the digit is the label. The model is ResNet18 with random-init (frozen) backbone and
a linear head fitted on `--train-images` other such images (logistic regression on its 512-d
features), so its logits are those of a trained classifier, not near-uniform; it is scored at
224 px like a production model.

(a) the model alone: `pipeline.model.predict` on in-memory float tensors (channels_last,
    `inference_mode`), batch `--batch-size`; (b) `pipeline.score.score_shard` end to end: page
    the catalog, GET from S3, decode, preprocess, infer, upsert into MySQL, with a fresh image
    cache (so every image is fetched from S3), with the store's MinIO SDK client and, in the
    same round, with the old boto3 client (`bench.clients.Boto3Store`); (c) the naive loop: per image GET, Pillow decode
    and resize, forward with batch 1, INSERT + COMMIT. bf16 runs use `--bf16-images` (one shard).
    int8 runs (ONNX Runtime, `pipeline.onnx_runtime`) score all `--images`; quantizing (export and
    calibration on the train images) happens once, before the timed runs.

Agreement of bf16 and int8 with fp32 is also measured on a really trained model: ResNet18 (random
init) trained by `pipeline.train` for `--digits-epochs` on scikit-learn's digits rendered at
`--digits-size` px (`pipeline.demo_data`), compared on all its train/val/test images.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.clients import Boto3Store  # noqa: E402
from bench.cpu import CpuMeter  # noqa: E402
from bench.images import HEIGHT, WIDTH, cpu_flags, make_jpegs  # noqa: E402
from pipeline import catalog, score  # noqa: E402
from pipeline.config import load_settings  # noqa: E402
from pipeline.db import Database, create_database, drop_database, migrate  # noqa: E402
from pipeline.store import ObjectStore  # noqa: E402

log = logging.getLogger("bench_score")
RESULTS = Path(__file__).resolve().parent / "results" / "score.md"
IMAGE_SIZE = 224
LABELS = [str(d) for d in range(10)]
PRECISIONS = ("fp32", "bf16", "int8")
AGREEMENT_TARGET = 0.995


def fit_head(module, images: list[tuple[str, bytes]]) -> float:
    """Fit the classifier head on frozen features of `images`; returns training accuracy."""
    import numpy as np
    import torch
    from sklearn.linear_model import LogisticRegression

    from pipeline.data import EvalPreset, to_model_input

    preset = EvalPreset(IMAGE_SIZE)
    fc = module.net.fc
    module.net.fc = torch.nn.Identity()
    feats = []
    with torch.inference_mode():
        for i in range(0, len(images), 64):
            batch = torch.stack([preset.from_bytes(b) for _, b in images[i : i + 64]])
            feats.append(module(to_model_input(batch)).numpy())
    module.net.fc = fc
    x = np.concatenate(feats)
    y = np.array([int(label) for label, _ in images])
    mean, std = x.mean(0), x.std(0) + 1e-6
    clf = LogisticRegression(max_iter=2000, C=0.5).fit((x - mean) / std, y)
    # Fold the standardisation into the linear layer: W (x - m) / s + b.
    w = clf.coef_ / std
    b = clf.intercept_ - (w * mean).sum(1)
    with torch.no_grad():
        fc.weight.copy_(torch.from_numpy(w).float())
        fc.bias.copy_(torch.from_numpy(b).float())
    return float(clf.score((x - mean) / std, y))


def model_alone(
    module, tensors, n: int, batch_size: int, precision: str, cpu: dict | None = None
) -> float:
    """Images/s of `predict` on in-memory float tensors, `n` images in batches (after a warm-up).

    With `cpu`, its `precision` entry gets the process's CPU ms per image.
    """
    from pipeline.model import predict

    batch = tensors[:batch_size]
    predict(module, batch, LABELS, precision=precision)
    done = 0
    t, c = time.perf_counter(), time.process_time()
    while done < n:
        size = min(batch_size, n - done)
        predict(module, batch[:size], LABELS, precision=precision)
        done += size
    if cpu is not None:
        cpu[precision] = 1000 * (time.process_time() - c) / n
    return n / (time.perf_counter() - t)


def naive(db: Database, store: ObjectStore, module, records, *, model_name: str, version: str):
    """One image at a time: GET, Pillow decode + resize, forward (batch 1), INSERT + COMMIT."""
    import numpy as np
    import torch
    from PIL import Image

    conn = db.connect()
    t = time.perf_counter()
    try:
        with conn.cursor() as cur:
            for r in records:
                data = store.get_bytes(r.object_key)
                with Image.open(io.BytesIO(data)) as im:
                    rgb = im.convert("RGB")
                scale = IMAGE_SIZE / min(rgb.size)
                rgb = rgb.resize(
                    (round(rgb.width * scale), round(rgb.height * scale)), Image.Resampling.BILINEAR
                )
                left, top = (rgb.width - IMAGE_SIZE) // 2, (rgb.height - IMAGE_SIZE) // 2
                rgb = rgb.crop((left, top, left + IMAGE_SIZE, top + IMAGE_SIZE))
                x = torch.from_numpy(np.asarray(rgb).copy()).permute(2, 0, 1)[None].float() / 255
                with torch.inference_mode():
                    probs = torch.softmax(module(x), 1)[0]
                conf, idx = probs.max(0)
                label = LABELS[int(idx)]
                cur.execute(
                    "INSERT INTO predictions (image_id, etag, model_name, model_version,"
                    " predicted_label, confidence, top_k, true_label, correct, subset,"
                    " mlflow_run_id, scored_at)"
                    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, UTC_TIMESTAMP(6))"
                    " ON DUPLICATE KEY UPDATE predicted_label = VALUES(predicted_label),"
                    " confidence = VALUES(confidence), scored_at = VALUES(scored_at)",
                    (
                        r.image_id,
                        r.etag,
                        model_name,
                        int(version) + 1000,  # its own rows, apart from the pipeline's
                        label,
                        float(conf),
                        json.dumps([{"label": label, "prob": float(conf)}]),
                        r.label,
                        int(label == r.label),
                        r.subset,
                        "naive",
                    ),
                )
                conn.commit()
    finally:
        conn.close()
    return len(records) / (time.perf_counter() - t)


def onnxruntime_version() -> str:
    try:
        import onnxruntime
    except ImportError:
        return "not installed"
    return onnxruntime.__version__


def bf16_note(ratios: list[float]) -> str:
    """What the measured bf16/fp32 speed ratio says, in words."""
    native = "avx512_bf16" in cpu_flags() or "amx_bf16" in cpu_flags()
    cpu = "this CPU has native bf16" if native else "this CPU has no native bf16 (emulated)"
    mean = statistics.mean(ratios)
    if mean >= 1.1:
        return f"{cpu}: bf16 is {mean:.2f}x as fast as fp32 here"
    if mean <= 0.9:
        return f"{cpu}: bf16 is {1 / mean:.1f}x slower than fp32 here; use it on GPUs only"
    return f"{cpu}: bf16 and fp32 run at about the same speed here"


def trained_agreement(db: Database, store: ObjectStore, tmp: Path, args, model_name: str) -> dict:
    """Train ResNet18 on the digits with `pipeline.train`; fp32/bf16/int8 labels on every image."""
    import torch

    from pipeline import registry, train
    from pipeline.data import EvalPreset, ImageCache, to_model_input
    from pipeline.demo_data import render_digits
    from pipeline.model import predict
    from pipeline.onnx_runtime import int8_model
    from pipeline.train_plan import TrainParams
    from pipeline.upload import upload_tree

    render_digits(tmp / "digits", size=args.digits_size, inbox=0)
    upload_tree(store, tmp / "digits", "digits")
    dataset_version = catalog.scan(db, store, "digits")["dataset_version"]
    params = TrainParams(epochs=args.digits_epochs, image_size=args.digits_size, num_workers=0)
    t = time.monotonic()
    result = train.train_model(
        db,
        store,
        dataset_version,
        params,
        model_name=model_name,
        run_key=f"{model_name}-run",
        cache_dir=tmp,
        checkpoint_store=train.LocalCheckpointStore(tmp / "ckpt"),  # never the image bucket
        experiment=model_name,
    )
    train_s = time.monotonic() - t
    loaded = registry.load_model(model_name, result["model_version"], cache_dir=tmp)
    records = catalog.dataset_images(db, dataset_version, ["train", "val", "test"])
    cache = ImageCache(tmp)
    cache.fill(store, records)
    preset = EvalPreset(loaded.image_size)
    x = torch.stack([preset.from_bytes(cache.get(store, r)) for r in records])
    t = time.monotonic()
    int8 = int8_model(loaded, db, store, cache_dir=tmp)
    quantize_s = time.monotonic() - t
    labels: dict[str, list[str]] = {}
    for precision, net in (("fp32", loaded.module), ("bf16", loaded.module), ("int8", int8)):
        labels[precision] = [
            p.label
            for i in range(0, len(x), 256)
            for p in predict(
                net, to_model_input(x[i : i + 256]), loaded.labels, precision=precision
            )
        ]
    truth = [r.label for r in records]
    test = [i for i, r in enumerate(records) if r.subset == "test"]
    return {
        "n": len(records),
        "n_test": len(test),
        "train_s": train_s,
        "quantize_s": quantize_s,
        "accuracy": {
            p: sum(a == b for a, b in zip(v, truth, strict=True)) / len(truth)
            for p, v in labels.items()
        },
        "test_accuracy": {
            p: sum(v[i] == truth[i] for i in test) / max(len(test), 1) for p, v in labels.items()
        },
        "agreement": {
            p: sum(a == b for a, b in zip(labels[p], labels["fp32"], strict=True))
            for p in ("bf16", "int8")
        },
    }


def trained_lines(t: dict, args) -> list[str]:
    n = t["n"]
    int8_ok = t["agreement"]["int8"] / n >= AGREEMENT_TARGET
    return (
        [
            "",
            "## Agreement with fp32 on a trained model",
            "",
            f"ResNet18 (random init) trained by `pipeline.train` ({args.digits_epochs} epochs,"
            f" {args.digits_size} px, default augmentation; {t['train_s']:.0f}s) on scikit-learn's"
            f" digits rendered by `pipeline.demo_data`; top-1 labels on all {n} train/val/test"
            f" images (int8 quantized in {t['quantize_s']:.0f}s, calibrated on 256 of its train/val"
            " images).",
            "",
            "| precision | agreement with fp32 | accuracy (all) | test accuracy |",
            "|---|---:|---:|---:|",
        ]
        + [
            f"| {p} | "
            + (f"{t['agreement'][p]}/{n} ({t['agreement'][p] / n:.2%})" if p != "fp32" else "—")
            + f" | {t['accuracy'][p]:.4f} | {t['test_accuracy'][p]:.4f} |"
            for p in PRECISIONS
        ]
        + [
            "",
            f"int8 agreement {'meets' if int8_ok else 'is below'} the {AGREEMENT_TARGET:.1%} bar."
            " fp32 stays the default precision; bf16 and int8 are opt-in"
            " (`--precision`, DAG param `precision`).",
        ]
    )


def fresh_cache(root: Path, models: Path, name: str) -> Path:
    """An empty image cache that shares the downloaded model (so only images are fetched)."""
    path = root / name
    path.mkdir()
    (path / "models").symlink_to(models, target_is_directory=True)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512, help="JPEGs scored in (a), (b) fp32")
    parser.add_argument("--bf16-images", type=int, default=128, help="images in the bf16 runs")
    parser.add_argument("--naive-images", type=int, default=256, help="images in (c)")
    parser.add_argument("--train-images", type=int, default=300, help="to fit the head")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=4, help="fetch/decode threads")
    parser.add_argument("--repeats", type=int, default=3, help="fp32 (a)/(b) runs (median)")
    parser.add_argument("--speed-rounds", type=int, default=2, help="times all speed rows run")
    parser.add_argument("--digits-epochs", type=int, default=3, help="0: skip the trained model")
    parser.add_argument("--digits-size", type=int, default=64)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    import mlflow
    import torch
    from mlflow import MlflowClient

    from pipeline import registry, train
    from pipeline.data import EvalPreset, to_model_input
    from pipeline.model import build_model
    from pipeline.onnx_runtime import Calibration, int8_model

    settings = load_settings()
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    suffix = uuid.uuid4().hex[:8]
    db_name = f"{settings.mysql.database}_test_bench_{suffix}"
    db = create_database(settings.mysql, db_name)
    store = ObjectStore(settings.s3, f"bench-{suffix}", max_pool_connections=64)
    store.ensure_bucket()
    model_name, experiment = f"bench-score-{suffix}", f"bench-score-{suffix}"
    prefix = "bench"
    tmp = Path(tempfile.mkdtemp(prefix="bench_score_"))
    try:
        migrate(db)
        t = time.monotonic()
        train_images = make_jpegs(args.train_images, seed=1)
        test_images = make_jpegs(args.images, seed=2)
        make_s = time.monotonic() - t
        mean_kb = sum(len(b) for _, b in test_images) / len(test_images) / 1024

        def put(item: tuple[str, int, tuple[str, bytes]]) -> None:
            split, i, (label, data) = item
            store.put_bytes(f"{prefix}/{split}/{label}/img_{i:05d}.jpg", data)

        items = [("train", i, x) for i, x in enumerate(train_images)]
        items += [("test", i, x) for i, x in enumerate(test_images)]
        with ThreadPoolExecutor(32) as pool:
            list(pool.map(put, items))
        scanned = catalog.scan(db, store, prefix, val_percent=0)
        dataset_version = scanned["dataset_version"]
        label_map = catalog.get_dataset(db, dataset_version)["label_map"]
        assert sorted(label_map) == LABELS, label_map

        torch.manual_seed(0)
        module = build_model(len(LABELS)).eval()
        t = time.monotonic()
        train_acc = fit_head(module, train_images)
        fit_s = time.monotonic() - t
        mlflow.set_experiment(experiment)
        with mlflow.start_run():
            version = train.log_and_register(
                module,
                model_name=model_name,
                label_map=label_map,
                image_size=IMAGE_SIZE,
                dataset_version=dataset_version,
                run_key=f"bench-{suffix}",
            )
        models = tmp / "models"
        models.mkdir()
        loaded = registry.load_model(model_name, version, cache_dir=tmp)  # fills tmp/models
        net = loaded.module
        threads = torch.get_num_threads()

        # (a) the model alone, on real preprocessed images held in memory.
        preset = EvalPreset(IMAGE_SIZE)
        first = torch.stack([preset.from_bytes(b) for _, b in test_images[: args.batch_size]])
        tensors = to_model_input(first).contiguous(memory_format=torch.channels_last)
        t = time.monotonic()
        int8_net = int8_model(loaded, db, store, cache_dir=tmp)  # fills tmp/models/*/onnx
        quantize_s = time.monotonic() - t
        nets = {"fp32": net, "bf16": net, "int8": int8_net}
        counts = {"fp32": args.images, "bf16": args.bf16_images, "int8": args.images}
        a_single = model_alone(net, tensors, 64, 1, "fp32")  # batch 1: what (c) can reach at best

        # (b) end to end, S3 -> MySQL, fresh image cache each time.
        common = {
            "model_name": model_name,
            "model_version": version,
            "prefix": prefix,
            "dataset_version": dataset_version,
            "subsets": ("test",),
            "batch_size": args.batch_size,
            "workers": args.workers,
        }
        bf16_shards = max(1, round(args.images / args.bf16_images))
        labels_by: dict[str, dict[int, str]] = {}

        old_client = Boto3Store(settings.s3, store.bucket, max_pool_connections=64)

        def run_b(precision: str, name: str, on: ObjectStore = store) -> tuple[dict, float]:
            shards = bf16_shards if precision == "bf16" else 1
            t, meter = time.monotonic(), CpuMeter()
            summary = score.score_shard(
                db,
                on,
                shard=0,
                shards=shards,
                force=True,
                precision=precision,
                cache_dir=fresh_cache(tmp, models, name),
                **common,
            )
            wall = time.monotonic() - t
            assert summary["scored"] == counts[precision] or precision == "bf16", summary
            summary["cpu_ms"] = meter.per_item(summary["scored"])
            if on is old_client:
                return summary, wall
            labels_by[precision] = {
                r["image_id"]: r["predicted_label"]
                for r in db.query(
                    "SELECT image_id, predicted_label FROM predictions WHERE model_name = %s"
                    " AND model_version = %s AND image_id %% %s = 0",
                    (model_name, int(version), shards),
                )
            }
            return summary, wall

        # Every speed row runs `--speed-rounds` times (the machine may be shared: rounds that
        # differ a lot mean contention); fp32 (a) and (b) alternate `--repeats` times per round
        # and each round reports their median.
        rounds = []
        loads = [os.getloadavg()[0]]
        a_cpu: dict[str, float] = {}  # CPU ms per image of (a), last run
        for k in range(args.speed_rounds):
            a, b, walls, summaries = {}, {}, {}, {}
            a_runs, b_runs = [], []
            for i in range(args.repeats):
                a_runs.append(
                    model_alone(net, tensors, args.images, args.batch_size, "fp32", a_cpu)
                )
                summaries["fp32"], walls["fp32"] = run_b("fp32", f"b32-{k}-{i}")
                b_runs.append(summaries["fp32"]["images_per_s"])
                log.info(
                    "round %d repeat %d: (a) %.1f, (b) %.1f img/s", k, i, a_runs[-1], b_runs[-1]
                )
            a["fp32"], b["fp32"] = statistics.median(a_runs), statistics.median(b_runs)
            fp32_rows = {
                r["image_id"]: r
                for r in db.query(
                    "SELECT image_id, predicted_label, correct FROM predictions"
                    " WHERE model_name = %s AND model_version = %s",
                    (model_name, int(version)),
                )
            }
            for precision in ("bf16", "int8"):
                a[precision] = model_alone(
                    nets[precision], tensors, counts[precision], args.batch_size, precision, a_cpu
                )
                summaries[precision], walls[precision] = run_b(precision, f"b-{precision}-{k}")
                b[precision] = summaries[precision]["images_per_s"]
            # The old client (boto3 GETs), same images and settings, right after the new one.
            for precision in ("fp32", "int8"):
                old, _ = run_b(precision, f"b-old-{precision}-{k}", on=old_client)
                b[f"{precision}_old"] = old["images_per_s"]
                summaries[f"{precision}_old"] = old
            loads.append(os.getloadavg()[0])
            # Not (b): the same int8 rescore with the images already in this worker's content
            # cache (a new version rescoring the test set on the same machine): no S3 GETs.
            warm = score.score_shard(
                db,
                store,
                shard=0,
                shards=1,
                force=True,
                precision="int8",
                cache_dir=tmp / f"b-int8-{k}",
                **common,
            )
            b["int8_warm"] = warm["images_per_s"]
            # (c) naive, one image at a time.
            records = catalog.dataset_images(db, dataset_version, ["test"])[: args.naive_images]
            net_fp32 = net.to(memory_format=torch.contiguous_format)
            c = naive(db, store, net_fp32, records, model_name=model_name, version=version)
            net.to(memory_format=torch.channels_last)
            rounds.append(
                {
                    "a": a,
                    "b": b,
                    "c": c,
                    "a_runs": a_runs,
                    "b_runs": b_runs,
                    "walls": walls,
                    "summaries": summaries,
                }
            )
            log.info("round %d: a %s, b %s, c %.1f img/s", k, a, b, c)
        test_acc = sum(r["correct"] for r in fp32_rows.values()) / len(fp32_rows)
        agree_bench = {
            p: (
                sum(labels_by["fp32"][i] == lb for i, lb in labels_by[p].items()),
                len(labels_by[p]),
            )
            for p in ("bf16", "int8")
        }
        trained = (
            trained_agreement(db, store, tmp, args, f"bench-digits-{suffix}")
            if args.digits_epochs
            else None
        )

        env = {
            k: os.environ.get(k, "(unset)") for k in ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")
        }
        n_rounds = len(rounds)
        head = " | ".join(f"round {k + 1} img/s" for k in range(n_rounds))
        rows = []
        for p in PRECISIONS:
            rows.append(
                (f"(a) model alone, in-memory tensors, {p}", counts[p], [r["a"][p] for r in rounds])
            )
        for p in PRECISIONS:
            n = rounds[-1]["summaries"][p]["scored"]
            rows.append((f"(b) end to end S3 → MySQL, {p}", n, [r["b"][p] for r in rounds]))
        for p in ("fp32", "int8"):
            rows.append(
                (
                    f"(b) end to end S3 → MySQL, {p}, old client (boto3 GETs)",
                    rounds[-1]["summaries"][p]["scored"],
                    [r["b"][f"{p}_old"] for r in rounds],
                )
            )
        rows.append(
            (
                "(not b) int8, images already in the local cache: no S3 GET",
                rounds[-1]["summaries"]["int8"]["scored"],
                [r["b"]["int8_warm"] for r in rounds],
            )
        )
        rows.append(
            (
                "(c) naive: GET, decode, forward batch 1, INSERT+COMMIT (fp32)",
                len(records),
                [r["c"] for r in rounds],
            )
        )

        def per_round(f) -> str:
            return " / ".join(f"{f(r):.2f}" for r in rounds)

        last = rounds[-1]
        b32 = last["summaries"]["fp32"]
        a_bf16_x = [r["a"]["bf16"] / r["a"]["fp32"] for r in rounds]
        lines = [
            "# Scoring benchmark",
            "",
            f"`bench/bench_score.py --images {args.images} --bf16-images {args.bf16_images}"
            f" --naive-images {args.naive_images} --repeats {args.repeats} --speed-rounds"
            f" {args.speed_rounds} --digits-epochs {args.digits_epochs}` on {platform.node()}"
            f" ({os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, no GPU;"
            f" CPU flags: {cpu_flags()}; torch {torch.__version__}, {threads} intra-op threads;"
            f" onnxruntime {onnxruntime_version()}), SeaweedFS S3 + MariaDB on localhost; the"
            f" machine shared with other work: load average {min(loads):.1f}-{max(loads):.1f}"
            " (1 min) over the rounds.",
            f"ResNet18 at {IMAGE_SIZE} px, batch {args.batch_size}, {args.workers} fetch/decode"
            f" threads; {args.images} real JPEGs of {WIDTH}x{HEIGHT} (mean {mean_kb:.0f} KiB;"
            f" made in {make_s:.1f}s). Env: " + ", ".join(f"{k}={v}" for k, v in env.items()) + ".",
            "",
            f"| run | images | {head} |",
            "|---|---:|" + "---:|" * n_rounds,
        ]
        lines += [
            f"| {name} | {n} | " + " | ".join(f"{x:.1f}" for x in xs) + " |" for name, n, xs in rows
        ]
        lines += [
            "",
            "Ratios per round (round 1 / round 2 ...):",
            "",
            f"- b/a: fp32 **{per_round(lambda r: r['b']['fp32'] / r['a']['fp32'])}**"
            " (target ≥ 0.85);"
            f" bf16 {per_round(lambda r: r['b']['bf16'] / r['a']['bf16'])};"
            f" int8 **{per_round(lambda r: r['b']['int8'] / r['a']['int8'])}** (target ≥ 0.75)",
            "- b/a with the old client (boto3 GETs), same rounds:"
            f" fp32 {per_round(lambda r: r['b']['fp32_old'] / r['a']['fp32'])};"
            f" int8 {per_round(lambda r: r['b']['int8_old'] / r['a']['int8'])}",
            f"- b/c: fp32 **{per_round(lambda r: r['b']['fp32'] / r['c'])}**;"
            f" bf16 **{per_round(lambda r: r['b']['bf16'] / r['c'])}**;"
            f" int8 **{per_round(lambda r: r['b']['int8'] / r['c'])}** (target ≥ 5; (c) is the"
            " fp32 naive loop). (b) cannot beat (a), so b/c ≤ a/c:"
            f" fp32 {per_round(lambda r: r['a']['fp32'] / r['c'])},"
            f" int8 {per_round(lambda r: r['a']['int8'] / r['c'])}. On 2 CPU cores everything is"
            f" bound by the forward pass; (c) reaches {last['c']:.1f} of the {a_single:.1f} img/s"
            f" the fp32 model alone manages at batch 1: GET, decode and per-row commits take"
            f" {100 * (1 - last['c'] / a_single):.0f}% of its time.",
            "- CPU ms per image in the last round (process CPU over all threads, so it is"
            " nearly independent of what else runs; the local S3 and MySQL servers share the 2"
            " cores here, as they would not in a real deployment): model alone "
            + ", ".join(f"{p} {a_cpu[p]:.1f}" for p in ("fp32", "int8"))
            + "; (b) "
            + "; ".join(
                f"{p} {'old client' if p.endswith('_old') else 'MinIO SDK'}: "
                + ", ".join(f"{k} {v:.1f}" for k, v in last["summaries"][p]["cpu_ms"].items())
                for p in ("fp32", "fp32_old", "int8", "int8_old")
            )
            + ". (b) minus (a) on this process is the per-image cost of GET, decode,"
            " preprocessing and bookkeeping. (a)/(b) of this process's CPU, the b/a to expect"
            " where scoring is CPU-bound and has the cores to itself (the S3 and MySQL servers"
            " elsewhere): "
            + ", ".join(
                f"{p} **{a_cpu[p] / last['summaries'][p]['cpu_ms']['this process']:.2f}**"
                f" (old client {a_cpu[p] / last['summaries'][p + '_old']['cpu_ms']['this process']:.2f})"
                for p in ("fp32", "int8")
            )
            + ". The servers' columns also count other work on this shared machine.",
            f"- bf16 vs fp32, model alone: {' / '.join(f'{x:.2f}' for x in a_bf16_x)}x the fp32"
            f" rate ({bf16_note(a_bf16_x)}).",
            f"- int8 (ONNX Runtime, static QDQ, per-channel, percentile calibration on"
            f" {min(Calibration().images, args.train_images)} train images): quantized once in {quantize_s:.0f}s"
            " (export + calibration, then cached next to the MLflow model).",
            f"- fp32 (a)/(b) runs of the last round, img/s: (a)"
            f" {', '.join(f'{x:.1f}' for x in last['a_runs'])};"
            f" (b) {', '.join(f'{x:.1f}' for x in last['b_runs'])}. Last fp32 (b) run,"
            f" main-thread seconds: {b32['stage_seconds']} (`wait_input`: waiting for S3 GET +"
            " decode, mostly the first batch; everything after it overlaps with inference);"
            f" int8: {last['summaries']['int8']['stage_seconds']}.",
            "- (b) wall time including the query, model load from the local cache and summary: "
            + ", ".join(
                f"{p} {last['walls'][p]:.1f}s"
                f" ({last['summaries'][p]['scored'] / last['walls'][p]:.1f} img/s)"
                for p in PRECISIONS
            )
            + ".",
            f"- top-1 agreement with fp32 on this benchmark's model (frozen random backbone +"
            f" head fitted on {args.train_images} other images in {fit_s:.0f}s, train accuracy"
            f" {train_acc:.2f}; fp32 test accuracy {test_acc:.2f}: weak, not confident): "
            + ", ".join(f"{p} {n}/{d} ({n / max(d, 1):.1%})" for p, (n, d) in agree_bench.items())
            + ".",
        ]
        if trained is not None:
            lines += trained_lines(trained, args)
        lines.append("")
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text("\n".join(lines), encoding="utf-8")
        print("\n".join(lines))
    finally:
        log.info("cleaning up bucket %s, database %s, model %s", store.bucket, db_name, model_name)
        store.delete_bucket()
        drop_database(settings.mysql, db_name)
        client = MlflowClient()
        for name in (model_name, f"bench-digits-{suffix}"):
            try:
                client.delete_registered_model(name)
            except Exception:  # noqa: BLE001 - registration may not have happened
                pass
            exp = client.get_experiment_by_name(name)
            if exp is not None:
                client.delete_experiment(exp.experiment_id)
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
