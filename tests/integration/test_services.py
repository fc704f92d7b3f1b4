"""Each service of the local stack is real and reachable with the project's own clients."""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from pipeline.db import (
    MIGRATION_LOCK,
    apply_migration,
    available_migrations,
    create_database,
    drop_database,
    migrate,
    mysql_lock_name,
)


def test_object_round_trip_and_listing(store):
    etag = store.put_bytes("a/b/ü name.txt", b"hello")
    assert store.get_bytes("a/b/ü name.txt") == b"hello"
    assert store.get_bytes("a/b/ü name.txt", byte_range=(1, 3)) == b"ell"
    listed = list(store.iter_objects("a/"))
    assert [(o.key, o.size, o.etag) for o in listed] == [("a/b/ü name.txt", 5, etag)]
    assert store.head("a/missing") is None


def test_mysql_create_and_query_table(db):
    db.execute("CREATE TABLE t (id INT PRIMARY KEY, label VARCHAR(100)) DEFAULT CHARSET=utf8mb4")
    with db.transaction() as cur:
        cur.executemany("INSERT INTO t VALUES (%s, %s)", [(1, "Gold Fish"), (2, "鯉")])
    rows = db.query("SELECT id, label FROM t ORDER BY id")
    assert rows == [{"id": 1, "label": "Gold Fish"}, {"id": 2, "label": "鯉"}]


def test_migrations_are_recorded_and_idempotent(db):
    expected = [v for v, _, _ in available_migrations()]
    recorded = [r["version"] for r in db.query("SELECT version FROM schema_migrations ORDER BY 1")]
    assert recorded == expected
    assert migrate(db) == []


def test_every_migration_runs_again_after_a_kill_before_it_was_recorded(settings):
    """DDL is not transactional: a migration killed after some or all of its statements, before
    its `schema_migrations` row, runs again from its first statement on the next migrate."""
    name = f"{settings.mysql.database}_test_{uuid.uuid4().hex[:12]}"
    db = create_database(settings.mysql, name)
    conn = db.connect(autocommit=True)
    try:
        with conn.cursor() as cur:
            for version, _, sql in available_migrations():
                apply_migration(cur, sql)
                apply_migration(cur, sql)  # as after the kill
                cur.execute(
                    "CREATE TABLE IF NOT EXISTS schema_migrations (version INT PRIMARY KEY)"
                )
                cur.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (version,))
        assert db.query("SHOW COLUMNS FROM predictions LIKE 'run_key'")
    finally:
        conn.close()
        drop_database(settings.mysql, name)


def test_migrations_of_a_database_with_the_longest_name_take_a_lock_mysql_accepts(settings):
    name = f"{settings.mysql.database}_test_{uuid.uuid4().hex}".ljust(64, "x")  # the longest
    db = create_database(settings.mysql, name)
    try:
        lock = mysql_lock_name(db, MIGRATION_LOCK)
        assert len(lock) <= 64  # MySQL 8 refuses longer lock names (error 3057)
        holder = db.connect(autocommit=True)
        with holder.cursor() as cur:  # while another process migrates, this one waits for it
            cur.execute("SELECT GET_LOCK(%s, 0)", (lock,))
            assert cur.fetchone()[0] == 1
            with pytest.raises(TimeoutError, match="another schema migration held the MySQL lock"):
                migrate(db, timeout_s=1)
        holder.close()
        assert migrate(db) == [v for v, _, _ in available_migrations()]
    finally:
        drop_database(settings.mysql, name)


def test_mlflow_logs_registers_and_loads_by_alias_with_another_batch_size(settings, mlflow_names):
    import mlflow
    import torch
    from mlflow import MlflowClient
    from mlflow.models import infer_signature

    mlflow.set_experiment(mlflow_names["experiment"])
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 3)).eval()
    example = np.random.default_rng(0).random((2, 3, 2, 2), dtype=np.float32)
    with mlflow.start_run() as run:
        mlflow.log_param("p", 1)
        info = mlflow.pytorch.log_model(
            model,
            name="model",
            signature=infer_signature(example, model(torch.from_numpy(example)).detach().numpy()),
            input_example=example,
            registered_model_name=mlflow_names["model_name"],
            serialization_format="pickle",
        )
    client = MlflowClient()
    version = info.registered_model_version
    client.set_registered_model_alias(mlflow_names["model_name"], "champion", version)
    loaded = mlflow.pytorch.load_model(f"models:/{mlflow_names['model_name']}@champion")
    batch = torch.rand(7, 3, 2, 2)
    assert loaded(batch).shape == (7, 3)
    assert torch.allclose(loaded(batch), model(batch))
    assert client.get_run(run.info.run_id).data.params == {"p": "1"}
