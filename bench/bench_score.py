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
    cache (so every image is fetched from S3); (c) the naive loop: per image GET, Pillow decode
    and resize, forward with batch 1, INSERT + COMMIT. bf16 runs use `--bf16-images` (one shard).
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
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline import catalog, score  # noqa: E402
from pipeline.config import load_settings  # noqa: E402
from pipeline.db import Database, migrate  # noqa: E402
from pipeline.store import ObjectStore  # noqa: E402

log = logging.getLogger("bench_score")
RESULTS = Path(__file__).resolve().parent / "results" / "score.md"
WIDTH, HEIGHT = 500, 375
IMAGE_SIZE = 224
LABELS = [str(d) for d in range(10)]


def make_jpegs(n: int, seed: int) -> list[tuple[str, bytes]]:
    """`n` distinct (label, JPEG bytes) of 500x375: photo crop + painted digit."""
    import numpy as np
    from PIL import Image, ImageEnhance
    from sklearn.datasets import load_digits, load_sample_images

    rng = np.random.default_rng(seed)
    photos = [Image.fromarray(p) for p in load_sample_images().images]
    digits = load_digits()
    out = []
    for _ in range(n):
        photo = photos[int(rng.integers(len(photos)))]
        w = int(rng.integers(240, photo.width))
        h = min(photo.height, int(w * HEIGHT / WIDTH))
        x, y = int(rng.integers(0, photo.width - w + 1)), int(rng.integers(0, photo.height - h + 1))
        img = photo.crop((x, y, x + w, y + h)).resize((WIDTH, HEIGHT), Image.Resampling.BILINEAR)
        img = ImageEnhance.Brightness(img).enhance(float(rng.uniform(0.6, 1.3)))
        index = int(rng.integers(len(digits.images)))
        glyph = (digits.images[index] * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
        side = int(rng.integers(220, 320))
        mask = Image.fromarray(glyph).resize((side, side), Image.Resampling.BICUBIC)
        colour = tuple(int(c) for c in rng.integers(180, 256, size=3))
        ox = (WIDTH - side) // 2 + int(rng.integers(-40, 41))
        oy = (HEIGHT - side) // 2 + int(rng.integers(-25, 26))
        img.paste(Image.new("RGB", (side, side), colour), (ox, oy), mask)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        out.append((str(int(digits.target[index])), buf.getvalue()))
    return out


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


def model_alone(module, tensors, n: int, batch_size: int, precision: str) -> float:
    """Images/s of `predict` on in-memory float tensors, `n` images in batches (after a warm-up)."""
    from pipeline.model import predict

    batch = tensors[:batch_size]
    predict(module, batch, LABELS, precision=precision)
    done = 0
    t = time.perf_counter()
    while done < n:
        size = min(batch_size, n - done)
        predict(module, batch[:size], LABELS, precision=precision)
        done += size
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
                    "INSERT INTO predictions (image_id, model_name, model_version, predicted_label,"
                    " confidence, top_k, true_label, correct, subset, mlflow_run_id, scored_at)"
                    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, UTC_TIMESTAMP(6))"
                    " ON DUPLICATE KEY UPDATE predicted_label = VALUES(predicted_label),"
                    " confidence = VALUES(confidence), scored_at = VALUES(scored_at)",
                    (
                        r.image_id,
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
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")

    import mlflow
    import torch
    from mlflow import MlflowClient

    from pipeline import registry, train
    from pipeline.data import EvalPreset, to_model_input
    from pipeline.model import build_model

    settings = load_settings()
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    suffix = uuid.uuid4().hex[:8]
    db_name = f"{settings.mysql.database}_test_bench_{suffix}"
    admin = Database(settings.mysql).connect(autocommit=True)
    with admin.cursor() as cur:
        cur.execute(f"CREATE DATABASE `{db_name}` CHARACTER SET utf8mb4 COLLATE utf8mb4_bin")
    db = Database(replace(settings.mysql, database=db_name))
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
        a_bf16 = model_alone(net, tensors, args.bf16_images, args.batch_size, "bf16")
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
        # fp32 (a) and (b) alternate, `--repeats` times each: the machine is shared and noisy,
        # so each figure is the median of its runs.
        a_runs, b_runs = [], []
        for i in range(args.repeats):
            a_runs.append(model_alone(net, tensors, args.images, args.batch_size, "fp32"))
            t = time.monotonic()
            b32 = score.score_shard(
                db,
                store,
                shard=0,
                shards=1,
                force=i > 0,
                cache_dir=fresh_cache(tmp, models, f"b32-{i}"),
                **common,
            )
            b32_wall = time.monotonic() - t
            assert b32["scored"] == args.images, b32
            b_runs.append(b32["images_per_s"])
            log.info("repeat %d: (a) %.1f img/s, (b) %.1f img/s", i, a_runs[-1], b_runs[-1])
        a_fp32, b_fp32 = statistics.median(a_runs), statistics.median(b_runs)
        fp32_rows = {
            r["image_id"]: r
            for r in db.query(
                "SELECT image_id, predicted_label, correct FROM predictions"
                " WHERE model_name = %s AND model_version = %s",
                (model_name, int(version)),
            )
        }
        shards = max(1, round(args.images / args.bf16_images))
        t = time.monotonic()
        b16 = score.score_shard(
            db,
            store,
            shard=0,
            shards=shards,
            force=True,
            precision="bf16",
            cache_dir=fresh_cache(tmp, models, "b16"),
            **common,
        )
        b16_wall = time.monotonic() - t
        bf16_rows = db.query(
            "SELECT image_id, predicted_label FROM predictions WHERE model_name = %s"
            " AND model_version = %s AND image_id %% %s = 0",
            (model_name, int(version), shards),
        )
        agree = sum(
            r["predicted_label"] == fp32_rows[r["image_id"]]["predicted_label"] for r in bf16_rows
        )
        test_acc = sum(r["correct"] for r in fp32_rows.values()) / len(fp32_rows)

        # (c) naive, one image at a time.
        records = catalog.dataset_images(db, dataset_version, ["test"])[: args.naive_images]
        net_fp32 = net.to(memory_format=torch.contiguous_format)
        c_fp32 = naive(db, store, net_fp32, records, model_name=model_name, version=version)

        b_bf16 = b16["images_per_s"]
        env = {
            k: os.environ.get(k, "(unset)") for k in ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_")
        }
        rows = [
            ("(a) model alone, in-memory tensors, fp32", args.images, a_fp32),
            ("(a) model alone, in-memory tensors, bf16", args.bf16_images, a_bf16),
            ("(b) end to end S3 → MySQL, fp32", b32["scored"], b_fp32),
            ("(b) end to end S3 → MySQL, bf16", b16["scored"], b_bf16),
            ("(c) naive: GET, decode, forward batch 1, INSERT+COMMIT (fp32)", len(records), c_fp32),
        ]
        lines = [
            "# Scoring benchmark",
            "",
            f"`bench/bench_score.py --images {args.images} --bf16-images {args.bf16_images}"
            f" --naive-images {args.naive_images}` on {platform.node()} ({os.cpu_count()} CPUs,"
            f" {platform.processor() or platform.machine()}, no GPU; torch {torch.__version__},"
            f" {threads} intra-op threads), SeaweedFS S3 + MariaDB on localhost.",
            f"ResNet18 at {IMAGE_SIZE} px, batch {args.batch_size}, {args.workers} fetch/decode"
            f" threads; {args.images} real JPEGs of {WIDTH}x{HEIGHT} (mean {mean_kb:.0f} KiB;"
            f" made in {make_s:.1f}s). Env: " + ", ".join(f"{k}={v}" for k, v in env.items()) + ".",
            "",
            "| run | images | images/s |",
            "|---|---:|---:|",
        ]
        lines += [f"| {name} | {n} | {rate:.1f} |" for name, n, rate in rows]
        lines += [
            "",
            f"- b/a (fp32): **{b_fp32 / a_fp32:.2f}** (target ≥ 0.8); b/a (bf16):"
            f" {b_bf16 / a_bf16:.2f}",
            f"- b/c (fp32): **{b_fp32 / c_fp32:.2f}** (target ≥ 5). Not reachable on this"
            " machine: (b) cannot beat (a), so b/c ≤ a/c ="
            f" {a_fp32 / c_fp32:.1f} here. Both are bound by the forward pass on 2 CPU cores;"
            f" (c) reaches {c_fp32:.1f} of the {a_single:.1f} img/s the model alone manages at"
            f" batch 1, i.e. it loses only {100 * (1 - c_fp32 / a_single):.0f}% of its time to"
            " GET, decode and per-row commits. The 5x target needs an accelerator, where the"
            " forward pass is cheap and per-image round trips dominate (c).",
            f"- fp32 runs, img/s: (a) {', '.join(f'{x:.1f}' for x in a_runs)};"
            f" (b) {', '.join(f'{x:.1f}' for x in b_runs)}. Last (b) run, main-thread seconds:"
            f" {b32['stage_seconds']} (`wait_input`: waiting for S3 GET + decode, mostly the first"
            " batch; everything after it overlaps with inference). The (b) - (a) gap is"
            f" inference itself running slower ({b32['stage_seconds']['infer']:.1f}s vs"
            f" {args.images / a_fp32:.1f}s for the same images in (a)): the S3 server, MySQL and"
            " the decode threads share the same 2 cores.",
            "- bf16 on this CPU (AVX2, no AVX512-BF16/AMX) is emulated and"
            f" {a_fp32 / a_bf16:.0f}x slower than fp32: use `--precision bf16` on GPUs or CPUs"
            " with native bf16 only.",
            f"- (b) wall time including the query, model load from the local MLflow cache and"
            f" summary: fp32 {b32_wall:.1f}s ({b32['scored'] / b32_wall:.1f} img/s),"
            f" bf16 {b16_wall:.1f}s ({b16['scored'] / b16_wall:.1f} img/s).",
            f"- top-1 agreement bf16 vs fp32 on the same {len(bf16_rows)} images:"
            f" **{agree}/{len(bf16_rows)} ({agree / max(len(bf16_rows), 1):.1%})**.",
            f"- the model: random-init ResNet18 backbone + linear head fitted on"
            f" {args.train_images} other images ({fit_s:.0f}s, train accuracy {train_acc:.2f});"
            f" fp32 test accuracy on the {len(fp32_rows)} scored images {test_acc:.2f}: a weak"
            " but trained classifier, its logits are not near-uniform.",
            "",
        ]
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text("\n".join(lines), encoding="utf-8")
        print("\n".join(lines))
    finally:
        log.info("cleaning up bucket %s, database %s, model %s", store.bucket, db_name, model_name)
        store.delete_bucket()
        with admin.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{db_name}`")
        admin.close()
        client = MlflowClient()
        try:
            client.delete_registered_model(model_name)
        except Exception:  # noqa: BLE001 - registration may not have happened
            pass
        exp = client.get_experiment_by_name(experiment)
        if exp is not None:
            client.delete_experiment(exp.experiment_id)
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
