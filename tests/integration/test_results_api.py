"""The results plugin's API on a real Airflow API server: auth, and every answer against SQL.

The server is `airflow api-server` with this checkout's plugins and the simple auth manager of
`scripts/stack.py`; requests carry a token from its `/auth/token` for the `.env` admin. The
data is a real scored model (`results_data`) in a database of its own.
"""

from __future__ import annotations

import io
import json
import os

import pytest

BASE = "/imgpipe-results"
ENDPOINTS = [
    "/",
    "/static/results.js",
    "/api/overview",
    "/api/accuracy",
    "/api/confusion",
    "/api/predictions",
    "/api/disagreements",
    "/api/inbox",
    "/api/drift",
    "/api/images/1/thumbnail",
]


@pytest.fixture(scope="module")
def scored(results_data):
    assert results_data.store is not None, "the API tests need their own data, not the demo's"
    return results_data


@pytest.fixture(scope="module")
def client(scored, results_server):
    """An HTTP client of the API server, sending the `.env` admin's bearer token."""
    import httpx

    with httpx.Client(base_url=results_server, timeout=60) as http:
        token = http.post(
            "/auth/token",
            json={
                "username": os.environ.get("AIRFLOW_ADMIN_USER", "admin"),
                "password": os.environ.get("AIRFLOW_ADMIN_PASSWORD", "admin"),
            },
        )
        assert token.status_code == 201, token.text
        http.headers["Authorization"] = f"Bearer {token.json()['access_token']}"
        yield http


def _get(client, path: str, **params):
    response = client.get(BASE + path, params={k: v for k, v in params.items() if v is not None})
    assert response.status_code == 200, f"{path}: {response.status_code} {response.text[:300]}"
    return response.json()


@pytest.mark.parametrize("path", ENDPOINTS)
def test_every_endpoint_refuses_anonymous_and_forged_callers(client, path):
    assert client.get(BASE + path, headers={"Authorization": ""}).status_code == 401
    forged = client.get(BASE + path, headers={"Authorization": "Bearer not-a-jwt"})
    assert forged.status_code == 403
    assert client.get(BASE + path).status_code in (200, 404)


def test_the_ui_cookie_authenticates_like_the_bearer_token(client):
    token = client.headers["Authorization"].removeprefix("Bearer ")
    answer = client.get(
        BASE + "/api/overview", headers={"Authorization": "", "Cookie": f"_token={token}"}
    )
    assert answer.status_code == 200


def test_the_page_is_in_the_airflow_navigation(client):
    plugins = client.get("/api/v2/plugins").json()["plugins"]
    views = [v for p in plugins if p["name"] == "imgpipe_results" for v in p["external_views"]]
    assert views and views[0]["destination"] == "nav"
    assert views[0]["href"] == "imgpipe-results/"
    assert client.get(BASE + "/").headers["content-type"].startswith("text/html")


def test_overview_shows_champion_and_challenger_as_recorded(client, scored):
    data = _get(client, "/api/overview")
    recorded = {
        r["alias"]: r
        for r in scored.db.query(
            "SELECT a.alias, a.model_version, mv.run_id, mv.decision, mv.gate_accuracy,"
            " mv.champion_accuracy, mv.dataset_version FROM v_current_aliases a"
            " JOIN model_versions mv ON mv.model_name = a.model_name"
            " AND mv.model_version = a.model_version WHERE a.model_name = %s",
            (scored.model_name,),
        )
    }
    assert data["model_name"] == scored.model_name and data["hint"] is None
    for alias, version, decision in (
        ("champion", scored.champion, "promoted"),
        ("challenger", scored.challenger, "challenger"),
    ):
        shown, row = data[alias], recorded[alias]
        assert str(shown["model_version"]) == version == str(row["model_version"])
        assert shown["decision"] == row["decision"] == decision
        assert shown["gate_accuracy"] == pytest.approx(row["gate_accuracy"])
        assert shown["run_id"] == row["run_id"]
        assert shown["mlflow_run_url"].endswith(f"/#/runs/{row['run_id']}")
    assert data["challenger"]["champion_accuracy"] == pytest.approx(
        recorded["challenger"]["champion_accuracy"]
    )
    history = scored.db.query(
        "SELECT alias, to_version FROM alias_history WHERE model_name = %s ORDER BY id DESC",
        (scored.model_name,),
    )
    assert [(h["alias"], h["to_version"]) for h in data["alias_history"]] == [
        (h["alias"], h["to_version"]) for h in history
    ]
    assert data["dataset"]["dataset_version"] == recorded["champion"]["dataset_version"]
    assert (
        data["dataset"]["n_images"]
        == scored.db.query(
            "SELECT n_images FROM dataset_versions WHERE dataset_version = %s",
            (data["dataset"]["dataset_version"],),
        )[0]["n_images"]
    )


def test_a_model_without_champion_gets_the_step_to_run(client):
    data = _get(client, "/api/overview", model_name="never-trained")
    assert data["champion"] is None and data["challenger"] is None
    assert "image_classification" in data["hint"]
    assert _get(client, "/api/accuracy", model_name="never-trained")["items"] == []
    for path in ("/api/confusion", "/api/predictions"):
        answer = client.get(BASE + path, params={"model_name": "never-trained"})
        assert answer.status_code == 404 and "no champion yet" in answer.json()["detail"]


def test_accuracy_by_version_is_the_view(client, scored):
    rows = scored.db.query(
        "SELECT model_version, alias, n_labelled, accuracy FROM v_accuracy_by_model_version"
        " WHERE model_name = %s ORDER BY model_version",
        (scored.model_name,),
    )
    items = _get(client, "/api/accuracy")["items"]
    assert [(i["model_version"], i["alias"], i["n_labelled"]) for i in items] == [
        (r["model_version"], r["alias"], r["n_labelled"]) for r in rows
    ]
    assert [i["accuracy"] for i in items] == pytest.approx([float(r["accuracy"]) for r in rows])
    assert {i["alias"] for i in items} == {"champion", "challenger"}


@pytest.mark.parametrize("alias", ["champion", "challenger"])
def test_confusion_cells_are_the_evaluation_and_link_to_their_images(client, scored, alias):
    version = getattr(scored, alias)
    data = _get(client, "/api/confusion", model_version=version)
    stored = {
        (r["true_label"], r["predicted_label"]): r["n"]
        for r in scored.db.query(
            "SELECT true_label, predicted_label, n FROM confusion_matrix"
            " WHERE model_name = %s AND model_version = %s",
            (scored.model_name, version),
        )
    }
    labels = data["labels"]
    shown = {
        (t, p): data["matrix"][i][j]
        for i, t in enumerate(labels)
        for j, p in enumerate(labels)
        if data["matrix"][i][j]
    }
    tested = scored.db.query(
        "SELECT COUNT(*) AS n FROM predictions WHERE model_name = %s AND model_version = %s"
        " AND subset = 'test'",
        (scored.model_name, version),
    )[0]["n"]
    assert shown == stored and sum(stored.values()) == data["n_images"] == tested > 0
    for (true_label, predicted), n in stored.items():
        page = _get(
            client,
            "/api/predictions",
            model_version=version,
            queue="all",
            true_label=true_label,
            predicted_label=predicted,
            limit=200,
        )
        assert page["total"] == n == len(page["items"])
        assert {(i["true_label"], i["predicted_label"]) for i in page["items"]} == {
            (true_label, predicted)
        }


def _walk(client, limit: int, **params) -> list[dict]:
    items, after, pages = [], None, 0
    while True:
        page = _get(client, "/api/predictions", limit=limit, after=after, **params)
        items += page["items"]
        pages += 1
        assert len(page["items"]) <= limit
        if page["next"] is None:
            return items
        assert page["total"] is None or pages == 1
        after = page["next"]


def test_review_queue_pages_through_low_confidence_and_wrong_predictions_once(client, scored):
    expected = scored.db.query(
        "SELECT p.id, p.image_id, p.correct, p.confidence FROM predictions p"
        " JOIN images i ON i.id = p.image_id"
        " WHERE p.model_name = %s AND p.model_version = %s AND i.status = 'ok'"
        " AND i.deleted_at IS NULL AND (p.confidence < 0.6 OR p.correct = 0)"
        " ORDER BY p.confidence, p.id",
        (scored.model_name, scored.champion),
    )
    assert len(expected) > 7
    first = _get(client, "/api/predictions", limit=3)
    assert first["model_version"] == int(scored.champion)
    assert first["total"] == len(expected)
    items = _walk(client, 3)
    assert [i["id"] for i in items] == [r["id"] for r in expected]
    view = scored.db.query(
        "SELECT image_id FROM v_review_queue WHERE model_name = %s", (scored.model_name,)
    )
    low = [i["image_id"] for i in items if i["confidence"] < 0.6]
    assert sorted(low) == sorted(r["image_id"] for r in view)
    for item in items:
        assert len(item["top_k"]) == 3 and item["top_k"][0]["label"] == item["predicted_label"]


@pytest.mark.parametrize(
    ("params", "where", "args"),
    [
        pytest.param({"subset": "inbox"}, "p.subset = %s", ("inbox",), id="split"),
        pytest.param({"below": 0.2}, "p.confidence < %s", (0.2,), id="confidence-below"),
        pytest.param({"wrong": "true"}, "p.correct = 0", (), id="wrong-only"),
        pytest.param({"true_label": "three"}, "p.true_label = %s", ("three",), id="true-label"),
        pytest.param(
            {"predicted_label": "seven", "subset": "test"},
            "p.predicted_label = %s AND p.subset = %s",
            ("seven", "test"),
            id="predicted-and-split",
        ),
    ],
)
def test_filters_of_all_predictions_match_sql(client, scored, params, where, args):
    expected = scored.db.query(
        "SELECT p.id FROM predictions p JOIN images i ON i.id = p.image_id"
        " WHERE p.model_name = %s AND p.model_version = %s AND i.status = 'ok'"
        f" AND i.deleted_at IS NULL AND {where} ORDER BY p.confidence, p.id",
        (scored.model_name, scored.champion, *args),
    )
    items = _walk(client, 4, queue="all", **params)
    assert [i["id"] for i in items] == [r["id"] for r in expected]


@pytest.mark.parametrize(
    ("params", "status"),
    [
        pytest.param({"queue": "everything"}, 400, id="unknown-queue"),
        pytest.param({"subset": "holdout"}, 400, id="unknown-split"),
        pytest.param({"after": "garbage"}, 400, id="malformed-cursor"),
        pytest.param({"limit": 500}, 422, id="page-too-large"),
        pytest.param({"model_version": 999}, 200, id="unknown-version-is-empty"),
    ],
)
def test_bad_parameters_are_refused_with_the_allowed_values(client, params, status):
    answer = client.get(BASE + "/api/predictions", params=params)
    assert answer.status_code == status, answer.text
    if status == 400:
        assert "expected" in answer.json()["detail"] or "cursor" in answer.json()["detail"]


def test_disagreements_and_inbox_are_the_views(client, scored):
    expected = scored.db.query(
        "SELECT image_id, champion_label, challenger_label"
        " FROM v_champion_challenger_disagreements WHERE model_name = %s ORDER BY image_id",
        (scored.model_name,),
    )
    assert expected, "two random models agree everywhere: the fixture needs other seeds"
    items, after = [], None
    while True:
        page = _get(client, "/api/disagreements", limit=2, after=after)
        items += page["items"]
        if page["next"] is None:
            break
        after = page["next"]
    assert [(i["image_id"], i["champion_label"], i["challenger_label"]) for i in items] == [
        (r["image_id"], r["champion_label"], r["challenger_label"]) for r in expected
    ]
    inbox = scored.db.query(
        "SELECT image_id, predicted_label, model_version FROM v_inbox_latest_predictions"
        " ORDER BY scored_at DESC, image_id DESC"
    )
    shown = _get(client, "/api/inbox")
    assert shown["total"] == len(inbox) == 5
    assert {(i["image_id"], i["predicted_label"]) for i in shown["items"]} == {
        (r["image_id"], r["predicted_label"]) for r in inbox
    }

    # Another model name scores an inbox image later, and another prefix has an inbox image
    # of its own: this model's list still shows its own prediction, and only its scope.
    db, newest = scored.db, inbox[0]
    db.execute(
        "INSERT INTO predictions (image_id, etag, model_name, model_version, predicted_label,"
        " confidence, top_k, subset, mlflow_run_id, scored_at) SELECT id, etag, 'other-model',"
        " 1, 'x', 0.5, '[]', 'inbox', 'r', NOW(6) + INTERVAL 1 DAY FROM images WHERE id = %s",
        (newest["image_id"],),
    )
    db.execute(
        "INSERT INTO images (bucket, prefix, object_key, key_hash, split, subset, label,"
        " size_bytes, etag, status, first_seen_at, last_seen_at) VALUES (%s, 'elsewhere',"
        " 'elsewhere/inbox/z.png', SHA2('elsewhere/inbox/z.png', 256), 'inbox', 'inbox', NULL,"
        " 1, 'e', 'ok', NOW(6), NOW(6))",
        (scored.store.bucket,),
    )
    try:
        again = _get(client, "/api/inbox")
        assert again["total"] == 5
        assert {(i["image_id"], i["predicted_label"]) for i in again["items"]} == {
            (r["image_id"], r["predicted_label"]) for r in inbox
        }
    finally:
        db.execute("DELETE FROM predictions WHERE model_name = 'other-model'")
        db.execute("DELETE FROM images WHERE prefix = 'elsewhere'")


def test_drift_history_is_the_view_newest_first_with_the_newest_check_of_each_subset_marked(
    client, scored
):
    rows = scored.db.query(
        "SELECT model_version, run_key, subset, status, verdict, n_images, mmd_p_value,"
        " label_shift, confidence_drop, p_value_threshold, drifted FROM v_drift_history"
        " WHERE model_name = %s ORDER BY checked_at DESC, model_version DESC, run_key, subset",
        (scored.model_name,),
    )
    champion, challenger = int(scored.champion), int(scored.challenger)
    assert {(r["model_version"], r["subset"]): r["status"] for r in rows} == {
        (champion, "test"): "checked",
        (champion, "inbox"): "not_enough_images",
        (challenger, "test"): "no_reference",
        (challenger, "inbox"): "no_reference",
    }
    items = _get(client, "/api/drift")["items"]
    assert [
        (i["model_version"], i["run_key"], i["subset"], i["status"], i["verdict"], i["n_images"])
        for i in items
    ] == [
        (r["model_version"], r["run_key"], r["subset"], r["status"], r["verdict"], r["n_images"])
        for r in rows
    ]
    for item, row in zip(items, rows, strict=True):
        for column in ("mmd_p_value", "label_shift", "confidence_drop", "p_value_threshold"):
            assert item[column] == pytest.approx(row[column]), column
        assert item["drifted"] is bool(row["drifted"])
    checked = next(i for i in items if i["status"] == "checked")
    tested = scored.db.query(
        "SELECT COUNT(*) AS n FROM predictions WHERE model_name = %s AND model_version = %s"
        " AND subset = 'test'",
        (scored.model_name, scored.champion),
    )[0]["n"]
    assert checked["n_images"] == tested and 0 < checked["mmd_p_value"] <= 1
    assert checked["verdict"] in ("no drift", "drift: " + ",".join(checked["reasons"]))
    # The verdict that stands per subset: of the version checked last there, its newest check
    # with a verdict, else its newest.
    newest = scored.db.query(
        "SELECT h.subset, h.model_version FROM v_drift_history h WHERE h.model_name = %s"
        " AND h.checked_at = (SELECT MAX(r.checked_at) FROM drift_reports r"
        " WHERE r.model_name = h.model_name AND r.subset = h.subset AND r.model_version = ("
        "SELECT l.model_version FROM drift_reports l WHERE l.model_name = r.model_name"
        " AND l.subset = r.subset ORDER BY l.checked_at DESC LIMIT 1) AND (r.status = 'checked'"
        " OR NOT EXISTS (SELECT 1 FROM drift_reports c WHERE c.model_name = r.model_name"
        " AND c.subset = r.subset AND c.model_version = r.model_version"
        " AND c.status = 'checked')))",
        (scored.model_name,),
    )
    assert sorted((i["subset"], i["model_version"]) for i in items if i["latest"]) == sorted(
        (r["subset"], r["model_version"]) for r in newest
    )
    assert _get(client, "/api/drift", limit=1)["items"] == items[:1]
    assert client.get(BASE + "/api/drift", params={"limit": 500}).status_code == 422
    assert _get(client, "/api/drift", model_name="never-trained")["items"] == []


def test_thumbnails_are_bounded_jpegs_of_catalogued_images_cached_on_disk(client, scored):
    from PIL import Image

    row = scored.db.query(
        "SELECT id, object_key FROM images WHERE status = 'ok' ORDER BY id LIMIT 1"
    )[0]
    answer = client.get(f"{BASE}/api/images/{row['id']}/thumbnail", params={"size": 64})
    assert answer.status_code == 200 and answer.headers["content-type"] == "image/jpeg"
    with Image.open(io.BytesIO(answer.content)) as img:
        assert img.format == "JPEG" and max(img.size) <= 64 and min(img.size) > 0
    etag = answer.headers["etag"]
    # The browser asks again each time (a 304 while unchanged): never the old picture of an
    # object overwritten under its key beside its new prediction.
    assert answer.headers["cache-control"] == "private, no-cache"
    assert (
        client.get(
            f"{BASE}/api/images/{row['id']}/thumbnail",
            params={"size": 64},
            headers={"If-None-Match": etag},
        ).status_code
        == 304
    )

    # Served from the disk cache: the object itself is gone now ...
    original = scored.store.get_bytes(row["object_key"])
    scored.store.delete(row["object_key"])
    try:
        again = client.get(f"{BASE}/api/images/{row['id']}/thumbnail", params={"size": 64})
        assert again.status_code == 200 and again.content == answer.content
        # ... but a size never rendered needs the object, which is gone since the scan.
        missing = client.get(f"{BASE}/api/images/{row['id']}/thumbnail", params={"size": 256})
        assert missing.status_code == 404
        # ... and so does one overwritten with other content: no thumbnail of what the
        # catalog has not validated.
        scored.store.put_bytes(row["object_key"], original + b"\0")
        changed = client.get(f"{BASE}/api/images/{row['id']}/thumbnail", params={"size": 256})
        assert changed.status_code == 404 and "rescan" in changed.text
    finally:
        scored.store.put_bytes(row["object_key"], original)  # same bytes, same ETag

    unknown = scored.db.query("SELECT MAX(id) + 1000 AS id FROM images")[0]["id"]
    assert client.get(f"{BASE}/api/images/{unknown}/thumbnail").status_code == 404
    assert client.get(f"{BASE}/api/images/{row['id']}/thumbnail?size=4096").status_code == 400
    # No route takes an object key: a key in the URL names nothing.
    key = json.dumps(row["object_key"])
    assert client.get(f"{BASE}/api/images/{key}/thumbnail").status_code in (404, 422)


def test_an_image_that_does_not_decode_gets_a_404_once_and_no_fetch_again(client, scored):
    row = scored.db.query(
        "SELECT id, object_key, etag FROM images WHERE status = 'ok' ORDER BY id LIMIT 1 OFFSET 1"
    )[0]
    url = f"{BASE}/api/images/{row['id']}/thumbnail"
    original = scored.store.get_bytes(row["object_key"])
    # As a scan leaves an object over 8 MiB, which it checks by its header only: catalogued
    # under its ETag, its pixels never decoded.
    etag = scored.store.put_bytes(row["object_key"], original[:64])
    scored.db.execute("UPDATE images SET etag = %s WHERE id = %s", (etag, row["id"]))
    try:
        first = client.get(url, params={"size": 128})
        assert first.status_code == 404 and "does not decode" in first.text
        # Known now: the next view answers the same without reading the object (gone here).
        scored.store.delete(row["object_key"])
        again = client.get(url, params={"size": 128})
        assert again.status_code == 404 and again.json() == first.json()
    finally:
        scored.store.put_bytes(row["object_key"], original)
        scored.db.execute("UPDATE images SET etag = %s WHERE id = %s", (row["etag"], row["id"]))
    assert client.get(url, params={"size": 128}).status_code == 200


def test_a_symlink_planted_in_the_thumbnail_cache_is_never_served(scored, tmp_path):
    """Anyone who writes the cache volume and can list the bucket knows a thumbnail's file name:
    a symlink there to the API server's environment was served to every DAG reader as a JPEG
    (and one at the remembered-refusal name, as the 404's text). Now both are misses."""
    from pipeline import results

    secret = tmp_path / "environ"
    secret.write_text("AWS_SECRET_ACCESS_KEY=hunter2")
    image_id = scored.db.query(
        "SELECT id FROM images WHERE status = 'ok' ORDER BY id LIMIT 1 OFFSET 2"
    )[0]["id"]
    cache = tmp_path / "cache"
    path = results.thumbnail_path(cache, results.catalogued_image(scored.db, image_id), 128)
    path.parent.mkdir(parents=True)
    for planted in (path, path.with_suffix(f".r{results.THUMBNAIL_RENDERER}.none")):
        planted.symlink_to(secret)
    data, _ = results.thumbnail(
        scored.db, lambda bucket: scored.store, image_id, size=128, cache_dir=cache
    )
    assert data.startswith(b"\xff\xd8") and b"hunter2" not in data
    assert not path.is_symlink() and path.read_bytes() == data  # replaced by its own file


def test_a_rejected_image_gets_no_thumbnail(client, scored):
    row = scored.db.query("SELECT id FROM images WHERE status = 'ok' ORDER BY id DESC LIMIT 1")[0]
    assert client.get(f"{BASE}/api/images/{row['id']}/thumbnail").status_code == 200
    scored.db.execute("UPDATE images SET status = 'rejected' WHERE id = %s", (row["id"],))
    try:
        assert client.get(f"{BASE}/api/images/{row['id']}/thumbnail").status_code == 404
    finally:
        scored.db.execute("UPDATE images SET status = 'ok' WHERE id = %s", (row["id"],))


BULK = 100_000


def _handler_reads(cur) -> int:
    cur.execute("SHOW SESSION STATUS LIKE 'Handler_read%'")
    return sum(int(value) for _, value in cur.fetchall())


def test_a_page_deep_in_100k_predictions_reads_one_short_index_range(client, scored):
    """100k predictions of one version: the API pages them by keyset, and MySQL answers a page
    near the end by reading about a page of index entries (not the 90k before it)."""
    from pipeline import results

    db, model = scored.db, "bulk-model"
    digits = "(SELECT 0 d UNION ALL SELECT 1 UNION ALL SELECT 2 UNION ALL SELECT 3 UNION ALL"
    digits += " SELECT 4 UNION ALL SELECT 5 UNION ALL SELECT 6 UNION ALL SELECT 7 UNION ALL"
    digits += " SELECT 8 UNION ALL SELECT 9)"
    numbers = (
        f"SELECT a.d + 10 * b.d + 100 * c.d + 1000 * e.d + 10000 * f.d AS n FROM {digits} a"
        f" CROSS JOIN {digits} b CROSS JOIN {digits} c CROSS JOIN {digits} e"
        f" CROSS JOIN {digits} f"
    )
    db.execute(
        "INSERT INTO images (bucket, prefix, object_key, key_hash, split, subset, label,"
        " size_bytes, etag, status, first_seen_at, last_seen_at)"
        " SELECT 'bulk', 'bulk', CONCAT('bulk/test/x/', n), SHA2(CONCAT('bulk', n), 256),"
        " 'test', 'test', 'x', 1, 'e', 'ok', NOW(6), NOW(6) FROM (" + numbers + ") t"
    )
    db.execute(
        "INSERT INTO predictions (image_id, etag, model_name, model_version, predicted_label,"
        " confidence, top_k, true_label, correct, subset, mlflow_run_id, scored_at)"
        " SELECT i.id, i.etag, %s, 1, IF(MOD(i.id, 3) = 0, 'y', 'x'), MOD(i.id * 7919, 100003) / 100003,"
        " '[]', 'x', IF(MOD(i.id, 3) = 0, 0, 1), 'test', 'bulk', NOW(6)"
        " FROM images i WHERE i.bucket = 'bulk'",
        (model,),
    )
    # The rows stay until the session's database is dropped (another model and bucket).
    flt = results.PredictionFilter(queue="all")
    deep = db.query(
        "SELECT confidence, id FROM predictions WHERE model_name = %s AND model_version = 1"
        " ORDER BY confidence, id LIMIT 1 OFFSET 90000",
        (model,),
    )[0]
    cursor = results.encode_cursor(deep["confidence"], deep["id"])
    sql, args = results.prediction_page_query(model, 1, flt, after=cursor, limit=50)
    conn = db.connect(autocommit=True)
    try:
        with conn.cursor() as cur:
            cur.execute("EXPLAIN " + sql, args)
            columns = [c[0] for c in cur.description]
            plan = [dict(zip(columns, row, strict=True)) for row in cur.fetchall()]
            before = _handler_reads(cur)
            cur.execute(sql, args)
            assert len(cur.fetchall()) == 51
            read = _handler_reads(cur) - before
    finally:
        conn.close()
    by_table = {p["table"]: p for p in plan}
    assert by_table["p"]["key"] == "ix_predictions_model_confidence", plan
    assert "filesort" not in (by_table["p"]["Extra"] or ""), plan
    assert read < 1000, f"a page read {read} rows; expected about 2 x 51"

    expected = db.query(
        "SELECT id FROM predictions WHERE model_name = %s AND model_version = 1"
        " ORDER BY confidence, id LIMIT 50 OFFSET 90001",
        (model,),
    )
    page = _get(
        client, "/api/predictions", model_name=model, model_version=1, queue="all", after=cursor
    )
    assert [i["id"] for i in page["items"]] == [r["id"] for r in expected]
    first = _get(client, "/api/predictions", model_name=model, model_version=1, limit=10)
    assert (
        first["total"]
        == db.query(
            "SELECT COUNT(*) AS n FROM predictions WHERE model_name = %s"
            " AND (confidence < 0.6 OR correct = 0)",
            (model,),
        )[0]["n"]
    )
    assert BULK // 3 < first["total"] < BULK
