"""The status page in a real headless browser (Debian's chromium driven by Playwright): a
container that starts appears, its state changes when it is stopped, and it disappears. A
screenshot is written to tests/artifacts/."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path

import pytest
from playwright.async_api import async_playwright

from tests.helpers import Containers, off_loop
from tests.test_cli import start_daemon, stop_daemon

ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
CHROMIUM_FLAGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium() -> str:
    path = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).exists():
        pytest.fail("chromium is missing: run scripts/install.sh", pytrace=False)
    return path


async def test_status_page_follows_a_container(containers: Containers) -> None:
    daemon = await start_daemon()
    ARTIFACTS.mkdir(exist_ok=True)
    name = containers.name("shown")
    try:
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=chromium(), args=CHROMIUM_FLAGS)
            page = await browser.new_page(viewport={"width": 390, "height": 844})  # a phone
            await page.goto(daemon.admin + "/")
            await page.wait_for_selector("#sync.synced", timeout=15_000)
            box = await off_loop(
                containers.run,
                "shown",
                labels={"stablenet.service": "page-web", "stablenet.port": "80"},
                command=[
                    "sh",
                    "-c",
                    "trap '' TERM; httpd -p 80 -h /www; while true; do sleep 1; done",
                ],
            )
            row = f'tr[data-endpoint="{name}"]'
            await page.wait_for_selector(f'{row}[data-state="ready"]', timeout=15_000)
            assert await page.inner_text('h2[data-service="page-web"]') == "page-web 1 of 1 ready"
            stopping = asyncio.get_running_loop().run_in_executor(None, lambda: box.stop(timeout=4))
            await page.wait_for_selector(f'{row}[data-state="draining"]', timeout=15_000)
            await page.screenshot(path=str(ARTIFACTS / "status-page.png"), full_page=True)
            await stopping
            await page.wait_for_selector(row, state="detached", timeout=15_000)
            events = await page.inner_text("#events")
            assert f"page-web/{name}: added at" in events
            assert "ready -> draining (container is stopping)" in events
            assert f"page-web/{name}: removed from" in events
            await browser.close()
    finally:
        await stop_daemon(daemon)
    assert (ARTIFACTS / "status-page.png").stat().st_size > 10_000


async def test_status_page_sends_token(containers: Containers) -> None:
    daemon = await start_daemon(env={"STABLENET_ADMIN_TOKEN": "pagesecret"})
    try:
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=chromium(), args=CHROMIUM_FLAGS)
            page = await browser.new_page()
            await page.goto(daemon.admin + "/")
            await page.wait_for_selector("#sync.lost", timeout=15_000)
            assert "401" in await page.inner_text("#sync")
            await page.goto(daemon.admin + "/#token=pagesecret")
            await page.reload()
            await page.wait_for_selector("#sync.synced", timeout=15_000)
            await browser.close()
    finally:
        await stop_daemon(daemon)


async def test_status_page_shows_what_the_controller_keeps(containers: Containers) -> None:
    daemon = await start_daemon()
    service = containers.name("kept")
    try:
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=chromium(), args=CHROMIUM_FLAGS)
            page = await browser.new_page()
            await page.goto(daemon.admin + "/")
            await page.wait_for_selector("#sync.synced", timeout=15_000)
            await off_loop(
                containers.run,
                "kept",
                labels={"stablenet.service": service, "stablenet.replicas": "2"},
            )
            line = f'p[data-managed="{service}"]'
            await page.wait_for_function(
                f"document.querySelector('{line}')?.textContent.includes('2 of 2 replicas ready')",
                timeout=30_000,
            )
            text = await page.inner_text(line)
            assert "heal: replace" in text and f"last: grow {containers.name('kept')}" in text
            events = await page.inner_text("#events")
            assert f"{service}/{containers.name('kept')}: grow (1 of 2 replicas)" in events
            await browser.close()
    finally:
        await stop_daemon(daemon)
        for box in containers.client.containers.list(
            all=True, filters={"label": f"stablenet.service={service}"}
        ):
            box.remove(force=True)
