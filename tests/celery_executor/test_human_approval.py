"""Promotion approval answered through Airflow's REST API, as a reviewer's tool would.

Runs with `require_approval` train a version the gate would promote (`promotion_margin` 1), and
`approve_promotion` waits in `awaiting_input` with the question in Required Actions. Approve moves
the champion and the run scores with it; reject keeps the champion and records who; no answer
within `approval_timeout_hours` moves nothing; an answer whose write to MySQL fails is applied
by the retry, not asked again. Same CeleryExecutor Airflow as the Celery runs (package fixtures),
after them: every answer is checked against MLflow and MySQL.
"""

from __future__ import annotations

import pytest

from pipeline import registry
from pipeline.db import mysql_lock_name
from tests.celery_executor.cluster import ApiError, CeleryAirflow, wait_until
from tests.celery_executor.test_celery_run import first_run, task_log, wait_for_run

pytestmark = [pytest.mark.integration, pytest.mark.slow]

APPROVAL = "approve_promotion"
HELD_TIMEOUT_S = 600


def champion(world) -> str | None:
    return registry.alias_version(world["model_name"], "champion")


def ensure_champion(cluster: CeleryAirflow, world) -> str:
    """The champion in force; the Celery runs' first run makes one when this module runs alone."""
    if champion(world) is None:
        first_run(cluster, world)
    found = champion(world)
    assert found is not None
    return found


def trigger_held(cluster: CeleryAirflow, world, **conf) -> str:
    """A run whose new version the gate would promote, held for approval. One scoring shard:
    the shards' spread is the Celery runs' business, and each shard is a task process to start."""
    return cluster.api.trigger(
        world["conf"]
        | {"force_retrain": True, "require_approval": True, "promotion_margin": 1.0, "shards": 1}
        | conf
    )


def wait_for_question(cluster: CeleryAirflow, run_id: str) -> dict[str, dict]:
    """The run's task instances once `approve_promotion` waits for an answer."""

    def asked() -> dict[str, dict] | None:
        if cluster.api.dag_run(run_id)["state"] in ("success", "failed"):
            raise AssertionError(f"run {run_id} ended without asking:\n{cluster.logs_tail()}")
        tis = {ti["task_id"]: ti for ti in cluster.api.task_instances(run_id)}
        return tis if tis[APPROVAL]["state"] == "awaiting_input" else None

    return wait_until(asked, HELD_TIMEOUT_S, f"{APPROVAL} of {run_id} to await input")


def version_of(world, run_id: str) -> dict:
    rows = world["db"].query(
        "SELECT model_version, decision, decision_reason, review, reviewer, review_comment"
        " FROM model_versions WHERE model_name = %s AND run_key = %s",
        (world["model_name"], run_id),
    )
    assert len(rows) == 1, rows
    return rows[0]


def scored_by(world, run_id: str) -> dict[int, int]:
    rows = world["db"].query(
        "SELECT model_version, COUNT(*) AS n FROM predictions WHERE run_key = %s"
        " GROUP BY model_version",
        (run_id,),
    )
    return {r["model_version"]: r["n"] for r in rows}


def lock_waiters(world) -> list[int]:
    """MySQL connections (other than ours) waiting for the model's alias lock."""
    lock = mysql_lock_name(world["db"], registry.alias_lock_name(world["model_name"]))
    rows = world["db"].query(
        "SELECT ID FROM information_schema.PROCESSLIST"
        " WHERE INFO LIKE %s AND ID <> CONNECTION_ID()",
        (f"SELECT GET_LOCK('{lock}'%",),
    )
    return [int(r["ID"]) for r in rows]


def test_approve_moves_the_champion_and_the_run_scores_with_it(cluster, world):
    """...after the answer's first write lost its MySQL connection: the retry applies it."""
    before = ensure_champion(cluster, world)
    run_id = trigger_held(cluster, world)
    tis = wait_for_question(cluster, run_id)
    held = version_of(world, run_id)
    version = str(held["model_version"])
    assert held["decision"] == "awaiting_approval"
    # Held: the champion has not moved, nothing downstream of the question has run.
    assert champion(world) == before
    assert tis["plan_scoring"]["state"] in (None, "scheduled", "queued", "none")
    question = cluster.api.hitl_detail(run_id, APPROVAL)
    assert f"v{version}" in question["subject"] and question["options"] == ["Approve", "Reject"]
    for shown in ("candidate accuracy", f"v{before}:", "dataset version", "/runs/"):
        assert shown in question["body"], shown

    # The answer arrives while the test holds the model's alias lock: its write waits for the
    # lock, and the test kills that MySQL connection. The task fails; its retry must apply the
    # answer given, not ask the reviewer again (the run would wait for input until it times out).
    with registry.alias_lock(world["db"], world["model_name"], timeout_s=30):
        cluster.api.answer(run_id, APPROVAL, ["Approve"], {"comment": "ship it"})
        waiting = wait_until(lambda: lock_waiters(world), 300, "the answer's write to wait")
        for connection in waiting:
            world["db"].execute(f"KILL {connection}")
    tis = wait_for_run(cluster, run_id)

    assert tis[(APPROVAL, -1)]["try_number"] == 2
    retried = task_log(cluster, run_id, APPROVAL, attempt=2)
    assert f"applying the answer given before this try (approved by {cluster.api.user})" in retried
    assert "Waiting for response" not in retried
    assert champion(world) == version
    done = version_of(world, run_id)
    assert (done["decision"], done["review"], done["reviewer"], done["review_comment"]) == (
        "promoted",
        "approved",
        cluster.api.user,
        "ship it",
    )
    move = world["db"].query(
        "SELECT to_version, actor FROM alias_history WHERE model_name = %s AND alias = 'champion'"
        " ORDER BY id DESC LIMIT 1",
        (world["model_name"],),
    )[0]
    assert move == {"to_version": int(version), "actor": f"reviewer:{cluster.api.user}"}
    assert tis[("publish_champion", -1)]["state"] == "success"
    # Scoring in this run used the champion in force after the decision: the approved one.
    assert set(scored_by(world, run_id)) == {int(version)}


def plant_forged_approval(cluster: CeleryAirflow, world, run_id: str) -> None:
    """What a UI user with the Op role (or another DAG's code) can do: write the Variable a
    retry of `approve_promotion` reads, an approval of the version this run will register,
    sealed with a key other than the task's."""
    import hashlib
    import hmac
    import json

    from tests.celery_executor.cluster import DAG_ID

    found = registry.mlflow_client().search_model_versions(f"name = '{world['model_name']}'")
    answer = {
        "model_name": world["model_name"],
        "model_version": str(max(int(v.version) for v in found) + 1),
        "outcome": registry.APPROVED,
        "reviewer": "mallory",
        "comment": "forged",
    }
    forged = hmac.new(b"a guess", json.dumps(answer).encode(), "sha256").hexdigest()
    run = hashlib.sha256(f"{DAG_ID}/{run_id}".encode()).hexdigest()[:24]
    value = json.dumps({"answer": answer, "seal": forged})
    cluster.api._call(  # noqa: SLF001 - the REST API as any client sends it
        "POST", "/api/v2/variables", {"key": f"imgpipe_approval_answer.{run}", "value": value}
    )


def test_reject_keeps_the_champion_and_records_who(cluster, world):
    before = ensure_champion(cluster, world)
    run_id = trigger_held(cluster, world)
    plant_forged_approval(cluster, world, run_id)  # ignored: the person is asked all the same
    wait_for_question(cluster, run_id)
    version = str(version_of(world, run_id)["model_version"])

    cluster.api.answer(run_id, APPROVAL, ["Reject"], {"comment": "not before the audit"})
    tis = wait_for_run(cluster, run_id)

    assert champion(world) == before
    assert registry.alias_version(world["model_name"], "challenger") == version
    done = version_of(world, run_id)
    assert (done["decision"], done["review"], done["reviewer"], done["review_comment"]) == (
        "challenger",
        "rejected",
        cluster.api.user,
        "not before the audit",
    )
    assert tis[("publish_champion", -1)]["state"] == "skipped"
    assert int(version) not in scored_by(world, run_id)
    with pytest.raises(ApiError) as second:  # one answer per question
        cluster.api.answer(run_id, APPROVAL, ["Approve"], {"comment": "changed my mind"})
    assert second.value.status == 409
    log = task_log(cluster, run_id, APPROVAL)
    assert "its seal does not hold" in log and "mallory" not in log


def test_no_answer_in_time_moves_nothing_and_the_run_says_so(cluster, world):
    before = ensure_champion(cluster, world)
    run_id = trigger_held(cluster, world, approval_timeout_hours=0.002)  # 7.2 s
    tis = wait_for_run(cluster, run_id)

    assert champion(world) == before
    done = version_of(world, run_id)
    assert (done["decision"], done["review"], done["reviewer"]) == (
        "challenger",
        "timed_out",
        None,
    )
    assert "approval timed out" in done["decision_reason"]
    assert tis[(APPROVAL, -1)]["state"] == "success"
    assert tis[("publish_champion", -1)]["state"] == "skipped"
    log = task_log(cluster, run_id, APPROVAL, attempt=1)
    assert "timed out: nobody answered, the champion did not move" in log
