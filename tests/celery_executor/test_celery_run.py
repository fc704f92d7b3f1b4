"""`image_classification` on the CeleryExecutor, triggered through the REST API.

Redis is the broker, PostgreSQL holds Airflow's metadata and Celery's results, and two
`airflow celery worker` processes (`worker-a`: default, train and score queues; `worker-b`:
score only) run the tasks. Mapped scoring shards spread over both workers, training runs where
its queue sends it and loads data with DataLoader worker processes inside the Celery worker, and
a worker SIGKILLed while it holds a shard costs a retry on the other worker, not a prediction.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from tests.celery_executor.cluster import ApiError, CeleryAirflow
from tests.celery_executor.conftest import SCORE_QUEUE, TRAIN_QUEUE

pytestmark = [pytest.mark.integration, pytest.mark.slow]

RUN_TIMEOUT_S = 900  # bounds a stuck run; generous for a machine shared with other work
SHARDS = 4


def wait_for_run(
    cluster: CeleryAirflow,
    run_id: str,
    on_poll: Callable[[list[dict]], None] | None = None,
    timeout: float = RUN_TIMEOUT_S,
) -> dict[tuple[str, int], dict]:
    """Poll the run until it ends; its task instances by (task_id, map_index) once it succeeded.

    `on_poll` sees the task instances at every poll (twice a second). A failed or timed-out run
    fails the test with the states of its tasks and the last lines of every component's log.
    """
    deadline = time.monotonic() + timeout
    state = "queued"
    tis: list[dict] = []
    while time.monotonic() < deadline:
        try:
            state = cluster.api.dag_run(run_id)["state"]
            tis = cluster.api.task_instances(run_id)
        except (OSError, ApiError) as exc:  # a busy API server: ask again
            print(f"poll of {run_id}: {exc}")
            continue
        if on_poll is not None:
            on_poll(tis)
        if state in ("success", "failed"):
            break
        time.sleep(0.5)
    summary = sorted(
        (ti["task_id"], ti["map_index"], ti["state"], ti["hostname"], ti["try_number"])
        for ti in tis
    )
    assert state == "success", f"run {run_id} ended {state}: {summary}\n{cluster.logs_tail()}"
    return {(ti["task_id"], ti["map_index"]): ti for ti in tis}


def task_log(cluster: CeleryAirflow, run_id: str, task_id: str, attempt: int = 1) -> str:
    folder = cluster.root / "airflow" / "logs" / "dag_id=image_classification" / f"run_id={run_id}"
    paths = sorted(folder.glob(f"task_id={task_id}/attempt={attempt}.log"))
    assert paths, f"no log of {task_id} attempt {attempt} under {folder}"
    return paths[0].read_text(errors="replace")


def predictions_per_image(world) -> dict[str, int]:
    """How many images got no, one, or several predictions, and how many rows there are."""
    rows = world["db"].query(
        "SELECT i.id, COUNT(p.id) AS n FROM images i LEFT JOIN predictions p ON p.image_id = i.id "
        "WHERE i.subset IN ('test', 'inbox') AND i.status = 'ok' AND i.deleted_at IS NULL "
        "GROUP BY i.id"
    )
    return {
        "images": len(rows),
        "without": sum(1 for r in rows if r["n"] == 0),
        "several": sum(1 for r in rows if r["n"] > 1),
        "rows": world["db"].query("SELECT COUNT(*) AS n FROM predictions")[0]["n"],
    }


def first_run(cluster: CeleryAirflow, world) -> dict:
    """Train, gate and score once (run 1), watching worker-a's processes while it trains."""
    if world["run_ids"]:
        return world["first_run"]
    worker_a = next(iter(cluster.workers))
    loader_pids: set[int] = set()

    def watch(tis: list[dict]) -> None:
        if any(ti["task_id"] == "train_model" and ti["state"] == "running" for ti in tis):
            loader_pids.update(
                p.pid for p in cluster.worker_processes(worker_a) if _name(p) == "pt_data_worker"
            )

    run_id = cluster.api.trigger(world["conf"])
    started = time.monotonic()
    tis = wait_for_run(cluster, run_id, watch)
    world["run_ids"].append(run_id)
    world["first_run"] = {
        "run_id": run_id,
        "tis": tis,
        "loader_pids": loader_pids,
        "seconds": time.monotonic() - started,
    }
    return world["first_run"]


def _name(proc) -> str:
    try:
        return proc.name()
    except Exception:  # noqa: BLE001 - the process ended between listing and reading
        return ""


def test_shards_spread_over_both_workers_and_queues_route_training(cluster, world, settings):
    from mlflow import MlflowClient

    worker_a, worker_b = cluster.workers
    run = first_run(cluster, world)
    tis = run["tis"]

    train = tis[("train_model", -1)]
    assert (train["state"], train["queue"], train["hostname"]) == (
        "success",
        TRAIN_QUEUE,
        worker_a,
    )
    shards = [tis[("score_images", i)] for i in range(SHARDS)]
    assert {ti["state"] for ti in shards} == {"success"}
    assert {ti["queue"] for ti in shards} == {SCORE_QUEUE}
    assert {ti["hostname"] for ti in shards} == {worker_a, worker_b}
    # Everything else is on the default queue, which only worker-a consumes.
    others = [
        ti
        for ti in tis.values()
        if ti["task_id"] not in ("train_model", "score_images") and ti["state"] == "success"
    ]
    assert others and {(ti["queue"], ti["hostname"]) for ti in others} == {("default", worker_a)}

    counts = predictions_per_image(world)
    assert counts["images"] > 50
    assert counts == {
        "images": counts["images"],
        "without": 0,
        "several": 0,
        "rows": counts["images"],
    }

    # Training's DataLoader ran its worker processes inside the Celery worker's process tree.
    client = MlflowClient(settings.mlflow_tracking_uri)
    version = client.get_model_version_by_alias(world["model_name"], "champion")
    assert client.get_run(version.run_id).data.params["num_workers"] == "2"
    assert len(run["loader_pids"]) >= 2, "no DataLoader worker seen under worker-a while training"
    log = task_log(cluster, run["run_id"], "train_model")
    assert "DataLoader workers allowed" in log  # the Celery pool's daemon flag was lifted
    print(f"\ncelery run 1: {run['seconds']:.0f}s, loader workers {sorted(run['loader_pids'])}")


def test_a_worker_killed_mid_shard_is_retried_on_the_other(cluster, world):
    worker_a, worker_b = cluster.workers
    first_run(cluster, world)  # a champion to score with
    killed: dict = {}

    def kill_b_once_it_holds_a_shard(tis: list[dict]) -> None:
        if killed:
            return
        for ti in tis:
            if (ti["task_id"], ti["state"], ti["hostname"]) == (
                "score_images",
                "running",
                worker_b,
            ):
                killed["map_index"] = ti["map_index"]
                killed["pids"] = cluster.kill_worker(worker_b)
                return

    conf = world["conf"] | {"score_only": True, "force_rescore": True}
    run_id = cluster.api.trigger(conf)
    started = time.monotonic()
    tis = wait_for_run(cluster, run_id, kill_b_once_it_holds_a_shard)
    assert killed, "worker-b never held a scoring shard"

    shard = tis[("score_images", killed["map_index"])]
    assert (shard["state"], shard["hostname"]) == ("success", worker_a)
    assert shard["try_number"] >= 2
    tries = cluster.api.tries(run_id, "score_images", killed["map_index"])
    first = next(t for t in tries if t["try_number"] == 1)
    assert (first["hostname"], first["state"]) == (worker_b, "failed")
    assert {tis[("score_images", i)]["state"] for i in range(SHARDS)} == {"success"}

    # Every image scored again in this run, exactly once, the killed shard's included.
    counts = predictions_per_image(world)
    assert counts == {
        "images": counts["images"],
        "without": 0,
        "several": 0,
        "rows": counts["images"],
    }
    by_run = world["db"].query("SELECT run_key, COUNT(*) AS n FROM predictions GROUP BY run_key")
    assert by_run == [{"run_key": run_id, "n": counts["images"]}]
    print(
        f"\ncelery run 2: {time.monotonic() - started:.0f}s; killed shard "
        f"{killed['map_index']} on {worker_b} ({len(killed['pids'])} processes)"
    )
