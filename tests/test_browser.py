"""A real browser (Debian's Chromium, headless, driven by Playwright) against the app on tiny models,
at a laptop's 1280x720 and a phone's 390 px. Screenshots of every tab land in a temporary folder on
every run (its path is printed) so a person can look at what users see."""
import math
import os
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path

import pytest
from PIL import Image
from skimage import data

from nada_core.store.runs import RunFolder
from tests.app_server import launch_tiny

CHROMIUM = os.environ.get("NADA_CHROMIUM", "/usr/bin/chromium")
# On a developer machine without Chromium these tests skip; in CI (.ci/run installs it) they must run.
pytestmark = pytest.mark.skipif(not shutil.which(CHROMIUM) and not os.environ.get("CI"),
                                reason=f"{CHROMIUM} missing: `apt-get install chromium` (.ci/run does)")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
SCREENS = Path(tempfile.mkdtemp(prefix="nada_screens_"))
TABS = ["Adapt", "Sample", "Edit", "Selfie", "Video"]  # all five fit a 390 px phone (no "More tabs" menu)


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield b
        b.close()
    print(f"\nscreenshots: {SCREENS}")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("NADA_LIBRARY_DIR", str(tmp_path_factory.mktemp("library")))
    demo, studio, url = launch_tiny()
    yield url, studio
    demo.close()
    mp.undo()


def open_page(browser, url, width=1280, height=720):
    pg = browser.new_page(viewport={"width": width, "height": height})
    pg.set_default_timeout(60_000)
    pg.goto(url, wait_until="load")
    pg.get_by_role("tab", name="Selfie").wait_for()
    return pg


def image_src(page, elem_id):
    loc = page.locator(f"#{elem_id} img")
    return loc.first.get_attribute("src") if loc.count() else None


def wait_for(predicate, timeout=90, what="condition"):
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def wait_for_quickly(predicate, timeout):
    """wait_for at 10 ms, for timing a moment rather than waiting for a state."""
    end = time.monotonic() + timeout
    while time.monotonic() < end and not predicate():
        time.sleep(0.01)


def in_viewport(page, selector, share: float = 0.9) -> bool:
    """Whether ``share`` of the element is on screen in both directions (of the viewport's height where the
    element is taller than it): a video with its top third showing, or a grid half off to the side, is not."""
    box = (page.locator(selector) if isinstance(selector, str) else selector).first.bounding_box()
    vp = page.viewport_size
    if not box or box["height"] == 0 or box["width"] == 0:
        return False
    seen_h = min(box["y"] + box["height"], vp["height"]) - max(box["y"], 0)
    seen_w = min(box["x"] + box["width"], vp["width"]) - max(box["x"], 0)
    return seen_h >= share * min(box["height"], vp["height"]) and seen_w >= share * min(box["width"], vp["width"])


def set_number(page, elem_id, value):
    box = page.locator(f"#{elem_id} input").first
    box.fill(str(value))
    box.press("Tab")
    wait_for(lambda: box.input_value() == str(value), 20, f"{elem_id} = {value}")


def test_screenshots_of_every_tab_at_laptop_and_phone_size(browser, server):
    url, _ = server
    for width, height in ((1280, 720), (390, 844)):
        page = open_page(browser, url, width, height)
        for name in TABS:
            page.get_by_role("tab", name=name).click()
            time.sleep(0.5)
            page.screenshot(path=str(SCREENS / f"{name}_{width}.png"), full_page=True)
            # nothing wider than the screen: no sideways scrolling on a phone
            overflow = page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
            assert overflow <= 2, f"{name} at {width}px scrolls sideways by {overflow}px"
        assert page.locator(".tiny-banner").first.is_visible()
        page.close()
    assert len(list(SCREENS.glob("*.png"))) == 2 * len(TABS)


def test_training_can_be_watched_without_scrolling(browser, server):
    url, _ = server
    page = open_page(browser, url)
    page.get_by_role("tab", name="Adapt").click()
    assert page.locator("#adapt-stop").is_disabled()  # nothing to stop yet
    set_number(page, "adapt-iterations", 200)
    page.get_by_text("Advanced").click()
    slider = page.get_by_label("number input for Preview every N seconds")
    slider.fill("0.5")
    slider.press("Tab")
    page.get_by_text("Advanced").click()
    page.evaluate("window.scrollTo(0, 0)")
    page.locator("#adapt-start").click()
    status = page.locator("#adapt-status")
    first = wait_for(lambda: "Training" in status.inner_text() and image_src(page, "adapt-preview"), what="first preview")
    assert in_viewport(page, "#adapt-start") and in_viewport(page, "#adapt-preview")
    page.screenshot(path=str(SCREENS / "training_1280.png"))
    page.locator("#adapt-start").click()  # a second Start answers at once
    wait_for(lambda: page.get_by_text("Already training").count() > 0, 20, "the 'already training' answer")
    looks, clear, sources = 0, 0, {first}
    while "Training" in status.inner_text() and looks < 30:
        hit = page.evaluate("""() => {
            const img = document.querySelector('#adapt-preview img');
            if (!img) return 'none';
            const r = img.getBoundingClientRect();
            const top = document.elementFromPoint(r.left + r.width / 2, r.top + r.height / 2);
            return top === img ? 'image' : (top ? top.tagName + '.' + top.className : 'nothing');
        }""")
        looks += 1
        clear += hit == "image"
        src = image_src(page, "adapt-preview")
        if src:
            sources.add(src)
        time.sleep(1)
    assert looks >= 3, "the run ended too soon to be watched"
    assert clear >= 0.8 * looks, f"the preview was covered in {looks - clear} of {looks} looks"
    assert len(sources) >= 4, "the preview changed fewer than 3 times"
    wait_for(lambda: "Finished" in status.inner_text() or "Stopped" in status.inner_text(), 300, "the end of training")
    assert page.locator("#adapt-stop").is_disabled()
    # the loss curve is drawn: a coloured line over numeric axes (a few ticks, not one label per value)
    assert_curve_drawn(page, "adapt-loss")
    page.screenshot(path=str(SCREENS / "trained_1280.png"))
    page.close()


def assert_curve_drawn(page, elem_id):
    lines = page.locator(f"#{elem_id} [aria-roledescription='line mark']")
    wait_for(lambda: lines.count() >= 1, 20, f"a line in {elem_id}")
    strokes = lines.evaluate_all("es => es.map(e => e.getAttribute('stroke'))")
    assert all(strokes), f"{elem_id}: a line without a colour {strokes}"
    labels = page.locator(f"#{elem_id} [aria-roledescription='axis'] text").evaluate_all(
        "es => es.map(e => e.textContent)")
    assert 4 <= len(labels) <= 30, f"{elem_id}: {len(labels)} axis labels: {labels[:10]}"
    assert all(t.replace(".", "", 1).replace("−", "").isdigit() for t in labels if t not in ("step", "loss", "value"))


def test_edit_result_stays_in_view_while_dragging(browser, server):
    url, _ = server
    page = open_page(browser, url)
    page.get_by_role("tab", name="Edit").click()
    page.get_by_role("button", name="Render").click()
    before = wait_for(lambda: image_src(page, "edit-result"), what="edit render")
    slider = page.get_by_label("range slider for PC0").first
    slider.scroll_into_view_if_needed()
    box = slider.bounding_box()
    page.mouse.move(box["x"] + box["width"] * 0.5, box["y"] + box["height"] / 2)
    page.mouse.down()
    page.mouse.move(box["x"] + box["width"] * 0.8, box["y"] + box["height"] / 2, steps=5)
    assert in_viewport(page, "#edit-result")  # visible while the slider is held
    page.mouse.move(box["x"] + box["width"] * 0.95, box["y"] + box["height"] / 2, steps=5)
    page.mouse.up()
    after = wait_for(lambda: (s := image_src(page, "edit-result")) and s != before and s, what="edited image")
    assert after != before and in_viewport(page, "#edit-result")
    # every click that moves a slider renders: five clicks at distinct places of another slider, each a new image
    slider = page.get_by_label("range slider for PC1").first
    box = slider.bounding_box()
    for x in (0.1, 0.9, 0.3, 0.7, 0.5):
        before, value = image_src(page, "edit-result"), slider.input_value()
        page.mouse.click(box["x"] + box["width"] * x, box["y"] + box["height"] / 2)
        assert slider.input_value() != value
        wait_for(lambda: image_src(page, "edit-result") != before, 10, f"a render after the click at {x:.0%}")
    page.screenshot(path=str(SCREENS / "edited_1280.png"))
    page.close()
    phone = open_page(browser, url, 390, 844)   # on a phone the result comes first and stays at the top
    phone.get_by_role("tab", name="Edit").click()
    slider = phone.get_by_label("range slider for PC5")
    slider.first.scroll_into_view_if_needed()
    time.sleep(0.5)
    assert in_viewport(phone, "#edit-result") and in_viewport(phone, slider)
    phone.screenshot(path=str(SCREENS / "edited_390.png"))
    phone.close()


def test_selfie_shows_the_photo_with_its_face_at_once(browser, server, tmp_path):
    url, _ = server
    Image.fromarray(data.astronaut()).save(tmp_path / "me.jpg")
    page = open_page(browser, url)
    page.get_by_role("tab", name="Selfie").click()
    page.locator("#selfie-upload input[type=file]").set_input_files(str(tmp_path / "me.jpg"))
    wait_for(lambda: image_src(page, "selfie-photo"), what="the photo with its face box")
    assert "Face found" in page.locator("#selfie-status").inner_text()
    methods = page.locator("#selfie-method label").all_inner_texts()
    # the tiny base has its (untrained) tiny e4e, so every method is offered as on FFHQ 1024
    assert [m.strip() for m in methods] == ["Encoder (e4e): instant", "Encoder + optimisation", "Optimisation"]
    page.screenshot(path=str(SCREENS / "selfie_upload_1280.png"))
    page.close()


def test_first_run_without_weights_leads_somewhere(browser, tmp_path, monkeypatch):
    from app import MAX_UPLOAD
    from demo.app import CSS, build_demo
    from demo.state import Studio
    from tests.app_server import free_port

    monkeypatch.setenv("NADA_WEIGHTS_DIR", str(tmp_path / "weights"))
    monkeypatch.setenv("NADA_LIBRARY_DIR", str(tmp_path / "lib"))
    import nada_core.store.packs as packs
    monkeypatch.setattr(packs, "remote_size", lambda asset, timeout=5.0: 100 * 2 ** 20)  # no network here
    demo = build_demo(Studio(device="cpu"))
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, css=CSS,
                max_file_size=MAX_UPLOAD)
    try:
        page = open_page(browser, f"http://127.0.0.1:{port}/")
        panel = page.locator("#get-started").first
        assert panel.is_visible() and in_viewport(page, "#pack-cpu")
        text = page.locator("body").inner_text()
        assert "Get started" in text and "--tiny" in text and "CPU starter pack" in text and "300 MB" in text
        assert "https://" not in text and "nvlabs" not in text  # URLs only inside the collapsed by-hand section
        page.get_by_text("By hand (URLs and target paths)").click()
        wait_for(lambda: "nvlabs-fi-cdn" in page.locator("body").inner_text(), 10, "the by-hand list")
        page.screenshot(path=str(SCREENS / "get_started_1280.png"), full_page=True)
        page.close()
    finally:
        demo.close()


def test_gallery_fills_the_form_and_the_prompt_is_checked(browser, server):
    url, _ = server
    page = open_page(browser, url)
    page.get_by_role("tab", name="Adapt").click()
    page.get_by_text("Style gallery").click()
    box = page.locator("#adapt-gallery-pick input").first
    box.click()
    box.fill("Werewolf")
    page.get_by_role("option", name="Werewolf: Human -> Werewolf").click()
    page.locator("#adapt-gallery-use").click()
    target = page.get_by_label("Target (the new domain)")
    wait_for(lambda: target.input_value() == "Werewolf", 30, "the gallery's target in the form")
    assert page.get_by_label("Source (what it makes now)").input_value() == "Human"
    check = page.locator("#adapt-prompt-check")
    wait_for(lambda: "Prompt check:" in check.inner_text() and "strength" in check.inner_text(), 60, "the prompt check")
    page.screenshot(path=str(SCREENS / "gallery_1280.png"))
    page.close()


def _shown_step(text: str) -> int | None:
    m = re.search(r"step (\d+)/(\d+)", text)
    return int(m.group(1)) if m else None


def _seconds(text: str) -> float | None:
    m = re.search(r"about (?:(\d+) h )?(?:(\d+) min )?(\d+)?(?: s)? left", text)
    if not m:
        return None
    h, mins, s = (int(g) if g else 0 for g in m.groups())
    return 3600 * h + 60 * mins + s


def test_the_page_shows_the_run_as_it_is_and_stop_answers_at_once(browser, server):
    """Issue goals on --tiny, a 600-step run: the step shown is never more than 1 s behind the server (the time
    since the server passed it), the ETA at 25% is within 30% of the time really left, "Stopping..." shows within 0.5 s of the click
    and the run has stopped within 1 s."""
    url, studio = server
    page = open_page(browser, url)
    page.get_by_role("tab", name="Adapt").click()
    set_number(page, "adapt-iterations", 600)
    page.locator("#adapt-start").click()
    status = page.locator("#adapt-status")
    wait_for(lambda: studio.active_run() and "Training: step" in status.inner_text(), 120, "training")
    run = studio.active_run()[0]
    # when the server reached each step, sampled every 10 ms: the page is behind by the time since the server
    # passed the step it shows
    reached, watching = [], threading.Event()

    def record():
        while not watching.is_set():
            step = run.view().step
            if not reached or reached[-1][1] != step:
                reached.append((time.monotonic(), step))
            time.sleep(0.01)

    recorder = threading.Thread(target=record, daemon=True)
    recorder.start()
    lags, eta = [], None
    while not run.ended:
        text = status.inner_text()
        now = time.monotonic()
        shown = _shown_step(text)
        if shown is None or "Training" not in text:
            break
        passed = next((t for t, step in list(reached) if step > shown), None)
        lags.append(0.0 if passed is None else now - passed)
        if eta is None and shown >= 150:
            eta, t_eta = _seconds(text), time.monotonic()
        time.sleep(0.3)
    watching.set()
    wait_for(lambda: "Finished" in status.inner_text(), 300, "the end of the run")
    left = time.monotonic() - t_eta
    assert len(lags) >= 10 and max(lags) <= 1.0, f"the page lagged the run by up to {max(lags):.2f} s"
    assert eta is not None and abs(eta - left) <= 0.3 * left + 1, f"ETA {eta} s at 25%, but {left:.1f} s were left"

    set_number(page, "adapt-iterations", 600)
    page.locator("#adapt-start").click()
    wait_for(lambda: _shown_step(status.inner_text() or "") and "Training" in status.inner_text() and
             (_shown_step(status.inner_text()) or 0) >= 50, 120, "the second run")
    run = studio.active_run()[0]
    # both times measured where they happen, not through Playwright's 0.2 s polling: the page notes the click and
    # the first "Stopping"/"Stopped" text itself; a thread notes when the server's run ended
    page.evaluate("""() => {
        const box = document.querySelector('#adapt-status');
        window.__stop = {};
        document.querySelector('#adapt-stop').addEventListener('click', () => {
            window.__stop.clicked = performance.now(); }, {capture: true, once: true});
        new MutationObserver((_, obs) => {
            if (/Stopp(ing|ed)/.test(box.innerText)) { window.__stop.shown = performance.now(); obs.disconnect(); }
        }).observe(box, {subtree: true, childList: true, characterData: true});
    }""")
    ended = []
    threading.Thread(target=lambda: (wait_for_quickly(lambda: run.ended, 10), ended.append(time.monotonic())),
                     daemon=True).start()
    t0 = time.monotonic()
    page.locator("#adapt-stop").click()
    wait_for(lambda: page.evaluate("window.__stop.shown"), 5, "Stopping...")
    marks = page.evaluate("window.__stop")
    shown_at = (marks["shown"] - marks["clicked"]) / 1000
    wait_for(lambda: ended, 10, "the run to stop")
    stopped_at = ended[0] - t0
    assert shown_at <= 0.5 and stopped_at <= 1.0, (shown_at, stopped_at)
    wait_for(lambda: "Stopped:" in status.inner_text(), 20, "the stopped status")
    final = run.view().final
    assert final.kind == "cancelled" and RunFolder(run.folder.path).continuable
    page.screenshot(path=str(SCREENS / "stopped_1280.png"))
    page.close()


@pytest.mark.parametrize("width,height", [(1280, 720), (390, 844)])
def test_every_result_comes_into_view(browser, server, tmp_path, width, height):
    """After each primary action, and each action inside an accordion, its result is in the viewport."""
    url, studio = server
    page = open_page(browser, url, width, height)
    tag = f"{width}"

    def shown(selector, what):
        name = SCREENS / f"view_{what.replace(' ', '_')}_{tag}.png"
        try:
            wait_for(lambda: in_viewport(page, selector), 15, f"{what} in view at {width} px")
        finally:
            page.screenshot(path=str(name))

    # Adapt: Start, then Continue a run (inside its accordion, below the fold)
    page.get_by_role("tab", name="Adapt").click()
    set_number(page, "adapt-iterations", 30)
    page.locator("#adapt-start").scroll_into_view_if_needed()
    page.locator("#adapt-start").click()
    shown("#adapt-status", "adapt status")
    wait_for(lambda: "Finished" in page.locator("#adapt-status").inner_text(), 300, "the run's end")
    assert in_viewport(page, "#adapt-preview") or width < 900   # on a phone the preview follows the status
    page.get_by_text("Continue a run").click()
    run_id = next(e.id for e in studio.library() if e.kind == "run")
    box = page.get_by_label("Run (its recipe, snapshot and optimiser)")
    box.fill(run_id)
    box.press("Enter")
    continue_button = page.get_by_role("button", name="Continue", exact=True)
    continue_button.scroll_into_view_if_needed()
    continue_button.click()
    shown("#adapt-status", "continued run")
    wait_for(lambda: "Finished" in page.locator("#adapt-status").inner_text(), 300, "the continued run's end")
    if width >= 900:   # beside the status on a laptop (on a phone it follows the status)
        shown("#adapt-preview", "continued run's preview")

    # Sample: Generate, Preview the mix, Make video
    page.get_by_role("tab", name="Sample").click()
    page.locator("#sample-model input").first.click()
    page.get_by_role("option").first.click()
    page.locator("#sample-go").scroll_into_view_if_needed()
    page.locator("#sample-go").click()
    shown("#sample-grid", "sample grid")
    page.get_by_text("Mix styles (domain arithmetic)").click()
    page.get_by_role("button", name="Preview the mix").scroll_into_view_if_needed()
    pick = page.locator("#sample-mix input[role=listbox], #sample-mix input").first
    pick.click()
    page.get_by_role("option").first.click()
    page.get_by_role("button", name="Preview the mix").click()
    shown("#sample-grid", "mix grid")
    page.get_by_text("Interpolation video").click()
    page.get_by_role("button", name="Make video").scroll_into_view_if_needed()
    page.get_by_role("button", name="Make video").click()
    shown("#sample-video", "video")

    # Edit: Render
    page.get_by_role("tab", name="Edit").click()
    page.get_by_role("button", name="Render").scroll_into_view_if_needed()
    page.get_by_role("button", name="Render").click()
    shown("#edit-result", "edit result")

    # Selfie: the photo at once, then the stylised faces
    Image.fromarray(data.astronaut()).save(tmp_path / "me.jpg")
    page.get_by_role("tab", name="Selfie").click()
    page.locator("#selfie-upload input[type=file]").set_input_files(str(tmp_path / "me.jpg"))
    shown("#selfie-photo", "selfie photo")
    styles = page.locator("#selfie-styles input").first
    styles.click()
    page.get_by_role("option").first.click()
    page.keyboard.press("Escape")
    page.locator("#selfie-go").scroll_into_view_if_needed()
    page.locator("#selfie-go").click()
    wait_for(lambda: "Inverted" in page.locator("#selfie-status").inner_text(), 300, "the inversion")
    shown("#selfie-result", "stylised")
    assert in_viewport(page, "#selfie-pasted")   # side by side on a laptop; just under it on a phone
    page.close()


def test_library_refusals_answer_in_the_message_line_and_leave_the_panel_usable(browser, server, tmp_path):
    """Each refusal of the library panel says why in its message line; the table, thumbnails and picker stay as
    they were (no red Error placeholder anywhere), and the picker still chooses a model afterwards."""
    from gradio_client import Client

    url, studio = server
    if not any(e.kind == "run" for e in studio.library()):
        job = Client(url, verbose=False).submit("tiny", "Style", "Photo", "Sketch", [], [], 4, 2, 0.002, 0, 1, 0.0,
                                                ["tiny"], 1.0, 1.0, 0, 2, api_name="/train")
        job.result()
    page = open_page(browser, url)
    page.get_by_text("Model library").click()
    table, message = page.locator("#library-table"), page.locator("#library-message")
    wait_for(lambda: "photo-to" in table.inner_text(), 30, "the library table")
    panel = page.locator("#library")

    def state():
        return table.inner_text(), page.locator("#library-thumbs img").count(), page.locator("#library-pick input").input_value()

    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint at all" * 100)
    before = state()
    # ordered so that each answer differs from the one before it (the wait is for the new answer)
    refusals = [("Rename", None, "choose a model from the library"), ("Import", None, "choose a generator file"),
                ("Download", None, "choose a model from the library"), ("Import", junk, "junk.pt"),
                ("Download style delta", None, "choose a model from the library"), ("Delete...", None, "choose a model first"),
                ("Download as ONNX", None, "choose a model from the library")]
    for button, upload, words in refusals:
        if upload is not None:
            page.locator("#library-import input[type=file]").set_input_files(str(upload))
            wait_for(lambda: "junk.pt" in page.locator("#library-import").inner_text(), 20, "the upload")
        previous = message.inner_text()
        page.get_by_role("button", name=button, exact=True).click()
        wait_for(lambda: (t := message.inner_text()) != previous and words in t.lower(), 30, f"the answer to {button}")
        text = message.inner_text()
        assert message.locator(".nada-warn").count() == 1, (button, text)
        assert panel.get_by_text("Error", exact=True).count() == 0, f"{button}: an Error placeholder"
        assert state() == before, f"{button} changed the panel"
    page.screenshot(path=str(SCREENS / "library_refusals_1280.png"), full_page=True)
    pick = page.locator("#library-pick input")
    pick.click()
    page.get_by_role("option").first.click()
    wait_for(lambda: pick.input_value().startswith("photo-to"), 10, "a model chosen after the refusals")

    # Sample: a refused seed range is a toast; the grid keeps the last picture (no Error badge on it)
    page.get_by_role("tab", name="Sample").click()
    page.locator("#sample-model input").first.click()
    page.get_by_role("option").first.click()
    page.locator("#sample-go").click()
    wait_for(lambda: image_src(page, "sample-grid"), 30, "the sample grid")
    shown = image_src(page, "sample-grid")
    page.get_by_label("Seeds (e.g. 0-7 or 1,5,9)").fill("0-100000000")
    page.locator("#sample-go").click()
    wait_for(lambda: page.get_by_text("at most 16 at once").count() > 0, 20, "the seed refusal")
    assert page.get_by_text("at most 16 at once").count() == 1, "one refusal, said once"
    grid = page.locator("#sample-grid")
    assert grid.get_by_text("Error", exact=True).count() == 0 and image_src(page, "sample-grid") == shown
    page.close()


def test_draw_a_face_draws_on_first_touch_and_renders_on_tiny(browser, server):
    """The sketchpad draws with the first stroke (no tool to pick first), an empty canvas is refused with a
    message, and a drawing renders through the tiny base's untrained sketch encoder, labelled as such."""
    url, _ = server
    page = open_page(browser, url)
    page.get_by_role("tab", name="Selfie").click()
    page.get_by_text("Draw a face (pSp sketch-to-face)").click()
    page.get_by_role("button", name="Render the drawing").click()
    wait_for(lambda: page.get_by_text("the canvas is empty").count() > 0, 20, "the empty-canvas answer")
    canvas = page.locator("#selfie-sketchpad canvas").first
    canvas.scroll_into_view_if_needed()
    box = canvas.bounding_box()
    cx, cy, r = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2, box["width"] / 4
    page.mouse.move(cx - r, cy)
    page.mouse.down()
    for i in range(25):   # an oval face outline
        t = 2 * math.pi * i / 24
        page.mouse.move(cx + r * math.cos(t + math.pi), cy + 1.3 * r * math.sin(t + math.pi), steps=2)
    page.mouse.up()
    page.wait_for_timeout(1000)   # the editor hands its picture to the page a moment after the stroke ends
    page.get_by_role("button", name="Render the drawing").click()
    result = page.locator("#selfie-result")
    try:
        wait_for(lambda: result.locator("img").count() >= 1, 60, "the rendered drawing")
    finally:
        page.screenshot(path=str(SCREENS / "sketch_1280.png"), full_page=True)
    assert "untrained tiny encoder" in result.inner_text()
    assert "Rendered the drawing" in page.locator("#selfie-status").inner_text()
    assert in_viewport(page, "#selfie-result")
    page.screenshot(path=str(SCREENS / "sketch_1280.png"))
    page.close()
