"""The approval step of image_classification: a person approves or rejects a promotion.

`PromotionApproval` is Airflow's human-in-the-loop operator (standard provider; since Airflow 3.3
a waiting task is in the `awaiting_input` state and holds no worker slot). It asks only when the
gate's verdict in this run is `awaiting_approval` (run param `require_approval`); otherwise it
is skipped. The question, with both scores, the dataset and model versions and links to MLflow
and the results page, shows in the UI under Browse > Required Actions and is answered there or
through the REST API (`PATCH .../taskInstances/approve_promotion/-1/hitlDetails`). The answer
goes to `pipeline.registry.review`: approve moves the champion, reject keeps the version
challenger, no answer within `approval_timeout_hours` moves nothing; reviewer and comment are
recorded in `model_versions` (and an approval's move in `alias_history`).

An answer is kept in an Airflow Variable (`imgpipe_approval_answer.<hash of dag and run>`) from
the moment it arrives until it is written to MySQL, so a try that fails in between (MySQL or
MLflow down, a dropped connection, a killed worker) is retried with the person's answer instead
of asking them again. Variables are writable by more people than MySQL (UI users with the Op
role, any DAG's code): the kept answer is sealed with an HMAC keyed by the pipeline's MySQL
password, which the task has and they do not, and a retry applies only an answer whose seal
holds for this run and version; anything else is ignored with a warning and the person is asked.
"""

from __future__ import annotations

import hashlib
import os
from datetime import timedelta
from typing import Any

from airflow.providers.standard.operators.hitl import HITLOperator
from airflow.sdk import Param
from airflow.sdk.definitions.param import ParamsDict

APPROVE, REJECT = "Approve", "Reject"
GATE_TASK = "promote_model"


class PromotionApproval(HITLOperator):
    """Approve or Reject, with a comment, for the version the gate wants to promote."""

    def __init__(self, **kwargs: Any) -> None:
        # `params` arrive merged with the DAG's (which the operator leaves out of the form).
        params = kwargs.pop("params", None)
        params = params if isinstance(params, ParamsDict) else ParamsDict(params or {})
        params["comment"] = Param(
            None,
            type=["null", "string"],
            maxLength=1024,
            description="Why (optional; kept with the version in model_versions).",
            source="task",
        )
        super().__init__(
            subject="Promote the new model version to champion?",  # replaced by execute
            options=[APPROVE, REJECT],
            multiple=False,
            params=params,
            # The run's approval_timeout_hours replaces this when the question is asked.
            response_timeout=timedelta(hours=24),
            **kwargs,
        )

    def execute(self, context: Any) -> Any:
        import imgpipe_runtime as rt
        from airflow.sdk.exceptions import AirflowSkipException

        from pipeline import registry

        params = rt.run_params(context, own=self.params)
        gate = context["ti"].xcom_pull(task_ids=GATE_TASK) or {}
        if gate.get("decision") != registry.AWAITING_APPROVAL:
            raise AirflowSkipException(
                f"no approval to ask for (gate: {gate.get('decision', 'no decision in this run')})"
            )
        name, version = rt.model_name(params), str(gate["model_version"])
        db = rt.database()
        recorded = registry.recorded_review(db, name, version)
        if recorded is not None:  # a retry after the answer was written: finish it, don't ask
            return self._apply(context, name, version, *recorded)
        given = given_answer(context, db, name, version)
        if given is not None:  # a retry after the answer came, before it was written
            rt.log.info(
                "applying the answer given before this try (%s by %s), not asking again",
                given[0],
                given[1] or "nobody",
            )
            return self._apply(context, name, version, *given)
        self.subject, self.body = registry.approval_request(
            db, name, version, results_url=_results_url(name)
        )
        self.response_timeout = timedelta(hours=params["approval_timeout_hours"])
        rt.log.info(
            "asking for approval of %s v%s (timeout %s h): Browse > Required Actions",
            name,
            version,
            params["approval_timeout_hours"],
        )
        return super().execute(context)

    def execute_complete(self, context: Any, event: dict[str, Any]) -> Any:
        from pipeline import registry

        if event.get("error_type") == "timeout":
            outcome, reviewer, comment = registry.TIMED_OUT, None, ""
        else:
            answer = super().execute_complete(context=context, event=event)
            outcome = (
                registry.APPROVED if answer["chosen_options"] == [APPROVE] else registry.REJECTED
            )
            user = answer["responded_by_user"] or {}
            reviewer = str(user.get("name") or user.get("id") or "")
            comment = str((answer["params_input"] or {}).get("comment") or "")
        import imgpipe_runtime as rt

        params = rt.run_params(context, own=self.params)
        gate = context["ti"].xcom_pull(task_ids=GATE_TASK) or {}
        name, version = rt.model_name(params), str(gate["model_version"])
        keep_answer(context, rt.database(), name, version, outcome, reviewer, comment)
        return self._apply(context, name, version, outcome, reviewer, comment)

    def _apply(
        self,
        context: Any,
        name: str,
        version: str,
        outcome: str,
        reviewer: str | None,
        comment: str,
    ) -> dict[str, Any]:
        import imgpipe_runtime as rt
        from airflow.sdk.exceptions import AirflowFailException

        from pipeline import registry

        try:
            result = rt.fail_fast(registry.review)(
                rt.database(),
                name,
                version,
                outcome,
                reviewer=reviewer,
                comment=comment,
                actor=f"airflow:{context['run_id']}",
            )
        except AirflowFailException:
            forget_answer(context)  # refused: no retry could use it
            raise
        forget_answer(context)
        if outcome == registry.TIMED_OUT:
            rt.log.warning(
                "approval of %s v%s timed out: nobody answered, the champion did not move"
                " (v%s stays challenger; this run scores with the champion in force)",
                name,
                version,
                version,
            )
        else:
            rt.log.info("%s v%s %s by %s", name, version, outcome, reviewer)
        return result


def answer_key(context: Any) -> str:
    """The Variable that keeps this run's answer until it is in MySQL (keys allow no `:`)."""
    run = f"{context['dag'].dag_id}/{context['run_id']}"
    return f"imgpipe_approval_answer.{hashlib.sha256(run.encode()).hexdigest()[:24]}"


def seal(context: Any, db: Any, answer: dict[str, Any]) -> str | None:
    """HMAC-SHA256 of `answer` for this dag run, keyed by the pipeline's MySQL password (None
    without one: nothing to seal with, so a kept answer is never trusted)."""
    import hmac
    import json

    secret = db.settings.password
    if not secret:
        return None
    run = {"dag_id": context["dag"].dag_id, "run_id": context["run_id"]}
    payload = json.dumps(run | answer, sort_keys=True).encode()
    return hmac.new(secret.encode(), b"imgpipe approval answer\0" + payload, "sha256").hexdigest()


def keep_answer(
    context: Any,
    db: Any,
    name: str,
    version: str,
    outcome: str,
    reviewer: str | None,
    comment: str,
) -> None:
    """Keep the answer, sealed, where the task's next try finds it, before anything can fail."""
    import json

    from airflow.sdk import Variable

    answer = {"model_name": name, "model_version": version, "outcome": outcome}
    answer |= {"reviewer": reviewer, "comment": comment}
    Variable.set(
        answer_key(context),
        json.dumps({"answer": answer, "seal": seal(context, db, answer)}),
        description=(
            f"{APPROVE}/{REJECT} answer of {context['dag'].dag_id} run {context['run_id']}"
            f" for {name} v{version}, kept until it is written to MySQL"
        ),
    )


def given_answer(
    context: Any, db: Any, name: str, version: str
) -> tuple[str, str | None, str] | None:
    """(outcome, reviewer, comment) an earlier try of this run received and sealed, or None."""
    import hmac
    import json

    import imgpipe_runtime as rt
    from airflow.sdk import Variable

    kept = Variable.get(answer_key(context), default=None)
    if kept is None:
        return None
    try:
        found = json.loads(kept)
        answer, sealed = dict(found["answer"]), str(found["seal"])
        expected = seal(context, db, answer)
        genuine = expected is not None and hmac.compare_digest(sealed, expected)
    except (ValueError, TypeError, KeyError) as exc:
        rt.log.warning("ignoring a malformed kept answer %s: %s", answer_key(context), exc)
        return None
    if not genuine:
        rt.log.warning(
            "ignoring the kept answer %s: its seal does not hold (not written by this task);"
            " asking again",
            answer_key(context),
        )
        return None
    if (answer["model_name"], answer["model_version"]) != (name, version):
        rt.log.warning("ignoring a kept answer for another version: %s", answer)
        return None
    return answer["outcome"], answer["reviewer"], answer["comment"]


def forget_answer(context: Any) -> None:
    """Drop the kept answer once MySQL has it (or it was refused); a failure here only logs:
    MySQL's record wins over a leftover Variable."""
    import imgpipe_runtime as rt
    from airflow.sdk import Variable

    try:
        Variable.delete(answer_key(context))
    except Exception as exc:  # noqa: BLE001 - the answer is recorded; the Variable is a leftover
        rt.log.warning("could not delete the kept answer %s: %s", answer_key(context), exc)


def _results_url(model_name: str) -> str:
    """The results page of `model_name` (absolute when Airflow's api.base_url is set)."""
    from urllib.parse import quote

    base = (os.environ.get("AIRFLOW__API__BASE_URL") or "").rstrip("/")
    return f"{base}/imgpipe-results/?model_name={quote(model_name)}"
