"""`check_services` (the DAG's first task, `python -m pipeline check`) asks of S3 what the pipeline
needs of it: to list and read the images, to write its own bucket (checkpoints)."""

from __future__ import annotations

import uuid
from dataclasses import replace

import pytest

from pipeline.preflight import run_checks
from pipeline.store import ObjectStore
from tests.faults.private_s3 import PrivateS3


def test_read_only_images_and_a_writable_work_bucket_pass_and_the_reverse_fails(
    settings, db, tmp_path
):
    """A least-privilege identity, as a platform team grants it: the image bucket read-only,
    the work bucket read/write. Before, the check wrote its probe into the image bucket (the
    pipeline never writes there): every run failed; a work bucket it could not write passed."""
    images, work = f"images-{uuid.uuid4().hex[:8]}", f"work-{uuid.uuid4().hex[:8]}"
    pipeline = {"accessKey": "pipeline", "secretKey": "pipeline-secret"}
    s3 = PrivateS3(
        tmp_path / "s3",
        settings.s3,
        [
            {
                "name": "pipeline",
                "credentials": [pipeline],
                "actions": [
                    f"List:{images}",
                    f"Read:{images}",
                    *(f"{a}:{work}" for a in ("List", "Read", "Write")),
                ],
            }
        ],
    )
    s3.start(images)
    try:
        admin = ObjectStore(s3.settings, images)
        admin.with_bucket(work).ensure_bucket()
        admin.put_bytes("ds/train/a/1.png", b"not checked here")
        mine = ObjectStore(
            replace(s3.settings, access_key_id="pipeline", secret_access_key="pipeline-secret"),
            images,
        )
        summary = run_checks(db, mine, "ds", work_store=mine.with_bucket(work))
        assert summary["s3"] == f"list ok in s3://{images}/ds; read/write ok in s3://{work}"
        assert [o.key for o in admin.with_bucket(work).iter_objects()] == []  # probe deleted

        # The same identity with the buckets the other way round: its work bucket is read-only.
        with pytest.raises(
            RuntimeError, match=f"cannot write/read s3://{images} .*PIPELINE_WORK_BUCKET"
        ):
            run_checks(db, mine.with_bucket(work), "", work_store=mine)
    finally:
        s3.kill()
