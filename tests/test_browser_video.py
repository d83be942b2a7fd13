"""The Video tab in a real browser (headless Chromium, as tests/test_browser.py): a clip uploaded, stylised and
shown, and the webcam streaming through the pipeline from Chromium's fake camera (a moving shape, no face:
the frames come back as they went, with the rate on the page)."""
import time

import pytest

from nada_core.models.tiny import tiny_generator
from nada_core.store.checkpoints import save_generator
from nada_core.store.runs import RunFolder
from tests.app_server import launch_tiny
from tests.clips import moving_face, no_face, write_clip
from tests.test_browser import ARGS, CHROMIUM, SCREENS, pytestmark, wait_for  # noqa: F401 (same skip rule)

CAMERA = ["--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    lib = tmp_path_factory.mktemp("library")
    mp = pytest.MonkeyPatch()
    mp.setenv("NADA_LIBRARY_DIR", str(lib))
    run = RunFolder(lib / "_tiny" / "ink")
    run.create({"base": "tiny", "recipe": {"source": "photo", "target": "ink"}})
    save_generator(tiny_generator(seed=4), run.final_path, {"source_model": "tiny"})
    demo, studio, url = launch_tiny()
    yield url, studio
    demo.close()
    mp.undo()


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS + CAMERA)
        context = browser.new_context(viewport={"width": 1280, "height": 900}, permissions=["camera"])
        pg = context.new_page()
        pg.set_default_timeout(60_000)
        pg.goto(server[0], wait_until="load")
        pg.get_by_role("tab", name="Video").click()
        yield pg
        browser.close()


def pick(page, elem_id, option):
    page.locator(f"#{elem_id} input").click()
    page.get_by_role("option", name=option).first.click()
    page.keyboard.press("Escape")


def test_a_clip_is_stylised_and_shown(page, tmp_path):
    clip = write_clip([no_face()] * 2 + moving_face(8, 128) + [no_face()] * 2, tmp_path / "me.mp4", audio=True)
    page.locator("#video-upload input[type=file]").set_input_files(str(clip))
    pick(page, "video-styles", "ink")
    time.sleep(0.5)
    page.locator("#video-go").click()
    status = page.locator("#video-status")
    wait_for(lambda: "with a face stylised" in status.inner_text(), 180, "the finished video")
    assert "12 frames, 8 with a face stylised" in status.inner_text()
    src = page.locator("#video-result video").first.get_attribute("src")
    assert src and src.endswith("/me-stylised.mp4")
    page.screenshot(path=str(SCREENS / "video_done_1280.png"), full_page=True)


def test_the_webcam_streams_through_the_pipeline(page):
    page.get_by_text("Live from your webcam").click()
    pick(page, "video-cam-style", "ink")
    page.locator("#video-cam").get_by_text("Click to Access Webcam").click()
    page.locator("#video-cam").get_by_role("button", name="capture photo").click()
    rate = page.locator("#video-rate")

    def measured() -> float:   # the line reads "1.2 frames/s · 430 ms this frame · 0 face(s)"
        line = rate.inner_text().strip().split("\n")[-1]
        return float(line.split(" frames/s")[0]) if " frames/s" in line else 0.0

    wait_for(lambda: measured() > 0, 120, "a measured frame rate")
    assert "0 face(s)" in rate.inner_text()     # the fake camera shows no face
    assert page.locator("#video-live img").count() == 1
    page.screenshot(path=str(SCREENS / "video_webcam_1280.png"), full_page=True)
