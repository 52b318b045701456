"""The page at GET /, in a real headless browser: the system's Chromium (Debian's `chromium` package; .ci/run
installs it where it can) driven by Playwright. Skipped, with the reason, where either is missing."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import serving

pytestmark = pytest.mark.slow  # the session's trained work directory, a server, a browser
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip("no Chromium installed (apt-get install chromium); the page is tested in a real browser")
    sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright's Python package is not installed")
    with sync_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield chromium
        chromium.close()


def test_the_page_classifies_a_product_with_a_photo(trained_workdir, browser, tmp_path):
    photo = next(iter(sorted((trained_workdir / "catalog" / "image_train").glob("*.jpg"))))
    with serving(trained_workdir) as (url, app):
        page = browser.new_page()
        page.goto(url + "/")
        assert page.title() == "emde-pipeline: classify a product"
        page.fill("#title", "Piscine tubulaire 3 m")
        page.fill("#description", "Piscine hors sol avec pompe de filtration")
        page.set_input_files("#image", str(photo))
        page.click("#classify")
        page.wait_for_selector("tr.result", timeout=60_000)
        rows = page.query_selector_all("tr.result")
        headers = [th.inner_text() for th in page.query_selector_all("#head th")]
        cells = [[td.inner_text() for td in row.query_selector_all("td")] for row in rows]
        meta = page.inner_text("#meta")
        page.screenshot(path=str(Path(tmp_path) / "page.png"), full_page=True)
        version = app.state.models.current.version
    assert len(rows) == 5
    assert headers == ["class", "name", "probability", "title_cam", "desc_cam", "title_bpe", "image", "bias"]
    codes = [int(c[0]) for c in cells]
    assert len(set(codes)) == 5 and all(c[2].endswith(" %") for c in cells)
    probabilities = [float(c[2].rstrip(" %")) for c in cells]
    assert probabilities == sorted(probabilities, reverse=True)
    assert version in meta and "logit" in meta


def test_the_page_shows_a_refusal_as_its_one_line(trained_workdir, browser, tmp_path):
    not_a_photo = tmp_path / "notes.jpg"
    not_a_photo.write_text("these are notes, not a photo")
    with serving(trained_workdir) as (url, _):
        page = browser.new_page()
        page.goto(url + "/")
        page.fill("#title", "Livre")
        page.set_input_files("#image", str(not_a_photo))
        page.click("#classify")
        page.wait_for_function("document.getElementById('error').textContent.length > 0", timeout=60_000)
        assert page.inner_text("#error") == "form.image: not an image (JPEG, PNG, WebP, ... bytes expected)"
        assert page.query_selector("#results").is_hidden()
