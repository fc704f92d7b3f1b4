"""Benchmark inputs: real JPEGs where the label is not trivially easy, and the machine's CPU flags.

Each image is a random 500x375 crop of one of scikit-learn's two sample photos (china.jpg,
flower.jpg), rescaled and brightness-jittered, with a large scikit-learn digit painted near the
middle; the digit is the label. Needs numpy, Pillow and scikit-learn (no download).
"""

from __future__ import annotations

import io
from pathlib import Path

WIDTH, HEIGHT = 500, 375


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


def cpu_flags() -> str:
    """The CPU features that decide bf16/int8 speed, as /proc/cpuinfo lists them."""
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return "unknown"
    flags = set(next((ln for ln in text.splitlines() if ln.startswith("flags")), "").split())
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
    return ", ".join(f for f in wanted if f in flags) or "none of " + ", ".join(wanted)


def make_class_jpegs(n: int, seed: int, labels: tuple[str, ...]) -> list[tuple[str, bytes]]:
    """`n` (label, JPEG bytes) of 500x375, balanced over `labels` (digits), harder than `make_jpegs`.

    Photo crop as in `make_jpegs`; the digit has any colour (it may match the background) and
    wanders further from the middle, so a ResNet18 trained from scratch on a few hundred of them
    at 64 px stays well below 100 % (about 65-70 % for 3 vs 8): differences between recipes show.
    """
    import numpy as np
    from PIL import Image, ImageEnhance
    from sklearn.datasets import load_digits, load_sample_images

    rng = np.random.default_rng(seed)
    photos = [Image.fromarray(p) for p in load_sample_images().images]
    digits = load_digits()
    pools = {label: np.flatnonzero(digits.target == int(label)) for label in labels}
    out = []
    for i in range(n):
        label = labels[i % len(labels)]
        photo = photos[int(rng.integers(len(photos)))]
        w = int(rng.integers(240, photo.width))
        h = min(photo.height, int(w * HEIGHT / WIDTH))
        x, y = int(rng.integers(0, photo.width - w + 1)), int(rng.integers(0, photo.height - h + 1))
        img = photo.crop((x, y, x + w, y + h)).resize((WIDTH, HEIGHT), Image.Resampling.BILINEAR)
        img = ImageEnhance.Brightness(img).enhance(float(rng.uniform(0.6, 1.3)))
        index = int(rng.choice(pools[label]))
        glyph = (digits.images[index] * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
        side = int(rng.integers(220, 320))
        mask = Image.fromarray(glyph).resize((side, side), Image.Resampling.BICUBIC)
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        ox = (WIDTH - side) // 2 + int(rng.integers(-60, 61))
        oy = (HEIGHT - side) // 2 + int(rng.integers(-40, 41))
        img.paste(Image.new("RGB", (side, side), colour), (ox, oy), mask)
        buf = io.BytesIO()
        img.save(buf, format="JPEG", quality=90)
        out.append((label, buf.getvalue()))
    return out
