"""
### image_classification_inbox: score new unlabelled images with the champion

Scores every image under `<prefix>/inbox/` that the current `@champion` has not scored yet and
writes the predictions to MySQL (`v_inbox_latest_predictions`). Runs when `image_classification`
promotes a new champion (asset `imgpipe_champion`) and every hour on its own. Uses the same
connections and environment as `image_classification`; catalogs the bucket first so new inbox
files are seen, and never trains. `model_name` picks the dataset scope's registered model
(empty: `MODEL_NAME`); a refusal (no champion yet, a bad param) fails at once, without retries.

**Drift**: `check_drift` compares the inbox images the version scored since its last inbox
verdict (this run's and earlier runs' few at a time, until `drift_min_images`) with its val
reference, into `drift_reports`; `publish_drift` emits the `imgpipe_drift` asset event when they
drifted (the `drift_*` params are those of `image_classification`).
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta

from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable, Param, dag, task
from imgpipe_runtime import CHAMPION_ASSET, DEFAULT_ARGS, DRIFT_ASSET, fail_fast

from pipeline.params import RUN_PARAMS

_FORM = (
    "bucket",
    "prefix",
    "model_name",
    "model_ref",
    "precision",
    "drift_p_value",
    "drift_min_images",
    "drift_label_shift",
    "drift_confidence_drop",
)


@dag(
    dag_id="image_classification_inbox",
    schedule=AssetOrTimeSchedule(
        timetable=CronTriggerTimetable("30 * * * *", timezone="UTC"), assets=CHAMPION_ASSET
    ),
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    params={
        name: Param(
            RUN_PARAMS[name].default,
            description=RUN_PARAMS[name].description,
            **RUN_PARAMS[name].schema(),
        )
        for name in _FORM
    },
    tags=["imgpipe", "ml", "scoring"],
    doc_md=__doc__,
)
def image_classification_inbox():
    @task(execution_timeout=timedelta(minutes=30))
    @fail_fast
    def scan_images(**context) -> dict:
        """Catalog the bucket so new inbox files are known (no training here)."""
        import imgpipe_runtime as rt

        from pipeline import catalog

        params = rt.run_params(context)
        summary = catalog.scan(rt.database(), rt.object_store(params["bucket"]), params["prefix"])
        return {"dataset_version": summary.get("dataset_version")}

    @task(
        execution_timeout=timedelta(hours=2),
        queue=os.environ.get("PIPELINE_SCORE_QUEUE", "default"),
    )
    @fail_fast
    def score_inbox(**context) -> dict:
        """Plan and score every shard of the inbox with the version behind model_ref."""
        import imgpipe_runtime as rt

        from pipeline import score

        params = rt.run_params(context)
        db, store = rt.database(), rt.object_store(params["bucket"])
        plan = score.plan_scoring(
            db,
            params["bucket"],
            params["prefix"],
            model_name=rt.model_name(params),
            model_ref=params["model_ref"],
            shards=1,
            subsets=("inbox",),
        )
        result = score.score_shard(
            db,
            store,
            model_name=rt.model_name(params),
            model_version=str(plan["model_version"]),
            shard=0,
            shards=1,
            prefix=params["prefix"],
            run_key=rt.run_key(context),
            cache_dir=rt.cache_dir(),
            precision=params["precision"],
            subsets=("inbox",),
        )
        return {"model_version": plan["model_version"], **result}

    @task
    @fail_fast
    def check_drift(**context) -> dict:
        """The inbox images scored since the version's last inbox verdict, against its val
        reference."""
        import imgpipe_runtime as rt
        from airflow.sdk.exceptions import AirflowSkipException

        from pipeline import drift

        params = rt.run_params(context)
        scored = context["ti"].xcom_pull(task_ids="score_inbox") or {}
        if not scored.get("scored"):
            raise AirflowSkipException("no inbox image scored in this run: nothing new to check")
        return drift.check_drift(
            rt.database(),
            model_name=rt.model_name(params),
            model_version=str(scored["model_version"]),
            run_key=rt.run_key(context),
            cache_dir=rt.cache_dir(),
            thresholds=drift.Thresholds.from_params(params),
            subsets=("inbox",),
        )

    @task(outlets=[DRIFT_ASSET])
    @fail_fast
    def publish_drift(**context) -> dict:
        """Emit the drift asset event only when check_drift found drift."""
        import imgpipe_runtime as rt

        return rt.publish_drift(context, context["ti"].xcom_pull(task_ids="check_drift"))

    scan_images() >> score_inbox() >> check_drift() >> publish_drift()


image_classification_inbox()
