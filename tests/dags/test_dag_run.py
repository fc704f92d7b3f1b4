"""`airflow dags test` end to end against the real local stack, then every task alone."""

from __future__ import annotations

import ast
import json
import os
import re
import subprocess
import sys
import uuid

import pytest

from pipeline import catalog
from pipeline.config import REPO_ROOT
from tests.airflow_env import mysql_connection_env

DAG_ID = "image_classification"


@pytest.fixture(scope="module")
def world(settings, tmp_path_factory):
    """A private database, bucket and model name, wired into Airflow's connections by env."""
    from mlflow import MlflowClient

    from pipeline import demo_data, upload
    from pipeline.db import create_database, drop_database
    from pipeline.store import ObjectStore

    suffix = uuid.uuid4().hex[:8]
    db_name = f"{settings.mysql.database}_test_dag_{suffix}"
    db = create_database(settings.mysql, db_name)
    bucket = f"test-dag-{suffix}"
    store = ObjectStore(settings.s3, bucket)
    store.ensure_bucket()
    prefix = "datasets/digits"
    local = tmp_path_factory.mktemp("digits")
    demo_data.render_digits(local, size=32, fmt="png", inbox=12)
    upload.upload_tree(store, local, prefix)
    model_name = f"test-dag-model-{suffix}"
    env = dict(os.environ)
    env.update(
        {
            **mysql_connection_env(settings, db_name),
            "MODEL_NAME": model_name,
            "PIPELINE_TASK_RETRIES": "0",
            "PIPELINE_CACHE_DIR": str(tmp_path_factory.mktemp("cache")),
        }
    )
    conf = {
        "bucket": bucket,
        "prefix": prefix,
        "epochs": 2,
        "image_size": 32,
        "batch_size": 64,
        "learning_rate": 0.003,
        "min_accuracy": 0.2,
        "shards": 2,
        "num_workers": 2,
        "augment": False,
        "val_percent": 20,  # not the default: the inbox DAG must keep it (its scan has no options)
    }
    try:
        yield {
            "db": db,
            "store": store,
            "env": env,
            "conf": conf,
            "model_name": model_name,
            "prefix": prefix,
            "run_ids": [],  # of `airflow dags test` runs, in order
            # The logical date of `task_test`'s runs: one second of 2026-11-24 of its own.
            "when": f"2026-11-24T{int(suffix, 16) % 86400 // 3600:02d}"
            f":{int(suffix, 16) % 3600 // 60:02d}:{int(suffix, 16) % 60:02d}+00:00",
        }
    finally:
        drop_database(settings.mysql, db_name)
        store.delete_bucket()
        try:
            MlflowClient(settings.mlflow_tracking_uri).delete_registered_model(model_name)
        except Exception:  # noqa: BLE001 - nothing registered when an early step failed
            pass


def airflow(
    world, *args: str, timeout: int = 900, check: bool = True
) -> subprocess.CompletedProcess:
    """Run the airflow CLI in the test's environment; with `check`, fail the test on exit != 0."""
    result = subprocess.run(
        ["airflow", *args],
        env=world["env"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    if check and result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).splitlines()[-60:])
        pytest.fail(f"airflow {' '.join(args[:3])} exited {result.returncode}:\n{tail}")
    return result


def dags_test(world, conf: dict | None = None) -> str:
    """One `airflow dags test` run (fails the test unless the run succeeds); returns its run id.

    `conf` defaults to the module's; a scheduled run's is only where the data is."""
    conf = world["conf"] if conf is None else conf
    result = airflow(world, "dags", "test", DAG_ID, "-c", json.dumps(conf))
    output = result.stdout + result.stderr
    world["last_output"] = output
    finished = re.search(r"DagRun Finished: .*?run_id=([^,\s]+),.*?state=success", output)
    assert finished, output[-3000:]
    return finished.group(1)


def dag_test_at(world, dag_id: str, run_id: str, conf: dict) -> str:
    """Run `dag_id` once, as `airflow dags test` does, with the run id `run_id` (a manual run id
    of `airflow dags test`: `manual__<time>`); fails the test unless the run succeeds."""
    script = (
        "import json, sys\n"
        "from datetime import datetime\n"
        "from airflow.utils.cli import get_bagged_dag\n"
        "when = datetime.fromisoformat(sys.argv[2].removeprefix('manual__'))\n"
        "run = get_bagged_dag(None, sys.argv[1]).test(\n"
        "    run_after=when, logical_date=when, run_conf=json.loads(sys.argv[3])\n"
        ")\n"
        "print(f'RUN {run.run_id} {run.state}')\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, dag_id, run_id, json.dumps(conf)],
        env=world["env"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    output = world["last_output"] = result.stdout + result.stderr
    finished = re.search(r"^RUN (\S+) success$", result.stdout, re.MULTILINE)
    assert result.returncode == 0 and finished, output[-3000:]
    return finished.group(1)


def prediction_count(world) -> int:
    return world["db"].query("SELECT COUNT(*) AS n FROM predictions")[0]["n"]


def scorable_count(world) -> int:
    return world["db"].query(
        "SELECT COUNT(*) AS n FROM images WHERE subset IN ('test', 'inbox') AND status = 'ok' "
        "AND deleted_at IS NULL"
    )[0]["n"]


@pytest.mark.slow
def test_dag_runs_end_to_end_then_skips_an_unchanged_bucket(world, settings):
    from mlflow import MlflowClient

    world["run_ids"].append(dags_test(world))

    client = MlflowClient(settings.mlflow_tracking_uri)
    champion = client.get_model_version_by_alias(world["model_name"], "champion")
    n_scorable = scorable_count(world)
    assert n_scorable > 300
    rows = world["db"].query(
        "SELECT model_version, COUNT(*) AS n, COUNT(DISTINCT image_id) AS images FROM predictions "
        "GROUP BY model_version"
    )
    assert rows == [{"model_version": int(champion.version), "n": n_scorable, "images": n_scorable}]
    test_rows = world["db"].query(
        "SELECT COUNT(*) AS n FROM predictions p JOIN images i ON i.id = p.image_id "
        "WHERE i.subset = 'test'"
    )[0]["n"]
    assert (
        test_rows
        == world["db"].query(
            "SELECT COUNT(*) AS n FROM images WHERE subset = 'test' AND status = 'ok'"
        )[0]["n"]
    )
    versions_before = len(client.search_model_versions(f"name='{world['model_name']}'"))
    dataset = catalog.latest_dataset(world["db"], world["conf"]["bucket"], world["prefix"])

    # As the nightly schedule runs it: no conf but where the data is (S3_BUCKET/S3_PREFIX of
    # the deployment). The scan keeps the prefix's saved settings (val_percent 20): same
    # dataset version, no training (before: val re-carved at 10 %, a new version trained).
    where = {k: world["conf"][k] for k in ("bucket", "prefix")}
    world["run_ids"].append(dags_test(world, where))
    assert "skipping training" in world["last_output"]
    after = catalog.latest_dataset(world["db"], world["conf"]["bucket"], world["prefix"])
    assert after["dataset_version"] == dataset["dataset_version"]
    assert after["scan_config"]["val_percent"] == 20
    # It scored nothing new: no drift verdict of 0 images hides the one that stands.
    reports = "SELECT COUNT(*) AS n FROM drift_reports WHERE run_key = %s"
    assert world["db"].query(reports, (world["run_ids"][0],))[0]["n"] == 2  # test and inbox
    assert world["db"].query(reports, (world["run_ids"][-1],))[0]["n"] == 0
    assert prediction_count(world) == n_scorable
    assert len(client.search_model_versions(f"name='{world['model_name']}'")) == versions_before


def task_test(world, task_id: str, when: str | None = None, *extra: str, **conf) -> dict:
    """`airflow tasks test` one task; returns its final state and returned value.

    `tasks test` exits 0 even when the task fails, so the state is read from its log. Each
    call gets a temporary DAG run that Airflow deletes afterwards, unless a run with that
    logical date exists: a `tasks test` killed earlier leaves its run (and XComs) behind, so
    the default date is this test module's own (`world["when"]`), never an earlier session's.
    """
    params = json.dumps(world["conf"] | conf)
    when = when or world["when"]
    result = airflow(world, "tasks", "test", DAG_ID, task_id, when, *extra, "-t", params)
    output = result.stdout + result.stderr
    states = re.findall(r"new_state=(\w+)", output)
    returned = re.search(r"Returned value was: (.*?)\s+\[airflow", output)
    return {
        "state": states[-1] if states else None,
        "value": ast.literal_eval(returned.group(1)) if returned else None,
        "output": output,
    }


def champion_version(world, settings) -> int:
    from mlflow import MlflowClient

    client = MlflowClient(settings.mlflow_tracking_uri)
    return int(client.get_model_version_by_alias(world["model_name"], "champion").version)


@pytest.mark.slow
def test_each_task_runs_alone(world, settings):
    """`airflow tasks test` of every task, in order, each finding its inputs in MySQL/MLflow."""
    from mlflow import MlflowClient

    if not world["run_ids"]:
        world["run_ids"].append(dags_test(world))
    client = MlflowClient(settings.mlflow_tracking_uri)
    db = world["db"]

    step = task_test(world, "check_services")
    assert step["state"] == "success", step["output"][-3000:]
    assert f"list ok in s3://{world['conf']['bucket']}/{world['prefix']}" in step["value"]["s3"]

    step = task_test(world, "scan_images")
    assert step["state"] == "success"
    latest = db.query("SELECT dataset_version FROM scans ORDER BY id DESC LIMIT 1")
    assert step["value"]["dataset_version"] == latest[0]["dataset_version"]
    assert step["value"]["changed"] is False

    step = task_test(world, "check_dataset")
    assert step["state"] == "success"
    assert step["value"] is False and "skipping training" in step["output"]

    versions = len(client.search_model_versions(f"name='{world['model_name']}'"))
    step = task_test(world, "train_model", force_retrain=True)
    assert step["state"] == "success", step["output"][-3000:]
    assert step["value"]["skipped"] is False
    new_version = int(step["value"]["model_version"])
    assert len(client.search_model_versions(f"name='{world['model_name']}'")) == versions + 1

    # Its gate never ran (as when a run's promote_model failed for good after training): the
    # next run, with nothing to train on that dataset, gates it.
    dags_test(world, {k: world["conf"][k] for k in ("bucket", "prefix")})
    assert "skipping training" in world["last_output"]
    decided = db.query(
        "SELECT decision FROM model_versions WHERE model_name = %s AND model_version = %s",
        (world["model_name"], new_version),
    )
    assert decided[0]["decision"] in ("promoted", "challenger")
    # The gate alone (its own run id, no XCom) finds no version left undecided.
    again = task_test(world, "promote_model")
    assert again["state"] == "skipped", again["output"][-3000:]

    step = task_test(world, "publish_champion")
    assert step["state"] == "skipped"  # alone it has no gate decision to publish

    champion = champion_version(world, settings)
    step = task_test(world, "plan_scoring")
    assert step["state"] == "success"
    scored_by_champion = db.query(
        "SELECT COUNT(*) AS n FROM predictions WHERE model_version = %s", (champion,)
    )[0]["n"]
    if scored_by_champion == scorable_count(world):
        assert step["value"] == []
    else:
        assert {s["model_version"] for s in step["value"]} == {str(champion)}

    step = task_test(world, "evaluate_model")
    assert step["state"] == "success"
    assert int(step["value"]["model_version"]) == champion
    labelled = db.query(
        "SELECT COUNT(*) AS n FROM predictions WHERE model_version = %s AND subset = 'test'",
        (champion,),
    )[0]["n"]
    assert step["value"]["n_images"] == labelled
    assert "per_class" not in step["value"]  # the XCom stays tiny whatever the classes


@pytest.mark.slow
def test_one_shard_of_a_run_reruns_alone(world):
    """A mapped shard reruns alone inside an existing run (its plan is that run's XCom)."""
    if not world["run_ids"]:
        world["run_ids"].append(dags_test(world))
    run_id = world["run_ids"][0]
    before = world["db"].query("SELECT COUNT(*) AS n, MAX(scored_at) AS last FROM predictions")[0]
    step = task_test(world, "score_images", run_id, "--map-index", "0", force_rescore=True)
    assert step["state"] == "success", step["output"][-3000:]
    assert step["value"]["shard"] == 0 and step["value"]["scored"] > 0
    after = world["db"].query("SELECT COUNT(*) AS n, MAX(scored_at) AS last FROM predictions")[0]
    assert after["n"] == before["n"]  # overwritten, not duplicated
    assert after["last"] > before["last"]


@pytest.mark.slow
def test_bad_conf_is_refused_before_any_work(world):
    """conf from `dags test -c` (like the REST API) is validated: the run fails, naming the param."""
    conf = world["conf"] | {"epochs": 0}
    result = airflow(
        world, "dags", "test", DAG_ID, "-c", json.dumps(conf), timeout=300, check=False
    )
    output = result.stdout + result.stderr
    assert result.returncode != 0
    assert "epochs" in output and "minimum of 1" in output
    assert "Returned value was" not in output  # no task did anything


@pytest.mark.slow
def test_inbox_dag_scores_new_inbox_images_with_the_champion(world, settings, tmp_path):
    """The second DAG end to end: new files in inbox/ get one prediction each, by the champion."""
    from mlflow import MlflowClient

    from pipeline import demo_data

    champion = MlflowClient(settings.mlflow_tracking_uri).get_model_version_by_alias(
        world["model_name"], "champion"
    )
    local = tmp_path / "more"
    demo_data.render_digits(local, size=32, fmt="png", inbox=5, per_label=1)
    extra = sorted(p.name for p in (local / "inbox").iterdir())
    for name in extra:
        world["store"].put_bytes(
            f"{world['prefix']}/inbox/new-{name}", (local / "inbox" / name).read_bytes()
        )

    from pipeline import catalog

    def dataset() -> tuple[str, int]:
        found = catalog.latest_dataset(world["db"], world["conf"]["bucket"], world["prefix"])
        stored = catalog.load_scan_config(world["db"], world["conf"]["bucket"], world["prefix"])
        return found["dataset_version"], stored.val_percent

    before = dataset()
    assert before[1] == 20
    conf = {"bucket": world["conf"]["bucket"], "prefix": world["prefix"]}
    for _ in range(2):  # the second run finds nothing new
        result = airflow(
            world, "dags", "test", "image_classification_inbox", "-c", json.dumps(conf)
        )
        output = result.stdout + result.stderr
        assert re.search(r"DagRun Finished: .*?state=success", output), output[-3000:]
        rows = world["db"].query(
            "SELECT p.model_version, COUNT(*) AS n FROM predictions p JOIN images i"
            " ON i.id = p.image_id WHERE i.object_key LIKE %s GROUP BY p.model_version",
            (f"{world['prefix']}/inbox/new-%",),
        )
        assert rows == [{"model_version": int(champion.version), "n": len(extra)}]
    latest = world["db"].query(
        "SELECT COUNT(*) AS n FROM v_inbox_latest_predictions WHERE predicted_label IS NULL"
    )
    assert latest == [{"n": 0}]
    # Its scans used the main run's stored configuration: val not re-carved, same version.
    assert dataset() == before


def test_inbox_dag_flags_shifted_inbox_images_and_emits_the_drift_asset_event(world, tmp_path):
    """Colour-inverted digits dropped into inbox/: the inbox DAG scores them, its check flags
    the inbox window as drifted and `publish_drift` emits an `imgpipe_drift` asset event."""
    import io

    from PIL import Image, ImageOps

    from pipeline import demo_data

    if not world["run_ids"]:
        world["run_ids"].append(dags_test(world))
    local = tmp_path / "shifted"
    demo_data.render_digits(local, size=32, fmt="png", inbox=40, per_label=1)
    for path in sorted((local / "inbox").iterdir()):
        buf = io.BytesIO()
        ImageOps.invert(Image.open(path).convert("RGB")).save(buf, format="PNG")
        world["store"].put_bytes(f"{world['prefix']}/inbox/inverted-{path.name}", buf.getvalue())
    # The inbox run gets the main run's run id, as two DAGs' scheduled runs of the same minute
    # do (a scheduled run id is its logical date): neither may take the other's drift rows.
    main_run = world["run_ids"][0]
    reports = (
        "SELECT subset, n_images, drifted, status, checked_at FROM drift_reports"
        " WHERE run_key = %s ORDER BY subset"
    )
    main_reports = world["db"].query(reports, (main_run,))
    assert [r["subset"] for r in main_reports] == ["inbox", "test"]
    conf = {"bucket": world["conf"]["bucket"], "prefix": world["prefix"]}
    run_id = dag_test_at(world, "image_classification_inbox", main_run, conf)
    assert run_id == main_run

    assert world["db"].query(reports, (main_run,)) == main_reports
    run_key = f"image_classification_inbox/{run_id}"
    report = world["db"].query(
        "SELECT n_images, drifted, verdict FROM v_drift_history WHERE run_key = %s"
        " AND subset = 'inbox'",
        (run_key,),
    )
    assert len(report) == 1 and report[0]["drifted"] == 1, world["last_output"][-6000:]
    assert report[0]["n_images"] >= 40  # the inverted ones, with the inbox images not yet judged
    # The event, as Airflow recorded it in its metadata database.
    import sqlalchemy

    url = airflow(world, "config", "get-value", "database", "sql_alchemy_conn").stdout.strip()
    engine = sqlalchemy.create_engine(url.splitlines()[-1])
    with engine.connect() as conn:
        events = conn.execute(
            sqlalchemy.text(
                "SELECT e.extra FROM asset_event e JOIN asset a ON a.id = e.asset_id"
                " WHERE a.name = 'imgpipe_drift' AND e.source_run_id = :run"
            ),
            {"run": run_id},
        ).all()
    engine.dispose()
    assert len(events) == 1, events
    extra = events[0][0] if isinstance(events[0][0], dict) else json.loads(events[0][0])
    assert extra["model_name"] == world["model_name"] and extra["run_key"] == run_key
    assert "embeddings" in extra["subsets"]["inbox"]


SECRET_VARIABLES = (
    "MYSQL_PASSWORD",
    "MYSQL_ROOT_PASSWORD",
    "AWS_SECRET_ACCESS_KEY",
    "MLFLOW_TRACKING_PASSWORD",
    "AIRFLOW_ADMIN_PASSWORD",
)


@pytest.mark.slow
def test_no_password_from_env_reaches_a_log_after_a_dag_run(world):
    """After a whole DAG run: the stack's logs, Airflow's log folder and the run's own output
    (where `dags test` writes every task's log) hold none of the `.env` passwords (connections,
    tracking URI and MLflow backend included)."""
    from pipeline.config import parse_env_text

    if not world["run_ids"]:
        world["run_ids"].append(dags_test(world))
    env = parse_env_text((REPO_ROOT / ".env").read_text(encoding="utf-8"))
    secrets = {name: env[name] for name in SECRET_VARIABLES if len(env.get(name) or "") >= 4}
    assert secrets, "no password in .env to look for"
    roots = [REPO_ROOT / ".local" / "logs", REPO_ROOT / ".local" / "airflow" / "logs"]
    files = [p for root in roots if root.is_dir() for p in root.rglob("*") if p.is_file()]
    # `airflow dags test` writes every task's log to its output: that is the run's task log.
    assert "Returned value was" in world["last_output"], "no task log in the run's output"
    leaks = [
        f"{name} in {path.relative_to(REPO_ROOT)}"
        for path in files
        for name, value in secrets.items()
        if value.encode() in path.read_bytes()
    ]
    leaks += [f"{n} in the run's output" for n, v in secrets.items() if v in world["last_output"]]
    assert leaks == []
