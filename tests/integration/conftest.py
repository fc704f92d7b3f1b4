"""Session fixtures of the results plugin's tests: one scored model, one Airflow API server."""

from __future__ import annotations

import os

import pytest

from tests.integration.results_data import (
    ScoredResults,
    api_server,
    new_suffix,
    scope_names,
    scored_results,
)

# Set (`make results-screenshot`): the page shows the demo's own database and model, and the
# browser test writes its screenshot to this path for the README.
SCREENSHOT_ENV = "IMGPIPE_RESULTS_SCREENSHOT"


@pytest.fixture(scope="session")
def results_stack(settings, tmp_path_factory):
    """(data, API server URL): a scored champion and challenger in a database of their own (or
    the demo's: see above) and an `airflow api-server` reading it, booted meanwhile."""
    workdir = tmp_path_factory.mktemp("results")
    if os.environ.get(SCREENSHOT_ENV):
        from pipeline import results
        from pipeline.db import Database

        db = Database(settings.mysql)
        champion = results.resolve_version(db, settings.model_name, None)
        assert champion is not None, "no champion in the demo's database: run `make demo` first"
        data = ScoredResults(
            db, None, settings.model_name, str(champion), None, settings.mysql.database
        )
        with api_server(settings, data.mysql_database, data.model_name, workdir) as server:
            yield data, server.wait()
        return
    suffix = new_suffix()
    database, model_name = scope_names(settings, suffix)
    with (
        api_server(settings, database, model_name, workdir) as server,
        scored_results(settings, workdir, suffix) as data,
    ):
        yield data, server.wait()


@pytest.fixture(scope="session")
def results_data(results_stack):
    return results_stack[0]


@pytest.fixture(scope="session")
def results_server(results_stack):
    """The base URL of an `airflow api-server` reading `results_data`."""
    return results_stack[1]
