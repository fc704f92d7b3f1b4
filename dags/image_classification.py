"""
### image_classification: catalog → train → gate → score, on a schedule or from the trigger form

Catalogs `s3://<bucket>/<prefix>/<split>/<label>/<file>` into MySQL, trains a torchvision
ResNet18 on the train split of the new dataset version, registers it in MLflow, promotes it to
`@champion` only if it earns it, scores the test split and the unlabelled `inbox/` with the
champion (one mapped task per shard) and writes every prediction to MySQL.

**Connections** (ids from env `PIPELINE_S3_CONN_ID` / `PIPELINE_MYSQL_CONN_ID`):
- `imgpipe_s3`: type `aws`, login/password = access key/secret, extra `{"endpoint_url": "http://minio:9000"}`
- `imgpipe_mysql`: type `mysql`, schema = the project database

**Environment**: `MLFLOW_TRACKING_URI`, `MODEL_NAME` (default registered model), `PIPELINE_SCHEDULE`
(cron, default nightly 02:00 UTC), `PIPELINE_SCHEDULE_ON` (`cron`, the default; `drift`: run when
the `imgpipe_drift` asset is updated; `both`), `PIPELINE_CACHE_DIR` (image/checkpoint cache).

**Params** (the trigger form; `airflow dags trigger -c '{...}'` and the REST API use the same names):
`bucket`, `prefix`, `epochs`, `batch_size`, `learning_rate`, `image_size`, `weights`
(`none` / `imagenet` / path / `s3://` state dict), `min_accuracy`, `promotion_margin`, `shards`,
`force_retrain`, `score_only`, `rollback_to`, `model_ref`, `require_approval` (default from env
`PIPELINE_REQUIRE_APPROVAL`) and `approval_timeout_hours`, the drift thresholds `drift_p_value`
(accepted false-positive rate), `drift_min_images`, `drift_label_shift`, `drift_confidence_drop`,
... Every value is validated again by the
first task, because `dags test -c` and the REST API skip the form.

**Scope**: `model_name` is the registered model of one dataset scope (empty: `MODEL_NAME`); every
task uses it. Point the DAG at a bucket/prefix with other labels under a `model_name` of its own:
a champion trained on other labels is never replaced unless `allow_label_change` is set.

**Failures**: a refusal no retry can fix (a bad param, an untrainable dataset, an unknown dataset
version, a label-set mismatch, no champion to score with) fails its task at once, with the message
saying what to change; a service outage fails the task and Airflow retries it.

**Nightly**: on an unchanged bucket the run skips training and scores only new images (seconds).

**Tasks**: `check_services` → `scan_images` → `check_dataset` (short-circuits training when
nothing changed) → `train_model` → `promote_model` → `approve_promotion` (with `require_approval`,
when the gate would promote: a person answers in Browse > Required Actions or through the REST
API; approve moves the champion, reject or no answer within `approval_timeout_hours` keeps it) →
`publish_champion` → `plan_scoring` →
`score_images` (mapped over shards) → `evaluate_model` and `check_drift` (this run's scored test
and inbox images against the scoring version's val reference, into `drift_reports`) →
`publish_drift` (the `imgpipe_drift` asset event, only when drift was found). Each task also runs alone with
`airflow tasks test image_classification <task_id> <date>`, reading its inputs from MySQL/MLflow.
"""

from __future__ import annotations

import os
from datetime import datetime, timedelta

from airflow.sdk import AssetOrTimeSchedule, CronTriggerTimetable, Param, TriggerRule, dag, task
from imgpipe_approval import PromotionApproval
from imgpipe_runtime import CATALOG_ASSET, CHAMPION_ASSET, DEFAULT_ARGS, DRIFT_ASSET, fail_fast

from pipeline.params import RUN_PARAMS


def _form_params() -> dict[str, Param]:
    return {
        name: Param(
            spec.default, description=spec.description, section=spec.section, **spec.schema()
        )
        for name, spec in RUN_PARAMS.items()
    }


SCHEDULE_ON = ("cron", "drift", "both")


def _schedule():
    """The cron of PIPELINE_SCHEDULE, the drift asset, or either (PIPELINE_SCHEDULE_ON)."""
    cron = os.environ.get("PIPELINE_SCHEDULE", "0 2 * * *")
    on = os.environ.get("PIPELINE_SCHEDULE_ON", "cron")
    if on == "cron":
        return cron
    if on == "drift":
        return [DRIFT_ASSET]
    if on == "both":
        timetable = CronTriggerTimetable(cron, timezone="UTC")
        return AssetOrTimeSchedule(timetable=timetable, assets=DRIFT_ASSET)
    raise ValueError(f"PIPELINE_SCHEDULE_ON={on!r}; expected one of: {', '.join(SCHEDULE_ON)}")


SHOULD_TRAIN = "should_train"  # check_dataset's decision, as an XCom of its own


def _xcom(context, task_id: str, key: str = "return_value"):
    """An upstream task's XCom in this run, or None (e.g. under `airflow tasks test`). An error
    reading it fails the task (Airflow retries it): a guess from durable state could gate,
    score or check another version than this run's."""
    return context["ti"].xcom_pull(task_ids=task_id, key=key)


def _dataset(context, db, params: dict) -> dict:
    """The dataset version this run scanned (`catalog.get_dataset` row); alone, the latest."""
    from pipeline import catalog

    scanned = _xcom(context, "scan_images") or {}
    return catalog.resolve_dataset(
        db, params["bucket"], params["prefix"], scanned.get("dataset_version")
    )


@dag(
    dag_id="image_classification",
    schedule=_schedule(),
    start_date=datetime(2026, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    params=_form_params(),
    tags=["imgpipe", "ml", "training", "scoring"],
    doc_md=__doc__,
)
def image_classification():
    @task
    @fail_fast
    def check_services(**context) -> dict:
        """Validate params, then prove MySQL (and migrate), S3 (list the images, read/write the
        pipeline's own bucket) and MLflow work."""
        import imgpipe_runtime as rt

        from pipeline.preflight import run_checks

        params = rt.run_params(context)
        db, store = rt.database(), rt.object_store(params["bucket"])
        return run_checks(
            db,
            store,
            params["prefix"],
            work_store=rt.work_store(),
            mysql_where=rt.where_to_fix("mysql"),
            s3_where=rt.where_to_fix("s3"),
        )

    @task(outlets=[CATALOG_ASSET])
    @fail_fast
    def scan_images(**context) -> dict:
        """Catalog the bucket into MySQL; returns the dataset version and counts."""
        import imgpipe_runtime as rt

        from pipeline import catalog

        params = rt.run_params(context)
        summary = catalog.scan(
            rt.database(),
            rt.object_store(params["bucket"]),
            params["prefix"],
            val_percent=params["val_percent"],
            leakage_policy=params["leakage_policy"],
            small_label_policy=params["small_label_policy"],
            min_images_per_label=params["min_images_per_label"],
            force_delete=params["force_delete"],
        )
        rt.log.info(
            "scan: %s",
            {
                k: summary.get(k)
                for k in (
                    "dataset_version",
                    "changed",
                    "listed",
                    "new",
                    "changed_objects",
                    "deleted",
                    "ok",
                    "rejected",
                    "reasons",
                )
            },
        )
        return {k: summary[k] for k in ("dataset_version", "changed") if k in summary} | {
            "reasons": summary.get("reasons", {}),
        }

    @task.short_circuit(ignore_downstream_trigger_rules=False)
    @fail_fast
    def check_dataset(**context) -> bool:
        """Refuse bad datasets; return whether training should run (False skips train_model)."""
        import imgpipe_runtime as rt

        from pipeline import train_plan

        params = rt.run_params(context)
        db = rt.database()
        should_train, why = train_plan.decide_training(
            db,
            _dataset(context, db, params),
            rt.model_name(params),
            **{k: params[k] for k in train_plan.DECISION_PARAMS},
        )
        rt.log.info("%s: %s", "training" if should_train else "no training", why)
        # A False return is not stored (the short circuit raises to skip): the gate reads this.
        context["ti"].xcom_push(key=SHOULD_TRAIN, value=should_train)
        return should_train

    # PIPELINE_TRAIN_QUEUE=gpu routes training to a GPU-tagged Celery worker (docs/docker.md).
    @task(
        execution_timeout=timedelta(hours=6),
        queue=os.environ.get("PIPELINE_TRAIN_QUEUE", "default"),
    )
    @fail_fast
    def train_model(**context) -> dict:
        """Train ResNet18 on the dataset version; checkpoints per epoch; registers a version."""
        import imgpipe_runtime as rt

        from pipeline import train
        from pipeline.train_plan import TrainParams, params_from_run

        params = rt.run_params(context)
        db, store = rt.database(), rt.object_store(params["bucket"])
        return train.train_model(
            db,
            store,
            _dataset(context, db, params)["dataset_version"],
            TrainParams.from_dict(params_from_run(params)),
            model_name=rt.model_name(params),
            run_key=rt.run_key(context),
            cache_dir=rt.cache_dir(),
            checkpoint_store=train.S3CheckpointStore(
                rt.work_store(), image_bucket=params["bucket"]
            ),
            force_retrain=params["force_retrain"],
        )

    @task(trigger_rule=TriggerRule.NONE_FAILED)
    @fail_fast
    def promote_model(**context) -> dict:
        """Promotion gate (or rollback); records the decision in MLflow and MySQL."""
        import imgpipe_runtime as rt
        from airflow.sdk.exceptions import AirflowSkipException

        from pipeline import registry

        params = rt.run_params(context)
        db = rt.database()
        actor = f"airflow:{context['run_id']}"
        if params["rollback_to"] is not None:
            return registry.rollback(
                db,
                rt.model_name(params),
                str(params["rollback_to"]),
                actor=actor,
                reason="rollback_to param",
            )
        if params["score_only"]:
            raise AirflowSkipException("score_only: no gate")
        # Without train_model's result (training skipped, or the gate run alone with `airflow
        # tasks test`) the version to gate is found in MySQL and MLflow.
        name = rt.model_name(params)
        skipped = _xcom(context, "check_dataset", key=SHOULD_TRAIN) is False
        trained = _xcom(context, "train_model") or {
            "model_version": registry.version_to_gate(
                db,
                name,
                run_key=rt.run_key(context),
                dataset_version=_dataset(context, db, params)["dataset_version"]
                if skipped
                else None,
                retry_refused=params["allow_label_change"],
            )
        }
        if trained.get("skipped") or not trained.get("model_version"):
            raise AirflowSkipException("no new model version in this run")
        return registry.promote(
            db,
            rt.object_store(params["bucket"]),
            rt.model_name(params),
            str(trained["model_version"]),
            min_accuracy=params["min_accuracy"],
            promotion_margin=params["promotion_margin"],
            actor=actor,
            cache_dir=rt.cache_dir(),
            allow_label_change=params["allow_label_change"],
            require_approval=params["require_approval"],
        )

    @task(outlets=[CHAMPION_ASSET], trigger_rule=TriggerRule.NONE_FAILED)
    @fail_fast
    def publish_champion(**context) -> str:
        """Emit the champion asset event only when the champion actually moved."""
        from airflow.sdk.exceptions import AirflowSkipException

        decision = _xcom(context, "approve_promotion") or _xcom(context, "promote_model") or {}
        if decision.get("decision") not in ("promoted", "rolled_back"):
            said = decision.get("reason") if decision.get("review") else None
            raise AirflowSkipException(
                f"champion unchanged ({said or decision.get('decision', 'no gate')})"
            )
        return str(decision.get("model_version"))

    @task(trigger_rule=TriggerRule.NONE_FAILED)
    @fail_fast
    def plan_scoring(**context) -> list[dict]:
        """Resolve the model alias to one version for the whole run and split the work in shards."""
        import imgpipe_runtime as rt

        from pipeline import score

        params = rt.run_params(context)
        plan = score.plan_scoring(
            rt.database(),
            params["bucket"],
            params["prefix"],
            model_name=rt.model_name(params),
            model_ref=params["model_ref"],
            shards=params["shards"],
            force=params["force_rescore"],
        )
        rt.log.info("scoring plan: %s", plan)
        # One kwargs dict per shard task; nothing to score gives an empty (skipped) expansion.
        if not plan.get("to_score"):
            return []
        return [
            {
                "shard": shard,
                "model_version": str(plan["model_version"]),
                "dataset_version": plan["dataset_version"],
            }
            for shard in plan["shards"]
        ]

    # PIPELINE_SCORE_QUEUE=gpu scores on the GPU worker: nvJPEG decoding, bf16, batch 512.
    @task(
        execution_timeout=timedelta(hours=2),
        queue=os.environ.get("PIPELINE_SCORE_QUEUE", "default"),
    )
    @fail_fast
    def score_images(
        shard: int, model_version: str, dataset_version: str | None = None, **context
    ) -> dict:
        """Score one shard with the planned model version; idempotent per (image, model version)."""
        import imgpipe_runtime as rt

        from pipeline import score

        params = rt.run_params(context)
        return score.score_shard(
            rt.database(),
            rt.object_store(params["bucket"]),
            model_name=rt.model_name(params),
            model_version=str(model_version),
            shard=shard,
            shards=params["shards"],
            prefix=params["prefix"],
            dataset_version=dataset_version,
            force=params["force_rescore"],
            run_key=rt.run_key(context),
            cache_dir=rt.cache_dir(),
            precision=params["precision"],
        )

    @task(trigger_rule=TriggerRule.NONE_FAILED)
    @fail_fast
    def evaluate_model(**context) -> dict:
        """Evaluation of the scored model version on its labelled predictions; logged to MLflow."""
        import imgpipe_runtime as rt

        from pipeline import registry, score

        params = rt.run_params(context)
        plan = _xcom(context, "plan_scoring") or []
        version = (plan[0]["model_version"] if plan else None) or registry.resolve_model_version(
            rt.model_name(params), params["model_ref"]
        )
        result = score.evaluate(
            rt.database(),
            model_name=rt.model_name(params),
            model_version=str(version),
            dataset_version=plan[0]["dataset_version"] if plan else None,
        )
        rt.log.info("evaluation of %s v%s: %s", rt.model_name(params), version, result)
        # XCom stays small whatever the number of classes: per-class rows are in MySQL/MLflow.
        return {k: v for k, v in result.items() if k != "per_class"}

    @task(trigger_rule=TriggerRule.NONE_FAILED)
    @fail_fast
    def check_drift(**context) -> dict:
        """This run's scored test and inbox images against the scoring version's val reference;
        skipped when the run scored nothing new (an unchanged bucket): no empty verdict."""
        import imgpipe_runtime as rt
        from airflow.sdk.exceptions import AirflowSkipException

        from pipeline import drift, registry

        params = rt.run_params(context)
        plan = _xcom(context, "plan_scoring") or []
        version = (plan[0]["model_version"] if plan else None) or registry.resolve_model_version(
            rt.model_name(params), params["model_ref"]
        )
        db = rt.database()
        subsets = drift.subsets_scored(db, rt.model_name(params), int(version), rt.run_key(context))
        if not subsets:
            raise AirflowSkipException(
                f"this run scored no image with v{version}: nothing to check"
            )
        return drift.check_drift(
            db,
            model_name=rt.model_name(params),
            model_version=str(version),
            run_key=rt.run_key(context),
            cache_dir=rt.cache_dir(),
            thresholds=drift.Thresholds.from_params(params),
            subsets=subsets,
        )

    @task(outlets=[DRIFT_ASSET], trigger_rule=TriggerRule.NONE_FAILED)
    @fail_fast
    def publish_drift(**context) -> dict:
        """Emit the drift asset event only when check_drift found drift."""
        import imgpipe_runtime as rt

        return rt.publish_drift(context, _xcom(context, "check_drift"))

    checked = check_services()
    scanned = scan_images()
    needs_training = check_dataset()
    trained = train_model()
    promoted = promote_model()
    # Asks only when the gate's verdict is awaiting_approval (require_approval); skipped otherwise.
    approved = PromotionApproval(task_id="approve_promotion", trigger_rule=TriggerRule.NONE_FAILED)
    published = publish_champion()
    plan = plan_scoring()
    scored = score_images.expand_kwargs(plan)
    evaluated = evaluate_model()

    checked >> scanned >> needs_training >> trained >> promoted >> approved >> published >> plan
    scored >> evaluated
    scored >> check_drift() >> publish_drift()


image_classification()
