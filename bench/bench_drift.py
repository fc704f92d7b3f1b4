"""Benchmark: what the drift check adds to a scoring run.

Run by hand (a throwaway database, removed afterwards):
    .venv/bin/python scripts/stack.py run -- .venv/bin/python bench/bench_drift.py --images 512
Writes bench/results/drift.md.

Both arms score the same photo-like JPEGs (`bench/images.py`, 500x375, at 224 px) with ResNet18
through `inference.predict_stream` and write every batch into MySQL as `score_shard` does
(`score._write_batch`, one transaction per batch); images come from memory, not S3, so the
drift share is measured against the cheapest scoring run (a real one also waits for S3).

- scoring: predictions only;
- scoring + drift: the same forward pass also yields each batch's penultimate-layer embeddings
  (hook on `net.fc`), projected to 32 dims on the device, upserted into `drift_embeddings` in
  the batch's transaction; then `drift.compare` (three permutation tests, 1000 permutations) of
  the window against a reference of `--reference` val images.

The arms alternate for `--rounds` rounds; the median of each is reported.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.images import cpu_flags, make_jpegs  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "drift.md"


def score_run(db, module, images, records, *, reference, device, batch_size: int) -> dict:
    """One scoring run (with drift when `reference`); seconds per part."""
    from pipeline import drift, score
    from pipeline.data import EvalPreset
    from pipeline.db import utc_now
    from pipeline.inference import predict_stream

    run_id = f"bench-{uuid.uuid4().hex[:8]}"
    labels = [str(i) for i in range(10)]
    started = time.perf_counter()
    for scored in predict_stream(
        module,
        records,
        lambda r: images[r.image_id],
        labels=labels,
        preset=EvalPreset(224),
        device=device,
        precision="fp32",
        batch_size=batch_size,
        workers=4,
        embed=reference.projector(device) if reference is not None else None,
    ):
        rows = score.prediction_rows(
            scored.predictions,
            model_name="bench",
            model_version=1 if reference is None else 2,
            dataset_version=None,
            mlflow_run_id="bench",
            run_key=run_id,
            scored_at=utc_now(),
        )
        embedded = []
        if scored.embeddings is not None:
            embedded = drift.embedding_rows(
                [r for r, _ in scored.predictions],
                scored.embeddings,
                model_name="bench",
                model_version=2,
                run_key=run_id,
                created_at=utc_now(),
            )
        score._write_batch(db, rows, embedded)  # noqa: SLF001 - the shard's own write
    scoring = time.perf_counter() - started
    check = 0.0
    if reference is not None:
        t0 = time.perf_counter()
        rows = drift.window_of(
            db,
            model_name="bench",
            model_version=2,
            run_key=run_id,
            subset="inbox",
            labels=reference.labels,
        )
        verdict = drift.compare(reference, *rows, drift.Thresholds())
        check = time.perf_counter() - t0
        assert verdict["status"] == drift.CHECKED, verdict
    with db.transaction() as cur:
        cur.execute("DELETE FROM predictions")
        cur.execute("DELETE FROM drift_embeddings")
    return {"scoring": scoring, "check": check, "total": scoring + check}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--reference", type=int, default=500, help="val images in the reference")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()

    import torch

    from pipeline import drift
    from pipeline.config import load_settings
    from pipeline.data import EvalPreset
    from pipeline.db import create_database, drop_database, migrate
    from pipeline.model import build_model, pick_device
    from pipeline.records import ImageRecord

    settings = load_settings()
    device = pick_device()
    torch.manual_seed(0)
    module = build_model(10).to(device).eval().to(memory_format=torch.channels_last)
    jpegs = make_jpegs(args.images + args.reference, seed=0)
    images = {i: data for i, (_, data) in enumerate(jpegs)}
    records = [ImageRecord(i, "b", f"k{i}", "e", "inbox", None) for i in range(args.images)]
    # The reference as training builds it: a val pass over other images of the same kind.
    preset = EvalPreset(224)
    val = [
        (torch.stack([preset.from_bytes(images[i]) for i in batch]), torch.zeros(len(batch)), None)
        for batch in _chunks(range(args.images, args.images + args.reference), 64)
    ]
    t0 = time.perf_counter()
    reference = drift.build_reference(
        module, val, device, labels=[str(i) for i in range(10)], seed=0
    )
    reference_s = time.perf_counter() - t0

    name = f"{settings.mysql.database}_test_bench_drift_{uuid.uuid4().hex[:8]}"
    db = create_database(settings.mysql, name)
    try:
        migrate(db)
        score_run(
            db,
            module,
            images,
            records[:64],
            reference=reference,
            device=device,
            batch_size=args.batch_size,
        )  # warm-up
        plain, with_drift = [], []
        for _ in range(args.rounds):
            plain.append(
                score_run(
                    db,
                    module,
                    images,
                    records,
                    reference=None,
                    device=device,
                    batch_size=args.batch_size,
                )
            )
            with_drift.append(
                score_run(
                    db,
                    module,
                    images,
                    records,
                    reference=reference,
                    device=device,
                    batch_size=args.batch_size,
                )
            )
    finally:
        drop_database(settings.mysql, name)

    def median(runs, key):
        return statistics.median(r[key] for r in runs)

    base = median(plain, "total")
    scoring = median(with_drift, "scoring")
    check = median(with_drift, "check")
    total = median(with_drift, "total")
    lines = [
        "# Drift check cost",
        "",
        f"`bench/bench_drift.py --images {args.images} --reference {args.reference}"
        f" --rounds {args.rounds}` on {platform.machine()}, {device.type}"
        f" ({torch.get_num_threads()} threads); CPU flags: {cpu_flags()}; torch"
        f" {torch.__version__}. Photo-like JPEGs 500x375 scored at 224 px, fp32, batch"
        f" {args.batch_size}, predictions written to MySQL per batch; medians of"
        f" {args.rounds} alternating rounds.",
        "",
        "| run | scoring s | drift check s | total s | vs scoring only |",
        "|---|---|---|---|---|",
        f"| scoring only | {base:.2f} | - | {base:.2f} | 1.000 |",
        f"| scoring + drift | {scoring:.2f} | {check:.2f} | {total:.2f} | {total / base:.3f} |",
        "",
        f"Drift adds {100 * (total / base - 1):+.1f} % to this scoring run: {scoring - base:+.2f} s"
        f" in the shards (hook, 512→{reference.dims} projection, {reference.dims * 4} bytes per"
        f" image upserted with its prediction) and {check:.2f} s for the check ({args.images}"
        f" images vs {reference.meta['n_reference']} reference images, 1000 permutations)."
        f" Building the reference at training took {reference_s:.2f} s for {args.reference}"
        " val images (one extra val pass).",
        "",
        "Runs: "
        + "; ".join(
            f"{p['total']:.2f} / {d['scoring']:.2f}+{d['check']:.2f}"
            for p, d in zip(plain, with_drift, strict=True)
        )
        + " (scoring only / scoring + check).",
        "",
    ]
    RESULTS.write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


def _chunks(items, n: int):
    items = list(items)
    return [items[i : i + n] for i in range(0, len(items), n)]


if __name__ == "__main__":
    sys.exit(main())
