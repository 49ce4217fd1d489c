"""The dashboard in real headless Chromium (Debian's), through the edge, with screenshots as artifacts."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from .conftest import TOKEN, RunningPortal, StartPortal

pytestmark = [pytest.mark.slow, pytest.mark.browser, pytest.mark.asyncio]
CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[3] / "test-artifacts"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
WAIT_MS = 15_000


async def test_dashboard_in_chromium(
    tmp_path: Path, start_portal: StartPortal, supervisord: Callable[[Path], None]
) -> None:
    async_api = pytest.importorskip("playwright.async_api")
    if not os.access(CHROMIUM, os.X_OK):
        pytest.skip(f"{CHROMIUM} is missing: apt-get install chromium")
    p = await start_portal()
    supervisord(p.settings.supervisor_socket)
    p.settings.skip_note("skipper").parent.mkdir(parents=True, exist_ok=True)
    p.settings.skip_note("skipper").write_text("'Skipper' is not in portal.yaml\n")
    log = p.settings.log_dir / "vllm.log"
    log.write_text("".join(f"startup line {i}\n" for i in range(20)))
    ARTIFACTS.mkdir(exist_ok=True)
    profile = tmp_path / "chromium-profile"
    async with async_api.async_playwright() as playwright:
        browser = await playwright.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1200, "height": 800},
        )  # fmt: skip
        try:
            page = await browser.new_page()
            page.set_default_timeout(WAIT_MS)
            await login_and_see_apps(page, p.url(p.portal_port), p.api_port)
            await watch_a_log_line_appear(page, log)
            await restart_a_program(page)
            await page.click("#tabs button[data-tab=tunnels]")
            await page.locator("#tunnels-message", has_text="cloudflared is not installed").wait_for()
            assert await page.locator("#tunnel-start").is_hidden()
            await page.screenshot(path=str(ARTIFACTS / "portal-tunnels.png"))
            await page.click("#tabs button[data-tab=metrics]")
            await page.wait_for_selector("[data-metric=cpu_percent]")
            await page.screenshot(path=str(ARTIFACTS / "portal-metrics.png"))
            await follow_a_log_across_a_portal_restart(page, p, log)
        finally:
            await browser.close()
    shutil.rmtree(profile, ignore_errors=True)


async def login_and_see_apps(page: object, base: str, api_port: int) -> None:
    await page.goto(f"{base}?token={TOKEN}")  # type: ignore[attr-defined]
    assert "token" not in page.url  # type: ignore[attr-defined]
    row = page.locator('tr[data-app="vLLM API"]')  # type: ignore[attr-defined]
    await row.locator(".details", has_text="SmolLM2-135M-Instruct").wait_for()
    assert await row.locator(".badge").inner_text() == "up"
    link = await row.locator("a").get_attribute("href")
    assert link == f"http://127.0.0.1:{api_port}/docs?token={TOKEN}"
    await page.screenshot(path=str(ARTIFACTS / "portal-apps.png"))  # type: ignore[attr-defined]


async def watch_a_log_line_appear(page: object, log: Path) -> None:
    await page.click("#tabs button[data-tab=logs]")  # type: ignore[attr-defined]
    await page.wait_for_selector('#log-file option[value="vllm.log"]', state="attached")  # type: ignore[attr-defined]
    await page.select_option("#log-file", "vllm.log")  # type: ignore[attr-defined]
    view = page.locator("#log-view")  # type: ignore[attr-defined]
    await view.get_by_text("startup line 19").wait_for()
    with log.open("a") as f:
        f.write("appended live <b>not bold</b>\n\x1b[31mred text\x1b[0m\ndownload 10%\rdownload 100%\n")
        # 256-colour parameters are not colours of their own; 22 ends bold; tput sgr0's "\x1b(B" is hidden.
        f.write("\x1b[38;5;32mpalette\x1b[0m \x1b[1mbold\x1b[22mplain\x1b(B\x1b[m finale\n")
    await view.get_by_text("download 100%").wait_for()
    await view.get_by_text("finale").wait_for()
    assert await view.locator("span.fg-32").count() == 0
    assert await view.locator("span.ansi-bold", has_text="plain").count() == 0
    assert "(B" not in await view.inner_text()
    text = await view.inner_text()
    assert "appended live <b>not bold</b>" in text
    assert "download 10%" not in text
    assert await view.locator("b").count() == 0
    assert await view.locator("span.fg-31", has_text="red text").count() == 1
    await page.screenshot(path=str(ARTIFACTS / "portal-logs.png"))  # type: ignore[attr-defined]


async def restart_a_program(page: object) -> None:
    await page.click("#tabs button[data-tab=services]")  # type: ignore[attr-defined]
    row = page.locator('tr[data-program="sleeper"]')  # type: ignore[attr-defined]
    await row.locator(".state", has_text="RUNNING").wait_for()
    skipped = page.locator('tr[data-program="skipper"] .state')  # type: ignore[attr-defined]
    assert await skipped.inner_text() == "SKIPPED"
    assert await skipped.get_attribute("title") == "'Skipper' is not in portal.yaml"
    pid_before = await row.locator(".pid").inner_text()
    assert pid_before
    protected = page.locator('tr[data-program="portal"] button[data-action=stop]')  # type: ignore[attr-defined]
    assert await protected.is_disabled()
    await row.locator("button[data-action=restart]").click()
    await page.locator("#services-message", has_text="restart sleeper: done").wait_for()  # type: ignore[attr-defined]
    await page.wait_for_function(  # type: ignore[attr-defined]
        "pid => document.querySelector('tr[data-program=sleeper] .pid').textContent !== pid", arg=pid_before
    )
    await row.locator(".state", has_text="RUNNING").wait_for()
    await page.screenshot(path=str(ARTIFACTS / "portal-services.png"))  # type: ignore[attr-defined]


async def follow_a_log_across_a_portal_restart(page: object, p: RunningPortal, log: Path) -> None:
    """While the portal is away the page says so; the log stream comes back by itself after."""
    await page.click("#tabs button[data-tab=logs]")  # type: ignore[attr-defined]
    await page.locator("#log-status", has_text="following vllm.log").wait_for()  # type: ignore[attr-defined]
    await p.portal.stop()
    await page.locator("#log-status", has_text="reconnecting").wait_for()  # type: ignore[attr-defined]
    await page.click("#tabs button[data-tab=apps]")  # type: ignore[attr-defined]
    await page.locator("#connection", has_text="cannot reach the portal").wait_for()  # type: ignore[attr-defined]
    await p.portal.start()
    await page.locator("#connection", has_text="cannot reach").wait_for(state="hidden")  # type: ignore[attr-defined]
    await page.click("#tabs button[data-tab=logs]")  # type: ignore[attr-defined]
    await page.locator("#log-status", has_text="following vllm.log").wait_for()  # type: ignore[attr-defined]
    with log.open("a") as f:
        f.write("after the restart\n")
    await page.locator("#log-view").get_by_text("after the restart").wait_for()  # type: ignore[attr-defined]
