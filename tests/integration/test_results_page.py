"""The results page in a real browser: Debian's chromium driven by Playwright, logged in to a
real Airflow API server (this checkout's plugins) as the `.env` admin.

The page must be in Airflow's navigation and render, inside Airflow's iframe, the champion, the
accuracy chart, the confusion heatmap, the drift checks and thumbnails the browser actually
decoded. A screenshot lands in the test's tmp_path. With IMGPIPE_RESULTS_SCREENSHOT=<png path>
(`make results-screenshot`, after `make demo`) the page shows the demo's own database and model
and the screenshot is also written there, shrunk, for the README.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.integration.conftest import SCREENSHOT_ENV

REPO = Path(__file__).resolve().parents[2]
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")


@pytest.fixture
def browser_page():
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), f"{CHROMIUM} is missing: `make browser-deps` installs it"
    with sync_playwright() as pw:
        # --no-sandbox: the suite runs as root in CI, where chromium's sandbox refuses to start.
        browser = pw.chromium.launch(
            executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage"]
        )
        try:
            page = browser.new_page(viewport={"width": 1440, "height": 1100})
            # Generous: two shared cores render Airflow's UI bundle slowly while other tests run.
            page.set_default_timeout(120_000)
            yield page
        finally:
            browser.close()


def _images_decoded(frame, selector: str) -> int:
    """Scroll `selector`'s images into view, wait until each is decoded; returns how many."""
    frame.locator(selector).first.scroll_into_view_if_needed()
    frame.wait_for_function(
        """(sel) => {
            const imgs = [...document.querySelectorAll(sel)];
            imgs.forEach((img) => img.scrollIntoView({block: "nearest"}));
            return imgs.length > 0 && imgs.every((img) => img.complete && img.naturalWidth > 0);
        }""",
        arg=selector,
    )
    return frame.locator(selector).count()


def _write_readme_screenshot(source: Path, target: Path) -> None:
    """`source` at two thirds of its size, as a 256-colour PNG (small enough to commit)."""
    from PIL import Image

    with Image.open(source) as img:
        size = (img.width * 2 // 3, img.height * 2 // 3)
        small = img.convert("RGB").resize(size, Image.Resampling.LANCZOS)
        target.parent.mkdir(parents=True, exist_ok=True)
        small.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(target, optimize=True)


def _open_results_page(page, airflow_url: str):
    """Log in as the `.env` admin, follow the navigation to the results page; its frame."""
    page.goto(f"{airflow_url}/")
    page.locator("input[name=username]").fill(os.environ.get("AIRFLOW_ADMIN_USER", "admin"))
    page.locator("input[name=password]").fill(os.environ.get("AIRFLOW_ADMIN_PASSWORD", "admin"))
    page.locator("button[type=submit]").click()
    page.wait_for_url(lambda url: "/auth/login" not in url)

    nav = page.locator('a[href$="plugin/imgpipe-results"]')
    nav.first.wait_for()
    assert "Image results" in (nav.first.get_attribute("title") or "") + nav.first.inner_text()
    nav.first.click()
    page.wait_for_url("**/plugin/imgpipe-results**")
    iframe = page.locator('iframe[title="Image results"]')
    iframe.wait_for()
    frame = iframe.element_handle().content_frame()
    frame.wait_for_selector("body[data-loaded]")
    assert frame.locator("body").get_attribute("data-loaded") == "true", frame.locator(
        "#error"
    ).inner_text()
    return frame


def test_results_page_in_the_airflow_ui_renders_champion_chart_heatmap_drift_and_thumbnails(
    results_data, results_server, browser_page, tmp_path
):
    data, airflow_url, page = results_data, results_server, browser_page
    try:
        frame = _open_results_page(page, airflow_url)
    except Exception:
        page.screenshot(path=str(tmp_path / "failure.png"))
        (tmp_path / "failure.html").write_text(page.content())
        raise
    assert frame.url.startswith(f"{airflow_url}/imgpipe-results/")

    assert frame.locator("#champion .version").inner_text() == f"v{data.champion}"
    versions = data.db.query(
        "SELECT COUNT(*) AS n FROM v_accuracy_by_model_version WHERE model_name = %s",
        (data.model_name,),
    )[0]["n"]
    assert frame.locator("#accuracy-chart svg rect.bar").count() == versions > 0
    cells = data.db.query(
        "SELECT COUNT(*) AS n FROM confusion_matrix WHERE model_name = %s AND model_version = %s"
        " AND n > 0",
        (data.model_name, data.champion),
    )[0]["n"]
    assert frame.locator("#heatmap td a").count() == cells > 0
    # Drift: a row per check, the newest of each subset highlighted, a check without a verdict
    # (too few images, no reference) said in words.
    checks = data.db.query(
        "SELECT status, COUNT(*) AS n FROM v_drift_history WHERE model_name = %s GROUP BY status",
        (data.model_name,),
    )
    rows = frame.locator("#drift-table tr[data-status]")
    assert rows.count() == min(sum(c["n"] for c in checks), 40)
    subsets = set(rows.evaluate_all("(trs) => trs.map((tr) => tr.dataset.subset)"))
    assert frame.locator("#drift-table tr.latest").count() == len(subsets)
    for status, words in (
        ("not_enough_images", "not enough images"),
        ("no_reference", "no reference"),
    ):
        if any(c["status"] == status for c in checks):
            cell = frame.locator(f"#drift-table tr[data-status={status}] td.unjudged").first
            assert cell.inner_text().startswith(words)
    summary = frame.locator("#drift-summary").inner_text()
    assert summary.startswith("Latest: " if checks else "no drift check yet")
    assert _images_decoded(frame, "#review-items img.thumb") > 0
    assert _images_decoded(frame, "#inbox-items img.thumb") > 0

    # A heatmap cell lists the images behind it.
    cell = frame.locator("#heatmap td a").first
    n = int(cell.inner_text())
    cell.click()
    frame.wait_for_function(
        "(n) => document.querySelector('#review-summary').textContent.includes(`: ${n} predictions`)",
        arg=n,
    )
    assert frame.locator("#review-items .item").count() == min(n, 24)

    frame.locator("#overview").scroll_into_view_if_needed()
    frame.evaluate("window.scrollTo(0, 0)")
    shot = tmp_path / "results.png"
    page.screenshot(path=str(shot))
    assert shot.stat().st_size > 10_000
    if os.environ.get(SCREENSHOT_ENV):
        _write_readme_screenshot(shot, REPO / os.environ[SCREENSHOT_ENV])
