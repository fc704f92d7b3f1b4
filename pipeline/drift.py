"""Drift check: do the images a run scored still look like the scoring version's own val images?

Three parts, each with its reason (user view: README, "Drift"; SQL: docs/sql.md):

- **Reference, at registration** (`build_reference`): the final model's penultimate-layer
  embeddings (ResNet18: the 512 inputs of `net.fc`) of the val images. Val is split in two by
  a seeded shuffle: PCA to at most 32 dimensions is fitted on one half and the other half,
  projected, is the reference sample. Fitting the projection on the sample it is compared
  with would make fresh images look farther away than the sample itself (a false alarm on
  small val sets). The sample keeps each image's predicted label and top-1 confidence. It is
  stored as data with the version (`drift_reference.safetensors` + `drift_reference.json`,
  its SHA-256 a version tag), never as a pickle.
- **Embeddings, while scoring** (`Projector`): the same forward pass that scores a batch yields
  its embeddings (a hook on `net.fc`'s input), projected on the device; the 32 floats per image
  are upserted into `drift_embeddings` in the transaction that writes the batch's predictions,
  keyed by (model, version, Airflow run, image): a retried or killed shard leaves exactly one
  per image and run, like `predictions`.
- **Test, after scoring** (`check_drift`): per subset (test split, inbox) the run's images
  against the reference sample, with one set of seeded permutations for three statistics:
  MMD² with an RBF kernel (median-heuristic bandwidth) on the embeddings; the total variation
  distance of the predicted-label distributions; the drop of the mean top-1 confidence. Each is
  judged at a third of `drift_p_value` (Bonferroni), so in-distribution images are flagged at
  most at that rate; label shift and confidence drop must also reach their effect thresholds.
  Fewer than `drift_min_images` images: "not enough images", no verdict.

A library was the first choice (the issue names alibi-detect and Evidently): alibi-detect 0.13
pins numpy<2 (it would downgrade numpy 2.4 and Pillow, and pull transformers, numba, opencv);
Evidently 0.7 installs without downgrades but adds 25 packages (a web server, nltk, Faker,
statsmodels, usage telemetry) to every worker for a test on pandas frames. The kernel
two-sample test of Gretton et al. (JMLR 2012) with a permutation p-value, as alibi-detect's
`MMDDrift` computes it, is some 30 lines of torch here.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from pipeline.db import Database, utc_now
from pipeline.errors import Refusal
from pipeline.params import RUN_PARAMS

log = logging.getLogger(__name__)

REFERENCE_FILE = "drift_reference.safetensors"
REFERENCE_META_FILE = "drift_reference.json"
REFERENCE_SHA_TAG = "drift_reference_sha256"
FORMAT = 1
PCA_DIMS = 32
MAX_REFERENCE = 1000  # reference images kept with a version
MAX_WINDOW = 1000  # scored images tested per subset (a seeded sample beyond that)
PERMUTATIONS = 1000  # p-values down to 1/1001: below a third of the default 0.01
SUBSETS = ("test", "inbox")
# Subsets checked over a rolling window (`pending_window`); a test window is the test images the
# checking run scored (all of them with a new champion, only the new ones otherwise).
ROLLING_SUBSETS = ("inbox",)
KEEP_EMBEDDINGS_DAYS = 30

# Verdicts of one subset.
CHECKED = "checked"
NOT_ENOUGH = "not_enough_images"
NO_REFERENCE = "no_reference"

DRIFT_PARAMS = ("drift_p_value", "drift_min_images", "drift_label_shift", "drift_confidence_drop")


# ----------------------------------------------------------------------------- reference


@dataclass
class DriftReference:
    """A version's drift reference: its projection and the projected val sample."""

    pca_mean: Any  # torch (D,)
    pca_components: Any  # torch (k, D)
    embeddings: Any  # torch (n, k): the reference sample, projected
    predicted: Any  # torch (n,) int64: predicted class index of each sample image
    confidence: Any  # torch (n,) float32: its top-1 probability
    labels: tuple[str, ...]  # class index -> label
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def dims(self) -> int:
        return int(self.pca_components.shape[0])

    def projector(self, device) -> Projector:
        return Projector(self.pca_mean.to(device), self.pca_components.to(device))

    def write(self, directory: Path) -> dict[str, Path]:
        """The two files, by the artifact names `train.log_and_register` gives them."""
        from safetensors.torch import save_file

        directory.mkdir(parents=True, exist_ok=True)
        tensors = {
            "pca_mean": self.pca_mean,
            "pca_components": self.pca_components,
            "embeddings": self.embeddings,
            "predicted": self.predicted,
            "confidence": self.confidence,
        }
        path = directory / REFERENCE_FILE
        save_file(
            {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
            str(path),
            metadata={"format": str(FORMAT)},
        )
        meta_path = directory / REFERENCE_META_FILE
        meta = self.meta | {"format": FORMAT, "labels": list(self.labels), "dims": self.dims}
        meta_path.write_text(json.dumps(meta, ensure_ascii=False, sort_keys=True))
        return {"drift": path, "drift_meta": meta_path}


class Projector:
    """Embeddings (N, D) on the device -> their PCA projection (N, k), float32."""

    def __init__(self, mean, components) -> None:
        self.mean = mean.float()
        self.components_t = components.float().T.contiguous()

    def __call__(self, features):
        return (features.float() - self.mean) @ self.components_t


@contextmanager
def penultimate(module):
    """Collect the inputs of `module.net.fc` (the embeddings) of forward passes in the block."""
    captured: list = []
    handle = module.net.fc.register_forward_pre_hook(lambda _, args: captured.append(args[0]))
    try:
        yield captured
    finally:
        handle.remove()


def fit_reference(
    features, predicted, confidence, labels: Sequence[str], *, seed: int = 0
) -> DriftReference:
    """The reference from val embeddings (N, D), predicted indices and top-1 confidences.

    A seeded half of the images fits the PCA (k = min(32, its size - 1)), the other half,
    projected, is the sample (at most MAX_REFERENCE). Needs at least 8 images.
    """
    import torch

    n = int(features.shape[0])
    if n < 8:
        raise ValueError(f"a drift reference needs at least 8 val images, got {n}")
    features = features.double().cpu()
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    fit, sample = order[: n // 2], order[n // 2 :][:MAX_REFERENCE]
    mean = features[fit].mean(0)
    k = max(1, min(PCA_DIMS, len(fit) - 1, features.shape[1]))
    _, _, vh = torch.linalg.svd(features[fit] - mean, full_matrices=False)
    components = vh[:k]
    projected = (features[sample] - mean) @ components.T
    counts = torch.bincount(predicted.cpu().long(), minlength=len(labels))
    return DriftReference(
        pca_mean=mean.float(),
        pca_components=components.float().contiguous(),
        embeddings=projected.float().contiguous(),
        predicted=predicted.cpu().long()[sample].contiguous(),
        confidence=confidence.cpu().float()[sample].contiguous(),
        labels=tuple(labels),
        meta={
            "n_val": n,
            "n_fit": len(fit),
            "n_reference": len(sample),
            "val_label_distribution": {
                label: round(float(c) / n, 6) for label, c in zip(labels, counts, strict=True)
            },
            "val_mean_confidence": round(float(confidence.float().mean()), 6),
            "seed": seed,
        },
    )


def build_reference(
    model, loader: Iterable, device, *, labels: Sequence[str], autocast_dtype=None, seed: int = 0
) -> DriftReference | None:
    """The reference of `model` on a val loader of (images, targets, indices) batches; None
    (logged) when val is too small for one."""
    import torch

    from pipeline.data import to_model_input

    model.eval()
    features, predicted, confidence = [], [], []
    with torch.inference_mode(), penultimate(model) as captured:
        for images, targets, _ in loader:
            keep = targets >= 0  # < 0: the image failed to decode
            if not keep.any():
                continue
            batch = to_model_input(images.to(device, non_blocking=True))
            batch = batch.contiguous(memory_format=torch.channels_last)
            with torch.autocast(
                device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None
            ):
                probs = torch.softmax(model(batch).float(), dim=1)
            keep = keep.to(device)
            top = probs[keep].max(dim=1)
            features.append(captured.pop()[keep].float().cpu())
            confidence.append(top.values.cpu())
            predicted.append(top.indices.cpu())
    n = sum(len(f) for f in features)
    if n < 8:
        log.warning("no drift reference: %d val images (at least 8 needed)", n)
        return None
    return fit_reference(
        torch.cat(features), torch.cat(predicted), torch.cat(confidence), labels, seed=seed
    )


def read_reference(
    model_dir: Path,
    *,
    expected_sha256: str | None,
    what: str,
    labels: Sequence[str] | None = None,
):
    """The reference in a downloaded model; None when the version has none (registered
    before drift references: no digest tag). `Refusal` when the version was registered with one
    and its file is missing or differs from its digest, or its labels are not the version's
    `labels` (index order): a reference that cannot be trusted never silently turns drift off.
    """
    from safetensors.torch import load

    from pipeline import model_files

    if not expected_sha256:
        return None
    path = model_files.find_file(model_dir, REFERENCE_FILE)
    meta_path = model_files.find_file(model_dir, REFERENCE_META_FILE)
    if path is None or meta_path is None:
        raise Refusal(
            f"{what} was registered with a drift reference, but {REFERENCE_FILE} or"
            f" {REFERENCE_META_FILE} is missing from its copy in {model_dir}: delete that folder"
            " to download the version again"
        )
    data = path.read_bytes()  # hashed and loaded from the same bytes
    actual = hashlib.sha256(data).hexdigest()
    if actual != expected_sha256:
        raise Refusal(
            f"{what}: {REFERENCE_FILE} has SHA-256 {actual[:16]}…, registered as"
            f" {expected_sha256[:16]}…: the file was altered after registration; not used"
        )
    tensors = load(data)
    meta = json.loads(meta_path.read_text())
    if labels is not None and tuple(meta.get("labels", ())) != tuple(labels):
        raise Refusal(
            f"{what}: {REFERENCE_META_FILE} names other labels than the version's: altered after"
            " registration; not used"
        )
    return DriftReference(
        tensors["pca_mean"],
        tensors["pca_components"],
        tensors["embeddings"],
        tensors["predicted"],
        tensors["confidence"],
        tuple(meta["labels"]),
        meta,
    )


def load_reference(model_name: str, model_version: str | int, *, cache_dir: str | Path):
    """The reference of a registered version (None without one), from its local copy
    (downloaded by `registry.load_model` when missing)."""
    from pipeline import registry

    version = str(model_version)
    local = Path(cache_dir) / "models" / registry.safe_name(model_name) / version
    if not (local / "MLmodel").exists():
        registry.load_model(model_name, version, cache_dir=cache_dir)
    tags = registry.version_tags(model_name, version)
    label_map = json.loads(tags.get("label_map", "{}"))
    return read_reference(
        local,
        expected_sha256=tags.get(REFERENCE_SHA_TAG),
        what=f"{model_name} v{version}",
        labels=sorted(label_map, key=label_map.get) if label_map else None,
    )


# ----------------------------------------------------------------------------- embeddings

_EMBEDDING_UPSERT = (
    "INSERT INTO drift_embeddings (model_name, model_version, run_key, image_id, subset,"
    " embedding, created_at) VALUES {rows} ON DUPLICATE KEY UPDATE subset = VALUES(subset),"
    " embedding = VALUES(embedding), created_at = VALUES(created_at)"
)


def embedding_rows(
    records: Sequence[Any],
    embeddings,
    *,
    model_name: str,
    model_version: int,
    run_key: str | None,
    created_at,
) -> list[tuple]:
    """`drift_embeddings` rows of a batch: (record, float32 little-endian bytes) pairs."""
    import numpy as np

    values = embeddings.float().cpu().numpy().astype("<f4", copy=False)
    return [
        (
            model_name,
            model_version,
            run_key or "",
            record.image_id,
            record.subset,
            np.ascontiguousarray(row).tobytes(),
            created_at,
        )
        for record, row in zip(records, values, strict=True)
    ]


def upsert_embeddings(cur, rows: Sequence[tuple]) -> None:
    """One multi-row upsert on a cursor (the scoring batch's transaction)."""
    if rows:
        sql = _EMBEDDING_UPSERT.format(rows=", ".join(["(%s, %s, %s, %s, %s, %s, %s)"] * len(rows)))
        cur.execute(sql, [v for r in rows for v in r])


# ----------------------------------------------------------------------------- the test


@dataclass(frozen=True)
class Thresholds:
    """When a subset is called drifted; defaults in `pipeline.params.RUN_PARAMS`."""

    p_value: float = RUN_PARAMS["drift_p_value"].default
    min_images: int = RUN_PARAMS["drift_min_images"].default
    label_shift: float = RUN_PARAMS["drift_label_shift"].default
    confidence_drop: float = RUN_PARAMS["drift_confidence_drop"].default

    @classmethod
    def from_params(cls, params: dict[str, Any]) -> Thresholds:
        return cls(*(params[name] for name in DRIFT_PARAMS))


def median_bandwidth(sq_distances) -> float:
    """Median heuristic: the median squared distance between distinct points (1 if all equal)."""
    import torch

    n = sq_distances.shape[0]
    upper = sq_distances[torch.triu_indices(n, n, offset=1, device=sq_distances.device).unbind()]
    median = float(upper.median()) if upper.numel() else 0.0
    return median if median > 0 else 1.0


def permutation_tests(
    reference,
    window,
    ref_predicted,
    new_predicted,
    ref_confidence,
    new_confidence,
    *,
    n_classes: int,
    permutations: int = PERMUTATIONS,
    seed: int = 0,
) -> dict[str, float]:
    """MMD², label TVD and confidence drop of `window` against `reference`, each with the
    permutation p-value of one shared set of seeded relabellings of the pooled images.

    MMD² is the unbiased estimate (Gretton et al. 2012) with an RBF kernel whose bandwidth is
    the median heuristic of the pooled sample. p = (1 + #{permuted >= observed}) / (1 + P).
    """
    import torch

    n, m = int(reference.shape[0]), int(window.shape[0])
    if n < 2 or m < 2:
        raise ValueError(f"permutation tests need at least 2 images a side, got {n} and {m}")
    x = torch.cat([reference, window]).float()
    sq = torch.cdist(x, x).pow(2)
    kernel = torch.exp(-sq / (2 * median_bandwidth(sq)))
    total = n + m
    gen = torch.Generator().manual_seed(seed)
    shuffled = torch.rand(permutations, total, generator=gen).argsort(dim=1)
    orders = torch.cat([torch.arange(total)[None], shuffled])
    in_ref = torch.zeros(permutations + 1, total)
    in_ref.scatter_(1, orders[:, :n], 1.0)  # row 0: the observed split
    in_new = 1.0 - in_ref
    ref_k = in_ref @ kernel
    column_sums = kernel.sum(0)
    s_xx = (ref_k * in_ref).sum(1) - n  # kernel diagonal is 1: drop i == j
    s_xy = (ref_k * in_new).sum(1)
    s_yy = ((column_sums - ref_k) * in_new).sum(1) - m
    mmd2 = s_xx / (n * (n - 1)) + s_yy / (m * (m - 1)) - 2 * s_xy / (n * m)

    onehot = torch.nn.functional.one_hot(
        torch.cat([ref_predicted, new_predicted]).long(), n_classes
    ).float()
    tvd = 0.5 * ((in_ref @ onehot) / n - (in_new @ onehot) / m).abs().sum(1)
    conf = torch.cat([ref_confidence, new_confidence]).float()
    drop = (in_ref @ conf) / n - (in_new @ conf) / m

    def p_value(stat) -> float:
        # A small tolerance: float sums of a permuted split equal to the observed one tie.
        return float(((stat[1:] >= stat[0] - 1e-9).sum() + 1) / (permutations + 1))

    return {
        "mmd2": float(mmd2[0]),
        "mmd_p_value": p_value(mmd2),
        "label_shift": float(tvd[0]),
        "label_p_value": p_value(tvd),
        "confidence_drop": float(drop[0]),
        "confidence_p_value": p_value(drop),
    }


def compare(
    reference: DriftReference,
    window,
    predicted,
    confidence,
    thresholds: Thresholds,
    *,
    seed: int = 0,
) -> dict[str, Any]:
    """The verdict on one window (its projected embeddings, predicted indices, confidences)."""
    import torch

    m = int(window.shape[0])
    n_ref = int(reference.embeddings.shape[0])
    result: dict[str, Any] = {
        "n_images": m,
        "n_reference": n_ref,
        "reference_confidence": round(float(reference.confidence.float().mean()), 6),
        "mean_confidence": round(float(confidence.float().mean()), 6) if m else None,
    }
    if m < max(thresholds.min_images, 2):
        return result | {
            "status": NOT_ENOUGH,
            "drifted": False,
            "reasons": [],
            "message": f"not enough images: {m} scored, at least {thresholds.min_images} needed",
        }
    tested = m
    if m > MAX_WINDOW:
        keep = torch.randperm(m, generator=torch.Generator().manual_seed(seed))[:MAX_WINDOW]
        window, predicted, confidence, tested = (
            window[keep],
            predicted[keep],
            confidence[keep],
            MAX_WINDOW,
        )
    stats = permutation_tests(
        reference.embeddings,
        window,
        reference.predicted,
        predicted,
        reference.confidence,
        confidence,
        n_classes=len(reference.labels),
        seed=seed,
    )
    alpha = thresholds.p_value / 3  # Bonferroni over the three tests
    reasons = []
    if stats["mmd_p_value"] <= alpha:
        reasons.append("embeddings")
    if stats["label_p_value"] <= alpha and stats["label_shift"] >= thresholds.label_shift:
        reasons.append("labels")
    if (
        stats["confidence_p_value"] <= alpha
        and stats["confidence_drop"] >= thresholds.confidence_drop
    ):
        reasons.append("confidence")
    counts = torch.bincount(predicted.long(), minlength=len(reference.labels))
    return (
        result
        | {k: round(v, 6) if k.endswith("p_value") else v for k, v in stats.items()}
        | {
            "status": CHECKED,
            "n_tested": tested,
            "drifted": bool(reasons),
            "reasons": reasons,
            "label_distribution": {
                label: round(float(c) / tested, 6)
                for label, c in zip(reference.labels, counts, strict=True)
                if c
            },
            "message": ("drift: " + ", ".join(reasons)) if reasons else "no drift",
        }
    )


# ----------------------------------------------------------------------------- check_drift


def window_of(
    db: Database,
    *,
    model_name: str,
    model_version: int,
    run_key: str,
    subset: str,
    labels,
    since: datetime | None = None,
    until: datetime | None = None,
):
    """(embeddings (m, k), predicted indices, confidences) of the images `run_key` scored in
    `subset` with the version, and with `since` also those any run embedded after it (up to
    `until`, when given; the latest embedding per image)."""
    import numpy as np
    import torch

    sql = (
        "SELECT e.image_id, e.embedding, p.predicted_label, p.confidence FROM drift_embeddings e"
        " JOIN predictions p ON p.image_id = e.image_id AND p.model_name = e.model_name"
        " AND p.model_version = e.model_version"
        " WHERE e.model_name = %s AND e.model_version = %s AND e.subset = %s"
    )
    args: tuple = (model_name, model_version, subset)
    if since is None:
        sql += " AND e.run_key = %s"
        args += (run_key,)
    else:
        # Images of runs whose own check judged them (before this run's first check) are not
        # judged again, also when such a run scored them again later (a forced rescore).
        judged = (
            "SELECT r.run_key FROM drift_reports r WHERE r.model_name = %s"
            " AND r.model_version = %s AND r.subset = %s AND r.status = %s AND r.run_key <> %s"
        )
        judged_args: tuple = (model_name, model_version, subset, CHECKED, run_key)
        window = "e.created_at > %s"
        window_args: tuple = (since,)
        if until is not None:
            judged += " AND COALESCE(r.window_until, r.checked_at) < %s"
            judged_args += (until,)
            window += " AND e.created_at <= %s"
            window_args += (until,)
        sql += f" AND (e.run_key = %s OR {window} AND e.run_key NOT IN ({judged}))"
        args += (run_key, *window_args, *judged_args)
    rows = db.query(sql + " ORDER BY e.image_id, e.created_at", args)
    index = {label: i for i, label in enumerate(labels)}
    latest = {r["image_id"]: r for r in rows}  # ordered by time: the last one wins
    rows = [r for r in latest.values() if r["predicted_label"] in index]
    if not rows:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.long), torch.empty(0)
    embeddings = np.stack([np.frombuffer(r["embedding"], dtype="<f4") for r in rows])
    return (
        torch.from_numpy(embeddings.copy()),
        torch.tensor([index[r["predicted_label"]] for r in rows], dtype=torch.long),
        torch.tensor([float(r["confidence"]) for r in rows], dtype=torch.float32),
    )


def pending_window(
    db: Database, model_name: str, model_version: int, run_key: str
) -> tuple[datetime, datetime | None]:
    """(since, until) of the rolling inbox window: after the version's last inbox verdict by
    another run, up to this run's first check of it (None: this is its first).

    Inbox images are scored by whichever run sees them first (the hourly inbox DAG, mostly),
    a few at a time: each run's own handful would say "not enough images" forever. So the
    inbox window holds every inbox image the version scored since its last verdict (epoch
    when there is none) plus this run's own. A rerun of this run's check (a retry, a cleared
    task) judges the window of its first check (`drift_reports.window_since/_until`), whatever
    other runs checked since.
    """
    own = db.query(
        "SELECT window_since, window_until FROM drift_reports WHERE model_name = %s"
        " AND model_version = %s AND subset = 'inbox' AND run_key = %s",
        (model_name, model_version, run_key),
    )
    if own and own[0]["window_until"] is not None:
        return own[0]["window_since"] or datetime(1970, 1, 1), own[0]["window_until"]
    # Where the windows other runs judged ended (a rerun's verdict is newer than its window).
    rows = db.query(
        "SELECT MAX(COALESCE(window_until, checked_at)) AS t FROM drift_reports"
        " WHERE model_name = %s AND model_version = %s AND subset = 'inbox' AND status = %s"
        " AND run_key <> %s",
        (model_name, model_version, CHECKED, run_key),
    )
    return rows[0]["t"] or datetime(1970, 1, 1), None


def subsets_scored(db: Database, model_name: str, model_version: int, run_key: str) -> list[str]:
    """The subsets in which `run_key` scored (and embedded) images with the version, in
    `SUBSETS` order: a run that scored nothing new in a subset has nothing to check there."""
    rows = db.query(
        "SELECT DISTINCT subset FROM drift_embeddings WHERE model_name = %s"
        " AND model_version = %s AND run_key = %s",
        (model_name, model_version, run_key),
    )
    found = {r["subset"] for r in rows}
    return [s for s in SUBSETS if s in found]


def latest_run(db: Database, model_name: str, model_version: int) -> str | None:
    """The Airflow run id whose embeddings of the version were written last."""
    rows = db.query(
        "SELECT run_key FROM drift_embeddings WHERE model_name = %s AND model_version = %s"
        " ORDER BY created_at DESC LIMIT 1",
        (model_name, model_version),
    )
    return rows[0]["run_key"] if rows else None


def check_drift(
    db: Database,
    *,
    model_name: str,
    model_version: str | int,
    run_key: str | None,
    cache_dir: str | Path,
    thresholds: Thresholds | None = None,
    subsets: Sequence[str] = SUBSETS,
    log_to_mlflow: bool = True,
) -> dict[str, Any]:
    """Compare the images `run_key` scored with the version, per subset, with the
    version's reference; one `drift_reports` row per subset (upserted: a rerun rewrites it).
    The inbox window also holds the inbox images other runs scored since the version's last
    inbox verdict (`pending_window`).

    Returns {model_name, model_version, run_key, drifted, subsets: {subset: verdict}}
    (status, n_images, the statistics and p-values, reasons, message).
    `run_key` None: the run that scored with the version last.
    """
    thresholds = thresholds or Thresholds()
    version = int(model_version)
    if run_key is None:
        run_key = latest_run(db, model_name, version) or ""
    reference = load_reference(model_name, version, cache_dir=cache_dir)
    verdicts: dict[str, dict[str, Any]] = {}
    windows: dict[str, tuple[datetime | None, datetime | None]] = {}
    for subset in subsets:
        if reference is None:
            verdict = _no_reference_verdict(model_name, version)
        else:
            since, until = (
                pending_window(db, model_name, version, run_key)
                if subset in ROLLING_SUBSETS
                else (None, None)
            )
            windows[subset] = (since, until)
            window, predicted, confidence = window_of(
                db,
                model_name=model_name,
                model_version=version,
                run_key=run_key,
                subset=subset,
                labels=reference.labels,
                since=since,
                until=until,
            )
            verdict = compare(reference, window, predicted, confidence, thresholds)
        verdicts[subset] = verdict
        log.info(
            "drift of %s v%s, run %s, %s: %s (%d images)",
            model_name,
            version,
            run_key or "(none)",
            subset,
            verdict["message"],
            verdict["n_images"],
        )
    _write_reports(db, model_name, version, run_key, verdicts, thresholds, windows)
    _purge_embeddings(db)
    if log_to_mlflow and reference is not None:
        _log_to_mlflow(model_name, str(version), verdicts)
    return {
        "model_name": model_name,
        "model_version": str(version),
        "run_key": run_key,
        "drifted": any(v["drifted"] for v in verdicts.values()),
        # Small whatever the number of classes (an XCom): distributions are in drift_reports.
        "subsets": {
            s: {k: x for k, x in v.items() if k != "label_distribution"}
            for s, v in verdicts.items()
        },
    }


def _no_reference_verdict(model_name: str, version: int) -> dict[str, Any]:
    return {
        "status": NO_REFERENCE,
        "drifted": False,
        "n_images": 0,
        "n_reference": 0,
        "reasons": [],
        "message": f"{model_name} v{version} has no drift reference (registered before drift"
        " references, or too few val images): retrain to get one",
    }


_REPORT_COLUMNS = (
    "model_name",
    "model_version",
    "run_key",
    "subset",
    "status",
    "n_images",
    "n_reference",
    "mmd2",
    "mmd_p_value",
    "label_shift",
    "label_p_value",
    "reference_confidence",
    "mean_confidence",
    "confidence_drop",
    "confidence_p_value",
    "p_value_threshold",
    "min_images",
    "label_shift_threshold",
    "confidence_drop_threshold",
    "drifted",
    "reasons",
    "label_distribution",
    "checked_at",
    "window_since",
    "window_until",
)
_REPORT_KEY = ("model_name", "model_version", "run_key", "subset")


def _write_reports(db, model_name, version, run_key, verdicts, thresholds, windows) -> None:
    now = utc_now()
    rows = [
        (
            model_name,
            version,
            run_key,
            subset,
            v["status"],
            v["n_images"],
            v["n_reference"],
            _finite(v.get("mmd2")),
            v.get("mmd_p_value"),
            v.get("label_shift"),
            v.get("label_p_value"),
            v.get("reference_confidence"),
            v.get("mean_confidence"),
            v.get("confidence_drop"),
            v.get("confidence_p_value"),
            thresholds.p_value,
            thresholds.min_images,
            thresholds.label_shift,
            thresholds.confidence_drop,
            int(v["drifted"]),
            ",".join(v["reasons"]),
            json.dumps(v.get("label_distribution"), ensure_ascii=False)
            if v.get("label_distribution") is not None
            else None,
            now,
            windows.get(subset, (None, None))[0],
            # A first check's window ends now; a rerun's as its first did (kept below).
            now if windows.get(subset, (None, None))[0] is not None else None,
        )
        for subset, v in verdicts.items()
    ]
    # A rerun keeps the window of the first check (`pending_window`).
    kept = (*_REPORT_KEY, "window_since", "window_until")
    updates = ", ".join(f"{c} = VALUES({c})" for c in _REPORT_COLUMNS if c not in kept)
    sql = (
        f"INSERT INTO drift_reports ({', '.join(_REPORT_COLUMNS)}) VALUES "
        + ", ".join(["(" + ", ".join(["%s"] * len(_REPORT_COLUMNS)) + ")"] * len(rows))
        + f" ON DUPLICATE KEY UPDATE {updates}"
    )
    db.transact(lambda cur: cur.execute(sql, [x for r in rows for x in r]))


def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else value


def _purge_embeddings(db: Database) -> None:
    """Embeddings are kept KEEP_EMBEDDINGS_DAYS for reruns of a check, then deleted in bounded
    chunks (no long lock on a big table)."""
    from datetime import timedelta

    cutoff = utc_now() - timedelta(days=KEEP_EMBEDDINGS_DAYS)
    while db.execute("DELETE FROM drift_embeddings WHERE created_at < %s LIMIT 10000", (cutoff,)):
        pass


def _log_to_mlflow(model_name: str, model_version: str, verdicts: dict[str, dict]) -> None:
    from pipeline import registry

    client = registry.mlflow_client()
    run_id = client.get_model_version(model_name, model_version).run_id
    for subset, v in verdicts.items():
        if v["status"] != CHECKED:
            continue
        metrics = {
            "drifted": float(v["drifted"]),
            "n_images": float(v["n_images"]),
            "mmd_p_value": v["mmd_p_value"],
            "label_shift": v["label_shift"],
            "confidence_drop": v["confidence_drop"],
        }
        for name, value in metrics.items():
            client.log_metric(run_id, f"drift_{subset}_{name}", value)


# ----------------------------------------------------------------------------- CLI


def add_check_drift_arguments(parser: argparse.ArgumentParser) -> None:
    ref = parser.add_mutually_exclusive_group()
    ref.add_argument("--model-version", help="a registered version number")
    ref.add_argument("--model-ref", default="champion", help="an alias (default: champion)")
    parser.add_argument(
        "--run-key",
        help="the scoring run to check (default: the last run that scored with the version)",
    )
    for name in DRIFT_PARAMS:
        spec = RUN_PARAMS[name]
        parser.add_argument(
            f"--{name.removeprefix('drift_').replace('_', '-')}",
            dest=name,
            type=int if spec.type == "integer" else float,
            default=spec.default,
            help=f"{spec.description} (default {spec.default})",
        )


def cli_check_drift(args: argparse.Namespace, settings: Any) -> int:
    from pipeline import registry
    from pipeline.params import validate_params

    params = validate_params({name: getattr(args, name) for name in DRIFT_PARAMS})
    version = registry.resolve_model_version(
        settings.model_name, args.model_version or args.model_ref
    )
    report = check_drift(
        Database(settings.mysql),
        model_name=settings.model_name,
        model_version=version,
        run_key=args.run_key,
        cache_dir=settings.cache_dir,
        thresholds=Thresholds.from_params(params),
    )
    print(f"{settings.model_name} v{version}, run {report['run_key'] or '(none)'}:")
    for subset, v in report["subsets"].items():
        figures = ""
        if v["status"] == CHECKED:
            figures = (
                f" (MMD p={v['mmd_p_value']:.4f}, label shift {v['label_shift']:.3f}"
                f" p={v['label_p_value']:.4f}, confidence {v['reference_confidence']:.3f} ->"
                f" {v['mean_confidence']:.3f})"
            )
        print(f"  {subset}: {v['message']}, {v['n_images']} images{figures}")
    return 0
