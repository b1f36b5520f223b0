"""The demo page at GET / in a real browser (Debian's headless Chromium driven by playwright, no
browser download) against a real server process: the page loads, an image is segmented, and
the overlay appears with the label colours (docs/serve.md "Other routes")."""

from __future__ import annotations

import io
import shutil
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from _serve_support import Server, serve
from PIL import Image

pytest.importorskip("fastapi")
sync_api = pytest.importorskip("playwright.sync_api")

pytestmark = pytest.mark.browser
CHROMIUM = "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--disable-sync"]
LABELS = ["red square", "blue circle", "cat"]
GREY = 128


@pytest.fixture(scope="module")
def server(tiny_bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    if not Path(CHROMIUM).is_file() and shutil.which("chromium") is None:
        pytest.skip("Debian's chromium is not installed (apt-get install chromium)")
    with serve(tiny_bundle, tmp_path_factory.mktemp("serve-browser")) as running:
        yield running


def test_page_segments_an_image_and_shows_the_overlay(server: Server, tmp_path: Path) -> None:
    from segclip.runtime.visualize import palette

    image = tmp_path / "grey.png"
    height, width = 96, 128
    Image.fromarray(np.full((height, width, 3), GREY, np.uint8)).save(image)
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium") or CHROMIUM,
                                    args=ARGS, headless=True)
        try:
            page = browser.new_page(device_scale_factor=1, viewport={"width": 1100,
                                                                     "height": 800})
            page.goto(server.url + "/", timeout=30_000)
            assert "segclip" in page.title()
            page.wait_for_function("document.getElementById('thresholdValue').textContent "
                                   "!== ''", timeout=30_000)
            page.fill("#labels", "\n".join(LABELS))
            page.eval_on_selector("#threshold", "e => { e.value = '0'; }")  # label every pixel
            page.set_input_files("#file", str(image))
            page.wait_for_selector("#overlay", state="visible", timeout=60_000)
            page.wait_for_function("document.getElementById('status').textContent === 'done'",
                                   timeout=60_000)
            assert page.text_content("#error") == ""
            legend = page.inner_text("#legend")
            timings = page.inner_text("#timings")
            shot = page.locator("#overlay").screenshot()
        finally:
            browser.close()
    assert "image" in timings and "total" in timings
    present = [i for i, name in enumerate(LABELS, start=1) if name in legend]
    assert present and "background" not in legend  # threshold 0: every pixel labelled
    pixels = np.asarray(Image.open(io.BytesIO(shot)).convert("RGB"), dtype=np.int16)
    area = pixels[2:height - 2, 2:width - 2]  # (h, w, 3) the image part, inside the border
    blends = 0.5 * GREY + 0.5 * palette(len(LABELS) + 1)[present].astype(np.int16)  # (k, 3)
    distance = np.abs(area[:, :, None, :] - blends[None, None]).max(axis=-1).min(axis=-1)
    assert (distance <= 12).mean() > 0.95, "overlay pixels are not the tinted label colours"
    assert (np.abs(area - GREY).max(axis=-1) <= 6).mean() < 0.05  # no untinted grey left
