"""A real browser (Debian's Chromium, headless, driven by Playwright) against the app on tiny models."""
import os
import shutil
import time

import pytest

from tests.app_server import launch_tiny

CHROMIUM = os.environ.get("NADA_CHROMIUM", "/usr/bin/chromium")
# On a developer machine without Chromium these tests skip; in CI (.ci/run installs it) they must run.
pytestmark = pytest.mark.skipif(not shutil.which(CHROMIUM) and not os.environ.get("CI"),
                                reason=f"{CHROMIUM} missing: `apt-get install chromium` (.ci/run does)")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    from playwright.sync_api import sync_playwright

    mp = pytest.MonkeyPatch()
    mp.setenv("NADA_LIBRARY_DIR", str(tmp_path_factory.mktemp("library")))
    demo, _, url = launch_tiny()
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        pg = browser.new_page(viewport={"width": 1400, "height": 1600})
        pg.set_default_timeout(60_000)
        pg.goto(url, wait_until="domcontentloaded")
        pg.get_by_role("tab", name="Selfie").wait_for()
        yield pg
        browser.close()
    demo.close()
    mp.undo()


def image_src(page, elem_id):
    loc = page.locator(f"#{elem_id} img")
    return loc.first.get_attribute("src") if loc.count() else None


def wait_for(predicate, timeout=90, what="condition"):
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out waiting for {what}")


def test_visit_every_tab(page, tmp_path):
    for name in ["Sample", "Edit", "Selfie", "Adapt"]:
        page.get_by_role("tab", name=name).click()
        page.screenshot(path=str(tmp_path / f"tab_{name}.png"))
    assert page.get_by_text("Untrained tiny models").first.is_visible()


def test_train_and_watch_the_preview_and_progress(page, tmp_path):
    page.get_by_role("tab", name="Adapt").click()
    page.get_by_text("Advanced").click()
    for label, value in [("Iterations", "150"), ("Preview every N steps", "5")]:
        box = page.get_by_label(f"number input for {label}")
        box.fill(value)
        box.press("Tab")
        # the click must not race the value into Gradio's state: wait until the slider shows it
        wait_for(lambda: page.get_by_label(f"range slider for {label}").input_value() == value, 30, f"{label} = {value}")
    page.get_by_role("button", name="Start").click()
    status = page.locator("#adapt-status")
    first = wait_for(lambda: "step" in status.inner_text() and image_src(page, "adapt-preview"), what="first preview")
    step_a = int(status.inner_text().split("step ")[1].split("/")[0])
    page.screenshot(path=str(tmp_path / "training.png"))
    changed = wait_for(lambda: (s := image_src(page, "adapt-preview")) and s != first and s, what="preview change")
    wait_for(lambda: "Finished" in status.inner_text(), what="the end of training")
    assert changed != first
    assert step_a < 150 and "150 steps" in status.inner_text()
    page.screenshot(path=str(tmp_path / "trained.png"))


def test_move_a_slider_and_the_image_changes(page, tmp_path):
    page.get_by_role("tab", name="Edit").click()
    page.locator("#edit-gallery").scroll_into_view_if_needed()
    page.get_by_role("button", name="Render").click()
    before = wait_for(lambda: image_src(page, "edit-gallery"), what="edit render")
    slider = page.get_by_label("range slider for PC0").first
    box = slider.bounding_box()
    page.mouse.click(box["x"] + box["width"] * 0.95, box["y"] + box["height"] / 2)  # drag to +2.7 and release
    after = wait_for(lambda: (s := image_src(page, "edit-gallery")) and s != before and s, what="edited image")
    assert after != before
    page.screenshot(path=str(tmp_path / "edited.png"))
