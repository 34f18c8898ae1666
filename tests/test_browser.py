"""End to end: the page in Debian's Chromium, driven by Playwright, against `pneumoscan serve`.

PNEUMOSCAN_BROWSER_MODEL picks the served model (default: the tiny cnn); PNEUMOSCAN_SCREENSHOT=1
also saves docs/screenshot.png, the README's picture.
"""

import csv
import io
import os
import re
from pathlib import Path

import httpx
import pytest
from helpers import dicom_bytes, dicom_dataset, serving

from pneumoscan import reader, report
from pneumoscan.screening import FIELDS

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "screenshot.png"

pytestmark = [
    pytest.mark.slow,  # a real server and a real browser: seconds to start
    pytest.mark.skipif(
        not CHROMIUM.is_file(), reason="Chromium not installed: apt-get install chromium"
    ),
]


@pytest.fixture(scope="module")
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    """`pneumoscan serve` on a free local port; its base URL."""
    model = os.environ.get("PNEUMOSCAN_BROWSER_MODEL") or str(
        request.getfixturevalue("tiny_models")["cnn"]
    )
    log = tmp_path_factory.mktemp("server") / "serve.log"
    with serving(["--model", model], log) as (host, port):
        yield f"http://{host}:{port}/"


def test_upload_shows_label_probability_and_heatmap(
    server: str, xray_files: list[Path], tmp_path: Path
) -> None:
    from playwright.sync_api import expect, sync_playwright

    dicom = tmp_path / "chest.dcm"
    dicom.write_bytes(dicom_bytes(dicom_dataset(reader.read_image(xray_files[4]))))
    broken = tmp_path / "broken.jpeg"
    broken.write_bytes(b"\xff\xd8\xff not really a JPEG")
    chosen = [xray_files[3], xray_files[0]]  # one of each class
    api = httpx.post(
        server + "api/v1/predict",
        files=[("files", (p.name, p.read_bytes())) for p in chosen],
        timeout=60,
    ).json()["results"]
    expected = {r["file"]: r for r in api}

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900}, accept_downloads=True)
            problems: list[str] = []
            page.on("pageerror", lambda exc: problems.append(str(exc)))
            page.on("console", lambda msg: msg.type == "error" and problems.append(msg.text))
            # Playwright turns file-chooser interception on without waiting for the browser; a
            # listener from the start makes sure it is on before the keyboard opens the chooser.
            page.on("filechooser", lambda chooser: None)
            page.goto(server)
            expect(page.get_by_text("Research tool, not a medical device.")).to_be_visible()
            expect(page.locator("#model-line")).to_contain_text("Model: ")

            page.set_input_files("#file-input", [str(p) for p in chosen])
            cards = page.locator("#results > li")
            expect(cards).to_have_count(2)
            expect(page.locator("#status")).to_contain_text("2 files, most likely pneumonia first")
            ranked = sorted(api, key=lambda r: -r["probability"])
            for card, result in zip(cards.all(), ranked, strict=True):
                expect(card.locator(".file-name")).to_have_text(result["file"])
                expect(card.locator(".label")).to_have_text(result["label"])
                shown = report.shown_probability(result["probability"], digits=2)
                expect(card.locator(".numbers")).to_contain_text(
                    f"P(pneumonia) {shown} · threshold {result['threshold']:.2f}"
                )
                expect(card.locator(".thumb img")).to_be_visible()

            first = cards.first
            toggle = first.get_by_role("button", name="Show heatmap")
            toggle.click()
            heatmap = first.locator("figure.heatmap img")
            expect(heatmap).to_be_visible(timeout=60_000)
            assert heatmap.evaluate("img => img.naturalWidth") > 0
            expect(first.get_by_role("button", name="Hide heatmap")).to_have_attribute(
                "aria-pressed", "true"
            )
            if os.environ.get("PNEUMOSCAN_SCREENSHOT") == "1":
                page.screenshot(path=str(SCREENSHOT), full_page=True)
            first.get_by_role("button", name="Hide heatmap").click()
            expect(heatmap).to_have_count(0)

            # The keyboard opens the file chooser from the drop zone.
            page.locator("#drop-zone").focus()
            with page.expect_file_chooser() as chooser:
                page.keyboard.press("Enter")
            chooser.value.set_files([str(dicom), str(broken)])
            expect(cards).to_have_count(4)
            dicom_card = page.locator('#results > li[data-file="chest.dcm"]')
            expect(dicom_card.locator(".label")).to_have_text(re.compile("NORMAL|PNEUMONIA"))
            expect(dicom_card.locator(".thumb-placeholder")).to_be_visible()
            broken_card = page.locator('#results > li[data-file="broken.jpeg"]')
            expect(broken_card.locator(".warning")).to_contain_text("Could not read this file")
            expect(cards.last).to_have_attribute("data-file", "broken.jpeg")  # failures last

            page.select_option("#mode", "balanced")
            expect(page.locator(".numbers", has_text="balanced operating point")).to_have_count(3)

            with page.expect_download() as download:
                page.get_by_role("button", name="Download CSV").click()
            rows = list(csv.reader(io.StringIO(Path(download.value.path()).read_text())))
            assert rows[0] == list(FIELDS) and len(rows) == 5
            by_name = {row[0]: row for row in rows[1:]}
            assert by_name["broken.jpeg"][7].startswith("broken.jpeg: ")
            for name, result in expected.items():
                assert by_name[name][4] == "balanced"
                assert float(by_name[name][1]) == pytest.approx(result["probability"])

            assert problems == []
        finally:
            browser.close()


def test_a_server_with_a_token_asks_for_it_once(
    tiny_models: dict[str, Path], xray_files: list[Path], tmp_path: Path
) -> None:
    from playwright.sync_api import expect, sync_playwright

    token = "browser-test-token-0123456789"
    (tmp_path / "token").write_text(token + "\n")
    options = ["--model", str(tiny_models["cnn"]), "--token-file", str(tmp_path / "token")]
    with serving(options, tmp_path / "serve.log") as (host, port):
        base = f"http://{host}:{port}/"
        assert httpx.get(base + "api/v1/model").status_code == 401
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            try:
                page = browser.new_page()
                page.goto(base)
                form = page.locator("#token-form")
                expect(form).to_be_visible()
                page.fill("#token", "not-the-token")
                page.get_by_role("button", name="Use token").click()
                expect(page.locator("#status")).to_contain_text("not accepted")
                page.fill("#token", token)
                page.get_by_role("button", name="Use token").click()
                expect(page.locator("#model-line")).to_contain_text("Model: ")
                expect(form).to_be_hidden()
                page.set_input_files("#file-input", [str(xray_files[0])])
                expect(page.locator("#results > li .label")).to_have_text(
                    re.compile("NORMAL|PNEUMONIA")
                )
            finally:
                browser.close()
    assert token not in (tmp_path / "serve.log").read_text()
