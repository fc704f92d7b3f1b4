"""Session fixtures of the results plugin's tests: one scored model, one Airflow API server."""

from __future__ import annotations

import os

import pytest

from tests.integration.results_data import ScoredResults, api_server, scored_results

# Set (`make results-screenshot`): the page shows the demo's own database and model, and the
# browser test writes its screenshot to this path for the README.
SCREENSHOT_ENV = "IMGPIPE_RESULTS_SCREENSHOT"


@pytest.fixture(scope="session")
def results_data(settings, tmp_path_factory):
    """A scored champion and challenger in a database of their own (or the demo's: see above)."""
    if os.environ.get(SCREENSHOT_ENV):
        from pipeline import results
        from pipeline.db import Database

        db = Database(settings.mysql)
        champion = results.resolve_version(db, settings.model_name, None)
        assert champion is not None, "no champion in the demo's database: run `make demo` first"
        yield ScoredResults(
            db, None, settings.model_name, str(champion), None, settings.mysql.database
        )
        return
    with scored_results(settings, tmp_path_factory.mktemp("results")) as data:
        yield data


@pytest.fixture(scope="session")
def results_server(settings, results_data, tmp_path_factory):
    """The base URL of an `airflow api-server` reading `results_data`."""
    with api_server(settings, results_data, tmp_path_factory.mktemp("api-server")) as url:
        yield url
