"""The web app in a real browser: Playwright driving Debian's Chromium (headless) against a live `fovea serve`.

Upload an image and see its label; correct a label in the review queue with the keyboard; start and roll back
a canary; the models and drift pages. Every page is screenshotted (into $FOVEA_SCREENSHOTS when set: that is
how docs/screenshots/ is made), on a desktop and on a phone-sized screen.
"""

from __future__ import annotations

import os
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import missing_system_package, train_cnn

import fovea
from fovea import deploy, model_registry
from fovea.serve import ServeConfig, create_app

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or "/usr/bin/chromium"
PHONE = {"width": 390, "height": 844}


@pytest.fixture(scope="module")
def run(tiny_pets: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_cnn(tiny_pets, tmp_path_factory, "web", image_size=32, epochs=2, widths=(8, 16, 16, 16))


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    if not Path(CHROMIUM).exists():
        missing_system_package(f"Chromium ({CHROMIUM}, Debian's chromium package)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])  # root in CI containers
        yield b
        b.close()


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    folder = Path(os.environ.get("FOVEA_SCREENSHOTS") or tmp_path / "shots")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@contextmanager
def live(config: ServeConfig) -> Iterator[str]:
    """``fovea serve`` in this process, on a free port (uvicorn in a thread)."""
    import uvicorn

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(create_app(config), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(15)


def page_of(browser: Any, base: str, token: str | None = None, phone: bool = False) -> Any:
    context = browser.new_context(viewport=PHONE if phone else {"width": 1200, "height": 800})
    if token:
        context.add_init_script(f"localStorage.setItem('fovea-token', '{token}')")
    page = context.new_page()
    page.set_default_timeout(20_000)
    return page


def fits(page: Any) -> bool:
    """Nothing wider than the screen: no sideways scrolling on a phone."""
    return bool(page.evaluate("document.documentElement.scrollWidth <= window.innerWidth + 1"))


def test_upload_an_image_and_see_its_label(run: Path, browser: Any, tiny_pets: Path, shots: Path) -> None:
    photo = sorted((tiny_pets / "val" / "dog").glob("*.jpg"))[0]
    said = fovea.load(run, "cpu").predict([photo])[0][0]
    expected = "None of my classes" if said.unknown else said.label  # the card an image of no class gets
    model_registry.add(run, "pets")
    with live(ServeConfig(model="pets", drift_every_s=0)) as base:
        page = page_of(browser, base)
        page.goto(base + "/#/predict")
        page.set_input_files("#file", str(photo))
        label = page.locator("[data-testid=label]").first
        label.wait_for()
        assert label.inner_text() == expected
        assert page.locator(".result img").count() == 2  # the upload and its Grad-CAM overlay
        page.screenshot(path=str(shots / "predict.png"), full_page=True)
        page.select_option(".result select.truth", "dog")  # the person knows better: feedback from the app
        page.click(".result form.feedback button")
        page.locator(".result .good").wait_for()
        with _store().session() as s:
            from fovea.store import Feedback

            assert [f.label for f in s.query(Feedback)] == ["dog"]
        phone = page_of(browser, base, phone=True)
        phone.goto(base + "/#/predict")
        phone.set_input_files("#file", str(photo))
        phone.locator("[data-testid=label]").first.wait_for()
        assert fits(phone)
        phone.screenshot(path=str(shots / "predict-phone.png"), full_page=True)


def test_correct_a_label_in_the_queue_with_the_keyboard(run: Path, browser: Any, pets_root: Path, shots: Path,
                                                        fovea_home: Path) -> None:
    model_registry.add(run, "pets")
    photo = sorted((pets_root / "val" / "cat").glob("*.jpg"))[40]
    with live(ServeConfig(model="pets", review_below=1.0, drift_every_s=0)) as base:
        said = httpx.post(base + "/v1/predict", content=photo.read_bytes(), headers={"content-type": "image/jpeg"}).json()
        deadline = time.monotonic() + 10
        while not httpx.get(base + "/v1/reviews").json()["reviews"]:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        page = page_of(browser, base)
        page.goto(base + "/#/review")
        page.fill("#reviewer", "ana")
        card = page.locator(".card").first
        card.wait_for()
        assert said["label"] in card.inner_text()
        page.screenshot(path=str(shots / "review.png"), full_page=True)
        card.focus()
        page.keyboard.press("1")  # the first class: cat, whatever the model said
        page.locator("#empty").wait_for()
        done = httpx.get(base + "/v1/reviews?state=labelled").json()["reviews"]
        assert [(r["label"], r["votes"][0]["reviewer"]) for r in done] == [("cat", "ana")]
        phone = page_of(browser, base, phone=True)
        phone.goto(base + "/#/review")
        phone.locator("#empty").wait_for()
        assert fits(phone)
    assert len(list((fovea_home / "labelled" / "pets" / "cat").iterdir())) == 1


def test_start_and_roll_back_a_canary(run: Path, browser: Any, shots: Path) -> None:
    model_registry.add(run, "pets")
    model_registry.add(run, "pets")
    with live(ServeConfig(model="pets", admin_token="t0ken", drift_every_s=0)) as base:
        page = page_of(browser, base, token="t0ken")
        page.goto(base + "/#/deployments")
        page.select_option("#candidate", "pets:2")
        page.select_option("#strategy", "canary")
        page.fill("#percent", "10")
        page.click("#deploy-form button[type=submit]")
        page.locator("#deployments td.state-running").wait_for()
        running = deploy.active("pets", _store())
        assert running is not None and running.strategy == "canary" and running.percent == 10
        page.screenshot(path=str(shots / "deployments.png"), full_page=True)
        page.click("#rollback")
        page.locator("#deployments td.state-rolled_back").wait_for()
        assert deploy.deployments("pets")[0].state == "rolled_back" and deploy.active("pets", _store()) is None
        page.goto(base + "/#/models")
        page.locator("table td").first.wait_for()
        assert "pets:1" in page.inner_text("table") and "report" in page.inner_text("table")
        page.screenshot(path=str(shots / "models.png"), full_page=True)
        denied = page_of(browser, base)  # no token: the page says why instead of breaking
        denied.goto(base + "/#/deployments")
        denied.locator("main .bad").wait_for()
        assert "Authorization" in denied.inner_text("main")


def test_drift_page_charts_the_checks(run: Path, browser: Any, pets_root: Path, tmp_path: Path, shots: Path) -> None:
    from PIL import Image, ImageEnhance

    model_registry.add(run, "pets")
    photos = [p for c in ("cat", "dog") for p in sorted((pets_root / "val" / c).glob("*.jpg"))[50:80]]
    with live(ServeConfig(model="pets", drift_every_s=0, drift_window=60)) as base:
        page = page_of(browser, base)

        def send(files: list[Path]) -> None:
            for p in files:
                httpx.post(base + "/v1/predict", content=p.read_bytes(), headers={"content-type": "image/jpeg"})
            time.sleep(0.5)  # the prediction log writes in the background
            page.goto(base + "/#/drift")
            page.click("#drift-check")
            page.locator(".chart svg").first.wait_for()

        send(photos)
        assert "no drift" in page.inner_text("main")
        dark = []
        for p in photos:  # the same photos, much darker: a camera or pipeline change
            dark.append(tmp_path / p.name)
            ImageEnhance.Brightness(Image.open(p).convert("RGB")).enhance(0.3).save(dark[-1])
        send(dark)
        page.locator("main p.bad").wait_for()
        assert "ALERT" in page.inner_text("main") and page.locator(".chart").count() == 1  # no feedback: no accuracy
        assert page.locator(".chart circle").count() >= 2 * 5  # two checks, five tests
        page.screenshot(path=str(shots / "drift.png"), full_page=True)


def test_data_page_suspects_similar_images_and_review(run: Path, browser: Any, tiny_pets: Path, shots: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from fovea.data import write_label_issues
    from fovea.serve import _dataview

    monkeypatch.setattr(_dataview, "FIRST_WAIT_S", 0.0)  # the first answer is the progress, whatever the speed

    cats = sorted((tiny_pets / "train" / "cat").glob("*.jpg"))
    suspects = [cats[9], cats[2], cats[30]]  # as `fovea check --labels` would rank them: most suspect first
    images = [{"path": str(p), "split": "train", "given": "cat", "suggested": "dog", "quality": q, "issue": True,
               "rank": k, "probabilities": {"cat": q, "dog": 1 - q}}
              for k, (p, q) in enumerate(zip(suspects, (0.03, 0.05, 0.08)), 1)]
    write_label_issues(tiny_pets, {"data": str(tiny_pets), "classes": ["cat", "dog"], "folds": 4, "seconds": 1.0,
                                   "created": "2026-11-24T18:00:00", "n_images": 3, "n_issues": 3, "images": images})
    model_registry.add(run, "pets")
    with live(ServeConfig(model="pets", drift_every_s=0)) as base:
        page = page_of(browser, base)
        page.goto(base + "/#/data")
        page.locator("#data-progress").wait_for()  # a first visit: every image is predicted once
        page.locator("#grid .tile").first.wait_for(timeout=120_000)
        assert page.locator("[data-filter=suspect] .count").inner_text() == "3"
        loaded(page, "#grid .tile:nth-child(-n+10) img")
        page.screenshot(path=str(shots / "data.png"))  # the grid is long: what a screen shows

        page.click("[data-filter=suspect]")
        page.wait_for_function("document.querySelectorAll('#grid .tile').length === 3")
        tiles = page.locator("#grid .tile")
        assert "given cat, looks dog 0.03" in tiles.nth(0).inner_text()  # the most suspect first
        assert "#/data?filter=suspect" in page.url  # a link to this view
        tiles.nth(0).focus()  # the keyboard: arrows move, Enter opens, Escape closes
        page.keyboard.press("ArrowRight")
        page.keyboard.press("ArrowLeft")
        page.keyboard.press("Enter")
        dialog = page.locator("dialog#detail")
        dialog.wait_for()
        assert suspects[0].name in page.inner_text("#detail-title")
        page.wait_for_function("document.querySelectorAll('#similar .near').length === 8")  # its similar images
        dialog.locator("img[alt^='Grad-CAM']").wait_for()
        loaded(page, "dialog#detail img")
        page.screenshot(path=str(shots / "data-detail.png"), full_page=True)

        page.click("#send-review")
        page.wait_for_function("document.querySelector('#send-review').textContent === 'Queued'")
        assert page.locator("#send-review").is_disabled()
        assert "sent to the review queue" in page.inner_text("#toast")
        nearest = page.locator("#similar .near").first
        near_id = nearest.get_attribute("data-id")
        nearest.click()  # a similar image opens in its place
        page.wait_for_function(f"document.querySelector('#detail-title').textContent.startsWith('#{near_id} ')")
        page.keyboard.press("Escape")
        page.wait_for_function("!document.querySelector('dialog#detail').open")
        assert page.evaluate("document.activeElement.classList.contains('tile')")  # back where the keyboard was
        assert "queued" in tiles.nth(0).inner_text()

        page.goto(base + "/#/review")  # the suspect waits in the review queue, as what it is
        card = page.locator(".card.suspect").first
        card.wait_for()
        assert "labelled cat; looks like dog" in card.inner_text()

        phone = page_of(browser, base, phone=True)
        phone.goto(base + "/#/data?filter=suspect")
        phone.wait_for_function("document.querySelectorAll('#grid .tile').length === 3")
        loaded(phone, "#grid img")
        columns = phone.evaluate("getComputedStyle(document.querySelector('#grid')).gridTemplateColumns"
                                 ".split(' ').length")
        assert 2 <= columns <= 3 and fits(phone)
        phone.screenshot(path=str(shots / "data-phone.png"), full_page=True)
        phone.locator("#grid .tile").first.click()
        phone.locator("#similar .near").first.wait_for()
        phone.locator("dialog#detail img[alt^='Grad-CAM']").wait_for()
        loaded(phone, "dialog#detail .pair img")
        box = phone.locator("dialog#detail").bounding_box()
        assert box is not None and box["width"] >= PHONE["width"] - 1  # the detail takes the whole screen
        phone.screenshot(path=str(shots / "data-detail-phone.png"))


def loaded(page: Any, selector: str) -> None:
    """Wait until the images ``selector`` finds have arrived (lazy ones load once on screen)."""
    page.wait_for_function("s => [...document.querySelectorAll(s)].every(i => i.complete && i.naturalWidth > 0)",
                           arg=selector)


def test_data_page_says_when_the_data_is_gone(run: Path, browser: Any, tmp_path: Path) -> None:
    from fovea.artifact import read_meta, write_meta

    moved = Path(shutil.copytree(run, tmp_path / "moved"))
    meta = read_meta(moved)
    meta["data"]["root"] = str(tmp_path / "elsewhere")
    write_meta(moved, meta)
    with live(ServeConfig(model=str(moved), drift_every_s=0)) as base:
        page = page_of(browser, base)
        page.goto(base + "/#/data")
        page.locator("#data-empty").wait_for()
        assert "not at" in page.inner_text("#data-empty") and page.locator("main .bad").count() == 0


def _store() -> Any:
    from fovea.store import Store

    return Store()
