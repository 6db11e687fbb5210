"""The status page in a real headless browser (Debian's chromium driven by Playwright): a
container that starts appears, its state changes when it is stopped, and it disappears; requests
through the proxy show on its live traffic charts. Screenshots are written to tests/artifacts/."""

from __future__ import annotations

import asyncio
import shutil
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from playwright.async_api import Browser, Page, Playwright, async_playwright

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


async def synced_page(pw: Playwright, url: str, **page: Any) -> tuple[Browser, Page]:
    """A browser with the status page open, once it says it is synced with Docker."""
    browser = await pw.chromium.launch(executable_path=chromium(), args=CHROMIUM_FLAGS)
    opened = await browser.new_page(**page)
    await opened.goto(url)
    await opened.wait_for_selector("#sync.synced", timeout=15_000)
    return browser, opened


async def test_status_page_follows_a_container(containers: Containers) -> None:
    daemon = await start_daemon()
    ARTIFACTS.mkdir(exist_ok=True)
    name = containers.name("shown")
    try:
        async with async_playwright() as pw:
            phone = {"width": 390, "height": 844}
            browser, page = await synced_page(pw, daemon.admin + "/", viewport=phone)
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
        async with aiohttp.ClientSession() as http:
            for path in ("/v1/traffic", "/v1/services/any/traffic"):
                async with http.get(daemon.admin + path) as resp:
                    assert resp.status == 401
            bearer = {"Authorization": "Bearer pagesecret"}
            async with http.get(daemon.admin + "/v1/traffic", headers=bearer) as resp:
                assert resp.status == 200 and "tick" in await resp.json()
    finally:
        await stop_daemon(daemon)


async def test_status_page_shows_what_the_controller_keeps(containers: Containers) -> None:
    daemon = await start_daemon()
    service = containers.name("kept")
    try:
        async with async_playwright() as pw:
            browser, page = await synced_page(pw, daemon.admin + "/")
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
            assert "heal: replace" in text and "last: " in text
            events = await page.inner_text("#events")
            assert f"{service}/{containers.name('kept')}: grow (1 of 2 replicas)" in events
            await browser.close()
    finally:
        await stop_daemon(daemon)
        for box in containers.client.containers.list(
            all=True, filters={"label": f"stablenet.service={service}"}
        ):
            box.remove(force=True)


def figure(service: str, chart: str) -> str:
    """A JS expression: the newest value beside one of a service's charts ("" when none)."""
    css = f'.chart[data-chart="{chart}"][data-service="{service}"] .now'
    return f"document.querySelector('{css}')?.dataset.value"


async def shown(page: Page, service: str, chart: str) -> str:
    return str(await page.evaluate(figure(service, chart)))


async def test_status_page_charts_traffic_live(containers: Containers) -> None:
    daemon = await start_daemon(serving=True)
    ARTIFACTS.mkdir(exist_ok=True)
    service = containers.name("charted")
    proxied = f"http://127.0.0.1:{daemon.proxy_port}/"
    sent = 0
    try:
        async with async_playwright() as pw, aiohttp.ClientSession() as http:
            phone = {"width": 390, "height": 844}
            browser, page = await synced_page(
                pw, daemon.admin + "/", viewport=phone, color_scheme="dark"
            )
            await off_loop(
                containers.run,
                "charted",
                labels={"stablenet.service": service, "stablenet.port": "80"},
            )
            await page.wait_for_function(f"{figure(service, 'replicas')} === '1'", timeout=15_000)
            assert await shown(page, service, "requests") == "0"

            async def load() -> None:
                """About 20 requests a second, for 30 s at the most (cancelled sooner)."""
                nonlocal sent
                for _ in range(600):
                    async with http.get(
                        proxied, headers={"Host": f"{service}.stablenet.internal"}
                    ) as resp:
                        assert resp.status == 200
                        await resp.read()
                    sent += 1
                    await asyncio.sleep(0.05)  # the load's pace, not a wait for an event

            async with asyncio.TaskGroup() as tasks:
                loading = tasks.create_task(load())
                await page.wait_for_function(
                    f"parseFloat({figure(service, 'requests')}) > 0"
                    f" && parseFloat({figure(service, 'p99')}) > 0",
                    timeout=15_000,
                )
                assert await shown(page, service, "errors") == "0"
                assert await shown(page, service, "concurrency") in ("0", "1")  # sequential
                await page.screenshot(
                    path=str(ARTIFACTS / "status-charts-dark.png"), full_page=True
                )
                await page.locator(f'[data-traffic="{service}"]').screenshot(
                    path=str(ARTIFACTS / "status-charts-service-dark.png")
                )
                await page.emulate_media(color_scheme="light")
                await page.screenshot(path=str(ARTIFACTS / "status-charts.png"), full_page=True)
                loading.cancel()
            peak = await page.get_attribute(
                f'.chart[data-chart="requests"][data-service="{service}"]', "data-peak"
            )
            assert peak is not None and float(peak) > 0
            async with http.get(f"{daemon.admin}/v1/services/{service}/traffic") as resp:
                assert resp.status == 200
                history = await resp.json()
            assert history["service"] == service and history["tick"] > 0
            assert sum(history["requests"]) > 0 and not any(history["errors"])
            assert max(history["ready"]) == 1 and set(history["desired"]) == {None}
            async with http.get(f"{daemon.admin}/v1/traffic?since={history['tick']}") as resp:
                assert resp.status == 200
                assert (await resp.json())["tick"] >= history["tick"]
            async with http.get(f"{daemon.admin}/v1/traffic?since=soon") as resp:
                assert resp.status == 400
            await browser.close()
    finally:
        await stop_daemon(daemon)
    assert sent > 0
    for shot in ("status-charts-dark.png", "status-charts.png"):
        assert (ARTIFACTS / shot).stat().st_size > 10_000
