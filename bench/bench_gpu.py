"""GPU benchmark: the project's training step, file-fed training and scoring against plain reference loops.

Runs on a CUDA machine that has PyTorch and nothing of the stack (no MySQL, S3 or MLflow), in
one short run that prints every figure, so it imports only the torch-side modules of
`pipeline/` (data, model, train's loop, inference) and reads real JPEG files it writes into a
local image cache first:

    python3 bench/bench_gpu.py --out DIR        # DIR/gpu.json, DIR/gpu.md
    python3 bench/bench_gpu.py --smoke          # tiny sizes; also runs on a CPU (checks the code)

Figures (224 px unless said; images/s, median of `--repeats` timed passes after a warm-up):
- training step on in-memory `uint8` batches: `train.train_one_epoch` (the project's step) vs a
  plain loop (uint8 copied, converted on the GPU, bf16 autocast, no per-step sync);
- the file loader alone (`data.make_loader` over `data.ImageDataset` of cached JPEGs) with the
  default workers and GPU-side augmentation, with 2 workers, and with per-image CPU augmentation;
- training fed from those files (`train_one_epoch` + loader + `TrainPreset.on_device`);
- scoring from cached files (`inference.predict_stream`: threads read, nvJPEG decodes, bf16
  forward) vs the reference forward (bf16, a `uint8` batch already on the GPU), plain and
  `torch.compile`d; the same stream with CPU decoding; nvJPEG's batched decode alone;
- checks: GPU preprocessing vs the CPU preset on the same files, odd JPEGs (grayscale, CMYK,
  progressive) and PNG through the GPU path, and top-1 agreement of the bf16 GPU path with the
  fp32 CPU path on a ResNet18 trained here on the photo-digit images.
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
from multiprocessing import get_context
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

log = logging.getLogger("bench_gpu")
LABELS = [str(d) for d in range(10)]


# ----------------------------------------------------------------------------- inputs


def _make_chunk(args: tuple[int, int]) -> list[tuple[str, bytes]]:
    from bench.images import make_jpegs

    n, seed = args
    return make_jpegs(n, seed)


def write_cache(root: Path, n: int, *, processes: int) -> list[tuple[Path, int]]:
    """`n` photo-digit JPEGs written into a project image cache; [(path, label index)]."""
    from pipeline.data import ImageCache
    from pipeline.records import ImageRecord

    chunk = max(1, n // processes)
    jobs = [(min(chunk, n - i), 1000 + i) for i in range(0, n, chunk)]
    with get_context("fork").Pool(processes) as pool:
        images = [item for part in pool.map(_make_chunk, jobs) for item in part]
    cache = ImageCache(root)
    out = []
    for i, (label, data) in enumerate(images):
        record = ImageRecord(
            i, "bench", f"train/{label}/img_{i:05d}.jpg", f"etag{i}", "train", label
        )
        path = cache.path(record)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        out.append((path, int(label)))
    return out


def odd_images() -> dict[str, bytes]:
    """A grayscale, a CMYK and a progressive JPEG, a PNG with alpha: formats users have."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    base = Image.fromarray(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8)).resize((400, 300))
    out = {}
    for name, image, kwargs in (
        ("gray.jpg", base.convert("L"), {"format": "JPEG"}),
        ("cmyk.jpg", base.convert("CMYK"), {"format": "JPEG"}),
        ("progressive.jpg", base, {"format": "JPEG", "progressive": True}),
        ("alpha.png", base.convert("RGBA"), {"format": "PNG"}),
    ):
        buf = io.BytesIO()
        image.save(buf, **kwargs)
        out[name] = buf.getvalue()
    return out


# ----------------------------------------------------------------------------- timing


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rate(fn, n_images: int, repeats: int, device) -> list[float]:
    """Images/s of `fn()` (which processes `n_images`) per timed pass, after one warm-up pass."""
    fn()
    sync(device)
    rates = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        sync(device)
        rates.append(n_images / (time.perf_counter() - t))
    return rates


def med(values: list[float]) -> float:
    return statistics.median(values)


# ----------------------------------------------------------------------------- training


def train_setup(device, *, compile_model: bool = False):
    import torch

    from pipeline.model import build_model, training_autocast
    from pipeline.train import _optimizer
    from pipeline.train_plan import TrainParams

    torch.manual_seed(0)
    model = build_model(10).to(device).to(memory_format=torch.channels_last)
    optimizer = _optimizer(model, TrainParams())
    criterion = torch.nn.CrossEntropyLoss(ignore_index=-1)
    autocast_dtype, scaler = training_autocast(device)
    step_model = torch.compile(model) if compile_model else model
    return model, step_model, optimizer, criterion, autocast_dtype, scaler


def memory_batches(n_batches: int, batch: int, size: int, device):
    """Pinned (when CUDA) uint8 batches of random images, as a loader would hand them over."""
    import torch

    g = torch.Generator().manual_seed(size + batch)
    out = []
    for _ in range(n_batches):
        images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=g)
        targets = torch.randint(0, 10, (batch,), generator=g)
        if device.type == "cuda":
            images, targets = images.pin_memory(), targets.pin_memory()
        out.append((images, targets, torch.arange(batch)))
    return out


def project_step(device, batches, *, transform=None, compile_model: bool = False):
    """`fn` running `train_one_epoch` over in-memory batches."""
    from pipeline.train import train_one_epoch

    _, step_model, optimizer, criterion, autocast_dtype, scaler = train_setup(
        device, compile_model=compile_model
    )

    def fn():
        train_one_epoch(
            step_model,
            criterion,
            optimizer,
            batches,
            device,
            epoch=1,
            epochs=1,
            scaler=scaler,
            autocast_dtype=autocast_dtype,
            transform=transform,
        )

    return fn


def reference_step(device, batches):
    """A plain loop: uint8 copied, converted on the GPU, bf16 autocast, no per-step sync."""
    import torch

    from pipeline.model import build_model

    torch.manual_seed(0)
    model = build_model(10).to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    criterion = torch.nn.CrossEntropyLoss()
    use_bf16 = device.type == "cuda"

    def fn():
        model.train()
        for images, targets, _ in batches:
            x = images.to(device, non_blocking=True).float().div_(255)
            x = x.contiguous(memory_format=torch.channels_last)
            y = targets.to(device, non_blocking=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                loss = criterion(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

    return fn


def loader_rate(
    files, preset, *, batch: int, workers: int | None, n: int, encoded: bool = False
) -> tuple[float, int]:
    """Images/s of one pass of the project's loader over `n` samples (workers already started)."""
    from pipeline.data import ImageDataset, default_num_workers, make_loader

    paths = [files[i % len(files)][0] for i in range(n)]
    targets = [files[i % len(files)][1] for i in range(n)]
    dataset = ImageDataset(paths, targets, preset, encoded=encoded)
    loader = make_loader(dataset, batch_size=batch, shuffle=True, num_workers=workers, seed=0)
    for _ in loader:  # starts the workers and warms the page cache
        pass
    t = time.perf_counter()
    for _ in loader:
        pass
    used = default_num_workers() if workers is None else workers
    return n / (time.perf_counter() - t), used


def file_loader(files, preset, device, *, batch: int, n: int | None = None, gpu_decode: bool):
    """The loader `train.train_model` builds: nvJPEG + `DeviceBatches` on a GPU when asked."""
    from pipeline.data import DeviceBatches, ImageDataset, make_loader

    n = n or len(files)
    paths = [files[i % len(files)][0] for i in range(n)]
    targets = [files[i % len(files)][1] for i in range(n)]
    encoded = gpu_decode and device.type == "cuda"
    dataset = ImageDataset(paths, targets, preset, encoded=encoded)
    loader = make_loader(dataset, batch_size=batch, shuffle=True, num_workers=None, seed=0)
    return DeviceBatches(loader, preset.source_size, device) if encoded else loader


def file_fed_training(
    device, files, *, size: int, batch: int, n: int, repeats: int, gpu_decode: bool
) -> list[float]:
    """`train_one_epoch` fed by the project's loader over cached files, GPU-side augmentation."""
    from pipeline.data import TrainPreset
    from pipeline.train import train_one_epoch

    preset = TrainPreset(size, augment=True, batch_augment=device.type == "cuda")
    _, step_model, optimizer, criterion, autocast_dtype, scaler = train_setup(device)
    loader = file_loader(files, preset, device, batch=batch, n=n, gpu_decode=gpu_decode)
    rates = []
    for _ in range(repeats + 1):
        stats = train_one_epoch(
            step_model,
            criterion,
            optimizer,
            loader,
            device,
            epoch=1,
            epochs=1,
            scaler=scaler,
            autocast_dtype=autocast_dtype,
            transform=preset.on_device,
        )
        rates.append(stats["images_per_s"])
    return rates[1:]


def train_classifier(device, files, *, size: int, epochs: int, batch: int):
    """A ResNet18 trained on the photo-digit files (the project's loop), for the agreement check."""
    import torch

    from pipeline.data import TrainPreset
    from pipeline.train import train_one_epoch

    model, _, optimizer, criterion, autocast_dtype, scaler = train_setup(device)
    preset = TrainPreset(size, augment=True, batch_augment=device.type == "cuda")
    loader = file_loader(files, preset, device, batch=batch, gpu_decode=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(optimizer, 3e-3, total_steps=epochs * len(loader))
    stats = {}
    for epoch in range(1, epochs + 1):
        model.train()
        stats = train_one_epoch(
            model,
            criterion,
            _Stepping(optimizer, sched),
            loader,
            device,
            epoch=epoch,
            epochs=epochs,
            scaler=scaler,
            autocast_dtype=autocast_dtype,
            transform=preset.on_device,
        )
    return model.eval(), stats


class _Stepping:
    """An optimizer whose step also steps a per-batch LR schedule."""

    def __init__(self, optimizer, scheduler) -> None:
        self.optimizer, self.scheduler = optimizer, scheduler

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self) -> None:
        self.optimizer.step()
        self.scheduler.step()


# ----------------------------------------------------------------------------- scoring


def stream_rate(module, device, files, *, n: int, batch: int, workers: int, gpu_decode: bool):
    from pipeline.data import EvalPreset
    from pipeline.inference import predict_stream

    items = [files[i % len(files)][0] for i in range(n)]

    def fn():
        done = 0
        for scored in predict_stream(
            module,
            items,
            Path.read_bytes,
            labels=LABELS,
            preset=EvalPreset(224),
            device=device,
            precision="auto",
            batch_size=batch,
            workers=workers,
            gpu_decode=gpu_decode,
        ):
            done += len(scored.predictions)
            if scored.failures:
                raise RuntimeError(f"unexpected failures: {scored.failures[:3]}")
        assert done == n, done

    return fn


def reference_forward(module, device, *, batch: int, n: int, compiled: bool = False):
    """bf16 forward + top-1 on a uint8 batch already on the GPU."""
    import torch

    net = torch.compile(module) if compiled else module
    x = torch.randint(0, 256, (batch, 3, 224, 224), dtype=torch.uint8, device=device)
    x = x.contiguous(memory_format=torch.channels_last)
    steps = max(1, n // batch)

    def fn():
        with torch.inference_mode(), torch.autocast(device.type, dtype=torch.bfloat16):
            for _ in range(steps):
                net(x.float().div_(255)).argmax(1)

    return fn, steps * batch


def nvjpeg_rate(files, device, *, batch: int, n: int):
    import torch
    from torchvision.io import ImageReadMode, decode_jpeg

    data = [
        torch.frombuffer(bytearray(files[i % len(files)][0].read_bytes()), dtype=torch.uint8)
        for i in range(batch)
    ]
    steps = max(1, n // batch)

    def fn():
        for _ in range(steps):
            decode_jpeg(data, mode=ImageReadMode.RGB, device=device)

    return fn, steps * batch


def preprocessing_check(files, device, odd: dict[str, bytes]) -> dict:
    """GPU preprocessing vs the CPU preset: pixel differences, odd formats."""
    import torch

    from pipeline.data import EvalPreset, gpu_decodable, preprocess_on_device

    preset = EvalPreset(224)
    sample = [p.read_bytes() for p, _ in files[:64]]
    gpu, failed = preprocess_on_device(sample, 224, device)
    cpu = torch.stack([preset.from_bytes(b) for b in sample])
    diff = (gpu.cpu().int() - cpu.int()).abs().float()
    out = {
        "files": len(sample),
        "failed": len(failed),
        "mean_abs_diff": round(float(diff.mean()), 3),
        "p99_abs_diff": round(float(diff.flatten().kthvalue(int(diff.numel() * 0.99)).values), 1),
        "odd": {},
    }
    for name, data in odd.items():
        on_gpu = gpu_decodable(data)
        item = data if on_gpu else preset.from_bytes(data)
        try:
            batch, bad = preprocess_on_device([item], 224, device)
            if bad:
                out["odd"][name] = f"rejected: {bad}"
                continue
            ref = preset.from_bytes(data)
            d = (batch[0].cpu().int() - ref.int()).abs().float().mean()
            where = "nvJPEG" if on_gpu else "CPU"
            out["odd"][name] = f"{where}, mean |diff| {float(d):.2f}"
        except Exception as exc:  # noqa: BLE001 - reported, not fatal
            out["odd"][name] = f"error {type(exc).__name__}: {str(exc)[:120]}"
    return out


def agreement(model, device, files) -> dict:
    """Top-1 of the GPU path (nvJPEG, GPU resize, bf16) vs the CPU path (CPU preset, fp32 on CPU)."""
    import copy

    import torch

    from pipeline.data import EvalPreset
    from pipeline.inference import predict_stream

    def run(dev, module, precision, gpu_decode):
        preds = []
        for scored in predict_stream(
            module,
            [p for p, _ in files],
            Path.read_bytes,
            labels=LABELS,
            preset=EvalPreset(224),
            device=dev,
            precision=precision,
            batch_size=256 if dev.type == "cuda" else 64,
            workers=16,
            gpu_decode=gpu_decode,
        ):
            preds.extend(p.label for _, p in scored.predictions)
        return preds

    gpu_auto = run(device, model, "auto", True)
    gpu_fp32 = run(device, model, "fp32", True)
    torch.set_num_threads(os.cpu_count() or 1)
    cpu_model = copy.deepcopy(model).cpu().float().eval()
    ref = run(torch.device("cpu"), cpu_model, "fp32", False)
    n = len(ref)
    return {
        "images": n,
        "gpu_auto_vs_cpu_fp32": sum(a == b for a, b in zip(gpu_auto, ref, strict=True)) / n,
        "gpu_fp32_vs_cpu_fp32": sum(a == b for a, b in zip(gpu_fp32, ref, strict=True)) / n,
        "predictions": {"gpu_auto": gpu_auto, "cpu_fp32": ref},
    }


# ----------------------------------------------------------------------------- main


def environment(device) -> dict:
    import torch
    import torchvision

    from bench.images import cpu_flags
    from pipeline.data import default_num_workers

    env = {
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "cpu_cores": len(os.sched_getaffinity(0)),
        "default_num_workers": default_num_workers(),
        "cpu_flags": cpu_flags(),
        "device": str(device),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env |= {
            "gpu": props.name,
            "gpu_memory_gib": round(props.total_memory / 2**30, 1),
            "bf16": torch.cuda.is_bf16_supported(),
        }
    return env


class Report:
    """Figures as they come: printed at once and saved after every section."""

    def __init__(self, out: Path | None) -> None:
        self.out, self.data = out, {}

    def put(self, key: str, value) -> None:
        self.data[key] = value
        shown = (
            value
            if not isinstance(value, dict)
            else {k: v for k, v in value.items() if k != "predictions"}
        )
        print(f"[bench_gpu] {key}: {json.dumps(shown, default=str)}", flush=True)
        if self.out:
            (self.out / "gpu.json").write_text(json.dumps(self.data, indent=1, default=str))


def section(report: Report, name: str, fn) -> None:
    t = time.perf_counter()
    try:
        fn()
    except Exception as exc:  # noqa: BLE001 - one broken section must not lose the others
        log.exception("section %s failed", name)
        report.put(f"error_{name}", f"{type(exc).__name__}: {str(exc)[:500]}")
    print(f"[bench_gpu] section {name} took {time.perf_counter() - t:.1f}s", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, help="folder for gpu.json and gpu.md")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes (checks the code on a CPU)"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    parser.add_argument("--only", default="", help="comma-separated sections to run")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")

    import torch

    from pipeline.data import TrainPreset
    from pipeline.model import build_model, pick_device

    device = pick_device()
    smoke = args.smoke
    size = 32 if smoke else 224
    big = 8 if smoke else 256
    n_files = 48 if smoke else 2048
    n_test = 32 if smoke else 1024
    n_loader = 64 if smoke else 8192
    n_score = 64 if smoke else 8192
    steps = 2 if smoke else 32
    repeats = 1 if smoke else args.repeats
    only = set(filter(None, args.only.split(",")))
    report = Report(args.out)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    report.put("environment", environment(device))

    tmp = Path(tempfile.mkdtemp(prefix="bench_gpu_"))
    t = time.perf_counter()
    files = write_cache(tmp / "cache", n_files + n_test, processes=min(16, os.cpu_count() or 1))
    train_files, test_files = files[:n_files], files[n_files:]
    mean_kib = statistics.mean(p.stat().st_size for p, _ in files[:200]) / 1024
    report.put(
        "images",
        {
            "files": len(files),
            "mean_kib": round(mean_kib, 1),
            "size": "500x375 JPEG q90",
            "seconds": round(time.perf_counter() - t, 1),
        },
    )

    def want(name: str) -> bool:
        return not only or name in only

    def training_steps():
        for px, batch in (
            (size, big),
            (size, 64 if not smoke else 4),
            (64 if not smoke else 16, 64 if not smoke else 4),
        ):
            batches = memory_batches(min(steps, 8), batch, px, device) * max(1, steps // 8)
            n = len(batches) * batch
            ref = rate(reference_step(device, batches), n, repeats, device)
            proj = rate(project_step(device, batches), n, repeats, device)
            report.put(
                f"train_step_{px}px_b{batch}",
                {
                    "reference": [round(r) for r in ref],
                    "project": [round(r) for r in proj],
                    "ratio": round(med(proj) / med(ref), 3),
                },
            )
        preset = TrainPreset(size, augment=True, batch_augment=True)
        batches = memory_batches(min(steps, 8), big, preset.source_size, device) * max(
            1, steps // 8
        )
        n = len(batches) * big
        aug = rate(project_step(device, batches, transform=preset.on_device), n, repeats, device)
        report.put(f"train_step_{size}px_b{big}_gpu_augment", {"project": [round(r) for r in aug]})

    def loader():
        on_gpu = device.type == "cuda"
        for name, preset, workers, n, encoded in (
            ("jpeg_bytes_for_nvjpeg", TrainPreset(size, True, on_gpu), None, n_loader, on_gpu),
            ("cpu_decode_gpu_augment", TrainPreset(size, True, on_gpu), None, n_loader, False),
            ("cpu_decode_cpu_augment", TrainPreset(size, True, False), None, n_loader, False),
            ("2_workers_cpu_augment", TrainPreset(size, True, False), 2, n_loader // 8, False),
        ):
            r, used = loader_rate(
                train_files, preset, batch=big, workers=workers, n=n, encoded=encoded
            )
            report.put(f"loader_{name}", {"images_per_s": round(r), "workers": used})

    def file_fed():
        for gpu_decode in (True, False):
            rates = file_fed_training(
                device,
                train_files,
                size=size,
                batch=big,
                n=n_loader,
                repeats=repeats,
                gpu_decode=gpu_decode,
            )
            key = f"train_from_files_{size}px_b{big}_{'nvjpeg' if gpu_decode else 'cpu_decode'}"
            report.put(key, {"project": [round(r) for r in rates]})

    def scoring():
        torch.manual_seed(0)
        module = build_model(10).to(device).eval().to(memory_format=torch.channels_last)
        fn, n = reference_forward(module, device, batch=big, n=n_score)
        report.put(
            "score_reference_forward_bf16",
            {"images_per_s": [round(r) for r in rate(fn, n, repeats, device)]},
        )
        for batch, workers, gpu_decode, n in (
            (2 * big, 8, True, n_score),
            (2 * big, 4, True, n_score),
            (2 * big, 16, True, n_score),
            (big, 8, True, n_score),
            (2 * big, 16, False, n_score // 4),
        ):
            fn = stream_rate(
                module, device, test_files, n=n, batch=batch, workers=workers, gpu_decode=gpu_decode
            )
            key = f"score_stream_b{batch}_w{workers}_{'nvjpeg' if gpu_decode else 'cpu_decode'}"
            report.put(key, {"images_per_s": [round(r) for r in rate(fn, n, repeats, device)]})
        stages(module)

    def stages(module):
        """Each scoring stage alone on one batch, synchronised: where the stream's time goes."""
        from pipeline.data import preprocess_on_device
        from pipeline.model import to_predictions, top_k_probs

        batch = 2 * big
        data = [test_files[i % len(test_files)][0].read_bytes() for i in range(batch)]
        out = {}
        fn = lambda: preprocess_on_device(data, size, device)  # noqa: E731
        out["preprocess_on_device"] = med(rate(fn, batch, repeats, device))
        images, _ = preprocess_on_device(data, size, device)
        fn = lambda: top_k_probs(module, images, precision="auto")  # noqa: E731
        out["forward_topk"] = med(rate(fn, batch, repeats, device))
        values, indices = top_k_probs(module, images, precision="auto")
        values, indices = values.cpu(), indices.cpu()
        fn = lambda: to_predictions(values, indices, LABELS)  # noqa: E731
        out["to_predictions"] = med(rate(fn, batch, repeats, device))
        fn = lambda: [test_files[i % len(test_files)][0].read_bytes() for i in range(batch)]  # noqa: E731
        out["read_files_one_thread"] = med(rate(fn, batch, repeats, device))
        if device.type == "cuda":
            fn, n = nvjpeg_rate(test_files, device, batch=batch, n=n_score)
            out["nvjpeg_batched_decode"] = med(rate(fn, n, repeats, device))
        report.put("score_stages_images_per_s", {k: round(v) for k, v in out.items()})

    def checks():
        report.put("preprocessing_check", preprocessing_check(test_files, device, odd_images()))

    def agreement_check():
        t0 = time.perf_counter()
        model, stats = train_classifier(
            device, train_files, size=size, epochs=2 if smoke else 12, batch=128 if not smoke else 8
        )
        result = agreement(model, device, test_files)
        truth = [str(t) for _, t in test_files]
        result["test_accuracy_cpu_fp32"] = sum(
            a == b for a, b in zip(result["predictions"]["cpu_fp32"], truth, strict=True)
        ) / len(truth)
        result["train_accuracy_last_epoch"] = round(stats["accuracy"], 4)
        result["seconds"] = round(time.perf_counter() - t0, 1)
        report.put("agreement", result)

    def compiled():
        batches = memory_batches(min(steps, 8), big, size, device) * max(1, steps // 8)
        n = len(batches) * big
        t0 = time.perf_counter()
        fn = project_step(device, batches, compile_model=True)
        fn()
        compile_s = time.perf_counter() - t0
        report.put(
            f"train_step_{size}px_b{big}_compiled",
            {
                "project": [round(r) for r in rate(fn, n, repeats, device)],
                "first_pass_s": round(compile_s, 1),
            },
        )
        torch.manual_seed(0)
        module = build_model(10).to(device).eval().to(memory_format=torch.channels_last)
        fn, n = reference_forward(module, device, batch=big, n=n_score, compiled=True)
        report.put(
            "score_reference_forward_bf16_compiled",
            {"images_per_s": [round(r) for r in rate(fn, n, repeats, device)]},
        )

    plan = [
        ("training_steps", training_steps),
        ("checks", checks),
        ("scoring", scoring),
        ("loader", loader),
        ("file_fed", file_fed),
        ("agreement", agreement_check),
    ]
    if not args.no_compile:
        plan.append(("compiled", compiled))
    for name, fn in plan:
        if want(name):
            section(report, name, fn)
    print(summary(report.data), flush=True)
    if args.out:
        (args.out / "gpu.md").write_text(summary(report.data))
    return 0


def summary(data: dict) -> str:
    """The figures as a short table with the ratios the targets are about."""
    lines = ["| figure | images/s (median) | note |", "|---|---|---|"]
    for key, value in data.items():
        if not isinstance(value, dict):
            lines.append(f"| {key} | | {value} |")
            continue
        for field in ("project", "reference", "images_per_s"):
            v = value.get(field)
            if isinstance(v, list) and v:
                lines.append(f"| {key} {field} | {med(v):,.0f} | {v} |")
            elif isinstance(v, (int, float)):
                lines.append(f"| {key} {field} | {v:,.0f} | |")
        if "ratio" in value:
            lines.append(f"| {key} ratio | {value['ratio']} | project / reference |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
