"""What the results plugin's tests run against: a scored model and a real Airflow API server.

`scored_results`: digits scanned, version 1 promoted by the gate (first champion), version 2
kept out as challenger; both score the test split and the inbox, are evaluated and checked for
drift, so every section of the page has rows. Its own MySQL database, bucket and MLflow model,
removed after.
`api_server`: `airflow api-server` of this checkout (its plugins, the simple auth manager of
`scripts/stack.py`) on a free loopback port, pointed at such a database.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pipeline.config import Settings
from tests.airflow_env import mysql_connection_env

PREFIX = "ds"
SIZE = 16
REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 240
VAL_PERCENT = 30  # enough val images (at least 8) for the champion's drift reference
# The test split (20 images) gets a verdict, the inbox (5) "not enough images".
DRIFT_MIN_IMAGES = 10


@dataclass(frozen=True)
class ScoredResults:
    db: object
    store: object | None
    model_name: str
    champion: str
    challenger: str | None
    mysql_database: str


def _drift_reference(db, store, model, dataset_version: str, cache_dir: Path):
    """`model`'s drift reference on the dataset's val images, built as training builds it."""
    import torch

    from pipeline import drift, train
    from pipeline.data import make_loader
    from pipeline.train_plan import TrainParams

    data = train.load_data(
        db, store, dataset_version, TrainParams(image_size=SIZE), cache_dir=cache_dir
    )
    loader = make_loader(data["val_set"], batch_size=64, shuffle=False, num_workers=0, seed=0)
    reference = drift.build_reference(model, loader, torch.device("cpu"), labels=data["labels"])
    assert reference is not None, "too few val images for a drift reference: raise VAL_PERCENT"
    return reference


def _register(
    db,
    store,
    model_name: str,
    label_map: dict[str, int],
    dataset_version: str,
    seed: int,
    *,
    cache_dir: Path,
    drift_reference: bool,
) -> str:
    import mlflow
    import torch

    from pipeline import train
    from pipeline.model import build_model

    torch.manual_seed(seed)
    model = build_model(len(label_map))
    reference = (
        _drift_reference(db, store, model, dataset_version, cache_dir) if drift_reference else None
    )
    with mlflow.start_run():
        return train.log_and_register(
            model,
            model_name=model_name,
            label_map=label_map,
            image_size=SIZE,
            dataset_version=dataset_version,
            run_key=f"results-{seed}",
            drift_reference=reference,
        )


def _score(db, store, model_name: str, alias: str, cache_dir: Path) -> str:
    """Score the test split and the inbox as run `manual__<alias>`, evaluate, check drift."""
    from pipeline import drift, score

    plan = score.plan_scoring(
        db, store.bucket, PREFIX, model_name=model_name, model_ref=alias, shards=1
    )
    for shard in plan["shards"]:
        score.score_shard(
            db,
            store,
            model_name=model_name,
            model_version=plan["model_version"],
            shard=shard,
            shards=plan["n_shards"],
            prefix=PREFIX,
            cache_dir=cache_dir,
            dataset_version=plan["dataset_version"],
            batch_size=16,
            workers=4,
            run_key=f"manual__{alias}",
        )
    score.evaluate(
        db, model_name=model_name, model_version=plan["model_version"], log_to_mlflow=False
    )
    drift.check_drift(
        db,
        model_name=model_name,
        model_version=plan["model_version"],
        run_key=f"manual__{alias}",
        cache_dir=cache_dir,
        thresholds=drift.Thresholds(min_images=DRIFT_MIN_IMAGES),
        log_to_mlflow=False,
    )
    return plan["model_version"]


def new_suffix() -> str:
    return uuid.uuid4().hex[:10]


def scope_names(settings: Settings, suffix: str) -> tuple[str, str]:
    """(MySQL database, registered model name) of a `scored_results` suffix."""
    return f"{settings.mysql.database}_test_{suffix}", f"test-model-{suffix}"


@contextmanager
def scored_results(
    settings: Settings, workdir: Path, suffix: str | None = None
) -> Iterator[ScoredResults]:
    """Digits (6 per label, 2 of them test) and 5 inbox images; a champion (with a drift
    reference: its test split is checked, its inbox has too few images) and a challenger
    (without: "no reference"), both scored, evaluated and checked for drift, in database
    `<MYSQL_DATABASE>_test_<suffix>` and model `test-model-<suffix>` (`scope_names`).
    Everything created is removed on exit."""
    import mlflow
    from mlflow import MlflowClient

    from pipeline import catalog, registry
    from pipeline.db import create_database, drop_database, migrate
    from pipeline.demo_data import render_digits
    from pipeline.store import ObjectStore
    from pipeline.upload import upload_tree

    suffix = suffix or new_suffix()
    database, model_name = scope_names(settings, suffix)
    experiment = model_name  # training logs to the experiment named like the model
    db = create_database(settings.mysql, database)
    store = ObjectStore(settings.s3, f"test-{suffix}")
    mlflow.set_tracking_uri(settings.mlflow_tracking_uri)
    try:
        migrate(db)
        store.ensure_bucket()
        render_digits(workdir / "digits", size=SIZE, per_label=6, inbox=5, test_percent=34)
        upload_tree(store, workdir / "digits", PREFIX)
        dataset = catalog.scan(db, store, PREFIX, val_percent=VAL_PERCENT)["dataset_version"]
        label_map = catalog.get_dataset(db, dataset)["label_map"]
        mlflow.set_experiment(experiment)
        cache_dir = workdir / "cache"
        # explicit: gated as a person naming the version would (the test registers them itself).
        gate = {
            "actor": "pytest",
            "cache_dir": cache_dir,
            "promotion_margin": 0.0,
            "explicit": True,
        }
        first = _register(
            db, store, model_name, label_map, dataset, 0, cache_dir=cache_dir, drift_reference=True
        )
        registry.promote(db, store, model_name, first, min_accuracy=0.0, **gate)
        second = _register(
            db, store, model_name, label_map, dataset, 1, cache_dir=cache_dir, drift_reference=False
        )
        # Above any accuracy a model can reach: the gate keeps it out, as challenger.
        registry.promote(db, store, model_name, second, min_accuracy=1.01, **gate)
        champion = _score(db, store, model_name, "champion", cache_dir)
        challenger = _score(db, store, model_name, "challenger", cache_dir)
        yield ScoredResults(db, store, model_name, champion, challenger, database)
    finally:
        drop_database(settings.mysql, database)
        try:
            store.delete_bucket()
        except Exception:  # noqa: BLE001 - the bucket may never have been created
            pass
        client = MlflowClient(settings.mlflow_tracking_uri)
        try:
            client.delete_registered_model(model_name)
        except Exception:  # noqa: BLE001 - nothing may have been registered
            pass
        found = client.get_experiment_by_name(experiment)
        if found is not None:
            client.delete_experiment(found.experiment_id)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/api/v2/monitor/health", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


class ApiServer:
    """A started `airflow api-server`; `wait()` blocks until it answers (or it died)."""

    def __init__(self, proc: subprocess.Popen, url: str, log_path: Path) -> None:
        self.proc, self.url, self.log_path = proc, url, log_path

    def wait(self, timeout: float = START_TIMEOUT_S) -> str:
        deadline = time.monotonic() + timeout
        while not _healthy(self.url):
            tail = self.log_path.read_text(errors="replace")[-3000:]
            if self.proc.poll() is not None:
                raise RuntimeError(f"airflow api-server exited:\n{tail}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"airflow api-server not up in {timeout:.0f}s:\n{tail}")
            time.sleep(1)
        return self.url


@contextmanager
def api_server(
    settings: Settings, database: str, model_name: str, workdir: Path
) -> Iterator[ApiServer]:
    """`airflow api-server` (one worker, loopback, a free port) reading `database`, started
    in the background (it boots while the caller builds the data); stopped on exit."""
    port = _free_port()
    env = {
        **os.environ,
        **mysql_connection_env(settings, database),
        "AIRFLOW__API__PORT": str(port),
        "MODEL_NAME": model_name,
        "PIPELINE_CACHE_DIR": str(workdir / "cache"),
    }
    airflow = shutil.which("airflow", path=env.get("PATH")) or "airflow"
    argv = [airflow, "api-server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    log_path = workdir / "api-server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            argv,
            env=env,
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        yield ApiServer(proc, f"http://127.0.0.1:{port}", log_path)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
