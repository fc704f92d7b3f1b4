"""Demo dataset: scikit-learn's handwritten digits (shipped with the package) as image files."""

from __future__ import annotations

import argparse
import hashlib
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
FORMATS = {"png": ("PNG", ".png"), "jpeg": ("JPEG", ".jpg")}


def _rank(tag: str, index: int) -> str:
    return hashlib.sha256(f"{tag}:{index}".encode()).hexdigest()


def render_digits(
    out_dir: str | Path,
    size: int = 64,
    fmt: str = "png",
    inbox: int = 20,
    *,
    test_percent: int = 20,
    per_label: int | None = None,
) -> dict[str, Any]:
    """Write `train/<label>/`, `test/<label>/` and `inbox/` image files; returns counts.

    Deterministic: the same arguments give the same files (and bytes). The test split is
    stratified: within each digit, the `test_percent` with the lowest sha256 rank of their
    index. `inbox` images are taken out of the pool first; `per_label` caps each digit.
    """
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of: {', '.join(FORMATS)}")
    if not 8 <= size <= 1024:
        raise ValueError(f"size must be 8-1024 pixels, got {size}")
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    images, targets = digits.images, digits.target
    pil_format, ext = FORMATS[fmt]
    out = Path(out_dir)
    indices = sorted(range(len(images)), key=lambda i: _rank("inbox", i))
    inbox_ids, pool = indices[:inbox], sorted(indices[inbox:])
    by_label: dict[int, list[int]] = {}
    for i in pool:
        by_label.setdefault(int(targets[i]), []).append(i)

    def write(index: int, path: Path) -> None:
        pixels = (np.asarray(images[index]) * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
        img = Image.fromarray(pixels).resize((size, size), Image.Resampling.BICUBIC)
        path.parent.mkdir(parents=True, exist_ok=True)
        options = {"quality": 95} if pil_format == "JPEG" else {"optimize": False}
        img.convert("RGB").save(path, format=pil_format, **options)

    counts: dict[str, dict[str, int]] = {"train": {}, "test": {}}
    for label_id, ids in sorted(by_label.items()):
        label = DIGIT_NAMES[label_id]
        ranked = sorted(ids, key=lambda i: _rank("test", i))
        if per_label is not None:
            ranked = ranked[:per_label]
        n_test = max(1, round(len(ranked) * test_percent / 100))
        test_ids = set(ranked[:n_test])
        for i in ranked:
            split = "test" if i in test_ids else "train"
            write(i, out / split / label / f"{label}_{i:04d}{ext}")
            counts[split][label] = counts[split].get(label, 0) + 1
    for i in inbox_ids:
        write(i, out / "inbox" / f"digit_{i:04d}{ext}")
    result = {
        "out_dir": str(out),
        "train": sum(counts["train"].values()),
        "test": sum(counts["test"].values()),
        "inbox": len(inbox_ids),
        "labels": [DIGIT_NAMES[k] for k in sorted(by_label)],
        "counts": counts,
    }
    log.info(
        "rendered %d train, %d test, %d inbox digits (%dpx %s) to %s",
        result["train"],
        result["test"],
        result["inbox"],
        size,
        fmt,
        out,
    )
    return result


def add_demo_data_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("out_dir", metavar="OUT_DIR", help="where to write train/, test/, inbox/")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (default 64)")
    parser.add_argument("--format", choices=sorted(FORMATS), default="png")
    parser.add_argument("--inbox", type=int, default=20, help="unlabelled images (default 20)")
    parser.add_argument("--per-label", type=int, default=None, help="cap images per digit")


def cli_demo_data(args: argparse.Namespace, settings: Any) -> int:
    result = render_digits(
        args.out_dir, size=args.size, fmt=args.format, inbox=args.inbox, per_label=args.per_label
    )
    print(
        f"wrote {result['train']} train, {result['test']} test, {result['inbox']} inbox images "
        f"({len(result['labels'])} labels) to {result['out_dir']}"
    )
    return 0
