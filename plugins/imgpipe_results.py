"""Results page in the Airflow UI: champion, accuracy by version, confusion matrix, review queue,
drift.

An Airflow 3 plugin: a FastAPI app mounted by the API server under `/imgpipe-results` and an
external view that puts it in the Airflow navigation (an iframe on the same origin, so the
browser sends Airflow's `_token` cookie along). Airflow does not authenticate plugin apps: every
route here depends on `airflow_user`, which resolves the caller through Airflow's own
`get_user` (bearer token or the UI's cookie, checked by the configured auth manager) and asks
the auth manager for read access to the DAG whose results these are. Anonymous requests get 401.

The data comes from `pipeline.results` (read-only SQL over the project's views) through the
Airflow connections of `imgpipe_runtime`. Cheap to import: Airflow's API modules, Pillow and
the database are touched only when a request arrives.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import pymysql
from airflow.plugins_manager import AirflowPlugin
from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from pipeline.errors import ServiceUnavailable

URL_PREFIX = "/imgpipe-results"
# Whoever may read this DAG may read its results.
RESULTS_DAG_ID = "image_classification"
UI_DIR = Path(__file__).resolve().parent / "imgpipe_results_ui"
UI_FILES = {
    "results.js": "text/javascript",
    "results.css": "text/css",
}

NO_SUCH_TABLE = 1146  # MySQL's ER_NO_SUCH_TABLE
_bearer = HTTPBearer(auto_error=False)


async def airflow_user(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Any:
    """The authenticated Airflow user allowed to read RESULTS_DAG_ID; 401/403 otherwise."""
    from airflow.api_fastapi.app import get_auth_manager
    from airflow.api_fastapi.auth.managers.models.resource_details import DagDetails
    from airflow.api_fastapi.core_api.security import get_user

    user = await get_user(request, None, credentials)
    if not get_auth_manager().is_authorized_dag(
        method="GET", details=DagDetails(id=RESULTS_DAG_ID), user=user
    ):
        raise HTTPException(
            status_code=403, detail=f"reading the results needs read access to {RESULTS_DAG_ID}"
        )
    return user


app = FastAPI(
    title="Image classification results",
    description="Read-only results of the image_classification DAG (MySQL views, thumbnails).",
    dependencies=[Depends(airflow_user)],
)


@app.exception_handler(ValueError)
async def _bad_request(_: Request, exc: ValueError) -> JSONResponse:
    return JSONResponse(status_code=400, content={"detail": str(exc)})


@app.exception_handler(LookupError)
async def _not_found(_: Request, exc: LookupError) -> JSONResponse:
    return JSONResponse(status_code=404, content={"detail": str(exc)})


@app.exception_handler(pymysql.err.ProgrammingError)
async def _not_migrated(_: Request, exc: pymysql.err.ProgrammingError) -> JSONResponse:
    if exc.args and exc.args[0] == NO_SUCH_TABLE:
        detail = (
            f"the pipeline's tables are missing ({exc.args[-1]}): run the DAG"
            " image_classification once, or `python -m pipeline migrate`"
        )
        return JSONResponse(status_code=503, content={"detail": detail})
    raise exc


@app.exception_handler(ConnectionError)
@app.exception_handler(ServiceUnavailable)
async def _unavailable(_: Request, exc: Exception) -> JSONResponse:
    return JSONResponse(status_code=503, content={"detail": str(exc)})


def _database():
    import imgpipe_runtime

    return imgpipe_runtime.database()


def _model(model_name: str | None) -> str:
    import imgpipe_runtime

    return model_name or imgpipe_runtime.model_name()


ModelName = Annotated[str | None, Query(description="registered model (default: MODEL_NAME)")]
Limit = Annotated[int, Query(ge=1, le=200)]


@app.get("/", include_in_schema=False)
def page() -> FileResponse:
    return FileResponse(UI_DIR / "index.html", media_type="text/html")


@app.get("/static/{name}", include_in_schema=False)
def static(name: str) -> FileResponse:
    if name not in UI_FILES:
        raise HTTPException(status_code=404, detail=f"no file {name!r}")
    return FileResponse(UI_DIR / name, media_type=UI_FILES[name])


@app.get("/api/overview")
def get_overview(model_name: ModelName = None) -> dict[str, Any]:
    """Champion and challenger, alias history, dataset version, MLflow run links."""
    from pipeline import registry, results

    return results.overview(_database(), _model(model_name), mlflow_ui_url=registry.mlflow_ui_url())


@app.get("/api/accuracy")
def get_accuracy(model_name: ModelName = None) -> dict[str, Any]:
    """Accuracy of every version on its labelled predictions (`v_accuracy_by_model_version`)."""
    from pipeline import results

    return {"items": results.accuracy_by_version(_database(), _model(model_name))}


@app.get("/api/confusion")
def get_confusion(
    model_name: ModelName = None, model_version: Annotated[int | None, Query(ge=1)] = None
) -> dict[str, Any]:
    """Confusion matrix of a version's evaluation (default: the champion)."""
    from pipeline import results

    db, name = _database(), _model(model_name)
    version = results.resolve_version(db, name, model_version)
    if version is None:
        raise LookupError(results.NEXT_STEP)
    return results.confusion(db, name, version)


@app.get("/api/predictions")
def get_predictions(
    model_name: ModelName = None,
    model_version: Annotated[int | None, Query(ge=1)] = None,
    queue: Annotated[str, Query(description="review: low confidence or wrong; all")] = "review",
    true_label: str | None = None,
    predicted_label: str | None = None,
    subset: str | None = None,
    below: Annotated[float | None, Query(gt=0, le=1)] = None,
    wrong: bool = False,
    after: Annotated[str | None, Query(description="`next` of the previous page")] = None,
    limit: Limit = 50,
) -> dict[str, Any]:
    """A page of a version's predictions (default: the champion's review queue)."""
    from pipeline import results

    db, name = _database(), _model(model_name)
    version = results.resolve_version(db, name, model_version)
    if version is None:
        raise LookupError(results.NEXT_STEP)
    flt = results.PredictionFilter(
        queue=queue,
        true_label=true_label or None,
        predicted_label=predicted_label or None,
        subset=subset or None,
        below=below,
        wrong_only=wrong,
    )
    page = results.prediction_page(db, name, version, flt, after=after or None, limit=limit)
    return {"model_name": name, "model_version": version, **page}


@app.get("/api/disagreements")
def get_disagreements(
    model_name: ModelName = None,
    after: Annotated[int | None, Query(ge=0)] = None,
    limit: Limit = 50,
) -> dict[str, Any]:
    """Images the champion and the challenger label differently."""
    from pipeline import results

    return results.disagreements(_database(), _model(model_name), after=after, limit=limit)


@app.get("/api/inbox")
def get_inbox(
    model_name: ModelName = None,
    limit: Limit = 24,
    offset: Annotated[int, Query(ge=0, le=100_000)] = 0,
) -> dict[str, Any]:
    """The latest inbox predictions (unscored inbox images too)."""
    from pipeline import results

    return results.inbox_predictions(_database(), _model(model_name), limit=limit, offset=offset)


@app.get("/api/drift")
def get_drift(model_name: ModelName = None, limit: Limit = 40) -> dict[str, Any]:
    """The latest drift checks, newest first (`v_drift_history`), the newest per subset marked."""
    from pipeline import results

    return results.drift_history(_database(), _model(model_name), limit=limit)


@app.get("/api/images/{image_id}/thumbnail")
def get_thumbnail(image_id: int, request: Request, size: Annotated[int, Query()] = 128) -> Response:
    """A catalogued image's thumbnail (JPEG, at most `size` px), generated once and cached."""
    import imgpipe_runtime

    from pipeline import results

    data, etag = results.thumbnail(
        _database(),
        imgpipe_runtime.object_store,
        image_id,
        size=size,
        cache_dir=imgpipe_runtime.cache_dir(),
    )
    # Revalidated on every use (a 304 while the image is unchanged): an object overwritten
    # under its key must not show its old picture beside its new prediction.
    headers = {"ETag": f'"{etag}"', "Cache-Control": "private, no-cache"}
    if request.headers.get("if-none-match") == f'"{etag}"':
        return Response(status_code=304, headers=headers)
    return Response(content=data, media_type="image/jpeg", headers=headers)


class ImgpipeResultsPlugin(AirflowPlugin):
    """The results API under the API server and its page in the navigation."""

    name = "imgpipe_results"
    fastapi_apps = [
        {"app": app, "url_prefix": URL_PREFIX, "name": "Image classification results"},
    ]
    external_views = [
        {
            "name": "Image results",
            # Relative: resolved against the UI's base URL, so a proxied prefix keeps working.
            "href": f"{URL_PREFIX.lstrip('/')}/",
            "url_route": "imgpipe-results",
            "destination": "nav",
        },
    ]
