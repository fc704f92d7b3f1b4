"""Read-only answers for the results page: champion, accuracy, confusion, review queue, drift,
thumbnails.

Every query reads the views of `pipeline/migrations` or the tables behind them and writes
nothing. Lists page by keyset on indexed columns, so a model version with 100k predictions
costs one short index range per page. Thumbnails are addressed by image id: the object key
comes from the catalog, never from the caller, and only live, accepted images are served.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import threading
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

from pipeline import catalog, report
from pipeline.db import Database
from pipeline.errors import S3_CHANGED_CODES, S3_MISSING_CODES, ServiceUnavailable, s3_error_code
from pipeline.files import read_own_file, write_atomically
from pipeline.preflight import without_credentials
from pipeline.records import ImageRecord
from pipeline.store import ObjectStore

log = logging.getLogger(__name__)

ALIASES = ("champion", "challenger")
# The threshold of `v_review_queue` (migration 0003): below it a human should look.
REVIEW_CONFIDENCE = 0.6
SUBSETS = ("train", "val", "test", "inbox")
QUEUES = ("review", "all")
MAX_PAGE = 200
THUMBNAIL_SIZES = (64, 128, 256)
THUMBNAIL_MAX_BYTES = 32 * 2**20  # larger objects are not fetched for a thumbnail
# Thumbnails rendered at once by this process (the API server's request threads share it).
_RENDERING = threading.BoundedSemaphore(2)
RENDER_WAIT_S = 10.0
HISTORY_ROWS = 20
DRIFT_ROWS = 40
NEXT_STEP = (
    "no champion yet: trigger the DAG image_classification in the Airflow UI (or run"
    " `make demo`); its promotion gate names the first champion"
)


class NotCatalogued(LookupError):
    """The image id is not a live, accepted image of the catalog (or its object changed)."""


class NoThumbnail(LookupError):
    """A catalogued image has no thumbnail: too large to fetch for one, or it does not decode."""


def _iso(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value


def _plain(row: dict[str, Any]) -> dict[str, Any]:
    """A row as JSON-able values (datetimes as ISO strings, decimals as floats)."""
    out = {}
    for key, value in row.items():
        if isinstance(value, datetime):
            value = value.isoformat()
        elif isinstance(value, Decimal):
            value = float(value)
        out[key] = value
    return out


def mlflow_run_url(ui_url: str | None, run_id: str | None) -> str | None:
    """The MLflow UI page of a run (its direct `#/runs/<id>` route), or None; never with the
    URL's credentials (`registry.mlflow_ui_url`)."""
    if not ui_url or not run_id or not ui_url.startswith(("http://", "https://")):
        return None
    return f"{without_credentials(ui_url).rstrip('/')}/#/runs/{run_id}"


# ----------------------------------------------------------------------------- overview


def current_aliases(db: Database, model_name: str) -> dict[str, dict[str, Any]]:
    """Champion and challenger as recorded (`v_current_aliases`), with their registry rows."""
    rows = db.query(
        "SELECT a.alias, a.model_version, a.moved_at, a.actor, a.reason,"
        " mv.run_id, mv.dataset_version, mv.run_key, mv.val_accuracy, mv.gate_accuracy,"
        " mv.champion_version, mv.champion_accuracy, mv.decision, mv.decision_reason,"
        " mv.created_at, mv.decided_at"
        " FROM v_current_aliases a LEFT JOIN model_versions mv"
        " ON mv.model_name = a.model_name AND mv.model_version = a.model_version"
        " WHERE a.model_name = %s AND a.alias IN ('champion', 'challenger')",
        (model_name,),
    )
    return {r["alias"]: _plain(r) for r in rows}


def overview(db: Database, model_name: str, *, mlflow_ui_url: str | None = None) -> dict[str, Any]:
    """Champion and challenger (version, promotion, gate decision and scores, MLflow run),
    the alias history and the champion's dataset version; `hint` says what to run when empty."""
    aliases = current_aliases(db, model_name)
    for entry in aliases.values():
        entry["mlflow_run_url"] = mlflow_run_url(mlflow_ui_url, entry.get("run_id"))
    history = db.query(
        "SELECT alias, from_version, to_version, actor, reason, moved_at FROM alias_history"
        " WHERE model_name = %s ORDER BY id DESC LIMIT %s",
        (model_name, HISTORY_ROWS),
    )
    champion = aliases.get("champion")
    dataset = None
    if champion and champion.get("dataset_version"):
        try:
            dataset = catalog.get_dataset(db, champion["dataset_version"])
        except LookupError:
            dataset = None
    return {
        "model_name": model_name,
        "champion": champion,
        "challenger": aliases.get("challenger"),
        "alias_history": [_plain(r) for r in history],
        "dataset": dataset,
        "hint": None if champion else NEXT_STEP,
    }


def accuracy_by_version(db: Database, model_name: str) -> list[dict[str, Any]]:
    """`v_accuracy_by_model_version` of one model, oldest version first."""
    rows = db.query(
        "SELECT model_version, alias, n_labelled, n_correct, accuracy, macro_f1, evaluated_at,"
        " last_scored_at FROM v_accuracy_by_model_version WHERE model_name = %s"
        " ORDER BY model_version, alias",
        (model_name,),
    )
    return [_plain(r) for r in rows]


def resolve_version(db: Database, model_name: str, model_version: int | None) -> int | None:
    """`model_version`, or else the recorded champion's; None when there is none."""
    if model_version is not None:
        return int(model_version)
    champion = current_aliases(db, model_name).get("champion")
    return int(champion["model_version"]) if champion else None


def confusion(db: Database, model_name: str, model_version: int) -> dict[str, Any]:
    """The stored evaluation of a version (`report.load_evaluation`) as labels and a matrix:
    `matrix[i][j]` counts images of true label `labels[i]` predicted as `labels[j]`."""
    ev = report.load_evaluation(db, model_name, model_version)
    labels = [c["label"] for c in ev["classes"]]
    for true_label, predicted_label in ev["confusion"]:
        for label in (true_label, predicted_label):
            if label not in labels:
                labels.append(label)
    matrix = [[ev["confusion"].get((t, p), 0) for p in labels] for t in labels]
    return {
        "model_name": model_name,
        "model_version": int(model_version),
        "n_images": int(ev["n_images"]),
        "accuracy": float(ev["accuracy"]),
        "macro_f1": float(ev["macro_f1"]),
        "evaluated_at": _iso(ev["evaluated_at"]),
        "labels": labels,
        "matrix": matrix,
        "classes": [_plain(c) for c in ev["classes"]],
    }


# ----------------------------------------------------------------------------- predictions


@dataclass(frozen=True)
class PredictionFilter:
    """Which predictions of one model version a page lists.

    `queue="review"` keeps the ones a human should look at: confidence below
    REVIEW_CONFIDENCE (the rows of `v_review_queue`) or a wrong label. The other fields narrow
    further: true label, predicted label, subset, confidence below `below`, wrong only.
    """

    queue: str = "review"
    true_label: str | None = None
    predicted_label: str | None = None
    subset: str | None = None
    below: float | None = None
    wrong_only: bool = False

    def __post_init__(self) -> None:
        if self.queue not in QUEUES:
            raise ValueError(f"unknown queue {self.queue!r}; expected one of: {', '.join(QUEUES)}")
        if self.subset is not None and self.subset not in SUBSETS:
            raise ValueError(
                f"unknown subset {self.subset!r}; expected one of: {', '.join(SUBSETS)}"
            )
        if self.below is not None and not 0.0 < self.below <= 1.0:
            raise ValueError(f"below must be a confidence in (0, 1], got {self.below}")

    def where(self) -> tuple[list[str], list[Any]]:
        clauses, args = [], []
        if self.queue == "review":
            clauses.append("(p.confidence < %s OR p.correct = 0)")
            args.append(REVIEW_CONFIDENCE)
        for column, value in (
            ("p.true_label", self.true_label),
            ("p.predicted_label", self.predicted_label),
            ("p.subset", self.subset),
        ):
            if value is not None:
                clauses.append(f"{column} = %s")
                args.append(value)
        if self.below is not None:
            clauses.append("p.confidence < %s")
            args.append(self.below)
        if self.wrong_only:
            clauses.append("p.correct = 0")
        return clauses, args


def encode_cursor(confidence: float, prediction_id: int) -> str:
    """The keyset position after a row: its confidence (exact, `repr`) and prediction id."""
    return f"{float(confidence)!r}_{int(prediction_id)}"


def decode_cursor(cursor: str) -> tuple[float, int]:
    """(confidence, prediction id) of `encode_cursor`; ValueError for anything else."""
    confidence, sep, prediction_id = cursor.partition("_")
    try:
        position = float(confidence), int(prediction_id)
        if not sep or not math.isfinite(position[0]):  # nan/inf: no confidence MySQL takes
            raise ValueError
        return position
    except ValueError:
        raise ValueError(
            f"malformed cursor {cursor!r}; pass the `next` value of the previous page"
        ) from None


def _check_limit(limit: int) -> None:
    if not 1 <= limit <= MAX_PAGE:
        raise ValueError(f"limit must be 1-{MAX_PAGE}, got {limit}")


def _prediction_row(row: dict[str, Any]) -> dict[str, Any]:
    out = _plain(row)
    out["top_k"] = json.loads(row["top_k"]) if row.get("top_k") else []
    out["confidence"] = float(row["confidence"])
    return out


def _prediction_scope(
    model_name: str, model_version: int, flt: PredictionFilter
) -> tuple[str, list[Any]]:
    """FROM and WHERE (and args) of a version's filtered predictions of live, accepted images."""
    clauses, args = flt.where()
    sql = (
        " FROM predictions p JOIN images i ON i.id = p.image_id AND i.etag = p.etag"
        " WHERE p.model_name = %s AND p.model_version = %s"
        " AND i.status = 'ok' AND i.deleted_at IS NULL"
    )
    if clauses:
        sql += " AND " + " AND ".join(clauses)
    return sql, [model_name, int(model_version), *args]


def prediction_page_query(
    model_name: str,
    model_version: int,
    flt: PredictionFilter,
    *,
    after: str | None = None,
    limit: int = 50,
) -> tuple[str, list[Any]]:
    """SQL and args of one page (`limit + 1` rows: the extra one says a next page exists).

    Keyset on (confidence, prediction id): the index (model_name, model_version, confidence),
    whose entries end in the primary key, yields the rows in that order from the cursor on,
    so a page deep in 100k predictions reads about as many index entries as a first page.
    """
    _check_limit(limit)
    sql, args = _prediction_scope(model_name, model_version, flt)
    if after:
        confidence, prediction_id = decode_cursor(after)
        sql += " AND (p.confidence > %s OR (p.confidence = %s AND p.id > %s))"
        args += [confidence, confidence, prediction_id]
    return (
        "SELECT p.id, p.image_id, i.object_key, p.subset, p.true_label, p.predicted_label,"
        " p.confidence, p.correct, p.top_k, p.scored_at"
        + sql
        + " ORDER BY p.confidence, p.id LIMIT %s",
        [*args, limit + 1],
    )


def prediction_page(
    db: Database,
    model_name: str,
    model_version: int,
    flt: PredictionFilter | None = None,
    *,
    after: str | None = None,
    limit: int = 50,
) -> dict[str, Any]:
    """One page of a version's predictions of live, accepted images, lowest confidence first.

    Returns {items, next (cursor, or None on the last page), total}; `total` (how many match
    the filter) is counted for the first page only (None after), so paging on stays cheap.
    """
    flt = flt or PredictionFilter()
    sql, args = prediction_page_query(model_name, model_version, flt, after=after, limit=limit)
    rows = db.query(sql, args)
    total = None
    if not after:
        scope, scope_args = _prediction_scope(model_name, model_version, flt)
        total = int(db.query("SELECT COUNT(*) AS n" + scope, scope_args)[0]["n"])
    more = len(rows) > limit
    rows = rows[:limit]
    return {
        "items": [_prediction_row(r) for r in rows],
        "next": encode_cursor(rows[-1]["confidence"], rows[-1]["id"]) if more else None,
        "total": total,
    }


def disagreements(
    db: Database, model_name: str, *, after: int | None = None, limit: int = 50
) -> dict[str, Any]:
    """Images where champion and challenger differ (`v_champion_challenger_disagreements`),
    by image id; keyset on image id. Returns {items, next}."""
    _check_limit(limit)
    rows = db.query(
        "SELECT image_id, object_key, subset, true_label, champion_version, champion_label,"
        " champion_confidence, challenger_version, challenger_label, challenger_confidence"
        " FROM v_champion_challenger_disagreements WHERE model_name = %s AND image_id > %s"
        " ORDER BY image_id LIMIT %s",
        (model_name, int(after or 0), limit + 1),
    )
    more = len(rows) > limit
    rows = rows[:limit]
    return {
        "items": [_plain(r) for r in rows],
        "next": int(rows[-1]["image_id"]) if more else None,
    }


def inbox_predictions(
    db: Database, model_name: str, *, limit: int = 24, offset: int = 0
) -> dict[str, Any]:
    """Live inbox images of the model's dataset scope (the bucket/prefix pairs its versions were
    trained on) with their latest prediction by this model of their current content (unscored
    ones too), most recently scored first. Returns {items, total}.

    Not `v_inbox_latest_predictions`, whose latest prediction is by any model: an image scored
    later by another model name would drop out of this model's list."""
    _check_limit(limit)
    if not 0 <= offset <= 100_000:
        raise ValueError(f"offset must be 0-100000, got {offset}")
    scope = (
        " FROM images i LEFT JOIN predictions p ON p.id = ("
        "SELECT p2.id FROM predictions p2 WHERE p2.image_id = i.id AND p2.etag = i.etag"
        " AND p2.model_name = %s ORDER BY p2.scored_at DESC, p2.model_version DESC, p2.id DESC"
        " LIMIT 1)"
        " WHERE i.subset = 'inbox' AND i.status = 'ok' AND i.deleted_at IS NULL"
        " AND (i.bucket, i.prefix) IN (SELECT d.bucket, d.prefix FROM model_versions mv"
        " JOIN dataset_versions d ON d.dataset_version = mv.dataset_version"
        " WHERE mv.model_name = %s)"
    )
    rows = db.query(
        "SELECT i.id AS image_id, i.object_key, i.first_seen_at, p.model_version,"
        " p.predicted_label, p.confidence, p.top_k, p.scored_at"
        + scope
        + " ORDER BY p.scored_at IS NULL, p.scored_at DESC, i.id DESC LIMIT %s OFFSET %s",
        (model_name, model_name, limit, offset),
    )
    total = db.query("SELECT COUNT(*) AS n" + scope, (model_name, model_name))[0]["n"]
    items = []
    for r in rows:
        item = _plain(r)
        item["top_k"] = json.loads(r["top_k"]) if r.get("top_k") else []
        items.append(item)
    return {"items": items, "total": int(total)}


# ----------------------------------------------------------------------------- drift


def mark_latest(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows of drift checks, newest first, each with `latest`: True on the verdict that stands
    for its subset now: of the model version checked last in that subset, its newest check
    with a verdict (a later "not enough images" of a quiet hour does not hide it), else its
    newest check (an older version's drift does not stand for a new champion)."""
    standing: dict[str, int] = {}
    for i, row in enumerate(rows):
        subset = row["subset"]
        if subset not in standing:
            standing[subset] = i
            continue
        first = rows[standing[subset]]
        if (
            row.get("model_version") == first.get("model_version")
            and row.get("status") == "checked"
            and first.get("status") != "checked"
        ):
            standing[subset] = i
    chosen = set(standing.values())
    return [row | {"latest": i in chosen} for i, row in enumerate(rows)]


def drift_history(db: Database, model_name: str, *, limit: int = DRIFT_ROWS) -> dict[str, Any]:
    """The model's last `limit` drift checks (`v_drift_history`, one row per checked subset of a
    run), newest first, with the thresholds they were judged by. `verdict` is the view's words
    ("no drift", "drift: <reasons>", "not enough images", "no reference"); `latest` marks the
    newest check of each subset. Returns {model_name, items}."""
    _check_limit(limit)
    rows = db.query(
        "SELECT h.model_version, h.run_key, h.subset, h.checked_at, h.status, h.verdict,"
        " h.n_images, h.n_reference, h.mmd_p_value, h.label_shift, h.label_p_value,"
        " h.reference_confidence, h.mean_confidence, h.confidence_drop, r.confidence_p_value,"
        " h.p_value_threshold, r.min_images, r.label_shift_threshold,"
        " r.confidence_drop_threshold, h.drifted, h.reasons"
        " FROM v_drift_history h JOIN drift_reports r ON r.model_name = h.model_name"
        " AND r.model_version = h.model_version AND r.run_key = h.run_key"
        " AND r.subset = h.subset"
        " WHERE h.model_name = %s"
        " ORDER BY h.checked_at DESC, h.model_version DESC, h.run_key, h.subset LIMIT %s",
        (model_name, limit),
    )
    items = [
        _plain(r)
        | {
            "drifted": bool(r["drifted"]),
            "reasons": r["reasons"].split(",") if r["reasons"] else [],
        }
        for r in rows
    ]
    return {"model_name": model_name, "items": mark_latest(items)}


# ----------------------------------------------------------------------------- thumbnails


def catalogued_image(db: Database, image_id: int) -> ImageRecord:
    """The catalog's record of a live, accepted image; NotCatalogued for anything else."""
    rows = db.query(
        "SELECT id, bucket, object_key, etag, subset, label, size_bytes FROM images"
        " WHERE id = %s AND status = 'ok' AND deleted_at IS NULL",
        (int(image_id),),
    )
    if not rows:
        raise NotCatalogued(f"image {image_id} is not a live, accepted image of the catalog")
    return catalog.image_record(rows[0])


def thumbnail_path(cache_dir: str | Path, record: ImageRecord, size: int) -> Path:
    """Where the thumbnail of (bucket, key, ETag) at `size` is cached: a changed object gets a
    new file."""
    digest = hashlib.sha256(
        f"{record.bucket}\0{record.object_key}\0{record.etag}\0{size}".encode()
    ).hexdigest()
    return Path(cache_dir) / "thumbnails" / digest[:2] / f"{digest}.jpg"


# A cached thumbnail is a JPEG of at most 256 px (KiBs): anything bigger is not one.
THUMBNAIL_FILE_MAX_BYTES = 4 * 2**20
_RESAMPLED_AS_IS = frozenset({"RGB", "RGBA", "L", "LA", "CMYK", "YCbCr"})
# Part of the name of a refusal remembered on disk: a renderer that decodes more forgets them.
THUMBNAIL_RENDERER = "2"


def _on_white(picture):
    """RGB `picture`, transparent parts shown on white (as an image viewer shows them)."""
    from PIL import Image

    if picture.mode not in ("RGBA", "LA"):
        return picture.convert("RGB")
    rgba = picture.convert("RGBA")
    background = Image.new("RGB", rgba.size, (255, 255, 255))
    background.paste(rgba, mask=rgba.getchannel("A"))
    return background


def render_thumbnail(data: bytes, size: int) -> bytes:
    """A JPEG at most `size` pixels on its longer side (aspect kept, EXIF orientation applied).

    Made small before anything else: a JPEG is decoded at a reduced scale (`draft`), and
    neither the colour conversion nor the rotation ever copies the full-size picture (a
    7000 x 7000 JPEG of 800 KB took 570 MB and a second the other way round).

    Raises:
        NoThumbnail: not an image format the catalog accepts, or its bytes do not decode.
    """
    from PIL import Image, ImageOps

    try:
        with Image.open(io.BytesIO(data), formats=catalog.ALLOWED_FORMATS) as img:
            img.seek(0)
            img.draft("RGB", (size, size))
            # Modes LANCZOS resamples as they are; others (palette and 1-bit: nearest neighbour
            # only; 16-bit and float: not at all) get their colours first, at full size.
            picture = img if img.mode in _RESAMPLED_AS_IS else img.convert("RGBA")
            picture.thumbnail((size, size), Image.Resampling.LANCZOS)
            small = ImageOps.exif_transpose(_on_white(picture))
            buf = io.BytesIO()
            small.save(buf, format="JPEG", quality=85)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        raise NoThumbnail(f"no thumbnail: the image does not decode ({exc})") from exc
    return buf.getvalue()


def thumbnail(
    db: Database, store_for: Any, image_id: int, *, size: int, cache_dir: str | Path
) -> tuple[bytes, str]:
    """(JPEG bytes, ETag for HTTP) of a catalogued image's thumbnail, cached on local disk.

    `store_for(bucket)` gives the ObjectStore of a bucket. The object is read only when the
    cache misses, and only while its ETag is still the catalogued one (NotCatalogued else).
    """
    if size not in THUMBNAIL_SIZES:
        raise ValueError(
            f"size must be one of: {', '.join(str(s) for s in THUMBNAIL_SIZES)}; got {size}"
        )
    record = catalogued_image(db, image_id)
    path = thumbnail_path(cache_dir, record, size)
    tag = path.stem[:32]
    try:  # the cache's own files only: never what a symlink planted there points at
        return read_own_file(path, THUMBNAIL_FILE_MAX_BYTES)[0], tag
    except FileNotFoundError:
        pass
    # Why this content has none: not fetched again (by this renderer).
    refused = path.with_suffix(f".r{THUMBNAIL_RENDERER}.none")
    try:
        why = read_own_file(refused, 4096)[0].decode("utf-8", "replace")
    except FileNotFoundError:
        pass
    else:
        raise NoThumbnail(why)
    if record.size is not None and record.size > THUMBNAIL_MAX_BYTES:
        raise NoThumbnail(
            f"no thumbnail: image {image_id} is {record.size / 2**20:.0f} MiB"
            f" (thumbnails are made of images up to {THUMBNAIL_MAX_BYTES // 2**20} MiB)"
        )
    store: ObjectStore = store_for(record.bucket)
    try:  # only the catalogued content (If-Match), in one request
        original = store.get_bytes(record.object_key, if_match=record.etag)
    except Exception as exc:
        if s3_error_code(exc) not in S3_MISSING_CODES | S3_CHANGED_CODES:
            raise
        raise NotCatalogued(
            f"image {image_id} changed or vanished since it was catalogued; rescan the bucket"
        ) from exc
    # A page asks for dozens at once, each may decode megapixels: two at a time, and a request
    # that waits long gives its API-server thread back (503) rather than holding it.
    if not _RENDERING.acquire(timeout=RENDER_WAIT_S):
        raise ServiceUnavailable("thumbnails", "this API server", "busy rendering; try again")
    try:
        data = render_thumbnail(original, size)
    except NoThumbnail as exc:
        write_atomically(refused, str(exc).encode())
        raise
    finally:
        _RENDERING.release()
    write_atomically(path, data)
    log.debug("thumbnail of image %s at %spx cached in %s", image_id, size, path)
    return data, tag
