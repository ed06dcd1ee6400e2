"""End to end in a real browser: Debian's headless Chromium driven by Playwright (no browser download).

Skipped, with the reason in pytest's `-ra` summary, when Playwright or Chromium is missing. Set
``FLATLORA_APP_SCREENSHOT=PATH`` to also save a screenshot after the first generation; or drive a
running app (e.g. ``python app.py``) for the README's screenshot::

    python tests/test_app_browser.py http://127.0.0.1:7860 docs/app.png
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import sys
from pathlib import Path

import pytest
from conftest import serve_app

CHROMIUM = "/usr/bin/chromium"
# Offline machine: without the background-networking flags Chromium's own connections are refused in bulk.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TIMEOUT_MS = 60_000  # the shared 2-core machine can be slow


def launch_chromium(playwright):
    return playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)


def generate_in_page(page, url: str, prompt: str, *, steps: int, seed: int = 0) -> None:
    """Open the app, type a prompt, set steps and seed, click Generate, wait for the summary of that seed."""
    page.goto(url, wait_until="domcontentloaded")
    page.wait_for_selector("#prompt textarea", timeout=TIMEOUT_MS)
    page.fill("#prompt textarea", prompt)
    for elem_id, value in (("steps", steps), ("seed", seed)):
        field = page.locator(f"#{elem_id} input").first
        field.fill(str(value))
        field.press("Enter")
    page.click("#generate")
    page.wait_for_selector(f"#status:has-text('seed {seed},')", timeout=TIMEOUT_MS)


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import Error, sync_playwright
    except ImportError:
        pytest.skip("browser test skipped: `playwright` is not installed (pip install playwright; never "
                    "`playwright install`: the test uses Debian's Chromium)")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"browser test skipped: no Chromium at `{CHROMIUM}` (apt-get install chromium)")
    with sync_playwright() as playwright:
        try:
            browser = launch_chromium(playwright)
        except Error as err:
            pytest.skip(f"browser test skipped: Chromium at `{CHROMIUM}` does not start: {err}")
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def app_url(tiny_sd_path, sd_adapter_dir, sdxl_adapter_dir, tmp_path_factory):
    """The app on a free local port, serving a good SD adapter and an SDXL one (wrong architecture)."""
    from flatlora_diffusion.app_studio import Studio

    root = tmp_path_factory.mktemp("browser_adapters")
    shutil.copytree(sd_adapter_dir, root / "dog")
    shutil.copytree(sdxl_adapter_dir, root / "xl")
    studio = Studio.open(str(tiny_sd_path), [root])
    with serve_app(studio) as url:
        yield url
    studio.close()


def test_generate_compare_download_and_errors_in_browser(browser, app_url, single_thread):
    from PIL import Image

    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    generate_in_page(page, app_url, "a photo of sks dog on the beach", steps=2, seed=3)
    assert "(base | dog ×1); seed 3, 2 steps" in page.inner_text("#status")
    images = page.locator("#gallery img")
    assert images.count() == 2  # compare mode: the base and the adapter, same seed, side by side
    if os.environ.get("FLATLORA_APP_SCREENSHOT"):
        page.screenshot(path=os.environ["FLATLORA_APP_SCREENSHOT"])

    # What the download button saves: the PNG written by the app, with its settings as text chunks.
    png = page.request.get(images.nth(1).get_attribute("src"))
    with Image.open(io.BytesIO(png.body())) as image:
        chunk = json.loads(image.text["flatlora"])
    assert chunk["adapters"] == {"dog": 1.0} and chunk["settings"]["seed"] == 3
    assert chunk["settings"]["prompt"] == "a photo of sks dog on the beach"

    # An adapter for another architecture: a clear pop-up, no stack trace, and the app keeps serving.
    xl = page.locator("#adapters label").filter(has_text=re.compile(r"^\s*xl\s*$"))
    xl.click()
    page.click("#generate")
    page.get_by_text("Adapter `xl` cannot be used: trained for SDXL").first.wait_for(timeout=TIMEOUT_MS)
    assert "Traceback" not in page.content()
    xl.click()
    seed = page.locator("#seed input").first
    seed.fill("4")
    seed.press("Enter")
    page.click("#generate")
    page.wait_for_selector("#status:has-text('seed 4,')", timeout=TIMEOUT_MS)
    assert page.locator("#gallery img").count() == 2
    page.close()


def main(argv: list[str]) -> int:
    """Screenshot a running app after one generation: `python tests/test_app_browser.py URL OUT.png`."""
    from playwright.sync_api import sync_playwright

    url, out = argv
    with sync_playwright() as playwright:
        browser = launch_chromium(playwright)
        page = browser.new_page(viewport={"width": 1200, "height": 860})
        generate_in_page(page, url, "a photo of sks dog", steps=20, seed=0)
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        page.evaluate("window.scrollTo(0, 0)")
        shot = page.screenshot(full_page=True)
        browser.close()
    from PIL import Image

    with Image.open(io.BytesIO(shot)) as image:  # 256 colours: a third of the size, same look for a UI
        image.convert("RGB").quantize(colors=256, kmeans=4).save(out, optimize=True)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
